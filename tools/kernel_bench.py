"""Kernel-level timings against this machine's own limits: read bandwidth and matmul peak per
thread count, every linear shape of a model at small M for each implementation, and whole
forwards (rows x positions) on the plain and the packed linear path. Every time is printed next
to its bound, max(bytes / bandwidth, FLOPs / peak), as a ratio. Table on stdout, JSON to --out.

    python tools/kernel_bench.py --config default              # the Qwen pair (prepared weights)
    python tools/kernel_bench.py --models tiny-qwen2 --rows 1,5,16
    python tools/kernel_bench.py --models random-qwen2.5-coder-1.5b --skip-forwards

Runs pinned to the first --threads cores of this process's affinity. Implementations: plain
(F.linear, MKL), packed (our small-M kernel, workers/model/csrc), onednn (oneDNN linear with
the weight prepacked once). Each linear call reads a different copy of its weight (128 MiB of
copies in all), so small weights are timed from memory as in a forward, not from the caches.
Forwards run on a fresh KV cache with 32 tokens of context.

On a shared machine the clock and the bandwidth wander by 10-30% over seconds. So the
implementations of a cell (and the five forwards of a path) take turns, one call each per round
(a call under 2 ms as the mean of a burst of back-to-back calls, each on its own weight copy),
keeping their best of --repeats rounds; the linear table is timed in --passes whole passes, each
cell keeping its best; and the limits are measured before each pass and after the last timing,
each bound using the highest seen (the tightest bound of the run). A linear's ratio pairs each of
its timings with the limits probed just before and just after its round (the higher of the two):
the read bandwidth, and the rate of a 512^3 matmul scaled to the run's peak (its clock). It keeps
the best pairing: a call is set against the machine's speed of its own moment.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time

import torch
import torch.nn.functional as F

from minedraft.common.config import ConfigError, load_config
from minedraft.workers.model.kv_cache import KVCache
from minedraft.workers.model import load_decoder
from minedraft.workers.model.fast_linear import apply_linear_path, best_time_s, kernel_unavailable_reason, load_kernel

DEFAULT_ROWS = (1, 2, 5, 8, 16, 40, 80)
FORWARDS = ((1, 1), (1, 5), (8, 1), (8, 5), (16, 5))  # (rows, positions)
CONTEXT_TOKENS = 32  # tokens already in each row's cache when a forward is timed
BANDWIDTH_BYTES = 512 * 2**20  # read-bandwidth buffer: far beyond any last-level cache
PEAK_SIZE = 2048  # n of the n x n x n GEMM that measures the matmul peak
PEAK_ROWS = 512  # M of the packed kernel's large GEMM (also a candidate for the peak)
PROBE_BYTES = 64 * 2**20  # the bandwidth probe around each round of linear timings
PROBE_GEMM = 512  # n of the n x n x n matmul that probes the clock around each round
BURST_S = 2e-3  # a call shorter than this is timed as the mean of a burst of calls filling it:
#                 in a forward a linear follows other linears, not a probe or another library's
#                 call, and a lone 0.2 ms call after those measured up to 1.3x slower (same kernel)
MAX_BURST_CALLS = 16
ROTATE_BYTES = 128 * 2**20  # linears cycle through copies of their weight totalling this: as in a
#                             forward, every call reads its weight from memory, not from the caches


def measure_limits(num_threads: int, ops, repeats: int) -> dict:
    """Read bandwidth (a sum over a buffer far larger than the caches) and the matmul peak (the
    faster of MKL's and our kernel's large float32 GEMM) at num_threads."""
    torch.set_num_threads(num_threads)
    buffer = torch.ones(BANDWIDTH_BYTES // 4)
    bandwidth = BANDWIDTH_BYTES / best_time_s(buffer.sum, repeats)
    a, b = torch.randn(PEAK_SIZE, PEAK_SIZE), torch.randn(PEAK_SIZE, PEAK_SIZE)
    peaks = {"mkl_gemm": 2 * PEAK_SIZE**3 / best_time_s(lambda: a @ b, repeats)}
    if ops is not None:
        x, packed = torch.randn(PEAK_ROWS, PEAK_SIZE), ops.pack(b)
        peaks["packed_gemm"] = 2 * PEAK_ROWS * PEAK_SIZE**2 / best_time_s(lambda: ops.linear(x, packed, None, PEAK_SIZE), repeats)
    return {"threads": num_threads, "read_bytes_per_s": bandwidth, "peak_flops": max(peaks.values()), "peaks": peaks}


def merge_limits(measured: list[dict]) -> dict:
    """Limits measured several times in one run (before each pass of the linears and after the
    last timing), each the highest seen: the clock and the bandwidth of a shared machine wander,
    and every bound is then the tightest the run saw."""
    peaks = {name: max(m["peaks"][name] for m in measured) for name in measured[0]["peaks"]}
    return {"threads": measured[0]["threads"], "peaks": peaks, "peak_flops": max(peaks.values()),
            "read_bytes_per_s": max(m["read_bytes_per_s"] for m in measured), "measured": measured}


def best_of_passes(passes: list[list[dict]]) -> list[dict]:
    """Per cell (model, shape, M), each implementation's best time over the passes."""
    best = {}
    for entries in passes:
        for r in entries:
            key = (r["model"], r["shape"], r["m"])
            if key not in best:
                best[key] = dict(r, samples={i: list(s) for i, s in r["samples"].items()})
            else:
                for impl, samples in r["samples"].items():
                    best[key]["samples"][impl] += samples
    for r in best.values():
        r["times_s"] = {impl: min(sample[0] for sample in samples) for impl, samples in r["samples"].items()}
        r["served"] = min(SERVED, key=lambda impl: r["times_s"].get(impl, float("inf")))
    return list(best.values())


def bound_s(limits: dict, num_bytes: float, flops: float) -> float:
    return max(num_bytes / limits["read_bytes_per_s"], flops / limits["peak_flops"])


def paired_ratio(cell: dict, sample: list[float], probe_to_peak: float) -> float:
    """One timing of a cell against the bound of its moment: the read bandwidth probed around
    it, and the probed matmul rate scaled to the large GEMM's peak (the same clock)."""
    seconds, read_bytes_per_s, probe_flops = sample
    return seconds / max(cell["bytes"] / read_bytes_per_s, cell["flops"] / (probe_flops * probe_to_peak))


def attach_bounds(report: dict) -> None:
    """Each time's bound and ratio, from the run's final limits at its thread count."""
    limits = report["limits"][-1]
    probed = [s[2] for r in report["linears"] for samples in r["samples"].values() for s in samples]
    limits["probe_to_peak"] = limits["peak_flops"] / max(probed) if probed else 1.0
    for r in report["linears"]:
        r["bound_s"] = bound_s(limits, r["bytes"], r["flops"])
        r["ratios"] = {impl: min(paired_ratio(r, sample, limits["probe_to_peak"]) for sample in r["samples"][impl])
                       for impl in r["times_s"]}
    for f in report["forwards"]:
        f["bound_s"] = bound_s(limits, f["bytes"], f["flops"])
        f["flop_bound_s"] = f["flops"] / limits["peak_flops"]
        f["memory_bound_s"] = f["bytes"] / limits["read_bytes_per_s"]


# Shapes only the plain path runs: the kernel path merges q/k/v and gate/up (fuse_projections).
PLAIN_ONLY = ("k_proj / v_proj", "gate_proj / up_proj")
SERVED = ("plain", "packed")  # what model.linear_path = auto chooses between, per shape and M


def linear_shapes(config) -> dict[str, tuple[int, int]]:
    """name -> (N out, K in) for every distinct linear of a Llama/Qwen2 decoder, separate (the
    plain path) and merged (the kernel path)."""
    c = config
    q, kv = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
    return {
        "q_proj / o_proj": (q, c.hidden_size),
        "k_proj / v_proj": (kv, c.hidden_size),
        "qkv_proj (merged)": (q + 2 * kv, c.hidden_size),
        "gate_proj / up_proj": (c.intermediate_size, c.hidden_size),
        "gate_up_proj (merged)": (2 * c.intermediate_size, c.hidden_size),
        "down_proj": (c.hidden_size, c.intermediate_size),
        "lm_head": (c.vocab_size, c.hidden_size),
    }


def rotating(weights: list):
    """A callable returning the next of the weights each call."""
    state = {"i": 0}

    def next_weight():
        state["i"] = (state["i"] + 1) % len(weights)
        return weights[state["i"]]
    return next_weight


def time_linears(config, rows: list[int], ops, repeats: int, probe) -> list[dict]:
    """Each shape x M on every implementation. The implementations take turns, one call each per
    round, and each keeps its best of `repeats` rounds: on a shared machine whose clock and
    bandwidth wander, a slow spell then hits every implementation alike instead of one."""
    results = []
    for name, (n, k) in linear_shapes(config).items():
        num_copies = max(1, -(-ROTATE_BYTES // (4 * n * k)))
        weights = [torch.randn(n, k) * 0.02 for _ in range(num_copies)]
        bias = torch.randn(n) * 0.02 if "_proj" in name else None
        plain = rotating(weights)
        impls = {"plain": lambda x: F.linear(x, plain(), bias)}
        if ops is not None:
            packed = rotating([ops.pack(w) for w in weights])
            impls["packed"] = lambda x: ops.linear(x, packed(), bias, n)
        if torch.backends.mkldnn.is_available():
            prepacked = rotating([torch.ops.mkldnn._reorder_linear_weight(w, 8) for w in weights])
            impls["onednn"] = lambda x: torch.ops.mkldnn._linear_pointwise(x, prepacked(), bias, "none", [], "")
        for m in rows:
            x = torch.randn(m, k)
            with torch.inference_mode():
                samples = interleaved_rounds({impl: (lambda fn=fn: fn(x)) for impl, fn in impls.items()}, repeats, probe)
            times = {impl: min(sample[0] for sample in pairs) for impl, pairs in samples.items()}
            results.append({"shape": name, "n": n, "k": k, "m": m, "times_s": times, "samples": samples,
                            "plain_path_only": name in PLAIN_ONLY,
                            "bytes": 4 * (n * k + m * k + m * n), "flops": 2 * m * n * k})
    return results


def interleaved_best_s(fns: dict, repeats: int) -> dict:
    """name -> best time of fns[name]() over `repeats` rounds in which every fn runs once in turn."""
    rounds = interleaved_rounds(fns, repeats)
    return {name: min(sample[0] for sample in samples) for name, samples in rounds.items()}


def burst_calls(seconds: float) -> int:
    """Back-to-back calls that time one call of this length: enough to fill BURST_S."""
    return max(1, min(MAX_BURST_CALLS, round(BURST_S / max(seconds, 1e-9))))


def interleaved_rounds(fns: dict, repeats: int, probe=None) -> dict[str, list[list[float]]]:
    """name -> [[seconds, *probe], ...], one entry per round; in each round every fn runs in
    turn, as one burst of back-to-back calls (a single call from BURST_S up), and its time is the
    burst's mean. With a probe (returning a tuple of rates), a round's rates are the higher of the
    probes taken just before and just after it (the tighter bound)."""
    calls = {}
    for name, fn in fns.items():  # warm (caches, page faults, lazy init), and size each burst
        fn()
        start = time.perf_counter()
        fn()
        calls[name] = burst_calls(time.perf_counter() - start)
    samples = {name: [] for name in fns}
    rates = probe() if probe else ()
    for _ in range(repeats):
        times = {}
        for name, fn in fns.items():
            start = time.perf_counter()
            for _ in range(calls[name]):
                fn()
            times[name] = (time.perf_counter() - start) / calls[name]
        after = probe() if probe else ()
        for name, t in times.items():
            samples[name].append([t, *(max(a, b) for a, b in zip(rates, after))])
        rates = after
    return samples


class LimitsProbe:
    """The machine's speed of the moment: (read bytes/s of one sum over PROBE_BYTES, FLOP/s of
    one PROBE_GEMM^3 matmul). On a shared machine both wander by 10-30% over seconds, so each
    linear timing is set against the limits probed around it, not only against the run's best.
    The small GEMM runs below the large one's peak; attach_bounds scales it to that peak."""

    def __init__(self):
        self.buffer = torch.ones(PROBE_BYTES // 4)
        self.a, self.b = torch.randn(PROBE_GEMM, PROBE_GEMM), torch.randn(PROBE_GEMM, PROBE_GEMM)

    def __call__(self) -> tuple[float, float]:
        start = time.perf_counter()
        self.buffer.sum()
        middle = time.perf_counter()
        torch.mm(self.a, self.b)
        end = time.perf_counter()
        return PROBE_BYTES / (middle - start), 2 * PROBE_GEMM**3 / (end - middle)


def time_forwards(spec: str, dtype: torch.dtype, cache_dir: str, paths: list[str], repeats: int) -> tuple[dict, list]:
    """Whole forwards of one model on each linear path (plain first, the others one at a time)."""
    results, reports = [], {}
    for path in paths:  # one model at a time: it is freed when _time_path returns
        reports[path], path_results = _time_path(spec, path, dtype, cache_dir, repeats)
        results += path_results
        gc.collect()
    return reports, results


def _time_path(spec: str, path: str, dtype: torch.dtype, cache_dir: str, repeats: int) -> tuple[dict, list]:
    """path: a model.linear_path, or "bf16" (the kernel on weights rounded to bfloat16, as
    model.draft_weights = bfloat16 serves a draft; its bound reads 2 bytes a weight)."""
    model = load_decoder(spec, dtype, cache_dir=cache_dir)
    weights = "bfloat16" if path == "bf16" else "float32"
    report = apply_linear_path(model, "packed" if path == "bf16" else path, cache_dir, weights).to_dict()
    config = model.config
    weight_bytes = _matmul_params(config) * (2 if path == "bf16" else dtype.itemsize)  # norms and biases are negligible
    forwards, results = {}, []
    for num_rows, num_positions in FORWARDS:
        cache = KVCache(config, num_rows, CONTEXT_TOKENS + num_positions + 8, dtype)
        slots = [cache.alloc() for _ in range(num_rows)]
        context = torch.randint(0, config.vocab_size, (num_rows, CONTEXT_TOKENS))
        model(context, cache, slots, logit_index=torch.zeros(num_rows, 0, dtype=torch.long))
        tokens = torch.randint(0, config.vocab_size, (num_rows, num_positions))
        index = torch.arange(num_positions).expand(num_rows, -1)

        def forward(tokens=tokens, cache=cache, slots=slots, index=index):
            model(tokens, cache, slots, logit_index=index)
            for slot in slots:
                cache.truncate(slot, CONTEXT_TOKENS)
        forwards[num_rows, num_positions] = forward
    times = interleaved_best_s(forwards, repeats)  # 1 x 1 and 1 x 5 side by side, not minutes apart
    for (num_rows, num_positions), elapsed in times.items():
        flops = 2 * num_rows * num_positions * _matmul_params(config)
        results.append({"model": spec, "path": path, "rows": num_rows, "positions": num_positions,
                        "time_s": elapsed, "bytes": weight_bytes, "flops": flops})
    return report, results


def _matmul_params(config) -> int:
    """Weights multiplied per position: every linear of every layer plus the lm_head."""
    return sum(n * k for n, k in _all_linears(config))


def _all_linears(config):
    c, shapes = config, linear_shapes(config)  # the separate projections: same weights as merged
    per_layer = [shapes["q_proj / o_proj"], shapes["k_proj / v_proj"], shapes["k_proj / v_proj"],
                 (c.hidden_size, c.num_heads * c.head_dim), shapes["gate_proj / up_proj"],
                 shapes["gate_proj / up_proj"], shapes["down_proj"]]
    return per_layer * c.num_layers + [shapes["lm_head"]]


def served_worst(linears: list[dict]) -> dict:
    """The worst ratio of what auto serves (the faster of plain and packed), over the shapes the
    kernel path runs, for M <= 16 and for M >= 40: the two bands of the per-linear targets."""
    bands = {"M 1-16": lambda m: m <= 16, "M 40+": lambda m: m >= 40}
    worst = {}
    for label, in_band in bands.items():
        cells = [r for r in linears if in_band(r["m"]) and not r["plain_path_only"]]
        if cells:
            r = max(cells, key=lambda r: r["ratios"][r["served"]])
            worst[label] = {"ratio": r["ratios"][r["served"]], "model": r.get("model", ""), "shape": r["shape"], "m": r["m"]}
    return worst


def print_report(report: dict) -> None:
    for lim in report["limits"]:
        peaks = ", ".join(f"{k} {v / 1e9:.1f}" for k, v in lim["peaks"].items())
        print(f"threads {lim['threads']}: read {lim['read_bytes_per_s'] / 1e9:.1f} GB/s; "
              f"matmul peak {lim['peak_flops'] / 1e9:.1f} GFLOP/s ({peaks})")
    if report["linears"]:
        impls = list(report["linears"][0]["times_s"])
        print(f"\nlinears at {report['threads']} thread(s): best ms (ratio to bound: each timing against the "
              f"bandwidth and clock probed around it, the best pairing); bound at the run's best limits; "
              f"* = run by the plain path only")
        print(f"{'shape':<24}{'N x K':>14}{'M':>5}{'bound':>9}" + "".join(f"{i:>18}" for i in impls) + "  served")
        for r in report["linears"]:
            cells = "".join(f"{r['times_s'][i] * 1e3:>10.2f} ({r['ratios'][i]:4.2f})" for i in impls)
            name = r["shape"] + (" *" if r["plain_path_only"] else "")
            print(f"{name:<24}{r['n']:>7}x{r['k']:<6}{r['m']:>5}{r['bound_s'] * 1e3:>9.2f}{cells}"
                  f"  {r['served']} {r['ratios'][r['served']]:.2f}")
        for label, worst in served_worst(report["linears"]).items():
            print(f"worst served ratio, kernel-path shapes, {label}: {worst['ratio']:.2f} "
                  f"({worst['model']} {worst['shape']} at M = {worst['m']})")
    if report["forwards"]:
        print(f"\nwhole forwards at {report['threads']} thread(s) ({CONTEXT_TOKENS} tokens of context)")
        print(f"{'model':<30}{'path':<8}{'rows x pos':>11}{'ms':>10}{'bound':>9}{'ratio':>7}{'vs 1x1':>8}")
        ones = {(f["model"], f["path"]): f["time_s"] for f in report["forwards"] if f["rows"] == f["positions"] == 1}
        for f in report["forwards"]:
            one = ones.get((f["model"], f["path"]))
            print(f"{f['model']:<30}{f['path']:<8}{f['rows']:>5} x {f['positions']:<3}{f['time_s'] * 1e3:>10.1f}"
                  f"{f['bound_s'] * 1e3:>9.1f}{f['time_s'] / f['bound_s']:>7.2f}"
                  f"{f['time_s'] / one if one else float('nan'):>8.2f}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="take the draft and target of this config (e.g. default, tiny)")
    parser.add_argument("--models", help="comma-separated model specs instead of a config's pair")
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads (pinned to that many cores)")
    parser.add_argument("--rows", default=",".join(map(str, DEFAULT_ROWS)), help="M values for the linears")
    parser.add_argument("--paths", default="plain,auto", help="linear paths for whole forwards (plain, auto, packed; "
                        "bf16: the kernel on weights rounded to bfloat16, as model.draft_weights = bfloat16)")
    parser.add_argument("--repeats", type=int, default=5, help="best of this many timings of each cell per pass")
    parser.add_argument("--passes", type=int, default=3, help="passes over every linear cell, each cell's best kept")
    parser.add_argument("--skip-linears", action="store_true")
    parser.add_argument("--skip-forwards", action="store_true")
    parser.add_argument("--costs", action="store_true", help="also record each model's weights read and FLOPs per "
                        "position as served by --config (the draft's at model.draft_weights): tools/plan_bounds.py")
    parser.add_argument("--out", help="write the JSON report here")
    args = parser.parse_args(argv)
    try:
        config = load_config(args.config) if args.config else load_config()
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    specs = args.models.split(",") if args.models else [config.model.target, config.model.draft]
    specs = list(dict.fromkeys(specs))
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[config.model.dtype]
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < args.threads:
        print(f"error: --threads {args.threads} but only {len(cores)} core(s) available", file=sys.stderr)
        return 2
    os.sched_setaffinity(0, cores[: args.threads])
    cache_dir = config.model.cache_dir
    ops = None
    if kernel_unavailable_reason(torch.device("cpu"), torch.float32) is None:
        ops, how = load_kernel(cache_dir)
        print(f"packed kernel: {how}")
    limits = [measure_limits(t, ops, args.repeats) for t in range(1, args.threads + 1)]
    torch.set_num_threads(args.threads)
    report = {"threads": args.threads, "cpu": _cpu_name(), "torch": torch.__version__, "limits": limits,
              "linears": [], "forwards": [], "linear_paths": {}}
    rows = [int(r) for r in args.rows.split(",")]
    measured = [limits[-1]]
    if not args.skip_linears:
        configs = {spec: _config_of(spec, dtype, cache_dir) for spec in specs}
        probe = LimitsProbe()
        passes = []
        for pass_index in range(args.passes):  # whole passes: a slow spell of the machine then
            if pass_index:                      # costs a cell one sample, not its every sample
                measured.append(measure_limits(args.threads, ops, args.repeats))
            passes.append([dict(r, model=spec) for spec in specs
                           for r in time_linears(configs[spec], rows, ops, args.repeats, probe)])
        report["linears"] = best_of_passes(passes)
    if not args.skip_forwards:
        for spec in specs:
            paths, forwards = time_forwards(spec, dtype, cache_dir, args.paths.split(","), args.repeats)
            report["linear_paths"][spec] = paths
            report["forwards"] += forwards
    report["limits"][-1] = merge_limits(measured + [measure_limits(args.threads, ops, args.repeats)])
    attach_bounds(report)
    report["served_worst"] = served_worst(report["linears"])
    if args.costs:
        report["models"] = {role: model_costs(_config_of(spec, dtype, cache_dir), dtype,
                                              config.model.draft_weights if role == "draft" else "float32")
                            for role, spec in (("target", config.model.target), ("draft", config.model.draft))}
    print_report(report)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as file:
            json.dump(report, file, indent=1)
        print(f"\nwrote {args.out}")
    return 0


def model_costs(config, dtype: torch.dtype, weights: str) -> dict:
    """What one forward of the model costs: the bytes of weights it reads (the linears at
    `weights`' width; norms and biases are negligible), the FLOPs per position, and per prompt
    token (no lm_head)."""
    params = _matmul_params(config)
    width = 2 if weights == "bfloat16" else dtype.itemsize
    lm_head = config.vocab_size * config.hidden_size
    return {"weight_bytes": params * width, "flops_per_position": 2 * params,
            "flops_per_prompt_token": 2 * (params - lm_head)}  # a prompt's tokens need no logits


def _config_of(spec: str, dtype: torch.dtype, cache_dir: str):
    model = load_decoder(spec, dtype, cache_dir=cache_dir)
    config = model.config
    del model
    gc.collect()
    return config


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as file:
            return next((line.split(":", 1)[1].strip() for line in file if line.startswith("model name")), "?")
    except OSError:
        return "?"


if __name__ == "__main__":
    sys.exit(main())
