"""Lossless greedy decoding of the in-process engines: sd == ar == transformers generate, token
for token, for drafts that are always, sometimes and almost never accepted; continuous batching
with requests joining mid-run; per-request counters."""

import pytest
import torch

from minedraft.common.request import Request
from minedraft.workers.engine import Engine
from minedraft.workers.model.config import VocabMismatchError
from minedraft.workers.model.loader import TinySpec, decoder_from_hf, tiny_hf_model
from minedraft.workers.sampling import SamplingParams

SPEC = TinySpec(seed=0)


@pytest.fixture(scope="module")
def target_hf():
    return tiny_hf_model("tiny-llama", SPEC)


@pytest.fixture(scope="module")
def target(target_hf):
    return decoder_from_hf(target_hf)


def draft_model(kind: str):
    if kind == "same":
        return decoder_from_hf(tiny_hf_model("tiny-llama", SPEC))
    if kind == "noisy":
        return decoder_from_hf(tiny_hf_model("tiny-llama", TinySpec(seed=0, noise=0.003)))
    return decoder_from_hf(tiny_hf_model("tiny-qwen2", TinySpec(seed=7)))  # unrelated, same vocab


def make_requests(n: int = 10) -> list[Request]:
    gen = torch.Generator().manual_seed(1234)
    requests = []
    for i in range(n):
        prompt_len = 1 + 7 * i % 23
        prompt = torch.randint(0, 256, (prompt_len,), generator=gen).tolist()
        requests.append(Request(f"r{i}", prompt, max_tokens=5 + 9 * i % 31))
    return requests


def run_engine(target, draft, mode: str, requests: list[Request], num_draft: int = 4) -> dict:
    engine = Engine(target, draft, mode=mode, num_draft=num_draft, max_batch=6, max_len=128)
    for r in requests[:6]:
        engine.add_request(r)
    for _ in range(3):  # the rest join mid-run
        engine.step()
    for r in requests[6:]:
        engine.add_request(r)
    return engine.run()


def hf_greedy(model, request: Request) -> list[int]:
    ids = torch.tensor([request.prompt_ids])
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=request.max_tokens,
                         do_sample=False, eos_token_id=model.config.eos_token_id, pad_token_id=0)
    return out[0, len(request.prompt_ids):].tolist()


@pytest.fixture(scope="module")
def ar_outputs(target):
    return {rid: r.output_ids for rid, r in run_engine(target, None, "ar", make_requests()).items()}


def test_ar_matches_transformers_generate(target_hf, ar_outputs):
    for request in make_requests():
        assert ar_outputs[request.request_id] == hf_greedy(target_hf, request), request.request_id


@pytest.mark.parametrize("kind", ["same", "noisy", "unrelated"])
def test_sd_greedy_equals_ar(target, ar_outputs, kind):
    done = run_engine(target, draft_model(kind), "sd", make_requests())
    assert {rid: r.output_ids for rid, r in done.items()} == ar_outputs
    drafted = sum(r.num_drafted for r in done.values())
    accepted = sum(r.num_accepted for r in done.values())
    rate = accepted / drafted
    if kind == "same":
        assert rate == 1.0
    elif kind == "noisy":
        assert 0.2 < rate < 1.0
    else:
        assert rate < 0.2


def test_counters_and_finish_reasons(target):
    done = run_engine(target, draft_model("same"), "sd", make_requests())
    for request in make_requests():
        r = done[request.request_id]
        assert r.finish_reason in ("length", "stop")
        if r.finish_reason == "length":
            assert len(r.output_ids) == request.max_tokens
        assert r.num_accepted <= r.num_drafted
        assert r.num_steps >= 1
        # each step emits accepted drafts + one token
        assert len(r.output_ids) <= r.num_accepted + r.num_steps


def test_stop_token_ids(target, ar_outputs):
    request = make_requests()[3]
    full = ar_outputs[request.request_id]
    stop = full[len(full) // 2]
    request.stop_token_ids = (stop,)
    done = run_engine(target, draft_model("noisy"), "sd", [request])
    out = done[request.request_id]
    assert out.finish_reason == "stop"
    assert out.output_ids == full[: full.index(stop) + 1]


def test_sampled_output_independent_of_batch(target):
    """A seeded request samples the same tokens alone or in a full batch."""
    draft = draft_model("noisy")
    params = SamplingParams(temperature=0.8, top_k=50, top_p=0.95, seed=42)
    alone = Request("x", [1, 2, 3, 4], 24, params)
    alone_out = run_engine(target, draft, "sd", [alone])["x"].output_ids
    crowd = make_requests(8)
    for r in crowd:
        r.params = SamplingParams(temperature=0.8, seed=int(r.request_id[1:]) + 100)
    crowd.insert(2, Request("x", [1, 2, 3, 4], 24, params))
    assert run_engine(target, draft, "sd", crowd)["x"].output_ids == alone_out


def test_bad_requests(target):
    engine = Engine(target, None, mode="ar", max_len=32)
    with pytest.raises(ValueError, match="empty prompt"):
        engine.add_request(Request("a", [], 4))
    with pytest.raises(ValueError, match="max_len"):
        engine.add_request(Request("b", [1] * 30, 4))
    with pytest.raises(ValueError, match="needs a draft model"):
        Engine(target, None, mode="sd")
    other_vocab = decoder_from_hf(tiny_hf_model("tiny-llama", TinySpec(vocab_size=600)))
    with pytest.raises(VocabMismatchError, match="600"):
        Engine(target, other_vocab, mode="sd")
