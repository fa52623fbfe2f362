"""The linear path of a loaded Decoder: the small-M float32 CPU kernel (csrc/small_gemm.cpp) or
plain F.linear, chosen once at load per weight shape from timings on this machine, and swapped
in as look-alike modules so the forward code never asks which one runs. Owns the kernel's
build (cached on disk) and the choice cache; it must not change a model's results beyond
float32 rounding (the kernel is batch-invariant; see the C++ file)."""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import platform
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger("minedraft.linear")

LINEAR_PATHS = ("auto", "plain", "packed")  # model.linear_path: measured choice | F.linear | kernel everywhere
WEIGHT_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}  # how the linears' weights are stored
KERNEL_SOURCE = Path(__file__).resolve().parent / "csrc" / "small_gemm.cpp"
KERNEL_FLAGS = ["-O3", "-mavx2", "-mfma", "-fopenmp"]  # -fopenmp: at::parallel_for runs on torch's
#   OpenMP pool (libgomp, loaded once by torch); without it ATen's header compiles the loop serially
STALE_LOCK_S = 600.0  # a build lock older than this was left by a process killed mid-build
PANEL_COLS = 16  # output columns per packed panel (NR in the C++ file)
MEASURED_ROWS = (1, 5, 16, 40, 80, 256)  # rows M timed per shape at load; M between uses the next bucket up
MAX_LOGIT_ROWS = 80  # lm_head is timed up to here: it only runs at the positions that need logits
TIMING_REPEATS = 3  # best of this many calls per (shape, M, path)
TIMING_VERSION = 3  # in the choice cache's key: 3 = one process at a time, on as many cores as threads
ONE_COPY_MARGIN = 1.2  # where the kernel is within this of F.linear at every M and thread count, it
#                        serves them all: one copy of the weight (packed) instead of two
PLAIN_MARGIN = 1.1  # otherwise F.linear serves an M only where it is this much faster


@dataclass
class LinearReport:
    """What serves the model's linears: reported at load, in ReadyResult and in `status`."""

    requested: str  # model.linear_path
    kernel: str  # "built in 17.3 s", "cached", or why the kernel is unavailable
    shapes: dict[str, str] = field(default_factory=dict)  # "NxK" (out x in) -> "packed", "plain" or "packed for M 2-80, plain for M 1, 81+"
    fused: list[str] = field(default_factory=list)  # projections merged into one matmul each: "q/k/v", "gate/up"
    choose_s: float = 0.0  # time spent timing candidates at load (0 when the choices came from the cache)
    weights: str = "float32"  # the linears' weights: float32, or bfloat16 (rounded; multiplied in float32)
    machine: str = field(default_factory=lambda: machine_key())  # CPU, ISA, torch, kernel source (machine_key)

    def to_dict(self) -> dict:
        return asdict(self)


# --- the kernel ------------------------------------------------------------------------------

_kernel_state: dict = {}  # {"ops": torch.ops namespace} once loaded, or {"error": str}


def kernel_unavailable_reason(device: torch.device, dtype: torch.dtype) -> str | None:
    """Why the packed kernel cannot serve this model here, or None when it can."""
    if device.type != "cpu":
        return f"device {device} (the kernel is for CPUs)"
    if dtype != torch.float32:
        return f"dtype {dtype} (the kernel is float32)"
    if platform.machine() not in ("x86_64", "AMD64"):
        return f"CPU architecture {platform.machine()} (the kernel needs x86 AVX2 + FMA)"
    capability = torch.backends.cpu.get_cpu_capability()
    if capability not in ("AVX2", "AVX512"):
        return f"CPU capability {capability} (the kernel needs AVX2 + FMA)"
    return None


def kernel_build_dir(cache_dir: str) -> Path:
    """<cache_dir>/kernels/<hash of source, flags and torch version>: a new build per change."""
    digest = hashlib.sha256(KERNEL_SOURCE.read_bytes() + " ".join(KERNEL_FLAGS).encode() + torch.__version__.encode())
    return Path(cache_dir).expanduser() / "kernels" / digest.hexdigest()[:16]


def load_kernel(cache_dir: str):
    """torch.ops.minedraft_kernels, compiled on first use (once per machine and source; tens
    of seconds) into kernel_build_dir. Returns (ops, how) or raises RuntimeError with the reason."""
    if "ops" in _kernel_state:
        return _kernel_state["ops"], "loaded"
    if "error" in _kernel_state:
        raise RuntimeError(_kernel_state["error"])
    from torch.utils import cpp_extension

    build_dir = kernel_build_dir(cache_dir)
    was_built = (build_dir / "minedraft_small_gemm.so").is_file()
    start_s = time.monotonic()
    try:
        if not cpp_extension.is_ninja_available():
            raise RuntimeError("ninja is not installed (pip install ninja)")
        build_dir.mkdir(parents=True, exist_ok=True)
        lock = build_dir / "lock"  # torch's FileBaton: held while one process builds, others wait
        if lock.exists() and time.time() - lock.stat().st_mtime > STALE_LOCK_S:
            log.warning("removing a stale kernel build lock %s", lock)
            lock.unlink(missing_ok=True)
        cpp_extension.load(
            "minedraft_small_gemm", [str(KERNEL_SOURCE)], extra_cflags=KERNEL_FLAGS,
            extra_ldflags=["-fopenmp"], build_directory=str(build_dir), is_python_module=False, verbose=False,
        )
    except Exception as exc:  # a missing compiler, headers or ninja: report and fall back
        _kernel_state["error"] = f"kernel build failed: {type(exc).__name__}: {str(exc).strip()[:500]}"
        raise RuntimeError(_kernel_state["error"]) from exc
    _kernel_state["ops"] = torch.ops.minedraft_kernels
    how = "cached" if was_built else f"built in {time.monotonic() - start_s:.1f} s"
    log.info("small-M linear kernel %s (%s)", how, build_dir)
    return _kernel_state["ops"], how


# --- the look-alike modules --------------------------------------------------------------------


class PackedLinear(nn.Module):
    """nn.Linear's forward on weights packed into [P, K, 16] panels. is_packed[M] says which path
    serves M rows (the last entry serves every larger M), at every thread count, or per thread
    count ({threads: is_packed}; a count not timed takes the nearest timed one). Where any M uses
    F.linear the plain weight is kept too (a second copy, counted in plain_bytes), else dropped."""

    def __init__(self, ops, linear: nn.Linear, is_packed: list[bool] | dict[int, list[bool]],
                 weight_dtype: torch.dtype = torch.float32):
        super().__init__()
        self.ops = ops
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.packed = ops.pack(linear.weight.detach().to(weight_dtype).contiguous())  # [P, K, 16]
        self.bias = None if linear.bias is None else own_memory(linear.bias.detach())  # [N]
        self.by_threads = is_packed if isinstance(is_packed, dict) else {0: is_packed}  # one entry: every count
        is_all_packed = all(all(choice) for choice in self.by_threads.values())
        self.weight = None if is_all_packed else own_memory(linear.weight.detach())  # [N, K], for F.linear

    @property
    def plain_bytes(self) -> int:
        """What the second (plain) copy costs; 0 when the kernel serves every M."""
        return 0 if self.weight is None else self.weight.numel() * self.weight.element_size()

    def choice(self) -> list[bool]:
        if len(self.by_threads) == 1:
            return next(iter(self.by_threads.values()))
        threads = torch.get_num_threads()
        return self.by_threads[min(self.by_threads, key=lambda t: (abs(t - threads), t))]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // self.in_features
        is_packed = self.choice()
        if not is_packed[min(rows, len(is_packed) - 1)]:
            return F.linear(x, self.weight, self.bias)
        y = self.ops.linear(x.reshape(rows, self.in_features).contiguous(), self.packed, self.bias, self.out_features)
        return y.view(*x.shape[:-1], self.out_features)  # [..., N]

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, {describe_choices(self.by_threads)}"


class PackedEmbedding(nn.Module):
    """The tied input embedding read from the lm_head's packed panels (row v is column v % 16
    of panel v // 16), so a tied model keeps one copy of its largest matrix (bfloat16 panels
    widen exactly to float32)."""

    def __init__(self, lm_head: PackedLinear):
        super().__init__()
        self.lm_head = [lm_head]  # a list: not registered twice as a child module

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.lm_head[0].packed[ids // PANEL_COLS, :, ids % PANEL_COLS].to(torch.float32)  # [..., C]


# --- choosing and swapping ---------------------------------------------------------------------


def apply_linear_path(decoder: nn.Module, requested: str, cache_dir: str, weights: str = "float32",
                      placements: dict[int, list[int]] | None = None) -> LinearReport:
    """Swap the decoder's nn.Linear modules for PackedLinear where the kernel serves (requested
    "auto": per shape, where timings on this machine say it is faster; "packed": everywhere;
    "plain": nowhere). Returns what serves which shapes. placements: {threads: cores} the model's
    jobs will run at (auto times each, pinned to those cores; None = as the process is now).

    weights = "bfloat16" (for a draft model: its proposals may differ, the output never does)
    stores every linear's weight rounded to bfloat16, half the bytes a step reads: the kernel
    then serves every shape at every M. Where it cannot (plain path, CUDA, no AVX2), the weights
    are rounded in place and F.linear serves them, so the model is the same on every path."""
    if requested not in LINEAR_PATHS:
        raise ValueError(f"linear_path must be one of {', '.join(LINEAR_PATHS)}, got {requested!r}")
    if weights not in WEIGHT_DTYPES:
        raise ValueError(f"weights must be one of {', '.join(WEIGHT_DTYPES)}, got {weights!r}")
    if requested == "plain":
        _round_weights(decoder, weights)
        return LinearReport(requested, "not used (model.linear_path = plain)", {s: "plain" for s in _shapes(decoder)},
                            weights=weights)
    reason = kernel_unavailable_reason(decoder.device, decoder.model.norm.weight.dtype)
    if reason is None:
        try:
            ops, how = load_kernel(cache_dir)
        except RuntimeError as exc:
            reason = str(exc)
    if reason is not None:
        if requested == "packed":
            raise RuntimeError(f"model.linear_path = packed, but the kernel cannot serve: {reason}")
        log.warning("linear path: plain F.linear for every shape: %s", reason)
        _round_weights(decoder, weights)
        return LinearReport(requested, f"unavailable: {reason}", {s: "plain" for s in _shapes(decoder)},
                            weights=weights)
    report = LinearReport(requested, how, fused=fuse_projections(decoder), weights=weights)
    start_s = time.monotonic()
    if requested == "packed" or weights != "float32":  # F.linear would need a float32 copy of the weights
        choices = {s: {0: [True]} for s in _shapes(decoder)}
    else:
        choices = _choose(ops, decoder, cache_dir, placements or {torch.get_num_threads(): sorted(os.sched_getaffinity(0))})
    report.choose_s = round(time.monotonic() - start_s, 2)
    _swap(ops, decoder, choices, WEIGHT_DTYPES[weights])
    release_file_views(decoder)
    report.shapes = {s: describe_choices(by_threads) for s, by_threads in choices.items()}
    log.info("linear path (%s weights): %s", weights, report.shapes)
    return report


def own_memory(tensor: torch.Tensor) -> torch.Tensor:
    """A copy in memory of its own: the loaded tensor may live in the mapped weights file
    (safetensors maps it), and one tensor left there keeps the whole mapping resident."""
    return tensor.clone() if tensor.device.type == "cpu" else tensor


def release_file_views(decoder: nn.Module) -> None:
    """Copy each parameter and buffer still in the model (norms, biases, untied embeddings) into
    memory of its own, so that once the packed panels have replaced the linears nothing refers
    to the mapped weights file and it is unmapped: the model then holds one copy of each weight."""
    for module in decoder.modules():
        for name, param in list(module.named_parameters(recurse=False)):
            setattr(module, name, nn.Parameter(own_memory(param.detach()), requires_grad=False))
        for name, buffer in list(module.named_buffers(recurse=False)):
            setattr(module, name, own_memory(buffer))


def _round_weights(decoder: nn.Module, weights: str) -> None:
    """Round every linear's weight (a tied embedding with it) to `weights` in place, keeping its dtype."""
    if weights == "float32":
        return
    dtype = WEIGHT_DTYPES[weights]
    for module in decoder.modules():
        if isinstance(module, nn.Linear) and module.weight.dtype != dtype:
            with torch.no_grad():
                module.weight.copy_(module.weight.to(dtype))


def fuse_projections(decoder: nn.Module) -> list[str]:
    """Merge each layer's q/k/v and gate/up projections into one nn.Linear each (rows stacked in
    that order), one layer at a time so the copies never double the model's memory. With the
    kernel each output column is its own FMA chain, so the merged matmul gives the same bits as
    the separate ones; the merge saves three calls (and weight-stream start-ups) per layer."""
    fused = []
    for layer in decoder.model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        if attn.qkv_proj is None:
            attn.qkv_proj = _stacked(attn.q_proj, attn.k_proj, attn.v_proj)
            del attn.q_proj, attn.k_proj, attn.v_proj
            fused.append("q/k/v")
        if mlp.gate_up_proj is None:
            mlp.gate_up_proj = _stacked(mlp.gate_proj, mlp.up_proj)
            del mlp.gate_proj, mlp.up_proj
            fused.append("gate/up")
    return sorted(set(fused))


def _stacked(*linears: nn.Linear) -> nn.Linear:
    """One nn.Linear whose output is the given linears' outputs concatenated."""
    weight = torch.cat([m.weight.detach() for m in linears])  # [sum N, K]
    has_bias = linears[0].bias is not None
    with torch.device("meta"):
        merged = nn.Linear(weight.shape[1], weight.shape[0], bias=has_bias)
    merged.weight = nn.Parameter(weight, requires_grad=False)
    if has_bias:
        merged.bias = nn.Parameter(torch.cat([m.bias.detach() for m in linears]), requires_grad=False)
    return merged


def _shape_key(linear: nn.Linear) -> str:
    return f"{linear.out_features}x{linear.in_features}"


def _shapes(decoder: nn.Module) -> list[str]:
    return sorted({_shape_key(m) for m in decoder.modules() if isinstance(m, nn.Linear)})


def describe_choice(is_packed: list[bool]) -> str:
    """[False, True, True] -> "packed for M 1; plain for M 2+" style summaries."""
    if all(is_packed):
        return "packed"
    if not any(is_packed):
        return "plain"
    runs, start = [], 1 if len(is_packed) > 1 else 0
    for m in range(start + 1, len(is_packed) + 1):
        if m == len(is_packed) or is_packed[m] != is_packed[start]:
            last = "+" if m == len(is_packed) else f"-{m - 1}" if m - 1 > start else ""
            runs.append((is_packed[start], f"{start}{last}"))
            start = m
    parts = [f"{'packed' if path else 'plain'} for M {', '.join(r for p, r in runs if p == path)}" for path in (True, False)]
    return "; ".join(parts)


def describe_choices(by_threads: dict[int, list[bool]]) -> str:
    """One summary, or one per timed thread count where they differ: "1 thread: packed; 2 threads: ..."."""
    summaries = {t: describe_choice(is_packed) for t, is_packed in sorted(by_threads.items())}
    if len(set(summaries.values())) == 1:
        return next(iter(summaries.values()))
    return "; ".join(f"{t} thread{'s' if t > 1 else ''}: {text}" for t, text in summaries.items())


def _swap(ops, decoder: nn.Module, choices: dict[str, dict[int, list[bool]]], weight_dtype: torch.dtype) -> None:
    """Replace each nn.Linear that the kernel serves at some M and thread count by a PackedLinear."""
    lm_head = decoder.lm_head
    is_tied = lm_head.weight is decoder.model.embed_tokens.weight
    for name, module in list(decoder.named_modules()):
        by_threads = choices[_shape_key(module)] if isinstance(module, nn.Linear) else {}
        if not any(any(choice) for choice in by_threads.values()):
            continue
        owner_name, _, child = name.rpartition(".")
        owner = decoder.get_submodule(owner_name) if owner_name else decoder
        packed = PackedLinear(ops, module, by_threads, weight_dtype)
        setattr(owner, child, packed)
        if module is lm_head and is_tied:
            decoder.model.embed_tokens = PackedEmbedding(packed)


def pin_threads(cores: list[int]) -> None:
    """Move this process and every thread it has (torch's pool threads keep the mask they were
    created with) onto `cores`."""
    for tid in os.listdir("/proc/self/task"):
        try:
            os.sched_setaffinity(int(tid), cores)
        except ProcessLookupError:  # a thread that just ended
            pass


def _choose(ops, decoder: nn.Module, cache_dir: str, placements: dict[int, list[int]]) -> dict[str, dict[int, list[bool]]]:
    """Per shape, {threads: is_packed[M]} for M = 0..max(MEASURED_ROWS), from timings of both
    paths at each thread count, pinned to its cores (choices_from_timings). The timings are
    cached per machine, thread count, torch and kernel source."""
    cache_path = Path(cache_dir).expanduser() / "kernels" / "choices.json"
    cache_path.parent.mkdir(parents=True, exist_ok=True)
    linears = {_shape_key(m): m for m in decoder.modules() if isinstance(m, nn.Linear)}
    lm_key = _shape_key(decoder.lm_head)
    timings: dict[str, dict[int, dict]] = {key: {} for key in linears}
    threads_before, cores_before = torch.get_num_threads(), sorted(os.sched_getaffinity(0))
    # Each count is timed on as many cores as threads (a worker pinned to its one core timed its
    # 2-thread kernel 2-44x slow at M = 1: a thread waits for the other to be scheduled), and one
    # process at a time: the drafter and the verifier start together on the same cores.
    with open(cache_path.parent / "timing.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            for threads, cores in sorted(placements.items()):
                pin_threads(cores)
                torch.set_num_threads(threads)
                machine = _machine_key()
                cached = _read_json(cache_path).get(machine, {})
                for key, linear in sorted(linears.items()):
                    if key not in cached:
                        rows = [m for m in MEASURED_ROWS if key != lm_key or m <= MAX_LOGIT_ROWS]
                        cached[key] = _time_candidates(ops, linear.weight.detach(), linear.bias, rows)
                    timings[key][threads] = cached[key]
                _merge_json(cache_path, machine, cached)
        finally:
            pin_threads(cores_before)
            torch.set_num_threads(threads_before)
    return {key: choices_from_timings(by_threads) for key, by_threads in timings.items()}


def choices_from_timings(by_threads: dict[int, dict]) -> dict[int, list[bool]]:
    """{threads: timing} -> {threads: is_packed}. Where the kernel is within ONE_COPY_MARGIN of
    F.linear at every timed M and thread count it serves them all ({0: [True]}: one copy of the
    weight); otherwise each thread count takes its own per-M choice (choice_from_timings)."""
    if all(packed_s <= ONE_COPY_MARGIN * plain_s for timing in by_threads.values()
           for packed_s, plain_s in zip(timing["packed_s"], timing["plain_s"])):
        return {0: [True]}
    return {threads: choice_from_timings(timing) for threads, timing in by_threads.items()}


def _time_candidates(ops, weight: torch.Tensor, bias, rows: list[int]) -> dict[str, list[float]]:
    """{"rows": [...], "packed_s": [...], "plain_s": [...]}: best-of-N time of one call each."""
    packed = ops.pack(weight.contiguous())
    bias = None if bias is None else bias.detach().contiguous()
    out = {"rows": rows, "packed_s": [], "plain_s": []}
    with torch.inference_mode():
        for m in rows:
            x = torch.randn(m, weight.shape[1])
            out["packed_s"].append(best_time_s(lambda: ops.linear(x, packed, bias, weight.shape[0])))
            out["plain_s"].append(best_time_s(lambda: F.linear(x, weight, bias)))
    return out


def choice_from_timings(timing: dict) -> list[bool]:
    """is_packed[M] for M = 0..max(rows): each M takes the choice of the next measured M up."""
    is_packed, previous = [], 0
    for m, packed_s, plain_s in zip(timing["rows"], timing["packed_s"], timing["plain_s"]):
        is_packed += [packed_s <= PLAIN_MARGIN * plain_s] * (m - previous + (previous == 0))
        previous = m
    return is_packed


def best_time_s(fn, repeats: int = TIMING_REPEATS) -> float:
    fn()  # warm: caches, page faults, lazy init
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def _machine_key() -> str:
    """What the timings depend on: CPU model, ISA, threads, torch, kernel source and flags."""
    model = next((line.split(":", 1)[1].strip() for line in _cpuinfo_lines() if line.startswith("model name")), "?")
    source = hashlib.sha256(KERNEL_SOURCE.read_bytes() + " ".join(KERNEL_FLAGS).encode()).hexdigest()[:12]
    return (f"{model}|{torch.backends.cpu.get_cpu_capability()}|threads={torch.get_num_threads()}"
            f"|torch={torch.__version__}|kernel={source}|timing={TIMING_VERSION}")


def machine_key() -> str:
    """What a model's speed here depends on beyond its own shape and threads: CPU model, ISA,
    torch, kernel source and flags (auto's calibration cache keys on it: runtime/calibration.py)."""
    return "|".join(part for part in _machine_key().split("|") if not part.startswith("threads="))


def _cpuinfo_lines() -> list[str]:
    try:
        return Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return []


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _merge_json(path: Path, machine: str, choices: dict) -> None:
    """Add this machine's choices; written atomically, since both workers may write at once."""
    data = _read_json(path)
    data[machine] = {**data.get(machine, {}), **choices}
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".choices-")
    with os.fdopen(fd, "w") as file:
        json.dump(data, file, indent=1, sort_keys=True)
    os.replace(tmp, path)
