"""Per-request state inside one worker: its KV-cache slot, the committed tokens it was told,
and a mirror of what its slot holds, so a job can reuse every cached token that is still valid
and roll back the rest by a length decrement. No model calls here."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from minedraft.workers.kv_cache import KVCache
from minedraft.workers.sampling import SamplingParams, make_generator


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

    def __init__(self, cache: KVCache, salt: int):
        self.cache = cache
        self.salt = salt  # separates the drafter's and the verifier's random streams
        self.requests: dict[str, RequestState] = {}

    def get(self, request_id: str, params: SamplingParams | None) -> RequestState:
        state = self.requests.get(request_id)
        if state is None:
            if params is None:
                raise KeyError(f"request_id={request_id} is unknown to this worker and came without params")
            generator = make_generator(params.seed, self.salt, self.cache.data.device)
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
    model, cache: KVCache, states: list[RequestState], feeds: list[list[int]], logit_index: list[list[int]], max_short: int
) -> torch.Tensor:
    """Feed each row's tokens; return logits at the positions logit_index[b] (indices into
    feeds[b], each row the same count n).

    Long feeds (prefills) are first caught up without logits among themselves, so the main
    right-padded forward stays at most max_short tokens wide.
    -> logits [B, n, V] float32
    """
    long_rows = [i for i, f in enumerate(feeds) if len(f) > max_short]
    if long_rows:
        heads = [feeds[i][: len(feeds[i]) - max_short] for i in long_rows]
        feed_without_logits(model, cache, [states[i] for i in long_rows], heads)
        for i in long_rows:
            cut = len(feeds[i]) - max_short
            feeds[i] = feeds[i][cut:]
            logit_index[i] = [j - cut for j in logit_index[i]]
    return _forward(model, cache, states, feeds, logit_index)


def feed_without_logits(model, cache: KVCache, states: list[RequestState], feeds: list[list[int]]) -> None:
    """Cache each row's feed (rows with an empty feed are skipped); no lm_head."""
    rows = [i for i, f in enumerate(feeds) if f]
    if rows:
        _forward(model, cache, [states[i] for i in rows], [feeds[i] for i in rows], [[] for _ in rows])


def _forward(model, cache: KVCache, states, feeds, logit_index) -> torch.Tensor:
    device = cache.data.device
    width = max(len(f) for f in feeds)
    tokens = torch.zeros(len(feeds), width, dtype=torch.long)  # [B, T]
    for i, f in enumerate(feeds):
        tokens[i, : len(f)] = torch.tensor(f, dtype=torch.long)
    index = torch.tensor(logit_index, dtype=torch.long).reshape(len(feeds), -1)  # [B, n]
    logits = model(tokens.to(device), cache, [s.slot for s in states], [len(f) for f in feeds], index)
    for state, f in zip(states, feeds):
        state.cached.extend(f)
    return logits
