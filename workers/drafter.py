"""The drafter: the draft model, its KV cache and the per-request draft loop.

Drafter is the pure core (driven in-process by the engine and tests); run_drafter_process in
workers/process.py wraps it with sockets. It never decides what is committed: the scheduler does.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from minedraft.common.protocol import JobRow
from minedraft.workers.model.kv_cache import KVCache
from minedraft.workers.sampling import (
    DRAFT_SALT, batch_params, draw_uniforms, probs_from_logits, sample,
)
from minedraft.workers.slots import SlotTable, feed_batch
from minedraft.workers.model.transfer import index_tensor, to_device_packed


class Drafter:
    def __init__(self, model, max_slots: int, max_len: int, max_draft: int, dtype: torch.dtype, device="cpu"):
        self.model = model
        self.max_draft = max_draft
        self.cache = KVCache(model.config, max_slots, max_len, dtype, device)
        self.table = SlotTable(self.cache, DRAFT_SALT)

    def release(self, request_ids: list[str]) -> None:
        self.table.release(request_ids)

    @torch.inference_mode()
    def draft(self, rows: list[JobRow], out_tokens: torch.Tensor, out_probs: torch.Tensor,
              capacity: int | None = None) -> DraftOutcome:
        """Draft rows[i].num_draft tokens for each row into out_tokens[row.buffer_row] and, for
        sampled (non-greedy) rows, their draft distributions into out_probs[row.buffer_row].
        Then keep the `capacity` likeliest positions across the batch (TETRIS, select_positions);
        None keeps every drafted position.

        out_tokens [max_batch, max_draft] int64; out_probs [max_batch, max_draft, V] float32.
        """
        scores: list[list[float]] = [[] for _ in rows]
        # 1. Apply committed tokens; rows with nothing to draft only record them.
        states = [self.table.commit(r.request_id, r.params, r.new_tokens) for r in rows]
        is_sampled = [not s.params.is_greedy for s in states]
        active = [i for i, r in enumerate(rows) if r.num_draft > 0]
        if active:
            self._draft([rows[i] for i in active], [states[i] for i in active], [is_sampled[i] for i in active],
                        out_tokens, out_probs, [scores[i] for i in active])
        return DraftOutcome(select_positions(scores, capacity), scores, is_sampled)

    def _draft(self, rows: list[JobRow], states, is_sampled: list[bool], out_tokens: torch.Tensor,
               out_probs: torch.Tensor, scores: list[list[float]]) -> None:
        """The buffers live on the drafter's device (out_tokens, out_probs as in draft())."""
        temperature, top_k, top_p = batch_params([s.params for s in states])  # [B] each, host
        num_draft = [r.num_draft for r in rows]
        depth = max(num_draft)
        device = self.cache.data.device
        # 1. Which rows take part in each draft step, decided on the host now (row j drafts
        #    num_draft[j] tokens), with every step's indices sent to the device in one copy.
        live = [[j for j in range(len(rows)) if num_draft[j] > i] for i in range(depth)]
        sampled = [[n for n, j in enumerate(step) if is_sampled[j]] for step in live]  # positions within live
        plan = [[step, sampled[i], [rows[j].buffer_row for j in step], [rows[step[n]].buffer_row for n in sampled[i]],
                 [n for n, j in enumerate(step) if num_draft[j] > i + 1]] for i, step in enumerate(live)]
        on_device = to_device_packed([index_tensor(x) for step in plan for x in step]
                                     + [index_tensor([r.buffer_row for r in rows])], device)
        all_rows = on_device.pop()
        # 2. Catch up on committed tokens; logits after the last one give draft token 1.
        feeds = [s.tokens_to_feed(self.cache) for s in states]
        logits = feed_batch(self.model, self.cache, states, feeds, [[len(f) - 1] for f in feeds], self.max_draft + 1)
        # 3. Draft token i from logits after token i-1; rows stop at their own num_draft. Greedy
        #    rows take the argmax (what their one-hot distribution would sample); only sampled
        #    rows pay for a distribution over the vocabulary, and only theirs is written. Each
        #    token's log-probability (the sampled distribution's, or the temperature-1 softmax's
        #    on greedy rows) adds to its row's running score. All of it stays on the device.
        total = torch.zeros(len(rows), dtype=torch.float64, device=device)  # [B] cumulative log-probability
        score_grid = torch.zeros(len(rows), depth, dtype=torch.float64, device=device)  # [B, depth]
        for i in range(depth):
            step_live, step_sampled, step_buffer, sampled_buffer, step_next = on_device[5 * i: 5 * i + 5]
            step_logits = logits[:, 0].float()  # [b, V]
            tokens = step_logits.argmax(-1)  # [b] long, first index on ties
            logp = step_logits.gather(-1, tokens[:, None])[:, 0] - torch.logsumexp(step_logits, -1)  # [b]
            if sampled[i]:
                who = [live[i][n] for n in sampled[i]]  # host row numbers of the sampled rows
                probs = probs_from_logits(logits[step_sampled], temperature[who], top_k[who], top_p[who])[:, 0]  # [s, V]
                uniforms = draw_uniforms([states[j].generator for j in who], 1, device)[:, 0]  # [s]
                picked = sample(probs, uniforms)  # [s]
                tokens[step_sampled] = picked
                logp[step_sampled] = probs.gather(-1, picked[:, None])[:, 0].log()
                out_probs[sampled_buffer, i] = probs
            out_tokens[step_buffer, i] = tokens
            total.index_add_(0, step_live, logp.double().clamp(max=0.0))  # log p <= 0: scores fall along a row
            score_grid[step_live, i] = total[step_live]
            if i + 1 == depth:
                break
            logits = feed_batch(self.model, self.cache, [states[j] for j in live[i + 1]], [[] for _ in live[i + 1]],
                                [[0] for _ in live[i + 1]], 1, tail=tokens[step_next, None], num_tail=[1] * len(live[i + 1]))
        # 4. The job's one device-to-host read: scores and drafted tokens (exact in float64).
        drafted = out_tokens[all_rows, :depth]  # [B, depth]
        host = torch.cat((score_grid, drafted.double()), 1).tolist()
        for j, (state, d) in enumerate(zip(states, num_draft)):
            scores[j].extend(host[j][:d])
            state.cached.extend(int(t) for t in host[j][depth: depth + d - 1])  # fed: all drafts but the last


@dataclass(frozen=True)
class DraftOutcome:
    num_kept: list[int]  # per row, in job order: the leading drafts to verify
    scores: list[list[float]]  # per row: cumulative draft log-probability at each drafted position
    is_sampled: list[bool]  # per row: its draft distributions were written (sampled rows only)


def select_positions(scores: list[list[float]], capacity: int | None) -> list[int]:
    """TETRIS selection: keep the `capacity` best-scored drafted positions across the batch and
    return how many leading positions each row keeps. A row's scores never rise (each adds a
    log-probability <= 0) and ties go to the earlier position, then to the earlier row, so what
    a row keeps is always a prefix. capacity None keeps everything."""
    if capacity is None:
        return [len(s) for s in scores]
    ranked = sorted(((-score, j, i) for i, row in enumerate(scores) for j, score in enumerate(row)))
    num_kept = [0] * len(scores)
    for _, _, i in ranked[:max(0, capacity)]:
        num_kept[i] += 1
    return num_kept
