"""Step policies: what one mode does at a step boundary. `ar`, `sd` and `psd` are each a small,
stateless object with the same interface: which batches the mode steps, which batch gets the
next draft or verify job (admitting waiting requests into it), when a step starts, and where its
period is timed. The scheduler core (runtime/scheduler.py) asks the policy of the plan in force
and never tests a mode's name; `auto` changes the plan (runtime/plans.py), and with it the policy,
at step boundaries. Pure Python, no IO.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import ClassVar, Protocol

from minedraft.common.protocol import DRAFTER, VERIFIER
from minedraft.common.request import Request

# A batch's states: ready -> drafting -> drafted -> verifying -> ready (ar: ready -> verifying -> ready)
READY, DRAFTING, DRAFTED, VERIFYING = "ready", "drafting", "drafted", "verifying"
ONE_BATCH_LIVE = 2  # psd with pre-drafting holds this many live requests or fewer in one batch


@dataclass(eq=False)
class Batch:
    batch_id: int
    requests: list[Request] = field(default_factory=list)
    state: str = READY
    rows: list[Request] = field(default_factory=list)  # the current job's rows, in buffer order
    is_steady: bool = False  # the current job feeds no prompt or long catch-up: its time fits the cost model
    job_size: tuple[int, int] = (0, 0)  # draft: (rows drafting, depth); verify: (rows, positions)
    dispatch_s: float = 0.0  # when the current job was sent (scheduler clock)
    budget: object | None = None  # the draft budget's StepBudget for the current step
    job_plan: object | None = None  # the ExecPlan in force when the current job was sent
    draft_id: int | None = None  # the batch's latest draft job (frames transport: names its drafts)


class Core(Protocol):
    """What a policy reads and changes of the scheduler core."""

    batches: list[Batch]
    waiting: deque[Request]
    is_busy: dict[str, bool]
    max_batch: int  # requests per batch in psd (the workers' caches)
    max_rows: int  # requests in the one batch of a one-batch mode
    max_live: int
    last_drafted: int
    predraft: bool  # the drafter drafts ahead while the verifier checks its batch


class StepPolicy:
    mode: ClassVar[str] = ""
    drafts: ClassVar[bool] = True  # the drafter gets jobs
    paces_at_draft: ClassVar[bool] = False  # a step is timed from one draft dispatch to the next (sd) ...
    paces_at_verify: ClassVar[bool] = False  # ... or from one verify of drafts to the next (psd); ar: plain verifies

    def active(self, core: Core) -> list[Batch]:
        """The batches this mode steps (one; psd both, unless its load is light)."""
        return core.batches[:1]

    def batch_limit(self, core: Core) -> int:
        return core.max_rows

    def settle(self, core: Core) -> None:
        """One-batch modes after psd: once both batches are between steps, the second one's
        requests join the first. Slots belong to requests, so nothing is rebuilt."""
        if len(core.batches) == 2:
            first, second = core.batches
            if second.requests and first.state == READY and second.state == READY:
                first.requests.extend(second.requests)
                second.requests.clear()

    def rebalance(self, core: Core, batch: Batch) -> None:
        """Move requests between batches before `batch` is drafted (psd only)."""

    def admit(self, core: Core, batch: Batch) -> None:
        """Waiting requests join the batch stepped next, keeping the active batches balanced."""
        num_live = sum(len(b.requests) for b in core.batches)
        target = -(-(num_live + len(core.waiting)) // len(self.active(core)))  # ceil: this batch's share
        limit = min(target, self.batch_limit(core))
        while core.waiting and len(batch.requests) < limit and num_live < core.max_live:
            batch.requests.append(core.waiting.popleft())
            num_live += 1

    def batch_to_draft(self, core: Core) -> Batch | None:
        self.settle(core)
        candidates = [b for b in self.active(core) if b.state == READY and (b.requests or core.waiting)]
        if not candidates:
            return None
        # Alternate: prefer the batch not drafted last (two ready batches only at start-up).
        candidates.sort(key=lambda b: b.batch_id == core.last_drafted)
        batch = candidates[0]
        self.rebalance(core, batch)
        self.admit(core, batch)
        return batch if batch.requests else None

    def batch_to_verify(self, core: Core) -> Batch | None:
        """A batch to verify without drafts (drafted batches are verified first, in every mode)."""
        return None

    def is_step_start(self, core: Core) -> bool:
        """Whether the worker that paces this mode is about to start a step."""
        return not core.is_busy[DRAFTER] and any(
            b.state == READY and (b.requests or core.waiting) for b in self.active(core))


class ArPolicy(StepPolicy):
    """Plain decoding: the verifier steps one batch; no drafts."""

    mode = "ar"
    drafts = False

    def batch_to_draft(self, core: Core) -> Batch | None:
        return None

    def batch_to_verify(self, core: Core) -> Batch | None:
        self.settle(core)
        batch = core.batches[0]
        if batch.state == READY:
            self.admit(core, batch)
            if batch.requests:
                return batch
        return None

    def is_step_start(self, core: Core) -> bool:
        first = core.batches[0]
        has_work = first.requests or core.waiting or any(b.requests for b in core.batches[1:])
        return not core.is_busy[VERIFIER] and first.state == READY and bool(has_work) \
            and not any(b.state == DRAFTED for b in core.batches)


class SdPolicy(StepPolicy):
    """Speculative decoding on one batch: draft, then verify, in turn."""

    mode = "sd"
    paces_at_draft = True


class PsdPolicy(StepPolicy):
    """Parallel speculative decoding: two batches, one drafted while the other is verified.

    At a light load (ONE_BATCH_LIVE live requests or fewer) with pre-drafting on, psd steps one
    batch instead: one verify checks every request, reading the target's weights once for all
    of them (on the 2-core development machine a verify of two rows took 1.4x one of a single
    row, where two verifies take 2x), and the drafter's wait during it is filled by
    pre-drafting the batch's next step. Split into batches of one, each verify would check one
    request and pre-drafting would have nothing to do (each batch is drafted while the other is
    verified): at c = 2 it measured 1.08x and 1.09x psd without pre-drafting (two batches), where
    two batches with pre-drafting had measured 0.95x to 1.08x (docs/performance.md)."""

    mode = "psd"
    paces_at_verify = True

    def is_one_batch(self, core: Core) -> bool:
        num_live = sum(len(b.requests) for b in core.batches) + len(core.waiting)
        return core.predraft and num_live <= min(ONE_BATCH_LIVE, core.max_batch)

    def active(self, core: Core) -> list[Batch]:
        return core.batches[:1] if self.is_one_batch(core) else core.batches

    def batch_limit(self, core: Core) -> int:
        return core.max_batch

    def settle(self, core: Core) -> None:
        if self.is_one_batch(core):
            super().settle(core)

    def batch_to_draft(self, core: Core) -> Batch | None:
        if self.is_one_batch(core) and any(b.state != READY and b.requests for b in core.batches[1:]):
            return None  # the second batch joins the first once its step is done (settle)
        return super().batch_to_draft(core)

    def rebalance(self, core: Core, batch: Batch) -> None:
        """After aborts and finishes, move requests from this batch (between steps, holding no
        drafts) to the other one so the two stay within one request of each other. Slots belong
        to requests, not batches, so a move costs nothing. Not at a light load: one batch then."""
        if self.is_one_batch(core):
            return
        other = core.batches[1 - batch.batch_id]
        while len(batch.requests) > len(other.requests) + 1 and len(other.requests) < core.max_batch:
            other.requests.append(batch.requests.pop())


POLICIES: dict[str, StepPolicy] = {p.mode: p for p in (ArPolicy(), SdPolicy(), PsdPolicy())}
