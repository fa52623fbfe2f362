"""GPU check in one command: correctness on the device, CUDA IPC round trips between two
processes, AR / SD / PSD throughput with random-weight Qwen2.5-Coder shapes, and the draft exchange
through real daemons with seeded sampling. Prints a short table at the end and writes JSON. Exit 1
when a check fails; 0 otherwise (skips included).

    python tools/gpu_check.py --json out/gpu_check.json            # all GPUs there are; sized for < 8 min on one H200
    python tools/gpu_check.py --device cpu --quick --json /tmp/g.json  # CPU smoke test of this script (CI)
    python tools/gpu_check.py --skip c                               # correctness only

a  our decoder vs transformers logits (tiny Llama and Qwen2 on the device, float32, max diff < 1e-4);
   greedy sd == ar through the in-process Engine on the device; chi-square checks (1e5 draws) of
   exact speculative sampling with the device's generators, plus a negative control.
b  buffer sets (tools/gpu_ipc.py) made here on cuda:0: the draft buffers and small sets, some of which
   share one cudaMalloc segment (one IPC handle at nonzero offsets). A second process, whose
   CUDA_VISIBLE_DEVICES lists the GPUs in reverse when there are two or more (so it numbers them
   differently and its current device is another GPU), attaches them all from the msgpack handles,
   checks each checksum and the device UUID, and writes back in place; this process checks the
   writes. With --device cpu: the same round trip over shared memory.
c  one daemon per (batch, mode), started through the CLI on a private ipc:// endpoint: target
   random-qwen2.5-coder-1.5b, draft random-qwen2.5-coder-0.5b, bfloat16, drafter on cuda:0 and
   verifier on cuda:1 (both on cuda:0 with one GPU: two CUDA contexts time-slice it, and the
   table shows what that costs: draft/verify ms per job in psd against sd). Greedy ignore_eos
   requests, 2 x batch in flight. Random weights accept ~0 drafts, so sd/psd only pay for
   drafting: this times the runtime; it does not predict speedups with real weights.
   --device cpu: tiny models (configs/tiny.toml), small sizes.
d  the draft exchange (tools/gpu_exchange.py): seeded sampled requests through a psd and an sd
   daemon on configs/tiny.toml's float32 models (a near-copy draft), placed as in c, must equal the
   in-process engine on the same devices token for token; psd must accept most drafts; status must
   show the buffers read on the drafter's GPU (by UUID). --device cpu: served by c's daemons.

Scale up: --batches 8,32,64 --requests-per-batch 8 --max-tokens 256 (a run's time grows with
requests x tokens); --budget-s bounds the whole of section c (runs past it are skipped).

Without CUDA (and without --device cpu) it prints so and exits 0 with status "skipped: no CUDA
device". In a checkout where the package is not installed it maps the import names
minedraft.runtime / minedraft.workers onto the repo folders itself (a temp dir of symlinks on
PYTHONPATH, inherited by the daemons). Needs torch, transformers, msgpack; section c also pyzmq,
which a machine without a package index lacks: carry its wheel in the working tree. Here, in the
repo root (python 3.12 there; .whl/ kept out of git):
    echo /.whl/ >> .git/info/exclude
    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_26_x86_64 \
        --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl pyzmq
There, in the repo root (with .whl carried):
    python3 -m pip install -q --no-index --no-deps --target /tmp/site --find-links .whl pyzmq \
        && export PYTHONPATH=/tmp/site; PYTHONUNBUFFERED=1 python3 tools/gpu_check.py --json out/gpu_check.json
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import gpu_exchange  # noqa: E402  (section d)
import gpu_ipc  # noqa: E402  (section b)
import gpu_throughput  # noqa: E402  (section c; imports neither torch nor zmq at import)

ROOT = Path(__file__).resolve().parent.parent
PARITY_TOL = 1e-4
NUM_TRIALS = 100_000
ALPHA = 1e-6  # false-alarm rate of each chi-square check


def ensure_importable() -> None:
    """Make minedraft.* importable here and in every process started from here."""
    try:
        import minedraft.workers  # noqa: F401
        return
    except ImportError:
        pass
    shim = tempfile.mkdtemp(prefix="minedraft-shim-")
    atexit.register(shutil.rmtree, shim, True)
    os.makedirs(os.path.join(shim, "minedraft"))
    for name in ("runtime", "workers"):
        os.symlink(ROOT / name, os.path.join(shim, "minedraft", name))
    sys.path.insert(0, shim)
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [shim, os.environ.get("PYTHONPATH")]))


# ------------------------------------------------------------------ a: correctness on the device


def check_parity(device: str) -> dict:
    import torch

    from minedraft.workers.model.kv_cache import KVCache
    from minedraft.workers.model import TINY_ARCHS, TinySpec, decoder_from_hf, tiny_hf_model

    spec, result = TinySpec(num_heads=4, num_kv_heads=2), {}
    gen = torch.Generator().manual_seed(0)
    for arch in TINY_ARCHS:
        hf = tiny_hf_model(arch, spec)
        with torch.no_grad():  # sharper than the 0.02 init, so a wrong position or mask shows
            for p in hf.parameters():
                if p.dim() == 2:
                    p.mul_(5)
        ours, hf = decoder_from_hf(hf, torch.float32, device), hf.to(device)
        rows = [torch.randint(0, spec.vocab_size, (n,), generator=gen).tolist() for n in (7, 3, 12)]
        cache = KVCache(ours.config, len(rows), 64, torch.float32, device)
        slots, seqs, max_diff = [cache.alloc() for _ in rows], [[] for _ in rows], 0.0
        for new in (rows, [[1, 2], [3], [4, 5, 6]], [[7], [], [9]]):  # prefill, then ragged appends
            width = max(len(r) for r in new)
            tokens = torch.tensor([r + [0] * (width - len(r)) for r in new])  # [B, T]
            logits = ours(tokens, cache, slots, [len(r) for r in new])  # [B, T, V]
            for b, r in enumerate(new):
                seqs[b] += r
                if r:
                    with torch.no_grad():
                        ref = hf(torch.tensor([seqs[b]], device=device)).logits[0, -len(r):].float()
                    max_diff = max(max_diff, (logits[b, : len(r)] - ref).abs().max().item())
        result[arch] = {"max_abs_diff": max_diff, "ok": max_diff < PARITY_TOL}
    return result


def check_engine_greedy(device: str, quick: bool) -> dict:
    import torch

    from minedraft.common.request import Request
    from minedraft.workers.engine import Engine
    from minedraft.workers.model.loader import TinySpec, load_decoder

    target = load_decoder("tiny-llama", torch.float32, device, tiny=TinySpec(seed=0))
    draft = load_decoder("tiny-llama", torch.float32, device, tiny=TinySpec(seed=0, noise=0.003))
    rng = random.Random(0)
    requests = [([rng.randrange(256) for _ in range(rng.randint(1, 40))], rng.randint(4, 40))
                for _ in range(8 if quick else 16)]

    def run(mode: str, target, draft) -> tuple[dict, float | None]:
        engine = Engine(target, draft, mode=mode, num_draft=4, max_batch=8, max_len=256)
        for i, (prompt, max_tokens) in enumerate(requests):
            engine.add_request(Request(f"r{i}", prompt, max_tokens))
        done = engine.run()
        drafted = sum(r.num_drafted for r in done.values())
        accepted = sum(r.num_accepted for r in done.values())
        return {k: r.output_ids for k, r in done.items()}, accepted / drafted if drafted else None

    ar, _ = run("ar", target, None)
    sd, acceptance = run("sd", target, draft)
    result = {"num_requests": len(requests), "sd_equals_ar": sd == ar, "sd_acceptance_rate": acceptance,
              "ok": sd == ar}
    if device != "cpu":  # information only: float32 on two devices may flip a near-tie
        cpu_ar, _ = run("ar", target.to("cpu"), None)
        result["ar_matches_cpu_ar"] = sum(cpu_ar[k] == ar[k] for k in ar) / len(ar)
    return result


def chi_square_ok(tokens, probs) -> bool:
    """tokens [N] plausibly drawn from probs [V]: nothing of probability 0 drawn and the statistic
    below its 1 - ALPHA quantile (cells with expected < 5 pooled; Wilson-Hilferty quantile)."""
    import torch

    counts = torch.bincount(tokens.cpu(), minlength=probs.numel()).double()  # [V]
    expected = probs.cpu().double() / probs.cpu().double().sum() * tokens.numel()  # [V]
    if counts[expected == 0].sum() > 0:
        return False
    small, large = (expected > 0) & (expected < 5), expected >= 5
    observed = torch.cat([counts[large], counts[small].sum().view(1)])
    expected = torch.cat([expected[large], expected[small].sum().view(1)])
    observed, expected = observed[expected > 0], expected[expected > 0]
    statistic = float(((observed - expected) ** 2 / expected).sum())
    df = max(expected.numel() - 1, 1)
    z = statistics.NormalDist().inv_cdf(1 - ALPHA)
    return statistic < df * (1 - 2 / (9 * df) + z * (2 / (9 * df)) ** 0.5) ** 3


def check_sampler(device: str) -> dict:
    import torch

    from minedraft.workers.sampling import (
        VERIFY_SALT, SamplingParams, batch_params, make_generator, probs_from_logits, sample,
        speculative_accept,
    )

    g = torch.Generator(device=device).manual_seed(0)
    vocab, n = 16, NUM_TRIALS

    def speculate(p, q, num_draft, seed):
        k = q.shape[0]
        drafts = torch.stack([torch.multinomial(q[i], n, replacement=True, generator=g) for i in range(k)], 1)
        uniforms = torch.rand(n, k + 1, generator=make_generator(seed, VERIFY_SALT, device),
                              dtype=torch.float64, device=device)  # [N, k+1]
        accepted, nxt = speculative_accept(drafts, q[None].expand(n, k, -1), p[None].expand(n, k + 1, -1),
                                           num_draft, uniforms)
        return drafts, accepted, nxt

    def emitted(drafts, accepted, nxt, position):
        return nxt if position >= drafts.shape[1] else torch.where(accepted > position, drafts[:, position], nxt)

    checks = {}
    p = torch.softmax(1.5 * torch.randn(2, vocab, generator=g, device=device), -1)  # [2, V]
    q = torch.softmax(1.5 * torch.randn(1, vocab, generator=g, device=device), -1)  # [1, V]
    drafts, accepted, nxt = speculate(p, q, torch.ones(n, dtype=torch.long, device=device), 1)
    checks["k1_first_token_follows_p"] = chi_square_ok(emitted(drafts, accepted, nxt, 0), p[0])
    checks["negative_control_drafts_fail"] = not chi_square_ok(drafts[:, 0], p[0])  # the test has power
    temperature, top_k, top_p = batch_params([SamplingParams(temperature=0.8, top_k=10, top_p=0.9)])
    logits = 2 * torch.randn(2, 4, vocab, generator=g, device=device)  # [2, k+1, V]
    p = probs_from_logits(logits[:1], temperature, top_k, top_p)[0]  # [4, V] truncated: zeros in play
    q = probs_from_logits(logits[1:, :3], temperature, top_k, top_p)[0]  # [3, V]
    num_draft = torch.randint(0, 4, (n,), generator=g, device=device)
    drafts, accepted, nxt = speculate(p, q, num_draft, 2)
    for position in range(4):
        reached = accepted >= position
        tokens = emitted(drafts, accepted, nxt, position)[reached]
        checks[f"k3_position_{position}_follows_p"] = chi_square_ok(tokens, p[position])
    uniforms = torch.rand(n, generator=make_generator(3, VERIFY_SALT, device), dtype=torch.float64, device=device)
    checks["inverse_cdf_sample_follows_p"] = chi_square_ok(sample(p[:1].expand(n, -1), uniforms), p[0])
    return {"num_trials": n, "checks": checks, "ok": all(checks.values())}


def section_a(device: str, quick: bool) -> dict:
    import torch

    torch.set_float32_matmul_precision("highest")  # no TF32: float32 parity means float32
    parity = check_parity(device)
    greedy = check_engine_greedy(device, quick)
    sampler = check_sampler(device)
    is_ok = all(r["ok"] for r in parity.values()) and greedy["ok"] and sampler["ok"]
    return {"status": "ok" if is_ok else "failed", "device": device, "parity": parity,
            "greedy": greedy, "sampler": sampler}


# ------------------------------------------------------------------ report


def summary_lines(report: dict) -> list[str]:
    lines = [f"gpu_check: {report['status']}  ({report['device_info']})"]
    a, b, c = report.get("a"), report.get("b"), report.get("c")
    if a and "parity" in a:
        parity = ", ".join(f"{arch} {r['max_abs_diff']:.1e}" for arch, r in a["parity"].items())
        greedy, checks = a["greedy"], a["sampler"]["checks"]
        lines.append(f"a  {a['status']:<8} parity max|diff| {parity}; greedy sd == ar: {greedy['sd_equals_ar']} "
                     f"({greedy['num_requests']} requests, accept {gpu_throughput.fmt(greedy['sd_acceptance_rate'])}); "
                     f"chi-square {sum(checks.values())}/{len(checks)} passed")
    elif a:
        lines.append(f"a  {a['status']}")
    if b:
        lines.append(gpu_ipc.summary_line(b))
    if c:
        lines.append(f"c  {c['status']}" + (f"  NOTE: {c['note']}" if c.get("note") else ""))
        if c.get("runs"):
            lines += gpu_throughput.table_lines(c)
    if report.get("d"):
        lines.append(gpu_exchange.summary_line(report["d"]))
    return lines


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                        help="cuda: every check on the GPUs there are; cpu: a smoke test of this script")
    parser.add_argument("--quick", action="store_true", help="fewer requests and tokens")
    parser.add_argument("--skip", default="", help="sections to skip, e.g. b,c")
    parser.add_argument("--json", default=None, help="write the report here")
    parser.add_argument("--batches", default=None, help="section c batch sizes (default 8,32; cpu: 4)")
    parser.add_argument("--requests-per-batch", type=int, default=None,
                        help="section c requests = this x batch (default 4; quick 2)")
    parser.add_argument("--max-tokens", type=int, default=None,
                        help="section c output tokens per request (default 64; cpu 16; quick: half)")
    parser.add_argument("--budget-s", type=float, default=330.0, help="section c stops starting runs after this")
    args = parser.parse_args(argv)
    args.skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    if args.skip - {"a", "b", "c", "d"}:
        parser.error(f"--skip takes a, b, c, d; got {sorted(args.skip)}")
    batches = args.batches or ("8,32" if args.device == "cuda" else "4")
    args.batches = [int(b) for b in batches.split(",")]
    args.requests_per_batch = args.requests_per_batch or (2 if args.quick else 4)
    args.max_tokens = args.max_tokens or (64 if args.device == "cuda" else 16) // (2 if args.quick else 1)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    ensure_importable()
    import torch

    started_s = time.monotonic()
    report: dict = {"status": "ok", "argv": sys.argv[1:] if argv is None else argv, "torch": torch.__version__}
    if args.device == "cuda" and not torch.cuda.is_available():
        report.update(status="skipped: no CUDA device", device_info="no CUDA device")
        print("gpu_check: skipped: no CUDA device (torch.cuda.is_available() is False); "
              "run with --device cpu for a smoke test of the script")
    else:
        num_gpus = torch.cuda.device_count() if args.device == "cuda" else 0
        if args.device == "cuda":
            gpus = [torch.cuda.get_device_properties(i) for i in range(num_gpus)]
            report["gpus"] = [{"name": g.name, "memory_gib": g.total_memory / 2**30,
                               "capability": f"{g.major}.{g.minor}"} for g in gpus]
            report["device_info"] = f"{num_gpus} x {gpus[0].name}, torch {torch.__version__}, cuda {torch.version.cuda}"
        else:
            report["device_info"] = f"cpu smoke test, torch {torch.__version__}"
        device = "cuda:0" if args.device == "cuda" else "cpu"
        sections = {"a": lambda: section_a(device, args.quick), "b": lambda: gpu_ipc.section_b(args.device, num_gpus),
                    "c": lambda: gpu_throughput.section_c(args, args.device, num_gpus),
                    "d": lambda: gpu_exchange.section_d(args.device, num_gpus, report.get("c", {}))}
        for name, run in sections.items():
            if name in args.skip:
                report[name] = {"status": "skipped: --skip"}
                continue
            section_start_s = time.monotonic()
            try:
                report[name] = run()
            except Exception as exc:
                report[name] = {"status": f"failed: {type(exc).__name__}: {exc}",
                                "traceback": traceback.format_exc()}
            report[name]["elapsed_s"] = time.monotonic() - section_start_s
            print(f"[{time.monotonic() - started_s:6.1f} s] section {name}: {report[name]['status']}", flush=True)
        if any(report[s]["status"].startswith("failed") for s in sections):
            report["status"] = "failed"
        print("\n".join(summary_lines(report)))
    report["elapsed_s"] = time.monotonic() - started_s
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    return 1 if report["status"] == "failed" else 0


if __name__ == "__main__":
    sys.exit(main())
