"""Loading decoders: built-in tiny models, safetensors folders, a GGUF file, and the errors
for bad specs; ModelConfig checks."""

import numpy as np
import pytest
import torch
import transformers

from minedraft.workers.model.kv_cache import KVCache
from minedraft.workers.model import (
    ModelConfig,
    ModelError,
    TinySpec,
    UnsupportedModelError,
    VocabMismatchError,
    check_same_vocab,
    decoder_from_hf,
    load_decoder,
    save_tokenizer_json,
    tiny_hf_model,
)

TOKENS = torch.tensor([[256, 72, 101, 108, 108, 111, 33, 10]])  # [1, 8]


def logits_of(model) -> torch.Tensor:
    cache = KVCache(model.config, 1, 16, torch.float32)
    return model(TOKENS, cache, [cache.alloc()])  # [1, 8, V]


@pytest.mark.parametrize("arch", ["tiny-llama", "tiny-qwen2"])
def test_safetensors_folder_matches_in_memory(arch, tmp_path):
    hf = tiny_hf_model(arch, TinySpec(noise=0.01))
    hf.save_pretrained(tmp_path)
    assert list(tmp_path.glob("*.safetensors"))
    loaded = load_decoder(str(tmp_path), torch.float32)
    assert torch.equal(logits_of(loaded), logits_of(decoder_from_hf(hf)))
    if arch == "tiny-qwen2":  # tied embeddings stay one tensor
        assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
        assert loaded.config.attention_bias and loaded.config.tie_word_embeddings


def test_tiny_models_are_deterministic_and_leave_global_rng_alone():
    state = torch.random.get_rng_state()
    a = load_decoder("tiny-llama", torch.float32, tiny=TinySpec(seed=3))
    b = load_decoder("tiny-llama", torch.float32, tiny=TinySpec(seed=3))
    noisy = load_decoder("tiny-llama", torch.float32, tiny=TinySpec(seed=3, noise=0.01))
    assert torch.equal(torch.random.get_rng_state(), state)
    assert torch.equal(logits_of(a), logits_of(b))
    diff = (noisy.lm_head.weight - a.lm_head.weight).std().item()
    assert 0.005 < diff < 0.02
    assert a.config.eos_token_ids == (257,) and a.config.num_kv_heads == 2
    assert save_tokenizer_json("tiny-llama", "unused.json") is False


def test_gguf_file_matches_in_memory(tmp_path):
    gguf = pytest.importorskip("gguf")
    hf = tiny_hf_model("tiny-llama", TinySpec(noise=0.01))
    c = hf.config
    path = tmp_path / "tiny.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_context_length(c.max_position_embeddings)
    writer.add_embedding_length(c.hidden_size)
    writer.add_block_count(c.num_hidden_layers)
    writer.add_feed_forward_length(c.intermediate_size)
    writer.add_head_count(c.num_attention_heads)
    writer.add_head_count_kv(c.num_key_value_heads)
    writer.add_rope_dimension_count(c.hidden_size // c.num_attention_heads)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(c.rms_norm_eps)
    writer.add_vocab_size(c.vocab_size)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, c.num_hidden_layers)
    for key, tensor in hf.state_dict().items():
        array = tensor.numpy()
        heads = {"q_proj": c.num_attention_heads, "k_proj": c.num_key_value_heads}.get(key.split(".")[-2])
        if heads:  # llama.cpp's q/k row order, which transformers undoes on load
            array = array.reshape(heads, 2, -1, array.shape[1]).swapaxes(1, 2).reshape(array.shape)
        writer.add_tensor(names.get_name(key, try_suffixes=(".weight",)), np.ascontiguousarray(array))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    loaded = load_decoder(str(path), torch.float32)
    assert (logits_of(loaded) - logits_of(decoder_from_hf(hf))).abs().max().item() < 1e-5


def test_missing_path():
    with pytest.raises(ModelError, match="model path not found: /no/such/model"):
        load_decoder("/no/such/model", torch.float32)
    with pytest.raises(ModelError, match="built-in models: tiny-llama, tiny-qwen2"):
        load_decoder("tiny-gpt", torch.float32)


def test_folder_without_config_or_weights(tmp_path):
    with pytest.raises(ModelError, match="no config.json"):
        load_decoder(str(tmp_path), torch.float32)
    tiny_hf_model("tiny-llama", TinySpec()).config.save_pretrained(tmp_path)
    with pytest.raises(ModelError, match="no \\*.safetensors"):
        load_decoder(str(tmp_path), torch.float32)


def test_not_a_model_file(tmp_path):
    path = tmp_path / "weights.bin"
    path.write_bytes(b"")
    with pytest.raises(ModelError, match="folder or a .gguf file"):
        load_decoder(str(path), torch.float32)


def test_unsupported_architecture(tmp_path):
    transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2).save_pretrained(tmp_path)
    with pytest.raises(UnsupportedModelError, match="'gpt2'") as err:
        load_decoder(str(tmp_path), torch.float32)
    assert "llama" in str(err.value) and "qwen2" in str(err.value)


def test_unsupported_rope_scaling():
    hf_config = transformers.LlamaConfig(
        rope_parameters={"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0}
    )
    with pytest.raises(UnsupportedModelError, match="rope scaling 'linear'.*llama, mistral, qwen2"):
        ModelConfig.from_hf(hf_config)


def test_config_from_hf_variants():
    mistral = ModelConfig.from_hf(
        transformers.MistralConfig(sliding_window=1024, max_position_embeddings=4096, eos_token_id=[2, 7])
    )
    assert mistral.arch == "llama" and not mistral.attention_bias
    assert mistral.max_position_embeddings == 1024  # exact only within the window
    assert mistral.eos_token_ids == (2, 7)
    rope = {"rope_type": "default", "rope_theta": 1e6}
    qwen = ModelConfig.from_hf(transformers.Qwen2Config(rope_parameters=rope))
    assert qwen.arch == "qwen2" and qwen.attention_bias and qwen.rope_theta == 1e6


def test_check_same_vocab():
    small = ModelConfig.from_hf(tiny_hf_model("tiny-llama", TinySpec()).config)
    big = ModelConfig.from_hf(tiny_hf_model("tiny-llama", TinySpec(vocab_size=640)).config)
    check_same_vocab(small, small)
    with pytest.raises(VocabMismatchError, match="draft vocab_size=512.*target vocab_size=640"):
        check_same_vocab(small, big)


def test_bad_gguf_and_tokenizer_copy(tmp_path):
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"not a gguf file")
    with pytest.raises(ModelError, match="cannot load GGUF"):
        load_decoder(str(bad), torch.float32)
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "tokenizer.json").write_text('{"version": "1.0"}')
    out = tmp_path / "out.json"
    assert save_tokenizer_json(str(folder), str(out)) is True
    assert out.read_text() == '{"version": "1.0"}'


def test_generation_config_eos_ids_become_stop_ids(tmp_path):
    """transformers' generate stops on generation_config.json's EOS ids too; so must we."""
    import json

    hf = tiny_hf_model("tiny-llama", TinySpec())
    hf.save_pretrained(tmp_path / "m")
    (tmp_path / "m" / "generation_config.json").write_text(json.dumps({"eos_token_id": [257, 300]}))
    assert load_decoder(str(tmp_path / "m"), torch.float32).config.eos_token_ids == (257, 300)
