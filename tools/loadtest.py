"""Bounded load test against a running MineDraft runtime: a fixed number of streamed requests at
a fixed concurrency or with seeded Poisson arrivals; reports throughput, per-token latencies and
the runtime's speculative-decoding counters over the run's window (docs/design.md sections 6-7).

    minedraft-runtime start --config tiny
    python tools/loadtest.py --requests 64 --concurrency 16 --max-tokens 64 --json out/load.json
    python tools/loadtest.py --requests 64 --rate 8 --seed 1
    python tools/loadtest.py --http http://127.0.0.1:8000 --requests 64 --concurrency 16   (through the HTTP API)

Latency definitions (milliseconds, client-side):
  TTFT  send -> first committed token;  E2E  send -> final output;
  TPOT  per request, (E2E - TTFT) / (tokens - 1);
  ITL   per token: a chunk of n tokens arriving g after the previous chunk counts n values g / n
        (the first chunk is covered by TTFT and adds none).
With --http URL the same load goes through the OpenAI-compatible HTTP API (the `openai` client,
streamed /v1/completions with the return_token_ids extension, so the token counts per chunk and
the latencies per token are exact), and the window metrics come from URL/metrics.
Window metrics come from status() before and after: acceptance = d(accepted) / d(drafted),
mean accepted length = 1 + d(accepted) / d(verify rows), busy fraction = d(busy_s) / wall,
overlap efficiency = (d(busy drafter) + d(busy verifier)) / (2 x wall).
The JSON holds every request's output token ids under "output_token_ids", keyed by prompt index
("7"; a prompt reused when the prompt file cycles gets "7.1", "7.2", ...).

Python: `run_loadtest(endpoint, prompts, requests=..., concurrency=... | rate=..., http=None, ...) -> dict`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import sys
import time
from collections import Counter

from tqdm import tqdm

from minedraft.runtime.client import DEFAULT_ENDPOINT, AsyncClient, RequestError
from minedraft.common.config import API_KEY_ENV

DEFAULT_PROMPTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "prompts.jsonl")
DEFAULT_MAX_TOKENS = 64  # when neither --max-tokens nor the prompt line gives one
DEFAULT_CONCURRENCY = 8  # when neither --concurrency nor --rate is given
STATUS_TIMEOUT_S = 10.0
FAILED_FINISH_REASONS = ("abort", "error")


def load_prompts(path: str = DEFAULT_PROMPTS) -> list[dict]:
    """One JSON object a line: {"prompt": TEXT} or {"prompt_ids": [...]}, optional "max_tokens"."""
    prompts = []
    with open(path) as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            record = json.loads(line)
            if not isinstance(record, dict) or ("prompt" in record) == ("prompt_ids" in record):
                raise ValueError(f"{path}:{number}: expected an object with 'prompt' or 'prompt_ids'")
            prompts.append(record)
    if not prompts:
        raise ValueError(f"{path}: no prompts")
    return prompts


def percentiles(values: list[float]) -> dict:
    """p50 / p90 / p99 (linear interpolation) and mean; None when there are no values."""
    if not values:
        return {"p50": None, "p90": None, "p99": None, "mean": None}
    ordered = sorted(values)

    def at(q: float) -> float:
        pos = q * (len(ordered) - 1)
        lo = int(pos)
        hi = min(lo + 1, len(ordered) - 1)
        return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)

    return {"p50": at(0.50), "p90": at(0.90), "p99": at(0.99), "mean": sum(ordered) / len(ordered)}


def _plan(prompts: list[dict], requests: int, max_tokens: int | None, seed: int) -> list[dict]:
    """The requests in send order: prompt file cycled, per-request sampling seed = seed + index."""
    plan = []
    for index in range(requests):
        prompt_index, repeat = index % len(prompts), index // len(prompts)
        record = prompts[prompt_index]
        kwargs = {"prompt_ids": record["prompt_ids"]} if "prompt_ids" in record else {"prompt": record["prompt"]}
        kwargs["max_tokens"] = max_tokens or record.get("max_tokens", DEFAULT_MAX_TOKENS)
        kwargs["seed"] = seed + index
        key = str(prompt_index) if repeat == 0 else f"{prompt_index}.{repeat}"
        plan.append({"index": index, "key": key, "kwargs": kwargs})
    return plan


def _record(item: dict) -> dict:
    return {"index": item["index"], "key": item["key"], "token_ids": [], "error": None,
            "finish_reason": None, "ttft_s": None, "e2e_s": None, "itl_s": [], "num_prompt_tokens": None}


def _arrived(record: dict, token_ids: list[int], start: float, last: float) -> float:
    """Book a chunk of tokens that arrived now; returns now (the new `last`)."""
    now = time.perf_counter()
    n = len(token_ids)
    if n:
        if record["ttft_s"] is None:
            record["ttft_s"] = now - start
        else:
            record["itl_s"].extend([(now - last) / n] * n)
        record["token_ids"].extend(token_ids)
        return now
    return last


class ZmqDriver:
    """The load through the native ZeroMQ client."""

    def __init__(self, endpoint: str, timeout_s: float):
        self.where = endpoint
        self.client = AsyncClient(endpoint, timeout_s=timeout_s)

    async def one(self, item: dict, temperature: float, ignore_eos: bool) -> dict:
        """Stream one request; timestamps are taken as each output arrives."""
        record = _record(item)
        start = last = time.perf_counter()
        try:
            async for output in self.client.stream(temperature=temperature, ignore_eos=ignore_eos, **item["kwargs"]):
                last = _arrived(record, output.token_ids, start, last)
                record["num_prompt_tokens"] = output.num_prompt_tokens
                if output.is_finished:
                    record["finish_reason"] = output.finish_reason
            record["e2e_s"] = time.perf_counter() - start
            if record["finish_reason"] in FAILED_FINISH_REASONS:
                record["error"] = record["finish_reason"]
        except RequestError as exc:
            record["error"] = exc.code
        except (TimeoutError, asyncio.TimeoutError):
            record["error"] = "timeout"
        except Exception as exc:  # a load test reports every failure rather than stopping
            record["error"] = type(exc).__name__
        return record

    async def status(self) -> dict:
        return await self.client.status()

    async def close(self) -> None:
        await self.client.close()


class HttpDriver:
    """The same load through the OpenAI-compatible HTTP API, with the `openai` client."""

    def __init__(self, url: str, timeout_s: float, api_key: str | None):
        import httpx
        import openai

        self.where = url
        self.url = url.rstrip("/")
        key = api_key or os.environ.get(API_KEY_ENV) or "none"
        self.client = openai.AsyncOpenAI(base_url=self.url + "/v1", api_key=key, max_retries=0, timeout=timeout_s)
        self.http = httpx.AsyncClient(timeout=STATUS_TIMEOUT_S)
        self.model: str | None = None

    async def one(self, item: dict, temperature: float, ignore_eos: bool) -> dict:
        import openai

        record = _record(item)
        kwargs = dict(item["kwargs"])
        prompt = kwargs.pop("prompt_ids", None) or kwargs.pop("prompt")
        start = last = time.perf_counter()
        try:
            stream = await self.client.completions.create(
                model=self.model, prompt=prompt, max_tokens=kwargs["max_tokens"], seed=kwargs["seed"],
                temperature=temperature, stream=True, extra_body={"ignore_eos": ignore_eos, "return_token_ids": True})
            async for chunk in stream:
                choice = chunk.choices[0]
                last = _arrived(record, choice.model_extra["token_ids"], start, last)
                if choice.finish_reason is not None:
                    record["finish_reason"] = choice.finish_reason
            record["e2e_s"] = time.perf_counter() - start
            if record["finish_reason"] in FAILED_FINISH_REASONS:
                record["error"] = record["finish_reason"]
        except openai.APITimeoutError:
            record["error"] = "timeout"
        except openai.APIError as exc:  # an error status, or one reported in the stream: its OpenAI code
            record["error"] = exc.body.get("code", "error") if isinstance(exc.body, dict) else type(exc).__name__
        except Exception as exc:  # a load test reports every failure rather than stopping
            record["error"] = type(exc).__name__
        return record

    async def status(self) -> dict:
        """The status fields summarize() uses, read from /metrics (and the model from /v1/models)."""
        from prometheus_client.parser import text_string_to_metric_families

        if self.model is None:
            self.model = (await self.client.models.list()).data[0].id
        response = await self.http.get(self.url + "/metrics")
        response.raise_for_status()
        samples = {(s.name, s.labels.get("role")): s for f in text_string_to_metric_families(response.text)
                   for s in f.samples}

        def value(name: str, role: str | None = None) -> float:
            return samples[(name, role)].value if (name, role) in samples else 0

        info = samples[("minedraft_runtime_info", None)].labels
        return {
            "mode": info["mode"], "num_draft": int(info["num_draft"]), "max_batch": int(info["max_batch"]),
            "dtype": info["dtype"], "target": info["target"], "draft": info["draft"],
            "num_output_tokens": value("minedraft_output_tokens_total"),
            "num_drafted": value("minedraft_spec_drafted_tokens_total"),
            "num_accepted": value("minedraft_spec_accepted_tokens_total"),
            "num_verify_rows": value("minedraft_spec_verify_rows_total"),
            "busy_s": {role: value("minedraft_worker_busy_seconds_total", role) for role in ("drafter", "verifier")},
        }

    async def close(self) -> None:
        await self.client.close()
        await self.http.aclose()


async def _status(driver) -> dict:
    try:
        return await asyncio.wait_for(driver.status(), STATUS_TIMEOUT_S)
    except (TimeoutError, asyncio.TimeoutError):
        raise RuntimeError(f"no runtime answers on {driver.where} within {STATUS_TIMEOUT_S} s") from None
    except Exception as exc:  # HTTP: refused connections, error statuses, a /metrics without the runtime
        raise RuntimeError(f"no status from {driver.where}: {type(exc).__name__}: {exc}") from None


async def _run(driver, plan, concurrency, rate, temperature, seed, ignore_eos, show_progress):
    try:
        before = await _status(driver)
        bar = tqdm(total=len(plan), desc="requests", unit="req", file=sys.stderr, disable=not show_progress)
        records: list[dict] = []

        async def send(item):
            record = await driver.one(item, temperature, ignore_eos)
            records.append(record)
            bar.update(1)

        start = time.perf_counter()
        if rate is not None:  # 1. Poisson arrivals: exponential gaps from a seeded generator
            rng = random.Random(seed)
            arrival_s, tasks = 0.0, []
            for item in plan:
                delay = start + arrival_s - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                tasks.append(asyncio.create_task(send(item)))
                arrival_s += rng.expovariate(rate)
            await asyncio.gather(*tasks)
        else:  # 2. fixed concurrency: C loops, each sends its next request when the last ends
            queue = list(reversed(plan))

            async def loop():
                while queue:
                    await send(queue.pop())
            await asyncio.gather(*(loop() for _ in range(min(concurrency, len(plan)))))
        wall_s = time.perf_counter() - start
        bar.close()
        after = await _status(driver)
    finally:
        await driver.close()
    return sorted(records, key=lambda r: r["index"]), wall_s, before, after


def _delta(before: dict, after: dict, key: str):
    return after.get(key, 0) - before.get(key, 0)


def summarize(records: list[dict], wall_s: float, before: dict, after: dict) -> dict:
    """Throughput, latency percentiles and window deltas of one run (no output ids)."""
    ok = [r for r in records if r["error"] is None]
    num_tokens = sum(len(r["token_ids"]) for r in ok)
    tpot = [(r["e2e_s"] - r["ttft_s"]) / (len(r["token_ids"]) - 1) for r in ok
            if r["ttft_s"] is not None and len(r["token_ids"]) > 1]
    ms = lambda values: {k: None if v is None else 1000 * v for k, v in percentiles(values).items()}  # noqa: E731
    drafted, accepted = _delta(before, after, "num_drafted"), _delta(before, after, "num_accepted")
    rows = _delta(before, after, "num_verify_rows")
    busy = {role: after["busy_s"].get(role, 0.0) - before["busy_s"].get(role, 0.0)
            for role in ("drafter", "verifier")}
    return {
        "mode": after.get("mode"), "num_draft": after.get("num_draft"), "max_batch": after.get("max_batch"),
        "dtype": after.get("dtype"), "target": after.get("target"), "draft": after.get("draft"),
        "num_requests": len(records), "num_ok": len(ok), "num_failed": len(records) - len(ok),
        "errors": dict(Counter(r["error"] for r in records if r["error"] is not None)),
        "finish_reasons": dict(Counter(r["finish_reason"] for r in ok)),
        "wall_s": wall_s,
        "request_throughput": len(ok) / wall_s,
        "num_output_tokens": num_tokens,
        "num_prompt_tokens": (sum(r["num_prompt_tokens"] for r in ok)  # as the server tokenized them (native client)
                              if ok and all(r["num_prompt_tokens"] is not None for r in ok) else None),
        "server_num_output_tokens": _delta(before, after, "num_output_tokens"),
        "output_throughput": num_tokens / wall_s,
        "ttft_ms": ms([r["ttft_s"] for r in ok if r["ttft_s"] is not None]),
        "tpot_ms": ms(tpot),
        "e2e_ms": ms([r["e2e_s"] for r in ok]),
        "itl_ms": ms([g for r in ok for g in r["itl_s"]]),
        "num_drafted": drafted, "num_accepted": accepted, "num_verify_rows": rows,
        "acceptance_rate": accepted / drafted if drafted else None,
        "mean_accepted_length": 1 + accepted / rows if rows else None,
        "busy_s": busy,
        "busy_fraction": {role: b / wall_s for role, b in busy.items()},
        "overlap_efficiency": (busy["drafter"] + busy["verifier"]) / (2 * wall_s),
    }


def run_loadtest(endpoint: str, prompts: list[dict] | list[str], requests: int | None = None,
                 concurrency: int | None = None, rate: float | None = None, max_tokens: int | None = None,
                 temperature: float = 0.0, seed: int = 0, timeout_s: float = 600.0, ignore_eos: bool = False,
                 show_progress: bool = True, http: str | None = None, api_key: str | None = None) -> dict:
    """Run the load and return summarize()'s dict plus the settings and "output_token_ids".
    Give concurrency (fixed) or rate (Poisson, requests/s), not both; neither: DEFAULT_CONCURRENCY.
    max_tokens None: each prompt's own "max_tokens", else DEFAULT_MAX_TOKENS.
    http: a base URL (http://HOST:PORT): the load goes through the HTTP API instead of endpoint."""
    if concurrency is not None and rate is not None:
        raise ValueError("give concurrency or rate, not both")
    if rate is not None and rate <= 0 or concurrency is not None and concurrency < 1:
        raise ValueError("rate must be > 0 and concurrency >= 1")
    prompts = [{"prompt": p} if isinstance(p, str) else p for p in prompts]
    requests = len(prompts) if requests is None else requests
    concurrency = DEFAULT_CONCURRENCY if concurrency is None and rate is None else concurrency
    plan = _plan(prompts, requests, max_tokens, seed)

    async def main():
        driver = HttpDriver(http, timeout_s, api_key) if http else ZmqDriver(endpoint, timeout_s)
        return await _run(driver, plan, concurrency, rate, temperature, seed, ignore_eos, show_progress)

    records, wall_s, before, after = asyncio.run(main())
    result = {"endpoint": endpoint, "http": http, "front_end": "http" if http else "zmq", "requests": requests,
              "concurrency": concurrency, "rate": rate, "max_tokens": max_tokens, "temperature": temperature,
              "seed": seed, "ignore_eos": ignore_eos}
    result.update(summarize(records, wall_s, before, after))
    result["output_token_ids"] = {r["key"]: r["token_ids"] for r in records if r["error"] is None}
    return result


def _fmt(value, digits: int = 1) -> str:
    if value is None:
        return "-"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def format_report(result: dict) -> str:
    """The run as a plain two-column table plus a latency block."""
    load = f"rate {result['rate']} req/s (Poisson)" if result["rate"] is not None else f"concurrency {result['concurrency']}"
    errors = ", ".join(f"{code} x{n}" for code, n in sorted(result["errors"].items())) or "none"
    busy = result["busy_fraction"]
    front_end = f"HTTP {result['http']}" if result.get("http") else f"ZeroMQ {result['endpoint']}"
    lines = [
        ("runtime", f"{result['mode']} (k={result['num_draft']}, max_batch={result['max_batch']}, {result['dtype']})"),
        ("front end", front_end),
        ("load", f"{result['requests']} requests, {load}, temperature {result['temperature']}"),
        ("requests ok / failed", f"{result['num_ok']} / {result['num_failed']} (errors: {errors})"),
        ("wall time s", _fmt(result["wall_s"], 2)),
        ("request throughput", f"{_fmt(result['request_throughput'], 2)} req/s"),
        ("output throughput", f"{_fmt(result['output_throughput'])} tok/s ({result['num_output_tokens']} tokens)"),
        ("acceptance rate", _fmt(result["acceptance_rate"], 3)),
        ("mean accepted length", _fmt(result["mean_accepted_length"], 2)),
        ("busy fraction", f"drafter {busy['drafter']:.3f}, verifier {busy['verifier']:.3f}"),
        ("overlap efficiency", _fmt(result["overlap_efficiency"], 3)),
    ]
    text = [f"{key:<22}{value}" for key, value in lines]
    text.append(f"\n{'latency ms':<12}{'p50':>10}{'p90':>10}{'p99':>10}{'mean':>10}")
    for name in ("ttft", "tpot", "itl", "e2e"):
        p = result[f"{name}_ms"]
        text.append(f"{name.upper():<12}" + "".join(f"{_fmt(p[q], 2):>10}" for q in ("p50", "p90", "p99", "mean")))
    return "\n".join(text)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Bounded load test against a running MineDraft runtime.")
    parser.add_argument("--endpoint", default=DEFAULT_ENDPOINT, help=f"runtime endpoint (default {DEFAULT_ENDPOINT})")
    parser.add_argument("--http", metavar="URL", help="drive the HTTP API at URL (http://HOST:PORT) instead")
    parser.add_argument("--api-key", help=f"Bearer key for --http (default ${API_KEY_ENV})")
    parser.add_argument("--requests", type=int, default=64, help="number of requests (prompts cycle)")
    load = parser.add_mutually_exclusive_group()
    load.add_argument("--concurrency", type=int, help=f"requests in flight at all times (default {DEFAULT_CONCURRENCY})")
    load.add_argument("--rate", type=float, help="Poisson arrivals at this many requests/s")
    parser.add_argument("--max-tokens", type=int, help=f"per request (default: the line's, else {DEFAULT_MAX_TOKENS})")
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--seed", type=int, default=0, help="seeds arrivals; request i samples with seed + i")
    parser.add_argument("--ignore-eos", action="store_true", help="always generate max_tokens")
    parser.add_argument("--prompts", default=DEFAULT_PROMPTS, help="JSONL prompt file")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds to wait for any one output")
    parser.add_argument("--json", metavar="OUT", help="write the result (with output token ids) here")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        result = run_loadtest(args.endpoint, load_prompts(args.prompts), requests=args.requests,
                              concurrency=args.concurrency, rate=args.rate, max_tokens=args.max_tokens,
                              temperature=args.temperature, seed=args.seed, timeout_s=args.timeout,
                              ignore_eos=args.ignore_eos, http=args.http, api_key=args.api_key)
    except (RuntimeError, ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(format_report(result))
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
        print(f"wrote {args.json}")
    return 0 if result["num_failed"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
