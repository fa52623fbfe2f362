"""auto's calibration at start (runtime/calibration.py): its schedule, the real scheduler core
calibrating against modelled costs on a fake clock (every plan forecast within reach of its
true rate at every load, from the first user step; the best plan from the start, no
exploration; a wave re-planned at the next step; user requests held, then served, none lost),
the cache, and through the real processes: a first start measures and caches, a second reads
the cache, and greedy output is still the target's."""

import json
import math

import pytest

from minedraft.runtime import calibration as cal
from minedraft.runtime.plans import candidate_plans
from tests.test_plans import FakeWorkers, Machine, add, core, roofline_draft, roofline_verify


# A roofline CPU whose two workers share one memory bus: a job alongside the other worker is
# slower by `contention` (FakeWorkers), drafts good enough that speculation pays at low load.
ROOFLINE = Machine(roofline_draft, roofline_verify, accept=0.7, contention=0.25)


def calibrated(machine: Machine = ROOFLINE, *overrides: str) -> FakeWorkers:
    workers = FakeWorkers(machine, *overrides)
    workers.s.start_calibration()
    while workers.s.is_calibrating:
        workers.step()
    return workers


def fresh_from_cache(data: dict, machine: Machine = ROOFLINE) -> FakeWorkers:
    workers = FakeWorkers(machine)
    workers.s.load_calibration(json.loads(json.dumps(data)))  # as the cache file keeps it
    return workers


def test_schedule_times_every_plan_at_every_size_largest_first():
    plans = candidate_plans([0, 1])
    phases = cal.schedule(plans, max_live=32, max_rows=32, max_batch=16)
    sizes = [p.rows for p in phases]
    assert sizes == sorted(sizes, reverse=True) and sizes[0] == cal.LARGEST_ROWS and sizes[-1] == 1
    for rows in (16, 8, 4, 2):
        assert {p.plan.name for p in phases if p.rows == rows} == {p.name for p in plans}
    assert {p.plan.name for p in phases if p.rows == 1} == {"sd x1", "ar x1", "sd x2", "ar x2"}  # psd needs two
    for rows in (16, 8, 4, 2, 1):  # at each size the plans that draft go first, ar last
        modes = [p.plan.mode for p in phases if p.rows == rows]
        assert modes == sorted(modes, key=lambda m: m == "ar") and modes[-1] == "ar"
    small = cal.schedule(plans, max_live=6, max_rows=6, max_batch=3)
    assert sorted({p.rows for p in small}, reverse=True) == [6, 4, 2, 1]


def test_calibration_fits_every_plan_and_its_forecasts_hold_at_every_load():
    """After the calibration alone (no user request yet) every plan's steady rate is forecast
    within 15% of its true rate at 1 to 32 live requests, 32 being twice the largest size timed."""
    workers = calibrated()
    s = workers.s
    assert s.calibration.state == "done" and s.chooser.is_calibrated and not s.chooser.pinned
    assert all(s.budget.is_fitted(p.fit_key) for p in s.chooser.plans)
    assert s.take_outputs() == [] and s.status()["num_output_tokens"] == 0  # nobody told, nothing counted
    assert s.status()["plan"]["num_switches"] == 0 and not s.status()["plan"]["steps_by_plan"]
    for rows in (1, 2, 4, 8, 16, 32):
        for plan in s.chooser.plans:
            forecast, true = s.chooser.steady_rate(plan, [400] * rows), ROOFLINE.rate(plan, rows)
            assert forecast == pytest.approx(true, rel=0.15), (rows, plan.name, forecast, true)


@pytest.mark.parametrize("rows", [1, 4, 16])
def test_a_restarted_daemon_starts_in_the_best_plan_without_exploring(rows):
    """A core seeded from the cached calibration runs the modelled best plan from its first
    user step: no plan is explored on the user's load."""
    data = calibrated().s.budget.calibration()
    workers = fresh_from_cache(data)
    best = ROOFLINE.best(rows)[1]
    workers.add(rows, max_tokens=400, prefix="r")
    plans = workers.run(20)
    assert set(plans) == {best}, (rows, plans, workers.s.status()["plan"])
    assert not any(sw["reason"] == "explore" for sw in workers.s.chooser.switches)


def test_a_wave_is_replanned_at_the_next_step():
    data = calibrated().s.budget.calibration()
    workers = fresh_from_cache(data)
    workers.add(1, max_tokens=3000, prefix="long")
    assert set(workers.run(10)) == {ROOFLINE.best(1)[1]}
    workers.add(15, max_tokens=200, prefix="wave")
    plans = workers.run(3)
    assert plans[-1] == ROOFLINE.best(16)[1] != ROOFLINE.best(1)[1], plans
    assert workers.s.chooser.switches[-1]["reason"] == "load" and workers.s.chooser.switches[-1]["rows"] == 16


def test_a_wave_arriving_over_several_steps_is_replanned_at_each_jump():
    """Requests that reach the scheduler one or two per step still re-plan as the wave grows
    (1.5 times the load the plan was last chosen for), not after the hysteresis's steps."""
    data = calibrated().s.budget.calibration()
    workers = fresh_from_cache(data)
    workers.add(1, max_tokens=3000, prefix="long")
    workers.run(10)
    plans = []
    for i in range(8):
        workers.add(2, max_tokens=400, prefix=f"wave{i}-")
        plans += workers.run(1)
    best = ROOFLINE.best(17)[1]
    assert best != ROOFLINE.best(1)[1] and best in plans, (plans, workers.s.status()["plan"]["recent_switches"])
    first = next(sw for sw in workers.s.chooser.switches if sw["to"] == best)
    assert first["reason"] == "load" and first["rows"] < 17, first  # before the wave was whole


def test_requests_during_the_calibration_wait_and_are_all_served():
    workers = FakeWorkers(ROOFLINE)
    s = workers.s
    s.start_calibration()
    workers.add(3, max_tokens=40, prefix="early")
    assert s.status()["num_waiting"] == 3 and s.status()["calibration"]["state"] == "running"
    while s.is_calibrating:
        workers.step()
        assert not s.take_outputs()  # nothing for anybody until it is over
    outputs = []
    while s.requests or workers.pending:
        workers.step()
        outputs += s.take_outputs()
    finished = {o.request_id: o for _, o in outputs if o.is_finished}
    assert set(finished) == {"early0", "early1", "early2"}
    assert all(o.finish_reason == "length" for o in finished.values())
    assert s.status()["num_output_tokens"] == 3 * 40  # the metrics count the user's tokens only


def test_workers_failing_during_the_calibration_leave_auto_exploring():
    workers = FakeWorkers(ROOFLINE)
    s = workers.s
    s.start_calibration()
    for _ in range(30):
        workers.step()
    s.abort_all("runtime_dead", "runtime dead: drafter exited")
    status = s.status()["calibration"]
    assert status["state"] == "failed" and "drafter exited" in status["reason"]
    assert not s.chooser.is_calibrated and s.chooser.pinned is None


def test_fixed_modes_never_calibrate():
    with pytest.raises(AssertionError):
        core("psd").start_calibration()


def test_cache_round_trip_keys_and_bad_files(tmp_path):
    path = tmp_path / "calibration" / "auto.json"
    assert cal.read_cache(path, "k") is None
    cal.write_cache(path, "k", {"budget": {"draft": {}}, "seconds": 1.5})
    cal.write_cache(path, "other", {"budget": {}, "seconds": 2.0})
    assert cal.read_cache(path, "k")["seconds"] == 1.5 and cal.read_cache(path, "missing") is None
    path.write_text("{not json")
    assert cal.read_cache(path, "k") is None
    from minedraft.common.config import load_config

    config = load_config("tiny", ["scheduler.mode=auto"])
    key = cal.cache_key(config, {"drafter": "cpu A", "verifier": "cpu A"}, 8)
    assert key == cal.cache_key(config, {"drafter": "cpu A", "verifier": "cpu A"}, 8)
    assert key != cal.cache_key(config, {"drafter": "cpu B", "verifier": "cpu A"}, 8)  # another machine or torch
    assert key != cal.cache_key(load_config("tiny", ["scheduler.mode=auto", "scheduler.num_draft=3"]),
                                {"drafter": "cpu A", "verifier": "cpu A"}, 8)
    assert key != cal.cache_key(config, {"drafter": "cpu A", "verifier": "cpu A"}, 4)


def test_calibration_prompts_are_the_length_asked():
    from minedraft.runtime.tokenizer import ByteTokenizer

    ids = [cal.prompt_ids(ByteTokenizer(), i) for i in range(len(cal.PROMPTS) + 1)]
    assert all(len(p) == cal.PROMPT_TOKENS for p in ids) and ids[0] == ids[len(cal.PROMPTS)] != ids[1]


# ---------------------------------------------------------------- through the real processes

def test_first_start_measures_and_caches_the_second_reads_it_and_output_stays_exact(tmp_path):
    import asyncio

    from tests.runtime_utils import cli, daemon_args, reference_outputs, status
    from tests.test_runtime import run_load, workload

    cache = f"model.cache_dir={tmp_path}/cache"
    requests = workload(12)
    for attempt, source in ((1, "measured"), (2, "cache")):
        args = daemon_args(tmp_path / f"d{attempt}", "auto", cache)
        (tmp_path / f"d{attempt}").mkdir()
        started = cli("start", *args)
        assert started.returncode == 0, started.stdout + started.stderr
        endpoint = args[args.index("--endpoint") + 1]
        try:
            assert ("calibration: measured in" if source == "measured" else "calibration: read from the cache") \
                in started.stdout, started.stdout
            outputs = asyncio.run(run_load(endpoint, requests))
            st = status(endpoint)
        finally:
            stopped = cli("stop", *args)
            assert stopped.returncode == 0, stopped.stdout + stopped.stderr
        assert st["calibration"]["state"] == "done" and st["calibration"]["source"] == source
        assert st["plan"]["is_calibrated"] and not any(
            sw["reason"] == "explore" for sw in st["plan"]["recent_switches"])
        assert outputs == reference_outputs(requests)
    cached = json.loads((tmp_path / "cache" / "calibration" / "auto.json").read_text())
    assert len(cached) == 1 and math.isfinite(next(iter(cached.values()))["seconds"])


@pytest.mark.parametrize("rows, tokens, p", [(1, 48, 0.8), (8, 48, 0.83), (16, 48, 0.6), (32, 200, 0.9), (4, 20, 0.5)])
def test_drain_share_matches_a_simulated_batch(rows, tokens, p):
    """A batch whose rows each need `tokens` tokens, each step committing 1 + (drafts accepted
    in a row, each with probability p, of k = 4): the drain share times the steps a steady
    batch would take (tokens / mean per step) is the simulated mean of the slowest row's steps,
    within 6%. Plain decoding keeps all of its rate."""
    import random

    from minedraft.runtime.budget import DraftBudget, StepBudget

    k, rng = 4, random.Random(3)
    per_step = 1 + sum(p ** j for j in range(1, k + 1))
    slowest = []
    for _ in range(4000):
        steps = []
        for _ in range(rows):
            done = n = 0
            while done < tokens:
                x = 0
                while x < k and rng.random() < p:
                    x += 1
                done += 1 + x
                n += 1
            steps.append(n)
        slowest.append(max(steps))
    simulated = sum(slowest) / len(slowest)
    budget = DraftBudget("sd", "fixed", k, 0)
    forecast = StepBudget(k, None, per_step * rows / 1.0, "best", 1.0)  # rows * per_step tokens a 1 s step
    share = budget.drain_share([tokens - 1] * rows, forecast, "sd")
    assert tokens / per_step / share == pytest.approx(simulated, rel=0.06), (share, simulated)
    assert budget.drain_share([tokens - 1] * rows, StepBudget(0, 0, 10.0, "ar", 1.0), "ar") == 1.0


SLOWER = 1.4  # the shared machine, later: every job takes this much longer than at the calibration
DRIFTED = Machine(lambda rows, depth, t: SLOWER * roofline_draft(rows, depth, t),
                  lambda positions, t: SLOWER * roofline_verify(positions, t), accept=0.7, contention=0.25)


@pytest.mark.parametrize("rows", [1, 16])
def test_a_machine_slower_than_at_the_calibration_keeps_the_best_plan(rows):
    """Every job runs 1.4x longer than the calibration measured (a slow stretch of a shared
    VM): the plan in force learns it from its own jobs, and the others are judged at the same
    speed (the budget's drift), so the ranking, unchanged, keeps the best plan. Judged on
    their calibration alone, the others would all look faster than the one running."""
    data = calibrated().s.budget.calibration()
    workers = fresh_from_cache(data, DRIFTED)
    best = DRIFTED.best(rows)[1]
    assert best == ROOFLINE.best(rows)[1]
    workers.add(rows, max_tokens=4000, prefix="r")
    plans = workers.run(150)
    assert set(plans) == {best}, (plans, workers.s.status()["plan"]["recent_switches"])
    assert workers.s.budget.drift == pytest.approx(SLOWER, rel=0.1)
    assert workers.s.status()["plan"]["drift"] == pytest.approx(SLOWER, rel=0.1)
