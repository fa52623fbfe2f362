"""Pre-drafting (workers/drafter.py Chain, predraft): while the verifier checks a step's drafts,
the drafter drafts on along each row's chain, and a row whose outcome is the chain's own (every
kept draft accepted, the bonus token the draft's next one) starts its next step from it.

The proposals change; the verification does not. In-process (workers/engine.py, predraft=True):
greedy output equals plain decoding's and, where the proposals are the same, even the accepted
counts equal those without pre-drafting; sampled output follows the target's law at the third
token, the first one a pre-drafted chain proposes (k = 1), and a chain served with its
distributions one position off fails the same test (the negative control). Through the
daemon: greedy output is the target's, status counts hits, responses count pre-drafted steps."""

import contextlib
import math

import pytest
import torch

from minedraft.common.request import Request
from minedraft.workers.drafter import NO_ALT, Drafter, other_likeliest
from minedraft.workers.engine import Engine
from minedraft.workers.model.loader import TinySpec, decoder_from_hf, tiny_hf_model
from minedraft.workers.sampling import SamplingParams
from tests.test_budget import FAR_NOISE, PROMPT
from tests.test_engine import draft_model, make_requests
from tests.test_sampling import chi_square_ok

NUM_SAMPLES = 20_000


def new_drafter(target, max_slots: int = 2) -> Drafter:
    return Drafter(target, max_slots=max_slots, max_len=64, max_draft=4, dtype=torch.float32)


def draft_buffers(target) -> tuple[torch.Tensor, torch.Tensor]:
    """A draft job's token and distribution buffers (2 rows, depth 4)."""
    return torch.zeros(2, 4, dtype=torch.long), torch.zeros(2, 4, target.config.vocab_size)


def drafting(request_id: str = "r", prompt: list[int] = PROMPT, max_tokens: int = 30, **params) -> Request:
    """A request drafting 4 tokens a step (params: its SamplingParams, if not greedy)."""
    request = Request(request_id, prompt, max_tokens=max_tokens, **params)
    request.num_draft = 4
    return request


@contextlib.contextmanager
def counting_forwards(model):
    """Count the model's forwards inside the block: yields the list each call appends to."""
    calls = []
    original = model.forward
    model.forward = lambda *args, **kwargs: calls.append(1) or original(*args, **kwargs)
    try:
        yield calls
    finally:
        model.forward = original


@pytest.fixture(scope="module")
def target():
    return decoder_from_hf(tiny_hf_model("tiny-llama", TinySpec(seed=0)))


def run(target, draft, requests: list[Request], predraft: bool, num_draft: int = 4, max_batch: int = 6,
        max_len: int = 128, serve_ready: bool = True) -> tuple[dict, Engine]:
    engine = Engine(target, draft, mode="sd", num_draft=num_draft, max_batch=max_batch, max_len=max_len,
                    predraft=predraft)
    engine.drafter.serve_ready = serve_ready
    for r in requests:
        engine.add_request(r)
    return engine.run(), engine


@pytest.mark.parametrize("kind", ["same", "noisy", "unrelated"])
def test_greedy_output_equals_plain_decoding_with_predrafting(target, kind):
    draft = draft_model(kind)
    reference = Engine(target, mode="ar", max_batch=6, max_len=128)
    for r in make_requests():
        reference.add_request(r)
    expected = {k: r.output_ids for k, r in reference.run().items()}
    got, engine = run(target, draft, make_requests(), True)
    assert {k: r.output_ids for k, r in got.items()} == expected
    if kind == "same":  # the draft is the target: every chain is the outcome
        assert engine.predraft_hits["hits"] >= 0.9 * engine.predraft_hits["checked"] > 10
    if kind == "noisy":  # chains and branches both serve some steps, and rows wait for the rest's verify
        hits = engine.predraft_hits
        assert 0 < hits["hits"] and 0 < hits["branch_hits"] and hits["hits"] + hits["branch_hits"] < hits["checked"]
        assert hits["drafts_served"] >= 2 * (hits["hits"] + hits["branch_hits"])
        assert engine.drafter.num_rows_waited > 0


def test_greedy_proposals_are_the_ones_drafted_without_predrafting(target):
    """On a hit (a chain's or a branch's) the served drafts are what the drafter would have
    drafted after the outcome: every request takes as many steps and accepts as many drafts as
    without pre-drafting."""
    draft = draft_model("noisy")
    without, _ = run(target, draft, make_requests(), False)
    # Rows that wait for a mostly pre-drafted step's verify (serve_ready) get other proposals: off here.
    with_predraft, engine = run(target, draft, make_requests(), True, serve_ready=False)
    assert engine.predraft_hits["hits"] > 0 and engine.predraft_hits["branch_hits"] > 0
    for request_id, r in without.items():
        other = with_predraft[request_id]
        assert other.output_ids == r.output_ids
        assert (other.num_steps, other.num_drafted, other.num_accepted) == (r.num_steps, r.num_drafted, r.num_accepted)


def seeded(temperature: float) -> list[Request]:
    return [Request(r.request_id, r.prompt_ids, r.max_tokens, SamplingParams(temperature, 0, 1.0, 1000 + i), frozenset())
            for i, r in enumerate(make_requests())]


@pytest.mark.parametrize("temperature", [0.03, 0.8])
@pytest.mark.parametrize("forwards", [1, 3, None])
def test_seeded_sampled_output_is_the_same_with_and_without_predrafting(target, temperature, forwards):
    """A pre-draft draws what the next draft job would, and a miss gives its draws back: the
    same seeded tokens whether the drafter pre-drafted a whole step, a few forwards (its window
    ended) or not at all."""
    draft = draft_model("noisy")
    without, _ = run(target, draft, seeded(temperature), False)
    engine = Engine(target, draft, mode="sd", num_draft=4, max_batch=6, max_len=128, predraft=True)
    if forwards is not None:  # stop each pre-draft after this many forwards, as a short window would
        predraft = engine.drafter.predraft
        def cut(rows, num_kept, window_s, should_stop):
            calls = []
            return predraft(rows, num_kept, window_s, lambda: calls.append(1) or len(calls) > forwards)
        engine.drafter.predraft = cut
    for r in seeded(temperature):
        engine.add_request(r)
    with_predraft = engine.run()
    hits = engine.predraft_hits
    assert hits["checked"] > hits["hits"], hits  # misses: draws given back
    if temperature < 0.1:  # sharp: the likeliest bonus is often the one, and its chain is served
        assert hits["hits"] > 0 and (forwards == 1 or hits["drafts_served"] > 0), hits
    assert {k: r.output_ids for k, r in with_predraft.items()} == {k: r.output_ids for k, r in without.items()}


def test_a_served_chain_needs_no_forward_and_its_cells_stay(target):
    """The draft is the target: after a pre-draft the next step's drafts come from the chain,
    no model call is made for them, and the slot already holds their K/V."""
    drafter = new_drafter(target)
    tokens, probs = draft_buffers(target)
    row = drafting()
    first = drafter.draft([row.row("drafter")], tokens, probs, keep_chains=True)
    drafts = tokens[0].tolist()
    drafter.predraft([row.row("drafter")], [4], float("inf"), lambda: False)
    chain = drafter.chains["r"]
    assert chain.tokens[:4] == drafts and len(chain.tokens) == 9 and chain.num_predrafted == 5
    assert first.predraft_hits == [-1]
    row.commit(chain.tokens[:5])  # every draft accepted, the bonus the chain's fifth token
    with counting_forwards(target) as calls:
        second = drafter.draft([row.row("drafter")], tokens, probs, keep_chains=True)
    assert not calls and second.predraft_hits == [1] and second.num_served == [4]
    assert tokens[0].tolist() == chain.tokens[5:9]
    state = drafter.table.requests["r"]
    assert state.cached == state.known + chain.tokens[5:8]


def test_a_missed_chain_is_rolled_back_and_drafting_goes_on_as_usual(target):
    drafter = new_drafter(target)
    plain = new_drafter(target)
    tokens, probs = draft_buffers(target)
    a, b = drafting(), drafting()
    drafter.draft([a.row("drafter")], tokens, probs, keep_chains=True)
    plain.draft([b.row("drafter")], tokens, probs)
    drafter.predraft([a.row("drafter")], [4], float("inf"), lambda: False)
    outcome = [tokens[0, 0].item(), (tokens[0, 1].item() + 1) % target.config.vocab_size]  # rejected at 2
    a.commit(outcome)
    b.commit(outcome)
    missed = drafter.draft([a.row("drafter")], tokens, probs, keep_chains=True)
    expected = tokens.clone()
    plain.draft([b.row("drafter")], expected, probs)
    assert missed.predraft_hits == [0] and missed.num_served == [0]
    assert tokens[0].tolist() == expected[0].tolist()
    assert drafter.table.requests["r"].cached == plain.table.requests["r"].cached


def test_a_row_that_missed_beside_a_served_one_waits_for_the_verify_and_is_predrafted(target):
    """Two rows, one served whole from its chain and one that missed: the step needs no forward
    (the missed row keeps no drafts, so the verify starts at once), the missed row is pre-drafted
    from the guess of its next token while the verify runs, and when the guess is the outcome
    its next drafts are served: the ones a drafter without pre-drafting drafts there."""
    drafter, plain = new_drafter(target), new_drafter(target)
    tokens, probs = draft_buffers(target)
    a, b = drafting("a"), drafting("b", prompt=[7, 3, 9, 4, 1])
    b_plain = drafting("b", prompt=[7, 3, 9, 4, 1])
    b.buffer_row = 1
    drafter.draft([a.row("drafter"), b.row("drafter")], tokens, probs, keep_chains=True)
    plain.draft([b_plain.row("drafter")], torch.zeros_like(tokens), probs)
    drafter.predraft([a.row("drafter"), b.row("drafter")], [4, 4], float("inf"), lambda: False)
    chain_a, chain_b = drafter.chains["a"], drafter.chains["b"]
    a.commit(chain_a.tokens[:5])  # every draft accepted, the bonus the chain's: a hit
    missed = [chain_b.tokens[0], (chain_b.tokens[1] + 1) % target.config.vocab_size]  # rejected at 2
    b.commit(missed)
    b_plain.commit(missed)
    with counting_forwards(target) as calls:
        step = drafter.draft([a.row("drafter"), b.row("drafter")], tokens, probs, keep_chains=True)
    assert not calls and step.predraft_hits == [1, 0] and step.num_kept == [4, 0] and drafter.num_rows_waited == 1
    assert drafter.chains["b"].tokens == []
    b.num_draft = 0  # as the scheduler records the kept drafts
    drafter.predraft([a.row("drafter"), b.row("drafter")], step.num_kept, float("inf"), lambda: False)
    chain_b = drafter.chains["b"]
    assert len(chain_b.tokens) == 5 and chain_b.guess == 0  # the next token's guess, then a whole step
    b.commit(chain_b.tokens[:1])  # the verify's one token for b: the guess
    b_plain.commit(chain_b.tokens[:1])
    b.num_draft = 4
    served = drafter.draft([b.row("drafter")], tokens, probs, keep_chains=True)
    expected = torch.zeros_like(tokens)
    plain.draft([b_plain.row("drafter")], expected, probs)
    assert served.predraft_hits == [1] and served.num_served == [4]
    assert tokens[1].tolist() == expected[0].tolist() == chain_b.tokens[1:5]
    # Off (serve_ready False) the missed row drafts as before.
    drafter.serve_ready = False
    assert drafter._rows_to_wait([a.row("drafter"), b.row("drafter")], [chain_a, None], [1, 0], [4, 0],
                                 [False, False]) == set()


def test_predraft_stops_when_a_job_waits_and_at_its_window(target):
    drafter = new_drafter(target, 1)  # no free slot for a branch: the chain alone (branches: below)
    tokens, probs = draft_buffers(target)
    row = drafting()
    job_row = row.row("drafter")
    drafter.draft([job_row], tokens, probs, keep_chains=True)
    polls = []
    assert drafter.predraft([job_row], [4], float("inf"), lambda: polls.append(1) or len(polls) > 2) == (2, 2)
    assert drafter.predraft([job_row], [4], 0.0, lambda: False) == (0, 0)  # no time: no forward
    assert drafter.predraft([job_row], [4], float("inf"), lambda: False) == (3, 3)  # up to its limit
    assert len(drafter.chains["r"].tokens) == 9


# ------------------------------------------------------------------ sampled: the target's law

# Sharp enough that the draft's likeliest token is often the target's sampled bonus, so most
# third tokens are verified from a served chain (with the near draft); the far draft's law
# still fails the test (the control below).
SHARP = 0.03
NEAR_NOISE = 0.003


def first_three_laws(noise: float, temperature: float = SHARP, min_mass: float = 1e-9):
    """The tiny model's laws of the first output token and the marginal laws of the second and
    third (the third summed over every first-two prefix with mass above min_mass)."""
    model = tiny_hf_model("tiny-llama", TinySpec(seed=0, noise=noise))
    prompt = torch.tensor(PROMPT)
    with torch.no_grad():
        p1 = torch.softmax(model(prompt[None]).logits[0, -1].double() / temperature, -1)  # [V]
        vocab = p1.numel()
        both = torch.cat([prompt.expand(vocab, -1), torch.arange(vocab)[:, None]], 1)  # [V, T+1]
        p2_given_1 = torch.softmax(model(both).logits[:, -1].double() / temperature, -1)  # [V, V]
        pairs = p1[:, None] * p2_given_1  # [V, V]
        a, b = torch.nonzero(pairs > min_mass, as_tuple=True)
        three = torch.cat([prompt.expand(len(a), -1), a[:, None], b[:, None]], 1)  # [P, T+2]
        p3_given = torch.softmax(model(three).logits[:, -1].double() / temperature, -1)  # [P, V]
    p3 = (pairs[a, b][:, None] * p3_given).sum(0)
    return p1, p1 @ p2_given_1, p3 / p3.sum()


class OffByOneDrafter(Drafter):
    """The negative control: a chain's distributions one position behind its tokens."""

    def _take_chain(self, row, state, keep_chains):
        chain = self.chains.get(row.request_id)
        if chain is not None and chain.probs is not None and len(chain.tokens) > 1:
            chain.probs = torch.roll(chain.probs, 1, 0)
        return super()._take_chain(row, state, keep_chains)


def sample_three(target, draft, drafter_cls=Drafter) -> tuple[torch.Tensor, dict]:
    """NUM_SAMPLES seeded requests for PROMPT's first three tokens at SHARP, k = 1, in one
    batch: step 1 drafts token 1, step 2 (room for one draft: max_tokens 4) token 3, which a
    hit serves from the chain pre-drafted in step 1."""
    engine = Engine(target, draft, mode="sd", num_draft=1, max_batch=NUM_SAMPLES, max_len=16, eos_token_ids=(),
                    predraft=True)
    if drafter_cls is not Drafter:
        engine.drafter = drafter_cls(draft, NUM_SAMPLES, 16, 1, torch.float32)
    for i in range(NUM_SAMPLES):
        engine.add_request(Request(f"s{i}", list(PROMPT), 4, SamplingParams(SHARP, 0, 1.0, 50_000 + i), frozenset()))
    finished = engine.run()
    return torch.tensor([finished[f"s{i}"].output_ids[:3] for i in range(NUM_SAMPLES)]), engine.predraft_hits


@pytest.fixture(scope="module")
def drafts():
    return {noise: decoder_from_hf(tiny_hf_model("tiny-llama", TinySpec(seed=0, noise=noise)))
            for noise in (NEAR_NOISE, FAR_NOISE)}


@pytest.fixture(scope="module")
def laws():
    return {"target": first_three_laws(0.0), "far": first_three_laws(FAR_NOISE)}


def test_negative_control_the_far_drafts_law_fails_the_third_token_chi_square(laws):
    g = torch.Generator().manual_seed(0)
    target = laws["target"][2]
    assert not chi_square_ok(torch.multinomial(laws["far"][2].float(), NUM_SAMPLES, True, generator=g), target)
    assert chi_square_ok(torch.multinomial(target.float(), NUM_SAMPLES, True, generator=g), target)


@pytest.mark.parametrize("noise, min_served", [(NEAR_NOISE, NUM_SAMPLES // 2), (FAR_NOISE, 0)])
def test_sampled_tokens_follow_the_target_with_predrafting(target, drafts, laws, noise, min_served):
    """Near draft: most third tokens are verified from a served chain. Far draft: chains
    miss, are rolled back, and drafting goes on (its own law would fail: the control above)."""
    tokens, hits = sample_three(target, drafts[noise])
    assert hits["drafts_served"] >= min_served and hits["checked"] >= NUM_SAMPLES, hits
    for position in range(3):
        assert chi_square_ok(tokens[:, position], laws["target"][position]), position


def test_negative_control_a_chain_served_with_shifted_distributions_fails(target, drafts, laws):
    tokens, hits = sample_three(target, drafts[NEAR_NOISE], OffByOneDrafter)
    assert hits["drafts_served"] >= NUM_SAMPLES // 2, hits
    assert chi_square_ok(tokens[:, 0], laws["target"][0])  # before any chain is served
    assert not chi_square_ok(tokens[:, 2], laws["target"][2])


# ------------------------------------------------------------------ through the daemon

def test_daemon_greedy_output_is_the_targets_with_predrafting_and_status_counts_it(tmp_path):
    import asyncio

    from tests.runtime_utils import reference_outputs, running_daemon, status
    from tests.test_runtime import run_load, workload

    requests = workload(6)
    with running_daemon(tmp_path, "sd", "scheduler.predraft=true") as (endpoint, _):
        outputs = asyncio.run(run_load(endpoint, requests))
        st = status(endpoint, is_detailed=True)
    assert outputs == reference_outputs(requests)
    predraft = st["predraft"]
    full, short = predraft["branches"]["full"], predraft["branches"]["short"]
    assert predraft["num_jobs"] > 0 and predraft["num_tokens"] > 0 and predraft["busy_s"] > 0
    assert full["checked"] > 0 and full["hits"] + short["hits"] <= full["checked"] == short["checked"]
    assert any(j["kind"] == "predraft" and j["role"] == "drafter" for j in st["recent_jobs"])
    from minedraft.runtime.cli import format_predraft

    line = format_predraft(predraft)
    assert f"{full['hits'] + short['hits']} of {full['checked']} steps found their drafts ready" in line
    assert f"{full['hits']} all accepted + the likeliest bonus, {short['hits']} a shorter branch" in line
    assert format_predraft({**predraft, "num_jobs": 0, "branches": {"full": {**full, "checked": 0}}}) == ""


def test_daemon_responses_count_their_predrafted_steps(tmp_path):
    from minedraft.runtime.client import Client
    from tests.runtime_utils import running_daemon

    with running_daemon(tmp_path, "sd", "scheduler.predraft=true") as (endpoint, _):
        with Client(endpoint) as client:
            done = client.generate(prompt_ids=PROMPT, max_tokens=40, ignore_eos=True)
    assert done.metrics["num_predrafted_steps"] >= 0 and done.metrics["num_steps"] > 0
    assert done.metrics["num_predrafted_steps"] <= done.metrics["num_steps"]


# ------------------------------------------------------------------ where it is on

@pytest.mark.parametrize("mode, overrides, is_on", [
    ("sd", [], True),  # tiny: drafter on core 0, verifier on core 1
    ("psd", [], True),
    ("sd", ["drafter.cpu_cores=[0,1]", "verifier.cpu_cores=[0,1]"], False),  # shared cores
    ("sd", ["drafter.cpu_cores=[]"], False),  # an unpinned drafter may run on the verifier's core
    ("sd", ["scheduler.predraft=false"], False),
    ("ar", [], False),
    ("auto", ["drafter.cpu_cores=[0,1]", "verifier.cpu_cores=[0,1]"], True),  # auto places each job
])
def test_predrafting_is_on_only_where_the_drafter_has_hardware_of_its_own(mode, overrides, is_on):
    from minedraft.common.protocol import GenerateRequest
    from tests.test_plans import core

    s = core(mode, *overrides)
    status = s.status()["predraft"]
    assert status["is_on"] == is_on and (status["off_reason"] is None) == is_on, status
    from minedraft.runtime.cli import format_predraft
    assert format_predraft(status).startswith("off: ") == (not is_on and mode != "ar")  # the status line says why
    if mode == "sd":  # the draft job says whether to keep chains and draft on
        s.add_request(b"c", GenerateRequest(request_id="r", prompt_ids=list(range(1, 13)), max_tokens=20))
        (role, job), = [j for j in s.next_jobs() if j[0] == "drafter"]
        assert (job.predraft_s is not None) == is_on


def test_workers_share_a_device():
    from minedraft.common.config import load_config, workers_share_a_device

    def shares(*overrides):
        return workers_share_a_device(load_config("tiny", list(overrides)))

    assert not shares() and shares("drafter.cpu_cores=[1]") and shares("verifier.cpu_cores=[]")
    assert not shares("drafter.device=cuda:0", "drafter.cpu_cores=[1]")  # a GPU beside the CPU
    assert shares("drafter.device=cuda", "verifier.device=cuda:0")
    assert not shares("drafter.device=cuda:0", "verifier.device=cuda:1")


# ------------------------------------------------------------------ branches (shorter outcomes)

def test_a_served_branch_needs_no_forward_and_drafting_goes_on_from_its_cells(target):
    """Beside the chain, a greedy row gets two branches per kept draft j: drafts before j
    accepted, the correction guessed as the draft's second or third choice. When that is the
    outcome, the branch's drafts are served with no model call, they are what plain drafting
    drafts after the same outcome, its scratch slot becomes the row's, and every other scratch
    slot is given back; drafting on from those cells matches plain drafting."""
    drafter = new_drafter(target, 10)
    drafter.max_predraft_rows = 9  # the chain and a branch for each of the 2 likeliest other tokens at each draft
    plain = new_drafter(target, 8)
    tokens, probs = draft_buffers(target)
    expected = torch.zeros_like(tokens)
    a, b = drafting(max_tokens=40), drafting(max_tokens=40)
    drafter.draft([a.row("drafter")], tokens, probs, keep_chains=True)
    plain.draft([b.row("drafter")], expected, probs)
    assert drafter.predraft([a.row("drafter")], [4], float("inf"), lambda: False) == (5, 5 + 8 * 4)
    chain = drafter.chains["r"]
    assert sorted(br.at for br in chain.branches) == [0, 0, 1, 1, 2, 2, 3, 3]
    assert drafter.cache.num_free == 10 - 1 - 8
    second_choice, third_choice = (alt for alt, _ in chain.alts[2])
    assert sorted(br.tokens[0] for br in chain.branches if br.at == 2) == sorted([second_choice, third_choice])
    branch = next(br for br in chain.branches if br.at == 2 and br.tokens[0] == third_choice)
    assert third_choice != chain.tokens[2] and len(branch.tokens) == 5
    outcome = chain.tokens[:2] + [branch.tokens[0]]  # drafts 1-2 accepted, the correction the third choice
    a.commit(outcome)
    b.commit(outcome)
    with counting_forwards(target) as calls:
        second = drafter.draft([a.row("drafter")], tokens, probs, keep_chains=True)
    plain.draft([b.row("drafter")], expected, probs)
    assert not calls and second.predraft_hits == [2] and second.num_served == [4]
    assert tokens[0].tolist() == branch.tokens[1:] == expected[0].tolist()
    state = drafter.table.requests["r"]
    assert state.slot == branch.state.slot and state.cached == state.known + branch.tokens[1:4]
    assert drafter.cache.num_free == 9  # the row's old slot and the other branches' given back
    outcome = tokens[0, :2].tolist() + [(tokens[0, 2].item() + 1) % target.config.vocab_size]  # rejected at 3
    a.commit(outcome)
    b.commit(outcome)
    third = drafter.draft([a.row("drafter")], tokens, probs, keep_chains=True)
    plain.draft([b.row("drafter")], expected, probs)
    assert third.predraft_hits == [-1] and tokens[0].tolist() == expected[0].tolist()


def test_a_new_request_takes_a_branch_slot_and_the_branch_is_dropped(target):
    drafter = new_drafter(target, 3)
    tokens, probs = draft_buffers(target)
    a = drafting(max_tokens=40)
    drafter.draft([a.row("drafter")], tokens, probs, keep_chains=True)
    drafter.predraft([a.row("drafter")], [4], float("inf"), lambda: False)
    chain = drafter.chains["r"]
    assert len(chain.branches) == 2 and drafter.cache.num_free == 0
    branch = chain.branches[0]
    other = drafting("s", PROMPT[:5], max_tokens=10)
    drafter.draft([other.row("drafter")], tokens, probs, keep_chains=True)  # needs a slot: the branches give theirs
    assert not chain.branches and drafter.cache.num_free == 1
    a.commit(chain.tokens[:branch.at] + [branch.tokens[0]])
    assert drafter.draft([a.row("drafter")], tokens, probs, keep_chains=True).predraft_hits == [0]


def test_sampled_rows_get_no_branches(target):
    drafter = new_drafter(target, 8)
    tokens, probs = draft_buffers(target)
    a = drafting(max_tokens=40, params=SamplingParams(0.8, 0, 1.0, 7))
    drafter.draft([a.row("drafter")], tokens, probs, keep_chains=True)
    drafter.predraft([a.row("drafter")], [4], float("inf"), lambda: False)
    assert not drafter.chains["r"].branches and drafter.cache.num_free == 7


def weighed_chain(target, alt_probs: list[float], slots: int = 8, times: dict[int, float] | None = None):
    """A drafter and a greedy row's job of 4 drafts whose likelihoods, as the drafter weighs
    outcomes, are set by hand: drafts 1-4 at 0.9, 0.8, 0.7, 0.6 cumulative (all kept drafts
    accepted: 0.6, times the guess's prior rate 0.9 = 0.54 for the chain) and the draft's
    likeliest other token at j at alt_probs[j] (branch j: P(drafts before j) x alt_probs[j])."""
    drafter = new_drafter(target, slots)
    drafter.forward_times = dict(times or {})
    row = drafting(max_tokens=40)
    drafter.draft([row.row("drafter")], *draft_buffers(target), keep_chains=True)
    chain = drafter.chains["r"]
    chain.scores = [math.log(p) for p in (0.9, 0.8, 0.7, 0.6)]
    chain.alts = [((alts[0][0], math.log(p)), NO_ALT[1]) for alts, p in zip(chain.alts, alt_probs)]  # no third choice
    return drafter, row, chain


def test_each_row_predrafts_its_likeliest_outcome_and_more_where_the_window_has_room(target):
    """Outcomes are weighed by the draft's own likelihoods: the chain P(every kept draft) x
    the guess's rate, branch j P(drafts before j) x P(the correction guess). A row always gets
    its likeliest; more, the likeliest first, where their forwards (the chain 5, a branch 4, at
    the timed forwards' estimates, a row beside one adding PRIOR_ROW_SHARE) fit the window, none
    before a forward has been timed but for an unbounded window."""
    alt_probs = [0.05, 0.1, 0.05, 0.3]  # branch weights 0.05, 0.09, 0.04, 0.21; the chain 0.54

    def opened(window_s: float, times: dict[int, float], rows: int = 8) -> list[int]:
        drafter, row, chain = weighed_chain(target, alt_probs, times=times)
        drafter.max_predraft_rows = rows
        drafter.predraft([row.row("drafter")], [4], window_s, lambda: True)  # chooses, runs no forward
        return [b.at for b in chain.branches]

    assert opened(10.0, {}) == [] and opened(float("inf"), {}) == [3, 1, 0, 2]
    assert opened(5.0, {1: 1.0}) == []  # the chain's 5 forwards fill it
    assert opened(6.0, {1: 1.0}) == [3]  # 4 forwards of 2 rows (1.25) + 1 of one
    assert opened(7.0, {1: 1.0}) == [3, 1]
    assert opened(7.0, {1: 1.0, 2: 1.0, 3: 1.0, 4: 1.0, 5: 1.0}) == [3, 1, 0, 2]  # timed: a row costs nothing
    assert opened(float("inf"), {1: 1.0}, rows=2) == [3]
    drafter = new_drafter(target)
    drafter.forward_times = {1: 0.05, 5: 0.09}
    assert drafter.forward_estimate(3) == pytest.approx(0.07) and drafter.forward_estimate(5) == 0.09
    assert drafter.schedule_estimate([5, 4]) == pytest.approx(4 * 0.06 + 0.05)
    assert new_drafter(target).schedule_estimate([2]) == float("inf")


def test_a_likelier_branch_is_predrafted_instead_of_the_chain(target):
    """Where a shorter outcome is likelier than the chain's (0.7 x 0.95 against 0.54), a row
    with room for one path grows that branch alone: the chain drafts nothing on, and when the
    outcome is the branch's its drafts are served with no forward. Without a free slot for the
    branch the row grows its chain."""
    drafter, row, chain = weighed_chain(target, [0.05, 0.1, 0.05, 0.95], times={1: 1.0})
    assert drafter.predraft([row.row("drafter")], [4], 4.5, lambda: False) == (4, 4)
    assert chain.num_predrafted == 0 and [b.at for b in chain.branches] == [3]
    branch = chain.branches[0]
    assert len(branch.tokens) == 5
    row.commit(chain.tokens[:3] + [branch.tokens[0]])
    tokens, probs = draft_buffers(target)
    with counting_forwards(target) as calls:
        served = drafter.draft([row.row("drafter")], tokens, probs, keep_chains=True)
    assert not calls and served.predraft_hits == [2] and tokens[0].tolist() == branch.tokens[1:]
    # A miss of a row that pre-drafted only a branch counts as a miss (0), not as nothing pre-drafted.
    drafter, row, chain = weighed_chain(target, [0.05, 0.1, 0.05, 0.95], times={1: 1.0})
    drafter.predraft([row.row("drafter")], [4], 4.5, lambda: False)
    row.commit(chain.tokens[:1] + [(chain.tokens[1] + 1) % target.config.vocab_size])
    assert drafter.draft([row.row("drafter")], tokens, probs, keep_chains=True).predraft_hits == [0]
    # One slot, the row's own: no branch, the chain grows.
    drafter, row, chain = weighed_chain(target, [0.05, 0.1, 0.05, 0.95], slots=1, times={1: 1.0})
    assert drafter.predraft([row.row("drafter")], [4], 5.5, lambda: False) == (5, 5)
    assert chain.num_predrafted == 5 and not chain.branches


def test_predrafting_stops_when_only_extra_paths_are_left_and_the_window_is_short(target):
    """A row's likeliest outcome (here a branch, 4 forwards) can finish before an extra one
    (the chain, 5): when the window then has no room for the extra, it is dropped and the
    pre-draft ends, with no forward of no rows (in the daemon: the drafter failed with
    "max() arg is an empty sequence" and every request after it got runtime_dead)."""
    drafter, row, chain = weighed_chain(target, [0.05, 0.1, 0.05, 0.95])
    drafter.max_predraft_rows = 2  # the branch and the chain
    drafter.forward_estimate = lambda rows: 0.0
    drafter.schedule_estimate = lambda forwards: 0.0 if len(forwards) > 1 else 1e9  # no room for one path alone
    assert drafter.predraft([row.row("drafter")], [4], 10.0, lambda: False) == (4, 8)
    assert [b.at for b in chain.branches] == [3] and len(chain.branches[0].tokens) == 5
    assert chain.num_predrafted == 4  # the extra grew beside the branch, then stopped


def test_the_guess_rate_is_learned_from_outcomes_where_every_kept_draft_was_accepted(target):
    drafter, row, chain = weighed_chain(target, [0.05] * 4, slots=1)
    assert drafter.guess_rate == pytest.approx(0.9)
    tokens, probs = draft_buffers(target)
    drafter.predraft([row.row("drafter")], [4], float("inf"), lambda: False)
    row.commit(drafter.chains["r"].tokens[:5])  # every draft accepted, the bonus the guess
    drafter.draft([row.row("drafter")], tokens, probs, keep_chains=True)
    assert drafter.guess_outcomes == [1, 1]
    drafter.predraft([row.row("drafter")], [4], float("inf"), lambda: False)
    chain = drafter.chains["r"]
    row.commit(chain.tokens[:4] + [(chain.tokens[4] + 1) % target.config.vocab_size])  # the bonus another token
    drafter.draft([row.row("drafter")], tokens, probs, keep_chains=True)
    assert drafter.guess_outcomes == [1, 2]
    assert drafter.guess_rate == pytest.approx((1 + 9) / (2 + 10))
    row.commit(tokens[0, :1].tolist() + [(tokens[0, 1].item() + 1) % target.config.vocab_size])  # rejected at 2
    drafter.draft([row.row("drafter")], tokens, probs, keep_chains=True)
    assert drafter.guess_outcomes == [1, 2]  # not an outcome of the guess


def test_other_likeliest_skips_the_chosen_token_wherever_it_ranks():
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0]] * 3)
    tokens, logp = other_likeliest(logits, torch.tensor([0, 1, 3]), torch.logsumexp(logits, -1), 2)
    assert tokens.tolist() == [[1, 2], [0, 2], [0, 1]]  # chosen first, second, beyond the top 3
    assert logp[0].tolist() == pytest.approx(torch.log_softmax(logits[0], -1)[[1, 2]].tolist())
