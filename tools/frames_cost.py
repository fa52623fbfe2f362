"""What one draft message of the frames transport costs on this host, against its bound: a
batch of sampled rows (every row's distributions at every position, the largest message) sent by
FrameSender and received by FrameReceiver into the verifier's buffer over an ipc:// socket,
against one memcpy of the same bytes (a receiver cannot do with less than writing them once).
Defaults: Qwen's vocabulary, 8 rows, k = 4.

    python tools/frames_cost.py --vocab 151936 --rows 8 --depth 4 --json out/frames_cost.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import zmq

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from minedraft.workers.buffers import draft_buffer_specs  # noqa: E402
from minedraft.workers.frames import FrameBuffers, FrameReceiver, FrameSender  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--vocab", type=int, default=151936)
    parser.add_argument("--rows", type=int, default=8)
    parser.add_argument("--depth", type=int, default=4, help="draft positions per row (k + e)")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--json")
    args = parser.parse_args()
    specs = draft_buffer_specs(args.rows, args.depth, args.vocab)
    context = zmq.Context()
    with tempfile.TemporaryDirectory() as tmp:
        sender = FrameSender(context, f"ipc://{tmp}/drafts.sock")
        sent = [FrameBuffers.create(specs, sender.endpoint) for _ in range(2)]
        got = [FrameBuffers.attach(b.handle()) for b in sent]
        receiver = FrameReceiver(context, sender.endpoint, got, timeout_s=30.0)
        sent[0].tensors["draft_probs"].uniform_()
        rows = [(row, args.depth, True) for row in range(args.rows)]
        transfer, copy = [], []
        for draft_id in range(1, args.repeats + 1):  # side by side, alternating
            start = time.perf_counter()
            sender.send(sent[0], 0, draft_id, rows)
            num_bytes = receiver.wait_for(0, draft_id)
            transfer.append(time.perf_counter() - start)
            start = time.perf_counter()
            got[1].tensors["draft_probs"].copy_(sent[0].tensors["draft_probs"])
            copy.append(time.perf_counter() - start)
        sender.close()
        receiver.close()
    context.destroy(linger=0)
    t, c = statistics.median(transfer), statistics.median(copy)
    probs_bytes = sent[0].tensors["draft_probs"].nbytes
    row = {"bytes_per_message": num_bytes, "transfer_ms": t * 1e3, "memcpy_ms": c * 1e3,
           "memcpy_gb_per_s": probs_bytes / c / 1e9, "ratio_to_memcpy": t / c}
    print(f"{'bytes/message':>14} {'send+receive ms':>16} {'memcpy ms':>10} {'memcpy GB/s':>12} {'ratio':>6}")
    print(f"{num_bytes:>14,} {t * 1e3:>16.2f} {c * 1e3:>10.2f} {row['memcpy_gb_per_s']:>12.1f} {t / c:>6.2f}")
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), **row}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
