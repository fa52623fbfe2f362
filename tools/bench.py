"""Side-by-side benchmark of the runtime's modes: for each mode a fresh daemon is started through
the CLI (private ipc:// endpoint and run dir under a temp dir), the same load runs against it
(tools/loadtest.py), and the daemon is stopped. Prints one table, writes <out>/bench.json and
<out>/bench.png, and checks that greedy outputs are identical across modes.

    python tools/bench.py --config tiny --requests 32 --concurrency 16 --max-tokens 64
    python tools/bench.py --config tiny --modes sd,psd --sweep-k 2,4,6 --sweep-batch 4,8
    python tools/bench.py --config default --modes ar,sd,psd --linear-paths auto,plain

Modes: ar, sd, psd, and sd-2t (sd with two threads per worker on both cores, so psd is compared
with sd given the same total cores). At temperature 0 in float32 a greedy difference between
modes is an error (exit 1); in bfloat16 the match rate is reported instead (DESIGN.md section 5).
Failed requests also make the exit status 1.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from loadtest import DEFAULT_PROMPTS, load_prompts, run_loadtest  # noqa: E402

from minedraft.runtime.config import ConfigError, load_config  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODE_OVERRIDES = {
    "ar": ["scheduler.mode=ar"],
    "sd": ["scheduler.mode=sd"],
    "psd": ["scheduler.mode=psd"],
    "sd-2t": ["scheduler.mode=sd", "drafter.num_threads=2", "drafter.cpu_cores=[0,1]",
              "verifier.num_threads=2", "verifier.cpu_cores=[0,1]"],
}
WARMUP_MAX_TOKENS = 8


def cli(*args: str, timeout_s: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "minedraft.runtime.cli", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout_s)


@contextlib.contextmanager
def running_daemon(config: str | None, overrides: list[str]):
    """Start a daemon via the CLI on a private ipc:// endpoint; yield the endpoint; stop it."""
    tmp = tempfile.mkdtemp(prefix="mdbench-")
    endpoint = f"ipc://{tmp}/client.sock"
    args = ["--endpoint", endpoint, "--set", f"server.run_dir={tmp}/run"]
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


def plan_runs(modes: list[str], sweep_k: list[int], sweep_batch: list[int], linear_paths: list[str] = ()) -> list[dict]:
    """(label, mode, extra overrides) of every daemon to start, in order. With several linear
    paths each mode runs on each (label "mode/path"), compared with sd on the same path."""
    if len(linear_paths) > 1:
        return [{"label": f"{m}/{path}", "mode": m, "overrides": MODE_OVERRIDES[m] + [f"model.linear_path={path}"],
                 "sd_label": f"sd/{path}", "linear_path": path} for m in modes for path in linear_paths]
    overrides = [f"model.linear_path={linear_paths[0]}"] if linear_paths else []
    runs = [{"label": m, "mode": m, "overrides": MODE_OVERRIDES[m] + overrides, "sd_label": "sd"} for m in modes]
    for key, values, name in (("scheduler.num_draft", sweep_k, "k"), ("scheduler.max_batch", sweep_batch, "batch")):
        for value in values:
            for mode in ("psd", "sd"):
                runs.append({"label": f"{mode} {name}={value}", "mode": mode,
                             "overrides": MODE_OVERRIDES[mode] + [f"{key}={value}"], "sd_label": f"sd {name}={value}"})
    return runs


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


def format_table(runs: list[dict]) -> str:
    by_label = {run["label"]: run["result"] for run in runs}
    header = ["mode", "out tok/s", "vs sd", "req/s", "TTFT p50", "TPOT p50", "E2E p50", "E2E p99",
              "accept", "acc len", "drafter", "verifier", "overlap"]
    rows = []
    for run in runs:
        r = run["result"]
        sd = by_label.get(run["sd_label"])
        speedup = r["output_throughput"] / sd["output_throughput"] if sd and sd["output_throughput"] else None
        rows.append([run["label"], _fmt(r["output_throughput"]), _fmt(speedup, ".2f") + ("x" if speedup else ""),
                     _fmt(r["request_throughput"], ".2f"), _fmt(r["ttft_ms"]["p50"]), _fmt(r["tpot_ms"]["p50"], ".2f"),
                     _fmt(r["e2e_ms"]["p50"]), _fmt(r["e2e_ms"]["p99"]), _fmt(r["acceptance_rate"], ".3f"),
                     _fmt(r["mean_accepted_length"], ".2f"), _fmt(r["busy_fraction"]["drafter"], ".2f"),
                     _fmt(r["busy_fraction"]["verifier"], ".2f"), _fmt(r["overlap_efficiency"], ".2f")])
    widths = [max(len(str(row[i])) for row in [header] + rows) for i in range(len(header))]
    line = lambda cells: "  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w)  # noqa: E731
                                   for i, (c, w) in enumerate(zip(cells, widths)))
    notes = "latencies in ms; drafter / verifier = busy fraction of the wall time; overlap = overlap efficiency"
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


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()] if text else []


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Compare ar / sd / psd / sd-2t on the same load.")
    parser.add_argument("--config", default="tiny", help="config name or path (default tiny)")
    parser.add_argument("--modes", default="ar,sd,psd,sd-2t", help=f"comma list of {', '.join(MODE_OVERRIDES)}")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="config override for every daemon")
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--ignore-eos", action="store_true", help="always generate max_tokens")
    parser.add_argument("--prompts", default=DEFAULT_PROMPTS)
    parser.add_argument("--warmup", type=int, default=2, help=f"requests of {WARMUP_MAX_TOKENS} tokens before the window")
    parser.add_argument("--sweep-k", type=_ints, default=[], help="e.g. 2,4,6: psd and sd per scheduler.num_draft")
    parser.add_argument("--sweep-batch", type=_ints, default=[], help="e.g. 4,8: psd and sd per scheduler.max_batch")
    parser.add_argument("--linear-paths", default="", help="e.g. auto,plain: run every mode on each model.linear_path")
    parser.add_argument("--out", default="out/bench", help="folder for bench.json and bench.png")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    unknown = [m for m in modes if m not in MODE_OVERRIDES]
    if unknown or not modes and not (args.sweep_k or args.sweep_batch):
        print(f"error: --modes: unknown {unknown}; choose from {', '.join(MODE_OVERRIDES)}", file=sys.stderr)
        return 2
    try:
        dtype = load_config(args.config, args.set).model.dtype
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 2
    prompts = load_prompts(args.prompts)
    linear_paths = [v.strip() for v in args.linear_paths.split(",") if v.strip()]
    runs = plan_runs(modes, args.sweep_k, args.sweep_batch, linear_paths)
    for number, run in enumerate(runs, 1):
        print(f"[{number}/{len(runs)}] {run['label']}: starting a daemon", file=sys.stderr, flush=True)
        try:
            with running_daemon(args.config, args.set + run["overrides"]) as endpoint:
                if args.warmup:
                    run_loadtest(endpoint, prompts, requests=args.warmup, concurrency=args.warmup,
                                 max_tokens=WARMUP_MAX_TOKENS, seed=args.seed, show_progress=False)
                run["result"] = run_loadtest(endpoint, prompts, requests=args.requests, concurrency=args.concurrency,
                                             max_tokens=args.max_tokens, temperature=args.temperature,
                                             seed=args.seed, ignore_eos=args.ignore_eos)
        except RuntimeError as exc:
            print(f"error: {run['label']}: {exc}", file=sys.stderr)
            return 1

    print(format_table(runs))
    if len(linear_paths) > 1:
        print(path_speedups(runs, linear_paths))
    status = 0
    check = None
    if args.temperature == 0 and len(runs) > 1:
        check = greedy_check(runs)
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
                print(f"  ({dtype}: near-ties may flip between batch shapes; DESIGN.md section 5)")
    elif args.temperature != 0:
        print("greedy check skipped (temperature > 0)")
    num_failed = sum(run["result"]["num_failed"] for run in runs)
    if num_failed:
        print(f"error: {num_failed} request(s) failed", file=sys.stderr)
        status = 1

    os.makedirs(args.out, exist_ok=True)
    report = {"config": args.config, "overrides": args.set, "dtype": dtype, "requests": args.requests,
              "concurrency": args.concurrency, "max_tokens": args.max_tokens, "temperature": args.temperature,
              "seed": args.seed, "greedy_check": check, "runs": runs}
    with open(os.path.join(args.out, "bench.json"), "w") as f:
        json.dump(report, f, indent=1)
    plot(runs, os.path.join(args.out, "bench.png"))
    print(f"wrote {os.path.join(args.out, 'bench.json')} and {os.path.join(args.out, 'bench.png')}")
    return status


if __name__ == "__main__":
    sys.exit(main())
