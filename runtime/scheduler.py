"""The scheduler core: every request's lifecycle and authoritative tokens, the two batches, job
dispatch, stop conditions, outputs and metrics. Pure Python, no IO and no torch: the process
wrapper (runtime/server.py) feeds it messages and sends what it returns; tests drive it directly.
"""

from __future__ import annotations

import secrets
import time
from collections import deque
from dataclasses import dataclass, field

from minedraft.runtime.budget import DraftBudget, Plan
from minedraft.runtime.plans import Placement, PlanChooser, candidate_plans, cpu_pool
from minedraft.runtime.config import Config
from minedraft.runtime.metrics import Metrics
from minedraft.runtime.protocol import (
    DraftJob, DraftResult, ErrorOutput, GenerateOutput, GenerateRequest, JobRow, PrefillJob, PrefillResult,
    SamplingSpec, VerifyJob, VerifyResult,
)
from minedraft.runtime.tokenizer import Detokenizer
from minedraft.runtime.validation import validate_generate

DRAFTER, VERIFIER = "drafter", "verifier"
MIN_PREFILL_TOKENS = 8  # shorter prompts are not worth a separate verifier job


@dataclass
class Request:
    request_id: str
    client_id: bytes
    prompt_ids: list[int]
    max_tokens: int
    min_tokens: int  # no stop token or stop string ends the request before this many output tokens
    params: SamplingSpec
    stop_token_ids: frozenset[int]
    detokenizer: Detokenizer
    arrival_s: float
    output_ids: list[int] = field(default_factory=list)
    num_sent: dict[str, int] = field(default_factory=lambda: {DRAFTER: 0, VERIFIER: 0})
    num_draft: int = 0  # drafts in the current step: to draft, then (after the draft result) to verify
    draft_scores: list[float] = field(default_factory=list)  # the kept drafts' cumulative draft log-probs
    buffer_row: int = 0  # row of the batch's draft buffer in the current step
    num_streamed: int = 0  # output ids already sent to the client
    num_drafted: int = 0
    num_accepted: int = 0
    num_steps: int = 0
    first_token_s: float | None = None
    finish_reason: str | None = None

    @property
    def tokens(self) -> list[int]:
        return self.prompt_ids + self.output_ids


@dataclass
class Batch:
    batch_id: int
    requests: list[Request] = field(default_factory=list)
    state: str = "ready"  # ready -> drafting -> drafted -> verifying -> ready
    rows: list[Request] = field(default_factory=list)  # the current job's rows, in buffer order
    is_steady: bool = False  # the current job feeds no prompt or long catch-up: its time fits the cost model
    job_size: tuple[int, int] = (0, 0)  # draft: (rows drafting, depth); verify: (rows, positions)
    dispatch_s: float = 0.0  # when the current job was sent (scheduler clock)
    plan: Plan | None = None  # the draft budget's plan for the current step
    job_mode: str = ""  # the mode in force when the current job was sent
    draft_id: int | None = None  # the batch's latest draft job (frames transport: names its drafts)


class SchedulerCore:
    def __init__(self, config: Config, tokenizer, vocab_size: int, max_len: int, eos_token_ids: list[int],
                 clock=time.monotonic, max_batch: int | None = None):
        """max_batch: requests per batch, as the workers' caches hold it (None: scheduler.max_batch)."""
        sc = config.scheduler
        self.is_auto = sc.mode == "auto"
        self.mode = "psd" if self.is_auto else sc.mode  # the mode in force; auto changes it at step boundaries
        self.num_draft = sc.num_draft if sc.mode != "ar" else 0
        self.extra_draft = sc.extra_draft if sc.mode != "ar" else 0
        self.max_depth = self.num_draft + self.extra_draft
        # auto chooses its plan from measured costs: the fits are fed and used whatever the draft policy
        self.budget = DraftBudget(self.mode, sc.draft_policy, sc.num_draft, sc.extra_draft,
                                  is_predicting=sc.draft_policy == "adaptive" or self.is_auto) if sc.mode != "ar" else None
        self.chooser: PlanChooser | None = None
        if self.is_auto:
            self.chooser = PlanChooser(candidate_plans(cpu_pool(config)), self.budget, sc.plan_rotate_steps)
            self.mode = self.chooser.current.mode
        self.is_learning = self.budget is not None and self.budget.is_predicting
        self.prefill_ahead = sc.prefill_ahead and sc.mode != "ar"
        self.max_batch = max_batch or sc.max_batch
        assert self.max_batch >= 1, "scheduler.max_batch = 0 is resolved by the workers (ReadyResult.max_batch)"
        self.max_rows = sc.max_rows(self.max_batch)  # one batch's limit in one-batch plans (auto: both of psd's batches)
        self.max_live = self.max_batch * sc.num_batches
        self.wide_role: str | None = None  # the worker running a job on every core: the other waits
        self.placement_changes = {"num_switches": 0, "total_s": 0.0, "max_s": 0.0}  # workers' thread/core changes
        self.max_queued = sc.max_queued_requests
        self.max_tokens_cap = sc.max_tokens_cap
        self.max_len = min(max_len, sc.max_len)
        self.vocab_size = vocab_size
        self.eos_token_ids = frozenset(eos_token_ids)
        self.tokenizer = tokenizer
        self.clock = clock
        self.batches = [Batch(b) for b in range(2 if sc.mode in ("psd", "auto") else 1)]
        self.waiting: deque[Request] = deque()
        self.requests: dict[str, Request] = {}  # waiting and running
        self.is_busy = {DRAFTER: False, VERIFIER: False}
        self.release: dict[str, list[str]] = {DRAFTER: [], VERIFIER: []}
        self.outputs: list[tuple[bytes, object]] = []
        self.metrics = Metrics(clock)
        self.last_drafted = -1
        self.num_draft_jobs = 0  # numbers each draft job (its draft_id)
        self.last_step_s: float | None = None  # dispatch time of the previous step's pacing job
        self.drafter_spans: deque[tuple[float, float | None]] = deque(maxlen=8)  # dispatch, result (scheduler clock)

    # --- requests ---------------------------------------------------------------------------

    def add_request(self, client_id: bytes, message: GenerateRequest) -> None:
        error = validate_generate(message, self)
        if error is None and message.request_id in self.requests:
            error = f"request_id: {message.request_id!r} is already in use"
        if error is not None:
            return self._error(client_id, message.request_id, "invalid_request", error)
        if len(self.waiting) >= self.max_queued:
            return self._error(client_id, message.request_id, "overloaded",
                               f"admission queue is full ({self.max_queued} requests waiting)")
        prompt_ids = list(message.prompt_ids) if message.prompt_ids is not None else self.tokenizer.encode(message.prompt)
        if not prompt_ids or len(prompt_ids) + message.max_tokens > self.max_len:
            return self._error(client_id, message.request_id, "invalid_request",
                               f"prompt: {len(prompt_ids)} tokens + max_tokens {message.max_tokens} must be "
                               f"within 1..{self.max_len}")
        seed = message.seed if message.seed is not None else secrets.randbits(62)
        stop_ids = set(message.stop_token_ids) | (set() if message.ignore_eos else self.eos_token_ids)
        request = Request(
            message.request_id, client_id, prompt_ids, message.max_tokens, message.min_tokens,
            SamplingSpec(message.temperature, message.top_k, message.top_p, seed),
            frozenset(stop_ids), Detokenizer(self.tokenizer, message.stop, message.min_tokens), self.clock(),
        )
        self.requests[request.request_id] = request
        self.waiting.append(request)

    def abort(self, request_id: str, reason: str = "abort") -> bool:
        """Finish a request now; its slots are freed with each worker's next job. Harmless for
        unknown or finished requests. A batch in flight drops the request's result."""
        request = self.requests.get(request_id)
        if request is None:
            return False
        self._finish(request, reason)
        return True

    def abort_all(self, code: str, message: str) -> None:
        """Terminal error for every live request (the runtime died)."""
        for request in list(self.requests.values()):
            self._error(request.client_id, request.request_id, code, message)
            self._drop(request, "error")

    def abort_client(self, client_id: bytes) -> list[str]:
        """Abort every request of a client that went away."""
        request_ids = [r.request_id for r in self.requests.values() if r.client_id == client_id]
        for request_id in request_ids:
            self.abort(request_id)
        return request_ids

    def reset_workers(self) -> None:
        """Fresh workers hold nothing: forget in-flight jobs and pending releases."""
        assert not self.requests, "reset_workers with live requests"
        self.batches = [Batch(b.batch_id) for b in self.batches]
        self.is_busy = {DRAFTER: False, VERIFIER: False}
        self.release = {DRAFTER: [], VERIFIER: []}
        self.drafter_spans.clear()
        self.wide_role = None

    def take_outputs(self) -> list[tuple[bytes, object]]:
        outputs, self.outputs = self.outputs, []
        return outputs

    # --- jobs -------------------------------------------------------------------------------

    def next_jobs(self) -> list[tuple[str, object]]:
        """Jobs for every free worker that has a batch ready for it."""
        jobs = []
        if self.is_auto and self._is_step_start():
            self._choose_plan()
        if self.mode != "ar" and not self.is_busy[DRAFTER] and self.wide_role is None:
            batch = self._batch_to_draft()
            if batch is not None:
                jobs.append((DRAFTER, self._draft_job(batch)))
        if not self.is_busy[VERIFIER] and self.wide_role is None:
            batch = self._batch_to_verify()
            job = self._verify_job(batch) if batch is not None else None
            if job is None and self.prefill_ahead:
                job = self._prefill_job()
            if job is not None:
                jobs.append((VERIFIER, job))
        return jobs

    def on_draft_result(self, result: DraftResult) -> None:
        batch = self.batches[result.batch_id]
        assert batch.state == "drafting", f"batch_id={batch.batch_id} draft result in state {batch.state}"
        assert len(result.num_kept) in (0, len(batch.rows)), "draft result rows != job rows"
        self._job_done(DRAFTER, result)
        if self.drafter_spans and self.drafter_spans[-1][1] is None:
            self.drafter_spans[-1] = (self.drafter_spans[-1][0], self.clock())
        self.metrics.add_busy(DRAFTER, result.busy_start_s, result.busy_end_s, job={
            "kind": "draft", "batch": batch.batch_id, "rows": batch.job_size[0], "depth": batch.job_size[1],
            "positions": sum(len(s) for s in result.scores), "kept": sum(result.num_kept),
            "threads": result.num_threads, "cores": result.cpu_cores, "mode": self.mode})
        batch.state = "drafted"
        self.metrics.add_draft_tokens(sum(len(s) for s in result.scores))
        for request, kept in zip(batch.rows, result.num_kept):
            request.num_draft = kept  # TETRIS may keep fewer than were drafted
        if self.is_learning:
            if batch.is_steady:
                # Dispatch to result on our clock: the worker's time plus what each step costs around it.
                self.budget.observe_draft(*batch.job_size, self.clock() - batch.dispatch_s, *self._fit_key(batch, result))
            self.budget.observe_scores(result.scores)
            for request, kept, scores in zip(batch.rows, result.num_kept, result.scores):
                request.draft_scores = scores[:kept]

    def on_prefill_result(self, result: PrefillResult) -> None:
        self._job_done(VERIFIER, result)
        self.metrics.add_busy(VERIFIER, result.busy_start_s, result.busy_end_s, is_step=False,
                              job={"kind": "prefill", "batch": None, "rows": result.num_rows, "positions": None,
                                   "threads": result.num_threads, "cores": result.cpu_cores, "mode": self.mode})

    def on_verify_result(self, result: VerifyResult) -> None:
        batch = self.batches[result.batch_id]
        assert batch.state == "verifying", f"batch_id={batch.batch_id} verify result in state {batch.state}"
        assert len(result.emitted) == len(batch.rows), "verify result rows != job rows"
        self._job_done(VERIFIER, result)
        self.metrics.num_draft_frame_bytes += result.draft_frame_bytes
        self.metrics.add_busy(VERIFIER, result.busy_start_s, result.busy_end_s, job={
            "kind": "verify", "batch": batch.batch_id, "rows": batch.job_size[0], "positions": batch.job_size[1],
            "threads": result.num_threads, "cores": result.cpu_cores, "mode": self.mode})
        batch.state = "ready"
        if self.is_learning and batch.is_steady:
            now = self.clock()
            overlap = sum(max(0.0, min(now, end if end is not None else now) - max(batch.dispatch_s, start))
                          for start, end in self.drafter_spans)
            self.budget.observe_verify(batch.job_size[1], now - batch.dispatch_s, overlap, *self._fit_key(batch, result))
            if self.chooser is not None:
                self.chooser.note_positions(result.num_threads, batch.job_mode, batch.job_size[1])
        for request, tokens in zip(batch.rows, result.emitted):
            if request.finish_reason is not None:  # aborted while in flight
                continue
            num_accepted = len(tokens) - 1
            if request.draft_scores:  # kept only while learning
                self.budget.observe_accept(request.draft_scores, num_accepted)
            request.num_steps += 1
            request.num_drafted += request.num_draft
            request.num_accepted += num_accepted
            self.metrics.add_verify_row(request.num_draft, num_accepted)
            self._commit(request, tokens)
        batch.rows = []

    # --- internals --------------------------------------------------------------------------

    def _batch_to_draft(self) -> Batch | None:
        self._merge_inactive()
        candidates = [b for b in self._active() if b.state == "ready" and (b.requests or self.waiting)]
        if not candidates:
            return None
        # Alternate: prefer the batch not drafted last (two ready batches only at start-up).
        candidates.sort(key=lambda b: b.batch_id == self.last_drafted)
        batch = candidates[0]
        self._rebalance(batch)
        self._admit(batch)
        return batch if batch.requests else None

    def _batch_to_verify(self) -> Batch | None:
        drafted = [b for b in self.batches if b.state == "drafted"]  # drafted before a switch to ar too
        if drafted:
            return drafted[0]
        if self.mode == "ar":
            self._merge_inactive()
            batch = self.batches[0]
            if batch.state == "ready":
                self._admit(batch)
                if batch.requests:
                    return batch
        return None

    def _active(self) -> list[Batch]:
        """The batches the mode in force steps: two in psd, else the first."""
        return self.batches if self.mode == "psd" else self.batches[:1]

    def _merge_inactive(self) -> None:
        """After auto leaves psd: once both batches are between steps, the second one's requests
        join the first. Slots belong to requests, so nothing is rebuilt."""
        if self.mode != "psd" and len(self.batches) == 2:
            first, second = self.batches
            if second.requests and first.state == "ready" and second.state == "ready":
                first.requests.extend(second.requests)
                second.requests.clear()

    def _rebalance(self, batch: Batch) -> None:
        """After aborts and finishes, move requests from this batch (between steps, holding no
        drafts) to the other one so the two stay within one request of each other. Slots belong
        to requests, not batches, so a move costs nothing."""
        if self.mode == "psd":
            other = self.batches[1 - batch.batch_id]
            while len(batch.requests) > len(other.requests) + 1 and len(other.requests) < self.max_batch:
                other.requests.append(batch.requests.pop())

    def _admit(self, batch: Batch) -> None:
        """New requests join the batch drafted next, keeping the two batches balanced."""
        num_live = sum(len(b.requests) for b in self.batches)
        target = -(-(num_live + len(self.waiting)) // len(self._active()))  # ceil: this batch's fair share
        limit = self.max_batch if self.mode == "psd" else self.max_rows
        while self.waiting and len(batch.requests) < min(target, limit) and num_live < self.max_live:
            batch.requests.append(self.waiting.popleft())
            num_live += 1

    def _draft_job(self, batch: Batch) -> DraftJob:
        self.is_busy[DRAFTER] = True
        self.last_drafted = batch.batch_id
        batch.state = "drafting"
        if self.is_learning and self.mode == "sd":  # one batch: the step is draft dispatch to draft dispatch
            self._observe_step(batch)
        plan = self.budget.plan([self._room(r) for r in batch.requests])
        placement = self._placement(DRAFTER)
        batch.plan = plan
        self._start_step(batch, plan.depth)
        drafting = [r for r in batch.rows if r.num_draft > 0]
        batch.job_size = (len(drafting), max((r.num_draft for r in drafting), default=0))
        batch.is_steady = self._is_steady(batch.rows, DRAFTER)
        batch.job_mode = self.mode
        batch.dispatch_s = self.clock()
        self.drafter_spans.append((batch.dispatch_s, None))
        rows = [self._row(r, DRAFTER) for r in batch.rows]
        self.num_draft_jobs += 1
        batch.draft_id = self.num_draft_jobs
        return DraftJob(batch.batch_id, rows, self._take_release(DRAFTER), plan.capacity, *placement,
                        draft_id=batch.draft_id)

    def _verify_job(self, batch: Batch) -> VerifyJob | None:
        is_ar_step = batch.state == "ready"  # ar: no drafts; else the batch was drafted
        if is_ar_step:
            self._start_step(batch, 0)
        else:  # requests aborted since their draft are dropped; the others keep their buffer rows
            batch.rows = [r for r in batch.rows if r.finish_reason is None]
        if not batch.rows:  # every row was aborted after its draft
            batch.state = "ready"
            return None
        self.is_busy[VERIFIER] = True
        batch.state = "verifying"
        batch.job_size = (len(batch.rows), sum(1 + r.num_draft for r in batch.rows))
        batch.is_steady = self._is_steady(batch.rows, VERIFIER)
        batch.job_mode = self.mode
        batch.dispatch_s = self.clock()
        if is_ar_step and self.is_auto:  # the forecast that the step's overhead is measured against
            batch.plan = self.budget.predict("ar", [0] * len(batch.rows), *self.chooser.current.threads) \
                if self.budget.is_fitted("ar", *self.chooser.current.threads) else None
        if self.is_learning and (self.mode == "psd" or is_ar_step):  # the verifier paces psd and ar
            self._observe_step(batch)
        placement = self._placement(VERIFIER)
        return VerifyJob(batch.batch_id, [self._row(r, VERIFIER) for r in batch.rows], self._take_release(VERIFIER),
                         *placement, draft_id=None if is_ar_step else batch.draft_id)

    def _prefill_job(self) -> PrefillJob | None:
        """The prompts of requests being drafted that the verifier has not seen yet: it caches
        them while the drafter works, instead of after (the verify would feed them anyway)."""
        rows = [r for b in self.batches if b.state == "drafting" for r in b.rows
                if r.num_sent[VERIFIER] == 0 and r.finish_reason is None and len(r.tokens) >= MIN_PREFILL_TOKENS]
        if not rows:
            return None
        self.is_busy[VERIFIER] = True
        return PrefillJob([self._row(r, VERIFIER) for r in rows], self._take_release(VERIFIER),
                          *self._placement(VERIFIER))

    def _start_step(self, batch: Batch, num_draft: int) -> None:
        batch.rows = list(batch.requests)
        for i, request in enumerate(batch.rows):
            request.num_draft = min(num_draft, self._room(request))
            request.draft_scores = []
            request.buffer_row = i

    # --- auto plans -------------------------------------------------------------------------

    def _is_step_start(self) -> bool:
        """Whether the worker that paces the mode in force is about to start a step."""
        if self.wide_role is not None:
            return False
        if self.mode == "ar":
            has_work = self.batches[0].requests or self.waiting or any(b.requests for b in self.batches[1:])
            return not self.is_busy[VERIFIER] and self.batches[0].state == "ready" and bool(has_work) \
                and not any(b.state == "drafted" for b in self.batches)
        return not self.is_busy[DRAFTER] and any(
            b.state == "ready" and (b.requests or self.waiting) for b in self._active())

    def _choose_plan(self) -> None:
        live = [r for b in self.batches for r in b.requests]
        live += list(self.waiting)[: max(0, self.max_live - len(live))]
        plan = self.chooser.choose([self._room(r) for r in live])
        if plan.mode != self.mode:
            self.mode = plan.mode
            self.last_step_s = None  # the next period is the new mode's

    def _placement(self, role: str) -> tuple[int | None, list[int] | None]:
        """(num_threads, cpu_cores) for the next job of `role`: none outside auto plans on CPU
        devices. A wide plan's job takes every core only while the other worker is idle (and
        holds it off until done); else it runs on its half, as psd's jobs do."""
        if self.chooser is None:
            return None, None
        plan = self.chooser.current
        placement: Placement = plan.drafter if role == DRAFTER else plan.verifier
        if not placement.is_set:
            return None, None
        if plan.is_wide:
            other = VERIFIER if role == DRAFTER else DRAFTER
            if self.is_busy[other]:
                split = self.chooser.plans[0]
                placement = split.drafter if role == DRAFTER else split.verifier
            else:
                self.wide_role = role
        return placement.num_threads, list(placement.cpu_cores)

    def _job_done(self, role: str, result) -> None:
        self.is_busy[role] = False
        if self.wide_role == role:
            self.wide_role = None
        if result.switch_s > 0:
            changes = self.placement_changes
            changes["num_switches"] += 1
            changes["total_s"] += result.switch_s
            changes["max_s"] = max(changes["max_s"], result.switch_s)

    def _fit_key(self, batch: Batch, result) -> tuple[int | None, str]:
        """The cost fit a job's time feeds: the mode it was dispatched in and, in auto plans on
        CPU devices, the threads it ran with."""
        if self.chooser is None or not self.chooser.current.verifier.is_set:
            return None, batch.job_mode
        return result.num_threads, batch.job_mode

    def _observe_step(self, batch: Batch) -> None:
        now = self.clock()
        if self.last_step_s is not None and batch.plan is not None:
            self.budget.observe_step(now - self.last_step_s, batch.plan)
        self.last_step_s = now

    def _room(self, request: Request) -> int:
        """Drafts that can still be useful: the verify emits one more token after them."""
        return max(0, min(request.max_tokens - len(request.output_ids), self.max_len - len(request.tokens)) - 1)

    def _is_steady(self, rows: list[Request], role: str) -> bool:
        """True when no row feeds more than a step's worth of committed tokens (a prompt, or a
        catch-up after steps without drafting), so the job's time is a decode step's time."""
        return all(0 < r.num_sent[role] and len(r.tokens) - r.num_sent[role] <= self.max_depth + 1 for r in rows)

    def _row(self, request: Request, role: str) -> JobRow:
        tokens = request.tokens
        sent = request.num_sent[role]
        request.num_sent[role] = len(tokens)
        return JobRow(request.request_id, tokens[sent:], request.num_draft, request.buffer_row,
                      request.params if sent == 0 else None)

    def _take_release(self, role: str) -> list[str]:
        release, self.release[role] = self.release[role], []
        return release

    def _commit(self, request: Request, tokens: list[int]) -> None:
        if request.first_token_s is None:
            request.first_token_s = self.clock()
        reason = None
        for token in tokens:
            request.output_ids.append(token)
            if token in request.stop_token_ids and len(request.output_ids) > request.min_tokens:
                reason = "stop"
            elif len(request.output_ids) >= request.max_tokens:
                reason = "length"
            if reason is not None:
                break
        self.metrics.add_output_tokens(len(request.output_ids) - request.num_streamed)
        text, is_stop_string = request.detokenizer.update(request.output_ids, reason is not None)
        reason = "stop" if is_stop_string else reason
        if reason is not None:
            self._finish(request, reason, text)
        else:
            self._stream(request, text)

    def _stream(self, request: Request, text: str, is_finished: bool = False, reason: str | None = None,
                metrics: dict | None = None) -> None:
        new_ids = request.output_ids[request.num_streamed:]
        request.num_streamed = len(request.output_ids)
        if new_ids or text or is_finished:
            self.outputs.append((request.client_id, GenerateOutput(
                request.request_id, new_ids, text, is_finished, reason, metrics, len(request.prompt_ids))))

    def _finish(self, request: Request, reason: str, text: str = "") -> None:
        now = self.clock()
        metrics = {
            "ttft_s": None if request.first_token_s is None else request.first_token_s - request.arrival_s,
            "e2e_s": now - request.arrival_s,
            "num_prompt_tokens": len(request.prompt_ids),
            "num_output_tokens": len(request.output_ids),
            "num_drafted": request.num_drafted,
            "num_accepted": request.num_accepted,
            "num_steps": request.num_steps,
        }
        self._stream(request, text, True, reason, metrics)
        self._drop(request, reason)

    def _drop(self, request: Request, reason: str) -> None:
        """Forget a finished request; its workers free its slots with their next job."""
        self.requests.pop(request.request_id, None)
        request.finish_reason = reason
        self.metrics.add_finished(reason)
        if request in self.waiting:
            self.waiting.remove(request)
        for batch in self.batches:
            if request in batch.requests:
                batch.requests.remove(request)
                for role in (DRAFTER, VERIFIER):
                    if request.num_sent[role]:
                        self.release[role].append(request.request_id)

    def _error(self, client_id: bytes, request_id: str | None, code: str, message: str) -> None:
        self.outputs.append((client_id, ErrorOutput(request_id, code, message)))

    def status(self, is_detailed: bool = False) -> dict:
        status = {
            "mode": "auto" if self.is_auto else self.mode,
            "num_draft": self.num_draft,
            "extra_draft": self.extra_draft,
            "max_batch": self.max_batch,
            "num_waiting": len(self.waiting),
            "num_running": sum(len(b.requests) for b in self.batches),
            "batch_sizes": [len(b.requests) for b in self.batches],
            "batch_states": [b.state for b in self.batches],
        }
        status.update(self.metrics.summary(is_detailed))
        if self.budget is not None:
            status["draft_budget"] = self.budget.to_dict()
        if self.chooser is not None:
            status["plan"] = {**self.chooser.to_dict(), "placement": dict(self.placement_changes)}
        return status
