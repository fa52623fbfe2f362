"""Python clients of the runtime: Client (blocking, thread-safe) and AsyncClient (asyncio).
One DEALER socket each; outputs are routed to their request by request_id. Never imports torch.
"""

from __future__ import annotations

import asyncio
import os
import queue
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field

import zmq
import zmq.asyncio
import zmq.auth

from minedraft.common import protocol as p
from minedraft.runtime.validation import validate_generate

DEFAULT_ENDPOINT = "tcp://127.0.0.1:7475"
POLL_MS = 50
MAX_REQUEST_BYTES = 1048576  # the runtime's default scheduler.max_request_bytes


class RequestError(RuntimeError):
    """The runtime refused or failed a request; code is the ErrorOutput code."""

    def __init__(self, code: str, message: str, request_id: str | None = None):
        super().__init__(f"{code}: {message}")
        self.code, self.message, self.request_id = code, message, request_id


@dataclass
class Completion:
    request_id: str
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    metrics: dict = field(default_factory=dict)  # server-side: ttft_s, e2e_s, num_drafted, num_accepted, ...

    def add(self, output: p.GenerateOutput) -> None:
        self.text += output.text
        self.token_ids.extend(output.token_ids)
        if output.is_finished:
            self.finish_reason = output.finish_reason
            self.metrics = dict(output.metrics or {})


def make_request(prompt=None, *, prompt_ids=None, max_tokens=64, temperature=0.0, top_k=0, top_p=1.0,
                 seed=None, stop=(), stop_token_ids=(), ignore_eos=False, min_tokens=0,
                 request_id=None) -> p.GenerateRequest:
    """Build a GenerateRequest; type errors are caught here, limits by the scheduler."""
    request = p.GenerateRequest(
        request_id=request_id or uuid.uuid4().hex, prompt=prompt,
        prompt_ids=None if prompt_ids is None else list(prompt_ids), max_tokens=max_tokens,
        temperature=float(temperature), top_k=top_k, top_p=float(top_p), seed=seed, stop=list(stop),
        stop_token_ids=list(stop_token_ids), ignore_eos=ignore_eos, min_tokens=min_tokens,
    )
    try:
        frame = p.encode(request)
        p.decode(frame, (p.GenerateRequest,))  # the protocol's own type checks
    except (p.ProtocolError, TypeError, OverflowError) as exc:
        raise ValueError(str(exc)) from None
    if len(frame) > MAX_REQUEST_BYTES:
        raise ValueError(f"request: {len(frame)} bytes exceeds the limit of {MAX_REQUEST_BYTES}")
    error = validate_generate(request)  # limits the client knows; the runtime checks the rest
    if error is not None:
        raise ValueError(error)
    return request


def _socket(context: zmq.Context, endpoint: str, curve_dir: str | None) -> zmq.Socket:
    sock = context.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    if curve_dir:  # keys made by `minedraft-runtime keys`
        sock.curve_publickey, sock.curve_secretkey = zmq.auth.load_certificate(
            os.path.join(curve_dir, "client.key_secret"))
        sock.curve_serverkey, _ = zmq.auth.load_certificate(os.path.join(curve_dir, "server.key"))
    sock.connect(endpoint)
    return sock


def _raise_if_error(message) -> None:
    if isinstance(message, p.ErrorOutput):
        raise RequestError(message.code, message.message, message.request_id)


class Client:
    """Blocking client. Safe to share between threads: one thread at a time reads the socket and
    routes every output to its request's queue."""

    def __init__(self, endpoint: str = DEFAULT_ENDPOINT, timeout_s: float = 600.0, curve_dir: str | None = None):
        self.endpoint = endpoint
        self.timeout_s = timeout_s
        self._context = zmq.Context()
        self._socket = _socket(self._context, endpoint, curve_dir)
        self._lock = threading.Lock()  # guards the socket
        self._call_lock = threading.Lock()  # one status/shutdown call at a time (they share a queue)
        self._queues: dict[str | None, queue.Queue] = {}

    def generate(self, prompt=None, **kwargs) -> Completion:
        completion = None
        for output in self._outputs(make_request(prompt, **kwargs)):
            completion = completion or Completion(output.request_id)
            completion.add(output)
        return completion

    def stream(self, prompt=None, **kwargs) -> Iterator[p.GenerateOutput]:
        """Yield outputs (committed token ids + text delta) as the runtime commits them."""
        yield from self._outputs(make_request(prompt, **kwargs))

    def abort(self, request_id: str) -> None:
        self._send(p.AbortRequest(request_id))

    def status(self, is_detailed: bool = False) -> dict:
        return self._call(p.StatusRequest(is_detailed), p.StatusOutput).status

    def shutdown(self) -> int:
        """Ask the daemon to stop; returns how many in-flight requests it aborted."""
        return self._call(p.ShutdownRequest(), p.ShutdownOutput).num_aborted

    def close(self) -> None:
        self._context.destroy(linger=0)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _outputs(self, request: p.GenerateRequest) -> Iterator[p.GenerateOutput]:
        inbox = self._queues.setdefault(request.request_id, queue.Queue())
        try:
            self._send(request)
            while True:
                message = self._next(request.request_id, inbox)
                _raise_if_error(message)
                yield message
                if message.is_finished:
                    return
        finally:
            self._queues.pop(request.request_id, None)

    def _call(self, request, reply_type):
        """Status and shutdown replies carry no request_id: they share the None queue."""
        with self._call_lock:
            inbox = self._queues.setdefault(None, queue.Queue())
            self._send(request)
            while True:
                message = self._next(None, inbox)
                _raise_if_error(message)
                if isinstance(message, reply_type):
                    return message

    def _send(self, message) -> None:
        with self._lock:
            self._socket.send(p.encode(message))

    def _next(self, key, inbox: queue.Queue):
        deadline = time.monotonic() + self.timeout_s
        while True:
            try:
                return inbox.get_nowait()
            except queue.Empty:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"no answer from {self.endpoint} within {self.timeout_s} s")
            if self._lock.acquire(timeout=POLL_MS / 1000):
                try:
                    if self._socket.poll(POLL_MS):
                        self._route(self._socket.recv())
                finally:
                    self._lock.release()

    def _route(self, frame: bytes) -> None:
        message = p.decode(frame, p.CLIENT_OUTPUTS)
        key = getattr(message, "request_id", None)
        inbox = self._queues.get(key)
        if inbox is not None:
            inbox.put(message)


class AsyncClient:
    """asyncio client: many concurrent requests over one socket. Cancelling a stream aborts its
    request in the runtime."""

    def __init__(self, endpoint: str = DEFAULT_ENDPOINT, timeout_s: float = 600.0, curve_dir: str | None = None):
        self.endpoint = endpoint
        self.timeout_s = timeout_s
        self._context = zmq.asyncio.Context()
        self._socket = _socket(self._context, endpoint, curve_dir)
        self._queues: dict[str | None, asyncio.Queue] = {}
        self._reader: asyncio.Task | None = None
        self._call_lock: asyncio.Lock | None = None

    async def generate(self, prompt=None, **kwargs) -> Completion:
        completion = None
        async for output in self.stream(prompt, **kwargs):
            completion = completion or Completion(output.request_id)
            completion.add(output)
        return completion

    async def stream(self, prompt=None, **kwargs) -> AsyncIterator[p.GenerateOutput]:
        request = make_request(prompt, **kwargs)
        inbox = self._queues.setdefault(request.request_id, asyncio.Queue())
        is_finished = False
        try:
            await self._send(request)
            while not is_finished:
                message = await asyncio.wait_for(inbox.get(), self.timeout_s)
                _raise_if_error(message)
                is_finished = message.is_finished
                yield message
        finally:
            self._queues.pop(request.request_id, None)
            if not is_finished:  # cancelled or abandoned: free the runtime's slots
                await self._send(p.AbortRequest(request.request_id))

    async def abort(self, request_id: str) -> None:
        await self._send(p.AbortRequest(request_id))

    async def status(self, is_detailed: bool = False) -> dict:
        return (await self._call(p.StatusRequest(is_detailed), p.StatusOutput)).status

    async def shutdown(self) -> int:
        return (await self._call(p.ShutdownRequest(), p.ShutdownOutput)).num_aborted

    async def close(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
        self._context.destroy(linger=0)

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc):
        await self.close()

    async def _call(self, request, reply_type):
        self._call_lock = self._call_lock or asyncio.Lock()
        async with self._call_lock:
            inbox = self._queues.setdefault(None, asyncio.Queue())
            await self._send(request)
            while True:
                message = await asyncio.wait_for(inbox.get(), self.timeout_s)
                _raise_if_error(message)
                if isinstance(message, reply_type):
                    return message

    async def _send(self, message) -> None:
        if self._reader is None:
            self._reader = asyncio.get_running_loop().create_task(self._read())
        await self._socket.send(p.encode(message))

    async def _read(self) -> None:
        while True:
            message = p.decode(await self._socket.recv(), p.CLIENT_OUTPUTS)
            inbox = self._queues.get(getattr(message, "request_id", None))
            if inbox is not None:
                inbox.put_nowait(message)
