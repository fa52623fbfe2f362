"""Host-to-device copies that never make the host wait: a job's small index tensors are built on
the host, packed into one tensor, pinned (CUDA) and copied with non_blocking=True. Device-to-host
reads are not here: each job makes one, explicitly, for what the scheduler needs."""

from __future__ import annotations

import torch


def to_device(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    """host [...] on the CPU -> the same values on `device`, queued on the stream. On CUDA the
    source is pinned first: from pageable memory the driver may wait for the stream. Torch's
    caching host allocator keeps the pinned block until the copy is done. A tensor already on
    a device is copied device to device, which never blocks the host either."""
    if device.type == "cuda" and host.device.type == "cpu":
        host = host.pin_memory()
    return host.to(device, non_blocking=True)


def to_device_packed(parts: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    """Several small int64 host tensors in one copy; returns their device views, same shapes."""
    flat = torch.cat([p.reshape(-1) for p in parts])  # [sum numel] int64
    on_device = to_device(flat, device)
    views, start = [], 0
    for part in parts:
        views.append(on_device[start:start + part.numel()].view(part.shape))
        start += part.numel()
    return views


def index_tensor(values: list[int]) -> torch.Tensor:
    """A host int64 tensor, also when `values` is empty."""
    return torch.tensor(values, dtype=torch.long)
