"""The runtime against the peer a user would otherwise pick: transformers `generate` (target
alone) and assisted generation (`assistant_model=` draft) at batch 1, greedy, on the same prompt
ids, vs the runtime at concurrency 1 (a fresh daemon per mode, started through the CLI).

    python tools/bench_hf.py --config tiny --num-prompts 8 --max-tokens 64
    python tools/bench_hf.py --config default --num-prompts 4 --max-tokens 128 --modes sd,psd
    python tools/bench_hf.py --config tiny --endpoint ipc:///tmp/md/client.sock   # a running daemon
    python tools/bench_hf.py --config default --batch 16 --num-prompts 32 --max-tokens 48 --modes default

--batch B is the offline-batch baseline: transformers `generate` on left-padded batches of B
prompts using every core (torch's threads = the cores this process may use, unpinned), against
the runtime at concurrency B. Assisted generation is skipped there (transformers runs it at
batch 1 only). Mode `default` runs the config as it is (its own scheduler.mode).

Fairness: every side decodes exactly --max-tokens tokens per prompt (EOS ignored, unless
--stop-at-eos) with one torch thread per model: transformers runs both its models in this
process on one thread pinned to the verifier's cores; the runtime's drafter and verifier run one
thread each on their configured cores. Assisted generation drafts a constant
scheduler.num_draft tokens per step, like the runtime. Models: tiny-* are rebuilt from the
config's tiny_* values; known model names are prepared by minedraft.workers.model.registry;
local folders / .gguf files are loaded as they are.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench import running_daemon  # noqa: E402
from loadtest import DEFAULT_PROMPTS, load_prompts, run_loadtest  # noqa: E402

from minedraft.common.config import ConfigError, load_config  # noqa: E402

THREADS_NOTE = ("threads: transformers 1 torch thread for both models (one process, pinned to the verifier's "
                "cores); runtime 1 thread per worker (drafter and verifier on their configured cores)")


def _torch_dtype(name: str):
    import torch

    return {"float32": torch.float32, "bfloat16": torch.bfloat16}[name]


def _model_path(spec: str, config) -> Path:
    """A local folder or .gguf for spec: as given, or prepared from a known model name."""
    if os.path.exists(os.path.expanduser(spec)):
        return Path(spec).expanduser()
    try:
        from minedraft.workers.model import registry
    except ImportError:
        registry = None
    if registry is not None and registry.is_known(spec):
        return Path(registry.prepare_model(spec, cache_dir=config.model.cache_dir,
                                           dtype=_torch_dtype(config.model.dtype)))
    raise SystemExit(f"error: model {spec!r} is neither a built-in tiny model, a local path nor a known name")


def load_hf_model(spec: str, config, is_draft: bool, device: str):
    """The transformers model the runtime would build for spec, in the config's dtype, eval mode."""
    import transformers

    from minedraft.workers.model.loader import TINY_ARCHS, TinySpec, tiny_hf_model

    dtype = _torch_dtype(config.model.dtype)
    m = config.model
    if spec in TINY_ARCHS:
        tiny = TinySpec(vocab_size=m.tiny_vocab_size, hidden_size=m.tiny_hidden_size,
                        intermediate_size=m.tiny_intermediate_size, num_layers=m.tiny_num_layers,
                        num_heads=m.tiny_num_heads, num_kv_heads=m.tiny_num_kv_heads, seed=m.tiny_seed,
                        noise=m.tiny_draft_noise if is_draft else 0.0)
        return tiny_hf_model(spec, tiny).to(device=device, dtype=dtype).eval()
    path = _model_path(spec, config)
    if path.suffix == ".gguf":
        model = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=dtype)
    else:
        model = transformers.AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype, local_files_only=True)
    return model.to(device).eval()


def tokenize(prompts: list[dict], config) -> list[list[int]]:
    """Prompt ids as the runtime's scheduler makes them (no special tokens added)."""
    from minedraft.workers.model.loader import TINY_ARCHS

    texts = [p.get("prompt") for p in prompts]
    if config.model.target in TINY_ARCHS:
        from minedraft.runtime.tokenizer import ByteTokenizer

        encode = ByteTokenizer().encode
    else:
        path = _model_path(config.model.target, config)
        if (path / "tokenizer.json").is_file():
            from minedraft.runtime.tokenizer import FileTokenizer

            encode = FileTokenizer(str(path / "tokenizer.json")).encode
        else:
            import transformers

            tok = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
            encode = lambda text: tok.encode(text, add_special_tokens=False)  # noqa: E731
    return [p["prompt_ids"] if "prompt_ids" in p else encode(text) for p, text in zip(prompts, texts)]


def run_hf(target, draft, prompt_ids: list[list[int]], max_tokens: int, num_draft: int, stop_at_eos: bool) -> dict:
    """Greedy generate per prompt at batch 1; draft=None is plain generate, else assisted."""
    import torch

    eos = target.generation_config.eos_token_id if stop_at_eos else None
    kwargs = dict(do_sample=False, max_new_tokens=max_tokens, eos_token_id=eos,
                  pad_token_id=target.config.eos_token_id if stop_at_eos else 0)
    if draft is not None:
        kwargs.update(assistant_model=draft, num_assistant_tokens=num_draft,
                      num_assistant_tokens_schedule="constant")
    device = target.device

    def generate(ids, n):
        inputs = torch.tensor([ids], device=device)  # [1, L] int64
        with torch.inference_mode():
            out = target.generate(inputs, attention_mask=torch.ones_like(inputs), **{**kwargs, "max_new_tokens": n})
        return out[0, inputs.shape[1]:].tolist()

    generate(prompt_ids[0], min(8, max_tokens))  # warm-up
    outputs, wall_s = [], 0.0
    for ids in prompt_ids:
        start = time.perf_counter()
        outputs.append(generate(ids, max_tokens))
        wall_s += time.perf_counter() - start
    num_tokens = sum(len(o) for o in outputs)
    return {"tokens_per_s": num_tokens / wall_s, "num_tokens": num_tokens, "wall_s": wall_s, "outputs": outputs}


def run_hf_batched(target, prompt_ids: list[list[int]], max_tokens: int, batch: int, stop_at_eos: bool) -> dict:
    """Greedy generate on left-padded batches of `batch` prompts (the offline-batch baseline)."""
    import torch

    eos = target.generation_config.eos_token_id if stop_at_eos else None
    pad = target.config.eos_token_id if isinstance(target.config.eos_token_id, int) else 0

    def generate(chunk: list[list[int]], n: int) -> list[list[int]]:
        width = max(len(ids) for ids in chunk)
        inputs = torch.tensor([[pad] * (width - len(ids)) + ids for ids in chunk])  # [b, W] left-padded
        mask = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in chunk])  # [b, W]
        with torch.inference_mode():
            out = target.generate(inputs, attention_mask=mask, do_sample=False, max_new_tokens=n,
                                  eos_token_id=eos, pad_token_id=pad)
        return [row[width:].tolist() for row in out]

    generate(prompt_ids[:batch], min(8, max_tokens))  # warm-up
    outputs, wall_s = [], 0.0
    for first in range(0, len(prompt_ids), batch):
        start = time.perf_counter()
        outputs += generate(prompt_ids[first: first + batch], max_tokens)
        wall_s += time.perf_counter() - start
    if stop_at_eos:  # a finished row is padded to the batch's longest: cut at its first EOS
        stops = set(eos) if isinstance(eos, list) else {eos}
        outputs = [o[: next((i + 1 for i, t in enumerate(o) if t in stops), len(o))] for o in outputs]
    num_tokens = sum(len(o) for o in outputs)
    return {"tokens_per_s": num_tokens / wall_s, "num_tokens": num_tokens, "wall_s": wall_s, "batch": batch,
            "threads": torch.get_num_threads(), "outputs": outputs}


def run_runtime(endpoint: str, prompt_ids: list[list[int]], max_tokens: int, stop_at_eos: bool,
                concurrency: int = 1) -> dict:
    """Requests at `concurrency` against a serving runtime, after one warm-up request."""
    prompts = [{"prompt_ids": ids} for ids in prompt_ids]
    run_loadtest(endpoint, prompts[:1], requests=1, concurrency=1, max_tokens=min(8, max_tokens),
                 show_progress=False)
    result = run_loadtest(endpoint, prompts, concurrency=concurrency, max_tokens=max_tokens, temperature=0.0,
                          ignore_eos=not stop_at_eos, show_progress=False)
    outputs = [result["output_token_ids"].get(str(i)) for i in range(len(prompt_ids))]
    return {"mode": result["mode"], "tokens_per_s": result["output_throughput"], "num_tokens": result["num_output_tokens"],
            "wall_s": result["wall_s"], "num_failed": result["num_failed"],
            "acceptance_rate": result["acceptance_rate"], "mean_accepted_length": result["mean_accepted_length"],
            "tpot_ms_p50": result["tpot_ms"]["p50"], "outputs": outputs}


def format_table(results: dict, num_prompts: int) -> str:
    base_name = next(iter(results))  # hf_generate, or hf_generate_batchB
    base = results[base_name]
    header = ["method", "tok/s", f"vs {base_name}", "tokens", f"greedy = {base_name}"]
    rows = []
    for name, r in results.items():
        same = sum(a == b for a, b in zip(r["outputs"], base["outputs"]))
        rows.append([name, f"{r['tokens_per_s']:.1f}", f"{r['tokens_per_s'] / base['tokens_per_s']:.2f}x",
                     str(r["num_tokens"]), f"{same}/{num_prompts}"])
    widths = [max(len(row[i]) for row in [header] + rows) for i in range(len(header))]
    line = lambda cells: "  ".join(c.ljust(w) if i == 0 else c.rjust(w)  # noqa: E731
                                   for i, (c, w) in enumerate(zip(cells, widths)))
    return "\n".join([line(header), line(["-" * w for w in widths]), *map(line, rows)])


VARIANTS = {  # mode label suffix -> config overrides
    "": [],
    "noprefill": ["scheduler.prefill_ahead=false"],  # the verifier prefills a prompt only in its first verify
    "bf16draft": ["model.draft_weights=bfloat16"],  # the draft's linear weights rounded to bfloat16
    "f32draft": ["model.draft_weights=float32"],  # ... or kept in float32, whatever the config says
}


def mode_overrides(label: str) -> list[str]:
    """"sd" / "psd" / "ar" / "auto" (the config as it is, in that mode), "default" (the config's own
    mode), or with a variant: "sd-noprefill" (without prefill ahead), "sd-bf16draft" /
    "sd-f32draft" (the draft's weights in bfloat16 / float32)."""
    mode, _, variant = label.partition("-")
    if mode not in ("ar", "sd", "psd", "auto", "default") or variant not in VARIANTS:
        raise SystemExit(f"unknown mode {label!r}: expected ar, sd, psd, auto or default, optionally with "
                         "-noprefill, -bf16draft or -f32draft")
    return ([] if mode == "default" else [f"scheduler.mode={mode}"]) + VARIANTS[variant]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="transformers generate / assisted generation vs the runtime at batch 1.")
    parser.add_argument("--config", default="tiny", help="config name or path (default tiny)")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="config override")
    parser.add_argument("--modes", default="sd,psd", help="runtime modes to run at concurrency 1 (ar, sd, psd; "
                        "-noprefill: without scheduler.prefill_ahead; -bf16draft / -f32draft: model.draft_weights = "
                        "bfloat16 / float32)")
    parser.add_argument("--endpoint", help="measure this running runtime instead of starting one per mode "
                        "(it should serve the same models as --config)")
    parser.add_argument("--prompts", default=DEFAULT_PROMPTS)
    parser.add_argument("--num-prompts", type=int, default=8, help="first N prompts of the file")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--stop-at-eos", action="store_true", help="stop at EOS instead of always decoding max tokens")
    parser.add_argument("--batch", type=int, default=1, help="B > 1: transformers generate on left-padded batches "
                        "of B on every core, against the runtime at concurrency B (no assisted generation)")
    parser.add_argument("--out", default="out/bench_hf", help="folder for bench_hf.json")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        config = load_config(args.config, args.set)
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 2
    import torch
    import transformers

    transformers.logging.set_verbosity_error()
    prompts = load_prompts(args.prompts)[: args.num_prompts]
    prompt_ids = tokenize(prompts, config)
    device = config.verifier.device
    affinity = os.sched_getaffinity(0)
    threads_note = THREADS_NOTE if args.batch == 1 else (
        f"threads: transformers {len(affinity)} torch threads (every core, unpinned), batches of {args.batch}; "
        f"runtime at concurrency {args.batch}, its workers as configured")
    torch.set_num_threads(1 if args.batch == 1 else len(affinity))
    if device == "cpu" and config.verifier.cpu_cores and args.batch == 1:
        os.sched_setaffinity(0, config.verifier.cpu_cores)
    print(threads_note, file=sys.stderr)
    results = {}
    try:
        target = load_hf_model(config.model.target, config, is_draft=False, device=device)
        if args.batch > 1:
            name = f"hf_generate_batch{args.batch}"
            print(f"{name}: {len(prompt_ids)} prompts x {args.max_tokens} tokens", file=sys.stderr, flush=True)
            results[name] = run_hf_batched(target, prompt_ids, args.max_tokens, args.batch, args.stop_at_eos)
        else:
            draft = load_hf_model(config.model.draft, config, is_draft=True, device=device)
            for name, assistant in (("hf_generate", None), ("hf_assisted", draft)):
                print(f"{name}: {len(prompt_ids)} prompts x {args.max_tokens} tokens", file=sys.stderr, flush=True)
                results[name] = run_hf(target, assistant, prompt_ids, args.max_tokens, config.scheduler.num_draft,
                                       args.stop_at_eos)
            del draft
        del target
    finally:
        os.sched_setaffinity(0, affinity)  # the daemons started next must not inherit the pinning
    if args.endpoint:
        result = run_runtime(args.endpoint, prompt_ids, args.max_tokens, args.stop_at_eos, args.batch)
        results[f"runtime_{result['mode']}"] = result
    for label in [] if args.endpoint else [m.strip() for m in args.modes.split(",") if m.strip()]:
        print(f"runtime_{label}: starting a daemon", file=sys.stderr, flush=True)
        with running_daemon(args.config, args.set + mode_overrides(label)) as endpoint:
            results[f"runtime_{label}"] = run_runtime(endpoint, prompt_ids, args.max_tokens, args.stop_at_eos,
                                                      args.batch)

    print(format_table(results, len(prompt_ids)))
    print(threads_note)
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "bench_hf.json")
    report = {"config": args.config, "overrides": args.set, "dtype": config.model.dtype,
              "target": config.model.target, "draft": config.model.draft, "num_draft": config.scheduler.num_draft,
              "num_prompts": len(prompt_ids), "max_tokens": args.max_tokens, "stop_at_eos": args.stop_at_eos,
              "batch": args.batch, "threads": threads_note, "results": results}
    with open(path, "w") as f:
        json.dump(report, f, indent=1)
    print(f"wrote {path}")
    return 0 if all(r.get("num_failed", 0) == 0 for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
