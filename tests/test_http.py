"""The OpenAI-compatible HTTP front end as real processes on tiny models, with the real `openai`
package as the client: same text as the ZeroMQ client, streams, chats through the model's chat
template, stop strings, concurrency, dropped streams, every error status, /metrics, API keys,
and a front end that ends with its daemon (stop, SIGTERM, death) leaving nothing behind."""

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from minedraft.runtime.client import Client
from tests.http_utils import api_key_env, free_port, is_alive, is_listening, wait_until, write_chat_model
from tests.runtime_utils import ROOT, cli, daemon_args, status

pytestmark = pytest.mark.slow
GREEDY = {"temperature": 0.0}
PROMPTS = ["def fibonacci(n):", "hello world", "The quick brown fox"]


class Daemon:
    """A daemon started with --http on tiny models whose tokenizer ships a chat template."""

    def __init__(self, tmp_path):
        target = write_chat_model(tmp_path / "target")
        draft = write_chat_model(tmp_path / "draft", noise=0.003)
        self.args = daemon_args(tmp_path, "psd", "scheduler.max_queued_requests=32", f"model.target={target}",
                                f"model.draft={draft}")
        self.endpoint = self.args[self.args.index("--endpoint") + 1]
        self.run_dir = tmp_path / "run"
        started = cli("start", *self.args, "--http", "127.0.0.1:0")
        assert started.returncode == 0, started.stdout + started.stderr
        self.status = status(self.endpoint)
        self.url = self.status["http"]["url"]
        self.model, self.draft = target, draft
        self.is_stopped = False

    def openai(self, **kwargs) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key="none", max_retries=0, **kwargs)

    def stop(self) -> subprocess.CompletedProcess:
        self.is_stopped = True
        return cli("stop", *self.args)


@pytest.fixture(scope="module")
def daemon(tmp_path_factory):
    d = Daemon(tmp_path_factory.mktemp("http"))
    yield d
    if not d.is_stopped:
        d.stop()


def num_live(daemon: Daemon) -> int:
    st = status(daemon.endpoint)
    return st["num_running"] + st["num_waiting"]


def zmq_generate(daemon: Daemon, prompt, **kwargs):
    with Client(daemon.endpoint, timeout_s=60) as client:
        key = "prompt_ids" if isinstance(prompt, list) else "prompt"
        return client.generate(**{key: prompt}, **kwargs)


def test_completion_equals_the_zmq_client(daemon):
    client = daemon.openai()
    for prompt in [*PROMPTS, [72, 101, 108, 108, 111]]:
        expected = zmq_generate(daemon, prompt, max_tokens=24, **GREEDY)
        got = client.completions.create(model=daemon.model, prompt=prompt, max_tokens=24, temperature=0,
                                        extra_body={"return_token_ids": True})
        choice = got.choices[0]
        assert choice.text == expected.text
        assert choice.model_extra["token_ids"] == expected.token_ids
        assert choice.finish_reason == expected.finish_reason
        assert got.usage.completion_tokens == len(expected.token_ids)
        assert got.usage.prompt_tokens == expected.metrics["num_prompt_tokens"]
        spec = got.model_extra["speculative"]
        assert spec["drafted_tokens"] >= spec["accepted_tokens"] >= 0 and spec["steps"] >= 1
        assert spec["acceptance_rate"] == pytest.approx(spec["accepted_tokens"] / spec["drafted_tokens"])
        assert got.model == daemon.model and got.object == "text_completion" and got.id.startswith("cmpl-")


def test_streamed_deltas_concatenate_to_the_completion(daemon):
    client = daemon.openai()
    for prompt in PROMPTS:
        whole = client.completions.create(model=daemon.model, prompt=prompt, max_tokens=40, temperature=0,
                                          extra_body={"ignore_eos": True})
        chunks = list(client.completions.create(model=daemon.model, prompt=prompt, max_tokens=40, temperature=0,
                                                stream=True, stream_options={"include_usage": True},
                                                extra_body={"ignore_eos": True}))
        assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text
        finished = [c for c in chunks if c.choices and c.choices[0].finish_reason is not None]
        assert len(finished) == 1 and finished[0].choices[0].finish_reason == "length"
        # the same greedy drafts and steps; how many steps found their drafts pre-drafted is a
        # matter of timing (how far the drafter got during each verify)
        streamed, plain = dict(finished[0].model_extra["speculative"]), dict(whole.model_extra["speculative"])
        assert streamed.pop("predrafted_steps") <= streamed["steps"] and plain.pop("predrafted_steps") <= plain["steps"]
        assert streamed == plain
        assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 40
        assert all(c.usage is None for c in chunks[:-1])


def test_chat_equals_the_template_applied_by_hand(daemon):
    from transformers import AutoTokenizer

    messages = [{"role": "system", "content": "You answer briefly."}, {"role": "user", "content": "Hi there!"}]
    prompt = AutoTokenizer.from_pretrained(daemon.model).apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True)
    expected = zmq_generate(daemon, prompt, max_tokens=30, ignore_eos=True, **GREEDY)
    client = daemon.openai()
    got = client.chat.completions.create(model=daemon.model, messages=messages, max_tokens=30, temperature=0,
                                         extra_body={"ignore_eos": True})
    assert got.choices[0].message.role == "assistant"
    assert got.choices[0].message.content == expected.text
    assert got.usage.prompt_tokens == expected.metrics["num_prompt_tokens"]
    chunks = list(client.chat.completions.create(model=daemon.model, messages=messages, max_tokens=30,
                                                 temperature=0, stream=True, extra_body={"ignore_eos": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == expected.text
    assert chunks[-1].choices[0].finish_reason == "length"
    parts = [{"role": "user", "content": [{"type": "text", "text": "Hi"}, {"type": "text", "text": "there!"}]}]
    as_text = [{"role": "user", "content": "Hi\nthere!"}]
    assert (client.chat.completions.create(messages=parts, model=daemon.model, max_tokens=8, temperature=0)
            .choices[0].message.content == client.chat.completions.create(
                messages=as_text, model=daemon.model, max_tokens=8, temperature=0).choices[0].message.content)
    with pytest.raises(openai.BadRequestError, match="roles must be system, user or assistant"):
        client.chat.completions.create(model=daemon.model, messages=[{"role": "developer", "content": "x"}])


def test_stop_strings_stop_token_ids_and_finish_reason(daemon):
    client = daemon.openai()
    whole = client.completions.create(model=daemon.model, prompt="hello", max_tokens=40, temperature=0,
                                      extra_body={"ignore_eos": True, "return_token_ids": True})
    text, ids = whole.choices[0].text, whole.choices[0].model_extra["token_ids"]
    assert whole.choices[0].finish_reason == "length" and len(ids) == 40
    stop = next(text[i:i + 2] for i in range(len(text) // 3, len(text) - 2) if "\ufffd" not in text[i:i + 2])
    for stream in (False, True):
        got = client.completions.create(model=daemon.model, prompt="hello", max_tokens=40, temperature=0,
                                        stop=[stop, "never-there"], stream=stream, extra_body={"ignore_eos": True})
        chunks = list(got) if stream else [got]
        assert "".join(c.choices[0].text for c in chunks) == text[: text.index(stop)]
        assert chunks[-1].choices[0].finish_reason == "stop"
    got = client.completions.create(model=daemon.model, prompt="hello", max_tokens=40, temperature=0, stop=stop)
    assert got.choices[0].finish_reason == "stop"
    cut = client.completions.create(model=daemon.model, prompt="hello", max_tokens=40, temperature=0,
                                    extra_body={"ignore_eos": True, "stop_token_ids": [ids[5]],
                                                "return_token_ids": True})
    assert cut.choices[0].finish_reason == "stop"
    assert cut.choices[0].model_extra["token_ids"] == ids[: ids.index(ids[5]) + 1]


def test_min_tokens_holds_off_stop_strings_and_stop_token_ids(daemon):
    client = daemon.openai()
    greedy = {"model": daemon.model, "prompt": "The quick brown fox", "max_tokens": 40, "temperature": 0}
    whole = client.completions.create(**greedy, extra_body={"ignore_eos": True, "return_token_ids": True})
    text, ids = whole.choices[0].text, whole.choices[0].model_extra["token_ids"]
    min_tokens = 12
    head = client.completions.create(**{**greedy, "max_tokens": min_tokens}, extra_body={"ignore_eos": True})
    head = head.choices[0].text.rstrip("\ufffd")  # the first min_tokens tokens' text
    # a stop string that the first min_tokens tokens complete, and that comes again later
    stop = next(head[i:i + 2] for i in range(len(head) - 1)
                if "\ufffd" not in head[i:i + 2] and text.find(head[i:i + 2], len(head) - 1) >= 0)
    early = client.completions.create(**greedy, stop=stop, extra_body={"ignore_eos": True})
    assert early.choices[0].text == text[: text.index(stop)] and early.choices[0].finish_reason == "stop"
    for stream in (False, True):
        got = client.completions.create(**greedy, stop=stop, stream=stream,
                                        extra_body={"ignore_eos": True, "min_tokens": min_tokens})
        chunks = list(got) if stream else [got]
        assert "".join(c.choices[0].text for c in chunks) == text[: text.index(stop, len(head) - 1)]
        assert chunks[-1].choices[0].finish_reason == "stop"
    # a token of the first min_tokens that comes again later (the tiny models repeat themselves)
    stop_id = next(t for t in ids[:min_tokens] if t in ids[min_tokens:])
    later = ids.index(stop_id, min_tokens)
    for min_n in (0, min_tokens):
        cut = client.completions.create(**greedy, extra_body={"ignore_eos": True, "stop_token_ids": [stop_id],
                                                              "min_tokens": min_n, "return_token_ids": True})
        end = ids.index(stop_id) if min_n == 0 else later
        assert cut.choices[0].model_extra["token_ids"] == ids[: end + 1] and cut.choices[0].finish_reason == "stop"
    with pytest.raises(openai.BadRequestError, match="min_tokens"):
        client.completions.create(**greedy, extra_body={"min_tokens": 41})


def test_continuous_usage_stats_through_the_openai_client(daemon):
    chunks = list(daemon.openai().completions.create(
        model=daemon.model, prompt="count as you go", max_tokens=20, temperature=0, stream=True,
        stream_options={"include_usage": True, "continuous_usage_stats": True},
        extra_body={"ignore_eos": True, "return_token_ids": True}))
    final = chunks[-1].usage
    assert chunks[-1].choices == [] and final.completion_tokens == 20
    num_tokens = 0
    for c in chunks[:-1]:
        num_tokens += len(c.choices[0].model_extra["token_ids"])
        assert (c.usage.prompt_tokens, c.usage.completion_tokens, c.usage.total_tokens) == \
            (final.prompt_tokens, num_tokens, final.prompt_tokens + num_tokens)
    assert num_tokens == 20


def test_tiny_config_serves_chat_under_its_served_model_names(tmp_path):
    """configs/tiny.toml as the README's quick start runs it: chat through the byte tokenizer's
    template, and the names given with --served-model-name."""
    args = daemon_args(tmp_path, "psd")
    endpoint = args[args.index("--endpoint") + 1]
    started = cli("start", *args, "--http", "127.0.0.1:0", "--served-model-name", "tiny",
                  "--served-model-name", "tiny-chat")
    assert started.returncode == 0, started.stdout + started.stderr
    try:
        client = openai.OpenAI(base_url=status(endpoint)["http"]["url"] + "/v1", api_key="none", max_retries=0)
        models = client.models.list().data
        assert [m.id for m in models] == ["tiny", "tiny-chat"]
        assert all(m.model_extra["root"] == "tiny-llama" and m.model_extra["metadata"]["has_chat_template"]
                   for m in models)
        messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there!"}]
        expected = zmq_generate_at(endpoint, "<|system|>\nBe brief.\n<|user|>\nHi there!\n<|assistant|>\n",
                                   max_tokens=16, ignore_eos=True, **GREEDY)
        for model in ("tiny", "tiny-chat"):
            got = client.chat.completions.create(model=model, messages=messages, max_tokens=16, temperature=0,
                                                 extra_body={"ignore_eos": True})
            assert got.model == "tiny" and got.choices[0].message.content == expected.text
            assert got.usage.prompt_tokens == expected.metrics["num_prompt_tokens"]
        chunks = list(client.chat.completions.create(model="tiny-chat", messages=messages, max_tokens=16,
                                                     temperature=0, stream=True, extra_body={"ignore_eos": True}))
        assert "".join(c.choices[0].delta.content or "" for c in chunks) == expected.text
        with pytest.raises(openai.NotFoundError, match="'tiny', 'tiny-chat'"):
            client.chat.completions.create(model="tiny-llama", messages=messages)
    finally:
        stopped = cli("stop", *args)
        assert stopped.returncode == 0, stopped.stderr


def zmq_generate_at(endpoint: str, prompt: str, **kwargs):
    with Client(endpoint, timeout_s=60) as client:
        return client.generate(prompt, **kwargs)


def test_32_concurrent_streams_all_finish(daemon):
    async def main():
        client = openai.AsyncOpenAI(base_url=daemon.url + "/v1", api_key="none", max_retries=0)

        async def one(i):
            stream = await client.completions.create(
                model=daemon.model, prompt=f"request {i}:", max_tokens=24, temperature=0.8, seed=i, stream=True,
                stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
            chunks = [c async for c in stream]
            return [c.choices[0].finish_reason for c in chunks if c.choices], chunks[-1].usage.completion_tokens

        try:
            return await asyncio.gather(*(one(i) for i in range(32)))
        finally:
            await client.close()

    results = asyncio.run(main())
    assert len(results) == 32
    assert all(reasons[-1] == "length" and num_tokens == 24 for reasons, num_tokens in results)


def test_dropped_stream_frees_its_request_within_2_s(daemon):
    before = status(daemon.endpoint)["finish_reasons"].get("abort", 0)
    with httpx.Client(timeout=30) as http:
        body = {"prompt": "a long one", "max_tokens": 256, "ignore_eos": True, "stream": True}
        with http.stream("POST", daemon.url + "/v1/completions", json=body) as response:
            assert response.status_code == 200
            lines = response.iter_lines()
            assert next(lines).startswith("data: {")
            assert status(daemon.endpoint)["num_running"] == 1
    dropped_s = time.monotonic()
    assert wait_until(lambda: num_live(daemon) == 0, 2.0)
    assert time.monotonic() - dropped_s < 2.0
    assert status(daemon.endpoint)["finish_reasons"].get("abort", 0) == before + 1  # aborted, not run to its end
    with pytest.raises(httpx.ReadTimeout):  # not streamed: nothing is written until the end, yet it is aborted
        httpx.post(daemon.url + "/v1/completions", json={**body, "stream": False}, timeout=0.3)
    assert wait_until(lambda: num_live(daemon) == 0, 2.0)
    assert status(daemon.endpoint)["finish_reasons"].get("abort", 0) == before + 2


def _post(daemon, path, body=None, content=None, headers=None) -> httpx.Response:
    return httpx.post(daemon.url + path, json=body, content=content, headers=headers, timeout=30)


ERRORS = [  # (path, JSON body or raw bytes, status, error code, param)
    ("/v1/completions", b"{not json", 400, "invalid_request", None),
    ("/v1/completions", [1, 2], 400, "invalid_request", None),
    ("/v1/completions", {"prompt": "x", "max_tokens": "8"}, 400, "invalid_request", "max_tokens"),
    ("/v1/completions", {"prompt": "x", "max_tokens": 0}, 400, "invalid_request", "max_tokens"),
    ("/v1/completions", {"prompt": "x", "max_tokens": 10**6}, 400, "invalid_request", "max_tokens"),
    ("/v1/completions", {"prompt": "x", "temperature": -1}, 400, "invalid_request", "temperature"),
    ("/v1/completions", {"prompt": "x", "top_p": 0}, 400, "invalid_request", "top_p"),
    ("/v1/completions", {"prompt": "x", "seed": -1}, 400, "invalid_request", "seed"),
    ("/v1/completions", {"prompt": "x", "stop": ["s"] * 20}, 400, "invalid_request", "stop"),
    ("/v1/completions", {"prompt": "x", "stop": 7}, 400, "invalid_request", "stop"),
    ("/v1/completions", {"prompt": "x", "stop_token_ids": [10**9]}, 400, "invalid_request", "stop_token_ids"),
    ("/v1/completions", {"prompt": ""}, 400, "invalid_request", "prompt"),
    ("/v1/completions", {"prompt": [1, 99999]}, 400, "invalid_request", "prompt"),
    ("/v1/completions", {"prompt": ["a", "b"]}, 400, "unsupported", "prompt"),
    ("/v1/completions", {"prompt": "x", "n": 2}, 400, "unsupported", "n"),
    ("/v1/completions", {"prompt": "x", "logprobs": 1}, 400, "unsupported", "logprobs"),
    ("/v1/completions", {"prompt": "x", "best_of": 2}, 400, "unsupported", "best_of"),
    ("/v1/completions", {"prompt": "x", "suffix": "y"}, 400, "unsupported", "suffix"),
    ("/v1/completions", {"prompt": "x", "echo": True}, 400, "unsupported", "echo"),
    ("/v1/completions", {"prompt": "x", "frequency_penalty": 0.5}, 400, "unsupported", "frequency_penalty"),
    ("/v1/completions", {"prompt": "x", "evil": 1}, 400, "unsupported", "evil"),
    ("/v1/completions", {"prompt": "x", "stream_options": {"include_usage": True}}, 400, "invalid_request",
     "stream_options"),
    ("/v1/completions", {"prompt": "x", "stream": True, "stream_options": {"per_chunk": True}}, 400, "unsupported",
     "stream_options.per_chunk"),
    ("/v1/completions", {"prompt": "x", "max_tokens": 4, "min_tokens": 8}, 400, "invalid_request", "min_tokens"),
    ("/v1/completions", {"prompt": "x", "model": "gpt-4"}, 404, "model_not_found", "model"),
    ("/v1/chat/completions", {"messages": []}, 400, "invalid_request", "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": 5}]}, 400, "invalid_request",
     "messages[0].content"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function"}]}, 400,
     "unsupported", "tools"),
    ("/v1/chat/completions", {"messages": [{"role": "tool", "content": "x"}]}, 400, "unsupported", "messages[0].role"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, 400,
     "unsupported", "messages[0].content"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "model": "nope"}, 404,
     "model_not_found", "model"),
]


@pytest.mark.parametrize("path, body, status_code, code, param", ERRORS)
def test_error_statuses_in_openai_shape(daemon, path, body, status_code, code, param):
    response = _post(daemon, path, content=body) if isinstance(body, bytes) else _post(daemon, path, body)
    assert response.status_code == status_code, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert (error["code"], error["param"]) == (code, param), error
    if code == "unsupported":
        assert "not supported" in error["message"] or "unsupported" in error["message"]


def test_oversized_bodies_unknown_routes_and_the_openai_client_errors(daemon):
    big = {"prompt": "x" * 1_100_000}  # over scheduler.max_request_bytes (1 MiB)
    assert _post(daemon, "/v1/completions", big).status_code == 413
    chunked = (part for part in [b'{"prompt": "', b"x" * 1_100_000, b'"}'])  # no Content-Length
    response = _post(daemon, "/v1/completions", content=chunked)
    assert response.status_code == 413 and response.json()["error"]["code"] == "request_too_large"
    assert httpx.get(daemon.url + "/v1/completions").status_code == 405
    assert httpx.get(daemon.url + "/v1/nothing").json()["error"]["code"] == "not_found"
    client = daemon.openai()
    with pytest.raises(openai.BadRequestError, match="n > 1 is not supported"):
        client.completions.create(model=daemon.model, prompt="x", n=2)
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="gpt-4", prompt="x")
    after = client.completions.create(model=daemon.model, prompt="still serving", max_tokens=4)
    assert after.choices[0].finish_reason in ("length", "stop")  # a 200 after all the errors


def test_overload_answers_429_with_retry_after_then_serves(daemon):
    async def main():
        body = {"prompt": "crowd", "max_tokens": 200, "ignore_eos": True, "stream": True}
        async with httpx.AsyncClient(base_url=daemon.url, timeout=60,
                                     limits=httpx.Limits(max_connections=100)) as http:
            tasks = [asyncio.create_task(http.send(http.build_request("POST", "/v1/completions", json=body),
                                                   stream=True)) for _ in range(60)]
            done, pending = await asyncio.wait(tasks, timeout=10)
            responses = [t.result() for t in done]
            for task in pending:  # still queued: their connections close, their requests abort
                task.cancel()
            overloaded = [r for r in responses if r.status_code == 429]
            for r in overloaded:
                await r.aread()
            for r in responses:
                await r.aclose()
            return overloaded

    overloaded = asyncio.run(main())
    assert len(overloaded) >= 5  # 60 sent at once: at most 32 wait, 16 run
    assert all(r.headers["retry-after"] == "1" and json.loads(r.content)["error"]["code"] == "overloaded"
               for r in overloaded)
    assert wait_until(lambda: num_live(daemon) == 0, 10.0)
    assert daemon.openai().completions.create(model=daemon.model, prompt="after", max_tokens=4).choices


def test_models_health_cors_and_status(daemon):
    models = daemon.openai().models.list().data
    assert [m.id for m in models] == [daemon.model]
    assert models[0].model_extra["metadata"]["draft_model"] == daemon.draft
    assert models[0].model_extra["metadata"]["mode"] == "psd"
    assert httpx.get(daemon.url + "/health").json() == {"status": "serving"}
    preflight = httpx.options(daemon.url + "/v1/completions", headers={
        "Origin": "http://elsewhere.example", "Access-Control-Request-Method": "POST"})
    assert preflight.status_code == 405 and "access-control-allow-origin" not in preflight.headers
    plain = httpx.get(daemon.url + "/health", headers={"Origin": "http://elsewhere.example"})
    assert "access-control-allow-origin" not in plain.headers
    shown = cli("status", *daemon.args)
    assert f"{daemon.url} (running, pid {daemon.status['http']['pid']}, 0 restarts)" in shown.stdout


def test_metrics_parse_with_prometheus_client(daemon):
    daemon.openai().completions.create(model=daemon.model, prompt="count me", max_tokens=16, temperature=0,
                                       extra_body={"ignore_eos": True})
    assert _post(daemon, "/v1/completions", {"prompt": "x", "n": 3}).status_code == 400
    text = httpx.get(daemon.url + "/metrics").text
    families = {f.name: f for f in text_string_to_metric_families(text)}
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value for f in families.values() for s in f.samples}
    for name in ("minedraft_http_time_to_first_token_seconds", "minedraft_http_inter_token_latency_seconds",
                 "minedraft_http_e2e_request_latency_seconds"):
        assert families[name].type == "histogram" and samples[(name + "_count", ())] > 0
    assert samples[("minedraft_http_requests_total", (("finish_reason", "length"),))] > 0
    assert samples[("minedraft_http_errors_total", (("code", "unsupported"),))] > 0
    assert samples[("minedraft_http_output_tokens_total", ())] > 0
    assert samples[("minedraft_http_prompt_tokens_total", ())] > 0
    assert samples[("minedraft_runtime_up", ())] == 1.0
    assert samples[("minedraft_requests_total", (("finish_reason", "length"),))] >= 1
    assert 0 < samples[("minedraft_spec_acceptance_rate", ())] <= 1
    assert 1 < samples[("minedraft_spec_mean_accepted_length", ())] <= 5
    checked = samples[("minedraft_spec_predraft_checked_total", ())]
    hits = [samples[("minedraft_spec_predraft_hits_total", (("branch", kind),))] for kind in ("full", "short")]
    assert checked >= sum(hits) and min(hits) >= 0 and samples[("minedraft_spec_predraft_busy_seconds_total", ())] >= 0
    for role in ("drafter", "verifier"):
        assert 0 < samples[("minedraft_worker_busy_fraction", (("role", role),))] <= 1
    assert ("minedraft_num_requests_running", ()) in samples and ("minedraft_num_requests_waiting", ()) in samples
    (info,) = [s for f in families.values() for s in f.samples if s.name == "minedraft_runtime_info"]
    assert info.labels["mode"] == "psd" and info.labels["target"] == daemon.model


def test_loadtest_drives_both_front_ends_alike(daemon, tmp_path):
    results = {}
    for front_end, target in (("zmq", ["--endpoint", daemon.endpoint]), ("http", ["--http", daemon.url])):
        out = tmp_path / f"{front_end}.json"
        done = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "loadtest.py"), *target, "--requests", "8",
                               "--concurrency", "4", "--max-tokens", "12", "--ignore-eos", "--json", str(out)],
                              cwd=ROOT, capture_output=True, text=True, timeout=120, check=False)
        assert done.returncode == 0, done.stdout + done.stderr[-3000:]
        results[front_end] = json.loads(out.read_text())
    zmq, http = results["zmq"], results["http"]
    assert http["front_end"] == "http" and http["num_ok"] == 8 and http["errors"] == {}
    assert http["output_token_ids"] == zmq["output_token_ids"]  # greedy: the same tokens either way
    assert http["num_output_tokens"] == http["server_num_output_tokens"] == 8 * 12
    assert len(http["itl_ms"]) == 4 and http["itl_ms"]["p50"] is not None  # per token, from token_ids per chunk
    assert http["mode"] == "psd" and 0 < http["acceptance_rate"] <= 1 and http["busy_fraction"]["verifier"] > 0


async def _stream_finish_reasons(url: str, num_streams: int) -> list:
    """(finish_reason, whether [DONE] came) for each stream."""
    async with httpx.AsyncClient(base_url=url, timeout=60) as http:
        async def one(i):
            body = {"prompt": f"busy {i}", "max_tokens": 256, "ignore_eos": True, "stream": True}
            reason, is_done = None, False
            async with http.stream("POST", "/v1/completions", json=body) as response:
                async for line in response.aiter_lines():
                    if line.startswith("data: {"):
                        reason = json.loads(line[len("data: "):])["choices"][0]["finish_reason"] or reason
                    is_done = is_done or line == "data: [DONE]"
            return reason, is_done
        return await asyncio.gather(*(one(i) for i in range(num_streams)))


def test_stop_ends_open_streams_and_leaves_no_process_port_or_segment(daemon):
    st = status(daemon.endpoint)
    pids = [st["pid"], st["http"]["pid"], *st["worker_pids"].values()]
    assert all(is_alive(pid) for pid in pids) and is_listening(daemon.url)
    segments = {line.split()[-1] for pid in st["worker_pids"].values()  # this daemon's draft buffers
                for line in Path(f"/proc/{pid}/maps").read_text().splitlines() if "/dev/shm/minedraft-" in line}
    assert len(segments) == 2
    with ThreadPoolExecutor(1) as pool:  # 24 long streams in flight while `stop` runs
        reasons = pool.submit(asyncio.run, _stream_finish_reasons(daemon.url, 24))
        assert wait_until(lambda: status(daemon.endpoint)["num_running"] > 0, 10.0)
        stop = daemon.stop()
        assert stop.returncode == 0, stop.stderr
        assert reasons.result(timeout=30) == [("shutdown", True)] * 24  # each stream ends properly
    assert wait_until(lambda: not any(is_alive(pid) for pid in pids), 10.0)
    assert not is_listening(daemon.url)
    assert not any(os.path.exists(segment) for segment in segments)
    assert not daemon.run_dir.exists()


def test_front_end_modules_do_not_import_torch():
    code = ("import sys; import minedraft.runtime.http_server, minedraft.runtime.http_front_end, "
            "minedraft.runtime.openai_api, minedraft.runtime.chat_template, minedraft.runtime.http_metrics; "
            "bad = [m for m in ('torch', 'transformers') if m in sys.modules]; assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_non_loopback_http_needs_an_api_key(tmp_path):
    env = api_key_env(None)
    for command in (["start", "--config", "configs/tiny.toml", "--set", f"server.run_dir={tmp_path}/run",
                     "--http", "0.0.0.0:0"], ["http", "--listen", "0.0.0.0:0"]):
        out = subprocess.run([sys.executable, "-m", "minedraft.runtime.cli", *command], cwd=ROOT,
                             capture_output=True, text=True, timeout=60, env=env, check=False)
        assert out.returncode == 2 and "refusing to serve HTTP on the non-loopback address" in out.stderr
    assert not os.path.exists(tmp_path / "run")


def _start_standalone(endpoint: str, key: str, *extra: str) -> tuple[subprocess.Popen, str]:
    url = f"http://127.0.0.1:{free_port()}"
    proc = subprocess.Popen([sys.executable, "-m", "minedraft.runtime.cli", "http", "--endpoint", endpoint,
                             "--listen", url.removeprefix("http://"), *extra], cwd=ROOT, env=api_key_env(key),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    assert wait_until(lambda: is_listening(url), 30.0, 0.2)
    return proc, url


def test_standalone_front_end_api_key_and_daemon_sigterm(tmp_path):
    """`http` in front of a running daemon (a tiny model folder without a chat template), with a
    key, under the name tiny-llama."""
    target = write_chat_model(tmp_path / "plain", chat_template=None)
    args = daemon_args(tmp_path, "ar", f"model.target={target}")
    endpoint = args[args.index("--endpoint") + 1]
    assert cli("start", *args, "--http", "127.0.0.1:0").returncode == 0
    st = status(endpoint)
    managed = st["http"]["url"]
    proc, url = _start_standalone(endpoint, "s3cret", "--served-model-name", "tiny-llama")
    try:
        chat = httpx.post(managed + "/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]})
        assert chat.status_code == 400 and chat.json()["error"]["code"] == "no_chat_template"
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
            for path in ("/v1/models", "/v1/completions"):
                response = httpx.request("GET" if path == "/v1/models" else "POST", url + path, headers=headers,
                                         json=None if path == "/v1/models" else {"prompt": "x"})
                assert response.status_code == 401 and response.json()["error"]["code"] == "invalid_api_key"
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0).models.list()
        client = openai.OpenAI(base_url=url + "/v1", api_key="s3cret", max_retries=0)
        got = client.completions.create(model="tiny-llama", prompt="hi", max_tokens=6, temperature=0)
        with Client(endpoint, timeout_s=30) as zmq_client:
            assert got.choices[0].text == zmq_client.generate("hi", max_tokens=6).text
        assert httpx.get(url + "/health").status_code == 200  # open without the key
        assert httpx.get(url + "/metrics").status_code == 200
        os.kill(st["pid"], signal.SIGTERM)  # the daemon stops, and its own front end with it
        assert wait_until(lambda: not is_alive(st["pid"]) and not is_alive(st["http"]["pid"]), 15.0)
        assert not is_listening(managed)
        assert httpx.get(url + "/health", timeout=30).json() == {"status": "unreachable"}
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0
    assert not os.path.exists(tmp_path / "run")


def test_dead_runtime_answers_503_and_a_killed_daemon_takes_its_front_end(tmp_path):
    args = daemon_args(tmp_path, "ar", "server.dead_linger_s=60")
    endpoint = args[args.index("--endpoint") + 1]
    assert cli("start", *args, "--http", "127.0.0.1:0").returncode == 0
    st = status(endpoint)
    url, http_pid = st["http"]["url"], st["http"]["pid"]
    try:
        assert httpx.post(url + "/v1/completions", json={"prompt": "x", "max_tokens": 2}).status_code == 200
        os.kill(st["worker_pids"]["verifier"], signal.SIGKILL)
        assert wait_until(lambda: status(endpoint)["state"] == "dead", 10.0)
        response = httpx.post(url + "/v1/completions", json={"prompt": "x"})
        assert response.status_code == 503 and response.json()["error"]["code"] == "runtime_dead"
        assert httpx.get(url + "/health").status_code == 503
    finally:
        os.kill(st["pid"], signal.SIGKILL)  # no clean-up runs in the daemon: the front end must notice
    assert wait_until(lambda: not is_alive(http_pid), 10.0)
    assert wait_until(lambda: not is_listening(url), 5.0)
