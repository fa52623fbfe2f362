"""auto's calibration at start (scheduler.mode = "auto", scheduler.calibrate = true): before the
first user request is served, the scheduler core runs a load of its own through the real
workers: every candidate plan (runtime/plans.py) at every batch size from the largest a plan
will hold down to one request, a few steady steps each. Each job's time feeds the draft
budget's cost fits exactly as a user's job would (dispatch to result on the scheduler's clock,
so messaging and the scheduler's work count), with each worker on the threads and cores the
plan gives it, alone or alongside the other worker as the plan runs it. So psd's fits are
measured alongside at the batch sizes psd runs (the two workers' contention for the memory bus
is in every one of its observations, instead of in a coefficient learned at one size), and
every plan is forecast from measured costs before the first user's step. The greedy drafts of
the calibration's own prompts seed the acceptance fit. User requests that arrive meanwhile wait
and are served right after; none is lost.

The result is cached (cache_path, keyed by cache_key: the CPU, torch, the linear path's kernel
and timing version, the models and the settings that shape a job), so a restart on the same
machine skips the load. Online jobs keep refining the fits, weighted toward the newest
(runtime/budget.CostFit).

The Calibration object and the schedule are pure (the core drives them); the cache functions
do the file IO, and only the server (runtime/server.py) calls them.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

CALIBRATION_VERSION = 3  # in the cache key: a change of what is measured or how (3: split sd / psd plans pre-draft; 2: signed step overheads)
STEPS_PER_PHASE = 3  # steady jobs of each kind a phase times (MIN_FIT_OBSERVATIONS in runtime/budget.py)
MAX_STEPS_PER_PHASE = 12  # a phase whose jobs are never steady (every row finishing) moves on anyway
LARGEST_ROWS = 16  # the largest batch timed: past it a verify on a CPU is compute-bound and linear in its size
PROMPT_TOKENS = 32  # tokens of each calibration prompt: short, so the load's prefill is cheap

# Text the calibration's requests continue greedily: prose and code, as a serving load mixes them.
PROMPTS = (
    "The committee met on Tuesday to review the budget for the coming year. After a long discussion",
    "def merge_sorted(left, right):\n    result = []\n    i = j = 0\n    while i < len(left) and j < len(right):\n",
    "Photosynthesis is the process by which green plants use sunlight to turn water and carbon dioxide into",
    "import json\n\nwith open('config.json') as f:\n    config = json.load(f)\n\nfor key, value in config.items():\n",
    "The train left the station at dawn, and by noon the mountains had given way to a wide, flat plain where",
    "SELECT customer_id, COUNT(*) AS orders\nFROM orders\nWHERE created_at >= '2024-01-01'\nGROUP BY",
    "To install the package, first create a virtual environment, then run the following command in a terminal:",
    "class Stack:\n    def __init__(self):\n        self.items = []\n\n    def push(self, item):\n",
)


@dataclass
class Phase:
    rows: int  # live calibration requests
    plan: object  # the ExecPlan timed


@dataclass
class Calibration:
    """The calibration load's progress: its phases (rows x plan), the one under way, and how
    many steady jobs of each kind it has timed."""

    phases: list[Phase]
    started_s: float
    state: str = "running"  # running | done | failed
    source: str = "measured"  # measured | cache
    index: int = -1  # the phase under way
    num_draft_jobs: int = 0  # steady jobs timed in the phase under way
    num_verify_jobs: int = 0
    num_steps: int = 0  # step boundaries in the phase under way
    num_jobs: int = 0  # steady jobs timed in all
    ended_s: float | None = None
    cache_path: str | None = None  # set by the server
    reason: str = ""  # why it failed
    num_prompts: int = 0  # calibration requests made so far (their ids)
    steps_by_plan: dict[str, int] = field(default_factory=dict)
    measured_s: float | None = None  # how long the calibration took when it was measured (a cached one too)

    @property
    def is_running(self) -> bool:
        return self.state == "running"

    @property
    def phase(self) -> Phase | None:
        return self.phases[self.index] if 0 <= self.index < len(self.phases) else None

    def on_job(self, kind: str, plan) -> None:
        """A steady job of `kind` (draft | verify) was timed under `plan`."""
        phase = self.phase
        if phase is None or plan != phase.plan:
            return
        self.num_jobs += 1
        if kind == "draft":
            self.num_draft_jobs += 1
        else:
            self.num_verify_jobs += 1

    def is_phase_done(self) -> bool:
        phase = self.phase
        if phase is None:
            return True
        is_timed = self.num_verify_jobs >= STEPS_PER_PHASE and (
            phase.plan.mode == "ar" or self.num_draft_jobs >= STEPS_PER_PHASE)
        return is_timed or self.num_steps >= MAX_STEPS_PER_PHASE

    def advance(self) -> Phase | None:
        """The next phase (None: the calibration is over)."""
        self.index += 1
        self.num_draft_jobs = self.num_verify_jobs = self.num_steps = 0
        return self.phase

    def to_dict(self, now_s: float) -> dict:
        end = self.ended_s if self.ended_s is not None else now_s
        phase = self.phase
        return {"state": self.state, "source": self.source, "seconds": round(end - self.started_s, 3),
                "measured_s": self.measured_s,
                "cache_path": self.cache_path, "num_phases": len(self.phases),
                "phase": self.index + 1 if self.is_running else None,
                "rows": phase.rows if self.is_running and phase else None,
                "plan": phase.plan.name if self.is_running and phase else None,
                "num_jobs": self.num_jobs, "steps_by_plan": dict(self.steps_by_plan), "reason": self.reason or None}


def schedule(plans: list, max_live: int, max_rows: int, max_batch: int) -> list[Phase]:
    """Every plan at every batch size it will run, largest first (the load shrinks by finishing
    requests; a new prompt only replaces one that reached its max_tokens): powers of two from min(LARGEST_ROWS, what a one-batch
    plan holds) down to 1. psd is timed from 2 live requests (one request runs as sd), and at
    most two of its batches' worth. Within a size the plans that draft go first, so the ar
    plans' steps do not leave the drafter a catch-up before each of them."""
    largest = min(LARGEST_ROWS, max_live, max_rows)
    sizes = []
    rows = 1
    while rows <= largest:
        sizes.append(rows)
        rows *= 2
    if sizes and sizes[-1] != largest:
        sizes.append(largest)
    ordered = sorted(plans, key=lambda p: (p.mode == "ar", p.mode != "psd"))
    phases = []
    for rows in reversed(sizes):
        for plan in ordered:
            if plan.mode == "psd" and (rows < 2 or rows > 2 * max_batch):
                continue
            phases.append(Phase(rows, plan))
    return phases


def prompt_ids(tokenizer, index: int) -> list[int]:
    """The index-th calibration prompt's ids, PROMPT_TOKENS long (repeated text if it is short)."""
    text = PROMPTS[index % len(PROMPTS)]
    ids = list(tokenizer.encode(text))
    while len(ids) < PROMPT_TOKENS:
        ids += ids
    return ids[:PROMPT_TOKENS]


# --- the cache (file IO: the server's) -------------------------------------------------------------

def cache_key(config, machines: dict[str, str], max_batch: int) -> str:
    """What a calibration depends on: each worker's machine (CPU, ISA, torch, kernel source and
    timing version: workers/model/fast_linear.machine_key), its device, threads and cores, the
    models and their precision, and the settings that shape a job."""
    sc, m = config.scheduler, config.model
    parts = {
        "version": CALIBRATION_VERSION,
        "machines": machines,
        "workers": {role: [s.device, s.num_threads, list(s.cpu_cores)]
                    for role, s in (("drafter", config.drafter), ("verifier", config.verifier))},
        "models": [m.target, m.draft, m.dtype, m.draft_weights, m.linear_path],
        "tiny": [m.tiny_seed, m.tiny_vocab_size, m.tiny_hidden_size, m.tiny_intermediate_size,
                 m.tiny_num_layers, m.tiny_num_heads, m.tiny_num_kv_heads, m.tiny_draft_noise],
        "scheduler": [sc.num_draft, sc.extra_draft, sc.draft_policy, sc.max_len, max_batch, sc.prefill_ahead],
        "transport": config.cluster.draft_transport,
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:24]


def cache_path(config) -> Path:
    return Path(config.model.cache_dir).expanduser() / "calibration" / "auto.json"


def read_cache(path: Path, key: str) -> dict | None:
    """The calibration cached under `key`, or None (no file, no entry, or unreadable)."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    entry = data.get(key) if isinstance(data, dict) else None
    return entry if isinstance(entry, dict) and "budget" in entry else None


def write_cache(path: Path, key: str, entry: dict) -> None:
    """Add this calibration under `key`; written atomically (replicas and daemons may race)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        data = json.loads(path.read_text())
        data = data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        data = {}
    data[key] = entry
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".auto-")
    with os.fdopen(fd, "w") as f:
        json.dump(data, f)
    os.replace(tmp, path)
