"""Random-weight decoders with the real Qwen2.5-Coder shapes, for GPU timing where real weights
cannot be carried. Built straight from a ModelConfig (no transformers model is instantiated), on
the target device, in seconds. The weights are noise: outputs are meaningless and a random draft
accepts almost nothing, so these models time the runtime; they never test its quality."""

from __future__ import annotations

import torch
from torch import nn

from minedraft.workers.model.config import ModelConfig, ModelError
from minedraft.workers.model.llama import Decoder

INIT_STD = 0.02  # Qwen2's initializer_range: weights ~ N(0, 0.02), biases 0, norms 1

# The numbers of the released config.json files (Qwen/Qwen2.5-Coder-{1.5B,0.5B}[-Instruct]), read
# the way ModelConfig.from_hf reads a transformers Qwen2Config (tests/test_gpu.py checks that).
# Parameter counts: 1,543,714,304 and 494,032,768, the published 1.54B and 0.49B.
QWEN_VOCAB_SIZE = 151936
QWEN_EOS_IDS = (151645, 151643)  # <|im_end|>, <|endoftext|> (the instruct generation config)
RANDOM_MODELS: dict[str, ModelConfig] = {
    "random-qwen2.5-coder-1.5b": ModelConfig(  # target
        arch="qwen2", vocab_size=QWEN_VOCAB_SIZE, hidden_size=1536, intermediate_size=8960, num_layers=28,
        num_heads=12, num_kv_heads=2, head_dim=128, rms_norm_eps=1e-6, rope_theta=1e6, attention_bias=True,
        tie_word_embeddings=True, max_position_embeddings=32768, eos_token_ids=QWEN_EOS_IDS,
    ),
    "random-qwen2.5-coder-0.5b": ModelConfig(  # draft
        arch="qwen2", vocab_size=QWEN_VOCAB_SIZE, hidden_size=896, intermediate_size=4864, num_layers=24,
        num_heads=14, num_kv_heads=2, head_dim=64, rms_norm_eps=1e-6, rope_theta=1e6, attention_bias=True,
        tie_word_embeddings=True, max_position_embeddings=32768, eos_token_ids=QWEN_EOS_IDS,
    ),
}


def is_random(spec: str) -> bool:
    return spec in RANDOM_MODELS


def random_decoder(spec: str | ModelConfig, dtype: torch.dtype, device="cpu", seed: int = 0) -> Decoder:
    """A Decoder for a RANDOM_MODELS name (or any ModelConfig) with seeded random weights made
    directly in dtype on device. The same seed gives the same weights on the same device type
    (CPU and CUDA generators are different streams)."""
    if isinstance(spec, ModelConfig):
        config = spec
    elif spec in RANDOM_MODELS:
        config = RANDOM_MODELS[spec]
    else:
        raise ModelError(f"unknown random model {spec!r}; random models: {', '.join(RANDOM_MODELS)}")
    device = torch.device(device)
    with torch.device("meta"):
        decoder = Decoder(config)  # shapes only, no memory
    generator = None if device.type == "meta" else torch.Generator(device=device).manual_seed(seed)  # meta: shapes only
    for key, param in decoder.named_parameters():  # a tied lm_head appears once, as the embedding
        tensor = torch.empty(param.shape, dtype=dtype, device=device)
        if key.endswith("norm.weight"):
            tensor.fill_(1.0)
        elif key.endswith(".bias"):
            tensor.zero_()
        else:
            tensor.normal_(0.0, INIT_STD, generator=generator)
        path, _, name = key.rpartition(".")
        setattr(decoder.get_submodule(path), name, nn.Parameter(tensor, requires_grad=False))
    if config.tie_word_embeddings:
        decoder.lm_head.weight = decoder.model.embed_tokens.weight
    decoder.inv_freq = decoder.inv_freq.to(device)
    return decoder.eval()
