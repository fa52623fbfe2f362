"""Where a worker's step goes: one ar, sd and psd step of the configured pair, split into the
target's layers, its lm_head, and everything else of the job (sampling and acceptance, logits
copies, cache bookkeeping), each set against the same forward timed alone. In-process, on the
worker cores (drafter.Drafter, verifier.Verifier), so the protocol and the scheduler are not in
it: tools/bench.py's timelines give those (the gap between a worker's jobs).

    python tools/step_profile.py --config default --rows 8,16 --threads 1
    python tools/step_profile.py --config tiny --rows 4 --repeats 3
    python tools/step_profile.py --gaps out/bench/bench.json   # the protocol and scheduler's share

--gaps reads the job timelines a tools/bench.py run recorded and prints, per run and worker, the
mean job, the mean gap from one job's end to the worker's next job's start (result message,
scheduler commit and next job, job message: what a step costs beyond the worker's core), and
the gaps' share of the worker's steps. Only back-to-back jobs count (a gap under --max-gap-ms);
a longer one is the worker waiting for the other worker or for requests.

A step here is what one job costs the worker that runs it: `ar` a verify of 1 position per
row, `sd` a draft job (k draft forwards) then a verify of k + 1 positions, `psd` the verify of
one of the two batches (its draft is hidden behind the other batch's verify). Every time is the
best of --repeats; the rows hold --context tokens of cache when timed. Table on stdout, JSON to
--out.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from contextlib import contextmanager

import torch

from minedraft.common.config import ConfigError, load_config
from minedraft.workers.buffers import draft_buffer_specs
from minedraft.common.protocol import JobRow
from minedraft.workers.drafter import Drafter
from minedraft.workers.model import load_decoder
from minedraft.workers.model.fast_linear import apply_linear_path
from minedraft.workers.process import tiny_spec
from minedraft.workers.sampling import SamplingParams
from minedraft.workers.verifier import Verifier

CONTEXT_TOKENS = 64  # cached tokens per row when a step is timed


class Clock:
    """Time spent inside a module's forward, summed over calls (the lm_head's, the layers')."""

    def __init__(self):
        self.total_s = 0.0

    def wrap(self, module: torch.nn.Module) -> None:
        forward = module.forward

        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return forward(*args, **kwargs)
            finally:
                self.total_s += time.perf_counter() - start

        module.forward = timed


@contextmanager
def timer(out: dict, key: str):
    start = time.perf_counter()
    yield
    out[key] = time.perf_counter() - start


def load(config, role: str):
    spec = config.model.draft if role == "drafter" else config.model.target
    dtype = torch.float32 if config.model.dtype == "float32" else torch.bfloat16
    model = load_decoder(spec, dtype, "cpu", tiny=tiny_spec(config, role), cache_dir=config.model.cache_dir)
    weights = config.model.draft_weights if role == "drafter" else "float32"
    apply_linear_path(model, config.model.linear_path, config.model.cache_dir, weights)
    return model, dtype


def rows_for(num_rows: int, num_draft: int, contexts: list[list[int]] | None, step: int, params,
             vocab: int = 1000) -> list[JobRow]:
    """Row i commits its context on the first job, then one new token per job."""
    out = []
    for i in range(num_rows):
        tokens = contexts[i] if contexts is not None else [(7 * i + 3 * step) % min(vocab, 1000)]
        out.append(JobRow(f"r{i}", tokens, num_draft, i, params if contexts is not None else None))
    return out


def profile(config, num_rows: int, threads: int, repeats: int, context: int, k: int) -> dict:
    torch.set_num_threads(threads)
    target, dtype = load(config, "verifier")
    draft, _ = load(config, "drafter")
    vocab = target.config.vocab_size
    params = SamplingParams()  # greedy: the acceptance path every benchmark here runs
    g = torch.Generator().manual_seed(0)
    contexts = [torch.randint(0, min(vocab, 30000), (context,), generator=g).tolist() for _ in range(num_rows)]
    layers, head = Clock(), Clock()
    for layer in target.model.layers:
        layers.wrap(layer)
    head.wrap(target.lm_head)
    specs = draft_buffer_specs(num_rows, k, vocab)
    out_tokens = torch.zeros(specs["draft_tokens"][0], dtype=specs["draft_tokens"][1])
    out_probs = torch.zeros(specs["draft_probs"][0], dtype=specs["draft_probs"][1])
    result = {"rows": num_rows, "threads": threads, "context": context, "k": k}
    for mode, num_draft in (("ar", 0), ("sd", k)):
        verifier = Verifier(target, num_rows, context + 16 * (repeats + 2) * (k + 1), k, dtype)
        drafter = Drafter(draft, num_rows, context + 16 * (repeats + 2) * (k + 1), k, dtype)
        verifier.prefill(rows_for(num_rows, 0, contexts, 0, params))
        drafter.draft(rows_for(num_rows, 0, contexts, 0, params), out_tokens, out_probs)
        best: dict[str, float] = {}
        for step in range(1, repeats + 2):  # the first step warms up
            rows = rows_for(num_rows, num_draft, None, step, params, vocab)
            times: dict[str, float] = {}
            if num_draft:
                with timer(times, "draft_job_s"):
                    drafter.draft(rows, out_tokens, out_probs)
            layers.total_s = head.total_s = 0.0
            with timer(times, "verify_job_s"):
                emitted = verifier.verify(rows, out_tokens, out_probs)
            times["layers_s"], times["lm_head_s"] = layers.total_s, head.total_s
            # Each step commits one new token per row, whatever was emitted: the step's shapes are
            # what matter here, and the drafts it does not keep cost a cache length decrement.
            assert len(emitted) == num_rows
            if step > 1:
                best = {key: min(best.get(key, float("inf")), value) for key, value in times.items()}
        # The same forward alone: the verify's shapes, on a fresh cache filled to the same context.
        forward_cache = Verifier(target, num_rows, context + 2 * (k + 1) * (repeats + 2), k, dtype)
        forward_cache.prefill(rows_for(num_rows, 0, contexts, 0, params))
        tokens = torch.randint(0, min(vocab, 1000), (num_rows, num_draft + 1), generator=g)
        slots = [forward_cache.table.requests[f"r{i}"].slot for i in range(num_rows)]
        index = torch.arange(num_draft + 1).expand(num_rows, -1)
        alone = float("inf")
        for _ in range(repeats + 1):
            start = time.perf_counter()
            target(tokens, forward_cache.cache, slots, None, index)
            alone = min(alone, time.perf_counter() - start)
            for slot in slots:
                forward_cache.cache.truncate(slot, forward_cache.cache.lengths[slot] - num_draft - 1)
        verify = best["verify_job_s"]
        forward = best["layers_s"] + best["lm_head_s"]
        result[mode] = {**{key: round(v, 5) for key, v in best.items()}, "forward_alone_s": round(alone, 5),
                        "other_s": round(verify - forward, 5), "verify_over_forward": round(verify / alone, 3)}
    return result


def job_gaps(bench_json: str, max_gap_s: float) -> list[dict]:
    """Per run and worker of a bench.json: mean job time, mean gap between back-to-back jobs."""
    with open(bench_json) as f:
        report = json.load(f)
    rows = []
    for run in report["runs"]:
        for role in ("drafter", "verifier"):
            jobs = sorted((j for j in run.get("timeline") or [] if j["role"] == role and j.get("kind") != "prefill"),
                          key=lambda j: j["start_s"])
            pairs = [(a, b["start_s"] - a["end_s"]) for a, b in zip(jobs, jobs[1:]) if b["start_s"] - a["end_s"] < max_gap_s]
            if not pairs:
                continue
            job_s = sum(a["end_s"] - a["start_s"] for a, _ in pairs) / len(pairs)
            gap_s = sum(g for _, g in pairs) / len(pairs)
            rows.append({"run": run["label"], "role": role, "num_jobs": len(pairs), "job_ms": job_s * 1e3,
                         "gap_ms": gap_s * 1e3, "gap_share": gap_s / (job_s + gap_s)})
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="default")
    parser.add_argument("--rows", default="8,16", help="rows per step, comma-separated")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--context", type=int, default=CONTEXT_TOKENS)
    parser.add_argument("--out", default="", help="write the results as JSON here")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    parser.add_argument("--gaps", metavar="BENCH_JSON", help="instead: the gaps between jobs in a tools/bench.py run")
    parser.add_argument("--max-gap-ms", type=float, default=50.0)
    args = parser.parse_args(argv)
    if args.gaps:
        rows = job_gaps(args.gaps, args.max_gap_ms / 1e3)
        print(f"{'run':<24} {'worker':<9} {'jobs':>5} {'job ms':>8} {'gap ms':>7} {'gap share':>9}")
        for r in rows:
            print(f"{r['run']:<24} {r['role']:<9} {r['num_jobs']:>5} {r['job_ms']:8.1f} {r['gap_ms']:7.2f} {r['gap_share']:9.3f}")
        if args.out:
            with open(args.out, "w") as f:
                json.dump(rows, f, indent=1)
        return 0
    try:
        config = load_config(args.config, args.set)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    cores = sorted(os.sched_getaffinity(0))[: args.threads]
    os.sched_setaffinity(0, cores)
    k = config.scheduler.num_draft
    results = [profile(config, int(r), args.threads, args.repeats, args.context, k) for r in args.rows.split(",")]
    print(f"{'step':<10} {'rows':>4} {'job ms':>8} {'layers':>8} {'lm_head':>8} {'other':>7} "
          f"{'alone ms':>9} {'job/alone':>9} {'draft job':>9}")
    for r in results:
        for mode in ("ar", "sd"):
            m = r[mode]
            print(f"{mode + ' verify':<10} {r['rows']:>4} {m['verify_job_s'] * 1e3:8.1f} {m['layers_s'] * 1e3:8.1f} "
                  f"{m['lm_head_s'] * 1e3:8.1f} {m['other_s'] * 1e3:7.1f} {m['forward_alone_s'] * 1e3:9.1f} "
                  f"{m['verify_over_forward']:9.3f} {m.get('draft_job_s', 0.0) * 1e3:9.1f}")
    print(f"threads {args.threads} on cores {cores}; other = job - (layers + lm_head): acceptance, logits, cache bookkeeping")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
