"""The draft budget (docs/design.md section 8): each step, how deep the drafter drafts (depth D = k + e)
and how many drafted positions of the batch the verifier checks (capacity C, TETRIS).

- "fixed": D = num_draft + extra_draft; with extra_draft > 0, C = what plain SD at num_draft
  would verify, so TETRIS only changes which positions are checked, never how many.
- "adaptive": D and C maximise the predicted committed tokens per second, from running fits of
  what the workers' jobs cost (from dispatch to result on the scheduler's clock, so messaging
  and the scheduler's own work count) and of how often a drafted position is accepted given its
  score:
    draft time  T_d = a0 + a1 * D + a2 * rows * D        (one forward per depth, rows x D positions)
    verify time T_v = b0 + b1 * positions + b2 * (drafter busy seconds during the verify),
                 positions = rows + C; b2 is what a drafter working alongside costs the
                 verifier (two cores sharing one memory bus), so hidden drafting is not free
    accepted    A(D, C) = sum over the C best-scored positions of g(score)
  where g(s) is the measured chance that a position whose draft prefix has log-probability s is
  accepted with everything before it, and the scores come from recent drafts. The rate is
  (rows + A) / (T_d + T_v) in sd (drafting is on the critical path; D = 0 is plain decoding)
  and (rows + A) / max(T_d / 0.9, T_v) in psd (drafting overlaps the other batch's verify, so
  drafting beyond the verify time is lost: the optimum sits where they meet, as the paper
  says, with a margin so that jitter in either job does not leave the verifier waiting).

Every fit, forecast and decision is for one execution plan's FitKey (its mode and each
worker's thread count), which the caller passes: the scheduler core's planner holds the plan in
force, and the budget keeps no copy of it. Calls without a key use the configured mode on
unplaced threads (a fixed mode; tests).

Pure Python and no IO: the scheduler core feeds it observations and asks for a step's budget.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass
from typing import NamedTuple

WARMUP_STEPS = 6  # steps at the fixed plan's neighbours before the fits are trusted
EXPLORE_EVERY = 8  # every n-th adaptive step drafts one deeper or shallower than the best plan
HIDDEN_SHARE = 0.9  # psd: drafting counts as hidden when it fits in this share of the verify (jitter margin)
PROBE_EVERY = 16  # with speculation off, a depth-1 probe after this many steps to keep the fits current ...
MAX_PROBE_EVERY = 256  # ... doubling after each probe that finds it still off (a probe's catch-up is costly)
MAX_OBSERVATIONS = 64  # recent jobs each cost fit uses
MIN_FIT_OBSERVATIONS = 3  # jobs a cost fit needs before its predictions are used
RECENCY = 0.97  # weight of an observation per newer one of the same kind
BIN_EDGES = (0.95, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1, 0.03, 0.0)  # acceptance bins' lower edges in exp(score)
BIN_DECAY = 0.995  # per observed position: older acceptance evidence fades
SCORE_ROWS = 64  # recent rows' score vectors kept to predict what TETRIS will select
SIZE_SCALE = math.log(2.0)  # a cost fit's locality: an observation a factor of 2 in size away weighs e^-1
SIZE_BUCKETS_PER_DOUBLING = 8  # sizes within 2^(1/8) of each other share one solve
CALIBRATED_WEIGHT = 0.5  # a calibration observation's weight (the newest job's is 1)
PRIOR_POSITIONS = 64  # the calibration's acceptance evidence counts as this many positions: its own prompts
#                       say little of a user's, whose first step or two outweigh it
PRIOR_SCORE_ROWS = 16  # and its drafts' scores as this many rows
DRIFT_WEIGHT = 0.1  # the newest steady verify's share of the machine's drift (its time over the calibration's forecast)
MAX_DRIFT = 2.0  # the drift is believed within [1 / MAX_DRIFT, MAX_DRIFT]


class CostFit:
    """A job's cost as a function of its features, fitted by weighted least squares with the
    coefficients kept >= 0 (a job never gets cheaper with more work). The fit is local in the
    job's size (feature `size_index`: positions for a verify, rows x depth for a draft): each
    observation counts by how near its size is to the size asked about (a factor of 2 away
    weighs e^-1 of the nearest), so one fit holds across a CPU's regimes, flat while a job
    is bound by reading the weights and linear once it is bound by arithmetic, instead of one
    line through both. Observations come from two places: the calibration at start (kept for
    the daemon's life, each with weight CALIBRATED_WEIGHT) and the most recent jobs (newest 1,
    older ones RECENCY per newer one), so real jobs refine the sizes they run at and the
    calibration answers for the sizes they have not. A small ridge toward zero keeps it
    solvable before the features vary; `intercept_weight` pulls the fixed cost harder."""

    def __init__(self, names: tuple[str, ...], size_index: int = 1, ridge: float = 1e-6,
                 intercept_weight: float = 1e-2):
        self.names = names
        self.size_index = size_index
        self.ridge = [intercept_weight] + [ridge] * (len(names) - 1)
        self.observations: deque[tuple[tuple[float, ...], float]] = deque(maxlen=MAX_OBSERVATIONS)
        self.calibrated: list[tuple[tuple[float, ...], float]] = []
        self._coef_by_size: dict[tuple[int, bool], list[float]] = {}  # (size bucket, calibrated only) -> coefficients

    def __len__(self) -> int:
        return len(self.observations) + len(self.calibrated)

    def add(self, x: tuple[float, ...], y: float) -> None:
        self.observations.append((tuple(x), y))
        self._coef_by_size = {key: coef for key, coef in self._coef_by_size.items() if key[1]}  # calibration-only solves stay valid

    def calibrate(self, observations: list[tuple[tuple[float, ...], float]]) -> None:
        """Take these as the calibration's: kept, at CALIBRATED_WEIGHT each, for every size."""
        self.calibrated = [(tuple(float(v) for v in x), float(y)) for x, y in observations]
        self._coef_by_size.clear()

    def freeze(self) -> None:
        """The calibration is over: the jobs seen so far become the calibrated set."""
        self.calibrate(self.calibrated + list(self.observations))
        self.observations.clear()

    def predict(self, x: tuple[float, ...]) -> float:
        return sum(c * v for c, v in zip(self._coef(x[self.size_index]), x))

    def predict_calibrated(self, x: tuple[float, ...]) -> float | None:
        """What the calibration's jobs alone say x costs (None: no calibration)."""
        if not self.calibrated:
            return None
        return sum(c * v for c, v in zip(self._coef(x[self.size_index], True), x))

    def _coef(self, size: float, calibrated_only: bool = False) -> list[float]:
        bucket = round(SIZE_BUCKETS_PER_DOUBLING * math.log2(max(size, 0.5)))
        key = (bucket, calibrated_only)
        if key not in self._coef_by_size:  # solved once per size bucket and new observation
            self._coef_by_size[key] = self._solve(2.0 ** (bucket / SIZE_BUCKETS_PER_DOUBLING), calibrated_only)
        return self._coef_by_size[key]

    def _weighted(self, size: float, calibrated_only: bool = False) -> list[tuple[tuple[float, ...], float, float]]:
        """(x, y, weight) of every observation (or the calibration's only) for a query at `size`."""
        weighted, weight = [], 1.0
        for x, y in ([] if calibrated_only else reversed(self.observations)):
            weighted.append((x, y, weight))
            weight *= RECENCY
        weighted += [(x, y, CALIBRATED_WEIGHT) for x, y in self.calibrated]
        if not weighted:
            return []
        log_size = math.log(max(size, 0.5))
        distances = [abs(math.log(max(x[self.size_index], 0.5)) - log_size) for x, _, _ in weighted]
        nearest = min(distances)
        return [(x, y, w * math.exp(-((d - nearest) / SIZE_SCALE) ** 2))
                for (x, y, w), d in zip(weighted, distances)]

    def _solve(self, size: float, calibrated_only: bool = False) -> list[float]:
        weighted = self._weighted(size, calibrated_only)
        active = list(range(len(self.names)))
        while True:
            coef = self._solve_on(active, weighted)
            negative = [i for i in active if coef[i] < 0]
            if not negative:
                return coef
            active.remove(min(negative, key=lambda i: coef[i]))

    def _solve_on(self, active: list[int], weighted: list) -> list[float]:
        n = len(active)
        a = [[0.0] * n for _ in range(n)]
        rhs = [0.0] * n
        for x, y, weight in weighted:
            for r in range(n):
                xr = x[active[r]]
                rhs[r] += weight * xr * y
                for c in range(n):
                    a[r][c] += weight * xr * x[active[c]]
        for r in range(n):
            a[r][r] += self.ridge[active[r]]
        solution = _solve_linear(a, rhs)
        coef = [0.0] * len(self.names)
        for r, i in enumerate(active):
            coef[i] = solution[r]
        return coef

    def to_dict(self, size: float | None = None) -> dict:
        """The coefficients at `size` (default: the latest job's, else the largest calibrated)."""
        if size is None:
            sizes = [x[self.size_index] for x, _ in (list(self.observations)[-1:] or self.calibrated[-1:])]
            size = sizes[0] if sizes else 1.0
        return {"coef": dict(zip(self.names, self._coef(size))), "at_size": size,
                "num_observations": len(self.observations), "num_calibrated": len(self.calibrated)}


def _solve_linear(a: list[list[float]], b: list[float]) -> list[float]:
    """Gaussian elimination with partial pivoting on a small symmetric positive system."""
    n = len(b)
    m = [row[:] + [b[i]] for i, row in enumerate(a)]
    for col in range(n):
        pivot = max(range(col, n), key=lambda r: abs(m[r][col]))
        m[col], m[pivot] = m[pivot], m[col]
        if abs(m[col][col]) < 1e-300:
            continue
        for r in range(col + 1, n):
            f = m[r][col] / m[col][col]
            for c in range(col, n + 1):
                m[r][c] -= f * m[col][c]
    x = [0.0] * n
    for r in reversed(range(n)):
        if abs(m[r][r]) < 1e-300:
            continue
        x[r] = (m[r][n] - sum(m[r][c] * x[c] for c in range(r + 1, n))) / m[r][r]
    return x


class AcceptanceFit:
    """g(score): the chance that a drafted position is accepted along with every position before
    it, binned by its draft probability exp(score) (finer near 1, where confident drafts sit),
    made non-increasing from the top bin down (a likelier draft prefix is never less likely
    accepted). Before evidence each bin believes the draft: g = its probability's midpoint."""

    def __init__(self):
        uppers = (1.0,) + BIN_EDGES[:-1]
        self.hits = [(lo + hi) / 2 for lo, hi in zip(BIN_EDGES, uppers)]  # prior: one pseudo-observation per bin
        self.totals = [1.0] * len(BIN_EDGES)
        self._curve: list[float] | None = None
        self.num_observations = 0

    @staticmethod
    def bin_of(score: float) -> int:
        """Bin 0 holds the likeliest prefixes."""
        prob = math.exp(min(score, 0.0))
        return next(i for i, edge in enumerate(BIN_EDGES) if prob >= edge)

    def add_row(self, scores: list[float], num_accepted: int) -> None:
        """A verified row: its kept positions' scores and how many leading ones were accepted."""
        decay = BIN_DECAY ** len(scores)  # older evidence fades by BIN_DECAY per observed position
        self.hits = [h * decay for h in self.hits]
        self.totals = [t * decay for t in self.totals]
        for j, score in enumerate(scores):
            b = self.bin_of(score)
            self.hits[b] += float(j < num_accepted)
            self.totals[b] += 1.0
            self.num_observations += 1
        self._curve = None

    def shrink(self, num_positions: float) -> None:
        """Keep each bin's rate but weigh all the evidence as num_positions positions at most."""
        total = sum(self.totals)
        if total > num_positions:
            scale = num_positions / total
            self.hits = [h * scale for h in self.hits]
            self.totals = [t * scale for t in self.totals]
            self._curve = None

    def curve(self) -> list[float]:
        if self._curve is None:  # pool adjacent violators: the weighted isotonic (non-increasing) fit
            blocks = []  # [hits, totals, width]
            for h, t in zip(self.hits, self.totals):
                blocks.append([h, t, 1])
                while len(blocks) > 1 and blocks[-2][0] / blocks[-2][1] < blocks[-1][0] / blocks[-1][1]:
                    h2, t2, w2 = blocks.pop()
                    blocks[-1][0] += h2
                    blocks[-1][1] += t2
                    blocks[-1][2] += w2
            self._curve = [h / t for h, t, w in blocks for _ in range(w)]
        return self._curve

    def __call__(self, score: float) -> float:
        return self.curve()[self.bin_of(score)]


class FitKey(NamedTuple):
    """Which cost fits a job feeds and a forecast uses: the plan's mode and each worker's
    thread count (0: not placed, a fixed mode or a GPU)."""

    mode: str
    drafter_threads: int = 0
    verifier_threads: int = 0


@dataclass(frozen=True)
class StepBudget:
    """One step's draft budget for a batch: how deep to draft and how many positions to verify."""

    depth: int  # drafts per row (capped by each row's room)
    capacity: int | None  # positions of the batch to verify; None = every drafted one
    predicted_tokens_per_s: float | None = None  # the adaptive model's forecast for this plan
    reason: str = "fixed"  # fixed | warmup | best | explore | probe | no room
    predicted_step_s: float | None = None  # the step time the forecast assumes (before the overhead term)


class DraftBudget:
    def __init__(self, mode: str, policy: str, num_draft: int, extra_draft: int, is_predicting: bool | None = None):
        """mode: the configured one; calls without a FitKey use it, unplaced."""
        self.default_key = FitKey(mode)
        self.policy = policy
        self.num_draft, self.extra_draft = num_draft, extra_draft
        self.max_depth = num_draft + extra_draft
        # One cost fit per (worker thread count, whether the other worker runs alongside): an auto
        # plan on a CPU gives a worker one or several cores, and in psd the two workers share the
        # memory bus, so each job costs more than alone. Keeping the fits apart keeps a psd-only
        # history from saying what a verify costs alone (its drafter term would be unidentified).
        # Fixed modes use thread count 0 throughout.
        self.draft_costs: dict[tuple[int, bool], CostFit] = {}
        self.verify_costs: dict[tuple[int, bool], CostFit] = {}
        self.acceptance = AcceptanceFit()
        self.recent_scores: deque[list[float]] = deque(maxlen=SCORE_ROWS)
        self.num_steps = 0
        self.num_off = 0  # steps without speculation since the last probe
        self.probe_every = PROBE_EVERY
        self.last_plan = StepBudget(self.max_depth, None)
        self.predicted_ema: float | None = None
        # forecasts from the fits: the adaptive policy needs them, and auto plans forecast a fixed budget too
        self.is_predicting = policy == "adaptive" if is_predicting is None else is_predicting
        # per mode, measured: the running mean of the step period beyond what the job fits predict
        # (signed; forecasts use it floored at zero: overhead_s)
        self.overheads: dict[str, float] = {}
        # the machine's drift since the calibration: a running mean of log(steady verify time /
        # what the calibration's verifies alone forecast for it), over whatever plan runs. Verifies
        # only: every plan runs them, and a draft job served from a pre-draft (no forward) says
        # nothing of the machine's speed
        self.log_drift = 0.0

    def draft_fit(self, threads: int, mode: str) -> CostFit:
        key = (threads, mode == "psd")
        if key not in self.draft_costs:
            self.draft_costs[key] = CostFit(("job", "per_forward", "per_position"), size_index=2)
        return self.draft_costs[key]

    def verify_fit(self, threads: int, mode: str) -> CostFit:
        key = (threads, mode == "psd")
        if key not in self.verify_costs:
            self.verify_costs[key] = CostFit(("job", "per_position", "per_drafter_second"))
        return self.verify_costs[key]

    @property
    def draft_cost(self) -> CostFit:
        """The draft fit of the configured mode, unplaced (a fixed mode's only one)."""
        return self.draft_fit(self.default_key.drafter_threads, self.default_key.mode)

    @property
    def verify_cost(self) -> CostFit:
        """The verify fit of the configured mode, unplaced (a fixed mode's only one)."""
        return self.verify_fit(self.default_key.verifier_threads, self.default_key.mode)

    def overhead_s(self, mode: str) -> float:
        return max(0.0, self.overheads.get(mode, 0.0))

    # --- calibration (runtime/calibration.py) ----------------------------------------------------

    def freeze_calibration(self) -> None:
        """The calibration load is over: every job it timed becomes a calibrated observation,
        kept for the daemon's life next to the recent jobs of the user's load; what its drafts
        said of acceptance becomes a weak prior (PRIOR_POSITIONS, PRIOR_SCORE_ROWS)."""
        for fit in [*self.draft_costs.values(), *self.verify_costs.values()]:
            fit.freeze()
        self.acceptance.shrink(PRIOR_POSITIONS)
        scores = list(self.recent_scores)[-PRIOR_SCORE_ROWS:]
        self.recent_scores.clear()
        self.recent_scores.extend(scores)

    def calibration(self) -> dict:
        """What the calibration measured, as its cache keeps it (JSON): the calibrated jobs of
        every cost fit, each mode's step overhead, the acceptance bins and recent draft scores."""
        def fits(costs: dict) -> dict:
            return {f"{threads},{int(alongside)}": [[list(x), y] for x, y in fit.calibrated]
                    for (threads, alongside), fit in sorted(costs.items()) if fit.calibrated}
        return {"draft": fits(self.draft_costs), "verify": fits(self.verify_costs), "overheads": dict(self.overheads),
                "acceptance": {"hits": list(self.acceptance.hits), "totals": list(self.acceptance.totals)},
                "scores": [list(row) for row in self.recent_scores]}

    def load_calibration(self, data: dict) -> None:
        """Seed the fits from a calibration (calibration() of an earlier start on this machine)."""
        for costs, fit_of in (("draft", self.draft_fit), ("verify", self.verify_fit)):
            for key, observations in data[costs].items():
                threads, alongside = (int(v) for v in key.split(","))
                fit_of(threads, "psd" if alongside else "sd").calibrate([(tuple(x), y) for x, y in observations])
        self.overheads = {mode: float(v) for mode, v in data["overheads"].items()}
        hits, totals = data["acceptance"]["hits"], data["acceptance"]["totals"]
        if len(hits) == len(totals) == len(BIN_EDGES):  # already the weak prior: freeze_calibration made it
            self.acceptance.hits, self.acceptance.totals = [float(h) for h in hits], [float(t) for t in totals]
            self.acceptance._curve = None
        self.recent_scores.extend([float(v) for v in row] for row in data["scores"])

    # --- observations -------------------------------------------------------------------------

    def observe_draft(self, rows: int, depth: int, duration_s: float, key: FitKey | None = None) -> None:
        """A draft job of `rows` rows drafting `depth` tokens deep (a steady-state job: no prompt),
        run under `key`'s mode with its drafter thread count. Jobs with nothing to draft
        count too: a step without speculation still pays their round trip."""
        key = key or self.default_key
        fit = self.draft_fit(key.drafter_threads, key.mode)
        fit.add((1.0, float(depth), float(rows * depth)), duration_s)

    def observe_verify(self, positions: int, duration_s: float, drafter_overlap_s: float = 0.0,
                       key: FitKey | None = None) -> None:
        """A verify job feeding `positions` positions in all (one per row plus its kept drafts),
        during which the drafter was busy for drafter_overlap_s."""
        key = key or self.default_key
        fit = self.verify_fit(key.verifier_threads, key.mode)
        x = (1.0, float(positions), float(drafter_overlap_s))
        self._note_drift(fit, x, duration_s)
        fit.add(x, duration_s)

    def _note_drift(self, fit: CostFit, x: tuple[float, ...], duration_s: float) -> None:
        """A steady verify of features x took duration_s: fold its ratio to the calibration's
        forecast into the drift (clipped to MAX_DRIFT either way: one stalled job is not a trend)."""
        expected = fit.predict_calibrated(x)
        if expected is not None and expected > 0 and duration_s > 0:
            ratio = min(MAX_DRIFT, max(1 / MAX_DRIFT, duration_s / expected))
            self.log_drift = (1 - DRIFT_WEIGHT) * self.log_drift + DRIFT_WEIGHT * math.log(ratio)

    @property
    def drift(self) -> float:
        """How much slower (> 1) or faster the machine runs the verifies of late than the
        calibration measured the same verifies: the plan in force's fits have learned it from its
        own jobs; the other plans' fits, still the calibration's, are judged at this speed too
        (PlanChooser), so that a slow stretch of a shared machine does not make every plan but
        the one running look faster."""
        return math.exp(self.log_drift)

    def observe_step(self, period_s: float, plan: StepBudget, mode: str) -> None:
        """The time one step of `plan` took, dispatch to dispatch (sd: the batch's drafts; psd
        and ar: the verifier's jobs): what it took beyond the fits' prediction is the step's
        overhead (messaging, the scheduler's own work), which every plan of the mode pays once
        per step. Periods far beyond the prediction are idle time, not overhead."""
        if plan.predicted_step_s is None or period_s > 3 * plan.predicted_step_s + 0.05:
            return
        # Signed: a period shorter than the fits said pulls the mean down (clipping at zero would
        # count every fit's noise as overhead). Forecasts use the mean, floored at zero.
        residual = period_s - plan.predicted_step_s
        self.overheads[mode] = 0.9 * self.overheads.get(mode, 0.0) + 0.1 * residual

    def observe_scores(self, scores: list[list[float]]) -> None:
        for row in scores:
            if row:
                self.recent_scores.append(list(row))

    def observe_accept(self, scores: list[float], num_accepted: int) -> None:
        self.acceptance.add_row(scores, num_accepted)

    # --- decisions ----------------------------------------------------------------------------

    def plan(self, rooms: list[int], key: FitKey | None = None) -> StepBudget:
        """The budget for a batch whose rows can take rooms[i] more drafts this step, under
        the execution plan `key`."""
        key = key or self.default_key
        self.num_steps += 1
        if self.policy == "fixed":
            capacity = sum(min(self.num_draft, r) for r in rooms) if self.extra_draft else None
            self.last_plan = StepBudget(self.max_depth, capacity)
            if self.is_predicting and self.is_fitted(key):  # auto: forecast it too
                forecast = self.predict(rooms, key)
                self.last_plan = StepBudget(self.max_depth, capacity, forecast.predicted_tokens_per_s, "fixed",
                                      forecast.predicted_step_s)
            return self.last_plan
        if not any(rooms):  # every row is at its last token: nothing to draft
            self.last_plan = StepBudget(0, 0, None, "no room")
            return self.last_plan
        if self.num_steps <= WARMUP_STEPS or not self.is_fitted(key):
            # Vary the depth so both fits see more than one point; verify all that is drafted.
            depths = (self.num_draft, self.max_depth, max(1, self.num_draft // 2))
            self.last_plan = StepBudget(depths[self.num_steps % len(depths)], None, None, "warmup")
            return self.last_plan
        best = self.best_plan(rooms, key=key)
        plan = best
        if best.depth == 0:
            self.num_off += 1
            if self.num_off >= self.probe_every:
                self.num_off = 0
                self.probe_every = min(2 * self.probe_every, MAX_PROBE_EVERY)
                plan = self.best_plan(rooms, depths=[1], min_capacity=sum(min(1, r) for r in rooms), key=key)
                plan = StepBudget(plan.depth, plan.capacity, plan.predicted_tokens_per_s, "probe", plan.predicted_step_s)
        else:
            self.num_off, self.probe_every = 0, PROBE_EVERY
            if self.num_steps % EXPLORE_EVERY == 0:
                step = 1 if (self.num_steps // EXPLORE_EVERY) % 2 else -1
                depth = min(self.max_depth, max(1, best.depth + step))
                if depth != best.depth:
                    plan = self.best_plan(rooms, depths=[depth], key=key)
                    plan = StepBudget(plan.depth, plan.capacity, plan.predicted_tokens_per_s, "explore", plan.predicted_step_s)
        if best.predicted_tokens_per_s is not None:
            rate = best.predicted_tokens_per_s
            self.predicted_ema = rate if self.predicted_ema is None else 0.9 * self.predicted_ema + 0.1 * rate
        self.last_plan = plan
        return plan

    def best_plan(self, rooms: list[int], depths: list[int] | None = None, min_capacity: int = 0,
                  capacity: int | None = None, key: FitKey | None = None) -> StepBudget:
        """The (depth, capacity) with the highest predicted committed tokens per second under
        the execution plan `key`; `capacity` fixes it (at most what is drafted)."""
        mode, drafter_threads, verifier_threads = key or self.default_key
        rows = len(rooms)
        draft_fit, verify_fit = self.draft_fit(drafter_threads, mode), self.verify_fit(verifier_threads, mode)
        overhead_s = self.overhead_s(mode)
        best = None
        for depth in depths if depths is not None else range(0, self.max_depth + 1):
            limit = sum(min(depth, r) for r in rooms)
            gains = self._expected_gains(depth, rows, limit)  # gains[c]: accepted tokens from the best c positions
            t_draft = draft_fit.predict((1.0, float(depth), float(rows * depth)))
            capacities = range(min(min_capacity, limit), limit + 1) if capacity is None else [min(capacity, limit)]
            for c in capacities:
                if depth and c == 0:
                    continue  # drafting for nothing: never better than depth 0
                t_verify = verify_fit.predict((1.0, float(rows + c), 0.0))
                if mode == "psd":  # the drafter works through (part of) this verify
                    t_verify = verify_fit.predict((1.0, float(rows + c), min(t_draft, t_verify)))
                t_step = t_draft + t_verify if mode == "sd" else max(t_draft / HIDDEN_SHARE, t_verify)
                rate = (rows + gains[c]) / max(t_step + overhead_s, 1e-9)
                if best is None or rate > best[0] * (1 + 1e-9):
                    best = (rate, depth, c, t_step)
        if best is None:  # no room to draft at the depths asked: plain decoding
            return StepBudget(0, 0, None, "no room")
        rate, depth, c, t_step = best
        return StepBudget(depth, c, rate, "best", t_step)

    def is_fitted(self, key: FitKey) -> bool:
        """Whether the fits the execution plan `key` needs have seen enough jobs to predict it."""
        mode, drafter_threads, verifier_threads = key

        def count(costs: dict, threads: int) -> int:
            fit = costs.get((threads, mode == "psd"))
            return 0 if fit is None else len(fit)
        is_verify_fitted = count(self.verify_costs, verifier_threads) >= MIN_FIT_OBSERVATIONS
        return is_verify_fitted and (mode == "ar" or count(self.draft_costs, drafter_threads) >= MIN_FIT_OBSERVATIONS)

    def predict(self, rooms: list[int], key: FitKey) -> StepBudget:
        """The forecast for one step of a batch with `rooms` under the execution plan `key`:
        the budget's own choice of (depth, capacity) for it, with its predicted tokens/s and
        step time. ar has no drafter: rows / (verify of the rows + the mode's overhead)."""
        mode, _, verifier_threads = key
        rows = len(rooms)
        if mode == "ar" or not any(rooms):
            t_verify = self.verify_fit(verifier_threads, mode).predict((1.0, float(rows), 0.0))
            return StepBudget(0, 0, rows / max(t_verify + self.overhead_s(mode), 1e-9), mode, t_verify)
        if self.policy == "adaptive":
            return self.best_plan(rooms, key=key)
        fixed = sum(min(self.num_draft if self.extra_draft else self.max_depth, r) for r in rooms)
        return self.best_plan(rooms, depths=[self.max_depth], capacity=fixed, key=key)

    def drain_share(self, rooms: list[int], forecast: StepBudget, mode: str, batch_rows: int | None = None) -> float:
        """The share of a speculative step's steady rate that the live requests keep until
        they finish. Each row commits 1 + X tokens a step, X drafts accepted (mean A, from the
        forecast), so rows needing the same tokens finish at different steps, and the batch
        runs until its slowest one: about n + sigma * z(rows) + 1/2 steps instead of n, where
        n = tokens / (1 + A), sigma is the spread of a row's step count (renewal theory:
        sqrt(n) * sd(X) / (1 + A)), z(rows) the expected largest of that many standard normal
        draws and 1/2 the last step's unused part. Plain decoding finishes every row at its own
        token count, so its share is 1. X's spread is that of a row whose k drafts are each
        accepted with the probability p that gives mean A. `forecast`: predict() of the batch
        stepped (batch_rows of the rows; psd steps half of them), under `mode`."""
        rows = len(rooms)
        if not rows or forecast.depth <= 0 or not forecast.predicted_tokens_per_s or not forecast.predicted_step_s:
            return 1.0
        period = forecast.predicted_step_s + self.overhead_s(mode)
        accepted = max(0.0, forecast.predicted_tokens_per_s * period / (batch_rows or rows) - 1.0)  # A per row
        depth = forecast.depth
        p = _acceptance_probability(accepted, depth)
        mean = sum(p ** j for j in range(1, depth + 1))
        variance = max(0.0, sum((2 * j - 1) * p ** j for j in range(1, depth + 1)) - mean ** 2)
        steps = (max(rooms) + 1) / (1.0 + accepted)
        spread = math.sqrt(steps * variance) / (1.0 + accepted)
        return steps / (steps + spread * _expected_max_normal(rows) + 0.5)

    def _expected_gains(self, depth: int, rows: int, limit: int) -> list[float]:
        """Prefix sums of g over the best positions the batch would draft at `depth`, estimated
        from recent rows' scores (extended past their depth at each row's mean step) and scaled to
        `rows` rows; entry c is the expected accepted tokens when keeping c positions."""
        values = []
        sample = list(self.recent_scores)
        if depth:
            for row in sample:
                extended = row[:depth]
                mean_step = min(0.0, row[-1] / len(row))  # past its drafted depth, a row goes on at its own pace
                while len(extended) < depth:
                    extended.append(extended[-1] + mean_step)
                values.extend(self.acceptance(s) for s in extended)
        values.sort(reverse=True)
        prefix = [0.0]
        for v in values:
            prefix.append(prefix[-1] + v)
        scale = rows / len(sample) if sample else 0.0
        # the c best positions of `rows` rows ~ the c / scale best of the sample, times scale
        return [scale * prefix[min(len(values), round(c / scale))] if scale else 0.0 for c in range(limit + 1)]

    def to_dict(self, key: FitKey | None = None) -> dict:
        """The budget as status shows it, with the fits of the execution plan `key` (in force)."""
        mode, drafter_threads, verifier_threads = key or self.default_key
        out = {"policy": self.policy, "depth": self.last_plan.depth, "capacity": self.last_plan.capacity,
               "reason": self.last_plan.reason}
        if self.is_predicting:
            out.update({
                "predicted_tokens_per_s": self.predicted_ema,
                "step_overhead_s": self.overhead_s(mode),
                "draft_time_s": self.draft_fit(drafter_threads, mode).to_dict(),
                "verify_time_s": self.verify_fit(verifier_threads, mode).to_dict(),
                "acceptance_by_draft_prob": {f">={edge}": round(g, 4)
                                             for edge, g in zip(BIN_EDGES, self.acceptance.curve())},
                "num_acceptance_observations": self.acceptance.num_observations,
            })
            if any(threads for threads, _ in [*self.draft_costs, *self.verify_costs]):  # auto on a CPU: by thread count
                out["draft_time_s_by_threads"] = {_key_name(k): f.to_dict() for k, f in sorted(self.draft_costs.items())}
                out["verify_time_s_by_threads"] = {_key_name(k): f.to_dict() for k, f in sorted(self.verify_costs.items())}
                out["step_overhead_s_by_mode"] = {mode: self.overhead_s(mode) for mode in self.overheads}
        return out


def _acceptance_probability(accepted: float, depth: int) -> float:
    """p such that sum_{j=1..depth} p^j = accepted (each draft accepted with p, given the ones
    before it), by bisection; 1 when even p = 1 falls short."""
    if accepted >= depth:
        return 1.0
    low, high = 0.0, 1.0
    for _ in range(40):
        mid = (low + high) / 2
        if sum(mid ** j for j in range(1, depth + 1)) < accepted:
            low = mid
        else:
            high = mid
    return (low + high) / 2


# E[max of n standard normal draws] at n = 1, 2, 4, ..., 64; between them, linear in log2(n).
_MAX_NORMAL = (0.0, 0.564, 1.029, 1.424, 1.766, 2.070, 2.326)


def _expected_max_normal(n: int) -> float:
    if n <= 1:
        return 0.0
    x = min(math.log2(n), len(_MAX_NORMAL) - 1.0)
    i = min(int(x), len(_MAX_NORMAL) - 2)
    return _MAX_NORMAL[i] + (x - i) * (_MAX_NORMAL[i + 1] - _MAX_NORMAL[i])


def make_budget(scheduler) -> DraftBudget | None:
    """The draft budget of a config's scheduler section: none without a drafter (ar). auto
    chooses its plans from measured costs, so it feeds and uses the fits whatever the policy."""
    if not scheduler.speculates:
        return None
    return DraftBudget(scheduler.mode, scheduler.draft_policy, scheduler.num_draft, scheduler.extra_draft,
                       is_predicting=scheduler.draft_policy == "adaptive" or scheduler.is_auto)


def _key_name(key: tuple[int, bool]) -> str:
    """A cost fit's key as status shows it: "2 threads" or "1 thread, alongside"."""
    threads, is_alongside = key
    return f"{threads} thread{'s' if threads != 1 else ''}{', alongside' if is_alongside else ''}"
