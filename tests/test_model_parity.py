"""Our Decoder against transformers on tiny random models (float32, CPU): prefill of ragged
batches, incremental decode, rollback + re-append, batch vs alone; plus a bfloat16 smoke test.
Every check runs on each linear path that can serve (plain F.linear and the packed kernel), and
on the kernel with bfloat16 weights (a draft's option) against transformers on the same rounded
weights."""

import pytest
import torch

from minedraft.workers.model.kv_cache import KVCache
from minedraft.workers.model import TINY_ARCHS, TinySpec, decoder_from_hf, tiny_hf_model
from minedraft.workers.model.fast_linear import apply_linear_path, kernel_unavailable_reason

SPEC = TinySpec(num_heads=4, num_kv_heads=2)  # GQA: 2 query heads per kv head
TOL = 1e-4
MAX_LEN = 64


def sharp_hf_model(arch: str):
    hf = tiny_hf_model(arch, SPEC)
    with torch.no_grad():  # sharper than the 0.02 init, so a wrong position or mask shows
        for p in hf.parameters():
            if p.dim() == 2:
                p.mul_(5)
    return hf


@pytest.fixture(scope="module", params=[(arch, path) for arch in TINY_ARCHS for path in ("plain", "packed", "packed-bf16")],
                ids=lambda param: "-".join(param))
def models(request):
    arch, path = request.param
    reason = kernel_unavailable_reason(torch.device("cpu"), torch.float32)
    if path.startswith("packed") and reason is not None:
        pytest.skip(f"kernel unavailable: {reason}")
    hf = sharp_hf_model(arch)
    model = decoder_from_hf(sharp_hf_model(arch))  # its own copy of the same weights
    if path == "packed-bf16":
        apply_linear_path(model, "packed", "~/.cache/minedraft", weights="bfloat16")
        with torch.no_grad():  # the reference: transformers on the same rounded weights, in float32
            for module in hf.modules():
                if isinstance(module, torch.nn.Linear):
                    module.weight.copy_(module.weight.to(torch.bfloat16))
    else:
        apply_linear_path(model, path, "~/.cache/minedraft")
    return hf, model


def random_tokens(n: int, seed: int) -> list[int]:
    return torch.randint(0, SPEC.vocab_size, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def hf_logits(hf, seq: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return hf(torch.tensor([seq])).logits[0].float()  # [len, V]


def padded(rows: list[list[int]]) -> torch.Tensor:
    T = max(len(r) for r in rows)
    return torch.tensor([r + [0] * (T - len(r)) for r in rows])  # [B, T]


def append(model, cache, slots, rows):
    """Append ragged rows to their slots in one forward; return per-row logits [n_b, V]."""
    logits = model(padded(rows), cache, slots, [len(r) for r in rows])  # [B, T, V]
    return [logits[b, : len(r)] for b, r in enumerate(rows)]


def assert_close(ours: torch.Tensor, ref: torch.Tensor, tol: float = TOL):
    assert ours.shape == ref.shape
    assert (ours - ref).abs().max().item() < tol


def test_prefill_ragged_batch(models):
    hf, model = models
    cache = KVCache(model.config, 4, MAX_LEN, torch.float32)
    prompts = [random_tokens(n, seed) for seed, n in enumerate([7, 3, 12])]
    slots = [cache.alloc() for _ in prompts]
    outs = append(model, cache, slots, prompts)
    assert cache.lengths[: len(slots)] == [7, 3, 12]
    for prompt, out in zip(prompts, outs):
        assert out.dtype == torch.float32
        assert_close(out, hf_logits(hf, prompt))


def test_incremental_decode(models):
    hf, model = models
    cache = KVCache(model.config, 4, MAX_LEN, torch.float32)
    seqs = [random_tokens(n, 10 + seed) for seed, n in enumerate([5, 9, 2])]
    slots = [cache.alloc() for _ in seqs]
    append(model, cache, slots, seqs)
    # one token each, then three each, then a ragged step (one row appends nothing)
    for step, counts in enumerate([[1, 1, 1], [3, 3, 3], [2, 0, 3]]):
        new = [random_tokens(n, 100 * step + b) for b, n in enumerate(counts)]
        outs = append(model, cache, slots, new)
        for b, (seq, tokens, out) in enumerate(zip(seqs, new, outs)):
            seq.extend(tokens)
            assert cache.lengths[slots[b]] == len(seq)
            if tokens:
                assert_close(out, hf_logits(hf, seq)[-len(tokens) :])


def test_rollback_then_reappend(models):
    hf, model = models
    cache = KVCache(model.config, 4, MAX_LEN, torch.float32)
    prompts = [random_tokens(6, 20), random_tokens(10, 21)]
    slots = [cache.alloc() for _ in prompts]
    append(model, cache, slots, prompts)
    drafts = [random_tokens(4, 22), random_tokens(4, 23)]
    append(model, cache, slots, drafts)
    kept = [1, 0]  # row 0 keeps one draft token, row 1 rejects all
    committed = [p + d[:k] for p, d, k in zip(prompts, drafts, kept)]
    for slot, seq in zip(slots, committed):
        cache.truncate(slot, len(seq))
    fresh = [random_tokens(3, 24), random_tokens(2, 25)]
    outs = append(model, cache, slots, fresh)
    for seq, tokens, out in zip(committed, fresh, outs):
        assert_close(out, hf_logits(hf, seq + tokens)[-len(tokens) :])


def test_batch_equals_rows_alone(models):
    _, model = models
    prompts = [random_tokens(n, 30 + n) for n in [4, 11, 1]]
    batch_cache = KVCache(model.config, 3, MAX_LEN, torch.float32)
    slots = [batch_cache.alloc() for _ in prompts]
    batch_outs = append(model, batch_cache, slots, prompts)
    batch_next = append(model, batch_cache, slots, [[7], [8], [9]])
    for prompt, out, nxt, tok in zip(prompts, batch_outs, batch_next, [7, 8, 9]):
        cache = KVCache(model.config, 1, MAX_LEN, torch.float32)
        slot = cache.alloc()
        assert_close(out, append(model, cache, [slot], [prompt])[0], 1e-5)
        assert_close(nxt, append(model, cache, [slot], [[tok]])[0], 1e-5)


def test_logit_index_selects_positions(models):
    _, model = models
    rows = [random_tokens(6, 70), random_tokens(3, 71)]
    full_cache, cache = (KVCache(model.config, 2, MAX_LEN, torch.float32) for _ in range(2))
    full = model(padded(rows), full_cache, [full_cache.alloc(), full_cache.alloc()], [6, 3])  # [2, 6, V]
    slots = [cache.alloc(), cache.alloc()]
    index = torch.tensor([[5, 0], [2, 1]])  # [B, n]
    picked = model(padded(rows), cache, slots, [6, 3], index)  # [2, 2, V]
    assert_close(picked, torch.stack([full[0, [5, 0]], full[1, [2, 1]]]), 1e-5)
    none = model(torch.tensor([[1], [2]]), cache, slots, None, torch.zeros(2, 0, dtype=torch.long))
    assert none.shape == (2, 0, SPEC.vocab_size) and cache.lengths[:2] == [7, 4]


def test_bad_batches_raise(models):
    _, model = models
    cache = KVCache(model.config, 2, 8, torch.float32)
    a, b = cache.alloc(), cache.alloc()
    append(model, cache, [a, b], [random_tokens(6, 40), random_tokens(2, 41)])
    # padded positions may run past max_len as long as the real tokens fit
    append(model, cache, [a, b], [[1, 2], [3, 4, 5]])
    assert cache.lengths[a] == 8 and cache.lengths[b] == 5
    with pytest.raises(ValueError, match="max_len"):
        model(torch.tensor([[1]]), cache, [a])
    with pytest.raises(ValueError, match="distinct"):
        model(torch.tensor([[1], [2]]), cache, [b, b])
    with pytest.raises(ValueError, match="not allocated"):
        model(torch.tensor([[1]]), cache, [5])
    assert cache.lengths[a] == 8 and cache.lengths[b] == 5


def test_bfloat16_smoke(models):
    hf, _ = models
    model = decoder_from_hf(hf, dtype=torch.bfloat16)
    assert model.lm_head.weight.dtype == torch.bfloat16
    cache = KVCache(model.config, 2, MAX_LEN, torch.bfloat16)
    slots = [cache.alloc(), cache.alloc()]
    outs = append(model, cache, slots, [random_tokens(9, 50), random_tokens(4, 51)])
    outs += append(model, cache, slots, [[1], [2, 3]])
    for out in outs:
        assert out.dtype == torch.float32 and torch.isfinite(out).all()


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_matches_cpu_reference(models, dtype):
    hf, _ = models
    model = decoder_from_hf(hf, dtype=dtype, device="cuda")
    cache = KVCache(model.config, 2, MAX_LEN, dtype, device="cuda")
    slots = [cache.alloc(), cache.alloc()]
    seqs = [random_tokens(9, 60), random_tokens(4, 61)]
    outs = append(model, cache, slots, seqs)
    nxt = [[5], [6, 7]]
    outs = [torch.cat(pair) for pair in zip(outs, append(model, cache, slots, nxt))]
    tol = TOL if dtype == torch.float32 else 0.5  # bf16: a loose sanity bound only
    for seq, tokens, out in zip(seqs, nxt, outs):
        assert out.is_cuda and torch.isfinite(out).all()
        assert_close(out.cpu(), hf_logits(hf, seq + tokens), tol)
