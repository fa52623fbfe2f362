"""Shared zero-copy buffers: same-process and cross-process attach, cleanup, strict handles, and
the CUDA IPC preconditions checked on the CPU (allocator backend, expandable segments, the device
found by UUID, the verifier's ConnectResult).

Run: .venv/bin/python -m pytest -q tests/test_buffers.py
"""

import os
import subprocess
import sys
import time

import types

import msgpack
import pytest
import torch

from minedraft.common import protocol as p
from minedraft.common.config import load_config
from minedraft.workers import buffers as shared
from minedraft.workers.buffers import (
    SharedBuffers, check_ipc_allocator, device_index_for_uuid, draft_buffer_specs, ipc_allocation_settings,
    is_expandable_ipc_handle, unlink_by_handle,
)
from minedraft.workers.process import check_buffer_allocator, connect_result

HAS_DEV_SHM = os.path.isdir("/dev/shm")
UUID_A = "0a1b2c3d-0000-1111-2222-333344445555"
UUID_B = "9f8e7d6c-0000-1111-2222-333344445555"

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


# ---------------------------------------------------------------- CUDA IPC preconditions, on the CPU


def fake_allocator(monkeypatch, backend: str, alloc_conf: str) -> list[str]:
    """Stand-ins for torch's allocator queries; returns the settings applied, in order."""
    applied: list[str] = []
    monkeypatch.setattr(torch.cuda, "get_allocator_backend", lambda: backend)
    monkeypatch.setattr(torch._C, "_accelerator_getAllocatorSettings", lambda: alloc_conf)
    monkeypatch.setattr(torch._C, "_accelerator_setAllocatorSettings", applied.append)
    return applied


def test_ipc_allocator_check_refuses_a_backend_that_cannot_share():
    check_ipc_allocator("native", "")
    check_ipc_allocator("native", "expandable_segments:True")  # turned off around the buffers instead
    with pytest.raises(RuntimeError) as refused:
        check_ipc_allocator("cudaMallocAsync", "backend:cudaMallocAsync")
    message = str(refused.value)
    assert "'cudaMallocAsync' allocator backend" in message
    assert "Remove 'backend:cudaMallocAsync' from PYTORCH_ALLOC_CONF / PYTORCH_CUDA_ALLOC_CONF" in message


def test_cuda_buffers_refuse_a_cuda_malloc_async_allocator_before_allocating(monkeypatch):
    applied = fake_allocator(monkeypatch, "cudaMallocAsync", "backend:cudaMallocAsync")
    with pytest.raises(RuntimeError, match="PYTORCH_CUDA_ALLOC_CONF"):
        SharedBuffers.create({"x": ((4,), torch.float32)}, "cuda:0")
    assert applied == []


def test_workers_check_the_allocator_only_when_the_drafter_is_on_cuda(monkeypatch):
    fake_allocator(monkeypatch, "cudaMallocAsync", "backend:cudaMallocAsync")
    check_buffer_allocator(load_config("configs/tiny.toml"))  # CPU buffers: any allocator
    check_buffer_allocator(load_config("configs/tiny.toml", ["drafter.device=cuda:0", "scheduler.mode=ar"]))
    with pytest.raises(RuntimeError, match="PYTORCH_ALLOC_CONF"):  # both workers: each opens its end with it
        check_buffer_allocator(load_config("configs/tiny.toml", ["drafter.device=cuda:0"]))


def test_buffers_allocate_with_expandable_segments_off_then_restore_the_settings(monkeypatch):
    conf = "max_split_size_mb:64,expandable_segments:True"
    applied = fake_allocator(monkeypatch, "native", conf)
    with shared._ipc_allocation():
        assert applied == [conf + ",expandable_segments:False"]  # the user's settings, the later key wins
    assert applied == [conf + ",expandable_segments:False", conf]
    with pytest.raises(KeyError), shared._ipc_allocation():
        raise KeyError("restored on errors too")
    assert applied[-1] == conf and len(applied) == 4
    applied = fake_allocator(monkeypatch, "native", "")
    with shared._ipc_allocation():
        pass
    assert applied == ["expandable_segments:False"]  # nothing to restore: the defaults are in force


def test_torch_parses_the_ipc_allocation_settings():
    before = torch._C._accelerator_getAllocatorSettings()
    settings = ipc_allocation_settings("max_split_size_mb:64,expandable_segments:True")
    assert settings == "max_split_size_mb:64,expandable_segments:True,expandable_segments:False"
    assert ipc_allocation_settings("") == "expandable_segments:False"
    try:
        torch._C._accelerator_setAllocatorSettings(settings)
        assert torch._C._accelerator_getAllocatorSettings() == settings
    finally:
        torch._C._accelerator_setAllocatorSettings(before)


def test_expandable_segment_handles_are_recognized():
    assert is_expandable_ipc_handle(b"\x02e" + bytes(24))  # version 2, expandable segment
    assert not is_expandable_ipc_handle(b"\x02c" + bytes(64))  # version 2, cudaMalloc block
    assert not is_expandable_ipc_handle(b"")


def test_device_found_by_uuid_whatever_its_local_index():
    assert device_index_for_uuid(UUID_A, [UUID_A, UUID_B]) == 0
    assert device_index_for_uuid(UUID_A, [UUID_B, UUID_A]) == 1  # CUDA_VISIBLE_DEVICES=1,0 in the consumer
    with pytest.raises(RuntimeError) as missing:
        device_index_for_uuid(UUID_A, [UUID_B])
    assert f"no visible CUDA device has UUID {UUID_A}" in str(missing.value)
    assert UUID_B in str(missing.value) and "CUDA_VISIBLE_DEVICES" in str(missing.value)
    with pytest.raises(RuntimeError, match="0 device"):
        device_index_for_uuid(UUID_A, [])


def cuda_handle() -> dict:
    """A well-formed cuda_ipc handle (the shape SharedBuffers.create makes; never opened here)."""
    return {"kind": "cuda_ipc", "device_uuid": UUID_A, "size_bytes": 4096,
            "tensors": {"draft_tokens": {"offset": 0, "shape": [2, 3], "dtype": "int64"}},
            "ipc": {"handle": b"\x02c" + bytes(64), "offset_bytes": 512, "ref_counter_handle": b"/torch_1_2",
                    "ref_counter_offset": 0, "event_handle": bytes(64), "event_sync_required": 1}}


def test_well_formed_cuda_handle_passes_validation():
    shared._check_cuda_handle(cuda_handle())


@pytest.mark.parametrize("path, value", [
    (["device_uuid"], "not a uuid: 0a1b2c3d-0000-1111-2222"),
    (["device_uuid"], "0" * 200),
    (["device_uuid"], 0),
    (["device_uuid"], KeyError),
    (["device"], 0),  # numbered devices are gone: the UUID names the device
    (["ipc"], KeyError),
    (["ipc"], [1, 2]),
    (["ipc", "handle"], "abc"),
    (["ipc", "handle"], b"\x02e" + bytes(40)),  # an expandable segment: pidfd_getfd
    (["ipc", "offset_bytes"], -64),
    (["ipc", "offset_bytes"], True),
    (["ipc", "ref_counter_offset"], -1),
    (["ipc", "event_sync_required"], 2),
    (["ipc", "extra"], 1),
    (["ipc", "event_handle"], KeyError),
])
def test_malformed_cuda_handles_rejected(path, value):
    with pytest.raises(ValueError, match="bad shared-buffer handle"):
        SharedBuffers.attach(mutate(cuda_handle(), path, value))


def test_verifier_answers_what_it_attached(buffers):
    views = [SharedBuffers.attach(buffers.handle()) for _ in range(2)]
    assert connect_result(views) == p.ConnectResult(2, "cpu", None)
    for view in views:
        view.close()
    mixed = [types.SimpleNamespace(device=torch.device("cuda:0"), device_uuid=UUID_A),
             types.SimpleNamespace(device=torch.device("cpu"), device_uuid=None)]
    with pytest.raises(RuntimeError, match="one device"):
        connect_result(mixed)


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
