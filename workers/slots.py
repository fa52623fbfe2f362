"""Per-request state inside one worker: its KV-cache slot, the committed tokens it was told,
and a mirror of what its slot holds, so a job can reuse every cached token that is still valid
and roll back the rest by a length decrement. No model calls here."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from minedraft.workers.model.kv_cache import KVCache
from minedraft.workers.sampling import SamplingParams, make_generator
from minedraft.workers.model.transfer import index_tensor, to_device_packed


@dataclass
class RequestState:
    slot: int
    params: SamplingParams
    generator: torch.Generator
    known: list[int] = field(default_factory=list)  # committed tokens told by the scheduler
    cached: list[int] = field(default_factory=list)  # tokens whose K/V the slot holds, in order
    num_stable: int = 0  # cached[:num_stable] == known[:num_stable] is guaranteed

    def tokens_to_feed(self, cache: KVCache) -> list[int]:
        """Roll the slot back to its longest still-valid prefix; return the committed tokens
        to feed so that the next logits are those after the last committed token."""
        n = self.num_stable
        limit = min(len(self.cached), len(self.known))
        while n < limit and self.cached[n] == self.known[n]:
            n += 1
        n = min(n, len(self.known) - 1)  # the last committed token is always re-fed
        cache.truncate(self.slot, n)
        del self.cached[n:]
        self.num_stable = n
        return self.known[n:]


class SlotTable:
    """request_id -> RequestState over one KVCache."""

    def __init__(self, cache: KVCache, salt: int, reclaim=None):
        self.cache = cache
        self.salt = salt  # separates the drafter's and the verifier's random streams
        self.requests: dict[str, RequestState] = {}
        self.reclaim = reclaim  # called when a new request finds no free slot: frees scratch slots (the drafter's branches)

    def get(self, request_id: str, params: SamplingParams | None) -> RequestState:
        state = self.requests.get(request_id)
        if state is None:
            if params is None:
                raise KeyError(f"request_id={request_id} is unknown to this worker and came without params")
            generator = make_generator(params.seed, self.salt, self.cache.data.device)
            if not self.cache.num_free and self.reclaim is not None:
                self.reclaim()
            state = RequestState(self.cache.alloc(), params, generator)
            self.requests[request_id] = state
        return state

    def release(self, request_ids: list[str]) -> None:
        for request_id in request_ids:
            state = self.requests.pop(request_id, None)
            if state is not None:
                self.cache.free(state.slot)

    def commit(self, request_id: str, params: SamplingParams | None, new_tokens: list[int]) -> RequestState:
        state = self.get(request_id, params)
        state.known.extend(new_tokens)
        if len(state.known) + 1 > self.cache.max_len:
            raise ValueError(f"request_id={request_id} needs {len(state.known) + 1} positions, cache holds {self.cache.max_len}")
        return state


def feed_batch(
    model, cache: KVCache, states: list[RequestState], feeds: list[list[int]], logit_index: list[list[int]],
    max_short: int, tail: torch.Tensor | None = None, num_tail: list[int] | None = None,
) -> torch.Tensor:
    """Feed each row's tokens; return logits at the positions logit_index[b] (indices into the
    row's tokens, each row the same count n). A row's tokens are its host feed, then the first
    num_tail[b] tokens of tail[b] ([B, t] int64 on the device: drafts the host has not read).
    Tail tokens are not added to the states' mirrors: the caller adds them once it has read them.

    Long feeds (prefills) are first caught up without logits among themselves, so the main
    right-padded forward stays at most max_short tokens wide.
    -> logits [B, n, V] float32
    """
    num_tail = [0] * len(feeds) if num_tail is None else num_tail
    long_rows = [i for i, (f, t) in enumerate(zip(feeds, num_tail)) if len(f) + t > max_short]
    if long_rows:
        cuts = {i: len(feeds[i]) + num_tail[i] - max_short for i in long_rows}  # within the host feed
        feed_without_logits(model, cache, [states[i] for i in long_rows], [feeds[i][: cuts[i]] for i in long_rows])
        feeds = [f[cuts[i]:] if i in cuts else f for i, f in enumerate(feeds)]
        logit_index = [[j - cuts[i] for j in index] if i in cuts else index for i, index in enumerate(logit_index)]
    return _forward(model, cache, states, feeds, logit_index, tail, num_tail)


def feed_without_logits(model, cache: KVCache, states: list[RequestState], feeds: list[list[int]]) -> None:
    """Cache each row's feed (rows with an empty feed are skipped); no lm_head."""
    rows = [i for i, f in enumerate(feeds) if f]
    if rows:
        _forward(model, cache, [states[i] for i in rows], [feeds[i] for i in rows], [[] for _ in rows])


def _forward(model, cache: KVCache, states, feeds, logit_index, tail=None, num_tail=None) -> torch.Tensor:
    """One forward of host feeds followed by device tail tokens, with no device-to-host read:
    the token grid reaches the device in one copy that does not block; the tail is placed there."""
    device = cache.data.device
    num_tail = [0] * len(feeds) if tail is None else num_tail
    lengths = [len(f) + t for f, t in zip(feeds, num_tail)]
    if tail is not None and not any(feeds) and len(set(num_tail)) == 1:  # the drafter's loop: every row one new draft
        tokens = tail[:, : num_tail[0]]  # [B, t] already on the device
    else:
        grid = torch.zeros(len(feeds), max(lengths), dtype=torch.long)  # [B, T] host, tails left 0
        for i, f in enumerate(feeds):
            grid[i, : len(f)] = torch.tensor(f, dtype=torch.long)
        # Where each tail token goes (row, column) and where it comes from (column in tail).
        cells = [(i, len(feeds[i]) + j, j) for i, t in enumerate(num_tail) for j in range(t)]
        rows, cols, src = (index_tensor(list(c)) for c in zip(*cells)) if cells else (index_tensor([]),) * 3
        tokens, rows, cols, src = to_device_packed([grid, rows, cols, src], device)
        if cells:
            tokens[rows, cols] = tail[rows, src]
    index = torch.tensor(logit_index, dtype=torch.long).reshape(len(feeds), -1)  # [B, n] host
    logits = model(tokens, cache, [s.slot for s in states], lengths, index)
    for state, f in zip(states, feeds):
        state.cached.extend(f)
    return logits
