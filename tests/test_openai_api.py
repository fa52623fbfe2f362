"""The HTTP front end's translation layer in-process: request parsing, the error table (with a
scripted runtime for the codes a real one gives only in passing: shutting_down, a mid-stream
runtime_dead), chat templates rendered exactly as transformers renders them, and the SSE shape."""

import asyncio
import json

import httpx
import pytest

from minedraft.runtime import openai_api as api
from minedraft.common import protocol as p
from minedraft.runtime.chat_template import ChatTemplateError, render_chat
from minedraft.runtime.client import RequestError, make_request
from minedraft.runtime.http_server import OpenAIServer, build_app
from minedraft.runtime.tokenizer import ByteTokenizer
from tests.http_utils import CHAT_TEMPLATE

STATUS = {"state": "serving", "target": "tiny", "draft": "tiny-draft", "mode": "psd", "num_draft": 4,
          "dtype": "float32", "max_batch": 8, "max_len": 512, "max_tokens_cap": 256, "chat_template": CHAT_TEMPLATE,
          "special_tokens": {"bos_token": "<s>", "eos_token": "</s>"}}
METRICS = {"num_prompt_tokens": 3, "num_output_tokens": 3, "num_drafted": 8, "num_accepted": 2, "num_steps": 2}


class ScriptedRuntime:
    """Stands in for AsyncClient: each request gets the next script, a list of GenerateOutputs
    and RequestErrors given in order."""

    def __init__(self, *scripts, status=STATUS):
        self.scripts = list(scripts)
        self.status_reply = status
        self.requests: list[dict] = []
        self.aborted: list[str] = []

    async def status(self):
        return self.status_reply

    async def abort(self, request_id):
        self.aborted.append(request_id)

    async def stream(self, **kwargs):
        make_request(**kwargs)  # the client's own checks, as AsyncClient.stream makes them
        self.requests.append(kwargs)
        for item in self.scripts.pop(0):
            if isinstance(item, Exception):
                raise item
            yield item


def outputs(*texts, reason="length"):
    items = [p.GenerateOutput("r", [i], text, num_prompt_tokens=3) for i, text in enumerate(texts)]
    last = items[-1]
    items[-1] = p.GenerateOutput("r", last.token_ids, last.text, True, reason, METRICS, 3)
    return items


def call(runtime, method, path, body=None, headers=None, served_names=()) -> httpx.Response:
    async def main():
        app = build_app(OpenAIServer(runtime, key="k3y" if headers is not None else "", served_names=served_names))
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
            return await client.request(method, path, json=body, headers=headers)
    return asyncio.run(main())


def sse_events(response: httpx.Response) -> list:
    assert response.headers["content-type"].startswith("text/event-stream")
    lines = [line for line in response.text.split("\n") if line]
    assert all(line.startswith("data: ") for line in lines)
    return [line[len("data: "):] if line == "data: [DONE]" else json.loads(line[len("data: "):]) for line in lines]


@pytest.mark.parametrize("code, status_code", [("shutting_down", 503), ("runtime_dead", 503), ("overloaded", 429),
                                               ("invalid_request", 400), ("bad_frame", 500)])
def test_runtime_error_codes_map_to_statuses(code, status_code):
    runtime = ScriptedRuntime([RequestError(code, f"top_k: the runtime says {code}")])
    response = call(runtime, "POST", "/v1/completions", {"prompt": "hi"})
    assert response.status_code == status_code
    error = response.json()["error"]
    assert error["code"] == code and error["message"].endswith(f"the runtime says {code}")
    assert error["param"] == ("top_k" if code == "invalid_request" else None)
    assert ("retry-after" in response.headers) == (status_code == 429)


def test_mid_stream_failure_is_reported_in_band_then_done():
    runtime = ScriptedRuntime([*outputs("a", "b")[:1], RequestError("runtime_dead", "runtime dead: verifier exited")])
    events = sse_events(call(runtime, "POST", "/v1/completions", {"prompt": "hi", "stream": True}))
    assert events[0]["choices"][0]["text"] == "a"
    assert events[1] == {"error": {"message": "runtime dead: verifier exited", "type": "service_unavailable_error",
                                   "param": None, "code": "runtime_dead"}}
    assert events[2] == "[DONE]"


def test_completion_chat_and_stream_shapes():
    runtime = ScriptedRuntime(outputs("He", "llo"), outputs("He", "llo"), outputs("Hi", "!", reason="stop"))
    whole = call(runtime, "POST", "/v1/completions", {"prompt": [5, 6], "max_tokens": 3, "temperature": 0,
                                                      "top_k": -1, "stop": "x", "user": "u"}).json()
    assert whole["choices"] == [{"index": 0, "text": "Hello", "logprobs": None, "finish_reason": "length"}]
    assert whole["usage"] == {"prompt_tokens": 3, "completion_tokens": 3, "total_tokens": 6}
    assert whole["speculative"] == {"drafted_tokens": 8, "accepted_tokens": 2, "acceptance_rate": 0.25, "steps": 2,
                                    "mean_accepted_length": 2.0, "predrafted_steps": 0}
    assert runtime.requests[0] == {"request_id": runtime.requests[0]["request_id"], "prompt_ids": [5, 6],
                                   "max_tokens": 3, "temperature": 0, "top_k": 0, "top_p": 1.0, "seed": None,
                                   "stop": ["x"], "stop_token_ids": [], "ignore_eos": False, "min_tokens": 0}
    body = {"messages": [{"role": "user", "content": "hey"}], "stream": True, "stream_options": {"include_usage": True}}
    events = sse_events(call(runtime, "POST", "/v1/chat/completions", body))
    assert [e["choices"][0]["delta"] for e in events[:2]] == [{"role": "assistant", "content": "He"},
                                                              {"content": "llo"}]
    assert events[1]["choices"][0]["finish_reason"] == "length" and events[1]["speculative"]["steps"] == 2
    assert events[2]["choices"] == [] and events[2]["usage"]["total_tokens"] == 6 and events[3] == "[DONE]"
    assert runtime.requests[1]["prompt"] == "<s><|im_start|>user\nhey<|im_end|>\n<|im_start|>assistant\n"
    assert runtime.requests[1]["max_tokens"] == 256  # a chat without max_tokens: the runtime's cap
    chat = call(runtime, "POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}],
                                                          "max_completion_tokens": 7}).json()
    assert chat["choices"][0]["message"] == {"role": "assistant", "content": "Hi!"}
    assert chat["choices"][0]["finish_reason"] == "stop" and runtime.requests[2]["max_tokens"] == 7


def test_api_key_is_checked_on_v1_routes_only():
    runtime = ScriptedRuntime(outputs("ok"))
    assert call(runtime, "GET", "/v1/models", headers={}).status_code == 401
    assert call(runtime, "GET", "/v1/models", headers={"Authorization": "Bearer nope"}).status_code == 401
    models = call(runtime, "GET", "/v1/models", headers={"Authorization": "Bearer k3y"}).json()
    assert models["data"][0]["id"] == "tiny" and models["data"][0]["metadata"]["draft_model"] == "tiny-draft"
    assert call(runtime, "POST", "/v1/completions", {"prompt": "x"}, headers={}).status_code == 401
    assert runtime.requests == []  # refused before reaching the runtime
    assert call(runtime, "GET", "/health", headers={}).status_code == 200
    assert call(runtime, "GET", "/metrics", headers={}).status_code == 200


def test_health_follows_the_runtime_state():
    for state, status_code in (("serving", 200), ("stopping", 503), ("dead", 503)):
        response = call(ScriptedRuntime(status={**STATUS, "state": state}), "GET", "/health")
        assert response.status_code == status_code and response.json() == {"status": state}


def test_parse_rejects_what_it_does_not_implement():
    assert api.parse_completion({"prompt": ["one"]}).arguments["prompt"] == "one"
    assert api.parse_completion({"prompt": [[1, 2]]}).arguments["prompt_ids"] == [1, 2]
    for body, param in [({"prompt": "x", "n": 2}, "n"), ({"prompt": "x", "presence_penalty": 1}, "presence_penalty"),
                        ({"prompt": "x", "logit_bias": {"1": 5}}, "logit_bias"), ({"prompt": True}, "prompt"),
                        ({"prompt": "x", "ignore_eos": "yes"}, "ignore_eos"), ({"prompt": "x", "top_k": 1.5}, "top_k"),
                        ({"prompt": "x", "max_tokens": True}, "max_tokens"), ({"prompt": "x", "seed": 1.0}, "seed")]:
        with pytest.raises(api.ApiError) as error:
            api.parse_completion(body)
        assert error.value.param == param and error.value.status == 400
    chat = {"messages": [{"role": "user", "content": "x"}]}
    for extra, param in [({"response_format": {"type": "json_object"}}, "response_format"),
                         ({"tool_choice": "auto"}, "tool_choice"), ({"max_tokens": 3, "max_completion_tokens": 4},
                                                                    "max_completion_tokens"),
                         ({"messages": [{"role": "assistant", "content": "x", "tool_calls": [{}]}]},
                          "messages[0].tool_calls")]:
        with pytest.raises(api.ApiError) as error:
            api.parse_chat({**chat, **extra}, 16)
        assert error.value.param == param


def test_chat_template_renders_as_transformers_does():
    from transformers import PreTrainedTokenizerFast

    from tests.http_utils import byte_level_tokenizer

    template = ("{%- for m in messages %}{%- if loop.first and m.role != 'system' %}{{ bos_token }}{% endif %}"
                "[{{ m.role | upper }}] {{ m.content | trim }}{{ ' ' + m.name if m.name is defined else '' }}"
                "{% if not loop.last %}\n{% endif %}{% endfor %}{{ '|' ~ (messages | length) }}"
                "{%- if add_generation_prompt %} {{ {'next': 'assistant', 'n': 1} | tojson }}{% endif %}{{ eos_token }}")
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=byte_level_tokenizer(), bos_token="<|endoftext|>",
                                        eos_token="<|im_end|>")
    messages = [{"role": "user", "content": "  Héllo  ", "name": "ann"}, {"role": "assistant", "content": "hi"},
                {"role": "user", "content": "bye"}]
    for chat_template in (template, CHAT_TEMPLATE, ByteTokenizer.CHAT_TEMPLATE):
        for add_generation_prompt in (True, False):
            expected = tokenizer.apply_chat_template(messages, chat_template=chat_template, tokenize=False,
                                                     add_generation_prompt=add_generation_prompt)
            assert render_chat(chat_template, messages, "<|endoftext|>", "<|im_end|>", add_generation_prompt) == \
                expected
    with pytest.raises(ChatTemplateError, match="roles must be"):
        render_chat(CHAT_TEMPLATE, [{"role": "tool", "content": "x"}])
    with pytest.raises(ChatTemplateError, match="does not compile"):
        render_chat("{% for %}", messages)
    with pytest.raises(ChatTemplateError):  # the sandbox refuses attribute escapes
        render_chat("{{ messages.__class__.__mro__ }}", messages)


def test_chat_template_info_reads_the_tokenizer_files(tmp_path):
    from minedraft.workers.chat_template import chat_template_info
    from tests.http_utils import write_chat_model

    info = chat_template_info(write_chat_model(tmp_path / "with"))
    assert info == {"chat_template": CHAT_TEMPLATE, "bos_token": "<|endoftext|>", "eos_token": "<|im_end|>"}
    assert chat_template_info(write_chat_model(tmp_path / "without", chat_template=None))["chat_template"] is None
    assert chat_template_info(str(tmp_path / "missing")) == {"chat_template": None, "bos_token": None,
                                                            "eos_token": None}


def test_out_of_range_numbers_and_deep_json_name_their_problem():
    with pytest.raises(api.ApiError) as error:
        api.parse_completion({"prompt": "x", "seed": 10**30})
    assert error.value.param == "seed"
    deep = "[" * 100_000 + "]" * 100_000  # valid JSON that no decoder recurses through

    async def main():
        app = build_app(OpenAIServer(ScriptedRuntime()))
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
            return await client.post("/v1/completions", content=deep)
    response = asyncio.run(main())
    assert response.status_code == 400 and response.json()["error"]["code"] == "invalid_request"


def test_http_config_checks_and_masks_the_key(monkeypatch):
    from minedraft.common.config import ConfigError, format_config, load_config

    monkeypatch.delenv("MINEDRAFT_API_KEY", raising=False)
    assert load_config(overrides=["server.http=127.0.0.1:0"]).server.http == "127.0.0.1:0"
    assert load_config(overrides=["server.http=[::1]:8000"]).server.http == "[::1]:8000"
    for listen in ("8000", ":8000", "localhost:http", "127.0.0.1:70000"):
        with pytest.raises(ConfigError, match="server.http: expected HOST:PORT"):
            load_config(overrides=[f"server.http={listen}"])
    with pytest.raises(ConfigError, match="refusing to serve HTTP on the non-loopback address '0.0.0.0:8000'"):
        load_config(overrides=["server.http=0.0.0.0:8000"])
    keyed = load_config(overrides=["server.http=0.0.0.0:8000", "server.api_key=s3cret"])
    assert "s3cret" not in format_config(keyed) and 'api_key = "***"' in format_config(keyed)
    monkeypatch.setenv("MINEDRAFT_API_KEY", "from-env")
    assert load_config(overrides=["server.http=0.0.0.0:8000"]).server.api_key == ""  # the key stays in the env


def test_continuous_usage_stats_put_the_usage_so_far_on_every_chunk():
    runtime = ScriptedRuntime(outputs("He", "l", "lo"), outputs("He", "llo"), outputs("He", "llo"))
    body = {"prompt": "hi", "stream": True, "min_tokens": 2,
            "stream_options": {"include_usage": True, "continuous_usage_stats": True}}
    events = sse_events(call(runtime, "POST", "/v1/completions", body))
    assert [e["usage"] for e in events[:3]] == [{"prompt_tokens": 3, "completion_tokens": n, "total_tokens": 3 + n}
                                                for n in (1, 2, 3)]
    assert events[3]["choices"] == [] and events[3]["usage"]["total_tokens"] == 6 and events[4] == "[DONE]"
    assert runtime.requests[0]["min_tokens"] == 2
    plain = sse_events(call(runtime, "POST", "/v1/completions", {**body, "stream_options": {"include_usage": True}}))
    assert [e["usage"] for e in plain[:2]] == [None, None] and plain[2]["usage"]["completion_tokens"] == 3
    alone = {**body, "stream_options": {"continuous_usage_stats": True}}  # as vLLM: only with include_usage
    assert all("usage" not in e for e in sse_events(call(runtime, "POST", "/v1/completions", alone))[:-1])


def test_served_model_names_are_listed_accepted_and_answered_with():
    runtime = ScriptedRuntime(outputs("a"), outputs("b"), outputs("c"))
    names = ("tiny", "tiny-chat")
    listed = call(runtime, "GET", "/v1/models", served_names=names).json()["data"]
    assert [m["id"] for m in listed] == ["tiny", "tiny-chat"] and {m["root"] for m in listed} == {"tiny"}
    for model in ("tiny-chat", None):
        body = {"prompt": "x"} if model is None else {"prompt": "x", "model": model}
        assert call(runtime, "POST", "/v1/completions", body, served_names=names).json()["model"] == "tiny"
    missing = call(runtime, "POST", "/v1/completions", {"prompt": "x", "model": "gpt-4"}, served_names=names)
    assert missing.status_code == 404 and "'tiny', 'tiny-chat'" in missing.json()["error"]["message"]
    renamed = call(ScriptedRuntime(), "POST", "/v1/completions", {"prompt": "x", "model": "tiny"},
                   served_names=("other",))
    assert renamed.status_code == 404  # as vLLM: served names replace the target's own


@pytest.mark.parametrize("body, code, param", [
    ({"prompt": "x", "min_tokens": "3"}, "invalid_request", "min_tokens"),
    ({"prompt": "x", "min_tokens": -1}, "invalid_request", "min_tokens"),
    ({"prompt": "x", "max_tokens": 4, "min_tokens": 5}, "invalid_request", "min_tokens"),
    ({"prompt": "x", "stream_options": {"include_usage": True}}, "invalid_request", "stream_options"),
    ({"prompt": "x", "stream": True, "stream_options": ["include_usage"]}, "invalid_request", "stream_options"),
    ({"prompt": "x", "stream": True, "stream_options": {"include_usage": 1}}, "invalid_request",
     "stream_options.include_usage"),
    ({"prompt": "x", "stream": True, "stream_options": {"usage_every": True}}, "unsupported",
     "stream_options.usage_every"),
    ({"prompt": "x", "min_token": 3}, "unsupported", "min_token"),
    ({"prompt": "x", "logprobs": 2}, "unsupported", "logprobs"),
])
def test_one_code_per_kind_of_refusal(body, code, param):
    """invalid_request: a field the server knows, with a wrong value; unsupported: a field (at any
    depth) it does not know or does not implement."""
    response = call(ScriptedRuntime(), "POST", "/v1/completions", body)
    assert response.status_code == 400
    assert (response.json()["error"]["code"], response.json()["error"]["param"]) == (code, param)
