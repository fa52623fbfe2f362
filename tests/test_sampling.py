"""Tests for workers/sampling.py: speculative acceptance is lossless (chi-square at 10^5 draws),
greedy acceptance, top-k / top-p, inverse-CDF sampling and per-request random streams."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.stats import chi2

from minedraft.workers.sampling import (
    DRAFT_SALT,
    VERIFY_SALT,
    SamplingParams,
    batch_params,
    draw_uniforms,
    greedy_accept,
    make_generator,
    probs_from_logits,
    sample,
    speculative_accept,
)

NUM_TRIALS = 100_000
ALPHA = 1e-6  # false-alarm rate of each deterministic chi-square check


# ---------------------------------------------------------------- helpers


def chi_square_ok(tokens: torch.Tensor, probs: torch.Tensor) -> bool:
    """Whether tokens [N] are plausibly drawn from probs [V]: no zero-probability token was drawn
    and the chi-square statistic is below its 1 - ALPHA quantile (cells with expected < 5 pooled)."""
    counts = torch.bincount(tokens, minlength=probs.numel()).double()  # [V]
    expected = probs.double() / probs.double().sum() * tokens.numel()  # [V]
    if counts[expected == 0].sum() > 0:
        return False
    is_small = (expected > 0) & (expected < 5)  # [V]
    is_large = expected >= 5  # [V]
    observed = torch.cat([counts[is_large], counts[is_small].sum().view(1)])
    expected = torch.cat([expected[is_large], expected[is_small].sum().view(1)])
    observed, expected = observed[expected > 0], expected[expected > 0]
    statistic = float(((observed - expected) ** 2 / expected).sum())
    return statistic < chi2.ppf(1 - ALPHA, df=max(expected.numel() - 1, 1))


def random_dist(generator: torch.Generator, *shape: int, sharpness: float = 1.5) -> torch.Tensor:
    return torch.softmax(sharpness * torch.randn(*shape, generator=generator), dim=-1)  # [*shape]


def run_speculation(p: torch.Tensor, q: torch.Tensor, num_draft: torch.Tensor, seed: int):
    """One verify step per trial with position-independent p [k+1, V] and q [k, V]; drafts x_i ~ q_i.
    Returns (draft_tokens [N, k], num_accepted [N], next_token [N])."""
    generator = torch.Generator().manual_seed(seed)
    num_trials, k = num_draft.numel(), q.shape[0]
    draft_tokens = torch.stack(
        [torch.multinomial(q[i], num_trials, replacement=True, generator=generator) for i in range(k)], dim=1
    ).reshape(num_trials, k)  # [N, k]
    uniforms = torch.rand(num_trials, k + 1, generator=generator, dtype=torch.float64)  # [N, k+1]
    num_accepted, next_token = speculative_accept(
        draft_tokens,
        q[None].expand(num_trials, k, -1),
        p[None].expand(num_trials, k + 1, -1),
        num_draft,
        uniforms,
    )
    return draft_tokens, num_accepted, next_token


def emitted_token(draft_tokens, num_accepted, next_token, position: int) -> torch.Tensor:
    """The token emitted at `position` (valid where num_accepted >= position)."""
    if position >= draft_tokens.shape[1]:
        return next_token
    return torch.where(num_accepted > position, draft_tokens[:, position], next_token)  # [N]


def reference_accept(draft_tokens, draft_probs, target_probs, num_draft, uniforms, is_greedy):
    """Row-by-row transcription of the paper's scheme, for exact comparison."""
    num_accepted, next_token = [], []
    for b in range(draft_tokens.shape[0]):
        n, n_draft = 0, int(num_draft[b])
        while n < n_draft:
            x = int(draft_tokens[b, n])
            q_x = 1.0 if is_greedy[b] else float(draft_probs[b, n, x])
            if not float(uniforms[b, n]) * q_x < float(target_probs[b, n, x]):
                break
            n += 1
        p_n = target_probs[b, n]
        if n < n_draft and not is_greedy[b]:
            residual = (p_n - draft_probs[b, n]).clamp(min=0.0)
            residual = residual if residual.sum() > 0 else p_n
        else:
            residual = p_n
        num_accepted.append(n)
        next_token.append(int(sample(residual[None], uniforms[b, n_draft : n_draft + 1])[0]))
    return torch.tensor(num_accepted), torch.tensor(next_token)


# ---------------------------------------------------------------- lossless speculative sampling


def test_lossless_generic_k1():
    g = torch.Generator().manual_seed(1)
    p, q = random_dist(g, 2, 12), random_dist(g, 1, 12)
    draft, n, nxt = run_speculation(p, q, torch.ones(NUM_TRIALS, dtype=torch.long), seed=11)
    assert chi_square_ok(emitted_token(draft, n, nxt, 0), p[0])
    assert 0 < n.float().mean() < 1  # both branches exercised


def test_lossless_q_zero_where_p_has_mass():
    g = torch.Generator().manual_seed(2)
    p, q = random_dist(g, 2, 10), random_dist(g, 1, 10)
    q[0, :4] = 0.0  # the drafter never proposes tokens 0..3
    q = q / q.sum(-1, keepdim=True)
    draft, n, nxt = run_speculation(p, q, torch.ones(NUM_TRIALS, dtype=torch.long), seed=12)
    first = emitted_token(draft, n, nxt, 0)
    assert chi_square_ok(first, p[0])
    assert (first < 4).any()  # they reach the output through the residual


def test_lossless_p_zero_where_q_has_mass():
    g = torch.Generator().manual_seed(3)
    p, q = random_dist(g, 2, 10), random_dist(g, 1, 10)
    p[:, 5:] = 0.0  # the target never emits tokens 5..9
    p = p / p.sum(-1, keepdim=True)
    draft, n, nxt = run_speculation(p, q, torch.ones(NUM_TRIALS, dtype=torch.long), seed=13)
    first = emitted_token(draft, n, nxt, 0)
    assert chi_square_ok(first, p[0])
    assert (first < 5).all()


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(temperature=0.7, top_k=5),
        SamplingParams(temperature=1.3, top_p=0.8),
        SamplingParams(temperature=0.9, top_k=10, top_p=0.9),
    ],
)
def test_lossless_with_temperature_top_k_top_p(params):
    g = torch.Generator().manual_seed(4)
    vocab = 16
    temperature, top_k, top_p = batch_params([params])
    p = probs_from_logits(2 * torch.randn(1, 2, vocab, generator=g), temperature, top_k, top_p)[0]  # [2, V]
    q = probs_from_logits(2 * torch.randn(1, 1, vocab, generator=g), temperature, top_k, top_p)[0]  # [1, V]
    assert (p == 0).any() and (q == 0).any()  # truncation is in play
    draft, n, nxt = run_speculation(p, q, torch.ones(NUM_TRIALS, dtype=torch.long), seed=14)
    assert chi_square_ok(emitted_token(draft, n, nxt, 0), p[0])


@pytest.mark.parametrize("k", [1, 3])
def test_lossless_mixed_num_draft_every_position(k):
    g = torch.Generator().manual_seed(5 + k)
    p, q = random_dist(g, k + 1, 8), random_dist(g, k, 8)
    num_draft = torch.randint(0, k + 1, (2 * NUM_TRIALS,), generator=g)  # includes 0: plain sampling
    draft, n, nxt = run_speculation(p, q, num_draft, seed=15 + k)
    assert (n <= num_draft).all()
    for position in range(k + 1):
        reached = n >= position  # rows that emit a token at this position
        tokens = emitted_token(draft, n, nxt, position)[reached]
        assert chi_square_ok(tokens, p[position]), position
    assert chi_square_ok(nxt[num_draft == 0], p[0])  # no draft: one plain sample from p


def test_token_after_rejection_follows_residual():
    g = torch.Generator().manual_seed(6)
    p, q = random_dist(g, 2, 12), random_dist(g, 1, 12)
    draft, n, nxt = run_speculation(p, q, torch.ones(NUM_TRIALS, dtype=torch.long), seed=16)
    rejected = n == 0
    assert rejected.sum() > 10_000
    residual = (p[0] - q[0]).clamp(min=0)
    assert chi_square_ok(nxt[rejected], residual)
    assert not chi_square_ok(nxt[rejected], p[0])  # the residual really differs from p


def test_second_token_after_accept_follows_p2():
    g = torch.Generator().manual_seed(7)
    p, q = random_dist(g, 3, 10), random_dist(g, 2, 10)
    draft, n, nxt = run_speculation(p, q, torch.full((NUM_TRIALS,), 2), seed=17)
    accepted_first = n >= 1
    second = emitted_token(draft, n, nxt, 1)[accepted_first]
    assert chi_square_ok(second, p[1])
    assert not chi_square_ok(second, p[0])


def test_matches_row_by_row_reference():
    g = torch.Generator().manual_seed(8)
    batch, k, vocab = 64, 4, 9
    q = random_dist(g, batch, k, vocab, sharpness=1.0)  # close to p: long accepted runs
    p = random_dist(g, batch, k + 1, vocab, sharpness=1.0)
    q[:, :, :2] = 0.0  # exact zeros in q and p
    p[:, :, -2:] = 0.0
    q, p = q / q.sum(-1, keepdim=True), p / p.sum(-1, keepdim=True)
    is_greedy = torch.arange(batch) % 5 == 0
    p[is_greedy] = torch.nn.functional.one_hot(p[is_greedy].argmax(-1), vocab).float()
    draft_tokens = torch.multinomial(q.reshape(-1, vocab), 1, generator=g).reshape(batch, k)
    q[is_greedy] = float("nan")  # unwritten on greedy rows
    num_draft = torch.randint(0, k + 1, (batch,), generator=g)
    uniforms = torch.rand(batch, k + 1, generator=g, dtype=torch.float64)
    got = speculative_accept(draft_tokens, q, p, num_draft, uniforms, is_greedy)
    want = reference_accept(draft_tokens, q, p, num_draft, uniforms, is_greedy)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    assert len(set(got[0].tolist())) >= 3  # a spread of accepted lengths


def test_rows_do_not_affect_each_other():
    g = torch.Generator().manual_seed(9)
    batch, k, vocab = 6, 3, 11
    q, p = random_dist(g, batch, k, vocab), random_dist(g, batch, k + 1, vocab)
    draft_tokens = torch.randint(0, vocab, (batch, k), generator=g)
    num_draft = torch.tensor([0, 1, 2, 3, 3, 2])
    uniforms = torch.rand(batch, k + 1, generator=g, dtype=torch.float64)
    together = speculative_accept(draft_tokens, q, p, num_draft, uniforms)
    for b in range(batch):
        row = slice(b, b + 1)
        alone = speculative_accept(draft_tokens[row], q[row], p[row], num_draft[row], uniforms[row])
        assert alone[0].item() == together[0][b].item() and alone[1].item() == together[1][b].item()


def test_padding_past_num_draft_is_ignored():
    g = torch.Generator().manual_seed(19)
    batch, k, vocab = 8, 3, 10
    q, p = random_dist(g, batch, k, vocab), random_dist(g, batch, k + 1, vocab)
    draft_tokens = torch.randint(0, vocab, (batch, k), generator=g)
    num_draft = torch.tensor([0, 1, 2, 3, 0, 1, 2, 3])
    uniforms = torch.rand(batch, k + 1, generator=g, dtype=torch.float64)
    want = speculative_accept(draft_tokens, q, p, num_draft, uniforms)
    is_padding = torch.arange(k) >= num_draft[:, None]  # [B, k]
    draft_tokens = torch.where(is_padding, -1, draft_tokens)  # not even a valid index
    q = torch.where(is_padding[..., None], float("nan"), q)
    uniforms = torch.where(torch.arange(k + 1) > num_draft[:, None], 0.0, uniforms)  # as left unwritten
    got = speculative_accept(draft_tokens, q, p, num_draft, uniforms)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_zero_draft_length_batch():
    g = torch.Generator().manual_seed(10)
    p = random_dist(g, 4, 1, 7)  # [B, 1, V]
    n, nxt = speculative_accept(
        torch.zeros(4, 0, dtype=torch.long), torch.zeros(4, 0, 7), p, torch.zeros(4, dtype=torch.long),
        torch.rand(4, 1, generator=g, dtype=torch.float64),
    )
    assert n.tolist() == [0, 0, 0, 0] and (p[torch.arange(4), 0, nxt] > 0).all()


# ---------------------------------------------------------------- negative controls


def wrong_accept_k1(draft_tokens, q, p, uniforms, variant: str) -> torch.Tensor:
    """First emitted token of a deliberately wrong k=1 scheme; q [N, 1, V], p [N, 2, V]."""
    x = draft_tokens[:, 0]  # [N]
    rows = torch.arange(x.numel())
    p_x, q_x = p[rows, 0, x], q[rows, 0, x]  # [N]
    if variant == "ratio_flipped":  # accept with min(1, q/p)
        accept = uniforms[:, 0] * p_x < q_x
        fallback = sample((p[:, 0] - q[:, 0]).clamp(min=0), uniforms[:, 1])
    elif variant == "residual_from_p":  # correct test, resample from p on rejection
        accept = uniforms[:, 0] * q_x < p_x
        fallback = sample(p[:, 0], uniforms[:, 1])
    else:
        raise AssertionError(variant)
    return torch.where(accept, x, fallback)  # [N]


@pytest.mark.parametrize("variant", ["ratio_flipped", "residual_from_p"])
def test_negative_control_wrong_scheme_fails(variant):
    g = torch.Generator().manual_seed(1)  # the same p, q and draws as test_lossless_generic_k1
    p, q = random_dist(g, 2, 12), random_dist(g, 1, 12)
    g = torch.Generator().manual_seed(11)
    draft_tokens = torch.multinomial(q[0], NUM_TRIALS, replacement=True, generator=g)[:, None]  # [N, 1]
    uniforms = torch.rand(NUM_TRIALS, 2, generator=g, dtype=torch.float64)  # [N, 2]
    q_b, p_b = q[None].expand(NUM_TRIALS, 1, -1), p[None].expand(NUM_TRIALS, 2, -1)
    first = wrong_accept_k1(draft_tokens, q_b, p_b, uniforms, variant)
    assert not chi_square_ok(first, p[0])
    # The same draws through the real scheme pass, so only the scheme differs.
    n, nxt = speculative_accept(draft_tokens, q_b, p_b, torch.ones(NUM_TRIALS, dtype=torch.long), uniforms)
    assert chi_square_ok(torch.where(n > 0, draft_tokens[:, 0], nxt), p[0])


# ---------------------------------------------------------------- greedy


def test_temperature_zero_is_one_hot_at_first_argmax():
    logits = torch.tensor([[[0.0, 3.0, 1.0, 3.0], [5.0, 5.0, 5.0, 5.0]]])  # [1, 2, 4] with ties
    probs = probs_from_logits(logits, *batch_params([SamplingParams(temperature=0.0, top_k=2, top_p=0.5)]))
    assert probs.dtype == torch.float32
    assert torch.equal(probs, torch.tensor([[[0.0, 1.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0]]]))


@pytest.mark.parametrize("pass_is_greedy", [False, True])
def test_greedy_accepts_while_draft_matches_argmax(pass_is_greedy):
    g = torch.Generator().manual_seed(20)
    batch, k, vocab = 40, 4, 10
    logits = torch.randn(batch, k + 1, vocab, generator=g)
    greedy = batch_params([SamplingParams()] * batch)
    p = probs_from_logits(logits, *greedy)  # [B, k+1, V] one-hot
    target = logits.argmax(-1)  # [B, k+1]
    num_match = torch.arange(batch) % (k + 1)  # drafts agree with the target for this many tokens
    num_draft = (torch.arange(batch) // (k + 1)) % (k + 1)
    is_match = torch.arange(k) < num_match[:, None]  # [B, k]
    draft_tokens = torch.where(is_match, target[:, :k], (target[:, :k] + 1) % vocab)  # [B, k]
    if pass_is_greedy:
        q = torch.full((batch, k, vocab), float("nan"))  # garbage: must be ignored
        is_greedy = torch.ones(batch, dtype=torch.bool)
    else:
        q = torch.nn.functional.one_hot(draft_tokens, vocab).float()  # a greedy drafter's q
        is_greedy = None
    uniforms = torch.rand(batch, k + 1, generator=g, dtype=torch.float64)
    n, nxt = speculative_accept(draft_tokens, q, p, num_draft, uniforms, is_greedy)
    want_n = torch.minimum(num_match, num_draft)
    assert torch.equal(n, want_n)
    assert torch.equal(nxt, target[torch.arange(batch), want_n])


def test_greedy_accept_equals_the_general_scheme_on_greedy_rows():
    """The verifier's all-greedy shortcut gives what speculative_accept gives on one-hot p,
    including ties in the logits (first index wins in both) and rows drafting 0..k tokens."""
    g = torch.Generator().manual_seed(21)
    batch, k, vocab = 60, 4, 6
    logits = torch.randint(0, 3, (batch, k + 1, vocab), generator=g).float()  # many ties
    target = logits.argmax(-1)  # [B, k+1]
    num_match = torch.arange(batch) % (k + 1)
    num_draft = (torch.arange(batch) // (k + 1)) % (k + 1)
    is_match = torch.arange(k) < num_match[:, None]
    draft_tokens = torch.where(is_match, target[:, :k], (target[:, :k] + 1) % vocab)  # [B, k]
    p = probs_from_logits(logits, *batch_params([SamplingParams()] * batch))
    uniforms = torch.rand(batch, k + 1, generator=g, dtype=torch.float64)
    q = torch.full((batch, k, vocab), float("nan"))
    want = speculative_accept(draft_tokens, q, p, num_draft, uniforms, torch.ones(batch, dtype=torch.bool))
    got = greedy_accept(draft_tokens, logits, num_draft)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    assert torch.equal(got[0], torch.minimum(num_match, num_draft))


def test_greedy_rows_mixed_with_sampled_rows():
    g = torch.Generator().manual_seed(21)
    k, vocab = 2, 8
    params = [SamplingParams(), SamplingParams(temperature=1.0, seed=3)]
    logits = torch.randn(2, k + 1, vocab, generator=g)
    p = probs_from_logits(logits, *batch_params(params))
    q = random_dist(g, 2, k, vocab)
    q[0] = float("nan")
    draft_tokens = torch.stack([logits[0, :k].argmax(-1), torch.tensor([1, 2])])  # row 0 all match
    uniforms = torch.rand(2, k + 1, generator=g, dtype=torch.float64)
    is_greedy = torch.tensor([True, False])
    n, nxt = speculative_accept(draft_tokens, q, p, torch.tensor([2, 2]), uniforms, is_greedy)
    assert n[0] == 2 and nxt[0] == logits[0, k].argmax()
    alone = speculative_accept(draft_tokens[1:], q[1:], p[1:], torch.tensor([2]), uniforms[1:])
    assert (n[1], nxt[1]) == (alone[0][0], alone[1][0])


# ---------------------------------------------------------------- probs_from_logits


def params_for(*params: SamplingParams):
    return batch_params(list(params))


def test_temperature_scales_logits():
    logits = torch.randn(2, 3, 20, generator=torch.Generator().manual_seed(30))
    params = params_for(SamplingParams(temperature=2.0), SamplingParams(temperature=0.5))
    probs = probs_from_logits(logits, *params)
    torch.testing.assert_close(probs[0], torch.softmax(logits[0] / 2.0, -1))
    torch.testing.assert_close(probs[1], torch.softmax(logits[1] / 0.5, -1))


def test_top_k_keeps_the_k_largest_and_their_ratios():
    logits = torch.randn(1, 4, 30, generator=torch.Generator().manual_seed(31))
    probs = probs_from_logits(logits, *params_for(SamplingParams(temperature=1.0, top_k=5)))
    full = torch.softmax(logits, -1)
    for t in range(4):
        kept = probs[0, t] > 0
        assert kept.sum() == 5
        assert torch.equal(kept.nonzero().flatten().sort().values, full[0, t].topk(5).indices.sort().values)
        torch.testing.assert_close(probs[0, t][kept], full[0, t][kept] / full[0, t][kept].sum())
    torch.testing.assert_close(probs.sum(-1), torch.ones(1, 4))


def test_top_k_ties_keep_lower_indices():
    logits = torch.tensor([[[1.0, 2.0, 2.0, 2.0, 0.0]]])
    probs = probs_from_logits(logits, *params_for(SamplingParams(temperature=1.0, top_k=2)))
    assert (probs[0, 0] > 0).tolist() == [False, True, True, False, False]
    torch.testing.assert_close(probs[0, 0, 1:3], torch.tensor([0.5, 0.5]))


def test_top_k_larger_than_vocab_is_off():
    logits = torch.randn(1, 1, 6, generator=torch.Generator().manual_seed(32))
    probs = probs_from_logits(logits, *params_for(SamplingParams(temperature=1.0, top_k=100)))
    torch.testing.assert_close(probs, torch.softmax(logits, -1))


@pytest.mark.parametrize(
    "top_p, kept",
    [(0.75, [0, 1]), (0.81, [0, 1, 2]), (0.01, [0]), (0.0, [0]), (1.0, [0, 1, 2, 3])],
)
def test_top_p_keeps_smallest_set_reaching_mass(top_p, kept):
    logits = torch.tensor([[[0.5, 0.3, 0.15, 0.05]]]).log()
    probs = probs_from_logits(logits, *params_for(SamplingParams(temperature=1.0, top_p=top_p)))
    assert (probs[0, 0] > 0).nonzero().flatten().tolist() == kept
    torch.testing.assert_close(probs.sum(), torch.tensor(1.0))


def test_top_p_applies_to_the_top_k_renormalized_distribution():
    logits = torch.tensor([[[0.4, 0.3, 0.2, 0.1]]]).log()
    # after top-k 2: [4/7, 3/7]; top-p 0.5 is reached by the first token alone.
    probs = probs_from_logits(logits, *params_for(SamplingParams(temperature=1.0, top_k=2, top_p=0.5)))
    assert probs[0, 0].tolist() == [1.0, 0.0, 0.0, 0.0]


def test_tiny_tail_kept_when_top_p_off():
    logits = torch.tensor([[[30.0, 0.0, 0.0, -5.0]]])  # tail mass below float32 resolution of 1.0
    probs = probs_from_logits(logits, *params_for(SamplingParams(temperature=1.0, top_k=3)))
    assert (probs[0, 0] > 0).tolist() == [True, True, True, False]


def test_rows_keep_their_own_params_and_dtype():
    logits = torch.randn(3, 2, 12, generator=torch.Generator().manual_seed(33)).bfloat16()
    params = [
        SamplingParams(),
        SamplingParams(temperature=0.8, top_k=3),
        SamplingParams(temperature=1.2, top_p=0.6),
    ]
    together = probs_from_logits(logits, *params_for(*params))
    assert together.dtype == torch.float32 and together.shape == (3, 2, 12)
    for b, one in enumerate(params):
        alone = probs_from_logits(logits[b : b + 1], *params_for(one))
        torch.testing.assert_close(together[b : b + 1], alone)


def test_sampling_params_validation():
    assert SamplingParams().is_greedy and not SamplingParams(temperature=0.5).is_greedy
    for bad in [dict(temperature=-1.0), dict(temperature=float("nan")), dict(top_k=-1), dict(top_p=1.5)]:
        with pytest.raises(ValueError):
            SamplingParams(**bad)
    temperature, top_k, top_p = params_for(SamplingParams(temperature=0.5, top_k=3, top_p=0.9))
    assert (temperature.dtype, top_k.dtype, top_p.dtype) == (torch.float32, torch.long, torch.float32)


# ---------------------------------------------------------------- sample


def test_sample_never_returns_zero_probability_at_the_ends():
    probs = torch.tensor([[0.3, 0.7, 0.0, 0.0], [0.0, 0.0, 0.2, 0.1], [0.0, 1.0, 0.0, 0.0]])
    one = torch.tensor(1.0, dtype=torch.float64)
    for u in [torch.nextafter(one, torch.tensor(0.0, dtype=torch.float64)), one]:  # 1.0 is out of contract
        assert sample(probs, u.repeat(3)).tolist() == [1, 3, 1]
    u32 = torch.nextafter(torch.tensor(1.0), torch.tensor(0.0)).repeat(3)  # float32 uniforms
    assert sample(probs, u32).tolist() == [1, 3, 1]
    assert sample(probs, torch.zeros(3, dtype=torch.float64)).tolist() == [0, 2, 1]


def test_sample_unnormalized_and_distribution():
    probs = torch.tensor([[1.0, 0.0, 2.0, 1.0]])  # total 4
    u = torch.tensor([0.0, 0.249, 0.25, 0.74, 0.75, 0.999], dtype=torch.float64)
    assert sample(probs.expand(6, -1), u).tolist() == [0, 0, 2, 2, 3, 3]
    g = torch.Generator().manual_seed(34)
    p = random_dist(g, 9)
    tokens = sample(p.expand(NUM_TRIALS, -1), torch.rand(NUM_TRIALS, generator=g, dtype=torch.float64))
    assert chi_square_ok(tokens, p)


@settings(max_examples=200, deadline=None, derandomize=True)
@given(
    weights=st.lists(st.sampled_from([0.0, 0.0, 1e-30, 1e-7, 0.1, 1.0, 3.0]), min_size=1, max_size=12),
    u=st.sampled_from([0.0, 1e-12, 0.5, 1.0 - 1e-12, 1.0 - 2.0**-53]),
)
def test_sample_fuzz_never_zero_probability(weights, u):
    order = torch.randperm(len(weights) + 1, generator=torch.Generator().manual_seed(len(weights)))
    probs = torch.tensor([weights + [1.0]])[:, order]  # [1, V] zeros anywhere, at least one nonzero
    token = sample(probs, torch.tensor([u], dtype=torch.float64))
    assert probs[0, token[0]] > 0


# ---------------------------------------------------------------- per-request random streams


def test_uniforms_do_not_depend_on_batch_neighbours():
    alone = draw_uniforms([make_generator(7, VERIFY_SALT)], 5)
    crowd = draw_uniforms(
        [make_generator(1, VERIFY_SALT), make_generator(7, VERIFY_SALT), make_generator(3, DRAFT_SALT)], 5
    )
    assert alone.shape == (1, 5) and torch.equal(alone[0], crowd[1])
    assert ((crowd >= 0) & (crowd < 1)).all()


def test_stream_continues_across_calls():
    g = make_generator(42, DRAFT_SALT)
    first, second = draw_uniforms([g], 3), draw_uniforms([g], 3)
    both = draw_uniforms([make_generator(42, DRAFT_SALT)], 6)
    assert torch.equal(torch.cat([first, second], 1), both)


def test_streams_differ_by_seed_and_salt():
    draws = [
        draw_uniforms([make_generator(seed, salt)], 4)
        for seed, salt in [
            (0, DRAFT_SALT), (0, VERIFY_SALT), (1, DRAFT_SALT), (1, VERIFY_SALT),
            (-5, DRAFT_SALT), (2**64 - 5, VERIFY_SALT),
        ]
    ]
    assert len({tuple(d.flatten().tolist()) for d in draws}) == len(draws)
    assert torch.equal(draw_uniforms([make_generator(0, DRAFT_SALT)], 4), draws[0])
    assert draw_uniforms([], 3).shape == (0, 3)
