"""The one record of a request, from the message that brings it into the daemon (or into the
in-process reference engine) to its end: prompt and committed tokens, sampling parameters, stop
conditions, what each worker has been sent, and the counters the metrics report. `commit` is
the one implementation of commit semantics; the scheduler core (runtime/scheduler.py) and the
reference engine (workers/engine.py) both call it. Standard library only.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from minedraft.common.protocol import DRAFTER, VERIFIER, JobRow, SamplingParams


@dataclass(eq=False)  # identity: a request is one object, found in queues and batches by itself
class Request:
    request_id: str
    prompt_ids: list[int]
    max_tokens: int
    params: SamplingParams = SamplingParams()
    stop_token_ids: frozenset[int] = frozenset()  # every id that ends the request (EOS included)
    min_tokens: int = 0  # no stop token ends the request before this many output tokens
    client_id: bytes = b""
    detokenizer: object | None = None  # the scheduler's text deltas and stop strings (runtime/tokenizer.py)
    arrival_s: float = 0.0
    output_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None  # "length" | "stop" | "abort" | "error" | "shutdown"
    num_sent: dict[str, int] = field(default_factory=lambda: {DRAFTER: 0, VERIFIER: 0})  # tokens each worker holds
    num_draft: int = 0  # drafts in the current step: to draft, then (after the draft result) to verify
    draft_scores: list[float] = field(default_factory=list)  # the kept drafts' cumulative draft log-probs
    buffer_row: int = 0  # row of the batch's draft buffer in the current step
    num_streamed: int = 0  # output ids already sent to the client
    num_drafted: int = 0
    num_accepted: int = 0
    num_steps: int = 0
    num_predraft_hits: int = 0  # steps whose drafts the drafter had drafted ahead (pre-drafting)
    first_token_s: float | None = None

    @property
    def num_tokens(self) -> int:
        """Prompt and output tokens."""
        return len(self.prompt_ids) + len(self.output_ids)

    def tokens_from(self, start: int) -> list[int]:
        """Prompt + output tokens from position `start` on, without building the whole list."""
        num_prompt = len(self.prompt_ids)
        if start >= num_prompt:
            return self.output_ids[start - num_prompt :]
        return self.prompt_ids[start:] + self.output_ids

    def room(self, max_len: int) -> int:
        """Drafts that can still be useful: the verify emits one more token after them."""
        return max(0, min(self.max_tokens - len(self.output_ids), max_len - self.num_tokens) - 1)

    def row(self, role: str) -> JobRow:
        """The request in `role`'s next job: the tokens committed since that worker's previous
        job, the step's drafts and buffer row, and the sampling parameters on its first job."""
        sent = self.num_sent[role]
        self.num_sent[role] = self.num_tokens
        return JobRow(self.request_id, self.tokens_from(sent), self.num_draft, self.buffer_row,
                      self.params if sent == 0 else None)

    def commit(self, tokens: list[int]) -> str | None:
        """Append a step's emitted tokens up to the first stop: a stop token once the output is
        past min_tokens ("stop"), or max_tokens ("length"). Returns the reason, or None."""
        for token in tokens:
            self.output_ids.append(token)
            if token in self.stop_token_ids and len(self.output_ids) > self.min_tokens:
                return "stop"
            if len(self.output_ids) >= self.max_tokens:
                return "length"
        return None
