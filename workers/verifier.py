"""The verifier: the target model, its KV cache and exact acceptance of a batch's drafts.

Verifier is the pure core (driven in-process by the engine and tests); run_verifier_process in
workers/process.py wraps it with sockets. With num_draft = 0 a row is plain autoregressive decoding.
"""

from __future__ import annotations

import torch

from minedraft.common.protocol import JobRow
from minedraft.workers.model.kv_cache import KVCache
from minedraft.workers.sampling import (
    VERIFY_SALT, batch_params, draw_uniforms, greedy_accept, probs_from_logits, speculative_accept,
)
from minedraft.workers.slots import SlotTable, feed_batch, feed_without_logits
from minedraft.workers.model.transfer import index_tensor, to_device


class Verifier:
    def __init__(self, model, max_slots: int, max_len: int, max_draft: int, dtype: torch.dtype, device="cpu"):
        self.model = model
        self.max_draft = max_draft
        self.cache = KVCache(model.config, max_slots, max_len, dtype, device)
        self.table = SlotTable(self.cache, VERIFY_SALT)

    def release(self, request_ids: list[str]) -> None:
        self.table.release(request_ids)

    @torch.inference_mode()
    def prefill(self, rows: list[JobRow]) -> None:
        """Cache the rows' committed tokens but the last one (which verify always re-feeds), with
        no logits: a verify of the same rows then gives the same result, sooner."""
        states = [self.table.commit(r.request_id, r.params, r.new_tokens) for r in rows]
        feeds = [s.tokens_to_feed(self.cache)[:-1] for s in states]
        feed_without_logits(self.model, self.cache, states, feeds)

    @torch.inference_mode()
    def verify(self, rows: list[JobRow], draft_tokens: torch.Tensor | None, draft_probs: torch.Tensor | None) -> list[list[int]]:
        """Verify each row's drafts (read in place from draft_tokens[row.buffer_row] and
        draft_probs[row.buffer_row]) in one target forward; return the emitted tokens per row:
        the accepted drafts followed by one corrected or bonus token."""
        if not rows:
            return []
        # 1. Apply committed tokens; each row feeds its uncached committed tokens (host), then
        #    its drafts, which stay on the device: the host learns them with the results.
        states = [self.table.commit(r.request_id, r.params, r.new_tokens) for r in rows]
        num_draft = [r.num_draft for r in rows]
        k = max(num_draft)
        device = self.cache.data.device
        feeds = [s.tokens_to_feed(self.cache) for s in states]
        if k > 0:
            buffer_rows = _rows_index([r.buffer_row for r in rows], draft_tokens.device)
            drafts = draft_tokens[buffer_rows, :k].to(device)  # [B, k] int64
        else:
            drafts = torch.zeros(len(rows), 0, dtype=torch.long, device=device)
        # 2. One forward; logits after the last committed token and after each draft.
        index = [[len(f) - 1 + min(j, d) for j in range(k + 1)] for f, d in zip(feeds, num_draft)]
        logits = feed_batch(self.model, self.cache, states, feeds, index, self.max_draft + 1,
                            tail=drafts, num_tail=num_draft)  # [B, k+1, V]
        temperature, top_k, top_p = batch_params([s.params for s in states])  # [B] each, host
        is_greedy = temperature == 0  # [B] bool, host
        num_draft_t = to_device(index_tensor(num_draft), device)  # [B]
        # 3. Exact acceptance. All-greedy batches decide from the logits alone; otherwise each
        #    request draws its uniforms from its own generator.
        if bool(is_greedy.all()):
            num_accepted, next_token = greedy_accept(drafts, logits, num_draft_t)
        else:
            target_probs = probs_from_logits(logits, temperature, top_k, top_p)  # [B, k+1, V] float32
            uniforms = torch.zeros(len(rows), k + 1, dtype=torch.float64, device=device)
            for i, s in enumerate(states):
                uniforms[i, : num_draft[i] + 1] = draw_uniforms([s.generator], num_draft[i] + 1, device)[0]
            if k > 0:
                q = draft_probs[buffer_rows, :k].to(device)  # [B, k, V] float32, in place when rows are 0..B-1
            else:  # nothing drafted: q is never read
                q = torch.zeros(1, 1, 1, device=device).expand(len(rows), k, target_probs.shape[-1])
            num_accepted, next_token = speculative_accept(
                drafts, q, target_probs, num_draft_t, uniforms, to_device(is_greedy, device)
            )
        # 4. The job's one device-to-host read: the drafts, how many were accepted, the next token.
        host = torch.cat((drafts, num_accepted[:, None], next_token[:, None]), 1).tolist()  # [B, k+2]
        for state, row, d in zip(states, host, num_draft):
            state.cached.extend(row[:d])  # the forward cached every draft
        return [row[: row[k]] + [row[k + 1]] for row in host]


def _rows_index(buffer_rows: list[int], device: torch.device) -> slice | torch.Tensor:
    """A slice (a view, no copy) when the rows are 0..B-1, as they are unless a request was
    aborted between its draft and its verify; else an index tensor on `device` (a gather)."""
    if buffer_rows == list(range(len(buffer_rows))):
        return slice(0, len(buffer_rows))
    return to_device(index_tensor(buffer_rows), device)
