"""Build a Decoder from a model spec: a built-in tiny random model, a known model name (prepared
once by registry.py), a local transformers folder (config.json + *.safetensors) or a .gguf file.
Reads local files only; never reaches a hub."""

from __future__ import annotations

import dataclasses
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers
from safetensors.torch import load_file

from minedraft.workers.model.config import SUPPORTED_MODEL_TYPES, ModelConfig, ModelError, unsupported_error
from minedraft.workers.model.llama import Decoder
from minedraft.workers.model.shapes import is_random, random_decoder

TINY_ARCHS = ("tiny-llama", "tiny-qwen2")
DEFAULT_CACHE_DIR = "~/.cache/minedraft"  # where known models are prepared (registry.py's default too)
TINY_BOS_ID = 256  # the byte tokenizer's ids: 0..255 bytes, then bos, eos
TINY_EOS_ID = 257
TINY_INIT_STD = 0.02  # transformers' default initializer_range


@dataclass(frozen=True)
class TinySpec:
    """Sizes of the built-in random models (tests and configs/tiny.toml)."""

    vocab_size: int = 512  # >= 258: bytes, bos, eos
    hidden_size: int = 64  # residual width
    intermediate_size: int = 128  # MLP width
    num_layers: int = 2  # decoder layers
    num_heads: int = 4  # query heads
    num_kv_heads: int = 2  # key/value heads (GQA)
    max_position_embeddings: int = 2048  # longest sequence
    seed: int = 0  # seeds the weight init
    noise: float = 0.0  # std of Gaussian noise added to every weight (draft = target + noise)


def tiny_hf_model(arch: str, spec: TinySpec) -> transformers.PreTrainedModel:
    """A deterministic random transformers model: LlamaForCausalLM for "tiny-llama",
    Qwen2ForCausalLM (q/k/v bias, tied embeddings) for "tiny-qwen2"; float32, eval mode."""
    sizes = dict(
        vocab_size=spec.vocab_size,
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_kv_heads,
        max_position_embeddings=spec.max_position_embeddings,
        initializer_range=TINY_INIT_STD,
        bos_token_id=TINY_BOS_ID,
        eos_token_id=TINY_EOS_ID,
        attn_implementation="eager",
    )
    if arch == "tiny-llama":
        model_cls = transformers.LlamaForCausalLM
        config = transformers.LlamaConfig(tie_word_embeddings=False, **sizes)
    elif arch == "tiny-qwen2":
        model_cls = transformers.Qwen2ForCausalLM
        config = transformers.Qwen2Config(tie_word_embeddings=True, **sizes)
    else:
        raise ModelError(f"unknown built-in model {arch!r}; built-in models: {', '.join(TINY_ARCHS)}")
    with torch.random.fork_rng(devices=[]):  # leave the caller's global RNG untouched
        torch.manual_seed(spec.seed)
        model = model_cls(config).float().eval()
    if spec.noise > 0:
        gen = torch.Generator().manual_seed(spec.seed + 1_000_003)  # its own stream, not the init's
        with torch.no_grad():
            for p in model.parameters():  # tied weights appear once
                p.add_(torch.randn(p.shape, generator=gen) * spec.noise)
    return model


def decoder_from_hf(hf_model, dtype: torch.dtype = torch.float32, device="cpu") -> Decoder:
    """Our Decoder with a copy of an in-memory transformers model's weights."""
    config = ModelConfig.from_hf(hf_model.config)
    state = {k: v.detach() for k, v in hf_model.state_dict().items()}
    return _build(config, state, dtype, device, copy=True)


def load_decoder(
    spec: str, dtype: torch.dtype, device="cpu", tiny: TinySpec = TinySpec(), cache_dir: str = DEFAULT_CACHE_DIR
) -> Decoder:
    """spec: "tiny-llama" / "tiny-qwen2", a random-weight real shape (shapes.RANDOM_MODELS), a
    known model name (prepared under cache_dir on first use; a name wins over a same-named path,
    so write ./NAME for that), a local transformers folder, or a .gguf file."""
    if spec in TINY_ARCHS:
        return decoder_from_hf(tiny_hf_model(spec, tiny), dtype, device)
    if is_random(spec):  # random weights, real shapes (shapes.py); seeded by model.tiny_seed
        return random_decoder(spec, dtype, device, seed=tiny.seed)
    path = _existing_path(resolve_spec(spec, dtype, cache_dir))
    if path.is_dir():
        config = _with_stop_ids(ModelConfig.from_hf(_folder_config(path)), _generation_eos(path) + _known_stop_ids(spec))
        files = sorted(path.glob("*.safetensors"))
        if not files:
            raise ModelError(f"no *.safetensors weights in model folder {path}")
        state = {}
        for f in files:
            state.update(load_file(str(f), device=str(torch.device(device))))
        return _build(config, state, dtype, device, copy=False)
    if path.suffix == ".gguf":
        hf_model = _gguf_model(path, dtype)
        config = ModelConfig.from_hf(hf_model.config)
        return _build(config, hf_model.state_dict(), dtype, device, copy=False)
    raise ModelError(
        f"model spec must be a built-in name ({', '.join(TINY_ARCHS)}), a folder or a .gguf file: {spec}"
    )


def _with_stop_ids(config: ModelConfig, extra: tuple[int, ...]) -> ModelConfig:
    """The config with extra end-of-generation ids added to its EOS ids (order kept, no repeats)."""
    ids = tuple(dict.fromkeys(config.eos_token_ids + tuple(i for i in extra if 0 <= i < config.vocab_size)))
    return dataclasses.replace(config, eos_token_ids=ids)


def _generation_eos(path: Path) -> tuple[int, ...]:
    """EOS ids of a folder's generation_config.json (transformers' generate stops on these too)."""
    try:
        eos = json.loads((path / "generation_config.json").read_text()).get("eos_token_id")
    except (OSError, ValueError, AttributeError):
        return ()
    eos = eos if isinstance(eos, list) else [eos]
    return tuple(i for i in eos if isinstance(i, int) and not isinstance(i, bool))


def _known_stop_ids(spec: str) -> tuple[int, ...]:
    from minedraft.workers.model import registry

    return registry.KNOWN_MODELS[spec].stop_token_ids if registry.is_known(spec) else ()


def resolve_spec(spec: str, dtype: torch.dtype, cache_dir: str = DEFAULT_CACHE_DIR) -> str:
    """A known model name becomes its prepared folder (made on first use); anything else is kept."""
    # Imported here so `python -m minedraft.workers.model.registry` runs a module not yet imported.
    from minedraft.workers.model import registry

    return registry.prepare_model(spec, cache_dir, dtype) if registry.is_known(spec) else spec


def save_tokenizer_json(
    spec: str, out_path: str, dtype: torch.dtype = torch.bfloat16, cache_dir: str = DEFAULT_CACHE_DIR
) -> bool:
    """Write the model's tokenizer.json to out_path; False for tiny-* (byte tokenizer). A known
    name uses its prepared folder (pass the dtype load_decoder used, so nothing is prepared twice)."""
    if spec in TINY_ARCHS or is_random(spec):
        return False
    path = _existing_path(resolve_spec(spec, dtype, cache_dir))
    if path.is_dir() and (path / "tokenizer.json").is_file():
        shutil.copyfile(path / "tokenizer.json", out_path)
        return True
    try:
        if path.is_dir():
            tok = transformers.AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        else:
            tok = transformers.AutoTokenizer.from_pretrained(
                str(path.parent), gguf_file=path.name, local_files_only=True
            )
        tok.backend_tokenizer.save(out_path)
    except Exception as e:
        raise ModelError(f"cannot load a (fast) tokenizer from {path}: {e}") from e
    return True


def _existing_path(spec: str) -> Path:
    path = Path(spec).expanduser()
    if not path.exists():
        built_in = f" (built-in models: {', '.join(TINY_ARCHS)})" if spec.startswith("tiny-") else ""
        raise ModelError(f"model path not found: {spec}{built_in}")
    return path


def _folder_config(path: Path):
    """The folder's transformers config, after checking its model_type ourselves (so an unknown
    type gets our message, not AutoConfig's)."""
    config_file = path / "config.json"
    if not config_file.is_file():
        raise ModelError(f"model folder has no config.json: {path}")
    try:
        model_type = json.loads(config_file.read_text()).get("model_type")
    except (OSError, ValueError) as e:
        raise ModelError(f"cannot read {config_file}: {e}") from e
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise unsupported_error(f"unsupported model type {model_type!r} in {config_file}")
    return transformers.AutoConfig.from_pretrained(str(path), local_files_only=True)


def _gguf_model(path: Path, dtype: torch.dtype):
    """transformers dequantizes the GGUF tensors into its own model (on the CPU, in dtype)."""
    try:
        return transformers.AutoModelForCausalLM.from_pretrained(
            str(path.parent), gguf_file=path.name, local_files_only=True, dtype=dtype
        )
    except Exception as e:
        if "not supported" in str(e):  # transformers' message for an architecture it cannot read
            raise unsupported_error(f"cannot load GGUF {path}: {e}") from e
        raise ModelError(f"cannot load GGUF {path}: {type(e).__name__}: {e}") from e


def _build(config: ModelConfig, state: dict, dtype: torch.dtype, device, copy: bool) -> Decoder:
    """A Decoder holding `state` (HF key names) in dtype on device; copy=False may reuse tensors."""
    state = {k: v for k, v in state.items() if not k.endswith("rotary_emb.inv_freq")}
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    with torch.device("meta"):
        decoder = Decoder(config)
    expected = set(decoder.state_dict())
    if config.tie_word_embeddings:
        expected.discard("lm_head.weight")
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise ModelError(
            f"weights do not fit the {config.arch} config: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    for key in expected:
        owner, name = _owner(decoder, key)
        tensor = state[key].to(device=device, dtype=dtype, copy=copy)
        shape = tuple(getattr(owner, name).shape)
        if tuple(tensor.shape) != shape:
            raise ModelError(f"weight {key} has shape {tuple(tensor.shape)}, the config implies {shape}")
        setattr(owner, name, torch.nn.Parameter(tensor, requires_grad=False))
    if config.tie_word_embeddings:
        decoder.lm_head.weight = decoder.model.embed_tokens.weight
    decoder.inv_freq = decoder.inv_freq.to(device)
    return decoder.eval()


def _owner(module: torch.nn.Module, key: str) -> tuple[torch.nn.Module, str]:
    path, _, name = key.rpartition(".")
    return module.get_submodule(path), name
