"""KVCache: one preallocated tensor of K/V slots indexed by absolute position, plus per-slot
lengths. Rollback is a length decrement; K/V is never reallocated, and copied only by
copy_prefix (the drafter's scratch slots for pre-drafted branches)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:  # only for annotations: importing the model package here would be circular
    from minedraft.workers.model.config import ModelConfig


class KVCache:
    """Slot-based, position-indexed cache: data [layers, 2, max_slots, kv_heads, max_len, head_dim]."""

    def __init__(
        self,
        config: ModelConfig,
        max_slots: int,
        max_len: int,
        dtype: torch.dtype,
        device: torch.device | str = "cpu",
    ):
        if max_slots < 1 or max_len < 1:
            raise ValueError(f"KV cache needs max_slots >= 1 and max_len >= 1, got {max_slots}, {max_len}")
        self.max_slots = max_slots
        self.max_len = max_len
        shape = (config.num_layers, 2, max_slots, config.num_kv_heads, max_len, config.head_dim)
        self.data = torch.zeros(shape, dtype=dtype, device=device)  # [layers, 2, S, Hkv, max_len, D]
        self.lengths = [0] * max_slots  # tokens held per slot
        self._free = list(range(max_slots - 1, -1, -1))  # stack; pop() gives the lowest slot
        self._is_used = [False] * max_slots

    def alloc(self) -> int:
        """Take a free slot, with length 0."""
        if not self._free:
            raise RuntimeError(f"KV cache full: all {self.max_slots} slots in use")
        slot = self._free.pop()
        self._is_used[slot] = True
        self.lengths[slot] = 0
        return slot

    def free(self, slot: int) -> None:
        """Give a slot back; its contents become garbage."""
        self.check_slot(slot)
        self._is_used[slot] = False
        self.lengths[slot] = 0
        self._free.append(slot)

    def truncate(self, slot: int, length: int) -> None:
        """Roll a slot back to its first `length` tokens (no copy)."""
        self.check_slot(slot)
        if not 0 <= length <= self.lengths[slot]:
            raise ValueError(f"cannot truncate slot {slot} to {length}: it holds {self.lengths[slot]} tokens")
        self.lengths[slot] = length

    def copy_prefix(self, src: int, dst: int, length: int) -> None:
        """Make slot dst hold the first `length` tokens of slot src (a branch's shared prefix)."""
        self.check_slot(src)
        self.check_slot(dst)
        if not 0 <= length <= self.lengths[src]:
            raise ValueError(f"cannot copy {length} tokens of slot {src}: it holds {self.lengths[src]}")
        self.data[:, :, dst, :, :length] = self.data[:, :, src, :, :length]
        self.lengths[dst] = length

    def check_slot(self, slot: int) -> None:
        """Raise ValueError unless `slot` is allocated."""
        if not (0 <= slot < self.max_slots and self._is_used[slot]):
            raise ValueError(f"KV cache slot {slot} is not allocated")

    @property
    def num_free(self) -> int:
        return len(self._free)
