"""Auto plans (scheduler.mode = "auto"): which mode serves the live requests (plain decoding,
SD with one batch, PSD with two) and, on CPU devices, how many cores each worker uses for its
next job, chosen at step boundaries from the draft budget's measured costs (runtime/budget.py).

Why: on a GPU the target's forward is memory-bound far out, and PSD's dedicated drafter device
pays; on a CPU the cores are fungible and a verify over many positions is compute-bound, so at
high load one batch on every core (or no speculation at all) can win. Where the crossing points
sit depends on the hardware; the runtime measures it instead of asking the user.

Candidates on CPU devices, from the pool of the two workers' configured cores (N of them):
  ar split  verifier on its half of the cores        ar wide  verifier on all N
  sd split  each worker on its half                  sd wide  each worker on all N, in turn
  psd       drafter on one half, verifier on the other (they overlap by design)
A "wide" job takes every core only while the other worker is idle, and while it runs the other
worker gets no job, so cores are never oversubscribed. On CUDA devices the candidates are ar, sd
and psd, and no job carries threads.

A fixed mode is a planner too (FixedPlan: one plan, never changed), so the scheduler core
always asks its planner at a step boundary and never tests which kind it has; the planner's
`current` plan is the one holder of the mode in force. What each mode does with a step is its
step policy's (runtime/policies.py).

Pure Python, no IO: the scheduler core asks for the plan each step (the pool of cores comes from
common/config.cpu_pool).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from minedraft.common.config import core_splits
from minedraft.common.protocol import DRAFTER
from minedraft.runtime.budget import DraftBudget, FitKey

SWITCH_MARGIN = 0.08  # another plan must be predicted this much faster ...
CONFIRM_STEPS = 3  # ... for this many steps in a row ...
MIN_DWELL_STEPS = 6  # ... and the plan in force must have run this many steps (its fits refreshed)
FAST_MARGIN = 0.25  # a plan predicted this much faster is taken at once (a load change) ...
FAST_DWELL_STEPS = 2  # ... once the plan in force has run this many steps
EXPLORE_STEPS = 4  # steps an unfitted plan runs to give its fits their first jobs
EXTRAPOLATION = 1.5  # a fit asked for more than this times the positions it has seen is re-probed ...
REPROBE_MARGIN = 0.6  # ... when its plan's forecast is at least this share of the plan in force's
LOAD_JUMP = 1.5  # live requests this many times the load the plan was last chosen for: re-plan at once
RATE_WINDOW = 8  # step boundaries the measured rate of the plan in force spans


@dataclass(frozen=True)
class Placement:
    """Threads and cores a worker uses for a job; num_threads 0 = the device's own (CUDA)."""

    num_threads: int = 0
    cpu_cores: tuple[int, ...] = ()

    @property
    def is_set(self) -> bool:
        return self.num_threads > 0


@dataclass(frozen=True)
class ExecPlan:
    mode: str  # ar | sd | psd
    drafter: Placement = field(default_factory=Placement)
    verifier: Placement = field(default_factory=Placement)
    is_wide: bool = False  # each job takes every core, one worker at a time

    @property
    def name(self) -> str:
        if not self.verifier.is_set:
            return self.mode
        if self.mode == "psd":
            return f"psd {self.drafter.num_threads}+{self.verifier.num_threads}"
        threads = self.verifier.num_threads
        return f"{self.mode} x{threads}"

    @property
    def threads(self) -> tuple[int, int]:
        """The keys of the cost fits this plan's jobs feed and use."""
        return self.drafter.num_threads, self.verifier.num_threads

    @property
    def num_batches(self) -> int:
        return 2 if self.mode == "psd" else 1

    @property
    def fit_key(self) -> FitKey:
        return FitKey(self.mode, *self.threads)

    def placement(self, role: str) -> Placement:
        return self.drafter if role == DRAFTER else self.verifier


class FixedPlan:
    """The planner of a fixed mode (ar, sd or psd): one plan, never changed, no placements."""

    def __init__(self, mode: str):
        self.current = ExecPlan(mode)
        self.plans = [self.current]
        self.configured_mode = mode
        self.can_calibrate = False  # one plan: nothing to choose between

    def choose(self, live_rooms: Callable[[], list[int]]) -> ExecPlan:
        return self.current

    def note_positions(self, key: FitKey, positions: int) -> None:
        pass

    def note_progress(self, now_s: float, num_tokens: int) -> None:
        pass

    def to_dict(self) -> dict | None:
        return None


def make_planner(scheduler, cpu_cores: list[int] | None, budget: DraftBudget | None):
    """scheduler: the config's scheduler section. auto: a PlanChooser over every candidate plan
    (`cpu_cores`: the pool the workers share, None on GPUs); else the fixed mode's FixedPlan."""
    if scheduler.is_auto:
        return PlanChooser(candidate_plans(cpu_cores), budget, scheduler.plan_rotate_steps)
    return FixedPlan(scheduler.mode)


def candidate_plans(cpu_cores: list[int] | None) -> list[ExecPlan]:
    """Every plan auto may choose: on CPU devices (`cpu_cores`: the pool the workers share) by
    mode and core split, else (None) by mode only. The first is the one auto starts with before
    its first step (calibrated, it then takes the plan forecast best; uncalibrated, it explores)."""
    if cpu_cores is None:
        return [ExecPlan("psd"), ExecPlan("sd"), ExecPlan("ar")]
    drafter_cores, verifier_cores, pool = core_splits(cpu_cores)
    drafter_half = Placement(len(drafter_cores), drafter_cores)
    verifier_half = Placement(len(verifier_cores), verifier_cores)
    wide = Placement(len(pool), pool)
    plans = [ExecPlan("psd", drafter_half, verifier_half), ExecPlan("sd", drafter_half, verifier_half),
             ExecPlan("ar", drafter_half, verifier_half)]
    if len(pool) > 1:
        plans += [ExecPlan("sd", wide, wide, True), ExecPlan("ar", wide, wide, True)]
    return plans


class PlanChooser:
    """Picks the plan each step: the fastest predicted at the current load, switching only when
    another is clearly faster for several steps (hysteresis) and the plan in force has run a
    while, or at once when the load jumps (a wave of requests arrives: LOAD_JUMP times the live
    requests the plan was last chosen for, so a wave that reaches the scheduler over several
    steps re-plans at each jump of it). Calibrated (runtime/calibration.py: every plan's
    fits seeded at start, on this machine), it starts in the plan forecast best and never
    explores; without a calibration, plans whose fits have no jobs yet are run briefly first, so
    that every prediction rests on measured costs."""

    def __init__(self, plans: list[ExecPlan], budget: DraftBudget, rotate_steps: int = 0):
        self.plans = plans
        self.rotate_steps = rotate_steps  # > 0: every plan in turn, this many steps each (tests, diagnosis)
        self.budget = budget
        self.current = plans[0]
        self.reason = "start"  # start | explore | best | load | reprobe | kept | rotate | calibrate
        self.is_calibrated = False  # every plan's fits were seeded at start: no exploration
        self.pinned: ExecPlan | None = None  # the calibration's plan of the moment (runtime/calibration.py)
        self.steps_in_plan = 0
        self.num_switches = 0
        self.challenger: ExecPlan | None = None
        self.num_confirm = 0
        self.forecast: dict[str, float] = {}  # plan name -> predicted tokens/s at the last decision
        self.seen_positions: dict[tuple[int, bool], float] = {}  # verify fit key -> most positions observed
        self.steps_by_plan: dict[str, int] = {}
        self.num_steps = 0
        self.num_rows = 0  # live requests at the last decision
        self.settled_rows = 0  # live requests when the plan was last chosen for a load (a jump or a switch)
        self.progress: deque[tuple[float, int]] = deque(maxlen=RATE_WINDOW + 1)  # (time, tokens) in the plan in force
        self.switches: deque[dict] = deque(maxlen=32)  # recent switches: step, load, plan, reason, forecast
        self.configured_mode = "auto"
        self.can_calibrate = True
        self.one_batch_rows = 1  # psd steps one batch at this many live requests or fewer (more with pre-drafting)

    def note_positions(self, key: FitKey, positions: int) -> None:
        """A steady verify's size, so forecasts far beyond what its fit has seen can be re-probed."""
        seen = (key.verifier_threads, key.mode == "psd")
        self.seen_positions[seen] = max(self.seen_positions.get(seen, 0.0), float(positions))

    def reset_counters(self) -> None:
        """Count steps, switches and loads from now (the calibration's are its own)."""
        self.steps_by_plan.clear()
        self.switches.clear()
        self.settled_rows = 0
        self.progress.clear()
        self.num_steps = self.num_switches = self.steps_in_plan = 0

    def note_progress(self, now_s: float, num_tokens: int) -> None:
        """Committed tokens so far at a step boundary: the measured rate of the plan in force."""
        self.progress.append((now_s, num_tokens))

    @property
    def measured_tokens_per_s(self) -> float | None:
        """Committed tokens/s over the last steps of the plan in force (None: too few yet)."""
        if len(self.progress) < 3:
            return None
        (t0, n0), (t1, n1) = self.progress[0], self.progress[-1]
        return (n1 - n0) / (t1 - t0) if t1 > t0 else None

    def choose(self, live_rooms: Callable[[], list[int]]) -> ExecPlan:
        """The plan for the next step; live_rooms() gives how many drafts each live request can
        still take (asked only by a planner that uses it: a fixed plan never does)."""
        rooms = live_rooms()
        if not rooms:  # nothing to serve (the calibration's requests just finished): no step
            return self.current
        self.steps_in_plan += 1
        self.num_steps += 1
        self.num_rows = len(rooms)
        is_jump = self.num_rows >= LOAD_JUMP * self.settled_rows
        if is_jump:  # this load is judged now, whatever the plan: the next jump is measured from it
            self.settled_rows = self.num_rows
        self.steps_by_plan[self.current.name] = self.steps_by_plan.get(self.current.name, 0) + 1
        if self.pinned is not None:
            return self._switch(self.pinned, "calibrate") if self.pinned != self.current else self.current
        if self.rotate_steps:
            if self.steps_in_plan > self.rotate_steps:
                return self._switch(self.plans[(self.plans.index(self.current) + 1) % len(self.plans)], "rotate")
            return self.current
        if not self.is_calibrated:
            explored = self._explore(rooms)
            if explored is not None:
                return explored
        fitted = [p for p in self.plans if self.budget.is_fitted(p.fit_key)]
        if self.current not in fitted:
            return self.current
        # The plan in force is forecast from fits its own jobs keep current; the others, calibrated,
        # at the machine's speed of late (budget.drift): a slow stretch slows every plan alike.
        drift = self.budget.drift if self.is_calibrated else 1.0
        self.forecast = {p.name: self.rate(p, rooms) / (1.0 if p == self.current else drift) for p in fitted}
        best = max(fitted, key=lambda p: self.forecast[p.name])
        current_rate = self.forecast[self.current.name]
        if is_jump and best != self.current:  # a wave arrived: the plan for the new load now
            return self._switch(best, "load")
        if self.steps_in_plan < FAST_DWELL_STEPS:
            return self.current
        if best != self.current and self.forecast[best.name] > (1 + FAST_MARGIN) * current_rate:
            return self._switch(best, "best")
        if self.steps_in_plan < MIN_DWELL_STEPS:
            return self.current
        if not self.is_calibrated:
            stale = [p for p in fitted if p != self.current and self._is_extrapolated(p, rooms)
                     and self.forecast[p.name] >= REPROBE_MARGIN * current_rate]
            if stale and self.steps_in_plan >= 2 * MIN_DWELL_STEPS:
                return self._switch(max(stale, key=lambda p: self.forecast[p.name]), "reprobe")
        if best != self.current and self.forecast[best.name] > (1 + SWITCH_MARGIN) * current_rate:
            self.num_confirm = self.num_confirm + 1 if best == self.challenger else 1
            self.challenger = best
            if self.num_confirm >= CONFIRM_STEPS:
                return self._switch(best, "best")
        else:
            self.challenger, self.num_confirm = None, 0
        if self.reason in ("explore", "reprobe", "start", "calibrate"):
            self.reason = "kept"
        return self.current

    def _explore(self, rooms: list[int]) -> ExecPlan | None:
        """Without a calibration: keep an unfitted plan running its first steps, then run the
        next unfitted one (None: nothing to explore now)."""
        is_exploring = self.reason == "explore"
        if is_exploring and self.steps_in_plan < EXPLORE_STEPS:
            return self.current
        unfitted = [p for p in self.plans if not self.budget.is_fitted(p.fit_key)]
        if unfitted and rooms and (is_exploring or self.steps_in_plan >= MIN_DWELL_STEPS):
            return self._switch(unfitted[0], "explore")
        return None

    def rate(self, plan: ExecPlan, rooms: list[int]) -> float:
        """Predicted committed tokens/s of `plan` serving requests with these rooms until they
        finish: its steady rate, of which a speculative plan keeps only its drain share (its
        rows finish at scattered steps; budget.drain_share), so it must beat plain decoding by
        more than its own spread."""
        forecast, mode, batch_rows = self._forecast(plan, rooms)
        if forecast is None:
            return 0.0
        return (forecast.predicted_tokens_per_s or 0.0) * self.budget.drain_share(rooms, forecast, mode, batch_rows)

    def steady_rate(self, plan: ExecPlan, rooms: list[int]) -> float:
        """Predicted committed tokens/s of `plan` at a steady load of requests with these rooms."""
        forecast, _, _ = self._forecast(plan, rooms)
        return 0.0 if forecast is None else forecast.predicted_tokens_per_s or 0.0

    def _forecast(self, plan: ExecPlan, rooms: list[int]):
        """(the budget's forecast of one step, the mode it is for, the rows it steps): psd
        splits the requests into two batches, one of which the verifier checks per step."""
        if not rooms:
            return None, plan.mode, 0
        mode = plan.mode
        batch = rooms
        if mode == "psd":
            batch = rooms[: (len(rooms) + 1) // 2]
            if len(rooms) <= self.one_batch_rows:  # one batch (runtime/policies.py PsdPolicy): as sd
                mode, batch = "sd", rooms
        return self.budget.predict(batch, FitKey(mode, *plan.threads)), mode, len(batch)

    def _is_extrapolated(self, plan: ExecPlan, rooms: list[int]) -> bool:
        rows = len(rooms) if plan.mode != "psd" else (len(rooms) + 1) // 2
        positions = rows * (1 + (0 if plan.mode == "ar" else self.budget.num_draft))
        seen = self.seen_positions.get((plan.verifier.num_threads, plan.mode == "psd"), 0.0)
        return positions > EXTRAPOLATION * max(seen, 1.0)

    def _switch(self, plan: ExecPlan, reason: str) -> ExecPlan:
        if plan != self.current:
            self.num_switches += 1
            self.switches.append({"step": self.num_steps, "rows": self.num_rows, "from": self.current.name,
                                  "to": plan.name, "reason": reason,
                                  "forecast": {name: round(rate, 3) for name, rate in self.forecast.items()}})
            self.current = plan
            self.progress.clear()
            self.settled_rows = self.num_rows
        self.reason, self.steps_in_plan = reason, 0
        self.challenger, self.num_confirm = None, 0
        return plan

    def to_dict(self) -> dict:
        return {
            "name": self.current.name,
            "mode": self.current.mode,
            "drafter_threads": self.current.drafter.num_threads or None,
            "verifier_threads": self.current.verifier.num_threads or None,
            "reason": self.reason,
            "num_switches": self.num_switches,
            "predicted_tokens_per_s": {name: round(rate, 3) for name, rate in self.forecast.items()},
            "measured_tokens_per_s": None if (rate := self.measured_tokens_per_s) is None else round(rate, 3),
            "drift": round(self.budget.drift, 3),
            "is_calibrated": self.is_calibrated,
            "steps_by_plan": dict(self.steps_by_plan),
            "recent_switches": list(self.switches),
        }
