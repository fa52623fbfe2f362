"""The scheduler core: every request's lifecycle and authoritative tokens, the two batches, job
dispatch, stop conditions, outputs and metrics. Pure Python, no IO and no torch: the process
wrapper (runtime/server.py) feeds it messages and sends what it returns; tests drive it directly.

What a mode does at a step boundary is its step policy's (runtime/policies.py); which plan is in
force, and so which policy, is the planner's (runtime/plans.py: one fixed plan, or auto's
chooser): the planner's `current` plan is the one holder of the mode in force. A request is one
record (common/request.py) from its message to its end.
"""

from __future__ import annotations

import secrets
import time
from collections import deque
from itertools import islice

from minedraft.common.config import Config, cpu_pool, workers_share_a_device
from minedraft.common.protocol import (
    DRAFTER, VERIFIER, DraftJob, DraftResult, ErrorOutput, GenerateOutput, GenerateRequest, PrefillJob,
    PrefillResult, SamplingParams, VerifyJob, VerifyResult,
)
from minedraft.common.request import Request
from minedraft.runtime.validation import validate_generate
from minedraft.runtime.budget import FitKey, make_budget
from minedraft.runtime import calibration as cal
from minedraft.runtime.metrics import Metrics
from minedraft.runtime.plans import ExecPlan, make_planner
from minedraft.runtime.policies import (
    DRAFTED, DRAFTING, ONE_BATCH_LIVE, POLICIES, READY, VERIFYING, Batch, StepPolicy,
)
from minedraft.runtime.tokenizer import Detokenizer

MIN_PREFILL_TOKENS = 8  # shorter prompts are not worth a separate verifier job


class SchedulerCore:
    def __init__(self, config: Config, tokenizer, vocab_size: int, max_len: int, eos_token_ids: list[int],
                 clock=time.monotonic, max_batch: int | None = None):
        """max_batch: requests per batch, as the workers' caches hold it (None: scheduler.max_batch)."""
        sc = config.scheduler
        self.num_draft = sc.num_draft if sc.speculates else 0
        self.extra_draft = sc.extra_draft if sc.speculates else 0
        self.max_depth = self.num_draft + self.extra_draft
        self.budget = make_budget(sc)  # None in ar
        self.chooser = make_planner(sc, cpu_pool(config), self.budget)  # the plan in force: chooser.current
        self.is_learning = self.budget is not None and self.budget.is_predicting
        self.prefill_ahead = sc.prefill_ahead and sc.speculates
        # Pre-drafting needs hardware of the drafter's own beside the verifier's: plans that
        # place each job (auto's on CPUs: a split plan gives each worker its half, a wide one
        # turns it off per job) have it; else the configured cores or devices say.
        self.predraft_off_reason: str | None = None
        if not sc.predraft or not sc.speculates:
            self.predraft_off_reason = "off in the config" if sc.speculates else "no drafter (ar)"
        elif not self.chooser.current.verifier.is_set and workers_share_a_device(config):
            self.predraft_off_reason = ("the drafter and the verifier share cores or a device: a pre-draft "
                                        "would run on the verifier's")
        self.predraft = self.predraft_off_reason is None
        self.verify_s: dict[int, float] = {}  # verify positions -> running mean of a steady verify's time (pre-drafting's window)
        self.max_batch = max_batch or sc.max_batch
        assert self.max_batch >= 1, "scheduler.max_batch = 0 is resolved by the workers (ReadyResult.max_batch)"
        self.max_rows = sc.max_rows(self.max_batch)  # one batch's limit in one-batch plans (auto: both of psd's batches)
        self.max_live = self.max_batch * sc.num_batches
        if self.predraft:  # psd's light loads run one batch (PsdPolicy.is_one_batch): auto forecasts them so
            self.chooser.one_batch_rows = min(ONE_BATCH_LIVE, self.max_batch)
        self.wide_role: str | None = None  # the worker running a job on every core: the other waits
        self.placement_changes = {"num_switches": 0, "total_s": 0.0, "max_s": 0.0}  # workers' thread/core changes
        self.max_queued = sc.max_queued_requests
        self.max_tokens_cap = sc.max_tokens_cap
        self.max_len = min(max_len, sc.max_len)
        self.vocab_size = vocab_size
        self.eos_token_ids = frozenset(eos_token_ids)
        self.tokenizer = tokenizer
        self.clock = clock
        self.batches = [Batch(b) for b in range(sc.num_batches)]
        self.waiting: deque[Request] = deque()
        self.held: deque[Request] = deque()  # user requests that arrived during the calibration
        self.calibration: cal.Calibration | None = None  # auto's calibration at start (runtime/calibration.py)
        self.requests: dict[str, Request] = {}  # waiting and running
        self.is_busy = {DRAFTER: False, VERIFIER: False}
        self.release: dict[str, list[str]] = {DRAFTER: [], VERIFIER: []}
        self.outputs: list[tuple[bytes, object]] = []
        self.metrics = Metrics(clock)
        self.last_drafted = -1
        self.num_draft_jobs = 0  # numbers each draft job (its draft_id)
        self.last_step_s: float | None = None  # dispatch time of the previous step's pacing job
        self.drafter_spans: deque[tuple[float, float | None]] = deque(maxlen=8)  # dispatch, result (scheduler clock)

    @property
    def plan(self) -> ExecPlan:
        """The plan in force (mode and, on CPU devices in auto, each worker's cores)."""
        return self.chooser.current

    @property
    def policy(self) -> StepPolicy:
        return POLICIES[self.chooser.current.mode]

    @property
    def mode(self) -> str:
        """The mode in force (status and metrics)."""
        return self.chooser.current.mode

    @property
    def num_live(self) -> int:
        """Requests waiting or running."""
        return len(self.requests)

    def has_request(self, request_id: str) -> bool:
        return request_id in self.requests

    # --- requests ---------------------------------------------------------------------------

    def add_request(self, client_id: bytes, message: GenerateRequest) -> None:
        """A new request. Its message is validated here, once, against this runtime's limits;
        the caller (runtime/server.py) has checked that its id is not in use."""
        assert message.request_id not in self.requests, "request ids are checked by the server"
        error = validate_generate(message, self)
        if error is not None:
            return self._error(client_id, message.request_id, "invalid_request", error)
        if len(self.waiting) + len(self.held) >= self.max_queued:
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
            message.request_id, prompt_ids, message.max_tokens,
            SamplingParams(message.temperature, message.top_k, message.top_p, seed), frozenset(stop_ids),
            message.min_tokens, client_id, Detokenizer(self.tokenizer, message.stop, message.min_tokens), self.clock(),
        )
        self.requests[request.request_id] = request
        (self.held if self.is_calibrating else self.waiting).append(request)

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
        if self.is_calibrating:  # its requests die with the workers: serve uncalibrated
            self._end_calibration(f"the workers failed during it ({message})")
        for request in list(self.requests.values()):
            self._error(request.client_id, request.request_id, code, message)
            self._drop(request, "error")

    def abort_every(self, reason: str) -> int:
        """Finish every live request with `reason` (shutdown); returns how many."""
        request_ids = list(self.requests)
        for request_id in request_ids:
            self.abort(request_id, reason)
        return len(request_ids)

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
        if self.wide_role is None and self.policy.is_step_start(self):
            self._choose_plan()
        policy = self.policy
        if policy.drafts and not self.is_busy[DRAFTER] and self.wide_role is None:
            batch = policy.batch_to_draft(self)
            if batch is not None:
                jobs.append((DRAFTER, self._draft_job(batch)))
        if not self.is_busy[VERIFIER] and self.wide_role is None:
            drafted = [b for b in self.batches if b.state == DRAFTED]  # drafted before a switch to ar too
            batch = drafted[0] if drafted else policy.batch_to_verify(self)
            job = self._verify_job(batch) if batch is not None else None
            if job is None and self.prefill_ahead:
                job = self._prefill_job()
            if job is not None:
                jobs.append((VERIFIER, job))
        return jobs

    def on_draft_result(self, result: DraftResult) -> None:
        batch = self.batches[result.batch_id]
        assert batch.state == DRAFTING, f"batch_id={batch.batch_id} draft result in state {batch.state}"
        assert len(result.num_kept) in (0, len(batch.rows)), "draft result rows != job rows"
        self._job_done(DRAFTER, result)
        if self.drafter_spans and self.drafter_spans[-1][1] is None:
            self.drafter_spans[-1] = (self.drafter_spans[-1][0], self.clock())
        self.metrics.add_busy(DRAFTER, result.busy_start_s, result.busy_end_s, job={
            "kind": "draft", "batch": batch.batch_id, "rows": batch.job_size[0], "depth": batch.job_size[1],
            "positions": sum(len(s) for s in result.scores), "kept": sum(result.num_kept),
            "threads": result.num_threads, "cores": result.cpu_cores, "mode": self.mode})
        batch.state = DRAFTED
        self.metrics.add_draft_tokens(sum(len(s) for s in result.scores))
        if result.predraft_hits:
            self.metrics.add_predraft_rows(result.predraft_hits, result.num_served, result.saved_s)
            for request, served in zip(batch.rows, result.num_served):
                request.num_predraft_hits += served > 0
        if result.predraft_forwards:
            self.metrics.add_predraft_job(result.predraft_start_s, result.predraft_end_s, result.predraft_tokens, {
                "kind": "predraft", "batch": batch.batch_id, "rows": None, "depth": result.predraft_forwards,
                "positions": result.predraft_tokens, "kept": None, "mode": self.mode})
        for request, kept in zip(batch.rows, result.num_kept):
            request.num_draft = kept  # TETRIS may keep fewer than were drafted
        if self.is_learning:
            if batch.is_steady:
                # Dispatch to result on our clock: the worker's time plus what each step costs around it.
                self.budget.observe_draft(*batch.job_size, self.clock() - batch.dispatch_s, self._fit_key(batch, result))
                if self.is_calibrating:
                    self.calibration.on_job("draft", batch.job_plan)
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
        assert batch.state == VERIFYING, f"batch_id={batch.batch_id} verify result in state {batch.state}"
        assert len(result.emitted) == len(batch.rows), "verify result rows != job rows"
        self._job_done(VERIFIER, result)
        self.metrics.num_draft_frame_bytes += result.draft_frame_bytes
        self.metrics.add_busy(VERIFIER, result.busy_start_s, result.busy_end_s, job={
            "kind": "verify", "batch": batch.batch_id, "rows": batch.job_size[0], "positions": batch.job_size[1],
            "threads": result.num_threads, "cores": result.cpu_cores, "mode": self.mode})
        batch.state = READY
        if batch.is_steady and batch.draft_id is not None and batch.job_size[1] > batch.job_size[0]:
            positions, took = batch.job_size[1], self.clock() - batch.dispatch_s
            before = self.verify_s.get(positions)
            self.verify_s[positions] = took if before is None else 0.8 * before + 0.2 * took
        if self.is_learning and batch.is_steady:
            now = self.clock()
            overlap = sum(max(0.0, min(now, end if end is not None else now) - max(batch.dispatch_s, start))
                          for start, end in self.drafter_spans)
            key = self._fit_key(batch, result)
            self.budget.observe_verify(batch.job_size[1], now - batch.dispatch_s, overlap, key)
            self.chooser.note_positions(key, batch.job_size[1])
            if self.is_calibrating:
                self.calibration.on_job("verify", batch.job_plan)
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

    def _draft_job(self, batch: Batch) -> DraftJob:
        self.is_busy[DRAFTER] = True
        self.last_drafted = batch.batch_id
        batch.state = DRAFTING
        if self.is_learning and self.policy.paces_at_draft:  # one batch: the step is draft dispatch to draft dispatch
            self._observe_step(batch)
        budget = self.budget.plan([r.room(self.max_len) for r in batch.requests], self.plan.fit_key)
        placement = self._placement(DRAFTER)
        batch.budget = budget
        self._start_step(batch, budget.depth)
        drafting = [r for r in batch.rows if r.num_draft > 0]
        batch.job_size = (len(drafting), max((r.num_draft for r in drafting), default=0))
        batch.is_steady = self._is_steady(batch.rows, DRAFTER)
        batch.job_plan = self.plan
        batch.dispatch_s = self.clock()
        self.drafter_spans.append((batch.dispatch_s, None))
        rows = [r.row(DRAFTER) for r in batch.rows]
        self.num_draft_jobs += 1
        batch.draft_id = self.num_draft_jobs
        return DraftJob(batch.batch_id, rows, self._take_release(DRAFTER), budget.capacity, *placement,
                        draft_id=batch.draft_id, predraft_s=self._predraft_window(batch))

    def _predraft_window(self, batch: Batch) -> float | None:
        """Pre-drafting (None: off for this job): the seconds the drafter may draft on after
        its result, the time the verify of these drafts is measured to take. Only where the
        drafter would otherwise wait for that verify (no other batch to draft) and has cores
        of its own (not a wide plan, whose jobs take every core in turn)."""
        if not self.predraft or self.plan.is_wide or any(b.requests for b in self.batches if b is not batch):
            return None
        if not self.verify_s:
            return 0.0  # chains kept, nothing drafted on until a verify of drafts has been timed
        positions = sum(1 + r.num_draft for r in batch.rows)
        nearest = min(self.verify_s, key=lambda p: (abs(p - positions), p))
        return self.verify_s[nearest] * positions / nearest if nearest > positions else self.verify_s[nearest]

    def _verify_job(self, batch: Batch) -> VerifyJob | None:
        is_plain_step = batch.state == READY  # no drafts (ar); else the batch was drafted
        if is_plain_step:
            self._start_step(batch, 0)
        else:  # requests aborted since their draft are dropped; the others keep their buffer rows
            batch.rows = [r for r in batch.rows if r.finish_reason is None]
        if not batch.rows:  # every row was aborted after its draft
            batch.state = READY
            return None
        self.is_busy[VERIFIER] = True
        batch.state = VERIFYING
        batch.job_size = (len(batch.rows), sum(1 + r.num_draft for r in batch.rows))
        batch.is_steady = self._is_steady(batch.rows, VERIFIER)
        batch.job_plan = self.plan
        batch.dispatch_s = self.clock()
        if is_plain_step and self.is_learning:  # the forecast that the step's overhead is measured against
            key = self.plan.fit_key
            batch.budget = self.budget.predict([0] * len(batch.rows), key) if self.budget.is_fitted(key) else None
        if self.is_learning and (self.policy.paces_at_verify or is_plain_step):  # the verifier paces psd and ar
            self._observe_step(batch)
        placement = self._placement(VERIFIER)
        return VerifyJob(batch.batch_id, [r.row(VERIFIER) for r in batch.rows], self._take_release(VERIFIER),
                         *placement, draft_id=None if is_plain_step else batch.draft_id)

    def _prefill_job(self) -> PrefillJob | None:
        """The prompts of requests being drafted that the verifier has not seen yet: it caches
        them while the drafter works, instead of after (the verify would feed them anyway)."""
        rows = [r for b in self.batches if b.state == DRAFTING for r in b.rows
                if r.num_sent[VERIFIER] == 0 and r.finish_reason is None and r.num_tokens >= MIN_PREFILL_TOKENS]
        if not rows:
            return None
        self.is_busy[VERIFIER] = True
        return PrefillJob([r.row(VERIFIER) for r in rows], self._take_release(VERIFIER), *self._placement(VERIFIER))

    def _start_step(self, batch: Batch, num_draft: int) -> None:
        batch.rows = list(batch.requests)
        for i, request in enumerate(batch.rows):
            request.num_draft = min(num_draft, request.room(self.max_len))
            request.draft_scores = []
            request.buffer_row = i

    # --- plans ------------------------------------------------------------------------------

    def _choose_plan(self) -> None:
        if self.is_calibrating:
            self.calibration.num_steps += 1
            if self.calibration.is_phase_done():
                self._next_phase()
        before = self.policy
        self.chooser.note_progress(self.clock(), self.metrics.num_output_tokens)
        self.chooser.choose(self._live_rooms)
        if self.policy is not before:
            self.last_step_s = None  # the next period is the new mode's

    def _live_rooms(self) -> list[int]:
        """The rooms of the requests the next step serves: the running ones and as many waiting
        ones as fit."""
        live = [r for b in self.batches for r in b.requests]
        live += islice(self.waiting, max(0, self.max_live - len(live)))
        return [r.room(self.max_len) for r in live]

    # --- calibration (auto: runtime/calibration.py) ----------------------------------------------

    @property
    def is_calibrating(self) -> bool:
        return self.calibration is not None and self.calibration.is_running

    def start_calibration(self) -> None:
        """Run auto's calibration load before serving anyone: every plan at every batch size,
        a few steady steps each (the server calls this at a first start without a cached one)."""
        assert self.chooser.can_calibrate and self.budget is not None, "calibration is auto's"
        phases = cal.schedule(self.chooser.plans, self.max_live, self.max_rows, self.max_batch)
        self.calibration = cal.Calibration(phases, self.clock())
        self._next_phase()

    def load_calibration(self, data: dict, measured_s: float | None = None) -> None:
        """Seed auto's fits from a cached calibration (runtime/calibration.read_cache), which
        took measured_s to measure."""
        assert self.chooser.can_calibrate and self.budget is not None, "calibration is auto's"
        self.budget.load_calibration(data)
        self.chooser.is_calibrated = True
        now = self.clock()
        self.calibration = cal.Calibration([], now, state="done", source="cache", ended_s=now, measured_s=measured_s)

    def _next_phase(self) -> None:
        """At a step boundary: the next phase's plan, with its number of calibration requests
        (the extra ones finish, missing ones are added)."""
        calibration = self.calibration
        phase = calibration.advance()
        if phase is None:
            return self._end_calibration()
        self.chooser.pinned = phase.plan
        live = [r for b in self.batches for r in b.requests] + list(self.waiting)
        for request in live[phase.rows:]:
            self._finish(request, "calibration")
        for _ in range(phase.rows - len(live)):
            calibration.num_prompts += 1
            ids = cal.prompt_ids(self.tokenizer, calibration.num_prompts - 1)
            self.waiting.append(Request(f"calibration-{calibration.num_prompts}", ids, self.max_len - len(ids),
                                        client_id=None, arrival_s=self.clock()))

    def _end_calibration(self, failure: str | None = None) -> None:
        """The calibration is over (or failed: `failure` says why, and auto goes on
        uncalibrated, exploring as it serves): its requests finish, its jobs become the fits'
        calibrated observations, the metrics start from zero, and the held requests are served."""
        calibration = self.calibration
        for request in [r for b in self.batches for r in b.requests] + list(self.waiting):
            if request.client_id is None:
                self._finish(request, "calibration")
        calibration.ended_s = self.clock()
        calibration.measured_s = calibration.ended_s - calibration.started_s
        calibration.steps_by_plan = dict(self.chooser.steps_by_plan)
        if failure is None:
            calibration.state = "done"
            self.budget.freeze_calibration()
            self.chooser.is_calibrated = True
        else:
            calibration.state, calibration.reason = "failed", failure
        self.chooser.pinned = None
        self.chooser.reason = "start"  # the first user step re-plans (a load jump from none)
        self.chooser.reset_counters()
        self.metrics = Metrics(self.clock)
        self.waiting.extend(self.held)
        self.held.clear()
        self.last_step_s = None

    def _placement(self, role: str) -> tuple[int | None, list[int] | None]:
        """(num_threads, cpu_cores) for the next job of `role`: none outside auto plans on CPU
        devices. A wide plan's job takes every core only while the other worker is idle (and
        holds it off until done); else it runs on its half, as psd's jobs do."""
        plan = self.plan
        placement = plan.placement(role)
        if not placement.is_set:
            return None, None
        if plan.is_wide:
            other = VERIFIER if role == DRAFTER else DRAFTER
            if self.is_busy[other]:
                placement = self.chooser.plans[0].placement(role)
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

    def _fit_key(self, batch: Batch, result) -> FitKey:
        """The cost fit a job's time feeds: the plan it was dispatched in and, where the plan
        places jobs on cores, the threads the job actually ran with."""
        key = batch.job_plan.fit_key
        if not batch.job_plan.verifier.is_set:
            return key
        return FitKey(key.mode, result.num_threads, result.num_threads)

    def _observe_step(self, batch: Batch) -> None:
        now = self.clock()
        if self.last_step_s is not None and batch.budget is not None:
            self.budget.observe_step(now - self.last_step_s, batch.budget, self.mode)
        self.last_step_s = now

    def _is_steady(self, rows: list[Request], role: str) -> bool:
        """True when no row feeds more than a step's worth of committed tokens (a prompt, or a
        catch-up after steps without drafting), so the job's time is a decode step's time."""
        return all(0 < r.num_sent[role] and r.num_tokens - r.num_sent[role] <= self.max_depth + 1 for r in rows)

    def _take_release(self, role: str) -> list[str]:
        release, self.release[role] = self.release[role], []
        return release

    # --- outputs ----------------------------------------------------------------------------

    def _commit(self, request: Request, tokens: list[int]) -> None:
        if request.first_token_s is None:
            request.first_token_s = self.clock()
        num_before = len(request.output_ids)
        reason = request.commit(tokens)
        self.metrics.add_output_tokens(len(request.output_ids) - num_before)
        text, is_stop_string = "", False
        if request.detokenizer is not None:  # none for the calibration's own requests
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
        if request.client_id is None:  # the calibration's own: nobody to tell
            return
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
            "num_predrafted_steps": request.num_predraft_hits,
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
        if request in self.held:
            self.held.remove(request)
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
            "mode": self.chooser.configured_mode,
            "num_draft": self.num_draft,
            "extra_draft": self.extra_draft,
            "max_batch": self.max_batch,
            "num_waiting": len(self.held) + sum(r.client_id is not None for r in self.waiting),
            "num_running": sum(len(b.requests) for b in self.batches),
            "batch_sizes": [len(b.requests) for b in self.batches],
            "batch_states": [b.state for b in self.batches],
        }
        status.update(self.metrics.summary(is_detailed))
        status["predraft"].update(is_on=self.predraft, off_reason=self.predraft_off_reason)
        if self.budget is not None:
            status["draft_budget"] = self.budget.to_dict(self.plan.fit_key)
        plan = self.chooser.to_dict()
        if plan is not None:
            status["plan"] = {**plan, "placement": dict(self.placement_changes)}
        if self.calibration is not None:
            status["calibration"] = self.calibration.to_dict(self.clock())
        return status
