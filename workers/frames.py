"""The "frames" draft transport, for a drafter and a verifier that share no memory (different
hosts, or forced by `cluster.draft_transport = "frames"`).

Each side holds its own draft buffers, one set per batch, with the layout of
buffers.draft_buffer_specs. After every draft job the drafter sends one multipart message on a
PUSH socket: a msgpack header, then its buffer's token rows and, for each sampled row, that
row's draft distributions, each frame sent from the tensor's own memory without a copy. The
verifier's PULL socket receives each frame straight into the same place of its buffer for that
batch, so verify reads its buffer exactly as it does with shared memory. Nothing is unpickled;
the header and every frame size are checked.

Ownership: a batch's sending buffer is not written again before that batch is verified, and the
verifier has then received the message, so the zero-copy frames never see their memory change.
Each message carries the scheduler's draft_id; the verifier takes messages in order until the
one its verify job names has arrived (one for another batch lands in that batch's buffer).
CPU tensors only, for now.
"""

from __future__ import annotations

import copy
import time

import msgpack
import torch
import zmq

from minedraft.common import curve as cv
from minedraft.workers.buffers import TensorSpec, check_tensor_fields, layout_tensors, tensor_views

POLL_MS = 100


class FrameBuffers:
    """One batch's draft buffers in this process's own memory (the frames transport's sets)."""

    def __init__(self, fields: dict, handle: dict):
        self.tensors: dict[str, torch.Tensor] = tensor_views(torch.zeros(handle["size_bytes"], dtype=torch.uint8), fields)
        self.device = torch.device("cpu")
        self.device_uuid = None
        self._handle = handle

    @classmethod
    def create(cls, specs: dict[str, TensorSpec], endpoint: str, curve_public: str | None = None) -> "FrameBuffers":
        """endpoint: where the sender is bound; curve_public: its CURVE public key, when it is a
        CURVE server (tcp://)."""
        fields, size_bytes = layout_tensors(specs)
        handle = {"kind": "frames", "endpoint": endpoint, "size_bytes": size_bytes, "tensors": fields}
        if curve_public is not None:
            handle["curve_public"] = curve_public
        return cls(fields, handle)

    @classmethod
    def attach(cls, handle: dict) -> "FrameBuffers":
        """The consumer's own copy of a producer's set (same layout); checks the handle."""
        if not isinstance(handle, dict) or set(handle) - {"curve_public"} != {"kind", "endpoint", "size_bytes", "tensors"}:
            raise ValueError("bad frames handle: expected kind, endpoint, size_bytes, tensors (and curve_public); "
                             f"got {handle!r:.200}")
        public = handle.get("curve_public")
        if public is not None and not (isinstance(public, str) and len(public) == 40):  # z85 of 32 bytes
            raise ValueError(f"bad frames handle: curve_public {public!r}")
        endpoint, size_bytes = handle["endpoint"], handle["size_bytes"]
        if handle["kind"] != "frames" or not isinstance(endpoint, str) or not endpoint.startswith(("ipc://", "tcp://")):
            raise ValueError(f"bad frames handle: kind {handle['kind']!r}, endpoint {endpoint!r}")
        if type(size_bytes) is not int or size_bytes < 1:
            raise ValueError(f"bad frames handle: size_bytes {size_bytes!r}")
        check_tensor_fields(handle["tensors"], size_bytes)
        if set(handle["tensors"]) != {"draft_tokens", "draft_probs"}:
            raise ValueError(f"bad frames handle: tensors {sorted(handle['tensors'])} != draft_tokens, draft_probs")
        return cls(handle["tensors"], handle)

    def handle(self) -> dict:
        return copy.deepcopy(self._handle)

    def sync(self) -> None:
        """Nothing to wait for: the tensors are host memory written by this process."""

    def close(self) -> None:
        self.tensors = {}

    def unlink(self) -> None:
        """Nothing to remove (no shared segment)."""

    @property
    def names(self) -> list[str]:
        return []


def _frame(tensor: torch.Tensor) -> memoryview:
    """The tensor's own bytes (contiguous), for a frame sent without a copy."""
    assert tensor.is_contiguous()
    return memoryview(tensor.numpy()).cast("B")


class FrameSender:
    """The drafter's end: binds the PUSH socket its buffer handles name (endpoint may end in ":*"
    for any free port; self.endpoint is where it is bound). server_keys: (public, secret) to make
    it a CURVE server, whose ZAP handler the caller runs."""

    def __init__(self, context: zmq.Context, endpoint: str, server_keys: tuple[str, str] | None = None,
                 ports: tuple[int, ...] = ()):
        """ports: (first, last) to bind a "tcp://HOST:*" endpoint in (cluster.worker_ports)."""
        self.sock = context.socket(zmq.PUSH)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.curve_public = None
        if server_keys is not None:
            cv.make_server(self.sock, *server_keys)
            self.curve_public = server_keys[0]
        if endpoint.startswith("tcp://") and endpoint.endswith(":*"):
            self.endpoint = cv.bind_tcp(self.sock, endpoint[len("tcp://"):-2], ports)
        else:
            self.sock.bind(endpoint)
            self.endpoint = self.sock.getsockopt_string(zmq.LAST_ENDPOINT)
        self.num_bytes = 0

    def send(self, buffers: FrameBuffers, batch_id: int, draft_id: int, rows: list[tuple[int, int, bool]]) -> None:
        """rows: (buffer_row, num_tokens, is_sampled) of each drafted row; the token frame holds
        buffer rows 0..max, then one frame per sampled row with its first num_tokens distributions."""
        tokens, probs = buffers.tensors["draft_tokens"], buffers.tensors["draft_probs"]
        num_rows = max((row for row, _, _ in rows), default=-1) + 1
        header = msgpack.packb({"batch_id": batch_id, "draft_id": draft_id, "num_rows": num_rows,
                                "rows": [[row, n, is_sampled] for row, n, is_sampled in rows]})
        frames = [header, _frame(tokens[:num_rows])]
        frames += [_frame(probs[row, :n]) for row, n, is_sampled in rows if is_sampled and n > 0]
        self.sock.send_multipart(frames, copy=False)
        self.num_bytes += sum(len(f) for f in frames)

    def close(self) -> None:
        self.sock.close(linger=0)


class FrameReceiver:
    """The verifier's end: connects a PULL socket and fills its own buffer sets."""

    def __init__(self, context: zmq.Context, endpoint: str, buffers: list[FrameBuffers], timeout_s: float,
                 server_public: str | None = None, keys: dict[str, str] | None = None):
        """server_public, keys: the sender's CURVE public key and this worker's key pair (tcp://)."""
        self.sock = context.socket(zmq.PULL)
        self.sock.setsockopt(zmq.LINGER, 0)
        if server_public is not None:
            cv.make_client(self.sock, server_public, keys)
        self.sock.connect(endpoint)
        self.buffers = buffers
        self.timeout_s = timeout_s
        self.draft_ids: dict[int, int] = {}  # batch_id -> the draft its buffer holds
        self.num_bytes = 0

    def wait_for(self, batch_id: int, draft_id: int) -> int:
        """Receive messages until batch batch_id's buffer holds draft draft_id; returns the bytes
        received meanwhile (0 when it already did)."""
        deadline, start_bytes = time.monotonic() + self.timeout_s, self.num_bytes
        while self.draft_ids.get(batch_id) != draft_id:
            if not self.sock.poll(POLL_MS):
                if time.monotonic() > deadline:
                    raise RuntimeError(f"batch_id={batch_id}: the drafts of draft_id={draft_id} did not "
                                       f"arrive within {self.timeout_s} s")
                continue
            self._receive_one()
        return self.num_bytes - start_bytes

    def _receive_one(self) -> None:
        frame = self.sock.recv()
        self.num_bytes += len(frame)
        header = _parse_header(frame, len(self.buffers))
        tensors = self.buffers[header["batch_id"]].tensors
        tokens, probs = tensors["draft_tokens"], tensors["draft_probs"]
        if header["num_rows"] > tokens.shape[0] or any(
                row >= tokens.shape[0] or n > tokens.shape[1] for row, n, _ in header["rows"]):
            raise ValueError(f"draft frames header {header!r:.300} exceeds the buffers {list(tokens.shape)}")
        targets = [tokens[: header["num_rows"]]]
        targets += [probs[row, :n] for row, n, is_sampled in header["rows"] if is_sampled and n > 0]
        for target in targets:
            if not self.sock.getsockopt(zmq.RCVMORE):
                raise ValueError(f"draft frames message ended early ({len(targets)} frames expected)")
            view = _frame(target)
            size = self.sock.recv_into(view)
            if size != view.nbytes:
                raise ValueError(f"draft frame of {size} bytes where {view.nbytes} were expected")
            self.num_bytes += size
        if self.sock.getsockopt(zmq.RCVMORE):
            raise ValueError("draft frames message has more frames than its header lists")
        self.draft_ids[header["batch_id"]] = header["draft_id"]

    def close(self) -> None:
        self.sock.close(linger=0)


def _parse_header(frame: bytes, num_batches: int) -> dict:
    try:
        header = msgpack.unpackb(frame, raw=False, strict_map_key=True)
    except Exception as exc:  # msgpack raises several types for malformed input
        raise ValueError(f"draft frames header is not msgpack: {exc}") from None
    is_int = lambda v: type(v) is int and v >= 0  # noqa: E731
    if not (isinstance(header, dict) and set(header) == {"batch_id", "draft_id", "num_rows", "rows"}
            and is_int(header["batch_id"]) and header["batch_id"] < num_batches and is_int(header["draft_id"])
            and is_int(header["num_rows"]) and isinstance(header["rows"], list)
            and all(isinstance(r, list) and len(r) == 3 and is_int(r[0]) and is_int(r[1]) and type(r[2]) is bool
                    and r[0] < header["num_rows"] for r in header["rows"])):
        raise ValueError(f"bad draft frames header {header!r:.300}")
    return header
