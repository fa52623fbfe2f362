"""ModelConfig: the few numbers our decoder needs, read from a transformers config, and the
model errors. Owns the list of supported architectures; loads no weights."""

from __future__ import annotations

from dataclasses import dataclass

# HF model_type -> our decoder flavour (Qwen2 differs from Llama only by q/k/v bias).
SUPPORTED_MODEL_TYPES = {"llama": "llama", "mistral": "llama", "smollm": "llama", "qwen2": "qwen2"}


class ModelError(Exception):
    """A model cannot be loaded or used; the message names the problem."""


class UnsupportedModelError(ModelError):
    """The architecture (or one of its options) is not one our decoder implements."""


class VocabMismatchError(ModelError):
    """Draft and target do not share a vocabulary."""


def unsupported_error(what: str) -> UnsupportedModelError:
    supported = ", ".join(sorted(SUPPORTED_MODEL_TYPES))
    return UnsupportedModelError(
        f"{what}; supported architectures: {supported} (Llama-style decoders, "
        "SiLU MLP, default RoPE)"
    )


@dataclass(frozen=True)
class ModelConfig:
    arch: str  # "llama" | "qwen2"
    vocab_size: int  # rows of the embedding / lm_head
    hidden_size: int  # residual stream width
    intermediate_size: int  # MLP width
    num_layers: int  # decoder layers
    num_heads: int  # query heads
    num_kv_heads: int  # key/value heads (GQA when < num_heads)
    head_dim: int  # per-head width
    rms_norm_eps: float  # RMSNorm epsilon
    rope_theta: float  # RoPE base
    attention_bias: bool  # q/k/v bias (Qwen2 True; Llama's flag also biases o_proj)
    tie_word_embeddings: bool  # lm_head shares the embedding matrix
    max_position_embeddings: int  # longest sequence we run exactly (capped by a sliding window)
    eos_token_ids: tuple[int, ...]  # end-of-sequence ids from the config

    @classmethod
    def from_hf(cls, hf_config) -> "ModelConfig":
        """Read a transformers config; raise UnsupportedModelError for anything we cannot run
        exactly (other model types, rope scaling, non-SiLU MLP, MLP bias)."""
        model_type = getattr(hf_config, "model_type", None)
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise unsupported_error(f"unsupported model type {model_type!r}")
        rope = dict(getattr(hf_config, "rope_parameters", None) or {})
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type != "default":
            raise unsupported_error(f"unsupported rope scaling {rope_type!r} in {model_type} model")
        if getattr(hf_config, "hidden_act", "silu") != "silu":
            raise unsupported_error(f"unsupported activation {hf_config.hidden_act!r}")
        if getattr(hf_config, "mlp_bias", False):
            raise unsupported_error("unsupported option mlp_bias=True")
        rope_theta = rope.get("rope_theta") or getattr(hf_config, "rope_theta", None) or 10000.0
        num_heads = hf_config.num_attention_heads
        head_dim = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // num_heads
        max_pos = hf_config.max_position_embeddings
        # A sliding window (Mistral v0.1, Qwen2 with use_sliding_window) only matters past its
        # width; we run full attention, which is exact up to the window.
        window = getattr(hf_config, "sliding_window", None)
        if window:
            max_pos = min(max_pos, window)
        eos = getattr(hf_config, "eos_token_id", None)
        eos_ids = () if eos is None else tuple(eos) if isinstance(eos, (list, tuple)) else (eos,)
        arch = SUPPORTED_MODEL_TYPES[model_type]
        return cls(
            arch=arch,
            vocab_size=hf_config.vocab_size,
            hidden_size=hf_config.hidden_size,
            intermediate_size=hf_config.intermediate_size,
            num_layers=hf_config.num_hidden_layers,
            num_heads=num_heads,
            num_kv_heads=getattr(hf_config, "num_key_value_heads", None) or num_heads,
            head_dim=head_dim,
            rms_norm_eps=float(hf_config.rms_norm_eps),
            rope_theta=float(rope_theta),
            attention_bias=arch == "qwen2" or bool(getattr(hf_config, "attention_bias", False)),
            tie_word_embeddings=bool(getattr(hf_config, "tie_word_embeddings", False)),
            max_position_embeddings=max_pos,
            eos_token_ids=tuple(int(i) for i in eos_ids),
        )


def check_same_vocab(draft: ModelConfig, target: ModelConfig) -> None:
    """Draft and target must index the same vocabulary (same embedding rows)."""
    if draft.vocab_size != target.vocab_size:
        raise VocabMismatchError(
            f"draft and target vocabularies differ: draft vocab_size={draft.vocab_size}, "
            f"target vocab_size={target.vocab_size}; speculative decoding needs a shared tokenizer"
        )
