"""The scheduler core driven directly (no processes): the verifier caches a new prompt while the
drafter drafts it, and the verify then sends only what the verifier has not seen."""

import pytest

from minedraft.common.config import load_config
from minedraft.common.protocol import (
    DraftJob, DraftResult, GenerateRequest, PrefillJob, PrefillResult, VerifyJob, VerifyResult,
)
from minedraft.common.protocol import DRAFTER, VERIFIER
from minedraft.runtime.scheduler import MIN_PREFILL_TOKENS, SchedulerCore
from minedraft.runtime.tokenizer import ByteTokenizer


def core(mode: str, *overrides: str) -> SchedulerCore:
    config = load_config("tiny", [f"scheduler.mode={mode}", *overrides])
    return SchedulerCore(config, ByteTokenizer(), vocab_size=512, max_len=256, eos_token_ids=[257])


def request(request_id: str, num_prompt: int) -> GenerateRequest:
    return GenerateRequest(request_id=request_id, prompt_ids=list(range(1, num_prompt + 1)), max_tokens=8)


def test_idle_verifier_prefills_while_the_drafter_drafts():
    s = core("sd")
    s.add_request(b"c", request("long", MIN_PREFILL_TOKENS + 12))
    s.add_request(b"c", request("short", MIN_PREFILL_TOKENS - 1))
    jobs = dict(s.next_jobs())
    draft, prefill = jobs[DRAFTER], jobs[VERIFIER]
    assert isinstance(draft, DraftJob) and isinstance(prefill, PrefillJob)
    (row,) = prefill.rows  # the short prompt is left to its verify
    assert row.request_id == "long" and len(row.new_tokens) == MIN_PREFILL_TOKENS + 12 and row.params is not None
    s.on_draft_result(DraftResult(draft.batch_id, len(draft.rows), 0.0, 1.0))
    assert s.next_jobs() == []  # the drafted batch waits for the busy verifier
    s.on_prefill_result(PrefillResult(1, 0.0, 1.5))
    ((role, verify),) = [j for j in s.next_jobs() if j[0] == VERIFIER]
    assert isinstance(verify, VerifyJob)
    rows = {r.request_id: r for r in verify.rows}
    assert rows["long"].new_tokens == [] and rows["long"].params is None  # the verifier has the prompt
    assert len(rows["short"].new_tokens) == MIN_PREFILL_TOKENS - 1 and rows["short"].params is not None
    s.on_verify_result(VerifyResult(verify.batch_id, [[5, 6], [7]], 1.5, 2.0))
    assert s.requests["long"].output_ids == [5, 6] and s.requests["short"].output_ids == [7]
    assert s.metrics.busy_s[VERIFIER] == pytest.approx(2.0)
    assert s.metrics.num_jobs[VERIFIER] == 1 and s.metrics.num_prefill_jobs == 1


def test_psd_verify_comes_before_prefill():
    s = core("psd", "scheduler.predraft=false")  # two live requests in two batches (see the test below)
    s.add_request(b"c", request("first", 30))
    jobs = dict(s.next_jobs())
    assert [r.request_id for r in jobs[VERIFIER].rows] == ["first"]
    s.add_request(b"c", request("second", 30))
    s.on_draft_result(DraftResult(0, 1, 0.0, 0.1))
    ((role, draft),) = s.next_jobs()  # the verifier still prefills: the drafter takes the other batch
    assert role == DRAFTER and draft.batch_id == 1 and [r.request_id for r in draft.rows] == ["second"]
    s.on_prefill_result(PrefillResult(1, 0.0, 0.2))
    ((role, verify),) = s.next_jobs()  # a drafted batch goes first
    assert isinstance(verify, VerifyJob) and verify.batch_id == 0
    s.on_verify_result(VerifyResult(0, [[3]], 0.2, 0.3))
    jobs = dict(s.next_jobs())
    assert isinstance(jobs[VERIFIER], PrefillJob) and [r.request_id for r in jobs[VERIFIER].rows] == ["second"]


@pytest.mark.parametrize("mode,overrides", [("sd", ["scheduler.prefill_ahead=false"]), ("ar", [])])
def test_no_prefill_job_when_off_or_in_ar(mode, overrides):
    s = core(mode, *overrides)
    s.add_request(b"c", request("long", MIN_PREFILL_TOKENS + 12))
    jobs = s.next_jobs()
    assert not any(isinstance(job, PrefillJob) for _, job in jobs)
    assert [role for role, _ in jobs] == ([DRAFTER] if mode == "sd" else [VERIFIER])


def test_request_aborted_after_its_prefill_is_released_by_the_next_verifier_job():
    s = core("sd")
    s.add_request(b"c", request("a", 30))
    s.add_request(b"c", request("b", 30))
    jobs = dict(s.next_jobs())
    assert [r.request_id for r in jobs[VERIFIER].rows] == ["a", "b"]
    s.on_prefill_result(PrefillResult(2, 0.0, 0.1))
    s.abort("a")
    s.on_draft_result(DraftResult(jobs[DRAFTER].batch_id, 2, 0.0, 0.2))
    ((_, verify),) = s.next_jobs()
    assert [r.request_id for r in verify.rows] == ["b"] and verify.release == ["a"]


def test_psd_with_predrafting_steps_one_batch_at_a_light_load():
    """psd holds two live requests or fewer in one batch while pre-drafting is on (the drafter
    drafts ahead during its verify), two batches from the third request on, and one batch again
    once the load is light and both batches are between steps."""
    off = core("psd", "scheduler.predraft=false")
    for name in ("a", "b"):
        off.add_request(b"c", request(name, 3))
    ((role, draft),) = [j for j in off.next_jobs() if j[0] == DRAFTER]
    assert [r.request_id for r in draft.rows] == ["a"] and draft.predraft_s is None  # two batches of one

    s = core("psd")
    for name in ("a", "b"):
        s.add_request(b"c", request(name, 3))
    ((role, draft),) = [j for j in s.next_jobs() if j[0] == DRAFTER]
    assert draft.batch_id == 0 and [r.request_id for r in draft.rows] == ["a", "b"] and draft.predraft_s is not None
    s.add_request(b"c", request("c", 3))  # a third request: two batches
    s.on_draft_result(DraftResult(0, 2, 0.0, 0.1))
    jobs = dict(s.next_jobs())
    assert isinstance(jobs[VERIFIER], VerifyJob) and jobs[VERIFIER].batch_id == 0
    assert jobs[DRAFTER].batch_id == 1 and [r.request_id for r in jobs[DRAFTER].rows] == ["c"]
    assert jobs[DRAFTER].predraft_s is None  # the drafter has another batch to draft
    s.on_verify_result(VerifyResult(0, [list(range(10, 18)), [20]], 0.1, 0.3))  # "a" ends (max_tokens 8)
    assert "a" not in s.requests  # done: its 8 tokens (max_tokens)
    assert s.next_jobs() == []  # the drafter still drafts batch 1
    s.on_draft_result(DraftResult(1, 1, 0.1, 0.2))
    ((role, verify),) = s.next_jobs()  # two live: batch 0 waits for batch 1 to end its step, then they join
    assert role == VERIFIER and verify.batch_id == 1
    s.on_verify_result(VerifyResult(1, [[30]], 0.3, 0.4))
    ((role, draft),) = [j for j in s.next_jobs() if j[0] == DRAFTER]
    assert draft.batch_id == 0 and [r.request_id for r in draft.rows] == ["b", "c"] and draft.predraft_s is not None
