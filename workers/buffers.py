"""Zero-copy tensor buffers shared between two worker processes: one block per set, made once.

Owns allocation, the msgpack-safe handle (no pickle), attaching in place, and cleanup. It does
not decide who owns a buffer when: the protocol does (a batch's draft buffer belongs to the
verifier from the verify job until its result).

CPU: one POSIX shared-memory block ("minedraft-" + 24 random hex digits, mode 0600), tensors are
views at 64-byte-aligned offsets. The producer creates and unlinks it; the consumer only maps it
(and is kept off multiprocessing's resource tracker, so its exit never unlinks the block).
close() with a view still alive elsewhere is safe: that view keeps the mapping until it dies.

CUDA: one device allocation exported once through torch's CUDA IPC storage sharing. A handle
serves one consumer (torch's IPC ref counter is taken once per export). Synchronization contract:
the producer calls `sync()` (or records an event) after its kernels write and before it announces
the data; the consumer calls `sync()` after its reads and before it hands the buffer back.
"""

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


def _bad(message: str) -> ValueError:
    return ValueError(f"bad shared-buffer handle: {message}")


def _is_int(value, minimum: int = 0) -> bool:
    return type(value) is int and value >= minimum


def _layout(specs: dict[str, TensorSpec]) -> tuple[dict[str, dict], int]:
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


def _check_tensors(tensors, size_bytes: int) -> None:
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


def _views(base: torch.Tensor, fields: dict[str, dict]) -> dict[str, torch.Tensor]:
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
        self.tensors: dict[str, torch.Tensor] = _views(base, fields)
        self.device = base.device
        self._handle = handle
        self._base = base
        self._shm = shm
        self._is_owner = is_owner
        self._is_closed = False

    @classmethod
    def create(cls, specs: dict[str, TensorSpec], device: str | torch.device = "cpu") -> "SharedBuffers":
        fields, size_bytes = _layout(specs)
        device = torch.device(device)
        if device.type == "cuda":
            index = device.index if device.index is not None else torch.cuda.current_device()
            base = torch.zeros(size_bytes, dtype=torch.uint8, device=f"cuda:{index}")  # [size_bytes] uint8
            dev, ipc, storage_bytes, offset_bytes, rc_handle, rc_offset, event, event_sync = (
                base.untyped_storage()._share_cuda_())
            _local_cuda[(ipc, offset_bytes)] = base.untyped_storage()
            handle = {"kind": "cuda_ipc", "device": dev, "size_bytes": storage_bytes, "tensors": fields,
                      "ipc": {"handle": ipc, "offset_bytes": offset_bytes, "ref_counter_handle": rc_handle,
                              "ref_counter_offset": rc_offset, "event_handle": event,
                              "event_sync_required": int(event_sync)}}
            return cls(fields, handle, base, None, is_owner=True)
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
        _check_tensors(handle.get("tensors"), size_bytes)
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
        ipc, device = handle.get("ipc"), handle.get("device")
        types = {"handle": bytes, "offset_bytes": int, "ref_counter_handle": bytes,
                 "ref_counter_offset": int, "event_handle": bytes, "event_sync_required": int}
        if set(handle) != {"kind", "device", "size_bytes", "tensors", "ipc"}:
            raise _bad(f"cuda_ipc handle keys {sorted(handle)} != kind, device, size_bytes, tensors, ipc")
        if not _is_int(device):
            raise _bad(f"device {device!r} must be a non-negative int")
        if not isinstance(ipc, dict) or set(ipc) != set(types) or not all(
                type(ipc[key]) is kind for key, kind in types.items()):
            raise _bad(f"'ipc' must be a map of {types}")
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
    def names(self) -> list[str]:
        """Shared-memory segment names (empty for CUDA)."""
        return [self._handle["name"]] if self._handle["kind"] == "shm" else []


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
