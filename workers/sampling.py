"""Batched sampling for both workers: logits to probabilities, per-request random streams, and
exact speculative acceptance. Pure tensor functions; no model code, no process or socket code.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from minedraft.common.protocol import SamplingParams
from minedraft.workers.model.transfer import to_device

DRAFT_SALT = 1  # the drafter's stream of a request
VERIFY_SALT = 2  # the verifier's stream of a request

_MASK64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def make_generator(seed: int, salt: int, device="cpu") -> torch.Generator:
    """A request's own generator; (seed mod 2**64, salt) is hashed so that the streams are independent."""
    generator = torch.Generator(device=device)
    generator.manual_seed(_splitmix64(_splitmix64(seed & _MASK64) ^ (salt & _MASK64)))
    return generator


def batch_params(params: list[SamplingParams], device="cpu") -> tuple[Tensor, Tensor, Tensor]:
    """Stack per-request params. Keep them on the CPU to let probs_from_logits pick its fast path
    without a device sync; it moves them to the logits' device itself."""
    temperature = torch.tensor([p.temperature for p in params], dtype=torch.float32, device=device)  # [B]
    top_k = torch.tensor([p.top_k for p in params], dtype=torch.long, device=device)  # [B]
    top_p = torch.tensor([p.top_p for p in params], dtype=torch.float32, device=device)  # [B]
    return temperature, top_k, top_p


def _truncate(probs: Tensor, top_k: Tensor, top_p: Tensor) -> Tensor:
    """Zero all but the top-k tokens, then all but the top-p nucleus of what is left; not renormalized.
    Ties are ranked by index (lower first), as a stable sort does."""
    vocab = probs.shape[-1]
    sorted_probs, order = probs.sort(dim=-1, descending=True, stable=True)  # [B, T, V] each
    rank = torch.arange(vocab, device=probs.device)  # [V]
    k = torch.where(top_k > 0, top_k, vocab)  # [B]
    sorted_probs = torch.where(rank < k[:, None, None], sorted_probs, 0.0)  # [B, T, V] top-k kept
    mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs  # [B, T, V] exclusive cumsum
    total = sorted_probs.sum(dim=-1, keepdim=True)  # [B, T, 1]
    keep = (mass_before < top_p[:, None, None] * total) | (top_p[:, None, None] >= 1.0)  # [B, T, V]
    keep &= rank < k[:, None, None]
    keep[..., 0] = True  # at least one token
    mask = torch.zeros_like(keep).scatter_(-1, order, keep)  # [B, T, V] in vocabulary order
    return probs * mask


def probs_from_logits(logits: Tensor, temperature: Tensor, top_k: Tensor, top_p: Tensor) -> Tensor:
    """logits [B, T, V] -> probs [B, T, V] float32; row b uses its own params at all T positions.
    Temperature 0 gives a one-hot at the argmax (first index on ties). Params may live on the CPU."""
    vocab = logits.shape[-1]
    device = logits.device
    logits = logits.float()  # [B, T, V] float32
    is_greedy = temperature == 0  # [B] bool, on the params' device
    any_greedy, all_greedy = bool(is_greedy.any()), bool(is_greedy.all())
    if any_greedy:
        greedy = torch.zeros_like(logits).scatter_(-1, logits.argmax(-1, keepdim=True), 1.0)  # [B, T, V]
        if all_greedy:
            return greedy
    is_truncated = ((top_k > 0) & (top_k < vocab)) | (top_p < 1.0)  # [B] bool
    needs_truncation = bool((is_truncated & ~is_greedy).any())
    is_greedy = to_device(is_greedy, device)  # [B]
    temperature = to_device(temperature.float(), device)  # [B]
    scale = torch.where(is_greedy, 1.0, temperature)  # [B] no division by zero
    probs = torch.softmax(logits / scale[:, None, None], dim=-1)  # [B, T, V]
    if needs_truncation:
        top_k = to_device(top_k, device)  # [B]
        top_p = to_device(top_p.float(), device)  # [B]
        probs = _truncate(probs, top_k, top_p)  # [B, T, V] unnormalized
        probs = probs / probs.sum(dim=-1, keepdim=True)  # [B, T, V]
    if any_greedy:
        probs = torch.where(is_greedy[:, None, None], greedy, probs)  # [B, T, V]
    return probs  # [B, T, V] float32


def draw_uniforms(generators: list[torch.Generator], n: int, device="cpu") -> Tensor:
    """[B, n] float64 uniforms in [0, 1); row b comes from generators[b] alone, so a request's
    draws do not depend on its batch neighbours (provided it always asks for the same n)."""
    if not generators:
        return torch.zeros(0, n, dtype=torch.float64, device=device)
    rows = [torch.rand(n, generator=g, dtype=torch.float64, device=g.device) for g in generators]
    return torch.stack([row.to(device) for row in rows])  # [B, n] float64


def sample(probs: Tensor, uniforms: Tensor) -> Tensor:
    """Inverse-CDF sampling: probs [B, V] (need not sum to 1), uniforms [B] in [0, 1) -> tokens [B]
    long. Never returns a zero-probability token."""
    cdf = probs.double().cumsum(dim=-1)  # [B, V] float64
    target = uniforms.double()[:, None] * cdf[:, -1:]  # [B, 1]
    token = torch.searchsorted(cdf, target, right=True).squeeze(-1)  # [B] first index with cdf > target
    vocab = probs.shape[-1]
    last_nonzero = vocab - 1 - (probs > 0).flip(-1).long().argmax(-1)  # [B]
    return torch.minimum(token, last_nonzero)  # [B] long; u * total rounding up to total lands here


# Exact speculative acceptance (Leviathan et al. 2023; Chen et al. 2023). For draft tokens
# x_i ~ q_i, i < m (m = num_draft of the row), accept x_i iff u_i * q_i(x_i) < p_i(x_i), i.e. with
# probability min(1, p_i(x_i) / q_i(x_i)). Let n be the number of leading accepts. If n < m the
# next token is drawn from norm(max(0, p_n - q_n)), else (n == m) from p_m, the bonus token; that
# draw uses u_m, which no accept test used. Every emitted token is then distributed exactly as p.
# Greedy rows (p one-hot) take q(x) = 1 and q_n = 0: accept while x_i == argmax p_i, then emit
# argmax p_n.
def speculative_accept(
    draft_tokens: Tensor,
    draft_probs: Tensor,
    target_probs: Tensor,
    num_draft: Tensor,
    uniforms: Tensor,
    is_greedy: Optional[Tensor] = None,
) -> tuple[Tensor, Tensor]:
    """draft_tokens [B, k], q [B, k, V], p [B, k+1, V], num_draft [B], uniforms [B, k+1] ->
    (num_accepted [B] long, next_token [B] long). Row b reads uniforms[b, :num_draft[b] + 1] only
    (accept tests, then the final draw); drafts, q and uniforms past that are ignored."""
    batch, k = draft_tokens.shape
    device = target_probs.device
    rows = torch.arange(batch, device=device)  # [B]
    if is_greedy is None:
        is_greedy = torch.zeros(batch, dtype=torch.bool, device=device)  # [B]

    # 1. Accept tests on the drafted positions; count the leading accepts.
    is_drafted = torch.arange(k, device=device) < num_draft[:, None]  # [B, k]
    tokens = torch.where(is_drafted, draft_tokens, 0)[..., None]  # [B, k, 1] padding may be any value
    p_x = target_probs[:, :k].gather(-1, tokens).squeeze(-1)  # [B, k]
    q_x = draft_probs.gather(-1, tokens).squeeze(-1)  # [B, k]
    q_x = torch.where(is_greedy[:, None], 1.0, q_x)  # [B, k] garbage q ignored on greedy rows
    accept = (uniforms[:, :k] * q_x < p_x) & is_drafted  # [B, k] bool
    num_accepted = accept.long().cumprod(dim=-1).sum(dim=-1)  # [B]

    # 2. Residual at the first rejection; p itself for the bonus token and on greedy rows.
    p_n = target_probs[rows, num_accepted]  # [B, V]
    is_rejected = (num_accepted < num_draft) & ~is_greedy  # [B]
    if k > 0:
        q_n = draft_probs[rows, num_accepted.clamp(max=k - 1)]  # [B, V]
        residual = torch.where(is_rejected[:, None], (p_n - q_n).clamp(min=0.0), p_n)  # [B, V]
        is_empty = residual.sum(dim=-1) <= 0  # [B] p == q up to rounding
        residual = torch.where(is_empty[:, None], p_n, residual)  # [B, V]
    else:
        residual = p_n  # [B, V]

    # 3. One draw for the next token, with the row's uniform after its accept tests.
    next_token = sample(residual, uniforms[rows, num_draft])  # [B] long
    return num_accepted, next_token


def greedy_accept(draft_tokens: Tensor, logits: Tensor, num_draft: Tensor) -> tuple[Tensor, Tensor]:
    """speculative_accept for a batch of greedy rows, from the logits alone: p is one-hot at the
    argmax, so a draft is accepted iff it equals the argmax (u * 1 < p(x) iff p(x) = 1) and the
    next token is the argmax after the accepted ones. Same results, no [B, k+1, V] distribution.
    draft_tokens [B, k], logits [B, k+1, V], num_draft [B] -> (num_accepted [B], next_token [B])."""
    batch, k = draft_tokens.shape
    argmax = logits.argmax(-1)  # [B, k+1] long, first index on ties (as probs_from_logits)
    is_drafted = torch.arange(k, device=logits.device) < num_draft[:, None]  # [B, k]
    accept = (draft_tokens == argmax[:, :k]) & is_drafted  # [B, k]
    num_accepted = accept.long().cumprod(dim=-1).sum(dim=-1)  # [B]
    return num_accepted, argmax[torch.arange(batch, device=logits.device), num_accepted]
