"""tools/ end to end on configs/tiny.toml: bench.py (three daemons, greedy outputs identical
across modes, JSON and PNG written), loadtest.py with Poisson arrivals and bench_hf.py against a
shared running daemon. Few requests and tokens: this checks the plumbing, not the speed."""

import json
import os
import subprocess
import sys

import pytest

from tests.runtime_utils import ROOT, TINY, running_daemon

LATENCY_KEYS = ("ttft_ms", "tpot_ms", "e2e_ms", "itl_ms")


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
    for label in ("ar", "sd", "psd", "out tok/s", "TTFT p50", "overlap"):
        assert label in done.stdout


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


def test_kernels_tool_tiny(tmp_path):
    out = tmp_path / "kernels.json"
    done = tool("kernels.py", "--models", "tiny-qwen2", "--rows", "1,5", "--out", str(out))
    report = json.loads(out.read_text())
    (limits,) = report["limits"]
    assert limits["threads"] == 1 and limits["read_bytes_per_s"] > 1e8 and limits["peak_flops"] > 1e8
    shapes = {r["shape"] for r in report["linears"]}
    assert shapes == {"q_proj / o_proj", "k_proj / v_proj", "qkv_proj (merged)", "gate_proj / up_proj",
                      "gate_up_proj (merged)", "down_proj", "lm_head"}
    assert {r["shape"] for r in report["linears"] if r["plain_path_only"]} == {"k_proj / v_proj", "gate_proj / up_proj"}
    for r in report["linears"]:
        assert r["m"] in (1, 5) and r["bound_s"] > 0 and "plain" in r["times_s"]
        assert all(t > 0 and r["ratios"][impl] == t / r["bound_s"] for impl, t in r["times_s"].items())
    forwards = {(f["path"], f["rows"], f["positions"]) for f in report["forwards"]}
    assert forwards == {(path, r, p) for path in ("plain", "auto") for r, p in ((1, 1), (1, 5), (8, 1), (8, 5), (16, 5))}
    assert report["linear_paths"]["tiny-qwen2"]["plain"]["shapes"]
    for label in ("read", "GB/s", "matmul peak", "whole forwards", "lm_head"):
        assert label in done.stdout
