"""Decoder: our compact Llama/Qwen2 forward over a slot-based KVCache, for batches whose rows
sit at different positions. Parameter names equal transformers' (LlamaForCausalLM /
Qwen2ForCausalLM state_dict keys), so their state dicts load as is. No weight loading here."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from minedraft.workers.model.kv_cache import KVCache
from minedraft.workers.model.config import ModelConfig
from minedraft.workers.model.transfer import to_device_packed


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()  # [..., C] float32, as transformers computes it
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class Attention(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        c, bias = config, config.attention_bias
        self.head_dim = c.head_dim
        self.q_proj = nn.Linear(c.hidden_size, c.num_heads * c.head_dim, bias=bias)
        self.k_proj = nn.Linear(c.hidden_size, c.num_kv_heads * c.head_dim, bias=bias)
        self.v_proj = nn.Linear(c.hidden_size, c.num_kv_heads * c.head_dim, bias=bias)
        # Llama's attention_bias also biases o_proj; Qwen2's o_proj never has a bias.
        self.o_proj = nn.Linear(c.num_heads * c.head_dim, c.hidden_size, bias=bias and c.arch == "llama")
        # q/k/v as one matmul ([q; k; v] rows), set by fast_linear.fuse_projections in place of
        # the three: one weight stream and one call instead of three small ones.
        self.qkv_proj: nn.Module | None = None
        self.qkv_sizes = (c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim, c.num_kv_heads * c.head_dim)

    def forward(self, x, cos, sin, kv, write, read_slots, mask):
        """x [N, C]: the batch's N real tokens, packed (row-major); cos/sin [N, 1, D]; kv: this
        layer's cache [2, S, Hkv, max_len, D]; write: (rows, cols, slot_idx, pos_idx) of the N
        tokens; read_slots [B]; mask [B, 1, T, L] bool. Only the attention itself sees the
        padded [B, T] layout: every projection runs on the N real tokens alone."""
        N = x.shape[0]
        B, _, T, _ = mask.shape
        if self.qkv_proj is None:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        else:
            q, k, v = self.qkv_proj(x).split(self.qkv_sizes, -1)
        q = q.view(N, -1, self.head_dim)  # [N, H, D]
        k = k.view(N, -1, self.head_dim)  # [N, Hkv, D]
        v = v.view(N, -1, self.head_dim)  # [N, Hkv, D]
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        rows, cols, slot_idx, pos_idx = write
        kv[:, slot_idx, :, pos_idx] = torch.stack((k, v), 1)  # [N, 2, Hkv, D]
        keys, values = kv[:, read_slots, :, : mask.shape[-1]]  # each [B, Hkv, L, D]
        if N == B * T:  # no padding: the packed tokens are the [B, T] grid
            q_grid = q.view(B, T, *q.shape[1:])  # [B, T, H, D]
        else:
            q_grid = q.new_zeros(B, T, *q.shape[1:])  # [B, T, H, D], padding queries see valid keys
            q_grid[rows, cols] = q
        out = F.scaled_dot_product_attention(
            q_grid.transpose(1, 2), keys, values, attn_mask=mask, enable_gqa=True
        ).transpose(1, 2)  # [B, T, H, D]
        out = out.reshape(N, -1) if N == B * T else out[rows, cols].reshape(N, -1)  # [N, H * D]
        return self.o_proj(out)  # [N, C]


class MLP(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)
        self.gate_up_proj: nn.Module | None = None  # [gate; up] as one matmul (fast_linear.fuse_projections)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate_up_proj is None:
            gate, up = self.gate_proj(x), self.up_proj(x)
        else:
            gate, up = self.gate_up_proj(x).chunk(2, -1)  # each [B, T, I]
        return self.down_proj(F.silu(gate) * up)  # [N, C]


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.self_attn = Attention(config)
        self.mlp = MLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, h, cos, sin, kv, write, read_slots, mask):
        h = h + self.self_attn(self.input_layernorm(h), cos, sin, kv, write, read_slots, mask)
        return h + self.mlp(self.post_attention_layernorm(h))  # [N, C]


class DecoderStack(nn.Module):
    """The `model.` part of the HF names: embeddings, layers, final norm."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config) for _ in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class Decoder(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.model = DecoderStack(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        exponents = torch.arange(0, config.head_dim, 2, device="cpu").float() / config.head_dim
        # Kept float32 outside the module's buffers, so .to(bfloat16) cannot round it.
        self.inv_freq = 1.0 / (config.rope_theta**exponents)  # [D/2] float32

    @property
    def device(self) -> torch.device:
        """Where the weights live (the lm_head may be a packed look-alike: fast_linear.py)."""
        return self.model.norm.weight.device

    def rope(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [B, T, 1, D] for positions [B, T], computed in float32 like transformers."""
        if self.inv_freq.device != positions.device:
            self.inv_freq = self.inv_freq.to(positions.device)
        freqs = positions[..., None].float() * self.inv_freq  # [B, T, D/2]
        emb = torch.cat((freqs, freqs), dim=-1)[:, :, None, :]  # [B, T, 1, D]
        return emb.cos().to(dtype), emb.sin().to(dtype)

    @torch.inference_mode()
    def forward(
        self,
        tokens: torch.Tensor,
        cache: KVCache,
        slots: list[int],
        num_tokens: list[int] | None = None,
        logit_index: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Append row b's first num_tokens[b] tokens to slot slots[b] at positions
        cache.lengths[slot]...; return logits [B, T, V] float32 (padded positions: garbage),
        or with logit_index [B, n] (indices into each row's real tokens) only those: [B, n, V].

        The layers run on the real tokens only, packed into [N, C]: a ragged batch (drafts kept
        at different lengths, a prompt next to one-token rows) costs its N tokens, not B x T.
        The workers pass tokens already on the model's device (slots.py); a host tensor is
        copied there, blocking (tests and tools). Nothing here reads from the device."""
        B, T = tokens.shape
        num_tokens = [T] * B if num_tokens is None else list(num_tokens)
        starts = self._check(cache, slots, num_tokens, B, T)
        device = self.device
        # 1. Positions, the cache cells of the real (unpadded) tokens and where the wanted logits
        #    sit, built on the host and sent to the device in one copy that does not block.
        pos = torch.tensor(starts)[:, None] + torch.arange(T)  # [B, T] long
        is_real = torch.arange(T)[None, :] < torch.tensor(num_tokens)[:, None]  # [B, T] bool
        rows, cols = is_real.nonzero(as_tuple=True)  # [N], [N]
        slots_t = torch.tensor(slots)  # [B]
        parts = [rows, cols, slots_t[rows], pos[rows, cols], slots_t, pos]
        if logit_index is not None:  # skip the lm_head where no logits are wanted
            # Row b's token j is packed at offsets[b] + j; indices past a row's tokens are clamped.
            counts = torch.tensor(num_tokens)  # [B]
            offsets = (counts.cumsum(0) - counts)[:, None]  # [B, 1]
            index = logit_index.cpu().clamp(min=0).minimum((counts - 1).clamp(min=0)[:, None])  # [B, n]
            parts.append((offsets + index).clamp(max=max(len(rows) - 1, 0)))  # [B, n]
        rows_d, cols_d, slot_d, pos_real, read_slots, pos, *flat = to_device_packed(parts, device)
        write = (rows_d, cols_d, slot_d, pos_real)  # 4 x [N]
        # 2. Query at position p sees its own slot's keys at positions <= p.
        L = min(max(starts) + T, cache.max_len)
        mask = torch.arange(L, device=device) <= pos[:, None, :, None]  # [B, 1, T, L] bool
        # 3. The layers, on the N real tokens.
        h = self.model.embed_tokens(tokens.to(device)[rows_d, cols_d])  # [N, C]
        cos, sin = self.rope(pos_real[None], h.dtype)  # [1, N, 1, D] each
        cos, sin = cos[0], sin[0]  # [N, 1, D]
        for layer, kv in zip(self.model.layers, cache.data):
            h = layer(h, cos, sin, kv, write, read_slots, mask)  # [N, C]
        if flat:
            h = h[flat[0]] if len(rows) else h.new_zeros(*flat[0].shape, h.shape[-1])  # [B, n, C]
        else:
            grid = h.new_zeros(B, T, h.shape[-1])  # [B, T, C], padding rows stay zero
            grid[rows_d, cols_d] = h
            h = grid
        logits = self.lm_head(self.model.norm(h)).float()  # [B, T or n, V] float32
        for slot, n in zip(slots, num_tokens):
            cache.lengths[slot] += n
        return logits

    @staticmethod
    def _check(cache: KVCache, slots: list[int], num_tokens: list[int], B: int, T: int) -> list[int]:
        """Validate a batch against the cache; return each row's start position."""
        if B == 0 or not len(slots) == len(num_tokens) == B or len(set(slots)) != B:
            raise ValueError(f"need {B} distinct slots and num_tokens, got {slots}, {num_tokens}")
        starts = []
        for slot, n in zip(slots, num_tokens):
            cache.check_slot(slot)
            if not 0 <= n <= T:
                raise ValueError(f"num_tokens {n} for slot {slot} outside [0, {T}]")
            if cache.lengths[slot] + n > cache.max_len:
                raise ValueError(
                    f"slot {slot} would hold {cache.lengths[slot] + n} tokens, more than the "
                    f"cache's max_len {cache.max_len}"
                )
            starts.append(cache.lengths[slot])
        return starts
