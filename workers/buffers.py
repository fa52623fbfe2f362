"""Zero-copy tensor buffers shared between two worker processes: one block per set, made once.

Owns allocation, the msgpack-safe handle (no pickle), attaching in place, and cleanup. It does
not decide who owns a buffer when: the protocol does (a batch's draft buffer belongs to the
verifier from the verify job until its result).

CPU: one POSIX shared-memory block ("minedraft-" + 24 random hex digits, mode 0600), tensors are
views at 64-byte-aligned offsets. The producer creates and unlinks it; the consumer only maps it
(and is kept off multiprocessing's resource tracker, so its exit never unlinks the block).
close() with a view still alive elsewhere is safe: that view keeps the mapping until it dies.

CUDA: one device allocation exported once through torch's CUDA IPC storage sharing. A handle
serves one consumer (torch's IPC ref counter is taken once per export) and names its device by
UUID, so the consumer opens the same GPU whatever its own CUDA_VISIBLE_DEVICES numbering. Only
the native caching allocator shares, and only blocks outside expandable segments share through
cudaIpc (those inside need pidfd_getfd, which Yama ptrace_scope=1 refuses between sibling
processes): create() checks the backend and allocates with expandable segments off.
Synchronization contract: the producer calls `sync()` (or records an event) after its kernels
write and before it announces the data; the consumer calls `sync()` after its reads and before
it hands the buffer back.
"""

import contextlib
import copy
import math
import os
import re
import secrets
import sys
import warnings
from multiprocessing import resource_tracker, shared_memory

import torch

TensorSpec = tuple[tuple[int, ...], torch.dtype]

ALIGN_BYTES = 64  # every tensor starts on a 64-byte boundary (cache line / vector loads)
SHM_PREFIX = "minedraft-"
_SHM_NAME = re.compile(r"minedraft-[0-9a-f]{24}")
# str(props.uuid) is 8-4-4-4-12 hex; accept any short hex-and-dash form (a "GPU-" prefix, other
# case) rather than refuse a real device on a format detail: it is only compared for equality.
_UUID = re.compile(r"(GPU-)?[0-9A-Fa-f-]{16,48}")
ALLOC_CONF_ENVS = ("PYTORCH_ALLOC_CONF", "PYTORCH_CUDA_ALLOC_CONF")  # torch reads either (the second is the old name)
# torch's shareable handle (CUDACachingAllocator shareIpcHandle): a version byte (2), then 'c' for
# a cudaMalloc block (cudaIpcMemHandle follows) or 'e' for an expandable segment (pidfd_getfd).
_EXPANDABLE_IPC_PREFIX = b"\x02e"
_DTYPES = {
    "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
    "int64": torch.int64, "int32": torch.int32, "uint8": torch.uint8,
}
_DTYPE_NAMES = {dtype: name for name, dtype in _DTYPES.items()}
_TRACKS_ATTACH = sys.version_info < (3, 13)  # before 3.13 attaching registers with the tracker
# Producer blocks, for same-process attach, keyed like torch's own IPC cache: two small blocks can
# share one cudaMalloc segment, hence one IPC handle, at different offsets.
_local_cuda: dict[tuple[bytes, int], torch.UntypedStorage] = {}


def draft_buffer_specs(max_batch: int, max_draft: int, vocab_size: int) -> dict[str, TensorSpec]:
    """The drafter's per-batch output buffers, read in place by the verifier."""
    return {
        "draft_tokens": ((max_batch, max_draft), torch.int64),  # [B, k] int64
        "draft_probs": ((max_batch, max_draft, vocab_size), torch.float32),  # [B, k, V] float32
    }


def check_ipc_allocator(backend: str, alloc_conf: str | None) -> None:
    """Refuse an allocator whose memory CUDA IPC cannot share; pure (tests pass fake values).

    backend: torch.cuda.get_allocator_backend(); alloc_conf: the settings torch parsed from
    PYTORCH_ALLOC_CONF / PYTORCH_CUDA_ALLOC_CONF (torch._C._accelerator_getAllocatorSettings())."""
    if backend != "native":
        raise RuntimeError(
            f"CUDA draft buffers are shared through CUDA IPC, which only torch's native caching allocator "
            f"supports, but this process runs the {backend!r} allocator backend (allocator settings "
            f"{alloc_conf!r}). Remove 'backend:{backend}' from {' / '.join(ALLOC_CONF_ENVS)} (or set "
            f"backend:native) in the daemon's environment and start again.")


def ipc_allocation_settings(alloc_conf: str | None) -> str:
    """The allocator settings while shared buffers are allocated: the process's own with expandable
    segments off (the later key wins), so the blocks come from plain cudaMalloc segments."""
    return f"{alloc_conf},expandable_segments:False" if alloc_conf else "expandable_segments:False"


def is_expandable_ipc_handle(ipc_handle: bytes) -> bool:
    """Whether torch exported the block from an expandable segment (its consumer would need
    pidfd_getfd on the producer, refused between sibling processes under Yama ptrace_scope=1)."""
    return ipc_handle.startswith(_EXPANDABLE_IPC_PREFIX)


def device_index_for_uuid(uuid: str, visible_uuids: list[str]) -> int:
    """The local index of the CUDA device with this UUID among the visible ones; pure."""
    if uuid in visible_uuids:
        return visible_uuids.index(uuid)
    raise RuntimeError(
        f"no visible CUDA device has UUID {uuid}, the draft buffers' device (this process sees "
        f"{len(visible_uuids)} device(s): {', '.join(visible_uuids) or 'none'}); the drafter's GPU must be "
        f"visible to the verifier too: check each worker's CUDA_VISIBLE_DEVICES")


def device_uuid(index: int) -> str:
    return str(torch.cuda.get_device_properties(index).uuid)


def visible_device_uuids() -> list[str]:
    return [device_uuid(i) for i in range(torch.cuda.device_count())]


def check_cuda_ipc_allocator() -> None:
    """check_ipc_allocator on this process's allocator (a worker calls it before loading its model)."""
    check_ipc_allocator(torch.cuda.get_allocator_backend(), torch._C._accelerator_getAllocatorSettings())


@contextlib.contextmanager
def _ipc_allocation():
    """Allocations inside come from non-expandable segments (torch's allocator skips cached
    expandable blocks while the setting is off); the process's settings are restored after."""
    alloc_conf = torch._C._accelerator_getAllocatorSettings()
    check_ipc_allocator(torch.cuda.get_allocator_backend(), alloc_conf)
    torch._C._accelerator_setAllocatorSettings(ipc_allocation_settings(alloc_conf))
    try:
        yield
    finally:
        if alloc_conf:  # empty: the defaults, expandable segments off, are in force already
            torch._C._accelerator_setAllocatorSettings(alloc_conf)


def _bad(message: str) -> ValueError:
    return ValueError(f"bad shared-buffer handle: {message}")


def _is_int(value, minimum: int = 0) -> bool:
    return type(value) is int and value >= minimum


def layout_tensors(specs: dict[str, TensorSpec]) -> tuple[dict[str, dict], int]:
    """Place each tensor at the next aligned offset; returns (handle tensor fields, size_bytes)."""
    if not isinstance(specs, dict) or not specs:
        raise ValueError("specs must be a non-empty dict of name -> (shape, dtype)")
    fields, size_bytes = {}, 0
    for name, (shape, dtype) in specs.items():
        if dtype not in _DTYPE_NAMES:
            raise ValueError(f"tensor {name!r}: dtype {dtype} not in {sorted(_DTYPES)}")
        if not all(_is_int(dim) for dim in shape):
            raise ValueError(f"tensor {name!r}: shape {shape} must be non-negative ints")
        offset = -(-size_bytes // ALIGN_BYTES) * ALIGN_BYTES
        size_bytes = offset + _nbytes(list(shape), dtype)
        fields[name] = {"offset": offset, "shape": list(shape), "dtype": _DTYPE_NAMES[dtype]}
    return fields, max(-(-size_bytes // ALIGN_BYTES) * ALIGN_BYTES, ALIGN_BYTES)


def _nbytes(shape: list[int], dtype: torch.dtype) -> int:
    return math.prod(shape) * dtype.itemsize


def check_tensor_fields(tensors, size_bytes: int) -> None:
    """A handle's tensor fields against its block: known dtypes, shapes, aligned offsets, and
    no overlap or overrun of size_bytes."""
    if not isinstance(tensors, dict) or not tensors:
        raise _bad("'tensors' must be a non-empty map")
    spans = []
    for name, field in tensors.items():
        if not isinstance(name, str) or not name:
            raise _bad(f"tensor name {name!r} must be a non-empty string")
        if not isinstance(field, dict) or set(field) != {"offset", "shape", "dtype"}:
            raise _bad(f"tensor {name!r} must be a map with exactly offset, shape, dtype")
        offset, shape, dtype = field["offset"], field["shape"], field["dtype"]
        if dtype not in _DTYPES:
            raise _bad(f"tensor {name!r}: dtype {dtype!r} not in {sorted(_DTYPES)}")
        if not isinstance(shape, list) or not all(_is_int(dim) for dim in shape):
            raise _bad(f"tensor {name!r}: shape {shape!r} must be a list of non-negative ints")
        if not _is_int(offset) or offset % ALIGN_BYTES:
            raise _bad(f"tensor {name!r}: offset {offset!r} must be a {ALIGN_BYTES}-aligned int")
        end = offset + _nbytes(shape, _DTYPES[dtype])
        if end > size_bytes:
            raise _bad(f"tensor {name!r}: bytes [{offset}, {end}) exceed size_bytes {size_bytes}")
        spans.append((offset, end, name))
    spans.sort()
    for (_, end, name), (start, _, other) in zip(spans, spans[1:]):
        if start < end:
            raise _bad(f"tensors {name!r} and {other!r} overlap")


def tensor_views(base: torch.Tensor, fields: dict[str, dict]) -> dict[str, torch.Tensor]:
    """Typed views into one uint8 block (no copy)."""
    views = {}
    for name, field in fields.items():
        dtype = _DTYPES[field["dtype"]]
        start, end = field["offset"], field["offset"] + _nbytes(field["shape"], dtype)
        views[name] = base[start:end].view(dtype).view(field["shape"])
    return views


def _map(shm: shared_memory.SharedMemory) -> torch.Tensor:
    """View the whole block as uint8. torch.frombuffer keeps only a reference to the object it is
    given, not a buffer export, so hand it its own memoryview: that pins the mmap (mmap.close()
    raises BufferError) until the last tensor view is gone, instead of leaving views dangling."""
    return torch.frombuffer(memoryview(shm.buf), dtype=torch.uint8)


class SharedBuffers:
    """A set of named tensors in one shared allocation: created once by the producer, attached in place by the consumer."""

    def __init__(self, fields: dict, handle: dict, base: torch.Tensor,
                 shm: shared_memory.SharedMemory | None, is_owner: bool):
        self.tensors: dict[str, torch.Tensor] = tensor_views(base, fields)
        self.device = base.device
        self._handle = handle
        self._base = base
        self._shm = shm
        self._is_owner = is_owner
        self._is_closed = False

    @classmethod
    def create(cls, specs: dict[str, TensorSpec], device: str | torch.device = "cpu") -> "SharedBuffers":
        fields, size_bytes = layout_tensors(specs)
        device = torch.device(device)
        if device.type == "cuda":
            return cls._create_cuda(fields, size_bytes, device)
        if device.type != "cpu":
            raise ValueError(f"unsupported device {device}; use cpu or cuda")
        if os.path.isdir("/dev/shm") and (st := os.statvfs("/dev/shm")).f_bavail * st.f_frsize < size_bytes:
            raise MemoryError(f"/dev/shm has less than the {size_bytes} bytes these buffers need")
        shm = shared_memory.SharedMemory(SHM_PREFIX + secrets.token_hex(12), create=True, size=size_bytes)
        try:
            base = _map(shm)  # [size_bytes] uint8
            base.zero_()  # touch every page now, not mid-run
        except BaseException:
            shm.close()
            shm.unlink()
            raise
        handle = {"kind": "shm", "name": shm.name, "size_bytes": size_bytes, "tensors": fields}
        return cls(fields, handle, base, shm, is_owner=True)

    @classmethod
    def _create_cuda(cls, fields: dict, size_bytes: int, device: torch.device) -> "SharedBuffers":
        index = device.index if device.index is not None else torch.cuda.current_device()
        with _ipc_allocation():
            base = torch.zeros(size_bytes, dtype=torch.uint8, device=f"cuda:{index}")  # [size_bytes] uint8
        _, ipc, storage_bytes, offset_bytes, rc_handle, rc_offset, event, event_sync = (
            base.untyped_storage()._share_cuda_())
        if is_expandable_ipc_handle(ipc):
            raise RuntimeError(
                "CUDA draft buffers landed in an expandable segment although expandable_segments was off "
                "for their allocation; the verifier could not open them without pidfd_getfd. Remove "
                f"expandable_segments:True from {' / '.join(ALLOC_CONF_ENVS)} and start again.")
        _local_cuda[(ipc, offset_bytes)] = base.untyped_storage()
        handle = {"kind": "cuda_ipc", "device_uuid": device_uuid(index), "size_bytes": storage_bytes,
                  "tensors": fields,
                  "ipc": {"handle": ipc, "offset_bytes": offset_bytes, "ref_counter_handle": rc_handle,
                          "ref_counter_offset": rc_offset, "event_handle": event,
                          "event_sync_required": int(event_sync)}}
        return cls(fields, handle, base, None, is_owner=True)

    def handle(self) -> dict:
        """msgpack-safe description of the block (str/int/bytes/lists/maps)."""
        return copy.deepcopy(self._handle)

    @classmethod
    def attach(cls, handle: dict) -> "SharedBuffers":
        if not isinstance(handle, dict):
            raise _bad(f"expected a map, got {type(handle).__name__}")
        kind, size_bytes = handle.get("kind"), handle.get("size_bytes")
        if kind not in ("shm", "cuda_ipc"):
            raise _bad(f"unknown kind {kind!r} (expected 'shm' or 'cuda_ipc')")
        if not _is_int(size_bytes, 1):
            raise _bad(f"size_bytes {size_bytes!r} must be a positive int")
        check_tensor_fields(handle.get("tensors"), size_bytes)
        if kind == "cuda_ipc":
            return cls._attach_cuda(handle)
        name = handle.get("name")
        if set(handle) != {"kind", "name", "size_bytes", "tensors"}:
            raise _bad(f"shm handle keys {sorted(handle)} != kind, name, size_bytes, tensors")
        if not isinstance(name, str) or not _SHM_NAME.fullmatch(name):
            raise _bad(f"segment name {name!r} is not a minedraft segment name")
        if _TRACKS_ATTACH:
            shm = shared_memory.SharedMemory(name)
            # CPython registered the block with this process's tracker, which would unlink it at exit.
            resource_tracker.unregister(shm._name, "shared_memory")
        else:
            shm = shared_memory.SharedMemory(name, track=False)
        if shm.size < size_bytes:
            shm.close()
            raise _bad(f"segment {name} holds {shm.size} bytes, handle says {size_bytes}")
        base = _map(shm)[:size_bytes]  # [size_bytes] uint8
        return cls(handle["tensors"], handle, base, shm, is_owner=False)

    @classmethod
    def _attach_cuda(cls, handle: dict) -> "SharedBuffers":
        ipc, uuid = handle.get("ipc"), handle.get("device_uuid")
        _check_cuda_handle(handle)
        check_cuda_ipc_allocator()
        device = device_index_for_uuid(uuid, visible_device_uuids())
        storage = _local_cuda.get((ipc["handle"], ipc["offset_bytes"]))
        if storage is not None:  # same process: CUDA cannot open its own IPC handle
            torch.UntypedStorage._release_ipc_counter(
                ipc["ref_counter_handle"], ipc["ref_counter_offset"], device=device)
        else:
            torch.cuda._lazy_init()
            storage = torch.UntypedStorage._new_shared_cuda(
                device, ipc["handle"], handle["size_bytes"], ipc["offset_bytes"],
                ipc["ref_counter_handle"], ipc["ref_counter_offset"],
                ipc["event_handle"], bool(ipc["event_sync_required"]))
        base = torch.empty(0, dtype=torch.uint8, device=f"cuda:{device}").set_(storage)
        return cls(handle["tensors"], handle, base, None, is_owner=False)

    def sync(self) -> None:
        """Wait for all queued device work (CUDA); no-op on CPU."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def close(self) -> None:
        """Drop the views and this process's mapping; idempotent."""
        if self._is_closed:
            return
        self._is_closed = True
        self.tensors = {}
        self._base = None
        if self.device.type == "cuda" and self._is_owner:
            _local_cuda.pop((self._handle["ipc"]["handle"], self._handle["ipc"]["offset_bytes"]), None)
        if self._shm is None:
            return
        try:
            self._shm.close()
        except BufferError:  # a view escaped: it keeps the mmap alive; munmap when the last one dies
            self._shm._mmap = None  # hand the mapping over to the views, so close() only shuts the fd
            self._shm.close()
            warnings.warn(f"SharedBuffers {self._shm.name}: closed with views still alive; the "
                          "mapping stays until they are gone", ResourceWarning, stacklevel=2)

    def unlink(self) -> None:
        """Producer only: remove the segment (live views stay valid); idempotent."""
        if not self._is_owner or self._shm is None:
            return
        self._is_owner = False
        try:
            self._shm.unlink()  # also unregisters from the resource tracker
        except FileNotFoundError:  # removed by someone else: still drop our tracker registration
            resource_tracker.unregister(self._shm._name, "shared_memory")

    @property
    def device_uuid(self) -> str | None:
        """The UUID of the buffers' GPU (None on the CPU)."""
        return self._handle.get("device_uuid")

    @property
    def names(self) -> list[str]:
        """Shared-memory segment names (empty for CUDA)."""
        return [self._handle["name"]] if self._handle["kind"] == "shm" else []


def _check_cuda_handle(handle: dict) -> None:
    """Every field of a cuda_ipc handle (the common ones are checked by attach)."""
    ipc, uuid = handle.get("ipc"), handle.get("device_uuid")
    types = {"handle": bytes, "offset_bytes": int, "ref_counter_handle": bytes,
             "ref_counter_offset": int, "event_handle": bytes, "event_sync_required": int}
    if set(handle) != {"kind", "device_uuid", "size_bytes", "tensors", "ipc"}:
        raise _bad(f"cuda_ipc handle keys {sorted(handle)} != device_uuid, ipc, kind, size_bytes, tensors")
    if not isinstance(uuid, str) or not _UUID.fullmatch(uuid):
        raise _bad(f"device_uuid {uuid!r} is not a CUDA device UUID (hex digits and dashes)")
    if not isinstance(ipc, dict) or set(ipc) != set(types) or not all(
            type(ipc[key]) is kind for key, kind in types.items()):
        raise _bad(f"'ipc' must be a map of {types}")
    if not _is_int(ipc["offset_bytes"]) or not _is_int(ipc["ref_counter_offset"]):
        raise _bad("'ipc' offsets must be non-negative")
    if ipc["event_sync_required"] not in (0, 1):
        raise _bad(f"event_sync_required {ipc['event_sync_required']!r} must be 0 or 1")
    if is_expandable_ipc_handle(ipc["handle"]):
        raise _bad("the block lies in an expandable segment (opening it needs pidfd_getfd, refused "
                   "between sibling processes under Yama ptrace_scope=1)")


def unlink_by_handle(handle: dict) -> None:
    """Remove the CPU segment a handle names if it still exists (its producer died); no-op for CUDA."""
    if not isinstance(handle, dict) or handle.get("kind") != "shm":
        return
    name = handle.get("name")
    if not isinstance(name, str) or not _SHM_NAME.fullmatch(name):
        raise _bad(f"segment name {name!r} is not a minedraft segment name")
    try:
        shm = shared_memory.SharedMemory(name)  # registers with our tracker; unlink() unregisters
    except FileNotFoundError:
        return
    shm.unlink()
    shm.close()
