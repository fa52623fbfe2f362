"""OpenAI API shapes <-> the runtime's protocol: /v1/completions and /v1/chat/completions bodies
parsed and checked field by field into AsyncClient.stream arguments, responses and stream chunks
built from GenerateOutputs, and the one table of error codes. Pure Python, no IO and no torch:
runtime/http_server.py does the serving.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

COMPLETION_MAX_TOKENS = 16  # OpenAI's default max_tokens for /v1/completions
RETRY_AFTER_S = 1  # what a 429 (the runtime's admission queue is full) asks clients to wait

# ErrorOutput code (and the front end's own codes) -> (HTTP status, OpenAI error type)
ERROR_TABLE = {
    "invalid_request": (400, "invalid_request_error"),
    "unsupported": (400, "invalid_request_error"),
    "no_chat_template": (400, "invalid_request_error"),
    "invalid_api_key": (401, "authentication_error"),
    "model_not_found": (404, "invalid_request_error"),
    "not_found": (404, "invalid_request_error"),
    "method_not_allowed": (405, "invalid_request_error"),
    "request_too_large": (413, "invalid_request_error"),
    "overloaded": (429, "rate_limit_error"),
    "runtime_dead": (503, "service_unavailable_error"),
    "shutting_down": (503, "service_unavailable_error"),
    "runtime_unavailable": (503, "service_unavailable_error"),
    "bad_frame": (500, "internal_error"),
    "internal_error": (500, "internal_error"),
}
PROTOCOL_TO_API_FIELD = {"prompt_ids": "prompt"}  # runtime field names that differ in the API


class ApiError(Exception):
    """An error answered in OpenAI's shape; code is a key of ERROR_TABLE."""

    def __init__(self, code: str, message: str, param: str | None = None):
        super().__init__(message)
        self.code, self.message, self.param = code, message, param
        self.status, self.type = ERROR_TABLE.get(code, (500, "internal_error"))

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(RETRY_AFTER_S)} if self.status == 429 else {}


def runtime_error(code: str, message: str) -> ApiError:
    """A RequestError of the runtime (or a ValueError of the client's checks) as an ApiError; an
    invalid request names its field ("max_tokens: ..." -> param "max_tokens")."""
    param = None
    if code == "invalid_request":
        match = re.match(r"([A-Za-z_][A-Za-z0-9_]*): ", message)
        param = PROTOCOL_TO_API_FIELD.get(match.group(1), match.group(1)) if match else None
        if param == "request":  # the encoded request is over the runtime's frame limit
            return ApiError("request_too_large", message)
    return ApiError(code if code in ERROR_TABLE else "internal_error", message, param)


@dataclass(frozen=True)
class GenerateCall:
    """One parsed completion or chat request."""

    kind: str  # "completion" | "chat"
    model: str | None
    arguments: dict  # AsyncClient.stream keyword arguments (the prompt is added for chats)
    messages: list[dict] = field(default_factory=list)  # chat only: [{"role", "content"}]
    add_generation_prompt: bool = True
    is_stream: bool = False
    include_usage: bool = False  # stream_options.include_usage: a final chunk with usage
    continuous_usage: bool = False  # stream_options.continuous_usage_stats (as vLLM): usage on every chunk too
    return_token_ids: bool = False  # extension (as vLLM's): choices carry the output token ids


# Fields whose OpenAI meaning this server does not implement: accepted only at their neutral value.
_NEUTRAL = {
    "n": (lambda v: v in (None, 1), "n > 1 is not supported (one choice per request)"),
    "best_of": (lambda v: v in (None, 1), "best_of > 1 is not supported"),
    "echo": (lambda v: v in (None, False), "echo is not supported"),
    "suffix": (lambda v: v in (None, ""), "suffix is not supported"),
    "logprobs": (lambda v: v in (None, False), "logprobs are not supported"),
    "top_logprobs": (lambda v: v is None, "top_logprobs are not supported"),
    "presence_penalty": (lambda v: v in (None, 0), "presence_penalty is not supported"),
    "frequency_penalty": (lambda v: v in (None, 0), "frequency_penalty is not supported"),
    "logit_bias": (lambda v: v in (None, {}), "logit_bias is not supported"),
    "tools": (lambda v: v in (None, []), "tools are not supported"),
    "functions": (lambda v: v in (None, []), "functions are not supported"),
    "tool_choice": (lambda v: v in (None, "none"), "tool_choice is not supported"),
    "function_call": (lambda v: v in (None, "none"), "function_call is not supported"),
    "parallel_tool_calls": (lambda v: v is None or isinstance(v, bool), "parallel_tool_calls must be a boolean"),
    "response_format": (lambda v: v in (None, {"type": "text"}), "response_format other than text is not supported"),
}
_COMMON = {"model", "max_tokens", "temperature", "top_p", "seed", "stop", "stream", "stream_options", "user",
           "top_k", "ignore_eos", "stop_token_ids", "return_token_ids", "min_tokens", "n", "presence_penalty",
           "frequency_penalty", "logit_bias"}
COMPLETION_FIELDS = _COMMON | {"prompt", "logprobs", "best_of", "suffix", "echo"}
CHAT_FIELDS = _COMMON | {"messages", "max_completion_tokens", "logprobs", "top_logprobs", "tools", "tool_choice",
                         "functions", "function_call", "parallel_tool_calls", "response_format", "add_generation_prompt"}
STREAM_OPTIONS = {"include_usage", "continuous_usage_stats"}
CHAT_ROLES = ("system", "developer", "user", "assistant")


def _is_int(value) -> bool:
    """An integer of at most 64 bits (what the runtime's messages carry)."""
    return isinstance(value, int) and not isinstance(value, bool) and -(2**63) <= value < 2**64


def _is_bool(value) -> bool:
    return isinstance(value, bool)


def _is_number(value) -> bool:
    return (_is_int(value) or isinstance(value, float)) and math.isfinite(value)


def _invalid(name: str, problem: str) -> ApiError:
    return ApiError("invalid_request", f"{name}: {problem}", name)


def _get(body: dict, name: str, check, expected: str, default=None):
    value = body.get(name)
    if value is None:
        return default
    if not check(value):
        raise _invalid(name, f"expected {expected}, got {value!r:.80}")
    return value


def _check_fields(body, allowed: set[str]) -> None:
    if not isinstance(body, dict):
        raise ApiError("invalid_request", "the request body must be a JSON object")
    for name in body:
        if name not in allowed:
            raise ApiError("unsupported", f"{name}: unknown or unsupported field", name)
    for name, (is_neutral, message) in _NEUTRAL.items():
        if name in allowed and not is_neutral(body.get(name)):
            raise ApiError("unsupported", message, name)


def _sampling(body: dict, default_max_tokens: int, max_tokens_name: str = "max_tokens") -> dict:
    """The sampling fields shared by both endpoints, as AsyncClient.stream arguments (their
    ranges are checked again by the client and the runtime, which name the field)."""
    stop = body.get("stop")
    if isinstance(stop, str):
        stop = [stop]
    elif stop is not None and not (isinstance(stop, list) and all(isinstance(s, str) for s in stop)):
        raise _invalid("stop", f"expected a string or a list of strings, got {stop!r:.80}")
    top_k = _get(body, "top_k", _is_int, "an integer (0 or -1 = off)", 0)
    return {
        "max_tokens": _get(body, max_tokens_name, _is_int, "an integer >= 1", default_max_tokens),
        "temperature": _get(body, "temperature", _is_number, "a number >= 0", 1.0),
        "top_p": _get(body, "top_p", _is_number, "a number in (0, 1]", 1.0),
        "top_k": 0 if top_k == -1 else top_k,
        "seed": _get(body, "seed", _is_int, "an integer"),
        "stop": stop or [],
        "stop_token_ids": _get(body, "stop_token_ids", lambda v: isinstance(v, list) and all(map(_is_int, v)),
                               "a list of token ids", []),
        "ignore_eos": _get(body, "ignore_eos", _is_bool, "a boolean", False),
        "min_tokens": _get(body, "min_tokens", _is_int, "an integer >= 0", 0),
    }


def _output_options(body: dict) -> dict:
    options = {"is_stream": _get(body, "stream", _is_bool, "a boolean", False),
               "return_token_ids": _get(body, "return_token_ids", _is_bool, "a boolean", False)}
    stream_options = body.get("stream_options")
    if stream_options is not None:
        if not options["is_stream"]:
            raise _invalid("stream_options", "only allowed when stream is true")
        if not isinstance(stream_options, dict):
            raise _invalid("stream_options", 'expected {"include_usage": bool, "continuous_usage_stats": bool}')
        for name in stream_options:
            if name not in STREAM_OPTIONS:
                raise ApiError("unsupported", f"stream_options.{name}: unknown or unsupported field",
                               f"stream_options.{name}")
        include, continuous = (stream_options.get(name, False) for name in ("include_usage", "continuous_usage_stats"))
        for name, value in (("include_usage", include), ("continuous_usage_stats", continuous)):
            if not _is_bool(value):
                raise _invalid(f"stream_options.{name}", f"expected a boolean, got {value!r:.80}")
        options["include_usage"] = include
        options["continuous_usage"] = include and continuous  # as vLLM: only together with include_usage
    return options


def _model(body: dict) -> str | None:
    _get(body, "user", lambda v: isinstance(v, str), "a string")  # accepted and ignored
    return _get(body, "model", lambda v: isinstance(v, str), "a string")


def parse_completion(body) -> GenerateCall:
    """A /v1/completions body -> GenerateCall; ApiError naming the field otherwise."""
    _check_fields(body, COMPLETION_FIELDS)
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a batch of one prompt
    if isinstance(prompt, str) and prompt:
        arguments = {"prompt": prompt}
    elif isinstance(prompt, list) and prompt and all(map(_is_int, prompt)):
        arguments = {"prompt_ids": prompt}
    elif isinstance(prompt, list) and len(prompt) > 1 and all(isinstance(p, (str, list)) for p in prompt):
        raise ApiError("unsupported", "prompt: a batch of several prompts is not supported (send one request each)",
                       "prompt")
    else:
        raise _invalid("prompt", "expected a non-empty string or a non-empty list of token ids")
    arguments.update(_sampling(body, COMPLETION_MAX_TOKENS))
    return GenerateCall("completion", _model(body), arguments, **_output_options(body))


def _message(index: int, message) -> dict:
    where = f"messages[{index}]"
    if not isinstance(message, dict):
        raise _invalid(where, "expected an object with role and content")
    for key in message:
        if key == "tool_calls" and not message[key]:
            continue
        if key in ("tool_calls", "function_call", "tool_call_id"):
            raise ApiError("unsupported", f"{where}.{key}: tool calls are not supported", f"{where}.{key}")
        if key not in ("role", "content", "name"):
            raise ApiError("unsupported", f"{where}.{key}: unknown or unsupported field", f"{where}.{key}")
    role, content = message.get("role"), message.get("content")
    if role in ("tool", "function"):
        raise ApiError("unsupported", f"{where}.role: {role} messages are not supported (no tools)", f"{where}.role")
    if role not in CHAT_ROLES:
        raise _invalid(f"{where}.role", f"expected one of {', '.join(CHAT_ROLES)}, got {role!r:.40}")
    if isinstance(content, list):  # content parts: text only
        for part in content:
            if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)
                    and set(part) == {"type", "text"}):
                raise ApiError("unsupported", f"{where}.content: parts other than text are not supported", f"{where}.content")
        content = "\n".join(part["text"] for part in content)
    if not isinstance(content, str):
        raise _invalid(f"{where}.content", "expected a string or a list of text parts")
    out = {"role": role, "content": content}
    if message.get("name") is not None:
        if not isinstance(message["name"], str):
            raise _invalid(f"{where}.name", "expected a string")
        out["name"] = message["name"]
    return out


def parse_chat(body, default_max_tokens: int) -> GenerateCall:
    """A /v1/chat/completions body -> GenerateCall (messages not yet rendered);
    default_max_tokens: the runtime's max_tokens_cap (OpenAI sets no small default for chats)."""
    _check_fields(body, CHAT_FIELDS)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise _invalid("messages", "expected a non-empty list of messages")
    parsed = [_message(i, m) for i, m in enumerate(messages)]
    max_tokens, max_completion = body.get("max_tokens"), body.get("max_completion_tokens")
    if max_tokens is not None and max_completion is not None and max_tokens != max_completion:
        raise _invalid("max_completion_tokens", "differs from max_tokens (give one of them)")
    name = "max_tokens" if max_completion is None else "max_completion_tokens"
    arguments = _sampling(body, default_max_tokens, name)
    add_generation_prompt = _get(body, "add_generation_prompt", _is_bool, "a boolean", True)
    return GenerateCall("chat", _model(body), arguments, parsed, add_generation_prompt, **_output_options(body))


# --- responses ------------------------------------------------------------------------------


def usage(metrics: dict) -> dict:
    """OpenAI usage from a request's final metrics."""
    return usage_of(metrics.get("num_prompt_tokens", 0), metrics.get("num_output_tokens", 0))


def usage_of(num_prompt_tokens: int, num_output_tokens: int) -> dict:
    return {"prompt_tokens": num_prompt_tokens, "completion_tokens": num_output_tokens,
            "total_tokens": num_prompt_tokens + num_output_tokens}


def speculative(metrics: dict) -> dict:
    """The request's speculative-decoding figures (docs/design.md section 7, for one request)."""
    drafted, accepted, steps = metrics.get("num_drafted", 0), metrics.get("num_accepted", 0), metrics.get("num_steps", 0)
    return {
        "drafted_tokens": drafted,
        "accepted_tokens": accepted,
        "acceptance_rate": accepted / drafted if drafted else None,
        "steps": steps,
        "mean_accepted_length": 1 + accepted / steps if steps else None,
        "predrafted_steps": metrics.get("num_predrafted_steps", 0),  # steps whose drafts were drafted ahead
    }


def _object(call: GenerateCall, is_chunk: bool) -> str:
    if call.kind == "completion":
        return "text_completion"
    return "chat.completion.chunk" if is_chunk else "chat.completion"


def _choice(call: GenerateCall, text: str, token_ids: list[int], finish_reason: str | None, is_chunk: bool,
            is_first: bool) -> dict:
    if call.kind == "completion":
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}
    elif is_chunk:
        delta = {"role": "assistant", "content": text} if is_first else {"content": text} if text else {}
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
    else:
        choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                  "finish_reason": finish_reason}
    if call.return_token_ids:
        choice["token_ids"] = token_ids
    return choice


def response(call: GenerateCall, response_id: str, created: int, model: str, text: str, token_ids: list[int],
             finish_reason: str, metrics: dict) -> dict:
    """The non-streamed answer: the choice, usage and the speculative figures next to it."""
    return {
        "id": response_id, "object": _object(call, False), "created": created, "model": model,
        "choices": [_choice(call, text, token_ids, finish_reason, False, False)],
        "usage": usage(metrics), "speculative": speculative(metrics),
    }


def chunk(call: GenerateCall, response_id: str, created: int, model: str, text: str, token_ids: list[int],
          finish_reason: str | None, is_first: bool, metrics: dict | None = None,
          usage_so_far: dict | None = None) -> dict:
    """One stream event (the first of a chat carries the role); the one with finish_reason also
    carries the speculative figures. usage_so_far: the tokens up to this event (continuous usage)."""
    body = {
        "id": response_id, "object": _object(call, True), "created": created, "model": model,
        "choices": [_choice(call, text, token_ids, finish_reason, True, is_first)],
    }
    if call.include_usage:  # as OpenAI: null on every chunk but the last; as vLLM with continuous_usage_stats
        body["usage"] = usage_so_far if call.continuous_usage else None
    if finish_reason is not None:
        body["speculative"] = speculative(metrics or {})
    return body


def usage_chunk(call: GenerateCall, response_id: str, created: int, model: str, metrics: dict) -> dict:
    """The last event with stream_options.include_usage: no choices; usage and speculative figures."""
    return {
        "id": response_id, "object": _object(call, True), "created": created, "model": model, "choices": [],
        "usage": usage(metrics), "speculative": speculative(metrics),
    }
