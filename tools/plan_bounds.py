"""Each fixed plan's physical bound at a load, from limits measured in the same run: the read
bandwidth and matmul peak at 1 and N threads (tools/kernel_bench.py, pinned to that many cores) and
what one forward of each model costs (weights read, FLOPs per position). Used by
tools/plan_sweep.py, which sets every measured rate against its bound.

With L live rows, k drafts per verified row (the mean the plan drafted: rows draft fewer near
their max_tokens), `a` committed tokens per verified row (the mean accepted length the plan
measured), and per model and thread count t a read time R_t (target) / r_t (draft) and a
compute time per position C_t / c_t:

    ar x t     L / max(R_t, L C_t)
    sd x t     L a / (k max(r_t, L c_t) + max(R_t, (k+1) L C_t))       draft k steps, then verify
    psd 1+1    h a / max(k max(r_1, h c_1), max(R_1, (k+1) h C_1))     h = ceil(L / 2) rows a step,
                                                                       drafting hidden behind verifying

psd 1+1 gives each worker a core's full bandwidth, which two workers reading at once do not
get: its bound is the optimistic one. psd on all cores and auto have no bound here.

A load's prompts are work too: with P prompt tokens and T output tokens, the load's bound is
T / (P x prefill + T / steady), prefill the compute time of a prompt token (a prompt is many
positions at once: compute-bound; no lm_head, which only runs where logits are wanted): the
target's for ar; for sd and psd both models prefill, on their own cores at once (x1, 1+1: the
larger) or in turn on all cores (x2: the sum).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import tempfile

TOOLS = os.path.dirname(os.path.abspath(__file__))


def measure(config: str, num_threads: int, overrides: list[str] = ()) -> dict:
    """{"limits": {threads: {read_bytes_per_s, peak_flops}}, "models": {target, draft costs}} from
    one tools/kernel_bench.py run in its own process (it pins itself to num_threads cores)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "limits.json")
        command = [sys.executable, os.path.join(TOOLS, "kernel_bench.py"), "--config", config, "--skip-linears",
                   "--skip-forwards", "--costs", "--threads", str(num_threads), "--out", out]
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"measuring the machine's limits failed: {done.stderr.strip()[-500:]}")
        with open(out) as f:
            report = json.load(f)
    limits = {str(lim["threads"]): {"read_bytes_per_s": lim["read_bytes_per_s"], "peak_flops": lim["peak_flops"]}
              for lim in report["limits"]}
    return {"cpu": report.get("cpu", "?"), "limits": limits, "models": report["models"]}


def merge(measured: list[dict]) -> dict:
    """Limits measured before and after a sweep: each the highest seen (the tightest bound)."""
    limits = {t: {key: max(m["limits"][t][key] for m in measured) for key in measured[0]["limits"][t]}
              for t in measured[0]["limits"]}
    return {**measured[0], "limits": limits, "measured": [m["limits"] for m in measured]}


def load_bound(name: str, rows: int, num_draft: float, accepted_length: float | None, machine: dict,
               num_prompt_tokens: int, num_output_tokens: int) -> float | None:
    """Output tokens/s the plan cannot exceed on a whole load: its prompts' prefill, then decoding
    at plan_bound; None where plan_bound has none."""
    steady = plan_bound(name, rows, num_draft, accepted_length, machine)
    if steady is None or num_output_tokens <= 0:
        return steady
    mode, _, threads = name.partition(" ")
    t = "1" if threads == "1+1" else threads[1:]
    lim = machine["limits"][t]
    target_c = machine["models"]["target"]["flops_per_prompt_token"] / lim["peak_flops"]
    draft_c = machine["models"]["draft"]["flops_per_prompt_token"] / lim["peak_flops"]
    if mode == "ar":
        per_token = target_c
    elif threads in ("x1", "1+1"):
        per_token = max(target_c, draft_c)
    else:
        per_token = target_c + draft_c
    return num_output_tokens / (num_prompt_tokens * per_token + num_output_tokens / steady)


def plan_bound(name: str, rows: int, num_draft: float, accepted_length: float | None, machine: dict) -> float | None:
    """Tokens/s the plan `name` ("ar x1", "sd x2", "psd 1+1") cannot exceed while decoding with
    `rows` live rows; None for plans without a bound here (auto, psd on all cores) or with no
    acceptance."""
    mode, _, threads = name.partition(" ")
    target, draft = machine["models"]["target"], machine["models"]["draft"]

    def costs(t: str) -> tuple[float, float, float, float]:
        lim = machine["limits"][t]
        return (target["weight_bytes"] / lim["read_bytes_per_s"], target["flops_per_position"] / lim["peak_flops"],
                draft["weight_bytes"] / lim["read_bytes_per_s"], draft["flops_per_position"] / lim["peak_flops"])

    k, L = num_draft, rows
    if mode == "ar" and threads.startswith("x"):
        R, C, _, _ = costs(threads[1:])
        return L / max(R, L * C)
    if accepted_length is None:
        return None
    a = accepted_length
    if mode == "sd" and threads.startswith("x"):
        R, C, r, c = costs(threads[1:])
        return L * a / (k * max(r, L * c) + max(R, (k + 1) * L * C))
    if mode == "psd" and threads == "1+1":
        R, C, r, c = costs("1")
        h = math.ceil(L / 2)
        return h * a / max(k * max(r, h * c), max(R, (k + 1) * h * C))
    return None


def describe(machine: dict) -> str:
    parts = [f"{t} thread{'s' if t != '1' else ''}: read {lim['read_bytes_per_s'] / 1e9:.1f} GB/s, "
             f"peak {lim['peak_flops'] / 1e9:.1f} GFLOP/s" for t, lim in sorted(machine["limits"].items())]
    models = ", ".join(f"{role} {m['weight_bytes'] / 1e9:.2f} GB read, {m['flops_per_position'] / 1e9:.2f} GFLOP/position"
                       for role, m in machine["models"].items())
    return f"{machine['cpu']}; " + "; ".join(parts) + f"; {models}"
