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
# Until the drafter has seen outcomes: how often the verify's bonus token, every kept draft
# accepted, is the draft's own likeliest token (a chain's guess), as a prior worth
# GUESS_PRIOR_WEIGHT outcomes. The Qwen pair: 47 of 48 (tools/correction_guess.py); SSD reports ~90%.
GUESS_PRIOR = 0.9
GUESS_PRIOR_WEIGHT = 10
# Corrections a branch may guess at each kept draft: the draft's likeliest tokens other than that
# draft. Along the Qwen pair's greedy outputs, where the draft's first choice is not the target's
# its second is at 56 % of the positions and its third at 22 % more (tools/correction_guess.py).
NUM_ALTS = 2
NO_ALT = ((-1, float("-inf")),) * NUM_ALTS  # alternatives not known


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
    alts: list[tuple[tuple[int, float], ...]]


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
    # per token: the draft's NUM_ALTS likeliest tokens other than it there (where a branch
    # guesses the correction; -1 unknown), each with its draft log-probability, and the
    # branches pre-drafted beside or instead of the chain (greedy rows)
    alts: list[tuple[tuple[int, float], ...]] = None
    branches: list[Branch] = field(default_factory=list)

    def __post_init__(self):
        if self.draw_states is None:
            self.draw_states = [None] * len(self.tokens or [])
        if self.alts is None:
            self.alts = [NO_ALT] * len(self.tokens or [])

    @property
    def num_normal(self) -> int:
        """Leading tokens drafted by a draft job (the rest were pre-drafted after its result)."""
        return len(self.tokens) - self.num_predrafted


@dataclass
class _Path:
    """An outcome the drafter pre-drafts for row `row` of a job: its chain (`at` None) or the
    branch at `at` (Branch, once its scratch slot is given)."""

    weight: float  # its likelihood as the draft sees it
    row: int
    at: int | None = None
    correction: int = -1  # a branch's guess of the verify's correction at `at`
    branch: Branch | None = None
    is_extra: bool = False  # beyond the row's likeliest outcome: budgeted, and the first to stop


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
        self.guess_outcomes = [0, 0]  # greedy rows whose kept drafts were all accepted: [bonus == the chain's guess, all]

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
        row's), a miss (0) or nothing pre-drafted for it at all (-1). The chain is None
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
        if chain.guess >= 0 and state.params.is_greedy and n == chain.guess + 1 and \
                new[:chain.guess] == chain.tokens[:chain.guess]:  # every kept draft accepted: was the bonus guessed?
            self.guess_outcomes[0] += new[chain.guess] == chain.tokens[chain.guess]
            self.guess_outcomes[1] += 1
        is_match = (0 < n <= len(chain.tokens) and chain.tokens[:n] == new and n > chain.guess
                    and n >= chain.num_normal and chain.num_predrafted > 0)
        was_predrafted = bool(chain.num_predrafted or chain.branches)
        code = int(is_match) if was_predrafted else -1
        if not is_match:
            self._rewind(chain, state, 0)
            found = self._take_branch(chain, state, new)
            return found if found[0] is not None else (None, 0 if was_predrafted else -1)
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
            return None, 0
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

    def _new_chain(self, row: JobRow, state, scores: list[float], alts: list[tuple], served: Chain | None,
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
        """Draft on, while the verifier checks the drafts of `rows` (the job just answered,
        num_kept[i] of row i's drafts verified), along the outcomes _choose_paths picks: a
        row's chain (up to one whole next step past its kept drafts, kept + 1 + max_draft
        tokens) and its branches (up to 1 + max_draft). One forward a round over every path
        still growing, until window_s has passed (a forward is not started that would end
        after it, and where forwards run slower than estimated the least likely extra paths
        stop first) or should_stop() says a job waits.
        The token at the bonus position is the draft's likeliest (the outcome's likeliest
        bonus, on sampled rows too); every other is drawn as a draft is. -> (forwards run,
        tokens drafted)."""
        start = time.perf_counter()
        chains = [self.chains.get(r.request_id) for r in rows]
        states = [self.table.requests.get(r.request_id) for r in rows]
        paths = self._choose_paths(chains, states, num_kept, window_s)
        num_forwards = num_tokens = 0
        forwards_left = lambda path: self._forwards_left(path, chains, states, num_kept)  # noqa: E731
        while True:
            paths = [p for p in paths if forwards_left(p) > 0]
            if not paths or should_stop():
                break
            left = window_s - (time.perf_counter() - start)
            while (any(p.is_extra for p in paths)
                   and self.schedule_estimate([forwards_left(p) for p in paths]) > left):
                paths.remove(min((p for p in paths if p.is_extra), key=lambda p: p.weight))
            if not paths or (self.forward_estimate(len(paths)) or 0.0) > left:  # none: the likeliest ones are done
                break
            live = [p.row for p in paths if p.branch is None]
            growing = [p.branch for p in paths if p.branch is not None]
            begin = time.perf_counter()
            # A chain's last token; an empty chain (its row waited, _rows_to_wait): the tokens
            # committed since its slot was fed, the last of which is followed by the bonus's guess.
            feeds = [[chains[i].tokens[-1]] if chains[i].tokens else states[i].tokens_to_feed(self.cache)
                     for i in live] + [[b.tokens[-1]] for b in growing]
            logits = feed_batch(self.model, self.cache, [states[i] for i in live] + [b.state for b in growing], feeds,
                                [[len(f) - 1] for f in feeds], self.max_draft + 1)[:, 0].float()  # [b, V]
            tokens = logits.argmax(-1)  # [b]
            log_norm = torch.logsumexp(logits, -1)  # [b]
            logp = logits.gather(-1, tokens[:, None])[:, 0] - log_norm  # [b]
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
            alts, alt_logp = other_likeliest(logits, tokens, log_norm)  # [b, NUM_ALTS] each
            host_tokens, host_logp = tokens.tolist(), logp.double().clamp(max=0.0).tolist()
            host_alts = [tuple(zip(a, lp)) for a, lp in zip(alts.tolist(), alt_logp.double().tolist())]
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

    def schedule_estimate(self, forwards: list[int]) -> float:
        """Seconds of pre-drafting paths that need forwards[p] forwards each, all growing in
        the same forwards (each forward's rows: the paths not yet done), at the timed
        forwards' estimates; inf before a forward has been timed."""
        total = 0.0
        for depth in range(max(forwards, default=0)):
            estimate = self.forward_estimate(sum(f > depth for f in forwards))
            if estimate is None:
                return float("inf")
            total += estimate
        return total

    @property
    def guess_rate(self) -> float:
        """How often a greedy row's bonus token, every kept draft accepted, was the draft's
        likeliest (a chain's guess), with GUESS_PRIOR as GUESS_PRIOR_WEIGHT outcomes."""
        hits, checked = self.guess_outcomes
        return (hits + GUESS_PRIOR * GUESS_PRIOR_WEIGHT) / (checked + GUESS_PRIOR_WEIGHT)

    def _forwards_left(self, path: _Path, chains: list[Chain | None], states, num_kept: list[int]) -> int:
        """Forwards `path` may still grow: a chain to its limit (kept + 1 + max_draft tokens), a
        branch (opened or not yet) to 1 + max_draft tokens; either within the cache's max_len."""
        if path.at is not None:
            branch = path.branch
            tokens, cached = (1, chains[path.row].base + path.at) if branch is None else \
                (len(branch.tokens), len(branch.state.cached))
            return max(0, min(1 + self.max_draft - tokens, self.cache.max_len - 2 - cached))
        chain, state, kept = chains[path.row], states[path.row], num_kept[path.row]
        if not chain.num_normal <= kept <= len(chain.tokens):
            return 0
        return max(0, min(kept + 1 + self.max_draft - len(chain.tokens),
                          self.cache.max_len - 1 - len(state.known) - len(chain.tokens)))

    def _choose_paths(self, chains: list[Chain | None], states, num_kept: list[int], window_s: float) -> list[_Path]:
        """The outcomes to pre-draft, each weighed by its likelihood as the draft sees it. A
        greedy row's outcomes: its chain, every kept draft accepted and the bonus the draft's
        likeliest token (P(the kept drafts) x guess_rate), and NUM_ALTS branches per kept draft
        j, the drafts before j accepted and the correction one of the draft's likeliest other
        tokens at j (P(the drafts before j) x P(that token)). A sampled row has its chain only (a
        branch's drafts would need the chain's draws).
        Every row gets its likeliest outcome (a branch only where the cache has a free slot,
        else its chain), and the window decides how far it grows. More outcomes, the likeliest
        first, while a forward stays within max_predraft_rows rows, the cache has free slots,
        and the forwards of all the paths chosen fit the window at the timed forwards'
        estimates (so none before a forward has been timed, unless the window is unbounded).
        A chosen branch gets its scratch slot here: a copy of the row's cells up to it."""
        chosen: list[_Path] = []
        extras: list[_Path] = []
        free = self.cache.num_free  # slots for branches
        for i, (chain, state) in enumerate(zip(chains, states)):
            if chain is None or state is None or not chain.num_normal <= num_kept[i] <= len(chain.tokens):
                continue
            is_greedy = chain.probs is None and state.params.is_greedy and not chain.branches
            outcomes = [_Path(weight, i, at, correction) for weight, at, correction in
                        weigh_outcomes(chain.scores, chain.alts, num_kept[i], self.guess_rate, is_greedy)]
            best = outcomes[0] if outcomes[0].at is None or free else next(p for p in outcomes if p.at is None)
            free -= best.at is not None
            chosen.append(best)
            extras.extend(p for p in outcomes if p is not best)
        forwards = lambda path: self._forwards_left(path, chains, states, num_kept)  # noqa: E731
        for path in sorted(extras, key=lambda p: -p.weight):
            if len(chosen) >= self.max_predraft_rows:
                break
            if (path.at is not None and not free) or \
                    self.schedule_estimate([forwards(p) for p in chosen + [path]]) > window_s:
                continue
            path.is_extra = True
            chosen.append(path)
            free -= path.at is not None
        for path in chosen:
            if path.at is not None:
                chain, state = chains[path.row], states[path.row]
                slot = self.cache.alloc()
                length = chain.base + path.at  # the row's cells for its committed tokens and the chain's first `at`
                self.cache.copy_prefix(state.slot, slot, length)
                path.branch = Branch(path.at, RequestState(slot, state.params, state.generator,
                                                           cached=state.cached[:length]),
                                     [path.correction], [0.0], [NO_ALT])
                chain.branches.append(path.branch)
        return chosen

    def _draft(self, rows: list[JobRow], states, is_sampled: list[bool], out_tokens: torch.Tensor,
               out_probs: torch.Tensor, scores: list[list[float]], chains: list[Chain | None],
               alts: list[list[tuple]] | None) -> None:
        """The buffers live on the drafter's device (out_tokens, out_probs as in draft()). A row
        with a chain takes its first drafts from it and drafts the rest on from its end. Each
        row's scores and, unless None, alts (other_likeliest at each drafted position: token and
        log-probability) are extended."""
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
        alt_grid = None if alts is None else torch.full((len(rows), max(depth, 1), NUM_ALTS), -1, dtype=torch.long,
                                                        device=device)  # [B, depth, NUM_ALTS]
        alt_score_grid = None if alts is None else torch.full((len(rows), max(depth, 1), NUM_ALTS), float("-inf"),
                                                              dtype=torch.float64, device=device)  # [B, depth, NUM_ALTS]
        for j, (chain, p) in enumerate(zip(chains, preset)):
            if p:
                score_grid[j, :p] = torch.tensor(chain.scores[:p], dtype=torch.float64)
                if alt_grid is not None:
                    alt_grid[j, :p] = torch.tensor([[a for a, _ in at] for at in chain.alts[:p]], dtype=torch.long)
                    alt_score_grid[j, :p] = torch.tensor([[lp for _, lp in at] for at in chain.alts[:p]],
                                                         dtype=torch.float64)
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
            log_norm = torch.logsumexp(step_logits, -1)  # [b]
            logp = step_logits.gather(-1, tokens[:, None])[:, 0] - log_norm  # [b]
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
                alt_grid[step_live, step_cols], alt_logp = other_likeliest(step_logits, tokens, log_norm)
                alt_score_grid[step_live, step_cols] = alt_logp.double()
            total.index_add_(0, step_live, logp.double().clamp(max=0.0))  # log p <= 0: scores fall along a row
            score_grid[step_live, step_cols] = total[step_live]
            if i + 1 == new_depth:
                break
            logits = feed_batch(self.model, self.cache, [states[j] for j in live[i + 1]], [[] for _ in live[i + 1]],
                                [[0] for _ in live[i + 1]], 1, tail=tokens[step_next, None], num_tail=[1] * len(live[i + 1]))
        # 4. The job's one device-to-host read: scores and drafted tokens (exact in float64).
        drafted = out_tokens[all_rows, :depth]  # [B, depth]
        grids = [score_grid[:, :depth], drafted.double()] + ([] if alt_grid is None else [
            alt_grid[:, :depth].flatten(1).double(), alt_score_grid[:, :depth].flatten(1)])
        host = torch.cat(grids, 1).tolist()
        for j, (state, d, p) in enumerate(zip(states, num_draft, preset)):
            scores[j].extend(host[j][:d])
            if alts is not None:
                width = depth * NUM_ALTS
                found, found_logp = host[j][2 * depth: 2 * depth + width], host[j][2 * depth + width:]
                alts[j].extend(tuple((int(found[c * NUM_ALTS + r]), found_logp[c * NUM_ALTS + r]) for r in range(NUM_ALTS))
                               for c in range(d))
            if num_new[j]:  # fed: the chain's last served token (by feed_batch), the new drafts but the last
                state.cached.extend(int(t) for t in host[j][depth + p: depth + d - 1])


def other_likeliest(logits: torch.Tensor, tokens: torch.Tensor, log_norm: torch.Tensor,
                    n: int = NUM_ALTS) -> tuple[torch.Tensor, torch.Tensor]:
    """[b, V] logits, [b] chosen tokens, [b] logsumexp of the logits (the caller's, already
    computed for the chosen tokens' log-probabilities) -> ([b, n] the n likeliest tokens other
    than the chosen one, likeliest first (a branch's guesses of the verify's correction where
    the chosen draft is rejected), [b, n] their log-probabilities at temperature 1)."""
    values, indices = logits.topk(n + 1, -1)  # [b, n + 1] each
    other = indices != tokens[:, None]
    keep = other & (other.cumsum(-1) <= n)  # n per row: the chosen token is at most one of the n + 1
    logp = values - log_norm[:, None]
    return indices[keep].view(-1, n), logp[keep].view(-1, n)


def weigh_outcomes(scores: list[float], alts: list[tuple], kept: int, guess_rate: float,
                   with_branches: bool = True) -> list[tuple[float, int | None, int]]:
    """A row's outcomes after a step that kept `kept` drafts, as the draft weighs them, likeliest
    first (the chain first on a tie): (weight, None, -1) for its chain, every kept draft
    accepted and the bonus the draft's likeliest token, P(the kept drafts) x guess_rate; and,
    with_branches, (weight, j, token) for each known correction guess `token` at kept draft j
    (alts[j]), the drafts before it accepted, P(the drafts before j) x P(token). scores: the
    cumulative draft log-probability of each draft."""
    outcomes = [(math.exp(scores[kept - 1] if kept else 0.0) * guess_rate, None, -1)]
    if with_branches:
        outcomes += [(math.exp((scores[j - 1] if j else 0.0) + alt_logp), j, alt)
                     for j in range(kept) for alt, alt_logp in alts[j] if alt >= 0]
    return sorted(outcomes, key=lambda o: -o[0])


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
