"""Section c of tools/gpu_check.py: AR / SD / PSD throughput, one daemon per (batch, mode), each
started through the CLI on a private ipc:// endpoint and run dir, measured over a window of
status() counters after a warm-up. Imports neither torch nor zmq at module level.

Per run: output tokens/s (client wall time), busy fraction per worker, overlap efficiency
((drafter busy + verifier busy) / (2 x wall), docs/design.md section 7), the fraction of wall time both
workers were busy at once (from the daemon's busy intervals), jobs and mean job time per worker,
rows per verify job, acceptance, and the greedy match rate against ar. With --device cpu the
models are section d's (configs/tiny.toml), so the sd and psd daemons also serve section d's
seeded sampled requests after the window (run["exchange"]): no daemon is started twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MODES = ("ar", "sd", "psd")
QWEN_VOCAB_SIZE = 151936
RANDOM_QWEN = ["model.target=random-qwen2.5-coder-1.5b", "model.draft=random-qwen2.5-coder-0.5b",
               "model.dtype=bfloat16"]


def cli(*args: str, timeout_s: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "minedraft.runtime.cli", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout_s)


@contextlib.contextmanager
def running_daemon(overrides: list[str], stopping: list):
    """A daemon on configs/tiny.toml + overrides. At the end its stop is started and appended to
    `stopping` as (Popen, temp dir), so that it overlaps the next start (finish_stops waits)."""
    tmp = tempfile.mkdtemp(prefix="mdgpu-")
    endpoint = f"ipc://{tmp}/client.sock"
    args = ["--config", "configs/tiny.toml", "--endpoint", endpoint, "--set", f"server.run_dir={tmp}/run"]
    for override in overrides:
        args += ["--set", override]
    started = cli("start", *args)
    if started.returncode != 0:
        shutil.rmtree(tmp, ignore_errors=True)
        last = next((line for line in reversed(started.stderr.splitlines()) if line.strip()), "")
        raise RuntimeError(f"daemon failed to start: {last.strip()}\n{started.stderr[-3000:]}")
    try:
        yield endpoint
    finally:
        stop = subprocess.Popen([sys.executable, "-m", "minedraft.runtime.cli", "stop", *args], cwd=ROOT,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        stopping.append((stop, tmp))


def finish_stops(stopping: list) -> None:
    for stop, tmp in stopping:
        try:
            stop.wait(60)
        except subprocess.TimeoutExpired:
            stop.kill()
            stop.wait()
        shutil.rmtree(tmp, ignore_errors=True)


def both_busy_s(drafter: list, verifier: list, start_s: float, end_s: float) -> float:
    """Seconds inside [start_s, end_s] during which both workers ran a job (over the intervals the
    daemon still keeps; one worker's own intervals never overlap)."""
    def clip(spans):
        return sorted((max(a, start_s), min(b, end_s)) for a, b in spans if b > start_s and a < end_s)

    d, v, i, j, total = clip(drafter), clip(verifier), 0, 0, 0.0
    while i < len(d) and j < len(v):
        total += max(0.0, min(d[i][1], v[j][1]) - max(d[i][0], v[j][0]))
        if d[i][1] < v[j][1]:
            i += 1
        else:
            j += 1
    return total


async def measure(endpoint: str, requests: list[dict], concurrency: int, timeout_s: float,
                  sampled: list[dict] | None = None) -> dict:
    """Warm up, then run `requests` with at most `concurrency` in flight; window metrics. Then the
    `sampled` requests, if any (section d's exchange check, outside the window)."""
    from minedraft.runtime.client import AsyncClient

    async with AsyncClient(endpoint, timeout_s=timeout_s) as client:
        warmup = [client.generate(prompt_ids=r["prompt_ids"], max_tokens=4, ignore_eos=True)
                  for r in requests[:concurrency]]
        await asyncio.gather(*warmup)  # CUDA lazy init, kernel selection, allocator growth
        before = await client.status(True)
        gate = asyncio.Semaphore(concurrency)

        async def one(r):
            async with gate:
                c = await client.generate(prompt_ids=r["prompt_ids"], max_tokens=r["max_tokens"], ignore_eos=True)
                return r["request_id"], c.token_ids

        start_s = time.monotonic()
        outputs = dict(await asyncio.gather(*(one(r) for r in requests)))
        end_s = time.monotonic()
        after = await client.status(True)
        exchange = await sampled_pass(client, sampled) if sampled else None
    wall_s = end_s - start_s
    roles = ("drafter", "verifier")
    busy = {role: after["busy_s"][role] - before["busy_s"][role] for role in roles}
    jobs = {role: after["num_jobs"][role] - before["num_jobs"][role] for role in roles}
    drafted, accepted, rows = (after[k] - before[k] for k in ("num_drafted", "num_accepted", "num_verify_rows"))
    num_tokens = sum(len(ids) for ids in outputs.values())
    intervals = after["busy_intervals"]
    return {
        "num_requests": len(requests), "num_output_tokens": num_tokens, "wall_s": wall_s,
        "output_tokens_per_s": num_tokens / wall_s,
        "busy_fraction": {role: busy[role] / wall_s for role in roles},
        "overlap_efficiency": (busy["drafter"] + busy["verifier"]) / (2 * wall_s),
        "both_busy_fraction": both_busy_s(intervals["drafter"], intervals["verifier"], start_s, end_s) / wall_s,
        "num_jobs": jobs,
        "mean_job_ms": {role: 1000 * busy[role] / jobs[role] if jobs[role] else None for role in roles},
        "rows_per_verify_job": rows / jobs["verifier"] if jobs["verifier"] else None,
        "acceptance_rate": accepted / drafted if drafted else None,
        "mean_accepted_length": 1 + accepted / rows if rows else None,
        "output_token_ids": outputs,
        **({"exchange": exchange} if exchange else {}),
    }


async def sampled_pass(client, requests: list[dict]) -> dict:
    """Seeded sampled requests, all in flight at once (they stop at EOS, as the in-process engine
    does); their tokens, the acceptance over them, and where the verifier reads the draft buffers."""
    before = await client.status()

    async def one(r):
        c = await client.generate(prompt_ids=r["prompt_ids"], max_tokens=r["max_tokens"],
                                  temperature=r["temperature"], seed=r["seed"], request_id=r["request_id"])
        return r["request_id"], c.token_ids

    outputs = dict(await asyncio.gather(*(one(r) for r in requests)))
    after = await client.status()
    drafted, accepted = (after[k] - before[k] for k in ("num_drafted", "num_accepted"))
    return {"output_token_ids": outputs, "acceptance_rate": accepted / drafted if drafted else None,
            "draft_buffers": after.get("draft_buffers")}


SAMPLED_MAX_TOKENS = 32


def sampled_requests() -> list[dict]:
    """Section d's 16 seeded sampled requests (temperature 0.8, byte prompts of 4..24 ids)."""
    rng = random.Random(2)
    return [{"request_id": f"s{i}", "prompt_ids": [rng.randrange(256) for _ in range(rng.randint(4, 24))],
             "max_tokens": SAMPLED_MAX_TOKENS, "temperature": 0.8, "seed": 1000 + i} for i in range(16)]


def make_requests(num: int, max_tokens: int, is_cuda: bool) -> list[dict]:
    """Seeded random prompts: 32..128 ids over the Qwen vocabulary (cuda) or 4..24 bytes (cpu)."""
    rng = random.Random(1)
    lengths, num_ids = ((32, 128), QWEN_VOCAB_SIZE) if is_cuda else ((4, 24), 256)
    return [{"request_id": f"g{i}", "prompt_ids": [rng.randrange(num_ids) for _ in range(rng.randint(*lengths))],
             "max_tokens": max_tokens} for i in range(num)]


def section_c(args, device: str, num_gpus: int) -> dict:
    """args: batches, requests_per_batch, max_tokens, budget_s (see gpu_check.parse_args)."""
    try:
        import zmq  # noqa: F401
    except ImportError:
        return {"status": "skipped: pyzmq is not installed (see tools/gpu_check.py's docstring to carry a wheel)"}
    is_cuda = device == "cuda"
    if is_cuda:
        devices, models = ("cuda:0", "cuda:1" if num_gpus >= 2 else "cuda:0"), RANDOM_QWEN
    else:
        devices, models = ("cpu", "cpu"), ["model.dtype=float32"]  # configs/tiny.toml's tiny models
    result = {"devices": {"drafter": devices[0], "verifier": devices[1]}, "models": models, "runs": [],
              "is_shared_gpu": is_cuda and devices[0] == devices[1], "status": "ok"}
    if result["is_shared_gpu"]:
        result["note"] = ("one GPU shared by the drafter and verifier processes: their two CUDA contexts "
                          "time-slice it (no MPS assumed); compare mean_job_ms in psd with sd")
    max_len = max(64, 1 << (args.max_tokens + 160).bit_length())  # prompts <= 128 ids, drafts, slack
    max_tokens_cap = max(args.max_tokens, SAMPLED_MAX_TOKENS)
    base = [*models, f"scheduler.max_len={max_len}", f"scheduler.max_tokens_cap={max_tokens_cap}",
            f"drafter.device={devices[0]}", f"verifier.device={devices[1]}", "drafter.cpu_cores=[]",
            "verifier.cpu_cores=[]", "server.startup_timeout_s=300"]
    deadline_s, stopping = time.monotonic() + args.budget_s, []
    # tiny models on the CPU: the sd and psd daemons of the first batch size serve section d too
    exchange_requests = None if is_cuda or "d" in args.skip else sampled_requests()
    try:
        for batch in args.batches:
            requests = make_requests(args.requests_per_batch * batch, args.max_tokens, is_cuda)
            for mode in MODES:
                overrides = [*base, f"scheduler.mode={mode}", f"scheduler.max_batch={batch}"]
                sampled = exchange_requests if mode != "ar" and batch == args.batches[0] else None
                result["runs"].append(run_one(overrides, requests, batch, mode, deadline_s, args.budget_s, stopping,
                                              sampled))
            greedy_match(result["runs"], batch, is_strict=not is_cuda)
    finally:
        finish_stops(stopping)
    for run in result["runs"]:
        run.pop("output_token_ids", None)
        if run["status"].startswith("failed"):
            result["status"] = "failed"
    return result


def run_one(overrides, requests, batch, mode, deadline_s, budget_s, stopping, sampled=None) -> dict:
    label = {"batch": batch, "mode": mode}
    if time.monotonic() > deadline_s:
        return {**label, "status": f"skipped: past --budget-s {budget_s}"}
    start_s = time.monotonic()
    try:
        with running_daemon(overrides, stopping) as endpoint:  # 2 batches' worth in flight
            run = asyncio.run(measure(endpoint, requests, 2 * batch, timeout_s=600, sampled=sampled))
    except Exception as exc:
        message = f"{type(exc).__name__}: {exc}"
        return {**label, "status": "failed: " + message.splitlines()[0], "error": message}
    return {**label, "status": "ok", **run, "total_s": time.monotonic() - start_s}


def greedy_match(runs: list[dict], batch: int, is_strict: bool) -> None:
    """Greedy outputs of every mode against ar's. float32 (cpu, tiny models) must agree exactly;
    bfloat16 may flip near-ties with the batch a row shares (docs/design.md section 5): reported only."""
    by_mode = {r["mode"]: r for r in runs if r["batch"] == batch and "output_token_ids" in r}
    if "ar" not in by_mode:
        return
    base = by_mode["ar"]["output_token_ids"]
    for run in by_mode.values():
        run["greedy_match_vs_ar"] = sum(run["output_token_ids"].get(k) == v for k, v in base.items()) / len(base)
        if is_strict and run["greedy_match_vs_ar"] != 1.0:
            run["status"] = "failed: greedy output differs from ar in float32"


def table_lines(c: dict) -> list[str]:
    header = ("batch", "mode", "out tok/s", "vs sd", "busy d/v", "overlap", "both busy", "draft ms",
              "verify ms", "jobs d/v", "rows/job", "accept", "match ar")
    rows = [header]
    for r in c.get("runs", []):
        if r["status"] != "ok":
            rows.append((str(r["batch"]), r["mode"], r["status"][:120]))
            continue
        sd = next((x for x in c["runs"] if x["batch"] == r["batch"] and x["mode"] == "sd" and x["status"] == "ok"),
                  None)
        busy, ms, jobs = r["busy_fraction"], r["mean_job_ms"], r["num_jobs"]
        rows.append((
            str(r["batch"]), r["mode"], fmt(r["output_tokens_per_s"], ".0f"),
            fmt(r["output_tokens_per_s"] / sd["output_tokens_per_s"] if sd else None) + "x",
            f"{busy['drafter']:.2f}/{busy['verifier']:.2f}", fmt(r["overlap_efficiency"]),
            fmt(r["both_busy_fraction"]), fmt(ms["drafter"], ".1f"), fmt(ms["verifier"], ".1f"),
            f"{jobs['drafter']}/{jobs['verifier']}", fmt(r["rows_per_verify_job"], ".1f"),
            fmt(r["acceptance_rate"], ".3f"), fmt(r.get("greedy_match_vs_ar")),
        ))
    widths = [max(len(row[i]) for row in rows if len(row) == len(header)) for i in range(len(header))]
    return ["   " + "  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() if len(row) == len(header)
            else "   " + "  ".join(row) for row in rows]


def fmt(value, spec: str = ".2f") -> str:
    return "-" if value is None else format(value, spec)
