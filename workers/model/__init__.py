"""Model code for the workers: config, our Llama-family decoder, and weight loading."""

from minedraft.workers.model.config import (
    ModelConfig,
    ModelError,
    UnsupportedModelError,
    VocabMismatchError,
    check_same_vocab,
)
from minedraft.workers.model.llama import Decoder
from minedraft.workers.model.loader import (
    TINY_ARCHS,
    TinySpec,
    decoder_from_hf,
    load_decoder,
    save_tokenizer_json,
    tiny_hf_model,
)

__all__ = [
    "TINY_ARCHS",
    "Decoder",
    "ModelConfig",
    "ModelError",
    "TinySpec",
    "UnsupportedModelError",
    "VocabMismatchError",
    "check_same_vocab",
    "decoder_from_hf",
    "load_decoder",
    "save_tokenizer_json",
    "tiny_hf_model",
]
