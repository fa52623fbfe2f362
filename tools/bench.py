"""Side-by-side benchmark of the runtime's modes: for each mode a fresh daemon is started through
the CLI (private ipc:// endpoint and run dir under a temp dir), the same load runs against it
(tools/loadtest.py), and the daemon is stopped. Prints one table, writes <out>/bench.json and
<out>/bench.png, and checks that greedy outputs are identical across modes.

    python tools/bench.py --config tiny --requests 32 --concurrency 16 --max-tokens 64
    python tools/bench.py --config tiny --modes sd,psd --sweep-k 2,4,6 --sweep-batch 4,8
    python tools/bench.py --config default --modes ar,sd,psd --linear-paths auto,plain
    python tools/bench.py --modes sd,psd --transports frames,shared --temperature 0.8   # draft transports
    python tools/bench.py --config tiny --modes sd,psd,sd-tetris,psd-tetris,sd-adaptive,psd-adaptive --extra-draft 2
    python tools/bench.py --config tiny --modes psd-adaptive --sweep-k 2,4 --sweep-e 0,2 --sweep-modes psd
    python tools/bench.py --config default --sweep-concurrency 1,2,4,8,16,32 --requests 32 --max-tokens 64

Modes: ar, sd, psd, and sd-2t (sd with two threads per worker on both cores, so psd is compared
with sd given the same total cores); sd-tetris / psd-tetris (TETRIS: draft k + e tokens per row,
verify the likeliest k x rows positions; e = --extra-draft) and sd-adaptive / psd-adaptive (depth
and verify capacity chosen each step from measured costs, up to k + e deep). A sweep runs every
(k, e) pair of --sweep-k x --sweep-e for each of --sweep-modes and names the best fixed pair.
After each load the last jobs of both workers are drawn as <out>/timeline-<label>.png and all
together as <out>/timeline.png (--timeline-s seconds from the middle of the recorded jobs).
--sweep-concurrency runs every fixed plan (ar, sd, psd at one thread per worker and on all cores)
and auto at each concurrency instead (tools/plan_sweep.py: sweep.json, sweep.png).
At temperature 0 in float32 a greedy difference between modes is an error (exit 1); in bfloat16
the match rate is reported instead (docs/design.md section 5). Failed requests also make the exit
status 1.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from loadtest import DEFAULT_PROMPTS, load_prompts, run_loadtest  # noqa: E402

from minedraft.runtime.client import Client  # noqa: E402
from minedraft.common.config import ConfigError, load_config  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODES = ("ar", "sd", "psd", "sd-2t", "sd-tetris", "psd-tetris", "sd-adaptive", "psd-adaptive", "sd-nopredraft",
         "psd-nopredraft")
SWEEP_MODES = ("psd", "sd")  # what --sweep-k / --sweep-e / --sweep-batch run by default
DEFAULT_EXTRA_DRAFT = 2  # e of the tetris and adaptive modes
WARMUP_MAX_TOKENS = 8
STATUS_TIMEOUT_S = 10.0
TIMELINE_S = 4.0  # seconds of the recorded jobs drawn, from their middle
TIMELINE_LANES = {"verifier": 0, "drafter": 1}
TIMELINE_COLORS = {0: "tab:blue", 1: "tab:orange", None: "tab:gray", "predraft": "tab:green"}  # batch 0, batch 1, prefill, pre-draft
TIMELINE_CHAR_WIDTH = 0.004  # a bar label character's width as a fraction of the drawn window


def mode_overrides(mode: str, extra_draft: int = DEFAULT_EXTRA_DRAFT) -> list[str]:
    """The --set overrides that make a daemon run `mode`; extra_draft is e of tetris / adaptive."""
    extra = f"scheduler.extra_draft={extra_draft}"
    return {
        "ar": ["scheduler.mode=ar"],
        "sd": ["scheduler.mode=sd"],
        "psd": ["scheduler.mode=psd"],
        "sd-2t": ["scheduler.mode=sd", "drafter.num_threads=2", "drafter.cpu_cores=[0,1]",
                  "verifier.num_threads=2", "verifier.cpu_cores=[0,1]"],
        "sd-tetris": ["scheduler.mode=sd", extra, "scheduler.draft_policy=fixed"],
        "psd-tetris": ["scheduler.mode=psd", extra, "scheduler.draft_policy=fixed"],
        "sd-adaptive": ["scheduler.mode=sd", extra, "scheduler.draft_policy=adaptive"],
        "psd-adaptive": ["scheduler.mode=psd", extra, "scheduler.draft_policy=adaptive"],
        "sd-nopredraft": ["scheduler.mode=sd", "scheduler.predraft=false"],  # sd and psd pre-draft by default
        "psd-nopredraft": ["scheduler.mode=psd", "scheduler.predraft=false"],
    }[mode]


def _with_override(overrides: list[str], key: str, value) -> list[str]:
    """overrides with `key=value`: in place of an earlier value of key, else appended."""
    setting = f"{key}={value}"
    if any(o.partition("=")[0] == key for o in overrides):
        return [setting if o.partition("=")[0] == key else o for o in overrides]
    return overrides + [setting]


def cli(*args: str, timeout_s: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "minedraft.runtime.cli", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout_s)


def daemon_run_dir(endpoint: str) -> str:
    """The run folder (daemon.log, pid, sockets) of running_daemon's daemon at `endpoint`."""
    return os.path.join(os.path.dirname(endpoint.removeprefix("ipc://")), "run")


@contextlib.contextmanager
def running_daemon(config: str | None, overrides: list[str]):
    """Start a daemon via the CLI on a private ipc:// endpoint; yield the endpoint; stop it."""
    tmp = tempfile.mkdtemp(prefix="mdbench-")
    endpoint = f"ipc://{tmp}/client.sock"
    args = ["--endpoint", endpoint, "--set", f"server.run_dir={daemon_run_dir(endpoint)}"]
    if config is not None:
        args = ["--config", config, *args]
    for override in overrides:
        args += ["--set", override]
    try:
        started = cli("start", *args)
        if started.returncode != 0:
            raise RuntimeError(f"daemon failed to start ({' '.join(overrides)}):\n{started.stderr[-4000:]}")
        try:
            yield endpoint
        finally:
            stopped = cli("stop", *args)
            if stopped.returncode != 0:
                print(f"warning: stop failed: {stopped.stderr.strip()}", file=sys.stderr)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def plan_runs(modes: list[str], sweep_k: list[int], sweep_batch: list[int], linear_paths: list[str] = (),
              sweep_e: list[int] = (), sweep_modes: list[str] = SWEEP_MODES,
              extra_draft: int = DEFAULT_EXTRA_DRAFT, variant_key: str = "model.linear_path") -> list[dict]:
    """(label, mode, extra overrides) of every daemon to start, in order. With several linear
    paths (or values of another variant_key, such as cluster.draft_transport) each mode runs on
    each (label "mode/path"), compared with sd on the same path. Sweeps
    run each of sweep_modes per (k, e) pair ("psd k=3 e=2"; "psd k=3" without sweep_e) and per
    max_batch ("psd batch=8"); a sweep run's "sweep" holds its swept values."""
    if len(linear_paths) > 1:
        return [{"label": f"{m}/{path}", "mode": m,
                 "overrides": mode_overrides(m, extra_draft) + [f"{variant_key}={path}"],
                 "sd_label": f"sd/{path}", "variant": path} for m in modes for path in linear_paths]
    overrides = [f"{variant_key}={linear_paths[0]}"] if linear_paths else []
    runs = [{"label": m, "mode": m, "overrides": mode_overrides(m, extra_draft) + overrides, "sd_label": "sd"}
            for m in modes]
    for k in sweep_k or ([None] if sweep_e else []):
        for e in sweep_e or [None]:
            name = " ".join(f"{key}={value}" for key, value in (("k", k), ("e", e)) if value is not None)
            for mode in sweep_modes:
                mode_set = mode_overrides(mode, extra_draft)
                if k is not None:
                    mode_set = _with_override(mode_set, "scheduler.num_draft", k)
                if e is not None:
                    mode_set = _with_override(mode_set, "scheduler.extra_draft", e)
                runs.append({"label": f"{mode} {name}", "mode": mode, "overrides": mode_set,
                             "sd_label": f"sd {name}", "sweep": {"k": k, "e": e}})
    for value in sweep_batch:
        for mode in sweep_modes:
            runs.append({"label": f"{mode} batch={value}", "mode": mode,
                         "overrides": _with_override(mode_overrides(mode, extra_draft), "scheduler.max_batch", value),
                         "sd_label": f"sd batch={value}", "sweep": {"batch": value}})
    return runs


def per_concurrency(runs: list[dict], concurrencies: list[int]) -> list[list[dict]]:
    """The runs of each daemon: one per concurrency (labels get " c=N" when there are several),
    sweep runs at the first concurrency only."""
    daemons = []
    for run in runs:
        values = concurrencies[:1] if "sweep" in run else concurrencies
        suffix = (lambda c: f" c={c}") if len(concurrencies) > 1 else (lambda c: "")  # noqa: E731
        daemons.append([dict(run, label=run["label"] + suffix(c), sd_label=run["sd_label"] + suffix(c),
                             group=run["mode"] + suffix(c), concurrency=c, daemon_label=run["label"])
                        for c in values])
    return daemons


def best_fixed(runs: list[dict]) -> dict:
    """Per base mode (sd, psd; per concurrency when there are several): the fastest run with a
    fixed draft budget, among the (k, e) sweep and the plain and tetris modes, with its k and e
    (the daemon's own where not swept). The adaptive modes are what this is compared with."""
    best = {}
    for run in runs:
        sweep = run.get("sweep", {})
        base = run["mode"].removesuffix("-tetris")
        if base not in ("sd", "psd") or "sweep" in run and "k" not in sweep and "e" not in sweep:
            continue
        r = run["result"]
        group = base + run.get("group", run["mode"]).removeprefix(run["mode"])  # keeps " c=N"
        if group not in best or r["output_throughput"] > best[group]["output_throughput"]:
            best[group] = {"label": run["label"], "output_throughput": r["output_throughput"],
                           "k": sweep["k"] if sweep.get("k") is not None else r.get("num_draft"),
                           "e": sweep["e"] if sweep.get("e") is not None else r.get("extra_draft")}
    return best


def format_best_fixed(best: dict) -> str:
    return "\n".join(f"best fixed {mode}: k={b['k']} e={b['e']} ({b['label']}), {b['output_throughput']:.1f} tok/s"
                     for mode, b in best.items())


def predraft_delta(before: dict | None, after: dict | None) -> dict | None:
    """One load's pre-drafting counters: the daemon's status after it less before it (None: off
    or nothing checked)."""
    if not after or not after.get("is_on", True):
        return None
    count = lambda p, kind: p["branches"].get(kind, {"hits": 0})["hits"] if p else 0  # noqa: E731
    checked = after["branches"]["full"]["checked"] - (before["branches"]["full"]["checked"] if before else 0)
    if checked <= 0:
        return None
    return {"checked": checked, "full": count(after, "full") - count(before, "full"),
            "short": count(after, "short") - count(before, "short"),
            "drafts_served": after["drafts_served"] - (before["drafts_served"] if before else 0)}


def detailed_status(endpoint: str) -> dict:
    """status(True) of a running daemon: its recent jobs and its last draft budget."""
    with Client(endpoint, timeout_s=STATUS_TIMEOUT_S) as client:
        return client.status(True)


def add_status_fields(result: dict, status: dict, window_s: float = TIMELINE_S) -> None:
    """Fields of the run's result that loadtest does not give: e, the last step's draft budget
    (at the end of the load: a tail step), the drafts' shape in the timeline window, and
    committed tokens per verified position over the load (accepted drafts + one per row, over
    drafts verified + one per row)."""
    result["extra_draft"] = status.get("extra_draft")
    result["draft_budget"] = status.get("draft_budget")
    result["draft_shape"] = draft_shape(status.get("recent_jobs", []), window_s)
    rows = result["num_verify_rows"]
    result["tokens_per_verified_position"] = (
        (result["num_accepted"] + rows) / (result["num_drafted"] + rows) if rows else None)


def greedy_check(runs: list[dict]) -> dict:
    """Compare every run's output ids with the first run's, request by request."""
    base = runs[0]
    keys = sorted(base["result"]["output_token_ids"], key=lambda k: [float(x) for x in k.split(".")])
    num_requests = base["result"]["requests"]
    differences, match_rate = [], {}
    for run in runs[1:]:
        outputs = run["result"]["output_token_ids"]
        num_same = 0
        for key in sorted(set(keys) | set(outputs), key=lambda k: [float(x) for x in k.split(".")]):
            a, b = base["result"]["output_token_ids"].get(key), outputs.get(key)
            if a is not None and a == b:
                num_same += 1
                continue
            at = None if a is None or b is None else next(
                (i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
            differences.append({"label": run["label"], "baseline": base["label"], "prompt": key, "first_diff_at": at})
        match_rate[run["label"]] = num_same / num_requests if num_requests else None
    return {"baseline": base["label"], "num_requests": num_requests, "is_identical": not differences,
            "differences": differences, "match_rate": match_rate}


def path_speedups(runs: list[dict], linear_paths: list[str]) -> str:
    """One line per mode: each path's throughput over the last path's (e.g. auto vs plain)."""
    by_label = {run["label"]: run["result"]["output_throughput"] for run in runs}
    base = linear_paths[-1]
    lines = []
    for mode in dict.fromkeys(run["mode"] for run in runs):
        ratios = [f"{path} {by_label[f'{mode}/{path}'] / by_label[f'{mode}/{base}']:.2f}x"
                  for path in linear_paths[:-1] if by_label.get(f"{mode}/{base}")]
        lines.append(f"{mode}: " + ", ".join(ratios) + f" of {mode}/{base}")
    return "\n".join(lines)


def _fmt(value, spec: str = ".1f") -> str:
    return "-" if value is None else format(value, spec)


def _shape_text(shape: dict | None) -> str:
    return "-" if shape is None else f"{shape['depth']:.1f}/{shape['kept_per_row']:.1f}"


def format_table(runs: list[dict]) -> str:
    by_label = {run["label"]: run["result"] for run in runs}
    header = ["mode", "out tok/s", "vs sd", "req/s", "TTFT p50", "TPOT p50", "E2E p50", "E2E p99",
              "accept", "acc len", "tok/verified pos", "depth/kept", "drafter", "verifier", "overlap"]
    rows = []
    for run in runs:
        r = run["result"]
        sd = by_label.get(run["sd_label"])
        speedup = r["output_throughput"] / sd["output_throughput"] if sd and sd["output_throughput"] else None
        rows.append([run["label"], _fmt(r["output_throughput"]), _fmt(speedup, ".2f") + ("x" if speedup else ""),
                     _fmt(r["request_throughput"], ".2f"), _fmt(r["ttft_ms"]["p50"]), _fmt(r["tpot_ms"]["p50"], ".2f"),
                     _fmt(r["e2e_ms"]["p50"]), _fmt(r["e2e_ms"]["p99"]), _fmt(r["acceptance_rate"], ".3f"),
                     _fmt(r["mean_accepted_length"], ".2f"), _fmt(r.get("tokens_per_verified_position"), ".3f"),
                     _shape_text(r.get("draft_shape")), _fmt(r["busy_fraction"]["drafter"], ".2f"),
                     _fmt(r["busy_fraction"]["verifier"], ".2f"), _fmt(r["overlap_efficiency"], ".2f")])
    widths = [max(len(str(row[i])) for row in [header] + rows) for i in range(len(header))]
    line = lambda cells: "  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w)  # noqa: E731
                                   for i, (c, w) in enumerate(zip(cells, widths)))
    notes = ("latencies in ms; tok/verified pos = committed tokens per position verified; depth/kept = mean "
             "draft depth / drafts kept per row in the timeline window;\n"
             "drafter / verifier = busy fraction of the wall time; overlap = overlap efficiency")
    return "\n".join([line(header), line(["-" * w for w in widths]), *map(line, rows), notes])


def plot(runs: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [run["label"] for run in runs]
    xs = range(len(labels))
    fig, (ax_tp, ax_lat) = plt.subplots(1, 2, figsize=(max(8, 1.6 * len(labels) + 4), 4.5))
    ax_tp.bar(xs, [run["result"]["output_throughput"] for run in runs], color="tab:blue")
    ax_tp.set_title("output throughput")
    ax_tp.set_ylabel("tokens / s")
    width = 0.27
    for i, (name, color) in enumerate((("ttft", "tab:orange"), ("tpot", "tab:green"), ("e2e", "tab:red"))):
        values = [run["result"][f"{name}_ms"]["p50"] or 0 for run in runs]
        ax_lat.bar([x + (i - 1) * width for x in xs], values, width, label=f"{name.upper()} p50", color=color)
    ax_lat.set_title("latency (p50)")
    ax_lat.set_ylabel("ms")
    ax_lat.set_yscale("log")
    ax_lat.legend()
    for ax in (ax_tp, ax_lat):
        ax.set_xticks(list(xs), labels, rotation=30, ha="right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def timeline_window(jobs: list[dict], window_s: float) -> tuple[float, float]:
    """The middle window_s seconds of the recorded jobs (all of them when they span less)."""
    start, end = min(j["start_s"] for j in jobs), max(j["end_s"] for j in jobs)
    middle, half = (start + end) / 2, min(window_s, end - start) / 2
    return middle - half, middle + half


def draft_shape(jobs: list[dict], window_s: float) -> dict | None:
    """Mean depth and drafts kept per drafting row of the draft jobs in the timeline window."""
    if not jobs:
        return None
    t0, t1 = timeline_window(jobs, window_s)
    drafts = [j for j in jobs if j["kind"] == "draft" and j["rows"] and t0 <= j["start_s"] <= t1]
    if not drafts:
        return None
    return {"depth": sum(j["depth"] for j in drafts) / len(drafts),
            "kept_per_row": sum(j["kept"] for j in drafts) / sum(j["rows"] for j in drafts)}


def job_text(job: dict) -> str:
    """A bar's label. draft: rows x depth, then -> positions kept where TETRIS kept fewer than it
    drafted; verify: rows x positions per row; prefill: rows."""
    rows = job["rows"]
    if job["kind"] == "draft":
        is_cut = job.get("kept") is not None and job["kept"] < (job.get("positions") or 0)
        return f"{rows}x{job['depth']}" + (f"\u2192{job['kept']}" if is_cut else "")
    if job["kind"] == "verify":
        return f"{rows}x{round(job['positions'] / rows)}" if rows else ""
    if job["kind"] == "predraft":
        return f"+{job['depth']}"
    return f"{rows}r"


def draw_timeline(ax, jobs: list[dict], window_s: float, title: str) -> None:
    """Drafter and verifier lanes over the window; each job a bar coloured by its batch."""
    ax.set_title(title, fontsize=9, loc="left")
    ax.set_yticks(list(TIMELINE_LANES.values()), list(TIMELINE_LANES))
    ax.set_ylim(-0.6, len(TIMELINE_LANES) - 0.4)
    if not jobs:
        ax.text(0.5, 0.5, "no jobs recorded", ha="center", va="center", transform=ax.transAxes)
        return
    t0, t1 = timeline_window(jobs, window_s)
    bars: dict[tuple[int, str], list[tuple[float, float]]] = {}
    for job in jobs:
        if job["end_s"] < t0 or job["start_s"] > t1:
            continue
        lane, width = TIMELINE_LANES[job["role"]], job["end_s"] - job["start_s"]
        color = TIMELINE_COLORS[{"prefill": None, "predraft": "predraft"}.get(job["kind"], job["batch"])]
        bars.setdefault((lane, color), []).append((job["start_s"] - t0, width))
        text = job_text(job)
        if text and width >= TIMELINE_CHAR_WIDTH * (len(text) + 1) * (t1 - t0):
            ax.text(job["start_s"] - t0 + width / 2, lane, text, ha="center", va="center", fontsize=6, clip_on=True)
    for (lane, color), spans in bars.items():
        ax.broken_barh(spans, (lane - 0.4, 0.8), facecolors=color, edgecolor="white", linewidth=0.3)
    ax.set_xlim(0, max(t1 - t0, 1e-6))
    ax.set_xlabel("s from window start", fontsize=8)


def plot_timelines(runs: list[dict], path: str, window_s: float) -> None:
    """One timeline subplot per run, stacked, in one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    fig, axes = plt.subplots(len(runs), 1, figsize=(14, 1.5 * len(runs) + 1.2), squeeze=False)
    for ax, run in zip(axes[:, 0], runs):
        r = run["result"]
        title = (f"{run['label']}: {r['output_throughput']:.1f} tok/s, depth/kept {_shape_text(r.get('draft_shape'))}"
                 f"   (bars: draft rows x depth \u2192 kept, verify rows x positions per row)")
        draw_timeline(ax, run.get("timeline", []), window_s, title)
    legend = [Patch(color=TIMELINE_COLORS[0], label="batch 0"), Patch(color=TIMELINE_COLORS[1], label="batch 1"),
              Patch(color=TIMELINE_COLORS[None], label="prefill"),
              Patch(color=TIMELINE_COLORS["predraft"], label="pre-draft (+forwards)")]
    fig.legend(handles=legend, loc="upper right", ncol=4, fontsize=8)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.35 / fig.get_figheight()))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def file_safe(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", label).strip("_")


def write_timelines(runs: list[dict], out: str, window_s: float) -> list[str]:
    """<out>/timeline-<label>.png per run and <out>/timeline.png with all of them; the paths."""
    paths = []
    for run in runs:
        paths.append(os.path.join(out, f"timeline-{file_safe(run['label'])}.png"))
        plot_timelines([run], paths[-1], window_s)
    paths.append(os.path.join(out, "timeline.png"))
    plot_timelines(runs, paths[-1], window_s)
    return paths


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()] if text else []


def _names(text: str) -> list[str]:
    return [v.strip() for v in text.split(",") if v.strip()]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Compare the runtime's modes (ar, sd, psd, TETRIS, adaptive) "
                                                 "on the same load.")
    parser.add_argument("--config", default="tiny", help="config name or path (default tiny)")
    parser.add_argument("--modes", default="ar,sd,psd,sd-2t", help=f"comma list of {', '.join(MODES)}")
    parser.add_argument("--extra-draft", type=int, default=DEFAULT_EXTRA_DRAFT,
                        help=f"e of the tetris / adaptive modes: k + e drafts a row (default {DEFAULT_EXTRA_DRAFT})")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="config override for every daemon")
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--concurrency", type=_ints, default=[16],
                        help="e.g. 16,32: each mode's daemon serves one load per value (sweeps: the first only)")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--ignore-eos", action="store_true", help="always generate max_tokens")
    parser.add_argument("--prompts", default=DEFAULT_PROMPTS)
    parser.add_argument("--warmup", type=int, default=2, help=f"requests of {WARMUP_MAX_TOKENS} tokens before the window")
    parser.add_argument("--sweep-k", type=_ints, default=[], help="e.g. 2,4,6: sweep modes per scheduler.num_draft")
    parser.add_argument("--sweep-e", type=_ints, default=[],
                        help="e.g. 0,2: sweep modes per scheduler.extra_draft, for every k of --sweep-k")
    parser.add_argument("--sweep-modes", default=",".join(SWEEP_MODES),
                        help=f"comma list of the modes the sweeps run (default {','.join(SWEEP_MODES)})")
    parser.add_argument("--sweep-batch", type=_ints, default=[], help="e.g. 4,8: sweep modes per scheduler.max_batch")
    parser.add_argument("--sweep-concurrency", type=_ints, default=[],
                        help="e.g. 1,2,4,8,16,32: every fixed plan and auto at each load (--requests at least "
                             "the concurrency); replaces --modes and the other sweeps")
    parser.add_argument("--sweep-plans", type=_names, default=[],
                        help='with --sweep-concurrency: only these plans (e.g. "auto,ar x1,sd x2"; default all)')
    parser.add_argument("--sweep-fresh", action="store_true",
                        help="with --sweep-concurrency: a fresh daemon per plan and load, the plans taking turns at "
                             "each load, so the machine's drift falls on every plan alike (auto then starts each "
                             "load from its calibration alone)")
    parser.add_argument("--sweep-rounds", type=int, default=1,
                        help="with --sweep-fresh: the plans take turns this many times at each load (each round "
                             "on fresh daemons, the first plan rotating); a plan's rate is its rounds' tokens over "
                             "their time, each round's rate in sweep.json")
    parser.add_argument("--rounds", type=int, default=1,
                        help="the modes' daemons take turns this many times (each round on fresh daemons, the first "
                             "rotating); a run's rate is its rounds' tokens over their time, each round's rate printed "
                             "and in bench.json, so the machine's drift falls on every mode alike")
    parser.add_argument("--linear-paths", default="", help="e.g. auto,plain: run every mode on each model.linear_path")
    parser.add_argument("--transports", default="",
                        help="e.g. frames,shared: run every mode with each cluster.draft_transport")
    parser.add_argument("--timeline-s", type=float, default=TIMELINE_S,
                        help=f"seconds of each mode's worker jobs drawn, from the middle of those recorded "
                             f"(default {TIMELINE_S:g})")
    parser.add_argument("--out", default="out/bench", help="folder for bench.json, bench.png and the timelines")
    return parser


def serve_group(group: list[dict], args, prompts: list[dict], log_name: str = "") -> None:
    """One daemon serving a mode's runs (one per concurrency), each run's "result" and
    "timeline" (its jobs) set. Where a request failed, the daemon's log is kept as
    <out>/daemon-<log_name>.log (the daemon's folder goes with it) and named in the results."""
    with running_daemon(args.config, args.set + group[0]["overrides"]) as endpoint:
        try:
            _serve_runs(group, args, prompts, endpoint)
        finally:
            if any(run.get("result", {}).get("num_failed") for run in group) or any("result" not in run for run in group):
                kept = keep_daemon_log(endpoint, args.out, log_name or file_safe(group[0]["daemon_label"]))
                for run in group:
                    if "result" in run:
                        run["result"]["daemon_log"] = kept


def keep_daemon_log(endpoint: str, out: str, name: str) -> str | None:
    """Copy the log of running_daemon's daemon at `endpoint` to <out>/daemon-<name>.log."""
    log = os.path.join(daemon_run_dir(endpoint), "daemon.log")
    if not os.path.exists(log):
        return None
    os.makedirs(out, exist_ok=True)
    kept = os.path.join(out, f"daemon-{name}.log")
    shutil.copyfile(log, kept)
    return kept


def _serve_runs(group: list[dict], args, prompts: list[dict], endpoint: str) -> None:
    """The warm-up, then each run's load on the daemon at `endpoint`."""
    if args.warmup:
        run_loadtest(endpoint, prompts, requests=args.warmup, concurrency=args.warmup,
                     max_tokens=WARMUP_MAX_TOKENS, seed=args.seed, show_progress=False)
    before = detailed_status(endpoint).get("predraft")
    for run in group:
        start_s = time.monotonic()  # the workers' clock too (one host)
        run["result"] = run_loadtest(endpoint, prompts, requests=args.requests,
                                     concurrency=run["concurrency"], max_tokens=args.max_tokens,
                                     temperature=args.temperature, seed=args.seed,
                                     ignore_eos=args.ignore_eos)
        after = detailed_status(endpoint)
        after["recent_jobs"] = [j for j in after.get("recent_jobs", []) if j["start_s"] >= start_s]
        add_status_fields(run["result"], after, args.timeline_s)
        run["result"]["predraft"] = predraft_delta(before, after.get("predraft"))
        before = after.get("predraft")
        run["timeline"] = after["recent_jobs"]


def pool_rounds(each: list[dict]) -> tuple[dict, list[dict]]:
    """A run's rounds (--rounds; each a result with its "timeline") as one result and the first
    round's timeline: tokens, counts and time summed (plan_sweep.merge_rounds), so the rate is
    every round's tokens over every round's time, each round's rate in "round_tok_s"; the
    pre-drafting counts summed too."""
    import plan_sweep

    results = [{k: v for k, v in r.items() if k != "timeline"} for r in each]
    merged = plan_sweep.merge_rounds(results)
    if len(results) > 1:
        merged["round_errors"] = [r["errors"] for r in results]
        merged["daemon_logs"] = [r["daemon_log"] for r in results if r.get("daemon_log")]
    counts = [r["predraft"] for r in results if r.get("predraft")]
    merged["predraft"] = {key: sum(c[key] for c in counts) for key in counts[0]} if counts else None
    return merged, each[0]["timeline"]


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    modes, sweep_modes = _names(args.modes), _names(args.sweep_modes)
    unknown = [m for m in modes + sweep_modes if m not in MODES]
    if unknown or not modes and not (args.sweep_k or args.sweep_e or args.sweep_batch):
        print(f"error: --modes / --sweep-modes: unknown {unknown}; choose from {', '.join(MODES)}", file=sys.stderr)
        return 2
    if args.sweep_rounds < 1 or args.sweep_rounds > 1 and not args.sweep_fresh:
        print("error: --sweep-rounds must be >= 1, and above 1 only with --sweep-fresh", file=sys.stderr)
        return 2
    if args.rounds < 1:
        print("error: --rounds must be >= 1", file=sys.stderr)
        return 2
    if args.extra_draft < 0:
        print("error: --extra-draft must be >= 0", file=sys.stderr)
        return 2
    try:
        dtype = load_config(args.config, args.set).model.dtype
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 2
    if args.sweep_concurrency:
        if min(args.sweep_concurrency) < 1:
            print("error: --sweep-concurrency must list values >= 1", file=sys.stderr)
            return 2
        import plan_sweep

        return plan_sweep.main(args, running_daemon, WARMUP_MAX_TOKENS)
    prompts = load_prompts(args.prompts)
    linear_paths = [v.strip() for v in args.linear_paths.split(",") if v.strip()]
    transports = [v.strip() for v in args.transports.split(",") if v.strip()]
    if linear_paths and transports:
        print("error: --linear-paths and --transports are two axes; give one", file=sys.stderr)
        return 2
    variant_key = "cluster.draft_transport" if transports else "model.linear_path"
    linear_paths = linear_paths or transports
    if not args.concurrency or min(args.concurrency) < 1:
        print("error: --concurrency must list values >= 1", file=sys.stderr)
        return 2
    daemons = per_concurrency(plan_runs(modes, args.sweep_k, args.sweep_batch, linear_paths, args.sweep_e,
                                        sweep_modes, args.extra_draft, variant_key), args.concurrency)
    runs = [run for group in daemons for run in group]
    rounds: dict[str, list[dict]] = {run["label"]: [] for run in runs}  # each round's result of a run
    for number in range(args.rounds):
        for group in daemons[number % len(daemons):] + daemons[:number % len(daemons)]:  # no mode always first
            print(f"[round {number + 1}/{args.rounds}] {group[0]['daemon_label']}: starting a daemon",
                  file=sys.stderr, flush=True)
            try:
                serve_group(group, args, prompts, f"{file_safe(group[0]['daemon_label'])}-round-{number + 1}")
            except (RuntimeError, TimeoutError) as exc:
                print(f"error: {group[0]['daemon_label']}: {exc}", file=sys.stderr)
                return 1
            for run in group:
                rounds[run["label"]].append(run.pop("result") | {"timeline": run.pop("timeline")})
    for run in runs:
        run["result"], run["timeline"] = pool_rounds(rounds[run["label"]])

    print(format_table(runs))
    if args.rounds > 1:
        print("rounds (tok/s): " + "; ".join(f"{run['label']} " + " / ".join(f"{v:.2f}" for v in run["result"]["round_tok_s"])
                                             for run in runs))
    predrafted = [run for run in runs if run["result"].get("predraft")]
    if predrafted:
        print("pre-drafting (steps checked against a pre-draft; ready from the chain, from a branch; drafts served):")
        for run in predrafted:
            d = run["result"]["predraft"]
            print(f"  {run['label']}: {d['checked']} checked, {d['full']} chain + {d['short']} branch hits "
                  f"({(d['full'] + d['short']) / d['checked']:.0%}), {d['drafts_served']} drafts served")
    if len(linear_paths) > 1:
        print(path_speedups(runs, linear_paths))
    best = best_fixed(runs)
    if best:
        print(format_best_fixed(best))
    status = 0
    check = None
    if args.temperature == 0 and len(runs) > 1:
        check = greedy_check(runs)
        unsteady = [run["label"] for run in runs if not run["result"].get("rounds_identical", True)]
        if unsteady:  # a run whose rounds disagree differs from itself: as a difference between modes
            check["is_identical"] = False
            check["differences"] += [{"label": label, "baseline": f"{label}, round 1", "prompt": None,
                                      "first_diff_at": None} for label in unsteady]
        if check["is_identical"]:
            print(f"greedy outputs identical across modes: yes ({check['num_requests']} requests)")
        else:
            rates = ", ".join(f"{label} {rate:.0%}" for label, rate in check["match_rate"].items())
            print(f"greedy outputs identical across modes: no (match rate vs {check['baseline']}: {rates})")
            if dtype == "float32":
                for d in check["differences"]:
                    print(f"  {d['label']} differs from {d['baseline']} on prompt {d['prompt']} "
                          f"(first difference at output token {d['first_diff_at']})")
                status = 1
            else:
                print(f"  ({dtype}: near-ties may flip between batch shapes; docs/design.md section 5)")
    elif args.temperature != 0:
        print("greedy check skipped (temperature > 0)")
    num_failed = sum(run["result"]["num_failed"] for run in runs)
    if num_failed:
        print(f"error: {num_failed} request(s) failed", file=sys.stderr)
        status = 1

    os.makedirs(args.out, exist_ok=True)
    report = {"config": args.config, "overrides": args.set, "dtype": dtype, "requests": args.requests,
              "concurrency": args.concurrency, "max_tokens": args.max_tokens, "temperature": args.temperature,
              "seed": args.seed, "extra_draft": args.extra_draft, "greedy_check": check, "best_fixed": best,
              "runs": runs}
    with open(os.path.join(args.out, "bench.json"), "w") as f:
        json.dump(report, f, indent=1)
    plot(runs, os.path.join(args.out, "bench.png"))
    timelines = write_timelines(runs, args.out, args.timeline_s)
    print(f"wrote {os.path.join(args.out, 'bench.json')}, {os.path.join(args.out, 'bench.png')} "
          f"and {len(timelines)} timelines ({timelines[-1]})")
    return status


if __name__ == "__main__":
    sys.exit(main())
