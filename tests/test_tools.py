"""tools/ end to end on configs/tiny.toml: bench.py (three daemons, greedy outputs identical
across modes, JSON and PNG written), loadtest.py with Poisson arrivals and bench_hf.py against a
shared running daemon. Few requests and tokens: this checks the plumbing, not the speed. bench.py's
run plan, best-fixed pick and timeline drawing are also checked in-process, without daemons."""

import importlib.util
import json
import os
import re
import subprocess
import sys
import types

import pytest

from tests.runtime_utils import ROOT, TINY, running_daemon

LATENCY_KEYS = ("ttft_ms", "tpot_ms", "e2e_ms", "itl_ms")


def load_tool(name: str):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "tools", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


bench = load_tool("bench")


def tool(name: str, *args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, os.path.join(ROOT, "tools", name), *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stdout + done.stderr[-4000:]
    return done


@pytest.fixture(scope="module")
def endpoint(tmp_path_factory):
    with running_daemon(tmp_path_factory.mktemp("daemon"), "psd") as (endpoint, _):
        yield endpoint


def test_bench_modes_agree_and_report(tmp_path):
    out = tmp_path / "bench"
    done = tool("bench.py", "--config", TINY, "--modes", "ar,sd,psd", "--requests", "6", "--concurrency", "3",
                "--max-tokens", "8", "--warmup", "0", "--out", str(out))
    assert "greedy outputs identical across modes: yes (6 requests)" in done.stdout
    assert (out / "bench.png").stat().st_size > 0
    report = json.loads((out / "bench.json").read_text())
    assert report["greedy_check"]["is_identical"]
    assert [run["label"] for run in report["runs"]] == ["ar", "sd", "psd"]
    for run in report["runs"]:
        r = run["result"]
        assert r["mode"] == run["mode"]
        assert r["num_failed"] == 0 and r["num_ok"] == 6
        assert r["output_throughput"] > 0 and r["request_throughput"] > 0
        assert all(r[key]["p50"] is not None for key in LATENCY_KEYS)
        assert len(r["output_token_ids"]) == 6
        assert 0 <= r["overlap_efficiency"] <= 1
    sd, psd = report["runs"][1]["result"], report["runs"][2]["result"]
    for r in (sd, psd):
        assert 0 < r["acceptance_rate"] <= 1 and 1 < r["mean_accepted_length"] <= 5
        assert r["busy_fraction"]["drafter"] > 0 and r["busy_fraction"]["verifier"] > 0
    assert report["runs"][0]["result"]["acceptance_rate"] is None  # ar drafts nothing
    assert report["runs"][0]["result"]["predraft"] is None  # nor pre-drafts
    pre = sd["predraft"]  # this load's own counters (the daemon's status after it less before)
    assert pre["checked"] > 0 and pre["full"] + pre["short"] <= pre["checked"] and pre["drafts_served"] >= 0
    assert f"  sd: {pre['checked']} checked, {pre['full']} chain + {pre['short']} branch hits" in done.stdout
    for label in ("ar", "sd", "psd", "out tok/s", "TTFT p50", "overlap"):
        assert label in done.stdout


def test_bench_rounds_pool_fresh_daemons_taking_turns(tmp_path):
    out = tmp_path / "bench"
    done = tool("bench.py", "--config", TINY, "--modes", "ar,sd", "--requests", "3", "--concurrency", "1,3",
                "--max-tokens", "6", "--ignore-eos", "--warmup", "0", "--rounds", "2", "--out", str(out))
    order = [line.split("] ")[1].split(":")[0] for line in done.stderr.splitlines() if line.startswith("[round")]
    assert order == ["ar", "sd", "sd", "ar"]  # the first daemon rotates
    report = json.loads((out / "bench.json").read_text())
    assert report["greedy_check"]["is_identical"]
    for run in report["runs"]:
        r = run["result"]
        assert len(r["round_tok_s"]) == 2 and r["rounds_identical"]
        assert r["num_ok"] == 6 and r["num_output_tokens"] == 36  # both rounds' requests, pooled
        assert r["output_throughput"] == r["num_output_tokens"] / r["wall_s"]
        assert min(r["round_tok_s"]) <= r["output_throughput"] <= max(r["round_tok_s"])
    assert "rounds (tok/s): ar c=1 " in done.stdout


def test_bench_pools_rounds_counts_and_keeps_each_rounds_errors():
    bench = load_tool("bench")
    base = {"num_requests": 2, "num_ok": 2, "num_failed": 0, "num_prompt_tokens": 8, "server_num_output_tokens": 10,
            "num_drafted": 8, "num_accepted": 4, "num_verify_rows": 4, "output_token_ids": {"0": [1], "1": [2]}}
    first = base | {"num_output_tokens": 10, "wall_s": 2.0, "output_throughput": 5.0, "errors": {},
                    "predraft": {"checked": 4, "full": 2, "short": 1, "drafts_served": 6}, "timeline": ["a"]}
    second = base | {"num_output_tokens": 10, "wall_s": 3.0, "output_throughput": 10 / 3, "num_failed": 1,
                     "errors": {"runtime_dead": 1}, "daemon_log": "out/daemon-sd-round-2.log",
                     "predraft": {"checked": 6, "full": 3, "short": 0, "drafts_served": 9}, "timeline": ["b"]}
    merged, timeline = bench.pool_rounds([first, second])
    assert merged["output_throughput"] == 20 / 5.0 and merged["round_tok_s"] == [5.0, 10 / 3]
    assert merged["num_failed"] == 1 and merged["round_errors"] == [{}, {"runtime_dead": 1}]
    assert merged["daemon_logs"] == ["out/daemon-sd-round-2.log"]
    assert merged["predraft"] == {"checked": 10, "full": 5, "short": 1, "drafts_served": 15}
    assert timeline == ["a"] and "timeline" not in merged
    assert bench.pool_rounds([first | {"predraft": None}, second | {"predraft": None}])[0]["predraft"] is None


def test_loadtest_poisson_rate(endpoint, tmp_path):
    out = tmp_path / "load.json"
    done = tool("loadtest.py", "--endpoint", endpoint, "--requests", "8", "--rate", "40", "--max-tokens", "12",
                "--temperature", "0.7", "--seed", "3", "--json", str(out))
    result = json.loads(out.read_text())
    assert result["rate"] == 40 and result["concurrency"] is None
    assert result["num_ok"] == 8 and result["num_failed"] == 0 and result["errors"] == {}
    assert result["num_output_tokens"] == result["server_num_output_tokens"] > 0
    assert sorted(result["output_token_ids"], key=int) == [str(i) for i in range(8)]
    assert 0 < result["acceptance_rate"] <= 1
    for key in LATENCY_KEYS:
        p = result[key]
        assert p["p50"] <= p["p90"] <= p["p99"]
    assert "output throughput" in done.stdout and "TPOT" in done.stdout


def test_bench_hf_tiny(endpoint, tmp_path):
    tool("bench_hf.py", "--config", TINY, "--endpoint", endpoint, "--num-prompts", "2", "--max-tokens", "8",
         "--out", str(tmp_path))
    report = json.loads((tmp_path / "bench_hf.json").read_text())
    assert set(report["results"]) == {"hf_generate", "hf_assisted", "runtime_psd"}
    for r in report["results"].values():
        assert r["tokens_per_s"] > 0 and r["num_tokens"] == 16
    base = report["results"]["hf_generate"]["outputs"]
    assert report["results"]["hf_assisted"]["outputs"] == base
    assert report["results"]["runtime_psd"]["outputs"] == base  # float32 greedy: the target's own output


def test_bench_hf_batched_baseline_tiny(endpoint, tmp_path):
    """--batch: transformers on left-padded batches against the runtime at that concurrency; the
    padded batches give the target's own greedy tokens (float32, tiny model)."""
    tool("bench_hf.py", "--config", TINY, "--endpoint", endpoint, "--num-prompts", "4", "--max-tokens", "8",
         "--batch", "2", "--out", str(tmp_path))
    report = json.loads((tmp_path / "bench_hf.json").read_text())
    assert report["batch"] == 2 and set(report["results"]) == {"hf_generate_batch2", "runtime_psd"}
    batched = report["results"]["hf_generate_batch2"]
    assert batched["num_tokens"] == 32 and batched["threads"] == len(os.sched_getaffinity(0))
    assert report["results"]["runtime_psd"]["outputs"] == batched["outputs"]


def test_bench_hf_mode_variants():
    bench_hf = load_tool("bench_hf")
    assert bench_hf.mode_overrides("sd") == ["scheduler.mode=sd"]
    assert bench_hf.mode_overrides("sd-noprefill") == ["scheduler.mode=sd", "scheduler.prefill_ahead=false"]
    assert bench_hf.mode_overrides("psd-bf16draft") == ["scheduler.mode=psd", "model.draft_weights=bfloat16"]
    assert bench_hf.mode_overrides("sd-f32draft") == ["scheduler.mode=sd", "model.draft_weights=float32"]
    assert bench_hf.mode_overrides("default") == [] and bench_hf.mode_overrides("auto") == ["scheduler.mode=auto"]
    with pytest.raises(SystemExit, match="unknown mode 'sd-fast'"):
        bench_hf.mode_overrides("sd-fast")


def test_kernels_tool_tiny(tmp_path):
    out = tmp_path / "kernels.json"
    done = tool("kernel_bench.py", "--models", "tiny-qwen2", "--rows", "1,5", "--repeats", "2", "--passes", "2", "--out", str(out))
    report = json.loads(out.read_text())
    (limits,) = report["limits"]
    assert limits["threads"] == 1 and limits["read_bytes_per_s"] > 1e8 and limits["peak_flops"] > 1e8
    shapes = {r["shape"] for r in report["linears"]}
    assert shapes == {"q_proj / o_proj", "k_proj / v_proj", "qkv_proj (merged)", "gate_proj / up_proj",
                      "gate_up_proj (merged)", "down_proj", "lm_head"}
    assert {r["shape"] for r in report["linears"] if r["plain_path_only"]} == {"k_proj / v_proj", "gate_proj / up_proj"}
    for r in report["linears"]:
        assert r["m"] in (1, 5) and r["bound_s"] > 0 and "plain" in r["times_s"]
        for impl, t in r["times_s"].items():  # best time; ratio: the best pairing with a probed bandwidth
            pairs = r["samples"][impl]
            assert len(pairs) == 2 * 2 and t == min(p[0] for p in pairs) > 0  # 2 passes x 2 repeats
            scale = limits["probe_to_peak"]  # the probe's matmul rate scaled to the run's peak
            assert r["ratios"][impl] == min(p[0] / max(r["bytes"] / p[1], r["flops"] / (p[2] * scale)) for p in pairs)
        assert r["times_s"][r["served"]] == min(t for impl, t in r["times_s"].items() if impl in ("plain", "packed"))
    kernel_path = [r for r in report["linears"] if not r["plain_path_only"]]
    for band, in_band in (("M 1-16", lambda m: m <= 16), ("M 40+", lambda m: m >= 40)):
        cells = [r for r in kernel_path if in_band(r["m"])]
        if cells:
            assert report["served_worst"][band]["ratio"] == max(r["ratios"][r["served"]] for r in cells)
    assert "M 40+" not in report["served_worst"]  # --rows 1,5
    # the bounds use the highest limits measured: before each of the 2 passes and after the last timing
    probed = [p[2] for r in report["linears"] for pairs in r["samples"].values() for p in pairs]
    assert limits["probe_to_peak"] == limits["peak_flops"] / max(probed)
    measured = limits["measured"]
    assert len(measured) == 3
    assert limits["peak_flops"] == max(m["peak_flops"] for m in measured)
    assert limits["read_bytes_per_s"] == max(m["read_bytes_per_s"] for m in measured)
    forwards = {(f["path"], f["rows"], f["positions"]) for f in report["forwards"]}
    assert forwards == {(path, r, p) for path in ("plain", "auto") for r, p in ((1, 1), (1, 5), (8, 1), (8, 5), (16, 5))}
    assert report["linear_paths"]["tiny-qwen2"]["plain"]["shapes"]
    for label in ("read", "GB/s", "matmul peak", "whole forwards", "lm_head"):
        assert label in done.stdout


def test_kernels_times_short_calls_as_the_mean_of_a_burst(monkeypatch):
    kernels = load_tool("kernel_bench")
    assert kernels.burst_calls(1.0) == 1 and kernels.burst_calls(kernels.BURST_S) == 1
    assert kernels.burst_calls(kernels.BURST_S / 4) == 4
    assert kernels.burst_calls(1e-9) == kernels.MAX_BURST_CALLS
    now = [0.0]  # a fake clock: each fn advances it by its length, so nothing here depends on the machine
    monkeypatch.setattr(kernels, "time", types.SimpleNamespace(perf_counter=lambda: now[0]))
    calls = {"short": 0, "long": 0}

    def short():  # a quarter of a burst
        calls["short"] += 1
        now[0] += kernels.BURST_S / 4

    def long():
        calls["long"] += 1
        now[0] += 2 * kernels.BURST_S

    probes = iter(range(100))
    samples = kernels.interleaved_rounds({"short": short, "long": long}, 3, lambda: (float(next(probes)),))
    assert calls["long"] == 2 + 3  # two warm-up calls, then one per round
    assert calls["short"] == 2 + 3 * 4  # two warm-up calls, then a burst of four per round
    # the mean of the burst: one call's length, not the burst's
    assert [seconds for seconds, _ in samples["short"]] == pytest.approx([kernels.BURST_S / 4] * 3)
    # each round pairs with the higher of the probes just before and just after it
    assert [rate for _, rate in samples["long"]] == [1.0, 2.0, 3.0]


# ---------------------------------------------------------------- bench.py in-process


def test_bench_plan_sweep_without_e_is_unchanged():
    runs = bench.plan_runs(["sd"], [2, 4], [8])
    assert [r["label"] for r in runs] == ["sd", "psd k=2", "sd k=2", "psd k=4", "sd k=4", "psd batch=8", "sd batch=8"]
    by_label = {r["label"]: r for r in runs}
    assert by_label["psd k=2"]["overrides"] == ["scheduler.mode=psd", "scheduler.num_draft=2"]
    assert by_label["sd batch=8"]["overrides"] == ["scheduler.mode=sd", "scheduler.max_batch=8"]
    assert by_label["sd k=4"]["sd_label"] == "sd k=4" and by_label["sd k=4"]["sweep"] == {"k": 4, "e": None}


def test_bench_plan_sweep_k_e_pairs_and_modes():
    runs = bench.plan_runs([], [3, 5], [], sweep_e=[0, 2], sweep_modes=["psd", "psd-tetris"], extra_draft=1)
    modes = ("psd", "psd-tetris")
    assert [r["label"] for r in runs] == [f"{m} k={k} e={e}" for k in (3, 5) for e in (0, 2) for m in modes]
    by_label = {r["label"]: r for r in runs}
    assert by_label["psd k=3 e=2"]["overrides"] == ["scheduler.mode=psd", "scheduler.num_draft=3",
                                                    "scheduler.extra_draft=2"]
    # the sweep's e replaces the mode's own (--extra-draft) rather than adding a second value
    assert by_label["psd-tetris k=5 e=0"]["overrides"] == ["scheduler.mode=psd", "scheduler.extra_draft=0",
                                                           "scheduler.draft_policy=fixed", "scheduler.num_draft=5"]
    assert by_label["psd k=5 e=2"]["sd_label"] == "sd k=5 e=2"
    assert by_label["psd k=5 e=2"]["sweep"] == {"k": 5, "e": 2}
    e_only = bench.plan_runs([], [], [], sweep_e=[1], sweep_modes=["sd"])
    assert [(r["label"], r["sweep"]) for r in e_only] == [("sd e=1", {"k": None, "e": 1})]


def test_bench_new_modes_overrides():
    runs = {r["label"]: r["overrides"] for r in bench.plan_runs(list(bench.MODES), [], [], extra_draft=3)}
    assert list(runs) == list(bench.MODES)  # every mode's label is its name
    assert runs["sd"] == ["scheduler.mode=sd"] and runs["ar"] == ["scheduler.mode=ar"]
    assert runs["sd-tetris"] == ["scheduler.mode=sd", "scheduler.extra_draft=3", "scheduler.draft_policy=fixed"]
    assert runs["psd-tetris"] == ["scheduler.mode=psd", "scheduler.extra_draft=3", "scheduler.draft_policy=fixed"]
    assert runs["sd-adaptive"] == ["scheduler.mode=sd", "scheduler.extra_draft=3", "scheduler.draft_policy=adaptive"]
    assert runs["psd-adaptive"] == ["scheduler.mode=psd", "scheduler.extra_draft=3", "scheduler.draft_policy=adaptive"]
    assert bench.mode_overrides("psd-tetris")[1] == f"scheduler.extra_draft={bench.DEFAULT_EXTRA_DRAFT}"
    assert bench.build_parser().parse_args([]).extra_draft == 2


def test_bench_best_fixed_per_base_mode():
    def run(label, mode, tok_s, sweep=None, **result):
        out = {"label": label, "mode": mode, "result": {"output_throughput": tok_s, **result}}
        return out if sweep is None else {**out, "sweep": sweep}

    runs = [run("psd", "psd", 25.0, num_draft=4, extra_draft=0),  # the plain mode is a fixed (k, e) too
            run("psd k=2 e=0", "psd", 10.0, {"k": 2, "e": 0}), run("psd k=2 e=2", "psd", 30.0, {"k": 2, "e": 2}),
            run("sd k=2 e=0", "sd", 20.0, {"k": 2, "e": 0}), run("sd k=4 e=2", "sd", 15.0, {"k": 4, "e": 2}),
            run("psd-adaptive", "psd-adaptive", 50.0, num_draft=4, extra_draft=2),  # not a fixed budget
            run("sd batch=4", "sd", 99.0, {"batch": 4}),  # another batch size: not comparable
            run("sd-tetris", "sd-tetris", 21.0, num_draft=4, extra_draft=2)]
    best = bench.best_fixed(runs)
    assert best == {"psd": {"label": "psd k=2 e=2", "k": 2, "e": 2, "output_throughput": 30.0},
                    "sd": {"label": "sd-tetris", "k": 4, "e": 2, "output_throughput": 21.0}}
    assert "best fixed psd: k=2 e=2 (psd k=2 e=2), 30.0 tok/s" in bench.format_best_fixed(best)
    runs = [dict(r, group=r["mode"] + " c=32") for r in runs[:2]]  # several concurrencies: one best each
    assert list(bench.best_fixed(runs)) == ["psd c=32"]


def test_bench_one_daemon_serves_each_concurrency():
    runs = bench.plan_runs(["psd"], [3], [], sweep_e=[0], sweep_modes=["psd"])
    daemons = bench.per_concurrency(runs, [16, 32])
    assert [[r["label"] for r in group] for group in daemons] == [["psd c=16", "psd c=32"], ["psd k=3 e=0 c=16"]]
    assert [r["concurrency"] for r in daemons[0]] == [16, 32] and daemons[1][0]["group"] == "psd c=16"
    (single,) = bench.per_concurrency(runs[:1], [16])
    assert [r["label"] for r in single] == ["psd"]


def test_bench_timeline_png(tmp_path):
    jobs = []
    for step in range(400):  # psd-like: the drafter drafts one batch while the verifier checks the other
        t, batch = 0.02 * step, step % 2
        jobs.append({"role": "drafter", "start_s": 100 + t, "end_s": 100 + t + 0.015, "kind": "draft",
                     "batch": batch, "rows": 8, "positions": 48, "depth": 6, "kept": 32})
        jobs.append({"role": "verifier", "start_s": 100 + t, "end_s": 100 + t + 0.018, "kind": "verify",
                     "batch": 1 - batch, "rows": 8, "positions": 40})
    jobs.append({"role": "verifier", "start_s": 100.5, "end_s": 100.51, "kind": "prefill", "batch": None,
                 "rows": 2, "positions": None})
    assert bench.timeline_window(jobs, 4.0) == pytest.approx((101.999, 105.999))  # jobs span 100 .. 107.998
    assert bench.timeline_window(jobs[:2], 4.0) == pytest.approx((100.0, 100.018))
    assert [bench.job_text(j) for j in jobs[:2] + jobs[-1:]] == ["8x6\u219232", "8x5", "2r"]
    assert bench.job_text({**jobs[0], "kept": 48}) == "8x6"
    assert bench.draft_shape(jobs, 4.0) == pytest.approx({"depth": 6.0, "kept_per_row": 4.0})
    assert bench.draft_shape(jobs[1:2], 4.0) is None and bench.draft_shape([], 4.0) is None
    result = {"output_throughput": 123.0, "draft_shape": {"depth": 6.0, "kept_per_row": 4.0}}
    runs = [{"label": "psd k=3 e=2", "result": result, "timeline": jobs},
            {"label": "ar", "result": {"output_throughput": 50.0}, "timeline": []}]
    paths = bench.write_timelines(runs, str(tmp_path), 1.0)
    assert [os.path.basename(p) for p in paths] == ["timeline-psd_k_3_e_2.png", "timeline-ar.png", "timeline.png"]
    for path in paths:
        with open(path, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_bench_tokens_per_verified_position():
    result = {"num_accepted": 30, "num_drafted": 40, "num_verify_rows": 10}
    jobs = [{"role": "drafter", "start_s": 1.0, "end_s": 1.1, "kind": "draft", "batch": 0, "rows": 2,
             "positions": 12, "depth": 6, "kept": 8}]
    bench.add_status_fields(result, {"extra_draft": 2, "draft_budget": {"depth": 6, "capacity": 32},
                                     "recent_jobs": jobs})
    assert result["tokens_per_verified_position"] == pytest.approx(40 / 50)
    assert result["extra_draft"] == 2 and result["draft_budget"]["depth"] == 6
    assert result["draft_shape"] == {"depth": 6.0, "kept_per_row": 4.0}
    ar = {"num_accepted": 0, "num_drafted": 0, "num_verify_rows": 0}
    bench.add_status_fields(ar, {})
    assert ar["tokens_per_verified_position"] is None and ar["draft_budget"] is None and ar["draft_shape"] is None


# ---------------------------------------------------------------- the plan sweep (bench --sweep-concurrency)


def test_plan_sweep_plans_hold_the_same_live_requests():
    plan_sweep = load_tool("plan_sweep")
    plans = {p["name"]: p["overrides"] for p in plan_sweep.sweep_plans(2, 32)}
    assert list(plans) == ["auto", "ar x1", "sd x1", "psd 1+1", "ar x2", "sd x2", "psd x2"]
    assert "scheduler.max_batch=32" in plans["sd x2"] and "scheduler.max_batch=16" in plans["psd 1+1"]
    assert "scheduler.max_batch=16" in plans["auto"]  # auto holds two batches of max_batch, or one of both
    assert "verifier.cpu_cores=[0,1]" in plans["ar x2"] and "verifier.cpu_cores=[1]" in plans["ar x1"]


def test_plan_sweep_analysis_finds_the_best_plans_and_auto_against_them():
    plan_sweep = load_tool("plan_sweep")

    def result(rate: float, ids=(1, 2)) -> dict:
        return {"output_throughput": rate, "output_token_ids": {"0": list(ids)}, "tpot_ms": {"p50": 1000 / rate},
                "acceptance_rate": None, "num_failed": 0}

    results = {"auto": {1: result(9.5), 8: result(20.0)}, "sd x1": {1: result(10.0), 8: result(12.0)},
               "ar x2": {1: result(4.0), 8: result(21.0)}}
    report = plan_sweep.analyse(results, [1, 8])
    assert report["per_concurrency"][1]["best_fixed"] == "sd x1" and report["per_concurrency"][8]["best_fixed"] == "ar x2"
    assert report["auto_min_vs_best_fixed"] == pytest.approx(9.5 / 10)  # at 1; at 8 it is 20 / 21
    assert report["best_total_fixed"] == "ar x2"  # 25 tok/s over the sweep against sd x1's 22
    assert report["auto_vs_best_total_fixed"] == {"concurrency": 1, "ratio": pytest.approx(9.5 / 4)}
    assert report["greedy_identical"] == {"1": True, "8": True}
    results["sd x1"][8] = result(12.0, ids=(1, 3))
    assert plan_sweep.analyse(results, [1, 8])["greedy_identical"] == {"1": True, "8": False}
    text = plan_sweep.format_report(plan_sweep.analyse(results, [1, 8]))
    assert "concurrency 8:" in text and "c=8 NO" in text and "auto is 2.38x it" in text


def test_memory_tool_tiny(tmp_path):
    """Resident memory against what each worker needs; the tiny models need far less than the
    interpreter itself, so only a loose --max-ratio passes."""
    out = tmp_path / "memory.json"
    done = tool("memory.py", "--config", TINY, "--set", "scheduler.mode=psd", "--max-ratio", "100000", "--out", str(out))
    rows = {r["role"]: r for r in json.loads(out.read_text())}
    assert set(rows) == {"drafter", "verifier"}
    for r in rows.values():
        assert r["now"]["rss_anon"] > 0 and r["needed"] > 0 and r["ratio"] == pytest.approx(r["resident"] / r["needed"])
        assert r["at_ready"]["kv_cache"] > 0 and r["at_ready"]["weights_packed"] + r["at_ready"]["weights_plain"] > 0
    assert rows["drafter"]["at_ready"]["draft_buffers"] > 0 and rows["verifier"]["at_ready"]["draft_buffers"] == 0
    strict = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "memory.py"), "--config", TINY,
                             "--set", "scheduler.mode=ar"], cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert strict.returncode == 1 and "verifier" in strict.stdout  # the interpreter alone is over 1.15x


def test_step_profile_tiny(tmp_path):
    out = tmp_path / "steps.json"
    done = tool("step_profile.py", "--config", TINY, "--rows", "2,3", "--repeats", "1", "--out", str(out))
    (two, three) = json.loads(out.read_text())
    assert (two["rows"], three["rows"]) == (2, 3)
    for mode in ("ar", "sd"):
        m = two[mode]
        assert 0 < m["layers_s"] < m["verify_job_s"] and m["forward_alone_s"] > 0
        assert m["other_s"] == pytest.approx(m["verify_job_s"] - m["layers_s"] - m["lm_head_s"], abs=1e-4)
    assert two["sd"]["draft_job_s"] > 0 and "draft_job_s" not in two["ar"]
    assert "ar verify" in done.stdout and "sd verify" in done.stdout


def test_step_profile_gaps_between_back_to_back_jobs(tmp_path):
    step_profile = load_tool("step_profile")
    timeline = [{"role": "verifier", "kind": "verify", "start_s": start, "end_s": start + 0.5} for start in (0.0, 0.51, 1.03)]
    timeline += [{"role": "verifier", "kind": "verify", "start_s": 5.0, "end_s": 5.5},  # after a 3.47 s wait: not a gap
                 {"role": "verifier", "kind": "prefill", "start_s": 1.6, "end_s": 1.7}]
    path = tmp_path / "bench.json"
    path.write_text(json.dumps({"runs": [{"label": "ar", "timeline": timeline}]}))
    (row,) = step_profile.job_gaps(str(path), max_gap_s=0.05)
    assert row["role"] == "verifier" and row["num_jobs"] == 2
    assert row["gap_ms"] == pytest.approx(15.0) and row["gap_share"] == pytest.approx(0.015 / 0.515)


def test_plan_bounds_follow_the_memory_and_compute_limits():
    plan_bounds = load_tool("plan_bounds")
    # target: 1 s to read at 1 thread, 0.1 s of compute per position; draft: a tenth of both
    machine = {"cpu": "test", "models": {"target": {"weight_bytes": 10.0, "flops_per_position": 1.0,
                                                     "flops_per_prompt_token": 1.0},
                                          "draft": {"weight_bytes": 1.0, "flops_per_position": 0.1,
                                                    "flops_per_prompt_token": 0.1}},
               "limits": {"1": {"read_bytes_per_s": 10.0, "peak_flops": 10.0},
                          "2": {"read_bytes_per_s": 20.0, "peak_flops": 20.0}}}
    assert plan_bounds.plan_bound("ar x1", 1, 4, None, machine) == pytest.approx(1.0)  # memory-bound: 1 token / 1 s
    assert plan_bounds.plan_bound("ar x1", 20, 4, None, machine) == pytest.approx(10.0)  # compute-bound: 20 / 2 s
    assert plan_bounds.plan_bound("ar x2", 20, 4, None, machine) == pytest.approx(20.0)
    # sd x1, 2 rows, a = 3: drafting 4 x max(0.1, 0.02) = 0.4 s, verifying max(1, 10 x 0.1) = 1 s
    assert plan_bounds.plan_bound("sd x1", 2, 4, 3.0, machine) == pytest.approx(6 / 1.4)
    # psd 1+1, 4 rows: 2 a step, drafting 0.4 s hidden behind verifying max(1, 1) = 1 s
    assert plan_bounds.plan_bound("psd 1+1", 4, 4, 3.0, machine) == pytest.approx(6.0)
    assert plan_bounds.plan_bound("sd x1", 2, 4, None, machine) is None
    assert plan_bounds.plan_bound("auto", 2, 4, 3.0, machine) is None
    # a load: 20 prompt tokens at 0.1 s each (ar x1: the target's compute), then 20 tokens at 10 tok/s
    assert plan_bounds.load_bound("ar x1", 20, 4, None, machine, 20, 20) == pytest.approx(20 / (2.0 + 2.0))
    assert plan_bounds.load_bound("ar x1", 20, 4, None, machine, 0, 20) == pytest.approx(10.0)
    # psd 1+1: both models prefill at once on their own cores, max(0.1, 0.01) s a token
    assert plan_bounds.load_bound("psd 1+1", 4, 4, 3.0, machine, 10, 12) == pytest.approx(12 / (1.0 + 2.0))
    merged = plan_bounds.merge([machine, {**machine, "limits": {**machine["limits"], "1": {"read_bytes_per_s": 12.0,
                                                                                         "peak_flops": 9.0}}}])
    assert merged["limits"]["1"] == {"read_bytes_per_s": 12.0, "peak_flops": 10.0}


def test_bench_sweep_concurrency_runs_every_plan_at_every_load(tmp_path):
    out = tmp_path / "sweep"
    done = tool("bench.py", "--config", TINY, "--sweep-concurrency", "1,3", "--sweep-plans", "auto,ar x1,psd 1+1",
                "--requests", "3", "--max-tokens", "8", "--warmup", "0", "--out", str(out))
    report = json.loads((out / "sweep.json").read_text())
    assert set(report["results"]) == {"auto", "ar x1", "psd 1+1"}
    assert all(set(by_c) == {"1", "3"} for by_c in report["results"].values())
    assert report["greedy_identical"] == {"1": True, "3": True}
    assert set(report["machine"]["limits"]) == {str(t) for t in range(1, len(os.sched_getaffinity(0)) + 1)}
    for name in ("ar x1", "psd 1+1"):  # every fixed plan is set against its bound, measured in the run
        for r in report["results"][name].values():
            assert r["num_prompt_tokens"] > 0 and r["bound_tok_s"] > 0 and r["share_of_bound"] == pytest.approx(r["output_throughput"] / r["bound_tok_s"])
    assert report["results"]["auto"]["1"]["bound_tok_s"] is None
    # A sweep recorded without prompt counts is set against its bounds again with the config's tokenizer:
    # the counts it finds are the server's.
    plan_sweep = load_tool("plan_sweep")
    counted = {name: {c: r.pop("num_prompt_tokens") for c, r in by_c.items()} for name, by_c in report["results"].items()}
    (out / "stripped.json").write_text(json.dumps(report))
    again = plan_sweep.reanalyse(str(out / "stripped.json"), os.path.join(ROOT, "tools", "prompts.jsonl"))
    assert {name: {c: r["num_prompt_tokens"] for c, r in by_c.items()} for name, by_c in again["results"].items()} == counted
    assert again["results"]["ar x1"]["3"]["share_of_bound"] == pytest.approx(report["results"]["ar x1"]["3"]["share_of_bound"])
    assert report["per_concurrency"]["1"]["auto_plan_steps"]  # the plans auto ran during that load
    assert (out / "sweep.png").stat().st_size > 0
    for text in ("concurrency 1:", "concurrency 3:", "auto ran (steps):", "fixed plan with the best total"):
        assert text in done.stdout


def test_router_overhead_and_frames_cost_tools(tmp_path):
    """The two scaling tools run and write what they print: the router's cost per request for
    each replica count (every request routed, asserted inside), and one draft message's transfer
    against a memcpy of its bytes."""
    tool("router_overhead.py", "--replicas", "1,3", "--requests", "50", "--repeats", "1",
         "--json", str(tmp_path / "router.json"))
    rows = json.loads((tmp_path / "router.json").read_text())["rows"]
    assert [r["replicas"] for r in rows] == [1, 3] and all(r["routed_us"] > 0 and r["add_request_us"] > 0 for r in rows)
    tool("frames_cost.py", "--vocab", "512", "--rows", "2", "--depth", "3", "--repeats", "3",
         "--json", str(tmp_path / "frames.json"))
    cost = json.loads((tmp_path / "frames.json").read_text())
    header = cost["bytes_per_message"] - 2 * 3 * 8 - 2 * 3 * 512 * 4  # tokens and distributions of 2 sampled rows
    assert 0 < header < 200 and cost["transfer_ms"] > 0 and cost["memcpy_ms"] > 0


def test_no_tool_shadows_an_installed_module():
    """tools/ is on sys.path whenever a tool runs (a script's folder comes first) and after
    load_tool here, so a tool named like a module the environment has would be imported in its
    place: transformers 5.25 imports the `kernels` package, which tools/kernels.py once shadowed
    (CI: 117 errors). Every tool's name must be free in the standard library and site-packages."""
    import importlib.machinery

    tools = os.path.join(ROOT, "tools")
    outside = [p for p in sys.path if p and os.path.abspath(p) not in (tools, ROOT)]
    names = sorted(f[:-3] for f in os.listdir(tools) if f.endswith(".py"))
    assert names, tools
    taken = [n for n in names if n in sys.stdlib_module_names or importlib.machinery.PathFinder.find_spec(n, outside)]
    assert not taken, f"tools named like installed modules: {taken}"


def test_auto_forecast_reads_the_calibration_cache_and_names_the_plan_per_load(tmp_path, capsys):
    """tools/auto_forecast.py on a calibration measured against modelled costs (the fake
    machine of tests/test_calibration.py): the plan it names at each load is the modelled best,
    and a cache without the config's models is an error, not a guess."""
    from minedraft.runtime import calibration as cal
    from tests.test_calibration import ROOFLINE, calibrated

    auto_forecast = load_tool("auto_forecast")
    s = calibrated().s
    overrides = [f"model.cache_dir={tmp_path}", "scheduler.max_batch=16", "scheduler.max_len=4096",
                 "scheduler.max_tokens_cap=4000"]
    from minedraft.common.config import load_config

    config = load_config("tiny", ["scheduler.mode=auto", *overrides])
    cal.write_cache(cal.cache_path(config), "k1", {
        "budget": s.budget.calibration(), "seconds": 1.0, "measured_at": "2026-12-03T00:00:00",
        "models": [config.model.target, config.model.draft], "max_batch": 16})
    args = ["--config", "tiny", "--max-tokens", "400", "--concurrency", "1,16", "--json", str(tmp_path / "f.json")]
    for override in overrides:
        args += ["--set", override]
    assert auto_forecast.main(args) == 0
    table = json.loads((tmp_path / "f.json").read_text())["table"]
    assert [row["chosen"] for row in table] == [ROOFLINE.best(1)[1], ROOFLINE.best(16)[1]]
    assert "chosen" in capsys.readouterr().out
    assert auto_forecast.main([*args[:2], "--set", f"model.cache_dir={tmp_path}", "--set", "model.target=tiny-qwen2"]) == 1


def test_bench_sweep_fresh_gives_every_plan_a_fresh_daemon_per_load_in_turn(tmp_path):
    out = tmp_path / "sweep"
    done = tool("bench.py", "--config", TINY, "--sweep-concurrency", "1,3", "--sweep-plans", "auto,ar x1",
                "--requests", "3", "--max-tokens", "8", "--warmup", "0", "--sweep-fresh", "--sweep-rounds", "2",
                "--out", str(out))
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads((out / "sweep.json").read_text())
    assert report["fresh_daemons"] and report["rounds"] == 2 and report["greedy_identical"] == {"1": True, "3": True}
    served = [m for line in done.stderr.splitlines() if (m := re.match(r"\s+(.+) c=(\d+): ([\d.]+) tok/s", line))]
    order = [(m.group(1), int(m.group(2))) for m in served]
    # The plans take turns at each load, two rounds, the first plan rotating.
    assert order == [("auto", 1), ("ar x1", 1), ("ar x1", 1), ("auto", 1),
                     ("auto", 3), ("ar x1", 3), ("ar x1", 3), ("auto", 3)]
    printed = {}
    for m in served:
        printed.setdefault((m.group(1), m.group(2)), []).append(float(m.group(3)))
    for name, by_c in report["results"].items():
        for c, r in by_c.items():  # each plan's rate pools its two rounds
            assert r["round_tok_s"] == pytest.approx(printed[name, c], abs=0.006)
            assert r["num_requests"] == 2 * 3 and r["output_throughput"] == pytest.approx(r["num_output_tokens"] / r["wall_s"])
            assert min(r["round_tok_s"]) <= r["output_throughput"] <= max(r["round_tok_s"])
    assert "rounds: " in done.stdout
    refused = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "bench.py"), "--config", TINY,
                              "--sweep-concurrency", "1", "--sweep-rounds", "2"], capture_output=True, text=True)
    assert refused.returncode == 2 and "--sweep-rounds" in refused.stderr  # rounds take turns on fresh daemons only


def test_sweep_rounds_merge_pools_counts_and_flags_differing_outputs():
    plan_sweep = load_tool("plan_sweep")
    first = {"wall_s": 2.0, "num_requests": 2, "num_ok": 2, "num_failed": 0, "num_output_tokens": 20,
             "num_prompt_tokens": 10, "server_num_output_tokens": 20, "num_drafted": 8, "num_accepted": 4,
             "num_verify_rows": 4, "output_throughput": 10.0, "output_token_ids": {"0": [1, 2]},
             "plan_steps": {"ar x2": 3}, "tpot_ms": {"p50": 5.0}}
    second = {**first, "wall_s": 1.0, "num_accepted": 8, "output_throughput": 20.0, "plan_steps": {"ar x2": 2, "sd x2": 1}}
    merged = plan_sweep.merge_rounds([first, second])
    assert merged["output_throughput"] == pytest.approx(40 / 3) and merged["round_tok_s"] == [10.0, 20.0]
    assert merged["num_prompt_tokens"] == 20 and merged["acceptance_rate"] == pytest.approx(12 / 16)
    assert merged["mean_accepted_length"] == pytest.approx(1 + 12 / 8) and merged["plan_steps"] == {"ar x2": 5, "sd x2": 1}
    assert merged["round_plan_steps"] == [{"ar x2": 3}, {"ar x2": 2, "sd x2": 1}]
    assert merged["rounds_identical"] and merged["tpot_ms"] == first["tpot_ms"]
    differing = plan_sweep.merge_rounds([first, {**second, "output_token_ids": {"0": [1, 3]}}])
    results = {"a": {1: differing}, "b": {1: first}}
    assert not differing["rounds_identical"] and plan_sweep.greedy_identical(results, [1]) == {"1": False}
    assert plan_sweep.merge_rounds([first]) == first


def test_correction_guess_counts_the_drafts_second_choices(tmp_path):
    out = tmp_path / "guess.json"
    done = tool("correction_guess.py", "--config", TINY, "--num-prompts", "3", "--max-tokens", "8", "--out", str(out))
    result = json.loads(out.read_text())
    assert result["positions"] == 3 * 8 and 0 < result["draft_wrong"] <= result["positions"]  # the tiny draft is noisy
    assert result["second_right"] + result["third_right"] <= result["draft_wrong"]
    assert result["second_rate"] == result["second_right"] / result["draft_wrong"]
    assert f"its second choice is at {result['second_right']}" in done.stdout
    steps = result["step_outcomes"]
    assert 0 < steps["steps"] <= 3 * 8 and result["num_draft"] == 4
    assert steps["chain"] <= steps["any"] and steps["likeliest"] <= steps["likeliest_two"] <= steps["likeliest_four"] <= steps["any"]
    assert steps["chain"] <= steps["all_accepted"] <= steps["steps"]
    assert f"the bonus the chain's guess at {steps['chain']}" in done.stdout
    assert f"steps with k = 4 drafts: {steps['steps']}" in done.stdout


def test_plan_trace_prints_auto_plans_and_switches(tmp_path):
    out = tmp_path / "trace.json"
    done = tool("plan_trace.py", "--config", TINY, "--concurrency", "3", "--requests", "6", "--max-tokens", "32",
                "--set", "scheduler.calibrate=false", "--json", str(out))
    trace = json.loads(out.read_text())
    assert trace["tok_s"] > 0 and trace["changes"] and sum(trace["steps_by_plan"].values()) > 0
    assert all(c["plan"] for c in trace["changes"])
    assert "tok/s; steps by plan" in done.stdout
    for switch in trace["switches"]:  # uncalibrated, auto explores: every switch is printed with its reason
        assert f"-> {switch['to']} ({switch['reason']})" in done.stdout


def test_plan_sweep_samples_auto_in_the_middle_of_its_highest_load():
    plan_sweep = load_tool("plan_sweep")
    samples = [{"num_running": n, "plan": plan} for n, plan in
               [(1, "a"), (4, "b"), (4, "c"), (4, "d"), (3, "e"), (4, "f"), (1, "g")]]
    assert plan_sweep.steady_sample(samples)["plan"] == "d"  # b c d f at 4 live: the middle, not the last
    assert plan_sweep.steady_sample(samples[:1])["plan"] == "a"
    assert plan_sweep.steady_sample([]) is None
