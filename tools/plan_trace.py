"""What `auto` did during one load, step by step: a fresh daemon (tools/bench.py's), a warm-up,
then the load while `status` is polled; prints each change of (live requests, plan, reason)
with its time, the load's tok/s, and the planner's recent switches with the forecasts that made
them. The tool behind docs/performance.md's traces (a first step planned for part of a burst;
a switch on refreshed fits).

    python tools/plan_trace.py --config default --concurrency 8 --requests 8 --max-tokens 48
    python tools/plan_trace.py --config default --concurrency 1 --requests 4 --set scheduler.max_batch=16
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import bench  # noqa: E402
from loadtest import DEFAULT_PROMPTS, load_prompts, run_loadtest  # noqa: E402

from minedraft.runtime.client import Client  # noqa: E402

POLL_S = 0.15


def trace(endpoint: str, prompts: list[dict], concurrency: int, requests: int, max_tokens: int,
          warmup: int) -> dict:
    """Run the load on a started daemon while polling its status; the changes seen and the result."""
    if warmup:
        run_loadtest(endpoint, prompts, requests=warmup, concurrency=warmup, max_tokens=bench.WARMUP_MAX_TOKENS,
                     show_progress=False)
    samples: list[dict] = []
    stop = threading.Event()

    def poll() -> None:
        with Client(endpoint, timeout_s=10) as client:
            start = time.monotonic()
            while True:  # a sample at once, then every POLL_S until the load ends
                status = client.status()
                plan = status.get("plan") or {}
                samples.append({"t_s": round(time.monotonic() - start, 2), "num_running": status["num_running"],
                                "plan": plan.get("name", status.get("mode")), "reason": plan.get("reason"),
                                "steps_by_plan": plan.get("steps_by_plan", {})})
                if stop.wait(POLL_S):
                    return

    poller = threading.Thread(target=poll, daemon=True)
    poller.start()
    result = run_loadtest(endpoint, prompts, requests=requests, concurrency=concurrency, max_tokens=max_tokens,
                          ignore_eos=True, show_progress=False)
    stop.set()
    poller.join()
    with Client(endpoint, timeout_s=10) as client:
        plan = client.status().get("plan") or {}
    changes, last = [], None
    for sample in samples:
        key = (sample["num_running"], sample["plan"], sample["reason"])
        if key != last:
            changes.append(sample)
            last = key
    return {"tok_s": result["output_throughput"], "changes": changes,
            "steps_by_plan": plan.get("steps_by_plan", {}), "switches": plan.get("recent_switches", [])}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--config", default="default")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="config override (scheduler.mode=auto is always set)")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--requests", type=int, default=0, help="default: max(4, concurrency)")
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--warmup", type=int, default=2, help=f"requests of {bench.WARMUP_MAX_TOKENS} tokens first")
    parser.add_argument("--prompts", default=DEFAULT_PROMPTS)
    parser.add_argument("--json", default="", help="also write the trace here")
    args = parser.parse_args(argv)
    if args.concurrency < 1 or args.requests < 0:
        print("error: --concurrency must be >= 1 and --requests >= 0", file=sys.stderr)
        return 2
    requests = args.requests or max(4, args.concurrency)
    with bench.running_daemon(args.config, ["scheduler.mode=auto", *args.set]) as endpoint:
        out = trace(endpoint, load_prompts(args.prompts), args.concurrency, requests, args.max_tokens, args.warmup)
    print(f"{'t (s)':>7} {'live':>5}  plan (reason)")
    for change in out["changes"]:
        print(f"{change['t_s']:>7.2f} {change['num_running']:>5}  {change['plan']} ({change['reason']})")
    print(f"{out['tok_s']:.2f} tok/s; steps by plan since start (warm-up included): {out['steps_by_plan']}")
    for switch in out["switches"]:
        forecast = ", ".join(f"{name} {rate:.2f}" for name, rate in sorted(switch["forecast"].items(), key=lambda kv: -kv[1]))
        print(f"switch at step {switch['step']} ({switch['rows']} live): {switch['from']} -> {switch['to']} "
              f"({switch['reason']}); forecast tok/s: {forecast or '-'}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
