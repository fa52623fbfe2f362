"""Auto plans (runtime/plans.py): the candidate plans, the controller driving the real scheduler
core on a fake clock against modelled costs (it picks the plan the model says is best, follows
the load both ways, does not oscillate, never oversubscribes the cores), and through the real
processes: exact greedy and sampled output across plan switches, and each job's threads and
cores applied by the worker and reported."""

import math
import os
import random

import pytest

from minedraft.common.config import load_config
from minedraft.runtime.plans import ExecPlan, Placement, candidate_plans
from minedraft.runtime.policies import ONE_BATCH_LIVE
from minedraft.common.protocol import (
    DraftJob, DraftResult, GenerateRequest, PrefillJob, PrefillResult, VerifyJob, VerifyResult,
)
from minedraft.common.protocol import DRAFTER
from minedraft.runtime.scheduler import SchedulerCore
from minedraft.runtime.tokenizer import ByteTokenizer
from minedraft.workers.drafter import select_positions

# ---------------------------------------------------------------- candidates and placement


def test_candidate_plans_split_or_share_the_cores():
    plans = {p.name: p for p in candidate_plans([1, 0])}
    assert list(plans) == ["psd 1+1", "sd x1", "ar x1", "sd x2", "ar x2"]
    assert plans["psd 1+1"].drafter == Placement(1, (0,)) and plans["psd 1+1"].verifier == Placement(1, (1,))
    assert plans["sd x2"].is_wide and plans["sd x2"].verifier == Placement(2, (0, 1))
    assert plans["ar x2"].threads == (2, 2) and plans["sd x1"].num_batches == 1 and plans["psd 1+1"].num_batches == 2
    four = {p.name: p for p in candidate_plans([0, 1, 2, 3])}
    assert four["psd 2+2"].drafter.cpu_cores == (0, 1) and four["sd x4"].drafter.cpu_cores == (0, 1, 2, 3)
    gpu = candidate_plans(None)  # CUDA devices: the mode only, no threads on any job
    assert [p.name for p in gpu] == ["psd", "sd", "ar"] and not any(p.verifier.is_set for p in gpu)


def test_workers_time_their_linears_at_the_thread_counts_the_plans_give_them():
    """Each worker's linear-path timings (workers/process.linear_placements) cover exactly the
    thread counts auto's candidate plans can give it, from the same split of the core pool."""
    from minedraft.workers.process import linear_placements

    for cores, overrides in (([0, 1], ["drafter.cpu_cores=[0]", "verifier.cpu_cores=[1]"]),
                             ([0, 1, 2, 3], ["drafter.cpu_cores=[0,1]", "verifier.cpu_cores=[2,3]"])):
        config = load_config("tiny", ["scheduler.mode=auto", *overrides])
        for role in (DRAFTER, "verifier"):
            given = {p.placement(role).num_threads for p in candidate_plans(cores)}
            timed = set(linear_placements(config, role))
            assert timed == given | {config.worker(role).num_threads}, (cores, role, timed, given)
    fixed = load_config("tiny", ["scheduler.mode=psd", "drafter.cpu_cores=[0]", "verifier.cpu_cores=[1]"])
    assert set(linear_placements(fixed, DRAFTER)) == {fixed.drafter.num_threads}  # a fixed mode: its own count only


def core(mode: str, *overrides: str, clock=None, max_len: int = 512) -> SchedulerCore:
    config = load_config("tiny", [f"scheduler.mode={mode}", f"scheduler.max_len={max_len}",
                                  f"scheduler.max_tokens_cap={max_len - 64}", *overrides])
    kwargs = {"clock": clock} if clock is not None else {}
    return SchedulerCore(config, ByteTokenizer(), vocab_size=512, max_len=max_len, eos_token_ids=[257], **kwargs)


def add(s: SchedulerCore, request_id: str, max_tokens: int = 64, num_prompt: int = 12) -> None:
    s.add_request(b"c", GenerateRequest(request_id=request_id, prompt_ids=list(range(1, num_prompt + 1)),
                                        max_tokens=max_tokens))


@pytest.mark.parametrize("mode", ["psd", "sd", "ar"])
def test_fixed_modes_send_no_threads_and_keep_their_batches(mode):
    s = core(mode)
    for i in range(20):
        add(s, f"r{i}")
    jobs = s.next_jobs()
    assert jobs and all(job.num_threads is None and job.cpu_cores is None for _, job in jobs)
    assert len(s.batches) == (2 if mode == "psd" else 1) and "plan" not in s.status()
    assert sum(len(b.requests) for b in s.batches) <= 8 * len(s.batches)  # max_batch per batch, as before


def test_auto_starts_in_psd_on_the_configured_cores():
    s = core("auto")
    add(s, "a")
    (role, job), = s.next_jobs()[:1]
    assert role == DRAFTER and (job.num_threads, job.cpu_cores) == (1, [0])
    assert s.status()["mode"] == "auto" and s.status()["plan"]["name"] == "psd 1+1"


# ---------------------------------------------------------------- the controller on a fake clock


class Machine:
    """Modelled job costs on two cores. draft(rows, depth, threads) and verify(positions, threads)
    give a job's seconds alone; a job that starts while the other worker works takes `contention`
    longer (one memory bus). Each drafted token is accepted with probability `accept`."""

    def __init__(self, draft, verify, accept: float, contention: float = 0.0, noise: float = 0.03):
        self.draft, self.verify, self.accept = draft, verify, accept
        self.contention, self.noise = contention, noise

    def rate(self, plan: ExecPlan, rows: int, k: int = 4) -> float:
        """Committed tokens/s of `plan` holding `rows` live requests, from the model itself."""
        gain = sum(self.accept ** j for j in range(1, k + 1))
        d, v = plan.threads
        if plan.mode == "ar":
            return rows / self.verify(rows, v)
        if plan.mode == "sd" or rows <= ONE_BATCH_LIVE:  # psd at a light load: one batch (pre-drafting is on)
            return rows * (1 + gain) / (self.draft(rows, k, d) + self.verify(rows * (1 + k), v))
        half = (rows + 1) // 2
        tax = 1 + self.contention
        return half * (1 + gain) / max(self.draft(half, k, d) * tax, self.verify(half * (1 + k), v) * tax)

    def best(self, rows: int) -> tuple[float, str]:
        return max((self.rate(p, rows), p.name) for p in candidate_plans([0, 1]))


class FakeWorkers:
    """Runs the real scheduler core against jobs that take the machine's time on a fake clock,
    checking at every dispatch that the running jobs never ask for more threads than cores."""

    def __init__(self, machine: Machine, *overrides: str):
        self.machine, self.now = machine, 0.0
        self.s = core("auto", "scheduler.max_batch=16", *overrides, clock=lambda: self.now, max_len=4096)
        self.rng = random.Random(7)
        self.pending: list[tuple[float, str, object]] = []
        self.running: dict[str, int] = {}  # role -> threads of its job
        self.num_verifies = 0

    def add(self, count: int, max_tokens: int, prefix: str) -> None:
        for i in range(count):
            add(self.s, f"{prefix}{i}", max_tokens=max_tokens)

    def run(self, num_verifies: int) -> list[str]:
        """Steps until num_verifies more verify results; the plan in force after each."""
        plans, target = [], self.num_verifies + num_verifies
        while self.num_verifies < target and (self.s.requests or self.pending):
            plan = self.step()
            if plan is not None:
                plans.append(plan)
        return plans

    def step(self) -> str | None:
        """Dispatch what the core asks for, then finish the job that ends first; after a
        verify, the plan that job ran in (None after other jobs)."""
        for role, job in self.s.next_jobs():
            threads = job.num_threads or 1
            assert role not in self.running
            alongside = bool(self.running)
            self.running[role] = threads
            assert sum(self.running.values()) <= 2, f"oversubscribed: {self.running}"
            self.pending.append((self.now + self._seconds(job, threads, alongside), role, job))
        if not self.pending:  # nothing to run (a calibration that just ended, say)
            return None
        self.pending.sort(key=lambda e: e[0])
        end, role, job = self.pending.pop(0)
        start, self.now = self.now, end
        del self.running[role]
        self._finish(job, start)
        if isinstance(job, VerifyJob):
            self.num_verifies += 1
            return self.s.chooser.current.name
        return None

    def _seconds(self, job, threads: int, alongside: bool) -> float:
        m = self.machine
        if isinstance(job, DraftJob):
            drafting = [r for r in job.rows if r.num_draft]
            seconds = m.draft(len(drafting), max((r.num_draft for r in drafting), default=0), threads) \
                if drafting else 0.0005
        elif isinstance(job, VerifyJob):
            seconds = m.verify(sum(1 + r.num_draft for r in job.rows), threads)
        else:
            seconds = 0.01
        seconds *= (1 + m.contention) if alongside else 1.0
        return seconds * (1 + self.rng.uniform(-m.noise, m.noise))

    def _finish(self, job, start: float) -> None:
        s, m = self.s, self.machine
        if isinstance(job, DraftJob):
            scores = [[j * math.log(m.accept) for j in range(1, r.num_draft + 1)] for r in job.rows]
            s.on_draft_result(DraftResult(job.batch_id, len(job.rows), start, self.now,
                                          select_positions(scores, job.capacity), scores, job.num_threads or 1))
        elif isinstance(job, VerifyJob):
            emitted = []
            for r in job.rows:
                accepted = 0
                while accepted < r.num_draft and self.rng.random() < m.accept:
                    accepted += 1
                emitted.append([100] * (accepted + 1))
            s.on_verify_result(VerifyResult(job.batch_id, emitted, start, self.now, job.num_threads or 1))
        else:
            assert isinstance(job, PrefillJob)
            s.on_prefill_result(PrefillResult(len(job.rows), start, self.now, job.num_threads or 1))


def roofline_verify(positions: int, threads: int) -> float:
    """Bound by reading the weights (0.3 s) until the arithmetic (0.05 s per position on one
    core, shared by the threads) takes longer: a CPU's verify."""
    return 0.01 + max(0.3, 0.05 * positions / threads)


def roofline_draft(rows: int, depth: int, threads: int) -> float:
    return depth * max(0.03, 0.004 * rows / threads)


COMPUTE_BOUND = Machine(lambda rows, depth, t: 0.01 * depth + 0.01 * rows * depth / t,
                        lambda positions, t: 0.02 + 0.05 * positions / t, accept=0.3)
HIDDEN_DRAFT = Machine(lambda rows, depth, t: 0.15 * depth + 0.001 * rows * depth,
                       lambda positions, t: 0.3 + 0.01 * positions, accept=0.9)  # threads help neither


@pytest.mark.parametrize("machine, expected", [(COMPUTE_BOUND, "ar x2"), (HIDDEN_DRAFT, "psd 1+1")])
def test_controller_picks_the_modelled_best_plan_and_stays(machine, expected):
    """Compute-bound with poor drafts: no speculation, every core on the verify. Memory-bound
    with slow, good drafts: psd, which hides them. Once there, no more switches."""
    best_rate, best = machine.best(16)
    assert best == expected and sorted(machine.rate(p, 16) for p in candidate_plans([0, 1]))[-2] < 0.85 * best_rate
    workers = FakeWorkers(machine)
    workers.add(16, max_tokens=2000, prefix="r")  # the load stays at 16 throughout
    workers.run(120)
    num_switches = workers.s.chooser.num_switches
    plans = workers.run(150)
    assert set(plans) == {expected}, workers.s.status()["plan"]
    assert workers.s.chooser.num_switches == num_switches  # hysteresis: no oscillation on noisy times


def test_controller_follows_the_load_both_ways():
    """On a roofline CPU, one request is memory-bound (speculation pays) and sixteen are
    compute-bound (plain decoding on both cores wins): the plan goes there and back."""
    machine = Machine(roofline_draft, roofline_verify, accept=0.7)
    assert machine.best(1)[1].startswith("sd") and machine.best(16)[1] == "ar x2"
    workers = FakeWorkers(machine)
    workers.add(1, max_tokens=3000, prefix="long")
    assert not workers.run(60)[-1].startswith("ar")
    workers.add(15, max_tokens=90, prefix="burst")
    plans = workers.run(400)
    assert "ar x2" in plans and not plans[-1].startswith("ar"), workers.s.status()["plan"]["recent_switches"]
    assert not workers.s.waiting and len(workers.s.requests) == 1  # the burst was served, the long one goes on
    switches = [(sw["from"], sw["to"]) for sw in workers.s.chooser.switches]
    assert any(to == "ar x2" for _, to in switches) and any(src == "ar x2" for src, _ in switches)


def test_rotation_goes_through_every_plan_and_wide_jobs_hold_the_other_worker():
    workers = FakeWorkers(COMPUTE_BOUND, "scheduler.plan_rotate_steps=3")
    workers.add(12, max_tokens=200, prefix="r")
    plans = workers.run(80)  # FakeWorkers asserts the cores are never oversubscribed
    assert set(plans) == {p.name for p in candidate_plans([0, 1])}
    assert workers.s.status()["plan"]["num_switches"] >= 5


# ---------------------------------------------------------------- through the real processes

ROTATE = ["scheduler.plan_rotate_steps=2"]


def test_greedy_equals_reference_across_plan_switches(tmp_path):
    """Every plan in turn, two steps each, under load: requests move between one and two
    batches, workers change cores, and the output is still the target's own greedy output."""
    import asyncio

    from tests.runtime_utils import reference_outputs, running_daemon, status
    from tests.test_runtime import run_load, workload

    requests = workload(24)
    with running_daemon(tmp_path, "auto", *ROTATE) as (endpoint, _):
        outputs = asyncio.run(run_load(endpoint, requests))
        st = status(endpoint, is_detailed=True)
    assert outputs == reference_outputs(requests)
    plan = st["plan"]
    assert plan["num_switches"] >= 10 and set(plan["steps_by_plan"]) == {p.name for p in candidate_plans([0, 1])}
    moves = {(sw["from"].split()[0], sw["to"].split()[0]) for sw in plan["recent_switches"]}
    assert ("psd", "sd") in moves and ("ar", "psd") in moves  # two batches to one, and back


def test_sampled_output_follows_the_target_across_plan_switches(tmp_path):
    """Seeded sampling with a far draft while the plans rotate: the first two tokens' laws pass
    the chi-square against the target's (the draft's law fails it: test_budget's control)."""
    import asyncio

    import torch

    from tests.runtime_utils import running_daemon, status
    from tests.test_budget import FAR_NOISE, first_two_laws, sample_first_tokens
    from tests.test_sampling import chi_square_ok

    with running_daemon(tmp_path, "auto", f"model.tiny_draft_noise={FAR_NOISE}", *ROTATE) as (endpoint, _):
        outputs = asyncio.run(sample_first_tokens(endpoint, 20_000, concurrency=32))
        st = status(endpoint)
    tokens = torch.tensor(outputs)  # [N, 6]
    p1, p2 = first_two_laws(0.0)
    assert chi_square_ok(tokens[:, 0], p1) and chi_square_ok(tokens[:, 1], p2)
    assert st["plan"]["num_switches"] >= 10 and 0 < st["acceptance_rate"] < 0.9


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two cores")
def test_each_job_runs_on_the_threads_and_cores_it_asks_for(tmp_path):
    """Jobs of wide plans run on two threads over both cores, the others on one thread on their
    worker's core; the workers report what they observed, and a change of threads is timed."""
    import asyncio

    from tests.runtime_utils import running_daemon, status
    from tests.test_runtime import run_load, workload

    with running_daemon(tmp_path, "auto", *ROTATE) as (endpoint, _):
        asyncio.run(run_load(endpoint, workload(16)))
        st = status(endpoint, is_detailed=True)
    jobs = [j for j in st["recent_jobs"] if j["kind"] in ("draft", "verify")]
    placed = {(j["role"], j["threads"], tuple(j["cores"])) for j in jobs}
    assert ("drafter", 1, (0,)) in placed and ("verifier", 1, (1,)) in placed
    assert ("drafter", 2, (0, 1)) in placed and ("verifier", 2, (0, 1)) in placed
    assert placed <= {("drafter", 1, (0,)), ("verifier", 1, (1,)), ("drafter", 2, (0, 1)), ("verifier", 2, (0, 1))}
    changes = st["plan"]["placement"]
    assert changes["num_switches"] >= 4 and 0 < changes["total_s"] and changes["max_s"] < 1.0


def test_apply_placement_pins_every_thread_of_the_process():
    """In a child process: threads torch already started follow a change of cores, and nothing
    is done (0.0 s) when the job asks for what is in place."""
    import subprocess
    import sys

    code = (
        "import os, torch\n"
        "from minedraft.workers.process import apply_placement\n"
        "torch.set_num_threads(2); torch.ones(256, 256) @ torch.ones(256, 256)\n"  # start the pool
        "assert apply_placement(1, [0]) > 0\n"
        "assert torch.get_num_threads() == 1\n"
        "masks = {tuple(sorted(os.sched_getaffinity(int(t)))) for t in os.listdir('/proc/self/task')}\n"
        "assert masks == {(0,)}, masks\n"
        "assert apply_placement(1, [0]) == 0.0 and apply_placement(None, None) == 0.0\n"
    )
    if len(os.sched_getaffinity(0)) < 1 or 0 not in os.sched_getaffinity(0):
        pytest.skip("core 0 is not available")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr


def test_psd_at_a_light_load_is_forecast_as_the_one_batch_it_steps():
    """With pre-drafting on, psd holds two live requests in one batch (runtime/policies.py), so
    auto forecasts it there as that batch, drafted and verified in turn (sd's fits); from three
    live requests on, as two batches."""
    workers = FakeWorkers(HIDDEN_DRAFT)
    workers.add(4, max_tokens=2000, prefix="r")
    workers.run(80)  # uncalibrated: every plan runs a few steps, so each has fits
    chooser = workers.s.chooser
    assert workers.s.predraft and chooser.one_batch_rows == 2
    psd, sd = (next(p for p in chooser.plans if p.name == name) for name in ("psd 1+1", "sd x1"))
    assert chooser.rate(psd, [100, 100]) == chooser.rate(sd, [100, 100]) > 0
    assert chooser.rate(psd, [100] * 3) != chooser.rate(sd, [100] * 3)
