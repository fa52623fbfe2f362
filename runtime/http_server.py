"""The OpenAI-compatible HTTP front end: a FastAPI app on uvicorn that is a ZeroMQ client of the
scheduler (one AsyncClient for every request). It translates, and holds no scheduling logic:
request shapes in runtime/openai_api.py, chats in runtime/chat_template.py, metrics in
runtime/http_metrics.py. Never imports torch.

    python -m minedraft.runtime.http_server CONFIG_JSON --fd N --parent-pid P   (the daemon does this)
    minedraft-runtime http --endpoint E --listen 127.0.0.1:8000                 (in front of a running daemon)
"""

from __future__ import annotations

import argparse
import asyncio
import hmac
import json
import logging
import os
import signal
import socket
import sys
import time
import uuid

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from fastapi.sse import EventSourceResponse, format_sse_event
from prometheus_client import CONTENT_TYPE_LATEST, disable_created_metrics
from starlette.exceptions import HTTPException

from minedraft.runtime import openai_api as api
from minedraft.runtime.chat_template import ChatTemplateError, render_chat
from minedraft.runtime.client import AsyncClient, RequestError
from minedraft.common.config import Config, api_key, config_from_dict
from minedraft.runtime.http_front_end import bind_listener, listen_url
from minedraft.runtime.http_metrics import HttpMetrics

log = logging.getLogger("minedraft.http")
STATUS_TIMEOUT_S = 5.0  # a status (health, metrics, model info) not answered within this: runtime unavailable
OUTPUT_TIMEOUT_S = 600.0  # the longest wait for a request's next output
GRACEFUL_EXIT_S = 5.0  # on SIGTERM: how long open responses may take to finish
PARENT_CHECK_S = 0.5  # how often a daemon-started front end checks that the daemon lives
DONE_EVENT = format_sse_event(data_str="[DONE]")


class OpenAIServer:
    """The routes' logic over one AsyncClient (or any object with its stream / abort / status)."""

    def __init__(self, client, key: str = "", max_request_bytes: int = 1048576, served_names: tuple[str, ...] = ()):
        self.client = client
        self.key = key.encode()
        self.served_names = tuple(served_names)  # server.served_model_names; () = the target as given
        self.max_request_bytes = max_request_bytes
        self.metrics = HttpMetrics()
        self.model_info: dict | None = None
        self.started = int(time.time())

    # --- shared steps -----------------------------------------------------------------------

    def authorize(self, request: Request) -> None:
        if not self.key:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self.key):
            raise api.ApiError("invalid_api_key", "missing or wrong API key (Authorization: Bearer KEY)")

    async def read_json(self, request: Request):
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > self.max_request_bytes:
            raise api.ApiError("request_too_large", f"request body of {declared} bytes exceeds the limit of "
                                                    f"{self.max_request_bytes} (scheduler.max_request_bytes)")
        body = bytearray()
        async for part in request.stream():
            body += part
            if len(body) > self.max_request_bytes:
                raise api.ApiError("request_too_large", f"request body exceeds the limit of {self.max_request_bytes} "
                                                        "bytes (scheduler.max_request_bytes)")
        try:
            return json.loads(body)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise api.ApiError("invalid_request", f"the request body is not valid JSON: {exc}") from None
        except RecursionError:
            raise api.ApiError("invalid_request", "the request body nests too deeply") from None

    async def status(self) -> dict | None:
        try:
            return await asyncio.wait_for(self.client.status(), STATUS_TIMEOUT_S)
        except (TimeoutError, RequestError):
            return None

    async def model(self) -> dict:
        """What the runtime serves (read once): names, limits, chat template."""
        if self.model_info is None:
            status = await self.status()
            if status is None:
                raise api.ApiError("runtime_unavailable", f"the runtime does not answer within {STATUS_TIMEOUT_S} s")
            self.model_info = status
        return self.model_info

    def names(self, info: dict) -> tuple[str, ...]:
        """The names this server answers to; the first is the one its answers carry."""
        return self.served_names or (info["target"],)

    # --- routes -----------------------------------------------------------------------------

    async def models(self, request: Request) -> dict:
        self.authorize(request)
        info = await self.model()
        metadata = {"draft_model": info.get("draft"), "mode": info.get("mode"), "num_draft": info.get("num_draft"),
                    "dtype": info.get("dtype"), "has_chat_template": info.get("chat_template") is not None}
        return {"object": "list", "data": [{
            "id": name, "object": "model", "created": self.started, "owned_by": "minedraft", "root": info["target"],
            "max_model_len": info.get("max_len"), "metadata": metadata,
        } for name in self.names(info)]}

    async def health(self) -> JSONResponse:
        status = await self.status()
        state = "unreachable" if status is None else status.get("state")
        return JSONResponse({"status": state}, status_code=200 if state == "serving" else 503)

    async def prometheus(self) -> Response:
        return Response(self.metrics.render(await self.status()), media_type=CONTENT_TYPE_LATEST)

    async def generate(self, request: Request, kind: str) -> Response:
        arrival_s = time.perf_counter()
        try:
            self.authorize(request)
            body = await self.read_json(request)
            info = await self.model()
            if kind == "completion":
                call = api.parse_completion(body)
            else:
                call = api.parse_chat(body, info["max_tokens_cap"])
            names = self.names(info)
            if call.model is not None and call.model not in names:
                raise api.ApiError("model_not_found", f"model {call.model!r} is not served here (this server "
                                                      f"serves {', '.join(map(repr, names))})", "model")
            arguments = dict(call.arguments)
            if kind == "chat":
                arguments["prompt"] = self._render(info, call)
            return await self._run(request, call, arguments, names[0], arrival_s)
        except api.ApiError:
            self.metrics.requests.labels("error").inc()
            raise

    def _render(self, info: dict, call: api.GenerateCall) -> str:
        template = info.get("chat_template")
        if template is None:
            raise api.ApiError("no_chat_template", f"model {info['target']!r} has no chat template in its tokenizer "
                                                   "files: use /v1/completions", "messages")
        special = info.get("special_tokens") or {}
        try:
            prompt = render_chat(template, call.messages, special.get("bos_token"), special.get("eos_token"),
                                 call.add_generation_prompt)
        except ChatTemplateError as exc:
            raise api.ApiError("invalid_request", str(exc), "messages") from None
        if not prompt:
            raise api.ApiError("invalid_request", "the chat template rendered an empty prompt", "messages")
        return prompt

    async def _run(self, request: Request, call: api.GenerateCall, arguments: dict, model: str,
                   arrival_s: float) -> Response:
        """Send the request; answer with its error, its stream or its whole completion. A client
        that goes away has its request aborted (at the runtime's next step boundary)."""
        request_id = uuid.uuid4().hex
        response_id = ("cmpl-" if call.kind == "completion" else "chatcmpl-") + request_id
        outputs = self.client.stream(request_id=request_id, **arguments)
        watcher = asyncio.get_running_loop().create_task(self._abort_on_disconnect(request, request_id))
        timing = _Timing(arrival_s)
        try:
            first = await self._next(outputs)
        except BaseException:
            watcher.cancel()
            await outputs.aclose()
            raise
        timing.add(first)
        created = int(time.time())
        if call.is_stream:
            events = self._events(call, outputs, first, watcher, timing, response_id, created, model)
            return EventSourceResponse(events, headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        text, token_ids, last = first.text, list(first.token_ids), first
        try:
            while not last.is_finished:
                last = await self._next(outputs)
                timing.add(last)
                text += last.text
                token_ids += last.token_ids
        finally:
            watcher.cancel()
            await outputs.aclose()
        self._finished(timing, last)
        return JSONResponse(api.response(call, response_id, created, model, text, token_ids, last.finish_reason,
                                         last.metrics or {}))

    async def _events(self, call, outputs, first, watcher, timing, response_id, created, model):
        """The SSE body: one event per runtime output, the usage event if asked, then [DONE]."""
        output, is_first, num_tokens = first, True, 0
        try:
            while True:
                num_tokens += len(output.token_ids)
                event = api.chunk(call, response_id, created, model, output.text, list(output.token_ids),
                                  output.finish_reason if output.is_finished else None, is_first, output.metrics,
                                  api.usage_of(output.num_prompt_tokens, num_tokens))
                yield format_sse_event(data_str=_json(event))
                is_first = False
                if output.is_finished:
                    break
                output = await self._next(outputs)
                timing.add(output)
            self._finished(timing, output)
            if call.include_usage:
                event = api.usage_chunk(call, response_id, created, model, output.metrics or {})
                yield format_sse_event(data_str=_json(event))
        except api.ApiError as exc:  # the runtime failed the request mid-stream: tell the client in-band
            self.metrics.requests.labels("error").inc()
            self.metrics.errors.labels(exc.code).inc()
            yield format_sse_event(data_str=_json(exc.body()))
        finally:
            watcher.cancel()
            await outputs.aclose()  # a stream left early aborts its request
        yield DONE_EVENT

    async def _next(self, outputs):
        try:
            return await outputs.__anext__()
        except RequestError as exc:
            raise api.runtime_error(exc.code, exc.message) from None
        except ValueError as exc:  # the client's own checks, before anything is sent
            raise api.runtime_error("invalid_request", str(exc)) from None
        except TimeoutError:
            raise api.ApiError("runtime_unavailable", f"no output from the runtime within {OUTPUT_TIMEOUT_S} s") \
                from None

    async def _abort_on_disconnect(self, request: Request, request_id: str) -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass
        log.info("client went away: aborting request_id=%s", request_id)
        await self.client.abort(request_id)

    def _finished(self, timing: _Timing, last) -> None:
        metrics = last.metrics or {}
        self.metrics.requests.labels(last.finish_reason or "unknown").inc()
        self.metrics.prompt_tokens.inc(metrics.get("num_prompt_tokens", 0))
        self.metrics.output_tokens.inc(timing.num_tokens)
        if timing.first_s is not None:
            self.metrics.ttft.observe(timing.first_s - timing.arrival_s)
        for gap_s in timing.gaps_s:
            self.metrics.itl.observe(gap_s)
        self.metrics.e2e.observe(time.perf_counter() - timing.arrival_s)


def _json(body: dict) -> str:
    return json.dumps(body, separators=(",", ":"))


class _Timing:
    """Arrival of a request's outputs: first token, and per-token gaps (n tokens after g: n x g/n)."""

    def __init__(self, arrival_s: float):
        self.arrival_s = arrival_s
        self.first_s: float | None = None
        self.last_s = arrival_s
        self.num_tokens = 0
        self.gaps_s: list[float] = []

    def add(self, output) -> None:
        n = len(output.token_ids)
        if not n:
            return
        now = time.perf_counter()
        if self.first_s is None:
            self.first_s = now
        else:
            self.gaps_s.extend([(now - self.last_s) / n] * n)
        self.last_s = now
        self.num_tokens += n


def build_app(server: OpenAIServer) -> FastAPI:
    """The routes; every error in OpenAI's shape. No CORS middleware: browsers on other origins
    get no access."""
    app = FastAPI(title="MineDraft runtime", docs_url=None, redoc_url=None, openapi_url=None)

    @app.exception_handler(api.ApiError)
    async def on_api_error(request: Request, exc: api.ApiError):
        server.metrics.errors.labels(exc.code).inc()
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers())

    @app.exception_handler(HTTPException)
    async def on_http_error(request: Request, exc: HTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "invalid_request")
        error = api.ApiError(code, f"{request.method} {request.url.path}: {exc.detail}")
        return JSONResponse(error.body(), status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(Exception)
    async def on_bug(request: Request, exc: Exception):
        log.exception("request failed: %s %s", request.method, request.url.path)
        error = api.ApiError("internal_error", f"internal error: {type(exc).__name__}")
        return JSONResponse(error.body(), status_code=500)

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await server.generate(request, "completion")

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await server.generate(request, "chat")

    @app.get("/v1/models")
    async def models(request: Request):
        return await server.models(request)

    @app.get("/health")
    async def health():
        return await server.health()

    @app.get("/metrics")
    async def metrics():
        return await server.prometheus()

    return app


# --- the process ----------------------------------------------------------------------------


async def _serve(config: Config, sock: socket.socket, parent_pid: int | None) -> None:
    import uvicorn

    async with AsyncClient(config.server.endpoint, timeout_s=OUTPUT_TIMEOUT_S,
                           curve_dir=config.server.curve_dir or None) as client:
        server = OpenAIServer(client, api_key(config.server), config.scheduler.max_request_bytes,
                              config.server.served_model_names)
        uv_config = uvicorn.Config(build_app(server), log_config=None, access_log=False, lifespan="off",
                                   timeout_graceful_shutdown=GRACEFUL_EXIT_S, server_header=False)
        uv_server = uvicorn.Server(uv_config)
        watch = asyncio.get_running_loop().create_task(_watch_parent(uv_server, parent_pid)) if parent_pid else None
        log.info("HTTP front end serving on %s for the runtime at %s", listen_url(sock), config.server.endpoint)
        try:
            await uv_server.serve(sockets=[sock])
        finally:
            if watch is not None:
                watch.cancel()


async def _watch_parent(uv_server, parent_pid: int) -> None:
    """A daemon-started front end ends with its daemon, whatever way the daemon ended."""
    while os.getppid() == parent_pid:
        await asyncio.sleep(PARENT_CHECK_S)
    log.warning("the daemon (pid %d) is gone: stopping the HTTP front end", parent_pid)
    uv_server.should_exit = True


def run_http_process(config: Config, sock: socket.socket, parent_pid: int | None = None) -> int:
    """The front end's entry: serve until SIGTERM / SIGINT (or the parent daemon's end)."""
    for sig in (signal.SIGTERM, signal.SIGINT):  # uvicorn re-raises these after its graceful stop
        signal.signal(sig, lambda *_: None)
    disable_created_metrics()  # no *_created series: this process's counters start with it
    with asyncio.Runner(loop_factory=_loop_factory()) as runner:
        runner.run(_serve(config, sock, parent_pid))
    return 0


def _loop_factory():
    """uvloop's event loop where it is installed (the `http` extra, except on Windows), else
    asyncio's own. With httptools (which uvicorn picks by itself) it cut the HTTP front end's
    throughput cost on the tiny models from about 19% to 7-8% of the ZeroMQ client's."""
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


def main(argv: list[str]) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    parser = argparse.ArgumentParser(prog="python -m minedraft.runtime.http_server")
    parser.add_argument("config_json", help="the daemon's config.json")
    parser.add_argument("--fd", type=int, help="an inherited listening socket (default: bind server.http)")
    parser.add_argument("--parent-pid", type=int, help="exit when this process is no longer the parent")
    args = parser.parse_args(argv)
    with open(args.config_json) as f:
        config = config_from_dict(json.load(f))
    sock = socket.socket(fileno=args.fd) if args.fd is not None else bind_listener(config.server.http)
    return run_http_process(config, sock, args.parent_pid)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
