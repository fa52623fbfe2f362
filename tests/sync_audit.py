"""A test hook that counts the host-device synchronizations a worker job would make on a GPU,
observed on the CPU, where nothing stalls.

On the CPU every tensor is a host tensor, so the audit tracks which tensors *would* live on the
worker's device: the model's parameters, the KV cache, the draft buffers (marked with
`mark_device`), tensors made with an explicit `device=` (a torch.device, or any string but
"cpu"), `.to(<torch.device>)` copies, and every result of an op with a device input. The string
"cpu" (`.cpu()`, `.to("cpu")`, `device="cpu"`) names the host. It then counts what blocks the
host on a GPU:

- a device-to-host read: `.tolist()`, `.item()`, `bool()`, `int()`, `float()`, `.numpy()`,
  `.cpu()` or a host-bound `.to()` / `copy_` of a device tensor;
- a blocking host-to-device copy: `.to(device)` or `copy_` but the non-blocking copy from pinned
  memory that `workers/transfer.to_device` makes,
  `torch.tensor(data, device=...)`, and a host tensor (not a 0-dim scalar) used as an operand or
  index of an op on device tensors (the implicit copy is a blocking one);
- ops whose output size depends on device data: nonzero, boolean-mask indexing, masked_select,
  unique, repeat_interleave;
- explicit synchronizations, counted by the caller through `count("synchronize")`.

It is a model of CUDA's behaviour, checked on the CPU; on a GPU `torch.cuda.set_sync_debug_mode`
is the ground truth for the device-to-host half.
"""

from __future__ import annotations

import sys
from collections import Counter

import torch
from torch.overrides import TorchFunctionMode

from minedraft.workers.model.transfer import to_device

_MARK = "_sync_audit_on_device"
_READS = {"tolist", "item", "__bool__", "__int__", "__float__", "__index__", "numpy", "cpu"}
_DATA_DEPENDENT = {"nonzero", "masked_select", "unique", "repeat_interleave", "argwhere"}
_FACTORIES_FROM_DATA = {"tensor", "as_tensor"}
_IGNORED = {"__get__", "__set__", "dim", "size", "__len__", "numel", "is_floating_point", "data_ptr",
            "element_size", "stride", "storage_offset", "is_contiguous", "__repr__", "__format__"}


def tensors_in(value) -> list[torch.Tensor]:
    """Every tensor in nested lists, tuples and dicts (what torch functions take and return)."""
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in tensors_in(v)]
    if isinstance(value, dict):
        return [t for v in value.values() for t in tensors_in(v)]
    return []


def mark_device(*tensors: torch.Tensor) -> None:
    """Treat these tensors (and what is computed from them) as living on the worker's device."""
    for tensor in tensors:
        setattr(tensor, _MARK, True)


def is_device(value) -> bool:
    return isinstance(value, torch.Tensor) and getattr(value, _MARK, False)


def _is_device_arg(device) -> bool:
    """A `device=` argument that names the worker's device: a torch.device, or a string but "cpu"."""
    if isinstance(device, torch.device):
        return True
    return isinstance(device, str) and device != "cpu"


def _target_of_to(args, kwargs):
    """Where `.to(...)` sends a tensor: True (device), False (host) or None (where it is)."""
    for value in [*args[1:], kwargs.get("device")]:
        if isinstance(value, torch.Tensor):
            return is_device(value)
        if isinstance(value, (torch.device, str)):
            return _is_device_arg(value)
    return None


def _in_to_device() -> bool:
    """Whether transfer.to_device makes this copy: only it pins the source (on CUDA), and a
    non-blocking copy from pageable memory may still wait for the stream."""
    frame = sys._getframe(2)
    for _ in range(4):
        if frame is None:
            return False
        if frame.f_code is to_device.__code__:
            return True
        frame = frame.f_back
    return False


class SyncAudit(TorchFunctionMode):
    """`with SyncAudit() as audit: ...`; audit.total, audit.counts (reason -> n), audit.events."""

    def __init__(self):
        super().__init__()
        self.counts: Counter[str] = Counter()
        self.events: list[str] = []

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def count(self, reason: str) -> None:
        self.counts[reason] += 1
        self.events.append(reason)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", str(func))
        result = func(*args, **kwargs)
        if name in _IGNORED:
            return result
        tensors = tensors_in((args, kwargs))
        on_device = [is_device(t) for t in tensors]
        is_result_device = any(on_device)
        if name in _READS and tensors and is_device(args[0]):
            self.count(f"device-to-host {name}")
            return result.detach() if result is args[0] else result  # host values
        if name == "to":
            target = _target_of_to(args, kwargs)
            source = is_device(args[0])
            is_result_device = source if target is None else target
            if source and target is False:
                self.count("device-to-host to")
            elif target and not source and not (kwargs.get("non_blocking", False) and _in_to_device()):
                self.count("blocking host-to-device to")
        elif name == "copy_":
            dst, src = is_device(args[0]), is_device(args[1])
            if src and not dst:
                self.count("device-to-host copy_")
            elif dst and not src and args[1].dim() > 0 and not kwargs.get("non_blocking", False):
                self.count("blocking host-to-device copy_")
            is_result_device = dst
        elif name == "__setitem__" and not is_device(args[0]):
            if is_result_device:
                self.count("device-to-host __setitem__")
            is_result_device = False
        elif not tensors and _is_device_arg(kwargs.get("device")):  # a factory on the device
            is_result_device = True
            if name in _FACTORIES_FROM_DATA:
                self.count(f"blocking host-to-device torch.{name}")
        elif is_result_device:
            if name in _DATA_DEPENDENT or (name in ("__getitem__", "__setitem__") and any(
                    t.dtype == torch.bool and t.dim() > 0 for t in tensors[1:])):
                self.count(f"data-dependent {name}")
            host = [t for t, d in zip(tensors, on_device) if not d and t.dim() > 0]
            if host:
                self.count(f"implicit host-to-device {name}")
        if isinstance(result, torch.Tensor) and tensors and result is args[0] and is_result_device != is_device(result):
            result = result.detach()  # .to() / .cpu() of a CPU tensor return it as is: keep the two apart
        if is_result_device:
            for tensor in tensors_in(result):
                mark_device(tensor)
        return result
