"""The small-M CPU linear kernel and its seam (workers/model/fast_linear.py): results against
F.linear, bitwise batch and thread invariance, the swap into a Decoder (tied embedding read from
the packed panels, plain weights dropped), the per-M choice from timings, and the fallbacks."""

import contextlib

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from minedraft.common.config import ConfigError, load_config
from minedraft.common.request import Request
from minedraft.workers.engine import Engine
from minedraft.workers.model import fast_linear
from minedraft.workers.model.fast_linear import (
    PackedEmbedding, PackedLinear, apply_linear_path, choice_from_timings, choices_from_timings, describe_choice,
    describe_choices, kernel_unavailable_reason, load_kernel,
)
from minedraft.workers.model.loader import TinySpec, decoder_from_hf, tiny_hf_model

CACHE_DIR = "~/.cache/minedraft"
SKIP_REASON = kernel_unavailable_reason(torch.device("cpu"), torch.float32)
needs_kernel = pytest.mark.skipif(SKIP_REASON is not None, reason=f"kernel unavailable: {SKIP_REASON}")


@pytest.fixture(scope="module")
def ops():
    if SKIP_REASON is not None:
        pytest.skip(SKIP_REASON)
    return load_kernel(CACHE_DIR)[0]


# N not a multiple of 16 (edge panel), K beyond one 256-wide chunk and not a multiple of it.
SHAPES = [(16, 8), (37, 300), (256, 64), (1000, 513)]


@needs_kernel
@pytest.mark.parametrize("n,k", SHAPES)
@pytest.mark.parametrize("has_bias", [False, True])
def test_matches_f_linear(ops, n, k, has_bias):
    gen = torch.Generator().manual_seed(n * k)
    weight = torch.randn(n, k, generator=gen) / k**0.5
    bias = torch.randn(n, generator=gen) if has_bias else None
    packed = ops.pack(weight)
    assert packed.shape == ((n + 15) // 16, k, 16)
    for m in (0, 1, 2, 5, 7, 13, 40, 81):
        x = torch.randn(m, k, generator=gen)
        y = ops.linear(x, packed, bias, n)
        assert y.shape == (m, n)
        if m:
            assert (y - F.linear(x, weight, bias)).abs().max().item() < 1e-4


@needs_kernel
def test_rows_do_not_depend_on_their_batch_or_threads(ops):
    """Each output is one ordered FMA chain: a row alone, in any batch and at any thread count
    gives the same bits (what keeps greedy output identical across ar, sd and psd)."""
    gen = torch.Generator().manual_seed(3)
    weight, bias = torch.randn(200, 700, generator=gen), torch.randn(200, generator=gen)
    packed = ops.pack(weight)
    x = torch.randn(23, 700, generator=gen)
    batch = ops.linear(x, packed, bias, 200)
    for m in (1, 2, 5, 6, 7, 12, 13):
        assert torch.equal(ops.linear(x[:m].contiguous(), packed, bias, 200), batch[:m])
    assert torch.equal(ops.linear(x[9:10].contiguous(), packed, bias, 200)[0], batch[9])
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        assert torch.equal(ops.linear(x, packed, bias, 200), batch)
    finally:
        torch.set_num_threads(threads)


@needs_kernel
@pytest.mark.parametrize("n,k", SHAPES)
def test_bfloat16_weights_give_float32_products_of_the_rounded_weights(ops, n, k):
    gen = torch.Generator().manual_seed(7 * n + k)
    weight = torch.randn(n, k, generator=gen) / k**0.5
    bias = torch.randn(n, generator=gen)
    packed = ops.pack(weight.to(torch.bfloat16))
    assert packed.dtype == torch.bfloat16 and packed.shape == ((n + 15) // 16, k, 16)
    rounded = weight.to(torch.bfloat16).float()
    for m in (1, 2, 5, 13, 40, 81):
        x = torch.randn(m, k, generator=gen)
        y = ops.linear(x, packed, bias, n)
        assert y.dtype == torch.float32
        assert (y - F.linear(x, rounded, bias)).abs().max().item() < 1e-4
        # the same chain as float32 panels of the rounded weights: the widening is exact
        assert torch.equal(y, ops.linear(x, ops.pack(rounded), bias, n))


@contextlib.contextmanager
def num_threads(n: int):
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@needs_kernel
@pytest.mark.parametrize("threads", [1, 2])
def test_bfloat16_rows_do_not_depend_on_their_batch_or_threads(ops, threads):
    gen = torch.Generator().manual_seed(4)
    packed = ops.pack(torch.randn(90, 300, generator=gen).to(torch.bfloat16))
    x = torch.randn(17, 300, generator=gen)
    with num_threads(1):
        batch = ops.linear(x, packed, None, 90)
    with num_threads(threads):
        for m in (1, 3, 6, 7, 12, 17):
            assert torch.equal(ops.linear(x[:m].contiguous(), packed, None, 90), batch[:m])
    with pytest.raises(RuntimeError, match="float32 or bfloat16"):
        ops.pack(torch.randn(4, 8, dtype=torch.float16))


@needs_kernel
def test_rejects_mismatched_inputs(ops):
    packed = ops.pack(torch.randn(32, 64))
    with pytest.raises(RuntimeError, match="does not fit"):
        ops.linear(torch.randn(2, 65), packed, None, 32)
    with pytest.raises(RuntimeError, match="does not fit"):  # panels for 32 columns, asked for 16
        ops.linear(torch.randn(2, 64), packed, None, 16)
    with pytest.raises(RuntimeError, match="contiguous"):
        ops.linear(torch.randn(64, 2).t(), packed, None, 32)
    with pytest.raises(RuntimeError, match="bias"):
        ops.linear(torch.randn(2, 64), packed, torch.randn(31), 32)


def tiny_decoder(arch: str):
    return decoder_from_hf(tiny_hf_model(arch, TinySpec(seed=0)))


@needs_kernel
@pytest.mark.parametrize("arch", ["tiny-llama", "tiny-qwen2"])
def test_packed_swaps_every_linear_and_drops_plain_weights(arch):
    plain, fast = tiny_decoder(arch), tiny_decoder(arch)
    report = apply_linear_path(fast, "packed", CACHE_DIR)
    assert set(report.shapes.values()) == {"packed"} and report.fused == ["gate/up", "q/k/v"]
    assert not any(isinstance(m, nn.Linear) for m in fast.modules())
    linears = [m for m in fast.modules() if isinstance(m, PackedLinear)]
    # per layer: q/k/v, o, gate/up, down; plus the lm_head
    assert len(linears) == 4 * fast.config.num_layers + 1 and all(m.weight is None for m in linears)
    ids = torch.arange(fast.config.vocab_size).reshape(2, -1)
    if fast.config.tie_word_embeddings:  # the embedding reads the lm_head's panels
        assert isinstance(fast.model.embed_tokens, PackedEmbedding)
    assert torch.equal(fast.model.embed_tokens(ids), plain.model.embed_tokens(ids))


@needs_kernel
def test_fused_projections_give_the_separate_projections_bits():
    plain, fast = tiny_decoder("tiny-qwen2"), tiny_decoder("tiny-qwen2")
    apply_linear_path(fast, "packed", CACHE_DIR)
    ops, _ = load_kernel(CACHE_DIR)
    attn, mlp = plain.model.layers[1].self_attn, plain.model.layers[1].mlp
    x = torch.randn(5, plain.config.hidden_size)
    with torch.inference_mode():
        q, k, v = fast.model.layers[1].self_attn.qkv_proj(x).split(fast.model.layers[1].self_attn.qkv_sizes, -1)
        gate, up = fast.model.layers[1].mlp.gate_up_proj(x).chunk(2, -1)
        for got, linear in ((q, attn.q_proj), (k, attn.k_proj), (v, attn.v_proj), (gate, mlp.gate_proj), (up, mlp.up_proj)):
            alone = ops.linear(x, ops.pack(linear.weight), linear.bias, linear.out_features)
            assert torch.equal(got, alone)


@needs_kernel
@pytest.mark.parametrize("arch", ["tiny-llama", "tiny-qwen2"])
def test_bfloat16_weights_pack_every_linear_in_bfloat16(arch):
    plain, fast = tiny_decoder(arch), tiny_decoder(arch)
    report = apply_linear_path(fast, "auto", CACHE_DIR, weights="bfloat16")
    assert report.weights == "bfloat16" and report.choose_s == 0  # nothing to time: no float32 copy to serve from
    assert set(report.shapes.values()) == {"packed"}
    linears = [m for m in fast.modules() if isinstance(m, PackedLinear)]
    assert len(linears) == 4 * fast.config.num_layers + 1
    assert all(m.packed.dtype == torch.bfloat16 and m.weight is None for m in linears)
    ids = torch.arange(fast.config.vocab_size).reshape(2, -1)
    embedded = fast.model.embed_tokens(ids)
    assert embedded.dtype == torch.float32
    if fast.config.tie_word_embeddings:  # the embedding is the lm_head's rounded panels
        assert torch.equal(embedded, plain.model.embed_tokens(ids).to(torch.bfloat16).float())
    else:
        assert torch.equal(embedded, plain.model.embed_tokens(ids))


def test_bfloat16_weights_on_the_plain_path_are_rounded_in_place():
    plain, rounded = tiny_decoder("tiny-qwen2"), tiny_decoder("tiny-qwen2")
    report = apply_linear_path(rounded, "plain", CACHE_DIR, weights="bfloat16")
    assert report.weights == "bfloat16" and set(report.shapes.values()) == {"plain"}
    for (name, a), b in zip(plain.named_modules(), rounded.modules()):
        if isinstance(a, nn.Linear):
            assert b.weight.dtype == torch.float32, name
            assert torch.equal(b.weight, a.weight.to(torch.bfloat16).float()), name
    with pytest.raises(ValueError, match="weights must be one of"):
        apply_linear_path(tiny_decoder("tiny-qwen2"), "auto", CACHE_DIR, weights="float16")


def test_plain_path_changes_nothing():
    model = tiny_decoder("tiny-qwen2")
    report = apply_linear_path(model, "plain", CACHE_DIR)
    assert set(report.shapes.values()) == {"plain"} and "plain" in report.kernel
    assert sum(isinstance(m, nn.Linear) for m in model.modules()) == 7 * model.config.num_layers + 1


def test_falls_back_where_the_kernel_cannot_serve():
    assert "CPUs" in kernel_unavailable_reason(torch.device("cuda"), torch.float32)
    assert "float32" in kernel_unavailable_reason(torch.device("cpu"), torch.bfloat16)
    model = decoder_from_hf(tiny_hf_model("tiny-llama", TinySpec()), dtype=torch.bfloat16)
    report = apply_linear_path(model, "auto", CACHE_DIR)
    assert report.kernel.startswith("unavailable: dtype") and set(report.shapes.values()) == {"plain"}
    with pytest.raises(RuntimeError, match="linear_path = packed, but the kernel cannot serve"):
        apply_linear_path(model, "packed", CACHE_DIR)
    with pytest.raises(ValueError, match="linear_path"):
        apply_linear_path(model, "fast", CACHE_DIR)


def test_failed_build_is_reported_and_falls_back(monkeypatch):
    monkeypatch.setattr(fast_linear, "_kernel_state", {"error": "kernel build failed: no compiler"})
    monkeypatch.setattr(fast_linear, "kernel_unavailable_reason", lambda device, dtype: None)
    report = apply_linear_path(tiny_decoder("tiny-llama"), "auto", CACHE_DIR)
    assert report.kernel == "unavailable: kernel build failed: no compiler"
    assert set(report.shapes.values()) == {"plain"}


def test_choice_per_m_from_timings():
    timing = {"rows": [1, 5, 16], "packed_s": [2.0, 1.0, 3.0], "plain_s": [1.0, 2.0, 2.0]}
    is_packed = choice_from_timings(timing)
    assert len(is_packed) == 17  # M = 0..16; larger M take the last entry
    assert is_packed[:2] == [False, False] and all(is_packed[2:6]) and not any(is_packed[6:])
    assert describe_choice(is_packed) == "packed for M 2-5; plain for M 1, 6+"
    near_tie = {"rows": [1], "packed_s": [1.05], "plain_s": [1.0]}  # within PLAIN_MARGIN: the kernel
    assert choice_from_timings(near_tie) == [True, True]
    assert describe_choice([True] * 4) == "packed" and describe_choice([False] * 4) == "plain"


def test_one_copy_where_the_kernel_is_near_f_linear_at_every_m_and_thread_count():
    near = {"rows": [1, 16], "packed_s": [1.0, 1.05], "plain_s": [1.0, 1.0]}  # within both margins
    assert choices_from_timings({1: near, 2: near}) == {0: [True]}
    within_one_copy = {"rows": [1, 16], "packed_s": [1.0, 1.15], "plain_s": [1.0, 1.0]}  # plain would win M = 16 alone
    assert choices_from_timings({1: within_one_copy}) == {0: [True]}
    far = {"rows": [1, 16], "packed_s": [1.0, 1.5], "plain_s": [1.0, 1.0]}  # plain 1.5x faster at M = 16
    choices = choices_from_timings({1: near, 2: far})
    assert choices[1] == [True] * 17  # per M the kernel is within PLAIN_MARGIN at 1 thread ...
    assert choices[2][:2] == [True, True] and not any(choices[2][2:])  # ... but not at 2 threads from M = 2
    assert describe_choices(choices) == "1 thread: packed; 2 threads: packed for M 1; plain for M 2+"


@needs_kernel
def test_choice_follows_the_thread_count(ops):
    linear = nn.Linear(64, 48)
    layer = PackedLinear(ops, linear, {1: [True, True], 2: [False, False]})  # plain at 2 threads
    assert layer.plain_bytes == 48 * 64 * 4
    calls = []
    original = layer.ops

    class Spy:
        pack = original.pack

        def linear(self, *args):
            calls.append(torch.get_num_threads())
            return original.linear(*args)

    layer.ops = Spy()
    x = torch.randn(3, 64)
    for threads in (1, 2, 4):  # 4 was not timed: the nearest timed count (2) decides
        with num_threads(threads):
            assert (layer(x) - linear(x)).abs().max().item() < 1e-5
    assert calls == [1]
    assert PackedLinear(ops, linear, [True]).plain_bytes == 0


@needs_kernel
def test_decoder_rows_equal_at_one_and_two_threads():
    """The packed path's logits are bit-identical at 1 and 2 threads and alone or in a batch."""
    from minedraft.workers.model.kv_cache import KVCache

    model = tiny_decoder("tiny-qwen2")
    apply_linear_path(model, "packed", CACHE_DIR)
    tokens = torch.randint(0, 256, (3, 6), generator=torch.Generator().manual_seed(2))
    results = []
    for threads, rows in ((1, 3), (2, 3), (2, 1)):
        with num_threads(threads):
            cache = KVCache(model.config, 3, 16, torch.float32)
            slots = [cache.alloc() for _ in range(rows)]
            results.append(model(tokens[:rows], cache, slots))
    assert torch.equal(results[0], results[1])
    assert torch.equal(results[0][:1], results[2])


@needs_kernel
def test_mixed_choice_serves_each_m_on_its_path(ops):
    linear = nn.Linear(64, 48)
    layer = PackedLinear(ops, linear, [False, False, True, True, False])  # plain for M 1 and 4+
    assert layer.weight is not None
    calls = []
    original = layer.ops

    class Spy:
        pack = original.pack

        def linear(self, *args):
            calls.append(args[0].shape[0])
            return original.linear(*args)

    layer.ops = Spy()
    for m in (1, 2, 3, 4, 9):
        x = torch.randn(m, 64)
        assert (layer(x) - linear(x)).abs().max().item() < 1e-5
    assert calls == [2, 3]


@needs_kernel
@pytest.mark.parametrize("mode", ["ar", "sd", "sd-bf16-draft"])
def test_engine_greedy_on_packed_path_equals_transformers(mode):
    target_hf = tiny_hf_model("tiny-llama", TinySpec(seed=0))
    target = decoder_from_hf(target_hf)
    apply_linear_path(target, "packed", CACHE_DIR)
    draft = None
    if mode != "ar":
        draft = decoder_from_hf(tiny_hf_model("tiny-llama", TinySpec(seed=0, noise=0.003)))
        apply_linear_path(draft, "packed", CACHE_DIR, weights="bfloat16" if mode == "sd-bf16-draft" else "float32")
        mode = "sd"
    gen = torch.Generator().manual_seed(5)
    requests = [Request(f"r{i}", torch.randint(0, 256, (1 + 5 * i,), generator=gen).tolist(), 6 + 3 * i)
                for i in range(6)]
    engine = Engine(target, draft, mode=mode, num_draft=4, max_batch=4, max_len=128)
    for r in requests:
        engine.add_request(r)
    done = engine.run()
    for r in requests:
        ids = torch.tensor([r.prompt_ids])
        ref = target_hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=r.max_tokens,
                                 do_sample=False, eos_token_id=target_hf.config.eos_token_id, pad_token_id=0)
        assert done[r.request_id].output_ids == ref[0, len(r.prompt_ids):].tolist(), r.request_id


def test_config_switch():
    assert load_config().model.linear_path == "auto"
    assert load_config(overrides=["model.linear_path=plain"]).model.linear_path == "plain"
    with pytest.raises(ConfigError, match="model.linear_path: expected auto, plain or packed"):
        load_config(overrides=["model.linear_path=mkl"])
    assert load_config().model.draft_weights == "float32"
    assert load_config(overrides=["model.draft_weights=bfloat16"]).model.draft_weights == "bfloat16"
    with pytest.raises(ConfigError, match="model.draft_weights: expected float32 or bfloat16"):
        load_config(overrides=["model.draft_weights=int8"])


@needs_kernel
def test_packing_releases_the_mapped_weights_file(tmp_path):
    """Loaded weights live in the weights file safetensors maps; once the panels replace the
    linears nothing may refer to it, or all of it stays resident beside the panels."""
    import gc

    from safetensors.torch import load_file, save_file

    model = tiny_decoder("tiny-llama")
    state = {k: v.clone() for k, v in model.state_dict().items() if k != "lm_head.weight" or
             not model.config.tie_word_embeddings}
    path = tmp_path / "model.safetensors"
    save_file(state, str(path))
    model.load_state_dict(load_file(str(path)), strict=False, assign=True)
    if model.config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    gc.collect()

    def is_mapped() -> bool:
        with open("/proc/self/maps") as maps:
            return str(path) in maps.read()

    assert is_mapped()  # the loaded tensors are views of the file
    x = torch.randint(0, 256, (2, 5))
    from minedraft.workers.model.kv_cache import KVCache

    def logits():
        cache = KVCache(model.config, 2, 16, torch.float32)
        return model(x, cache, [cache.alloc(), cache.alloc()])

    before = logits()
    report = apply_linear_path(model, "packed", CACHE_DIR)
    gc.collect()
    assert set(report.shapes.values()) == {"packed"}
    assert not is_mapped()
    assert (logits() - before).abs().max().item() < 1e-4
