"""Shared zero-copy buffers: same-process and cross-process attach, cleanup, strict handles.

Run: .venv/bin/python -m pytest -q tests/test_buffers.py
"""

import os
import subprocess
import sys
import time

import msgpack
import pytest
import torch

from minedraft.workers.buffers import SharedBuffers, draft_buffer_specs, unlink_by_handle

HAS_DEV_SHM = os.path.isdir("/dev/shm")

# The child attaches from a msgpack handle (hex on argv), applies +1 in place, reports its
# resource-tracker pid (if it started one) and exits without unlinking.
CHILD = r"""
import sys, msgpack, torch
from multiprocessing import resource_tracker
from minedraft.workers.buffers import SharedBuffers
buffers = SharedBuffers.attach(msgpack.unpackb(bytes.fromhex(sys.argv[1]), raw=False))
checksum = sum(float(t.double().sum()) for t in buffers.tensors.values())
for tensor in buffers.tensors.values():
    tensor += 1
buffers.sync()
buffers.close()
print(checksum, resource_tracker._resource_tracker._pid or 0)
"""


def run_child(handle: dict) -> tuple[float, int]:
    packed = msgpack.packb(handle, use_bin_type=True).hex()
    child = subprocess.run([sys.executable, "-c", CHILD, packed], capture_output=True, text=True, timeout=120)
    assert child.returncode == 0, child.stderr
    assert "leaked" not in child.stderr, child.stderr
    checksum, tracker_pid = child.stdout.split()
    return float(checksum), int(tracker_pid)


def wait_gone(pid: int, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while pid and time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.05)


@pytest.fixture
def buffers():
    made = SharedBuffers.create(draft_buffer_specs(max_batch=3, max_draft=4, vocab_size=5))
    yield made
    made.close()
    made.unlink()


def test_import_without_cuda():
    subprocess.run([sys.executable, "-c", "import minedraft.workers.buffers"], check=True, timeout=120)


def test_layout_zeroed_and_aligned(buffers):
    tokens, probs = buffers.tensors["draft_tokens"], buffers.tensors["draft_probs"]
    assert tokens.shape == (3, 4) and tokens.dtype == torch.int64
    assert probs.shape == (3, 4, 5) and probs.dtype == torch.float32
    assert not tokens.any() and not probs.any()
    assert all(t.data_ptr() % 64 == 0 for t in buffers.tensors.values())


def test_same_process_attach_shares_memory(buffers):
    view = SharedBuffers.attach(buffers.handle())
    buffers.tensors["draft_probs"][1, 2] = torch.arange(5.0)
    assert torch.equal(view.tensors["draft_probs"][1, 2], torch.arange(5.0))
    view.tensors["draft_tokens"].fill_(7)
    assert int(buffers.tensors["draft_tokens"].sum()) == 7 * 12
    view.close()
    view.close()  # idempotent


def test_subprocess_attach_sees_and_writes_in_place(buffers):
    buffers.tensors["draft_tokens"].copy_(torch.arange(12).view(3, 4))
    checksum, tracker_pid = run_child(buffers.handle())
    assert checksum == sum(range(12))
    assert torch.equal(buffers.tensors["draft_tokens"], torch.arange(12).view(3, 4) + 1)
    assert bool((buffers.tensors["draft_probs"] == 1).all())
    wait_gone(tracker_pid)  # the child's tracker cleans up after the child exits
    if HAS_DEV_SHM:
        assert os.path.exists(f"/dev/shm/{buffers.names[0]}")
    SharedBuffers.attach(buffers.handle()).close()  # still attachable


@pytest.mark.skipif(not HAS_DEV_SHM, reason="needs /dev/shm (Linux)")
def test_unlink_removes_segment_and_permissions(buffers):
    path = f"/dev/shm/{buffers.names[0]}"
    assert os.stat(path).st_mode & 0o777 == 0o600
    buffers.unlink()
    assert not os.path.exists(path)
    buffers.unlink()  # idempotent
    assert buffers.tensors["draft_tokens"].sum() == 0  # views stay valid until close


def test_names_unpredictable():
    specs = {"x": ((4,), torch.uint8)}
    first, second = SharedBuffers.create(specs), SharedBuffers.create(specs)
    try:
        assert first.names != second.names
        assert all(name.startswith("minedraft-") and len(name) == len("minedraft-") + 24
                   for name in first.names + second.names)
    finally:
        for made in (first, second):
            made.close()
            made.unlink()


def test_handle_msgpack_round_trip(buffers):
    handle = msgpack.unpackb(msgpack.packb(buffers.handle(), use_bin_type=True), raw=False)
    assert handle == buffers.handle()
    view = SharedBuffers.attach(handle)
    buffers.tensors["draft_tokens"][0, 0] = 42
    assert int(view.tensors["draft_tokens"][0, 0]) == 42
    view.close()


def test_all_dtypes_and_empty_tensor():
    specs = {name: ((3, 2), dtype) for name, dtype in [
        ("a", torch.float32), ("b", torch.bfloat16), ("c", torch.float16),
        ("d", torch.int64), ("e", torch.int32), ("f", torch.uint8)]}
    specs["empty"] = ((0, 5), torch.float32)
    made = SharedBuffers.create(specs)
    view = SharedBuffers.attach(made.handle())
    for name, tensor in made.tensors.items():
        tensor.fill_(3)
        assert view.tensors[name].dtype == tensor.dtype and bool((view.tensors[name] == 3).all())
    del tensor
    view.close()
    made.close()
    made.unlink()


def test_unlink_by_handle_and_close_with_live_view():
    made = SharedBuffers.create({"x": ((16,), torch.float32)})
    escaped = made.tensors["x"]
    with pytest.warns(ResourceWarning):
        made.close()  # a view is still alive: mapping kept, no crash
    escaped += 1  # still valid memory
    unlink_by_handle(made.handle())
    unlink_by_handle(made.handle())  # already gone: no-op
    unlink_by_handle({"kind": "cuda_ipc"})  # no-op for CUDA
    if HAS_DEV_SHM:
        assert not os.path.exists(f"/dev/shm/{made.names[0]}")
    made.unlink()  # already removed by someone else: ignored
    del escaped
    if os.path.exists("/proc/self/maps"):  # the last view gone takes the mapping with it
        with open("/proc/self/maps") as maps:
            assert made.names[0] not in maps.read()


def mutate(handle: dict, path: list, value) -> dict:
    node = handle
    for key in path[:-1]:
        node = node[key]
    if value is KeyError:
        del node[path[-1]]
    else:
        node[path[-1]] = value
    return handle


@pytest.mark.parametrize("path, value", [
    (["kind"], "pickle"),
    (["tensors", "draft_probs", "dtype"], "float64"),
    (["tensors", "draft_probs", "dtype"], 5),
    (["tensors", "draft_probs", "offset"], 1 << 40),
    (["tensors", "draft_probs", "offset"], "64"),
    (["tensors", "draft_probs", "offset"], 65),
    (["tensors", "draft_probs", "offset"], 0),  # overlaps draft_tokens
    (["tensors", "draft_probs", "shape"], "3,4,5"),
    (["tensors", "draft_probs", "shape"], [3, 4, 5000]),
    (["tensors", "draft_probs", "shape"], [3, -4, 5]),
    (["tensors", "draft_probs", "shape"], [3, True, 5]),
    (["tensors", "draft_probs", "extra"], 1),
    (["tensors"], {}),
    (["tensors"], [1, 2]),
    (["size_bytes"], "big"),
    (["size_bytes"], 1 << 40),
    (["name"], "../../etc/passwd"),
    (["name"], 7),
    (["name"], KeyError),
    (["extra"], 1),
])
def test_malformed_handles_rejected(buffers, path, value):
    handle = mutate(buffers.handle(), path, value)
    with pytest.raises(ValueError):
        SharedBuffers.attach(handle)


def test_non_map_handle_rejected():
    for handle in (None, [], b"shm", "shm"):
        with pytest.raises(ValueError):
            SharedBuffers.attach(handle)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA is not available: CUDA IPC needs a GPU")
def test_cuda_ipc_two_process_round_trip():
    made = SharedBuffers.create(draft_buffer_specs(max_batch=4, max_draft=3, vocab_size=7), device="cuda")
    try:
        made.tensors["draft_tokens"].copy_(torch.arange(12, device="cuda").view(4, 3))
        made.tensors["draft_probs"].fill_(0.5)
        made.sync()  # producer: data complete before it is announced
        checksum, _ = run_child(made.handle())
        made.sync()
        assert checksum == sum(range(12)) + 0.5 * 4 * 3 * 7
        assert torch.equal(made.tensors["draft_tokens"].cpu(), torch.arange(12).view(4, 3) + 1)
        assert bool((made.tensors["draft_probs"] == 1.5).all())
        assert made.names == []
    finally:
        made.close()
        made.unlink()
