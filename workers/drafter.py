"""The drafter: the draft model, its KV cache and the per-request draft loop.

Drafter is the pure core (driven in-process by the engine and tests); run_drafter_process in
workers/process.py wraps it with sockets. It never decides what is committed: the scheduler does.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch

from minedraft.common.protocol import JobRow
from minedraft.workers.model.kv_cache import KVCache
from minedraft.workers.sampling import (
    DRAFT_SALT, batch_params, draw_uniforms, probs_from_logits, sample,
)
from minedraft.workers.slots import RequestState, SlotTable, feed_batch
from minedraft.workers.model.transfer import index_tensor, to_device_packed


# Rows in one pre-draft forward, chains and branches together: the chains always, branches
# while the count stays within this and the window (below).
MAX_PREDRAFT_ROWS = 8
# Until the drafter has timed forwards of two row counts, what one more row is taken to add to
# a forward, as a share of the one measured (on the 2-core development machine the Qwen 0.5B
# draft's forward took 48 ms at 1 row and 86 ms at 5 on one core, tools/step_profile.py: 0.2 a
# row).
PRIOR_ROW_SHARE = 0.25


@dataclass
class Branch:
    """A shorter outcome pre-drafted beside a greedy row's chain: its first `at` tokens accepted,
    then the verify's correction guessed as `tokens[0]` (the draft's likeliest token other than
    chain.tokens[at], which the correction never is), then drafts from it. Its K/V lives in a
    scratch slot of its own (`state`): a copy of the row's cells up to the chain's position
    `at`, then its tokens but the last. A hit swaps the scratch slot in as the row's slot; any
    other outcome frees it."""

    at: int
    state: RequestState
    tokens: list[int]
    scores: list[float]  # cumulative draft log-probability from tokens[1] (scores[0] = 0: the guess)
    alts: list[int]


@dataclass
class Chain:
    """A request's drafts beyond its committed tokens, in order (pre-drafting): the last job's
    drafts, then what the drafter drafted on after its result while the verifier checked them.
    Its slot holds the K/V of every chain token but the last (cached == known + tokens[:-1]):
    these are the scratch cells, kept when the committed tokens turn out to be the chain's own
    (every kept draft accepted and the bonus token the draft's next one), dropped by the usual
    roll-back otherwise. Valid proposals either way: each token was drawn from the draft's
    distribution given exactly the tokens before it, except the predicted bonus token (`guess`),
    the draft's likeliest token where the verify samples its bonus: it is matched against the
    outcome, never proposed.

    Same output as without pre-drafting: a pre-draft draws the uniforms the next draft job would
    draw (the guess draws none), in the same order, from the request's draft stream; a served
    token is the one that job would have drawn from the same context, and dropping pre-drafted
    tokens rewinds the stream to before the first of them. So whether and how far the drafter
    pre-drafted (a matter of timing) never changes a token, greedy or seeded."""

    base: int  # len(known) when the chain was drafted: tokens[0] is position `base`
    tokens: list[int]
    scores: list[float]  # cumulative draft log-probability from the chain's first token
    probs: torch.Tensor | None  # [n, V] the draft distribution of each token (sampled rows only)
    num_predrafted: int = 0  # tokens drafted after the job's result (the chain's tail)
    guess: int = -1  # index of the predicted bonus token (the draft's argmax, not a sample): never served as a draft
    # per token: the request's draft generator state before the pre-draft drew it (None: not
    # drawn by a pre-draft), so that dropping pre-drafted tokens rewinds the stream
    draw_states: list = None
    # per token: the draft's likeliest token other than it there (where a branch guesses the
    # correction; -1 unknown), and the branches pre-drafted beside the chain (greedy rows)
    alts: list[int] = None
    branches: list[Branch] = field(default_factory=list)

    def __post_init__(self):
        if self.draw_states is None:
            self.draw_states = [None] * len(self.tokens or [])
        if self.alts is None:
            self.alts = [-1] * len(self.tokens or [])

    @property
    def num_normal(self) -> int:
        """Leading tokens drafted by a draft job (the rest were pre-drafted after its result)."""
        return len(self.tokens) - self.num_predrafted


class Drafter:
    def __init__(self, model, max_slots: int, max_len: int, max_draft: int, dtype: torch.dtype, device="cpu"):
        self.model = model
        self.max_draft = max_draft
        self.cache = KVCache(model.config, max_slots, max_len, dtype, device)
        self.table = SlotTable(self.cache, DRAFT_SALT, reclaim=self._drop_all_branches)
        self.chains: dict[str, Chain] = {}  # pre-drafting: request_id -> its chain
        self.forward_times: dict[int, float] = {}  # rows -> running mean of a pre-draft forward's seconds
        self.max_predraft_rows = MAX_PREDRAFT_ROWS
        self.serve_ready = True  # pre-drafting: a step most of whose rows were pre-drafted does not wait for the rest
        self.num_rows_waited = 0  # rows given no drafts by serve_ready (tests)

    def release(self, request_ids: list[str]) -> None:
        self.table.release(request_ids)
        for request_id in request_ids:
            chain = self.chains.pop(request_id, None)
            if chain is not None:
                self._drop_branches(chain)

    def _drop_branches(self, chain: Chain, keep: Branch | None = None) -> None:
        for branch in chain.branches:
            if branch is not keep:
                self.cache.free(branch.state.slot)
        chain.branches = []

    def forward_estimate(self, rows: int) -> float | None:
        """Seconds of a pre-draft forward of `rows` rows, from the ones timed (None: none yet):
        the running mean where that count was timed, else the least-squares line through the
        counts timed (one count: PRIOR_ROW_SHARE of it a row)."""
        times = self.forward_times
        if not times:
            return None
        if rows in times:
            return times[rows]
        if len(times) == 1:
            (count, t), = times.items()
            return max(0.0, t * (1 + PRIOR_ROW_SHARE * (rows - count)))
        mean_r, mean_t = sum(times) / len(times), sum(times.values()) / len(times)
        slope = (sum((r - mean_r) * (t - mean_t) for r, t in times.items())
                 / sum((r - mean_r) ** 2 for r in times))
        return max(0.0, mean_t + max(0.0, slope) * (rows - mean_r))

    def _drop_all_branches(self) -> None:
        """A new request needs a slot: branches are a bet, so they give theirs up first."""
        for chain in self.chains.values():
            self._drop_branches(chain)

    @torch.inference_mode()
    def draft(self, rows: list[JobRow], out_tokens: torch.Tensor, out_probs: torch.Tensor,
              capacity: int | None = None, keep_chains: bool = False) -> DraftOutcome:
        """Draft rows[i].num_draft tokens for each row into out_tokens[row.buffer_row] and, for
        sampled (non-greedy) rows, their draft distributions into out_probs[row.buffer_row].
        Then keep the `capacity` likeliest positions across the batch (TETRIS, select_positions);
        None keeps every drafted position.

        keep_chains (pre-drafting): a row whose committed tokens are its chain's own starts from
        the rest of its chain (no forward for the drafts the chain already holds), and every
        row keeps its drafts as its chain for predraft() to extend. Off, chains are dropped.

        out_tokens [max_batch, max_draft] int64; out_probs [max_batch, max_draft, V] float32.
        """
        scores: list[list[float]] = [[] for _ in rows]
        alts = [[] for _ in rows] if keep_chains else None  # a branch's guesses: only chains need them
        # 1. Apply committed tokens; rows with nothing to draft only record them.
        states = [self.table.commit(r.request_id, r.params, r.new_tokens) for r in rows]
        is_sampled = [not s.params.is_greedy for s in states]
        taken = [self._take_chain(r, s, keep_chains) for r, s in zip(rows, states)]
        chains, hits = [c for c, _ in taken], [h for _, h in taken]
        num_served = [min(len(c.tokens), r.num_draft) if c is not None else 0 for r, c in zip(rows, chains)]
        waiting = self._rows_to_wait(rows, chains, hits, num_served, is_sampled) if keep_chains else set()
        active = [i for i, r in enumerate(rows) if r.num_draft > 0 and i not in waiting]
        if active:
            self._draft([rows[i] for i in active], [states[i] for i in active], [is_sampled[i] for i in active],
                        out_tokens, out_probs, [scores[i] for i in active], [chains[i] for i in active],
                        None if alts is None else [alts[i] for i in active])
        if keep_chains:
            for i, row in enumerate(rows):
                if i in waiting:  # pre-drafted from its next token's guess on (predraft feeds it), while the others' drafts are verified
                    self.chains[row.request_id] = Chain(len(states[i].known), [], [], None)
                elif row.num_draft > 0:
                    self.chains[row.request_id] = self._new_chain(row, states[i], scores[i], alts[i], chains[i],
                                                                  out_tokens, out_probs if is_sampled[i] else None)
                elif chains[i] is not None:  # nothing to draft this step: the chain waits
                    self.chains[row.request_id] = chains[i]
        return DraftOutcome(select_positions(scores, capacity), scores, is_sampled, hits, num_served)

    def _rows_to_wait(self, rows: list[JobRow], chains: list[Chain | None], hits: list[int],
                      num_served: list[int], is_sampled: list[bool]) -> set[int]:
        """Pre-drafting, a step whose rows were mostly pre-drafted does not wait for the others'
        drafting: where every row to draft is either served whole from its chain or a greedy
        row with nothing pre-drafted, and the first are at least as many, the second get no
        drafts this step (the verify gives each one token) and are pre-drafted from that
        token's guess while it runs, so the verify starts at once, with no forward before it.
        Two live requests, one of which missed: the step costs one verify instead of a draft
        job's forwards plus a verify (docs/design.md section 8). Sampled rows always draft:
        their draws must be the ones drafting without pre-drafting would make. -> the rows
        that wait (indices)."""
        if not self.serve_ready:
            return set()
        drafting = [i for i, r in enumerate(rows) if r.num_draft > 0]
        ready = [i for i in drafting if hits[i] > 0 and chains[i] is not None and num_served[i] >= rows[i].num_draft]
        missed = [i for i in drafting if chains[i] is None and not is_sampled[i]]
        if ready and len(ready) >= len(missed) and len(ready) + len(missed) == len(drafting):
            self.num_rows_waited += len(missed)
            return set(missed)
        return set()

    def _take_chain(self, row: JobRow, state, keep_chains: bool) -> tuple[Chain | None, int]:
        """A row's chain with its newly committed tokens consumed, and whether it was a
        pre-draft hit (1: the chain's own outcome; 2: a branch's, whose scratch slot becomes the
        row's), a miss (0) or no pre-drafted chain at all (-1). The chain is None
        when nothing of it can be served (its cells are then rolled back as usual, and its
        pre-drafted draws given back to the stream); else the rest of it, scores counted from
        its new first token. Served are only pre-drafted tokens (a TETRIS tail drafted by the
        job is not: the job after it would have drawn those positions afresh)."""
        chain = self.chains.pop(row.request_id, None)
        if chain is None:
            return None, -1
        if not keep_chains:
            self._drop_branches(chain)
            self._rewind(chain, state, 0)
            return None, -1
        new = state.known[chain.base:]
        n = len(new)
        is_match = (0 < n <= len(chain.tokens) and chain.tokens[:n] == new and n > chain.guess
                    and n >= chain.num_normal)
        code = -1 if not chain.num_predrafted else int(is_match)
        if not is_match:
            self._rewind(chain, state, 0)
            return self._take_branch(chain, state, new)
        self._drop_branches(chain)
        if n == len(chain.tokens):
            return None, code
        base_score = chain.scores[n - 1]
        return Chain(len(state.known), chain.tokens[n:], [s - base_score for s in chain.scores[n:]],
                     None if chain.probs is None else chain.probs[n:], len(chain.tokens) - n,
                     draw_states=chain.draw_states[n:], alts=chain.alts[n:]), code

    def _take_branch(self, chain: Chain, state, new: list[int]) -> tuple[Chain | None, int]:
        """The branch whose outcome the committed tokens `new` are, swapped in as the row's slot
        and turned into its chain (code 2); else every branch freed and (None, 0)."""
        found = next((b for b in chain.branches if len(b.tokens) > 1 and len(new) == b.at + 1
                      and new[b.at] == b.tokens[0] and new[:b.at] == chain.tokens[:b.at]), None)
        self._drop_branches(chain, keep=found)
        if found is None:
            return None, 0 if chain.num_predrafted else -1
        self.cache.free(state.slot)
        state.slot, state.cached = found.state.slot, found.state.cached
        state.num_stable = min(state.num_stable, chain.base + found.at)
        return Chain(len(state.known), found.tokens[1:], found.scores[1:], None, len(found.tokens) - 1,
                     alts=found.alts[1:]), 2

    @staticmethod
    def _rewind(chain: Chain, state, start: int) -> None:
        """Give the pre-drafted draws of chain.tokens[start:] back to the request's stream."""
        for draw_state in chain.draw_states[start:]:
            if draw_state is not None:
                state.generator.set_state(draw_state)
                return

    def _new_chain(self, row: JobRow, state, scores: list[float], alts: list[int], served: Chain | None,
                   out_tokens: torch.Tensor, out_probs: torch.Tensor | None) -> Chain:
        """The row's chain after its job: this step's drafts (or, served entirely from its
        chain, that chain, whose cells beyond this step's drafts stay valid)."""
        n = len(scores)
        if served is not None and len(served.tokens) >= n:
            # Served entirely from the chain: its first n tokens are this job's drafts now (their
            # draws are the ones this job would have made: never given back), the rest stays.
            served.draw_states[:n] = [None] * n
            served.num_predrafted = len(served.tokens) - n
            return served
        tokens = state.cached[len(state.known):] + [int(out_tokens[row.buffer_row, n - 1])]
        assert len(tokens) == n, (len(tokens), n)
        probs = None if out_probs is None else out_probs[row.buffer_row, :n].clone()
        return Chain(len(state.known), tokens, list(scores), probs, 0, alts=list(alts))

    @torch.inference_mode()
    def predraft(self, rows: list[JobRow], num_kept: list[int], window_s: float, should_stop) -> tuple[int, int]:
        """Draft on along the chains of `rows` (the job just answered, num_kept[i] of row i's
        drafts verified) while the verifier checks their drafts: one forward per round over
        every row whose chain is shorter than one whole next step (kept + 1 + max_draft), and
        every branch shorter than 1 + max_draft (see _open_branches), until window_s has passed
        (a forward is not started that would end after it, and branches ride along only where
        the chains' forwards still fit: they never cost a chain a forward) or should_stop() says
        a job waits.
        The token at the bonus position is the draft's likeliest (the outcome's likeliest
        bonus, on sampled rows too); every other is drawn as a draft is. -> (forwards run,
        tokens drafted)."""
        limits = [kept + 1 + self.max_draft for kept in num_kept]
        start = time.perf_counter()
        chains = [self.chains.get(r.request_id) for r in rows]
        states = [self.table.requests.get(r.request_id) for r in rows]
        branches = self._open_branches(chains, states, num_kept, limits, window_s)
        num_forwards = num_tokens = 0
        while True:
            live = [i for i, (c, s) in enumerate(zip(chains, states)) if c is not None and s is not None
                    and c.num_normal <= num_kept[i] <= len(c.tokens) < limits[i]
                    and len(s.known) + len(c.tokens) + 1 < self.cache.max_len]
            growing = [b for b in branches if len(b.tokens) < 1 + self.max_draft
                       and len(b.state.cached) + 2 < self.cache.max_len]
            if not (live or growing) or should_stop():
                break
            left = window_s - (time.perf_counter() - start)
            chain_forwards = max((limits[i] - len(chains[i].tokens) for i in live), default=0)
            if growing and (self.forward_estimate(len(live) + len(growing)) or 0.0) * max(1, chain_forwards) > left:
                growing = []  # the chains' remaining forwards first
            if not (live or growing) or (self.forward_estimate(len(live) + len(growing)) or 0.0) > left:
                break
            begin = time.perf_counter()
            # A chain's last token; an empty chain (its row waited, _rows_to_wait): the tokens
            # committed since its slot was fed, the last of which is followed by the bonus's guess.
            feeds = [[chains[i].tokens[-1]] if chains[i].tokens else states[i].tokens_to_feed(self.cache)
                     for i in live] + [[b.tokens[-1]] for b in growing]
            logits = feed_batch(self.model, self.cache, [states[i] for i in live] + [b.state for b in growing], feeds,
                                [[len(f) - 1] for f in feeds], self.max_draft + 1)[:, 0].float()  # [b, V]
            tokens = logits.argmax(-1)  # [b]
            logp = logits.gather(-1, tokens[:, None])[:, 0] - torch.logsumexp(logits, -1)  # [b]
            guessing = [len(chains[i].tokens) == num_kept[i] for i in live]  # this token is the bonus's guess
            sampled = [n for n, i in enumerate(live) if chains[i].probs is not None]
            probs = None
            draw_states = {}
            if sampled:
                who = [states[live[n]] for n in sampled]
                draw_states = {n: s.generator.get_state() for n, s in zip(sampled, who) if not guessing[n]}
                temperature, top_k, top_p = batch_params([s.params for s in who])
                probs = probs_from_logits(logits[sampled][:, None], temperature, top_k, top_p)[:, 0]  # [s, V]
                drawing = [n for n in sampled if not guessing[n]]  # the guess draws nothing
                picked = probs.argmax(-1)
                if drawing:
                    at = torch.tensor([sampled.index(n) for n in drawing])
                    picked[at] = sample(probs[at], draw_uniforms([states[live[n]].generator for n in drawing], 1,
                                                                 logits.device)[:, 0])
                tokens[sampled] = picked
                logp[sampled] = probs.gather(-1, picked[:, None])[:, 0].log()
            alts = other_likeliest(logits, tokens)
            host_tokens, host_logp, host_alts = tokens.tolist(), logp.double().clamp(max=0.0).tolist(), alts.tolist()
            prob_row = {n: m for m, n in enumerate(sampled)}
            for n, i in enumerate(live):
                chain = chains[i]
                chain.scores.append((chain.scores[-1] if chain.scores else 0.0) + host_logp[n])
                chain.tokens.append(host_tokens[n])
                chain.alts.append(host_alts[n])
                chain.draw_states.append(draw_states.get(n))
                chain.num_predrafted += 1
                if guessing[n]:
                    chain.guess = len(chain.tokens) - 1
                if chain.probs is not None:
                    chain.probs = torch.cat((chain.probs, probs[prob_row[n]][None]))
            for n, branch in enumerate(growing, len(live)):
                branch.scores.append(branch.scores[-1] + host_logp[n])
                branch.tokens.append(host_tokens[n])
                branch.alts.append(host_alts[n])
            num_forwards += 1
            num_tokens += len(feeds)
            took, count = time.perf_counter() - begin, len(feeds)
            before = self.forward_times.get(count)
            self.forward_times[count] = took if before is None else 0.8 * before + 0.2 * took
        return num_forwards, num_tokens

    def _open_branches(self, chains: list[Chain | None], states, num_kept: list[int], limits: list[int],
                       window_s: float) -> list[Branch]:
        """Branches beside the greedy rows' chains, the likeliest outcomes first: one per kept
        draft j, for "drafts before j accepted, draft j rejected, the correction the draft's
        likeliest other token there", its likelihood as the draft sees it P(reach j) x (1 -
        P(draft j)). As many as keep a forward within max_predraft_rows rows, the cache's free
        slots, and the window: the chains' forwards at the estimated time of a forward with the
        branches beside them must fit it (no branch before a forward has been timed)."""
        live = [i for i, (c, s) in enumerate(zip(chains, states)) if c is not None and s is not None
                and c.num_normal <= num_kept[i] <= len(c.tokens)]
        forwards = max((limits[i] - len(chains[i].tokens) for i in live), default=0)
        room = max(0, self.max_predraft_rows - len(live))
        while room and (self.forward_estimate(len(live) + room) or float("inf")) * max(1, forwards) > window_s:
            room -= 1
        if not room:
            return []
        candidates = []
        for i in live:
            chain, state = chains[i], states[i]
            if chain.probs is not None or not state.params.is_greedy or chain.branches:
                continue  # sampled rows: one chain (a branch's drafts would need the chain's draws)
            for j in range(num_kept[i]):
                if chain.alts[j] < 0:
                    continue
                reach = chain.scores[j - 1] if j else 0.0
                weight = math.exp(reach) * -math.expm1(chain.scores[j] - reach)
                candidates.append((-weight, i, j))
        opened = []
        for _, i, j in sorted(candidates)[:room]:
            if not self.cache.num_free:
                break
            chain, state = chains[i], states[i]
            slot = self.cache.alloc()
            length = chain.base + j  # the row's cells for its committed tokens and the chain's first j
            self.cache.copy_prefix(state.slot, slot, length)
            branch = Branch(j, RequestState(slot, state.params, state.generator, cached=state.cached[:length]),
                            [chain.alts[j]], [0.0], [-1])
            chain.branches.append(branch)
            opened.append(branch)
        return opened

    def _draft(self, rows: list[JobRow], states, is_sampled: list[bool], out_tokens: torch.Tensor,
               out_probs: torch.Tensor, scores: list[list[float]], chains: list[Chain | None],
               alts: list[list[int]] | None) -> None:
        """The buffers live on the drafter's device (out_tokens, out_probs as in draft()). A row
        with a chain takes its first drafts from it and drafts the rest on from its end. Each
        row's scores and, unless None, alts (other_likeliest at each drafted position) are
        extended."""
        temperature, top_k, top_p = batch_params([s.params for s in states])  # [B] each, host
        num_draft = [r.num_draft for r in rows]
        preset = [0 if c is None else min(len(c.tokens), d) for c, d in zip(chains, num_draft)]
        num_new = [d - p for d, p in zip(num_draft, preset)]  # drafts the model makes per row
        depth = max(num_draft)
        new_depth = max(num_new)
        device = self.cache.data.device
        for j, (chain, p) in enumerate(zip(chains, preset)):  # the chain's drafts, as drafted
            if p:
                out_tokens[rows[j].buffer_row, :p] = torch.tensor(chain.tokens[:p], dtype=torch.long, device=device)
                if is_sampled[j]:
                    out_probs[rows[j].buffer_row, :p] = chain.probs[:p]
        # 1. Which rows take part in each draft step, decided on the host now (row j drafts
        #    num_new[j] tokens, from column preset[j]), with every step's indices sent to the
        #    device in one copy.
        live = [[j for j in range(len(rows)) if num_new[j] > i] for i in range(new_depth)]
        sampled = [[n for n, j in enumerate(step) if is_sampled[j]] for step in live]  # positions within live
        plan = [[step, sampled[i], [rows[j].buffer_row for j in step], [rows[step[n]].buffer_row for n in sampled[i]],
                 [n for n, j in enumerate(step) if num_new[j] > i + 1], [preset[j] + i for j in step],
                 [preset[step[n]] + i for n in sampled[i]]] for i, step in enumerate(live)]
        on_device = to_device_packed([index_tensor(x) for step in plan for x in step]
                                     + [index_tensor([r.buffer_row for r in rows])], device)
        all_rows = on_device.pop()
        total = torch.zeros(len(rows), dtype=torch.float64, device=device)  # [B] cumulative log-probability
        score_grid = torch.zeros(len(rows), max(depth, 1), dtype=torch.float64, device=device)  # [B, depth]
        alt_grid = None if alts is None else torch.full((len(rows), max(depth, 1)), -1, dtype=torch.long,
                                                        device=device)  # [B, depth]
        for j, (chain, p) in enumerate(zip(chains, preset)):
            if p:
                score_grid[j, :p] = torch.tensor(chain.scores[:p], dtype=torch.float64)
                if alt_grid is not None:
                    alt_grid[j, :p] = torch.tensor(chain.alts[:p], dtype=torch.long)
                total[j] = chain.scores[p - 1]
        if new_depth:
            # 2. Catch up on committed tokens (a chain row: its last chain token); logits after
            #    the last one give the row's next draft.
            feeds = [s.tokens_to_feed(self.cache) if p == 0 else [chains[j].tokens[p - 1]]
                     for j, (s, p) in enumerate(zip(states, preset)) if num_new[j] > 0]
            first = live[0]
            logits = feed_batch(self.model, self.cache, [states[j] for j in first], feeds,
                                [[len(f) - 1] for f in feeds], self.max_draft + 1)
        # 3. Draft token i from logits after token i-1; rows stop at their own num_draft. Greedy
        #    rows take the argmax (what their one-hot distribution would sample); only sampled
        #    rows pay for a distribution over the vocabulary, and only theirs is written. Each
        #    token's log-probability (the sampled distribution's, or the temperature-1 softmax's
        #    on greedy rows) adds to its row's running score. All of it stays on the device.
        for i in range(new_depth):
            step_live, step_sampled, step_buffer, sampled_buffer, step_next, step_cols, sampled_cols = \
                on_device[7 * i: 7 * i + 7]
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
                out_probs[sampled_buffer, sampled_cols] = probs
            out_tokens[step_buffer, step_cols] = tokens
            if alt_grid is not None:
                alt_grid[step_live, step_cols] = other_likeliest(step_logits, tokens)
            total.index_add_(0, step_live, logp.double().clamp(max=0.0))  # log p <= 0: scores fall along a row
            score_grid[step_live, step_cols] = total[step_live]
            if i + 1 == new_depth:
                break
            logits = feed_batch(self.model, self.cache, [states[j] for j in live[i + 1]], [[] for _ in live[i + 1]],
                                [[0] for _ in live[i + 1]], 1, tail=tokens[step_next, None], num_tail=[1] * len(live[i + 1]))
        # 4. The job's one device-to-host read: scores and drafted tokens (exact in float64).
        drafted = out_tokens[all_rows, :depth]  # [B, depth]
        grids = [score_grid[:, :depth], drafted.double()] + ([] if alt_grid is None else [alt_grid[:, :depth].double()])
        host = torch.cat(grids, 1).tolist()
        for j, (state, d, p) in enumerate(zip(states, num_draft, preset)):
            scores[j].extend(host[j][:d])
            if alts is not None:
                alts[j].extend(int(a) for a in host[j][2 * depth: 2 * depth + d])
            if num_new[j]:  # fed: the chain's last served token (by feed_batch), the new drafts but the last
                state.cached.extend(int(t) for t in host[j][depth + p: depth + d - 1])


def other_likeliest(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """[b, V] logits, [b] chosen tokens -> [b] the likeliest token other than the chosen one
    (a branch's guess of the verify's correction where the chosen draft is rejected)."""
    top = logits.topk(2, -1).indices  # [b, 2]
    return torch.where(top[:, 0] == tokens, top[:, 1], top[:, 0])


@dataclass(frozen=True)
class DraftOutcome:
    num_kept: list[int]  # per row, in job order: the leading drafts to verify
    scores: list[list[float]]  # per row: cumulative draft log-probability at each drafted position
    is_sampled: list[bool]  # per row: its draft distributions were written (sampled rows only)
    predraft_hits: list[int] = None  # per row: -1 no pre-drafted chain, 0 a miss, 1 its chain was the outcome, 2 a branch was
    num_served: list[int] = None  # per row: drafts taken from its chain (no forward for them)


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
