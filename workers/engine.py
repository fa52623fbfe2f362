"""In-process engines: `ar` (target only) and `sd` (draft k, verify k+1, accept) with
continuous batching. The reference for the runtime's tests and the co-located SD baseline.

An independent reference, not a second scheduler: a synchronous loop over the same Drafter and
Verifier cores as the worker processes, with no batches to alternate, no plans, no IO and no
text. It keeps only what a reference needs and shares the rest: the request record, its job rows
and its commit semantics are common/request.py's, the ones the scheduler core uses.
"""

from __future__ import annotations

from collections import deque

import torch

from minedraft.common.protocol import DRAFTER, VERIFIER
from minedraft.common.request import Request
from minedraft.workers.drafter import Drafter
from minedraft.workers.model.config import check_same_vocab
from minedraft.workers.verifier import Verifier


class Engine:
    def __init__(self, target, draft=None, *, mode: str = "sd", num_draft: int = 4, max_batch: int = 8,
                 max_len: int = 512, dtype: torch.dtype = torch.float32, eos_token_ids: tuple[int, ...] | None = None,
                 predraft: bool = False):
        """predraft (sd): after each draft, the drafter drafts on along every row's chain (to one
        whole next step) before the verify, as the drafter process does while the verifier runs;
        a row whose outcome is its chain's own starts the next step from it."""
        if mode not in ("ar", "sd"):
            raise ValueError(f"mode must be 'ar' or 'sd', got {mode!r}")
        if mode == "sd" and draft is None:
            raise ValueError("mode 'sd' needs a draft model")
        if mode == "sd":
            check_same_vocab(draft.config, target.config)
        self.mode, self.max_batch, self.max_len = mode, max_batch, max_len
        self.num_draft = num_draft if mode == "sd" else 0
        self.eos_token_ids = frozenset(target.config.eos_token_ids if eos_token_ids is None else eos_token_ids)
        max_draft = max(self.num_draft, 1)
        # Each cache lives on its model's device; the draft buffers on the drafter's.
        target_device = target.device
        draft_device = draft.device if mode == "sd" else target_device
        self.verifier = Verifier(target, max_batch, max_len, max_draft, dtype, target_device)
        self.drafter = Drafter(draft, max_batch, max_len, max_draft, dtype, draft_device) if mode == "sd" else None
        vocab = target.config.vocab_size
        self.draft_tokens = torch.zeros(max_batch, max_draft, dtype=torch.long, device=draft_device)  # [max_batch, k]
        self.draft_probs = torch.zeros(max_batch, max_draft, vocab, device=draft_device)  # [max_batch, k, V] float32
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.finished: dict[str, Request] = {}
        self.to_release: list[str] = []
        self.predraft = predraft and self.drafter is not None
        self.predraft_hits = {"checked": 0, "hits": 0, "branch_hits": 0, "drafts_served": 0}

    def add_request(self, request: Request) -> None:
        """A new request; its stop_token_ids gain the model's EOS ids."""
        if not request.prompt_ids or request.max_tokens < 1:
            raise ValueError(f"request_id={request.request_id}: empty prompt or max_tokens < 1")
        if len(request.prompt_ids) + request.max_tokens > self.max_len:
            raise ValueError(f"request_id={request.request_id}: prompt + max_tokens exceeds max_len={self.max_len}")
        request.stop_token_ids = frozenset(request.stop_token_ids) | self.eos_token_ids
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
        for i, request in enumerate(self.running):
            request.num_draft = min(self.num_draft, request.room(self.max_len))
            request.buffer_row = i
        if self.drafter is not None:
            rows = [r.row(DRAFTER) for r in self.running]
            outcome = self.drafter.draft(rows, self.draft_tokens, self.draft_probs, keep_chains=self.predraft)
            if self.predraft:
                self.predraft_hits["checked"] += sum(h >= 0 for h in outcome.predraft_hits)
                self.predraft_hits["hits"] += sum(h == 1 for h in outcome.predraft_hits)
                self.predraft_hits["branch_hits"] += sum(h == 2 for h in outcome.predraft_hits)
                self.predraft_hits["drafts_served"] += sum(outcome.num_served)
                self.drafter.predraft(rows, outcome.num_kept, float("inf"), lambda: False)
            for request, kept in zip(self.running, outcome.num_kept):
                request.num_draft = kept  # fewer where a row waits for its pre-draft (Drafter._rows_to_wait)
        emitted = self.verifier.verify([r.row(VERIFIER) for r in self.running], self.draft_tokens, self.draft_probs)
        # 3. Commit the emitted tokens up to each request's stop condition.
        for request, tokens in zip(self.running, emitted):
            request.num_steps += 1
            request.num_drafted += request.num_draft
            request.num_accepted += len(tokens) - 1
            request.finish_reason = request.commit(tokens)
        for request in [r for r in self.running if r.finish_reason is not None]:
            self.running.remove(request)
            self.finished[request.request_id] = request
            self.to_release.append(request.request_id)

    def run(self) -> dict[str, Request]:
        while self.has_unfinished():
            self.step()
        return self.finished
