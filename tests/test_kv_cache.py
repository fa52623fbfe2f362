"""KVCache slot bookkeeping: alloc/free/full, truncate as a pure length decrement."""

import pytest
import torch

from minedraft.workers.model.kv_cache import KVCache
from minedraft.workers.model import ModelConfig

CONFIG = ModelConfig(
    arch="llama", vocab_size=512, hidden_size=64, intermediate_size=128, num_layers=2,
    num_heads=4, num_kv_heads=2, head_dim=16, rms_norm_eps=1e-6, rope_theta=10000.0,
    attention_bias=False, tie_word_embeddings=False, max_position_embeddings=2048,
    eos_token_ids=(257,),
)  # fmt: skip


def test_shape_and_dtype():
    cache = KVCache(CONFIG, max_slots=3, max_len=16, dtype=torch.bfloat16)
    assert cache.data.shape == (2, 2, 3, 2, 16, 16)  # [layers, 2, slots, kv_heads, max_len, head_dim]
    assert cache.data.dtype == torch.bfloat16
    assert cache.lengths == [0, 0, 0] and cache.num_free == 3


def test_alloc_free_full():
    cache = KVCache(CONFIG, max_slots=2, max_len=8, dtype=torch.float32)
    a, b = cache.alloc(), cache.alloc()
    assert {a, b} == {0, 1} and cache.num_free == 0
    with pytest.raises(RuntimeError, match="KV cache full"):
        cache.alloc()
    cache.lengths[a] = 5
    cache.free(a)
    assert cache.num_free == 1
    with pytest.raises(ValueError, match="not allocated"):
        cache.free(a)
    assert cache.alloc() == a and cache.lengths[a] == 0  # a reused slot starts empty


def test_truncate_is_a_length_decrement():
    cache = KVCache(CONFIG, max_slots=2, max_len=8, dtype=torch.float32)
    slot = cache.alloc()
    cache.data[:, :, slot, :, :6].normal_()
    before = cache.data.clone()
    ptr = cache.data.data_ptr()
    cache.lengths[slot] = 6
    cache.truncate(slot, 4)
    assert cache.lengths[slot] == 4
    cache.truncate(slot, 4)  # to the current length: no-op
    cache.truncate(slot, 0)
    assert cache.lengths[slot] == 0
    assert cache.data.data_ptr() == ptr and torch.equal(cache.data, before)


def test_truncate_errors():
    cache = KVCache(CONFIG, max_slots=2, max_len=8, dtype=torch.float32)
    slot = cache.alloc()
    cache.lengths[slot] = 3
    with pytest.raises(ValueError, match="holds 3 tokens"):
        cache.truncate(slot, 4)
    with pytest.raises(ValueError):
        cache.truncate(slot, -1)
    with pytest.raises(ValueError, match="not allocated"):
        cache.truncate(1, 0)
