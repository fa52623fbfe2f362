"""In-process engines: `ar` (target only) and `sd` (draft k, verify k+1, accept) with
continuous batching. The reference for the runtime's tests and the co-located SD baseline;
they drive the same Drafter and Verifier cores as the worker processes, with no IO.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import torch

from minedraft.workers.drafter import Drafter, Row
from minedraft.workers.model.config import check_same_vocab
from minedraft.workers.sampling import SamplingParams
from minedraft.workers.verifier import Verifier


@dataclass
class EngineRequest:
    request_id: str
    prompt_ids: list[int]
    max_tokens: int
    params: SamplingParams = SamplingParams()
    stop_token_ids: tuple[int, ...] = ()  # besides the model's EOS ids
    min_tokens: int = 0  # no stop token ends the request before this many output tokens
    output_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None  # "length" | "stop"
    num_drafted: int = 0
    num_accepted: int = 0
    num_steps: int = 0
    num_sent_drafter: int = 0  # tokens of prompt + output already told to the drafter
    num_sent_verifier: int = 0

    @property
    def tokens(self) -> list[int]:
        return self.prompt_ids + self.output_ids


class Engine:
    def __init__(self, target, draft=None, *, mode: str = "sd", num_draft: int = 4, max_batch: int = 8,
                 max_len: int = 512, dtype: torch.dtype = torch.float32, eos_token_ids: tuple[int, ...] | None = None):
        if mode not in ("ar", "sd"):
            raise ValueError(f"mode must be 'ar' or 'sd', got {mode!r}")
        if mode == "sd" and draft is None:
            raise ValueError("mode 'sd' needs a draft model")
        if mode == "sd":
            check_same_vocab(draft.config, target.config)
        self.mode, self.max_batch, self.max_len = mode, max_batch, max_len
        self.num_draft = num_draft if mode == "sd" else 0
        self.eos_token_ids = tuple(target.config.eos_token_ids if eos_token_ids is None else eos_token_ids)
        max_draft = max(self.num_draft, 1)
        # Each cache lives on its model's device; the draft buffers on the drafter's.
        target_device = target.device
        draft_device = draft.device if mode == "sd" else target_device
        self.verifier = Verifier(target, max_batch, max_len, max_draft, dtype, target_device)
        self.drafter = Drafter(draft, max_batch, max_len, max_draft, dtype, draft_device) if mode == "sd" else None
        vocab = target.config.vocab_size
        self.draft_tokens = torch.zeros(max_batch, max_draft, dtype=torch.long, device=draft_device)  # [max_batch, k]
        self.draft_probs = torch.zeros(max_batch, max_draft, vocab, device=draft_device)  # [max_batch, k, V] float32
        self.waiting: deque[EngineRequest] = deque()
        self.running: list[EngineRequest] = []
        self.finished: dict[str, EngineRequest] = {}
        self.to_release: list[str] = []

    def add_request(self, request: EngineRequest) -> None:
        if not request.prompt_ids or request.max_tokens < 1:
            raise ValueError(f"request_id={request.request_id}: empty prompt or max_tokens < 1")
        if len(request.prompt_ids) + request.max_tokens > self.max_len:
            raise ValueError(f"request_id={request.request_id}: prompt + max_tokens exceeds max_len={self.max_len}")
        self.waiting.append(request)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def step(self) -> None:
        # 1. Admit waiting requests; free the slots of finished ones.
        while self.waiting and len(self.running) < self.max_batch:
            self.running.append(self.waiting.popleft())
        self.verifier.release(self.to_release)
        if self.drafter is not None:
            self.drafter.release(self.to_release)
        self.to_release = []
        if not self.running:
            return
        # 2. Draft (sd) then verify, each row with its own draft length.
        num_draft = [min(self.num_draft, r.max_tokens - len(r.output_ids) - 1) for r in self.running]
        if self.drafter is not None:
            rows = [self._row(r, i, k, "num_sent_drafter") for i, (r, k) in enumerate(zip(self.running, num_draft))]
            self.drafter.draft(rows, self.draft_tokens, self.draft_probs)
        rows = [self._row(r, i, k, "num_sent_verifier") for i, (r, k) in enumerate(zip(self.running, num_draft))]
        emitted = self.verifier.verify(rows, self.draft_tokens, self.draft_probs)
        # 3. Commit the emitted tokens up to each request's stop condition.
        for request, k, tokens in zip(self.running, num_draft, emitted):
            request.num_steps += 1
            request.num_drafted += k
            request.num_accepted += len(tokens) - 1
            self._commit(request, tokens)
        for request in [r for r in self.running if r.finish_reason is not None]:
            self.running.remove(request)
            self.finished[request.request_id] = request
            self.to_release.append(request.request_id)

    def run(self) -> dict[str, EngineRequest]:
        while self.has_unfinished():
            self.step()
        return self.finished

    def _row(self, request: EngineRequest, buffer_row: int, num_draft: int, sent_attr: str) -> Row:
        tokens = request.tokens
        sent = getattr(request, sent_attr)
        setattr(request, sent_attr, len(tokens))
        return Row(request.request_id, tokens[sent:], num_draft, buffer_row, request.params if sent == 0 else None)

    def _commit(self, request: EngineRequest, tokens: list[int]) -> None:
        stops = set(request.stop_token_ids) | set(self.eos_token_ids)
        for token in tokens:
            request.output_ids.append(token)
            if token in stops and len(request.output_ids) > request.min_tokens:
                request.finish_reason = "stop"
            elif len(request.output_ids) >= request.max_tokens:
                request.finish_reason = "length"
            if request.finish_reason is not None:
                return
