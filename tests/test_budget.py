"""The draft budget: TETRIS selection (workers/drafter.select_positions) and the drafter's scores,
the scheduler's plan per step, and the adaptive controller (runtime/budget.py) driving the real
scheduler core on a fake clock against modelled step costs."""

import math
import random

import pytest
import torch

from minedraft.runtime.budget import AcceptanceFit, CostFit, DraftBudget
from minedraft.common.config import load_config
from minedraft.common.protocol import (
    DraftJob, DraftResult, GenerateRequest, PrefillJob, PrefillResult, VerifyJob, VerifyResult,
)
from minedraft.common.protocol import DRAFTER, VERIFIER
from minedraft.runtime.scheduler import SchedulerCore
from minedraft.runtime.tokenizer import ByteTokenizer
from minedraft.common.protocol import JobRow
from minedraft.workers.drafter import Drafter, select_positions

# ---------------------------------------------------------------- selection


def test_selection_respects_capacity_and_keeps_the_best_prefixes():
    rng = random.Random(0)
    for _ in range(200):
        scores = []
        for _ in range(rng.randint(1, 6)):
            steps = [math.log(rng.uniform(0.05, 1.0)) for _ in range(rng.randint(0, 7))]
            scores.append([sum(steps[: j + 1]) for j in range(len(steps))])
        total = sum(map(len, scores))
        capacity = rng.randint(0, total + 3)
        kept = select_positions(scores, capacity)
        assert sum(kept) == min(capacity, total)
        assert all(0 <= k <= len(s) for k, s in zip(kept, scores))
        inside = [s[j] for s, k in zip(scores, kept) for j in range(k)]  # a prefix of each row
        outside = [s[j] for s, k in zip(scores, kept) for j in range(k, len(s))]
        assert not inside or not outside or min(inside) >= max(outside)


def test_selection_ties_go_to_earlier_positions_then_rows():
    flat = [[-1.0, -1.0, -1.0], [-1.0, -1.0]]
    assert select_positions(flat, 2) == [1, 1]  # both first positions before any second one
    assert select_positions(flat, 3) == [2, 1]
    assert select_positions([[0.0, 0.0], [-0.5]], 2) == [2, 0]  # certain drafts first, in order


def test_selection_rows_without_room_and_no_capacity():
    assert select_positions([[], [-0.1, -0.2], []], 5) == [0, 2, 0]
    assert select_positions([[], []], 3) == [0, 0]
    assert select_positions([[-0.1, -0.2], [-3.0]], None) == [2, 1]  # e = 0: verify everything drafted
    assert select_positions([[-0.1, -0.2], [-3.0]], 0) == [0, 0]


# ---------------------------------------------------------------- the drafter's scores


def test_drafter_scores_are_the_cumulative_draft_log_probs_and_selection_keeps_drafts():
    from minedraft.workers.model.loader import TinySpec, load_decoder, tiny_hf_model
    from minedraft.workers.sampling import SamplingParams

    model = load_decoder("tiny-llama", torch.float32, tiny=TinySpec(seed=0))
    reference = tiny_hf_model("tiny-llama", TinySpec(seed=0))
    prompts = [[5, 17, 99, 200, 3], [42, 8, 8, 1]]
    params = [SamplingParams(), SamplingParams(temperature=0.3, top_k=50, seed=7)]
    outcomes, drafts = [], []
    for capacity in (None, 5):
        drafter = Drafter(model, max_slots=4, max_len=64, max_draft=6, dtype=torch.float32)
        tokens, probs = torch.zeros(2, 6, dtype=torch.long), torch.zeros(2, 6, 512)
        rows = [JobRow(f"r{i}", p, 6, i, params[i]) for i, p in enumerate(prompts)]
        outcomes.append(drafter.draft(rows, tokens, probs, capacity))
        drafts.append((tokens.clone(), probs.clone()))
    (tokens, probs), (full, tetris) = drafts[0], outcomes
    assert torch.equal(tokens, drafts[1][0])  # the selection changes what is verified, not what is drafted
    assert full.num_kept == [6, 6] and tetris.num_kept == select_positions(full.scores, 5) and sum(tetris.num_kept) == 5
    with torch.no_grad():  # greedy row: the temperature-1 softmax of the draft model's own tokens
        logits = reference(torch.tensor([prompts[0] + tokens[0].tolist()])).logits[0]
    logp = torch.log_softmax(logits.double(), -1)[torch.arange(4, 10), tokens[0]]
    assert full.scores[0] == pytest.approx(logp.cumsum(0).tolist(), abs=1e-4)
    sampled = probs[1, torch.arange(6), tokens[1]].double().log()  # sampled row: its processed distribution
    assert full.scores[1] == pytest.approx(sampled.cumsum(0).tolist(), abs=1e-6)
    assert all(a >= b for row in full.scores for a, b in zip(row, row[1:]))


# ---------------------------------------------------------------- the plan in the scheduler


def core(mode: str, *overrides: str, clock=None) -> SchedulerCore:
    config = load_config("tiny", [f"scheduler.mode={mode}", *overrides])
    kwargs = {"clock": clock} if clock is not None else {}
    return SchedulerCore(config, ByteTokenizer(), vocab_size=512, max_len=512, eos_token_ids=[257], **kwargs)


def add(s: SchedulerCore, request_id: str, max_tokens: int = 64, num_prompt: int = 4) -> None:
    s.add_request(b"c", GenerateRequest(request_id=request_id, prompt_ids=list(range(1, num_prompt + 1)),
                                        max_tokens=max_tokens))


def test_fixed_without_extra_draft_is_plain_sd():
    s = core("sd")
    add(s, "a")
    add(s, "b", max_tokens=3)  # room for 2 drafts
    draft = dict(s.next_jobs())[DRAFTER]
    assert draft.capacity is None and [r.num_draft for r in draft.rows] == [4, 2]
    s.on_draft_result(DraftResult(0, 2, 0.0, 1.0, [4, 2], [[-0.1] * 4, [-0.2] * 2]))
    verify = dict(s.next_jobs())[VERIFIER]
    assert [r.num_draft for r in verify.rows] == [4, 2]


def test_tetris_drafts_deeper_and_verifies_the_kept_lengths():
    s = core("sd", "scheduler.extra_draft=3")
    for i in range(3):
        add(s, f"r{i}", max_tokens=2 if i == 2 else 64)  # r2 has room for one draft
    draft = dict(s.next_jobs())[DRAFTER]
    assert [r.num_draft for r in draft.rows] == [7, 7, 1]
    assert draft.capacity == 4 + 4 + 1  # what plain SD at k = 4 would verify
    s.on_draft_result(DraftResult(0, 3, 0.0, 1.0, [6, 2, 1], [[-0.01 * j for j in range(1, 8)], [-1, -2, -3, -4, -5, -6, -7], [-0.5]]))
    verify = next(j for role, j in s.next_jobs() if isinstance(j, VerifyJob))
    assert [r.num_draft for r in verify.rows] == [6, 2, 1]
    s.on_verify_result(VerifyResult(0, [[9] * 7, [9], [9, 9]], 1.0, 2.0))
    st = s.status()
    assert st["num_draft_tokens"] == 15 and st["num_drafted"] == 9 and st["num_accepted"] == 6 + 0 + 1
    assert st["tokens_per_verified_position"] == pytest.approx((7 + 3) / (9 + 3))
    assert st["draft_budget"]["policy"] == "fixed" and st["extra_draft"] == 3


# ---------------------------------------------------------------- the fits


def test_cost_fit_recovers_a_linear_cost_and_stays_non_negative():
    fit = CostFit(("job", "per_forward", "per_position"))
    rng = random.Random(1)
    for _ in range(40):
        depth, rows = rng.randint(1, 8), rng.randint(1, 16)
        fit.add((1.0, depth, rows * depth), 0.002 + 0.03 * depth + 0.004 * rows * depth)
    assert fit.predict((1.0, 5, 40)) == pytest.approx(0.002 + 0.15 + 0.16, rel=1e-3)
    flat = CostFit(("job", "per_position"))
    for positions in (8, 16, 24, 40):  # a cost that falls with work is fitted as flat, never negative
        flat.add((1.0, positions), 0.1 - 0.0001 * positions)
    assert all(c >= 0 for c in flat.to_dict()["coef"].values())


def test_acceptance_fit_learns_the_rate_by_draft_probability_and_is_monotone():
    fit, rng = AcceptanceFit(), random.Random(2)
    for _ in range(3000):  # a draft that is over-confident: true acceptance is half its probability
        prob = rng.uniform(0.05, 1.0)
        fit.add_row([math.log(prob)], int(rng.random() < prob / 2))
    assert fit(math.log(0.97)) == pytest.approx(0.48, abs=0.08)
    assert fit(math.log(0.35)) == pytest.approx(0.17, abs=0.08)
    curve = fit.curve()
    assert all(a >= b for a, b in zip(curve, curve[1:]))


# ---------------------------------------------------------------- the controller on a fake clock


class Model:
    """Modelled step costs and a calibrated draft: request i drafts each token with probability
    probs[i % len(probs)] and it is accepted with that probability, so P(first j accepted) =
    exp(score_j)."""

    def __init__(self, draft, verify, probs):
        self.draft, self.verify, self.probs = draft, verify, probs  # draft(rows, depth), verify(positions)

    def true_rate(self, mode: str, probs: list[float], rooms: list[int], depth: int, capacity: int) -> float:
        scores = sorted((prob ** j for prob, room in zip(probs, rooms) for j in range(1, min(depth, room) + 1)),
                        reverse=True)
        tokens = len(probs) + sum(scores[:capacity])
        t_draft = self.draft(sum(1 for r in rooms if min(depth, r) > 0), depth) if depth else 0.0005
        t_verify = self.verify(len(probs) + capacity)
        return tokens / (t_draft + t_verify if mode == "sd" else max(t_draft, t_verify))

    def best_rate(self, mode: str, probs: list[float], rooms: list[int], max_depth: int) -> tuple[float, int, int]:
        return max((self.true_rate(mode, probs, rooms, d, c), d, c) for d in range(max_depth + 1)
                   for c in range(0 if d == 0 else 1, sum(min(d, r) for r in rooms) + 1))


def simulate(mode: str, model: Model, num_requests: int, num_steps: int = 40) -> SchedulerCore:
    """Run the real scheduler core against fake workers whose jobs take the model's time."""
    clock = {"now": 0.0}
    s = core(mode, "scheduler.draft_policy=adaptive", "scheduler.extra_draft=4", clock=lambda: clock["now"])
    for i in range(num_requests):
        add(s, f"r{i}", max_tokens=250, num_prompt=20)
    prob_of = {f"r{i}": model.probs[i % len(model.probs)] for i in range(num_requests)}
    rng, pending, num_verified = random.Random(3), [], 0
    while num_verified < num_steps:
        for role, job in s.next_jobs():
            start = clock["now"]
            if isinstance(job, DraftJob):
                drafting = [r for r in job.rows if r.num_draft > 0]
                depth = max((r.num_draft for r in drafting), default=0)
                scores = [[j * math.log(prob_of[r.request_id]) for j in range(1, r.num_draft + 1)] for r in job.rows]
                end = start + (model.draft(len(drafting), depth) if drafting else 0.0005)
                result = DraftResult(job.batch_id, len(job.rows), start, end, select_positions(scores, job.capacity), scores)
            elif isinstance(job, VerifyJob):
                emitted = []
                for r in job.rows:
                    accepted = 0
                    while accepted < r.num_draft and rng.random() < prob_of[r.request_id]:
                        accepted += 1
                    emitted.append([100] * (accepted + 1))
                end = start + model.verify(sum(1 + r.num_draft for r in job.rows))
                result = VerifyResult(job.batch_id, emitted, start, end)
            else:
                assert isinstance(job, PrefillJob)
                end = start + 0.05
                result = PrefillResult(len(job.rows), start, end)
            pending.append((end, result))
        pending.sort(key=lambda e: e[0])
        clock["now"], result = pending.pop(0)
        if isinstance(result, DraftResult):
            s.on_draft_result(result)
        elif isinstance(result, VerifyResult):
            s.on_verify_result(result)
            num_verified += 1
        else:
            s.on_prefill_result(result)
    return s


def chosen_vs_best(s: SchedulerCore, mode: str, model: Model) -> tuple[float, float, tuple]:
    batch = s.batches[0]
    rooms = [r.room(s.max_len) for r in batch.requests]
    probs = [model.probs[int(r.request_id[1:]) % len(model.probs)] for r in batch.requests]
    plan = s.budget.best_plan(rooms)
    best = model.best_rate(mode, probs, rooms, s.max_depth)
    return model.true_rate(mode, probs, rooms, plan.depth, plan.capacity), best[0], (plan, best)


MIXED = [0.97, 0.9, 0.8, 0.7, 0.5, 0.35, 0.2, 0.1]


def test_memory_bound_verify_and_good_drafts_draft_deep_and_verify_all():
    """A GPU-like target: a checked position is nearly free, so every drafted position pays."""
    model = Model(lambda rows, depth: 0.002 * depth, lambda positions: 0.040 + 0.00005 * positions, MIXED)
    s = simulate("sd", model, 8)
    chosen, best, (plan, optimum) = chosen_vs_best(s, "sd", model)
    assert plan.depth >= 6 and chosen >= 0.97 * best, (plan, optimum)
    assert s.status()["draft_budget"]["predicted_tokens_per_s"] > 0


def test_compute_bound_verify_and_poor_drafts_switch_speculation_off_in_sd():
    """A CPU-like target: each checked position costs almost a token, and the draft is poor."""
    model = Model(lambda rows, depth: 0.010 * depth + 0.003 * rows * depth, lambda positions: 0.005 + 0.012 * positions,
                  [0.3, 0.2, 0.1, 0.05])
    s = simulate("sd", model, 8)
    chosen, best, (plan, optimum) = chosen_vs_best(s, "sd", model)
    assert optimum[1] == 0 and plan.depth == 0 and plan.capacity == 0, (plan, optimum)
    assert s.status()["draft_budget"]["depth"] in (0, 1)  # off, or the periodic depth-1 probe


@pytest.mark.parametrize("mode", ["sd", "psd"])
def test_compute_bound_verify_with_mixed_drafts_picks_the_modelled_optimum(mode):
    """In between: TETRIS's choice matters, and in psd drafting must stay behind verification."""
    model = Model(lambda rows, depth: 0.001 + 0.002 * depth + 0.0005 * rows * depth,
                  lambda positions: 0.030 + 0.002 * positions, MIXED)  # optimum: sd (2, 9), psd (8, 16)
    s = simulate(mode, model, 8 if mode == "sd" else 16, num_steps=60)
    chosen, best, (plan, optimum) = chosen_vs_best(s, mode, model)
    assert chosen >= 0.97 * best, (plan, optimum)
    assert 0 < plan.capacity < 8 * plan.depth  # some drafted positions are not worth checking


# ---------------------------------------------------------------- through the real processes

BUDGETS = {
    "tetris": ["scheduler.extra_draft=3"],
    "adaptive": ["scheduler.extra_draft=3", "scheduler.draft_policy=adaptive"],
}


@pytest.fixture(scope="module")
def greedy_reference():
    from tests.runtime_utils import reference_outputs
    from tests.test_runtime import workload

    return reference_outputs(workload())


@pytest.mark.parametrize("budget", sorted(BUDGETS))
@pytest.mark.parametrize("mode", ["sd", "psd"])
def test_greedy_equals_reference_with_tetris_and_adaptive(tmp_path, mode, budget, greedy_reference):
    import asyncio

    from tests.runtime_utils import running_daemon, status
    from tests.test_runtime import run_load, workload

    with running_daemon(tmp_path, mode, *BUDGETS[budget]) as (endpoint, _):
        outputs = asyncio.run(run_load(endpoint, workload()))
        st = status(endpoint)
    assert outputs == greedy_reference
    assert st["draft_budget"]["policy"] == ("adaptive" if budget == "adaptive" else "fixed")
    if budget == "tetris":  # drafted deeper than k, verified no more than plain SD would
        assert st["num_draft_tokens"] > st["num_drafted"] > 0


PROMPT = [5, 17, 99, 200, 3, 8]
TEMPERATURE = 0.1  # sharp enough for the chi-square to tell the draft's law from the target's
FAR_NOISE = 0.02  # draft weights = target + noise of the init's own scale: total variation ~0.7 at this temperature
NUM_SAMPLES = 2000


async def sample_first_tokens(endpoint: str, seed_base: int, concurrency: int = 48) -> list[list[int]]:
    """NUM_SAMPLES seeded requests for PROMPT's first 6 tokens at TEMPERATURE."""
    import asyncio

    from minedraft.runtime.client import AsyncClient

    limit = asyncio.Semaphore(concurrency)
    async with AsyncClient(endpoint, timeout_s=120) as client:
        async def one(i: int) -> list[int]:
            async with limit:
                c = await client.generate(prompt_ids=PROMPT, max_tokens=6, temperature=TEMPERATURE,
                                          seed=seed_base + i, ignore_eos=True)
                return c.token_ids
        return await asyncio.gather(*(one(i) for i in range(NUM_SAMPLES)))


def first_two_laws(noise: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The tiny model's law of the first output token and the marginal law of the second."""
    from minedraft.workers.model.loader import TinySpec, tiny_hf_model

    model = tiny_hf_model("tiny-llama", TinySpec(seed=0, noise=noise))
    with torch.no_grad():
        p1 = torch.softmax(model(torch.tensor([PROMPT])).logits[0, -1].double() / TEMPERATURE, -1)  # [V]
        vocab = p1.numel()
        both = torch.cat([torch.tensor(PROMPT).expand(vocab, -1), torch.arange(vocab)[:, None]], 1)  # [V, T+1]
        p2_given_1 = torch.softmax(model(both).logits[:, -1].double() / TEMPERATURE, -1)  # [V, V]
    return p1, p1 @ p2_given_1


@pytest.fixture(scope="module")
def laws():
    return {"target": first_two_laws(0.0), "draft": first_two_laws(FAR_NOISE)}


def test_negative_control_the_draft_law_fails_the_chi_square(laws):
    from tests.test_sampling import chi_square_ok

    g = torch.Generator().manual_seed(0)
    for target, draft in zip(laws["target"], laws["draft"]):
        assert not chi_square_ok(torch.multinomial(draft.float(), NUM_SAMPLES, True, generator=g), target)
        assert chi_square_ok(torch.multinomial(target.float(), NUM_SAMPLES, True, generator=g), target)


@pytest.mark.parametrize("budget", sorted(BUDGETS))
@pytest.mark.parametrize("mode", ["sd", "psd"])
def test_sampled_first_two_tokens_follow_the_target_with_a_far_draft(tmp_path, mode, budget, laws):
    """With a draft far from the target, any leak of the draft's law into the output (a wrong
    acceptance, probabilities of the wrong kept position) fails this test (see the control)."""
    import asyncio

    from tests.runtime_utils import running_daemon, status
    from tests.test_sampling import chi_square_ok

    with running_daemon(tmp_path, mode, f"model.tiny_draft_noise={FAR_NOISE}", *BUDGETS[budget]) as (endpoint, _):
        outputs = asyncio.run(sample_first_tokens(endpoint, 10_000))
        st = status(endpoint)
    tokens = torch.tensor(outputs)  # [N, 6]
    p1, p2 = laws["target"]
    assert chi_square_ok(tokens[:, 0], p1) and chi_square_ok(tokens[:, 1], p2)
    assert 0 < st["acceptance_rate"] < 0.9  # the draft is far, yet some drafts are accepted


def test_adaptive_plan_with_no_room_anywhere_is_plain_decoding():
    budget = DraftBudget("sd", "adaptive", 4, 4)
    for _ in range(8):  # past the warm-up, with fits in place
        budget.observe_draft(8, 4, 0.1)
        budget.observe_verify(40, 0.5)
        budget.plan([10] * 8)
    budget.num_off = 15  # the next step with speculation off would be a depth-1 probe
    plan = budget.plan([0] * 8)
    assert (plan.depth, plan.capacity) == (0, 0)
    assert budget.best_plan([0, 0], depths=[1], min_capacity=2).depth == 0


def fitted_psd_budget(contention: float) -> DraftBudget:
    """A psd budget fitted to modelled costs in which a verify takes `contention` seconds longer
    per second the drafter works alongside it, and to a draft accepted with probability 0.8 per
    token."""
    def draft_s(depth):
        return 0.05 + 0.15 * depth + 0.01 * 8 * depth

    def verify_s(positions):
        return 0.4 + 0.04 * positions

    budget, rng = DraftBudget("psd", "adaptive", 4, 4), random.Random(5)
    for _ in range(64):
        depth, positions = rng.randint(1, 8), rng.randint(8, 60)
        budget.observe_draft(8, depth, draft_s(depth))
        overlap = rng.uniform(0, 1) * min(draft_s(depth), verify_s(positions))
        budget.observe_verify(positions, verify_s(positions) + contention * overlap, overlap)
    scores = [math.log(0.8) * j for j in range(1, 9)]
    budget.observe_scores([scores] * 32)
    for _ in range(400):
        accepted = 0
        while accepted < 8 and rng.random() < 0.8:
            accepted += 1
        budget.observe_accept(scores, accepted)
    return budget


def test_psd_drafts_shallower_when_drafting_slows_the_verifier():
    """Two cores share one memory bus: a drafter working alongside a verify slows it. The fit
    learns that cost from the drafter's busy time during each verify, so psd stops treating
    hidden drafting as free."""
    free, taxed = fitted_psd_budget(0.0), fitted_psd_budget(0.6)
    assert free.verify_cost.to_dict()["coef"]["per_drafter_second"] == pytest.approx(0.0, abs=1e-3)
    assert taxed.verify_cost.to_dict()["coef"]["per_drafter_second"] == pytest.approx(0.6, abs=1e-3)
    assert taxed.best_plan([50] * 8).depth < free.best_plan([50] * 8).depth
