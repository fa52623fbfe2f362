"""What a daemon's workers hold in memory against what they need: for a config, start a daemon,
and print per worker its resident memory (anonymous, file mappings, shared memory; read from
/proc for the local workers after start, and as each worker reported it when ready) against its
weights, KV cache and draft buffers. A worker whose resident memory exceeds those by more than
--max-ratio (default 1.15) makes the exit status 1. Table on stdout, JSON to --out.

    python tools/memory.py --config default
    python tools/memory.py --config tiny --set scheduler.mode=psd
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench import running_daemon  # noqa: E402

from minedraft.runtime.client import Client  # noqa: E402
from minedraft.workers.memory import resident_bytes  # noqa: E402

def measure(status: dict) -> list[dict]:
    rows = []
    for role, memory in sorted((status.get("memory") or {}).items()):
        pid = status["worker_pids"].get(role)
        now = resident_bytes(pid) if pid else {}
        now = now if any(now.values()) else None  # not local, or gone: what it reported when ready
        resident = now or memory
        needed = memory["weights_packed"] + memory["weights_plain"] + memory["kv_cache"] + memory["draft_buffers"]
        total = resident["rss_anon"] + resident["rss_file"] + resident["rss_shmem"]
        rows.append({"role": role, "pid": pid, "at_ready": memory, "now": now, "resident": total, "needed": needed,
                     "ratio": total / needed})
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="default")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    parser.add_argument("--max-ratio", type=float, default=1.15)
    parser.add_argument("--out", default="")
    args = parser.parse_args(argv)
    with running_daemon(args.config, args.set) as endpoint:
        with Client(endpoint, timeout_s=30) as client:
            rows = measure(client.status())
    gb = lambda n: f"{n / 1e9:.2f}"  # noqa: E731
    print(f"{'worker':<9} {'anon':>6} {'file':>6} {'shmem':>6} {'resident':>8} | {'packed':>6} {'plain':>6} "
          f"{'2nd copy':>8} {'KV':>6} {'buffers':>7} {'needed':>6} | {'ratio':>5}   (GB)")
    for r in rows:
        res, m = r["now"] or r["at_ready"], r["at_ready"]
        print(f"{r['role']:<9} {gb(res['rss_anon']):>6} {gb(res['rss_file']):>6} {gb(res['rss_shmem']):>6} "
              f"{gb(r['resident']):>8} | {gb(m['weights_packed']):>6} {gb(m['weights_plain']):>6} "
              f"{gb(m['second_copies']):>8} {gb(m['kv_cache']):>6} {gb(m['draft_buffers']):>7} {gb(r['needed']):>6} | "
              f"{r['ratio']:5.2f}")
    print("needed = weights (packed + plain) + KV cache + draft buffers; resident read from /proc after start")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=1)
    return 0 if all(r["ratio"] <= args.max_ratio for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
