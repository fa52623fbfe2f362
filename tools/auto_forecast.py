"""What auto's calibration on this machine forecasts at each load, before any user request: each
candidate plan's steady rate and its rate over a wave of requests that all need the same tokens
(a speculative plan keeps its drain share of the steady rate), and the plan auto would start
in. Reads the calibration cache a daemon wrote at its first start (runtime/calibration.py);
nothing is started or measured.

    python tools/auto_forecast.py --config default --max-tokens 48 --concurrency 1,2,4,8,16,32

With several calibrations in the cache, the newest of the config's models is used (--key picks
one). `--json OUT` writes the table.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from minedraft.common.config import load_config
from minedraft.runtime import calibration as cal
from minedraft.runtime.scheduler import SchedulerCore
from minedraft.runtime.tokenizer import ByteTokenizer


def pick_entry(cache: dict, config, key: str | None) -> tuple[str, dict]:
    if key is not None:
        if key not in cache:
            raise ValueError(f"--key {key}: not in the cache (keys: {', '.join(cache) or 'none'})")
        return key, cache[key]
    models = [config.model.target, config.model.draft]
    matching = [(k, e) for k, e in cache.items() if e.get("models", models) == models]
    if not matching:
        raise ValueError(f"no calibration of {models} in the cache: start a daemon in mode auto once")
    return max(matching, key=lambda ke: ke[1].get("measured_at", ""))


def forecasts(config, entry: dict, concurrencies: list[int], max_tokens: int) -> list[dict]:
    """Per concurrency: every plan's steady and wave forecast (tok/s) and the plan chosen."""
    max_batch = int(entry.get("max_batch") or config.scheduler.max_batch or 16)
    core = SchedulerCore(config, ByteTokenizer(), 256, config.scheduler.max_len, [0], max_batch=max_batch)
    core.load_calibration(entry["budget"], entry.get("seconds"))
    rows = []
    for c in concurrencies:
        rooms = [max_tokens - 1] * c
        plans = {p.name: {"steady": core.chooser.steady_rate(p, rooms), "wave": core.chooser.rate(p, rooms)}
                 for p in core.chooser.plans}
        rows.append({"concurrency": c, "plans": plans, "chosen": max(plans, key=lambda n: plans[n]["wave"])})
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="default")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    parser.add_argument("--concurrency", default="1,2,4,8,16,32", help="loads, comma-separated")
    parser.add_argument("--max-tokens", type=int, default=48, help="tokens each request of a wave needs")
    parser.add_argument("--key", help="the calibration cache entry (default: the newest of the config's models)")
    parser.add_argument("--json", metavar="OUT", help="write the table here")
    args = parser.parse_args(argv)
    config = load_config(args.config, ["scheduler.mode=auto", *args.set])
    path = cal.cache_path(config)
    try:
        cache = json.loads(path.read_text())
        key, entry = pick_entry(cache, config, args.key)
    except (OSError, ValueError) as exc:
        print(f"error: {path}: {exc}", file=sys.stderr)
        return 1
    table = forecasts(config, entry, [int(c) for c in args.concurrency.split(",")], args.max_tokens)
    print(f"calibration {key} in {path}, measured {entry.get('measured_at', '?')} in {entry.get('seconds', 0):.1f} s")
    names = list(table[0]["plans"])
    print(f"{'c':>3}  " + "  ".join(f"{n:>16}" for n in names) + "  chosen")
    for row in table:
        cells = "  ".join(f"{row['plans'][n]['steady']:7.2f} /{row['plans'][n]['wave']:7.2f}" for n in names)
        print(f"{row['concurrency']:>3}  {cells}  {row['chosen']}")
    print(f"tok/s: steady / over a wave of {args.max_tokens}-token requests (what auto compares)")
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump({"key": key, "path": str(path), "max_tokens": args.max_tokens, "table": table}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
