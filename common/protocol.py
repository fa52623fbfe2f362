"""Every message that crosses a process boundary, and its msgpack codec.

Owns the wire format only: no sockets, no torch. A message is a msgpack map
{"type": TAG, "v": PROTOCOL_VERSION, **fields}; decoding checks the tag, the version, every
field's presence and type, and refuses anything else with ProtocolError. Nothing is pickled.
Also the workers' role names and the one SamplingParams type a request's sampling fields
become when it enters the daemon (carried by JobRow, turned into tensors by the workers).
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from typing import Any, ClassVar, Optional, Union

import msgpack

PROTOCOL_VERSION = 8  # 8: predraft_hits 2 (a branch); 7: pre-drafting (DraftJob.predraft_s, DraftResult's predraft fields); 6: min_tokens, num_prompt_tokens, max_batch, memory
MAX_NESTING = 8  # deepest container nesting any message needs (handles are the deepest)


DRAFTER, VERIFIER = "drafter", "verifier"  # the workers' roles, in messages, logs and status
ROLES = (DRAFTER, VERIFIER)


class ProtocolError(ValueError):
    """A frame that is not a valid message of this protocol."""


# --- client -> scheduler -------------------------------------------------------------------


@dataclass(frozen=True)
class GenerateRequest:
    """Client to scheduler: start a request; outputs stream back as GenerateOutput."""

    TYPE: ClassVar[str] = "generate"
    request_id: str
    prompt: Optional[str] = None  # text, tokenized by the scheduler; or prompt_ids
    prompt_ids: Optional[list[int]] = None
    max_tokens: int = 64
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: Optional[int] = None  # None: the scheduler picks one
    stop: list[str] = field(default_factory=list)  # stop strings (not included in the output)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    min_tokens: int = 0  # no EOS, stop token or stop string ends the request before this many output tokens


@dataclass(frozen=True)
class AbortRequest:
    """Client to scheduler: abort a request (harmless if unknown or finished)."""

    TYPE: ClassVar[str] = "abort"
    request_id: str


@dataclass(frozen=True)
class StatusRequest:
    """Client to scheduler: ask for a StatusOutput."""

    TYPE: ClassVar[str] = "status"
    is_detailed: bool = False  # include recent worker busy intervals


@dataclass(frozen=True)
class ShutdownRequest:
    """Client to scheduler: finish or abort in-flight requests, then stop the daemon."""

    TYPE: ClassVar[str] = "shutdown"


# --- scheduler -> client -------------------------------------------------------------------


@dataclass(frozen=True)
class GenerateOutput:
    """Scheduler to client: tokens committed for a request since its previous output."""

    TYPE: ClassVar[str] = "output"
    request_id: str
    token_ids: list[int]
    text: str  # decoded text delta of token_ids (stop strings removed)
    is_finished: bool = False
    finish_reason: Optional[str] = None  # "length" | "stop" | "abort" | "error"
    metrics: Optional[dict] = None  # on the final output: RequestMetrics fields
    num_prompt_tokens: int = 0  # the request's prompt length in tokens (front ends report usage per chunk)


@dataclass(frozen=True)
class ErrorOutput:
    """Scheduler to client: a request (or a frame) was refused or failed; terminal for it."""

    TYPE: ClassVar[str] = "error"
    request_id: Optional[str]
    code: str  # "invalid_request" | "overloaded" | "runtime_dead" | "bad_frame" | "shutting_down"
    message: str


@dataclass(frozen=True)
class StatusOutput:
    """Scheduler to client: the runtime's state and metrics."""

    TYPE: ClassVar[str] = "status_output"
    status: dict


@dataclass(frozen=True)
class ShutdownOutput:
    """Scheduler to client: the shutdown has begun."""

    TYPE: ClassVar[str] = "shutdown_output"
    num_aborted: int


# --- scheduler -> workers ------------------------------------------------------------------


@dataclass(frozen=True)
class SamplingParams:
    """A request's sampling parameters: built once, when the request enters the daemon (its
    seed drawn there when the client gave none), kept on its record, sent with its first job to
    each worker and turned into tensors there (workers/sampling.py)."""

    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # keep the k most likely tokens; 0 = off
    top_p: float = 1.0  # nucleus mass to keep; 1.0 = off
    seed: int = 0  # seeds the request's generators (workers/sampling.make_generator)

    def __post_init__(self) -> None:
        if not (math.isfinite(self.temperature) and self.temperature >= 0.0):
            raise ValueError(f"temperature must be finite and >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not 0.0 <= self.top_p <= 1.0:
            raise ValueError(f"top_p must be in [0, 1], got {self.top_p}")

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0.0


@dataclass(frozen=True)
class JobRow:
    """One request in a draft or verify job."""

    request_id: str
    new_tokens: list[int]  # tokens committed since this worker's previous job for the request
    num_draft: int  # draft tokens to make (draft job) or to verify (verify job)
    buffer_row: int  # row of the batch's draft buffer holding this request's drafts
    params: Optional[SamplingParams] = None  # only on the first job a worker gets for the request


@dataclass(frozen=True)
class DraftJob:
    """Scheduler to drafter: draft the rows of batch batch_id into that batch's draft buffer."""

    TYPE: ClassVar[str] = "draft_job"
    batch_id: int
    rows: list[JobRow]
    release: list[str] = field(default_factory=list)  # request_ids whose slots to free first
    capacity: Optional[int] = None  # TETRIS: keep the best `capacity` drafted positions of the batch (None: all)
    num_threads: Optional[int] = None  # CPU only: torch threads for this job (None: keep the worker's)
    cpu_cores: Optional[list[int]] = None  # CPU only: cores for every thread of the worker (None: keep)
    draft_id: Optional[int] = None  # the scheduler's number for this draft (frames transport: tags the drafts sent)
    # Pre-drafting: keep each row's drafts as its chain (None: drop chains) and, after the result,
    # draft on along the chains for up to this many seconds while the verifier checks them.
    predraft_s: Optional[float] = None


@dataclass(frozen=True)
class VerifyJob:
    """Scheduler to verifier: verify batch batch_id's drafts, read in place from its draft buffer."""

    TYPE: ClassVar[str] = "verify_job"
    batch_id: int
    rows: list[JobRow]
    release: list[str] = field(default_factory=list)
    num_threads: Optional[int] = None  # CPU only: torch threads for this job (None: keep the worker's)
    cpu_cores: Optional[list[int]] = None  # CPU only: cores for every thread of the worker (None: keep)
    draft_id: Optional[int] = None  # the DraftJob whose drafts this verifies (None: no drafts, an ar step)


@dataclass(frozen=True)
class PrefillJob:
    """Scheduler to verifier, while the drafter drafts these requests' first step: cache each
    prompt but its last token, so their first verify feeds only that token and the drafts. Uses
    the verifier's idle time (sd, psd); changes no result."""

    TYPE: ClassVar[str] = "prefill_job"
    rows: list[JobRow]  # num_draft and buffer_row unused
    release: list[str] = field(default_factory=list)
    num_threads: Optional[int] = None  # CPU only: torch threads for this job (None: keep the worker's)
    cpu_cores: Optional[list[int]] = None  # CPU only: cores for every thread of the worker (None: keep)


@dataclass(frozen=True)
class ConnectJob:
    """Scheduler to verifier: attach the drafter's draft buffers (once, after start-up); answered
    by a ConnectResult, or a WorkerError when attaching fails."""

    TYPE: ClassVar[str] = "connect_job"
    draft_buffers: list[dict]  # SharedBuffers handles, index = batch_id


@dataclass(frozen=True)
class ShutdownJob:
    """Scheduler to a worker: release everything and exit."""

    TYPE: ClassVar[str] = "shutdown_job"


# --- workers -> scheduler ------------------------------------------------------------------


@dataclass(frozen=True)
class ReadyResult:
    """Worker to scheduler: start-up handshake (model loaded, buffers allocated)."""

    TYPE: ClassVar[str] = "ready"
    role: str  # "drafter" | "verifier"
    protocol_version: int
    pid: int
    model: str
    vocab_size: int
    max_len: int  # longest sequence the worker's model and cache accept
    eos_token_ids: list[int]
    tokenizer: dict  # {"kind": "bytes"} or {"kind": "file", "path": ...}
    buffers: list[dict] = field(default_factory=list)  # handles the worker produces, by batch_id
    linear: dict = field(default_factory=dict)  # which linear path serves which weight shape (fast_linear.LinearReport)
    max_batch: int = 0  # requests per batch its KV cache (and draft buffers) hold: scheduler.max_batch resolved (0: as configured)
    memory: dict = field(default_factory=dict)  # bytes at start: weights, KV cache, draft buffers against resident (process.memory_report)


@dataclass(frozen=True)
class DraftResult:
    """Drafter to scheduler: batch batch_id's drafts are in its draft buffer."""

    TYPE: ClassVar[str] = "draft_result"
    batch_id: int
    num_rows: int
    busy_start_s: float  # worker's time.monotonic() at job start and end
    busy_end_s: float
    num_kept: list[int] = field(default_factory=list)  # per row in job order: leading drafts to verify
    scores: list[list[float]] = field(default_factory=list)  # per row: cumulative draft log-prob per drafted position
    num_threads: int = 0  # the threads and cores the job ran with (as the worker observed them)
    cpu_cores: list[int] = field(default_factory=list)
    switch_s: float = 0.0  # time spent changing threads / cores before the job (0 when unchanged)
    # Pre-drafting, per row in job order: -1 no pre-drafted chain, 0 a miss, 1 a hit (the chain
    # was the outcome), 2 a hit on a shorter branch; drafts served without a forward.
    predraft_hits: list[int] = field(default_factory=list)
    num_served: list[int] = field(default_factory=list)
    saved_s: float = 0.0  # the draft forwards this job did not run, at the drafter's measured time per forward
    # The pre-draft that followed the drafter's previous job (worker clock; 0 forwards: none).
    predraft_start_s: float = 0.0
    predraft_end_s: float = 0.0
    predraft_forwards: int = 0
    predraft_tokens: int = 0


@dataclass(frozen=True)
class VerifyResult:
    """Verifier to scheduler: tokens emitted per row (accepted drafts + one corrected/bonus token)."""

    TYPE: ClassVar[str] = "verify_result"
    batch_id: int
    emitted: list[list[int]]  # in job row order
    busy_start_s: float
    busy_end_s: float
    num_threads: int = 0  # the threads and cores the job ran with (as the worker observed them)
    cpu_cores: list[int] = field(default_factory=list)
    switch_s: float = 0.0  # time spent changing threads / cores before the job (0 when unchanged)
    draft_frame_bytes: int = 0  # frames transport: bytes of draft messages received for this job


@dataclass(frozen=True)
class PrefillResult:
    """Verifier to scheduler: the prefill job is done."""

    TYPE: ClassVar[str] = "prefill_result"
    num_rows: int
    busy_start_s: float
    busy_end_s: float
    num_threads: int = 0  # the threads and cores the job ran with (as the worker observed them)
    cpu_cores: list[int] = field(default_factory=list)
    switch_s: float = 0.0  # time spent changing threads / cores before the job (0 when unchanged)


@dataclass(frozen=True)
class ConnectResult:
    """Verifier to scheduler: the ConnectJob's draft buffers are attached; start waits for it."""

    TYPE: ClassVar[str] = "connect_result"
    num_buffers: int  # buffer sets attached, index = batch_id
    device: str  # where the attached tensors are, in the verifier's numbering ("cpu", "cuda:1")
    device_uuid: Optional[str] = None  # CUDA: that device's UUID (numbering differs between workers)
    kind: str = ""  # the transport attached: "shm", "cuda_ipc" or "frames" (the handles' kind)


@dataclass(frozen=True)
class WorkerError:
    """Worker to scheduler: a job or the start-up failed; the scheduler decides what follows."""

    TYPE: ClassVar[str] = "worker_error"
    role: str
    message: str
    traceback: str
    batch_id: Optional[int] = None


MESSAGE_TYPES: dict[str, type] = {
    cls.TYPE: cls
    for cls in (
        GenerateRequest, AbortRequest, StatusRequest, ShutdownRequest,
        GenerateOutput, ErrorOutput, StatusOutput, ShutdownOutput,
        DraftJob, VerifyJob, PrefillJob, ConnectJob, ShutdownJob,
        ReadyResult, DraftResult, VerifyResult, PrefillResult, ConnectResult, WorkerError,
    )
}
_NESTED = (SamplingParams, JobRow)


# --- codec ---------------------------------------------------------------------------------


def _to_wire(value: Any) -> Any:
    if dataclasses.is_dataclass(value):
        return {f.name: _to_wire(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, (list, tuple)):
        return [_to_wire(v) for v in value]
    return value


def encode(message: Any) -> bytes:
    """Message dataclass -> msgpack bytes."""
    body = _to_wire(message)
    body["type"] = message.TYPE
    body["v"] = PROTOCOL_VERSION
    return msgpack.packb(body, use_bin_type=True)


def decode(frame: bytes, allowed: tuple[type, ...] | None = None, max_bytes: int | None = None) -> Any:
    """msgpack bytes -> message dataclass; ProtocolError for anything else.

    allowed: the message classes this receiver accepts (others are refused by name).
    """
    if not isinstance(frame, (bytes, bytearray, memoryview)):
        raise ProtocolError("frame is not bytes")
    if max_bytes is not None and len(frame) > max_bytes:
        raise ProtocolError(f"frame of {len(frame)} bytes exceeds the limit of {max_bytes}")
    try:
        body = msgpack.unpackb(frame, raw=False, strict_map_key=True, use_list=True)
    except Exception as exc:  # msgpack raises several unrelated types on garbage
        raise ProtocolError(f"not valid msgpack: {type(exc).__name__}") from None
    if not isinstance(body, dict):
        raise ProtocolError("message is not a map")
    tag, version = body.pop("type", None), body.pop("v", None)
    if version != PROTOCOL_VERSION:
        raise ProtocolError(f"protocol version {version!r} != {PROTOCOL_VERSION}")
    cls = MESSAGE_TYPES.get(tag) if isinstance(tag, str) else None
    if cls is None:
        raise ProtocolError(f"unknown message type {tag!r}")
    if allowed is not None and cls not in allowed:
        raise ProtocolError(f"message type {tag!r} is not accepted here")
    return _build(cls, body, tag, 0)


def _build(cls: type, body: Any, where: str, depth: int) -> Any:
    if not isinstance(body, dict):
        raise ProtocolError(f"{where}: expected a map")
    hints = _hints(cls)
    unknown = set(body) - set(hints)
    if unknown:
        raise ProtocolError(f"{where}: unknown field(s) {sorted(map(str, unknown))}")
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name in body:
            kwargs[f.name] = _check(body[f.name], hints[f.name], f"{where}.{f.name}", depth + 1)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ProtocolError(f"{where}: missing field {f.name!r}")
    try:
        return cls(**kwargs)
    except ValueError as exc:  # a value its type refuses (SamplingParams)
        raise ProtocolError(f"{where}: {exc}") from None


def _check(value: Any, hint: Any, where: str, depth: int) -> Any:
    if depth > MAX_NESTING:
        raise ProtocolError(f"{where}: nested too deeply")
    origin = typing.get_origin(hint)
    if origin in (Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        (inner,) = [o for o in options if o is not type(None)]
        return _check(value, inner, where, depth)
    if origin is list:
        if not isinstance(value, list):
            raise ProtocolError(f"{where}: expected a list")
        (item,) = typing.get_args(hint)
        return [_check(v, item, f"{where}[]", depth + 1) for v in value]
    if hint in _NESTED:
        return _build(hint, value, where, depth)
    if hint is dict:
        if not isinstance(value, dict):
            raise ProtocolError(f"{where}: expected a map")
        _check_depth(value, where, depth)
        return value
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is int and isinstance(value, bool) or not isinstance(value, hint):
        raise ProtocolError(f"{where}: expected {hint.__name__}, got {type(value).__name__}")
    return value


def _check_depth(value: Any, where: str, depth: int) -> None:
    if depth > MAX_NESTING:
        raise ProtocolError(f"{where}: nested too deeply")
    children = value.values() if isinstance(value, dict) else value if isinstance(value, list) else ()
    for child in children:
        _check_depth(child, where, depth + 1)


_HINTS: dict[type, dict] = {}


def _hints(cls: type) -> dict:
    if cls not in _HINTS:
        _HINTS[cls] = typing.get_type_hints(cls)
    return _HINTS[cls]


CLIENT_REQUESTS = (GenerateRequest, AbortRequest, StatusRequest, ShutdownRequest)
CLIENT_OUTPUTS = (GenerateOutput, ErrorOutput, StatusOutput, ShutdownOutput)
WORKER_JOBS = (DraftJob, VerifyJob, PrefillJob, ConnectJob, ShutdownJob)
WORKER_RESULTS = (ReadyResult, DraftResult, VerifyResult, PrefillResult, ConnectResult, WorkerError)
