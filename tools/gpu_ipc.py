"""Section b of tools/gpu_check.py: shared buffer sets read and written in place by another process.

Made here on cuda:0: the draft buffers and small sets until two share one cudaMalloc segment (one
IPC handle at different offsets). The consumer, whose CUDA_VISIBLE_DEVICES lists the GPUs in reverse
when there are two or more (so it numbers them differently and its current device is another GPU),
attaches every set from its msgpack handle, reports each checksum and the device UUID it opened, and
writes 2x + 1 in place; this process checks the writes. --device cpu: the same over shared memory.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

# Attaches every handle (msgpack on stdin), reports each set's checksum and device, then writes
# x -> 2x + 1 in place and syncs before it answers.
CONSUMER = r"""
import json, sys, time, msgpack, torch
from minedraft.workers.buffers import SharedBuffers
handles = msgpack.unpackb(sys.stdin.buffer.read(), raw=False)
start_s = time.perf_counter()
views = [SharedBuffers.attach(h) for h in handles]
attach_s = time.perf_counter() - start_s
sets = []
for view in views:
    is_cuda = view.device.type == "cuda"
    sets.append({"checksum": sum(float(t.double().sum()) for t in view.tensors.values()), "device": str(view.device),
                 "device_uuid": str(torch.cuda.get_device_properties(view.device).uuid) if is_cuda else None})
    for tensor in view.tensors.values():
        tensor.mul_(2).add_(1)
    view.sync()
print(json.dumps({"attach_s": attach_s, "sets": sets,
                  "current_device": f"cuda:{torch.cuda.current_device()}" if torch.cuda.is_initialized() else "cpu"}))
for view in views:
    view.close()
"""
MAX_SMALL_SETS = 16  # 64-byte sets until two share a segment (the allocator's small pool: 2 MiB segments)


def section_b(device: str, num_gpus: int) -> dict:
    import torch

    from minedraft.workers.buffers import SharedBuffers, draft_buffer_specs

    sizes = (32, 4, 151936) if device == "cuda" else (8, 4, 512)
    producer = "cuda:0" if device == "cuda" else "cpu"
    made = [SharedBuffers.create(draft_buffer_specs(*sizes), producer)]
    try:
        for _ in range(MAX_SMALL_SETS):
            made.append(SharedBuffers.create({"x": ((16,), torch.float32)}, producer))
            if len(made) >= 3 and (device != "cuda" or len(shared_segment_offsets(made)) >= 2):
                break
        return round_trip(made, device, num_gpus, producer)
    finally:
        for buffers in made:
            buffers.close()
            buffers.unlink()


def round_trip(made: list, device: str, num_gpus: int, producer: str) -> dict:
    import msgpack
    import torch

    for i, buffers in enumerate(made):  # distinct contents per set, so a set read from another's bytes shows
        for tensor in buffers.tensors.values():
            values = (torch.arange(tensor.numel(), device=producer) % 97 + 1000 * i).view(tensor.shape)
            tensor.copy_(values.float().div(97) if tensor.is_floating_point() else values)
    expected = [{name: t.clone().mul_(2).add_(1) for name, t in b.tensors.items()} for b in made]  # same ops, device
    checksums = [sum(float(t.double().sum()) for t in b.tensors.values()) for b in made]
    made[0].sync()  # data complete before it is announced
    env, consumer = consumer_env(device, num_gpus)
    child = subprocess.run([sys.executable, "-c", CONSUMER], env=env, capture_output=True, timeout=300,
                           input=msgpack.packb([b.handle() for b in made], use_bin_type=True))
    if child.returncode != 0:
        raise RuntimeError(f"consumer exited {child.returncode}: {child.stderr.decode()[-3000:]}")
    report = json.loads(child.stdout.decode().strip().splitlines()[-1])
    made[0].sync()
    seen = report["sets"]
    is_written = all(torch.equal(b.tensors[k], expected[i][k]) for i, b in enumerate(made) for k in expected[i])
    is_checksum_ok = all(math.isclose(s["checksum"], c, rel_tol=1e-12) for s, c in zip(seen, checksums))
    uuid = str(torch.cuda.get_device_properties(producer).uuid) if device == "cuda" else None
    is_uuid_ok = all(s["device_uuid"] == uuid for s in seen)
    result = {"kind": made[0].handle()["kind"], "producer": producer, "consumer": consumer,
              "consumer_current_device": report["current_device"], "buffers_device_in_consumer": seen[0]["device"],
              "num_sets": len(made), "size_bytes": made[0].handle()["size_bytes"], "checksums": checksums,
              "consumer_checksum_ok": is_checksum_ok, "write_back_ok": is_written, "device_uuid_ok": is_uuid_ok,
              "attach_s": report["attach_s"]}
    is_ok = is_checksum_ok and is_written and is_uuid_ok
    if device == "cuda":
        result["shared_segment_offsets"] = shared_segment_offsets(made)
        is_ok = is_ok and len(result["shared_segment_offsets"]) >= 2
    else:
        result["cuda_ipc"] = "skipped: --device cpu (ran the same round trip over shared memory)"
    result["status"] = "ok" if is_ok else "failed"
    return result


def consumer_env(device: str, num_gpus: int) -> tuple[dict, str]:
    """The consumer's environment: with two GPUs or more its CUDA_VISIBLE_DEVICES lists them in
    reverse, so the producer's cuda:0 is its last device and its current device another GPU."""
    if device != "cuda" or num_gpus < 2:
        return dict(os.environ), "cuda:0" if device == "cuda" else "cpu"
    visible = os.environ.get("CUDA_VISIBLE_DEVICES") or ",".join(map(str, range(num_gpus)))
    reverse = ",".join(reversed(visible.split(",")))
    return {**os.environ, "CUDA_VISIBLE_DEVICES": reverse}, f"CUDA_VISIBLE_DEVICES={reverse}"


def shared_segment_offsets(made: list) -> list[int]:
    """Offsets of the sets that share the most common IPC handle (one cudaMalloc segment)."""
    by_handle: dict[bytes, list[int]] = {}
    for buffers in made:
        ipc = buffers.handle()["ipc"]
        by_handle.setdefault(ipc["handle"], []).append(ipc["offset_bytes"])
    return sorted(max(by_handle.values(), key=len))


def summary_line(b: dict) -> str:
    if "kind" not in b:
        return f"b  {b['status']}"
    segment = f", one segment at offsets {b['shared_segment_offsets']}" if "shared_segment_offsets" in b else ""
    return (f"b  {b['status']:<8} {b['num_sets']} {b['kind']} sets {b['producer']} -> {b['consumer']} "
            f"(there {b['buffers_device_in_consumer']}){segment}, {b['size_bytes'] / 1e6:.1f} MB, "
            f"checksums {b['consumer_checksum_ok']}, uuid {b['device_uuid_ok']}, "
            f"write-back {b['write_back_ok']}, attach {b['attach_s']:.2f} s")
