"""Validation of client requests: returns a message naming the bad field, never raises on bad
input. The daemon runs it once, where a request enters (SchedulerCore.add_request, with the
runtime's limits); the client runs the same function before sending, without limits, only so
that a caller's mistake fails at once. Pure Python."""

from __future__ import annotations

import math

MAX_REQUEST_ID_CHARS = 128
MAX_STOP_STRINGS = 16
MAX_STOP_CHARS = 256
MAX_SEED = 2**63 - 1


class _NoLimits:
    """What a client knows before asking the runtime: no vocabulary or length limits."""

    vocab_size = max_len = max_tokens_cap = None


def _outside(value, low, high) -> bool:
    return value < low or (high is not None and value > high)


def _range(low, high) -> str:
    return f"in {low}..{high}" if high is not None else f">= {low}"


def validate_generate(message, limits=_NoLimits) -> str | None:
    """message: a GenerateRequest; limits: has vocab_size, max_len, max_tokens_cap (None = unknown)."""
    m, vocab, max_len = message, limits.vocab_size, limits.max_len
    if not m.request_id or len(m.request_id) > MAX_REQUEST_ID_CHARS:
        return f"request_id: must be 1..{MAX_REQUEST_ID_CHARS} characters"
    if (m.prompt is None) == (m.prompt_ids is None):
        return "prompt: give exactly one of prompt or prompt_ids"
    if m.prompt is not None and not m.prompt:
        return "prompt: must not be empty"
    if m.prompt is not None and max_len is not None and len(m.prompt) > 16 * max_len:
        return f"prompt: {len(m.prompt)} characters is far beyond max_len={max_len} tokens"
    if m.prompt_ids is not None:
        if not m.prompt_ids:
            return "prompt_ids: must not be empty"
        if max_len is not None and len(m.prompt_ids) >= max_len:
            return f"prompt_ids: {len(m.prompt_ids)} tokens leaves no room within max_len={max_len}"
        if any(_outside(t, 0, None if vocab is None else vocab - 1) for t in m.prompt_ids):
            return f"prompt_ids: token ids must be {_range(0, None if vocab is None else vocab - 1)}"
    if _outside(m.max_tokens, 1, limits.max_tokens_cap):
        return f"max_tokens: {m.max_tokens} must be {_range(1, limits.max_tokens_cap)}"
    if not 0 <= m.min_tokens <= m.max_tokens:
        return f"min_tokens: {m.min_tokens} must be in 0..max_tokens ({m.max_tokens})"
    if not math.isfinite(m.temperature) or m.temperature < 0:
        return f"temperature: {m.temperature} must be finite and >= 0"
    if not math.isfinite(m.top_p) or not 0 < m.top_p <= 1:
        return f"top_p: {m.top_p} must be in (0, 1]"
    if _outside(m.top_k, 0, vocab):
        return f"top_k: {m.top_k} must be {_range(0, vocab)} (0 = off)"
    if m.seed is not None and not 0 <= m.seed <= MAX_SEED:
        return f"seed: must be in 0..{MAX_SEED}"
    if len(m.stop) > MAX_STOP_STRINGS or any(not s or len(s) > MAX_STOP_CHARS for s in m.stop):
        return f"stop: at most {MAX_STOP_STRINGS} non-empty strings of at most {MAX_STOP_CHARS} characters"
    if len(m.stop_token_ids) > MAX_STOP_STRINGS or any(
        _outside(t, 0, None if vocab is None else vocab - 1) for t in m.stop_token_ids
    ):
        return f"stop_token_ids: at most {MAX_STOP_STRINGS} ids, each {_range(0, None if vocab is None else vocab - 1)}"
    return None
