"""`tools/bench.py --sweep-concurrency 1,2,4,8,16,32`: every fixed plan and `auto` over a range
of loads, in one run. Each plan gets one daemon that serves every concurrency in turn (lowest
first), and every plan can hold all the live requests of the highest one (one-batch plans:
max_batch = the highest concurrency; psd and auto, which hold two batches of max_batch: half of
it). Fixed plans: ar, sd and psd, with one thread per worker (each on its own core) and with as
many threads as there are cores ("x2" on two cores; psd x2 oversubscribes them, as a user who
sets two threads everywhere would).

It prints a table per concurrency (output tok/s, TPOT p50, each plan against the best fixed one,
and for auto the plans it ran and its forecast at full load), then the two figures the plan
issue asks for: auto against the best fixed plan at every concurrency, and auto against the one
fixed plan with the best total over the sweep (what a person picks once by hand) where that plan
does worst. Writes <out>/sweep.json and <out>/sweep.png (tok/s and TPOT p50 against
concurrency, one line per plan). Greedy outputs must be identical across plans at each load.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time

import plan_bounds
from loadtest import load_prompts, run_loadtest

from minedraft.runtime.client import Client

STATUS_POLL_S = 1.0  # how often auto's plan is sampled during a load
AUTO = "auto"


def sweep_plans(num_cores: int, max_concurrency: int) -> list[dict]:
    """(name, overrides) of every plan the sweep runs, auto first."""
    wide = f"[{','.join(str(c) for c in range(num_cores))}]"
    one_batch = f"scheduler.max_batch={max_concurrency}"
    two_batches = f"scheduler.max_batch={max(1, -(-max_concurrency // 2))}"
    x1 = ["drafter.num_threads=1", "drafter.cpu_cores=[0]", "verifier.num_threads=1",
          f"verifier.cpu_cores=[{min(1, num_cores - 1)}]"]
    xn = [f"drafter.num_threads={num_cores}", f"drafter.cpu_cores={wide}", f"verifier.num_threads={num_cores}",
          f"verifier.cpu_cores={wide}"]
    plans = [{"name": "ar x1", "overrides": ["scheduler.mode=ar", one_batch, *x1]},
             {"name": "sd x1", "overrides": ["scheduler.mode=sd", one_batch, *x1]},
             {"name": "psd 1+1", "overrides": ["scheduler.mode=psd", two_batches, *x1]}]
    if num_cores > 1:
        plans += [{"name": f"ar x{num_cores}", "overrides": ["scheduler.mode=ar", one_batch, *xn]},
                  {"name": f"sd x{num_cores}", "overrides": ["scheduler.mode=sd", one_batch, *xn]},
                  {"name": f"psd x{num_cores}", "overrides": ["scheduler.mode=psd", two_batches, *xn]}]
    return [{"name": AUTO, "overrides": ["scheduler.mode=auto", two_batches, *x1]}] + plans


class PlanSampler:
    """Polls a daemon's status during a load; `best` is auto's plan and forecast at the highest
    load seen (steady_sample: the middle sample at that load, not the last one, which at one
    live request falls at the end of the last request, where a forecast counts the few tokens
    left)."""

    def __init__(self, endpoint: str):
        self.endpoint = endpoint
        self.samples: list[dict] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    @property
    def best(self) -> dict | None:
        return steady_sample(self.samples)

    def _run(self) -> None:
        with Client(self.endpoint, timeout_s=10) as client:
            while not self._stop.wait(STATUS_POLL_S):
                status = client.status()
                plan = status.get("plan")
                if plan is None:
                    continue
                self.samples.append({"num_running": status["num_running"], "plan": plan["name"],
                                     "reason": plan["reason"], "forecast": plan["predicted_tokens_per_s"]})


def steady_sample(samples: list[dict]) -> dict | None:
    """The middle one of the samples taken at the most live requests (None: no sample)."""
    if not samples:
        return None
    most = max(s["num_running"] for s in samples)
    at_most = [s for s in samples if s["num_running"] == most]
    return at_most[len(at_most) // 2]


def plan_steps(endpoint: str) -> dict[str, int]:
    with Client(endpoint, timeout_s=10) as client:
        plan = client.status().get("plan") or {}
    return dict(plan.get("steps_by_plan", {}))


def run_sweep(args, running_daemon, warmup_tokens: int) -> dict:
    """Run every plan at every concurrency; the report (also written to <out>/sweep.json)."""
    prompts = load_prompts(args.prompts)
    concurrencies = sorted(set(args.sweep_concurrency))
    plans = sweep_plans(len(os.sched_getaffinity(0)), max(concurrencies))
    if args.sweep_plans:
        unknown = set(args.sweep_plans) - {p["name"] for p in plans}
        if unknown:
            raise ValueError(f"--sweep-plans: unknown {sorted(unknown)}; choose from {[p['name'] for p in plans]}")
        plans = [p for p in plans if p["name"] in args.sweep_plans]
    num_cores = len(os.sched_getaffinity(0))
    print("measuring the machine's limits (tools/kernel_bench.py)", file=sys.stderr, flush=True)
    measured = [plan_bounds.measure(args.config, num_cores)]
    results: dict[str, dict[int, dict]] = {}
    runs: dict[str, dict[int, list[dict]]] = {}  # --sweep-rounds: every round's result

    def serve(plan: dict, endpoint: str, concurrency: int) -> None:
        before = plan_steps(endpoint)
        with PlanSampler(endpoint) as sampler:
            result = run_loadtest(endpoint, prompts, requests=max(args.requests, concurrency),
                                  concurrency=concurrency, max_tokens=args.max_tokens,
                                  temperature=args.temperature, seed=args.seed,
                                  ignore_eos=args.ignore_eos, show_progress=False)
        after = plan_steps(endpoint)
        if plan["name"] == AUTO:
            result["plan_steps"] = {name: after.get(name, 0) - before.get(name, 0) for name in after
                                    if after.get(name, 0) > before.get(name, 0)}
            result["plan_at_full_load"] = sampler.best
        results.setdefault(plan["name"], {})[concurrency] = result
        print(f"  {plan['name']} c={concurrency}: {result['output_throughput']:.2f} tok/s", file=sys.stderr, flush=True)

    def warm(endpoint: str) -> None:
        if args.warmup:
            run_loadtest(endpoint, prompts, requests=args.warmup, concurrency=args.warmup,
                         max_tokens=warmup_tokens, seed=args.seed, show_progress=False)

    rounds = max(1, getattr(args, "sweep_rounds", 1))
    if getattr(args, "sweep_fresh", False):  # plans take turns at each load, each on a fresh daemon
        for concurrency in concurrencies:
            print(f"concurrency {concurrency}: {len(plans)} plans in turn, {rounds} round(s)", file=sys.stderr,
                  flush=True)
            for number in range(rounds):
                for plan in plans[number % len(plans):] + plans[:number % len(plans)]:  # no plan always first
                    with running_daemon(args.config, args.set + plan["overrides"]) as endpoint:
                        warm(endpoint)
                        serve(plan, endpoint, concurrency)
                        runs.setdefault(plan["name"], {}).setdefault(concurrency, []).append(
                            results[plan["name"]][concurrency])
        results = {name: {c: merge_rounds(each) for c, each in by_c.items()} for name, by_c in runs.items()}
    else:
        for number, plan in enumerate(plans, 1):
            print(f"[{number}/{len(plans)}] {plan['name']}: starting a daemon", file=sys.stderr, flush=True)
            with running_daemon(args.config, args.set + plan["overrides"]) as endpoint:
                warm(endpoint)
                for concurrency in concurrencies:
                    serve(plan, endpoint, concurrency)
    measured.append(plan_bounds.measure(args.config, num_cores))
    machine = plan_bounds.merge(measured)
    report = analyse(results, concurrencies, machine)
    report.update({"config": args.config, "overrides": args.set, "requests": args.requests,
                   "fresh_daemons": bool(getattr(args, "sweep_fresh", False)), "rounds": rounds,
                   "max_tokens": args.max_tokens, "temperature": args.temperature, "seed": args.seed,
                   "plans": plans})
    return report


SUMMED = ("wall_s", "num_requests", "num_ok", "num_failed", "num_output_tokens", "num_prompt_tokens",
          "server_num_output_tokens", "num_drafted", "num_accepted", "num_verify_rows")


def merge_rounds(each: list[dict]) -> dict:
    """One plan's rounds at one load (--sweep-rounds) as one result: counts and wall time summed,
    so its rate is every round's tokens over every round's time (the rounds ran on fresh daemons
    at different times: pooling them averages the machine's drift out of the comparison);
    latencies and the rest from the first round; each round's rate kept in "round_tok_s" and
    whether every round produced the same output ids in "rounds_identical"."""
    merged = dict(each[0])
    if len(each) == 1:
        return merged
    for key in SUMMED:
        values = [r.get(key) for r in each]
        merged[key] = None if any(v is None for v in values) else sum(values)
    merged["output_throughput"] = merged["num_output_tokens"] / merged["wall_s"]
    drafted, accepted, rows = merged["num_drafted"], merged["num_accepted"], merged["num_verify_rows"]
    merged["acceptance_rate"] = accepted / drafted if drafted else None
    merged["mean_accepted_length"] = 1 + accepted / rows if rows else None
    merged["round_tok_s"] = [r["output_throughput"] for r in each]
    merged["rounds_identical"] = all(r["output_token_ids"] == each[0]["output_token_ids"] for r in each[1:])
    if "plan_steps" in each[0]:
        steps: dict[str, int] = {}
        for r in each:
            for name, n in (r.get("plan_steps") or {}).items():
                steps[name] = steps.get(name, 0) + n
        merged["plan_steps"] = steps
        merged["round_plan_steps"] = [r.get("plan_steps") for r in each]
    return merged


def analyse(results: dict[str, dict[int, dict]], concurrencies: list[int], machine: dict | None = None) -> dict:
    """Per concurrency: the best fixed plan and auto against it, and each plan's bound (machine:
    plan_bounds.merge) and share of it; over the sweep: the fixed plan with the best total
    throughput and auto against it where it does worst; greedy equality."""
    fixed = [name for name in results if name != AUTO]
    if machine is not None:
        for name, by_c in results.items():
            for c, r in by_c.items():
                depth = r["num_drafted"] / r["num_verify_rows"] if r.get("num_verify_rows") else r["num_draft"]
                bound = plan_bounds.load_bound(name, c, depth, r["mean_accepted_length"], machine,
                                               r.get("num_prompt_tokens") or 0, r["num_output_tokens"])
                r["bound_tok_s"] = bound
                r["share_of_bound"] = r["output_throughput"] / bound if bound else None
    rate = {name: {c: results[name][c]["output_throughput"] for c in concurrencies} for name in results}
    per_concurrency = {}
    for c in concurrencies:
        best = max(fixed, key=lambda name: rate[name][c])
        entry = {"best_fixed": best, "best_fixed_tok_s": rate[best][c]}
        if AUTO in results:
            entry["auto_tok_s"] = rate[AUTO][c]
            entry["auto_vs_best_fixed"] = rate[AUTO][c] / rate[best][c] if rate[best][c] else None
            entry["auto_plan_steps"] = results[AUTO][c].get("plan_steps")
            entry["auto_plan_at_full_load"] = results[AUTO][c].get("plan_at_full_load")
        per_concurrency[c] = entry
    summary = {"per_concurrency": per_concurrency}
    if fixed:
        by_hand = max(fixed, key=lambda name: sum(rate[name].values()))
        summary["best_total_fixed"] = by_hand
        if AUTO in results:
            worst = min(concurrencies, key=lambda c: rate[by_hand][c] / rate[AUTO][c] if rate[AUTO][c] else 0)
            summary["auto_vs_best_total_fixed"] = {
                "concurrency": worst, "ratio": rate[AUTO][worst] / rate[by_hand][worst] if rate[by_hand][worst] else None}
            ratios = [e["auto_vs_best_fixed"] for e in per_concurrency.values() if e.get("auto_vs_best_fixed")]
            summary["auto_min_vs_best_fixed"] = min(ratios) if ratios else None
    summary["greedy_identical"] = greedy_identical(results, concurrencies)
    if machine is not None:
        summary["machine"] = machine
    summary["results"] = {name: {str(c): r for c, r in by_c.items()} for name, by_c in results.items()}
    return summary


def greedy_identical(results: dict[str, dict[int, dict]], concurrencies: list[int]) -> dict[str, bool]:
    """Per concurrency: whether every plan produced the first plan's output ids for every prompt."""
    out = {}
    for c in concurrencies:
        outputs = [results[name][c]["output_token_ids"] for name in results]
        out[str(c)] = all(o == outputs[0] for o in outputs[1:]) and all(
            results[name][c].get("rounds_identical", True) for name in results)
    return out


def format_report(report: dict) -> str:
    results = report["results"]
    names = list(results)
    lines = []
    for c, entry in report["per_concurrency"].items():
        best = entry["best_fixed_tok_s"]
        lines.append(f"concurrency {c}:")
        header = f"  {'plan':<10} {'out tok/s':>10} {'vs best':>8} {'TPOT p50':>9} {'accept':>7} {'bound':>7} {'share':>6}"
        lines += [header, "  " + "-" * (len(header) - 2)]
        for name in names:
            r = results[name][str(c)]
            accept = "-" if r["acceptance_rate"] is None else f"{r['acceptance_rate']:.3f}"
            tpot = r["tpot_ms"]["p50"]
            bound, share = r.get("bound_tok_s"), r.get("share_of_bound")
            lines.append(f"  {name:<10} {r['output_throughput']:>10.2f} {r['output_throughput'] / best:>7.2f}x "
                         f"{'-' if tpot is None else f'{tpot:.1f}':>9} {accept:>7} "
                         f"{'-' if bound is None else f'{bound:.1f}':>7} {'-' if share is None else f'{share:.2f}':>6}"
                         + ("  rounds: " + " / ".join(f"{v:.2f}" for v in r["round_tok_s"]) if r.get("round_tok_s")
                            else ""))
        if "auto_plan_steps" in entry:
            steps = ", ".join(f"{name} {n}" for name, n in sorted((entry["auto_plan_steps"] or {}).items(),
                                                                    key=lambda kv: -kv[1]))
            lines.append(f"  auto ran (steps): {steps or '-'}")
            full = entry.get("auto_plan_at_full_load")
            if full:
                forecast = ", ".join(f"{name} {v:.2f}" for name, v in sorted(full["forecast"].items(),
                                                                            key=lambda kv: -kv[1]))
                lines.append(f"  at {full['num_running']} live requests auto ran {full['plan']} ({full['reason']}); "
                             f"forecast tok/s: {forecast or '-'}")
    if "auto_min_vs_best_fixed" in report:
        lines.append(f"auto vs the best fixed plan, lowest over the sweep: {report['auto_min_vs_best_fixed']:.2f}x")
        worst = report["auto_vs_best_total_fixed"]
        lines.append(f"fixed plan with the best total: {report['best_total_fixed']}; where it does worst "
                     f"(concurrency {worst['concurrency']}) auto is {worst['ratio']:.2f}x it")
    if "machine" in report:
        lines.append(f"bounds from limits measured before and after the sweep: {plan_bounds.describe(report['machine'])}")
    same = report["greedy_identical"]
    lines.append("greedy outputs identical across plans: " + ", ".join(
        f"c={c} {'yes' if ok else 'NO'}" for c, ok in same.items()))
    return "\n".join(lines)


def plot_sweep(report: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_tp, ax_tpot) = plt.subplots(1, 2, figsize=(12, 4.5))
    for name, by_c in report["results"].items():
        cs = sorted(int(c) for c in by_c)
        style = {"linewidth": 2.5, "color": "black"} if name == AUTO else {"linewidth": 1.2, "marker": "o"}
        ax_tp.plot(cs, [by_c[str(c)]["output_throughput"] for c in cs], label=name, **style)
        ax_tpot.plot(cs, [by_c[str(c)]["tpot_ms"]["p50"] or float("nan") for c in cs], label=name, **style)
    for ax, title, unit in ((ax_tp, "output throughput", "tokens / s"), (ax_tpot, "TPOT p50", "ms / token")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrency (live requests)")
        ax.set_ylabel(unit)
        ax.set_title(title)
        ax.grid(alpha=0.3)
    ax_tp.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(args, running_daemon, warmup_tokens: int) -> int:
    started = time.monotonic()
    try:
        report = run_sweep(args, running_daemon, warmup_tokens)
    except (ValueError, RuntimeError, TimeoutError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2 if isinstance(exc, ValueError) else 1
    report["wall_s"] = time.monotonic() - started
    print(format_report(report))
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "sweep.json"), "w") as f:
        json.dump(report, f, indent=1)
    plot_sweep(report, os.path.join(args.out, "sweep.png"))
    print(f"wrote {os.path.join(args.out, 'sweep.json')} and {os.path.join(args.out, 'sweep.png')}")
    num_failed = sum(r["num_failed"] for by_c in report["results"].values() for r in by_c.values())
    if num_failed:
        print(f"error: {num_failed} request(s) failed", file=sys.stderr)
    is_same = all(report["greedy_identical"].values()) or args.temperature != 0
    if not is_same:
        print("error: greedy outputs differ between plans", file=sys.stderr)
    return 0 if is_same and not num_failed else 1


def reanalyse(path: str, prompts_path: str) -> dict:
    """A recorded sweep.json set against its bounds again: each load's prompt tokens counted with
    the config's tokenizer as the server counts them (where the run did not record them; the
    requests cycle through the prompt file in order, as tools/loadtest.py sends them), the
    bounds from the limits measured in that run."""
    import bench_hf

    from minedraft.common.config import load_config

    with open(path) as f:
        report = json.load(f)
    prompt_ids = bench_hf.tokenize(load_prompts(prompts_path), load_config(report["config"], report["overrides"]))
    results = {name: {int(c): r for c, r in by_c.items()} for name, by_c in report["results"].items()}
    for by_c in results.values():
        for r in by_c.values():
            if r.get("num_prompt_tokens") is None:
                r["num_prompt_tokens"] = sum(len(prompt_ids[i % len(prompt_ids)]) for i in range(r["num_requests"]))
    machine = report["machine"]
    if any("flops_per_prompt_token" not in m for m in machine["models"].values()):  # a sweep recorded before it
        machine = {**machine, "models": plan_bounds.measure(report["config"], 1)["models"]}
    concurrencies = sorted({c for by_c in results.values() for c in by_c})
    fresh = analyse(results, concurrencies, machine)
    return {**report, **fresh}


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="Set a recorded sweep (tools/bench.py --sweep-concurrency) "
                                     "against its bounds again: python tools/plan_sweep.py --reanalyse out/sweep/sweep.json")
    parser.add_argument("--reanalyse", required=True, metavar="SWEEP_JSON")
    parser.add_argument("--prompts", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "prompts.jsonl"))
    parser.add_argument("--out", default="", help="write the report here (default: print only)")
    cli_args = parser.parse_args()
    again = reanalyse(cli_args.reanalyse, cli_args.prompts)
    print(format_report(again))
    if cli_args.out:
        with open(cli_args.out, "w") as f:
            json.dump(again, f, indent=1)
