"""The scheduler process (the daemon's main process): the client socket, the event loop around
SchedulerCore and the WorkerPool, failure handling and clean-up. Never imports torch.
Run as `python -m minedraft.runtime.server CONFIG_JSON` (the CLI does this).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import sys
import time
from collections import deque

import msgpack
import zmq

from minedraft.runtime import protocol as p
from minedraft.runtime.config import Config, config_from_dict, config_to_dict, format_config, resolve_run_dir
from minedraft.runtime.http_front_end import HttpFrontEnd
from minedraft.runtime.scheduler import SchedulerCore
from minedraft.runtime.tokenizer import make_tokenizer
from minedraft.runtime.worker_pool import DRAFTER, VERIFIER, StartupError, WorkerPool

log = logging.getLogger("minedraft.server")
POLL_MS = 50
LOG_NAME = "daemon.log"
CLIENT_HWM = 10000  # queued frames per client before sends would block (then backlogged)
MAX_FRAMES_PER_LOOP = 1000  # client frames handled before worker results get a turn


class Server:
    def __init__(self, config: Config, run_dir: str):
        self.config = config
        self.run_dir = run_dir
        self.context = zmq.Context()
        self.pool = WorkerPool(config, run_dir, self.context)
        self.core: SchedulerCore | None = None
        self.state = "starting"  # starting -> serving -> stopping | dead
        self.dead_reason: str | None = None
        self.dead_since_s = 0.0
        self.num_restarts = 0
        self.exit_code = 0
        self.backlog: dict[bytes, deque[tuple[float, bytes]]] = {}  # outputs a slow client has not taken
        self.auth = None
        self.is_term_requested = False  # set by SIGTERM; acted on in the loop
        self.http = HttpFrontEnd(config, run_dir) if config.server.http else None  # OpenAI-compatible front end

    # --- start-up ---------------------------------------------------------------------------

    def start(self) -> None:
        server = self.config.server
        if self.http is not None:  # before the workers load: a busy port fails the start at once
            try:
                self.http.bind()
            except RuntimeError as exc:
                raise StartupError(str(exc)) from None
        self.frontend = self.context.socket(zmq.ROUTER)
        # Frames beyond max_request_bytes get an error; beyond twice that the peer is dropped.
        self.frontend.setsockopt(zmq.MAXMSGSIZE, 2 * self.config.scheduler.max_request_bytes)
        self.frontend.setsockopt(zmq.SNDHWM, CLIENT_HWM)
        self.frontend.setsockopt(zmq.RCVHWM, CLIENT_HWM)
        self.frontend.setsockopt(zmq.ROUTER_MANDATORY, 1)  # a vanished client raises instead of dropping
        self.frontend.setsockopt(zmq.LINGER, 0)
        if server.curve_dir:
            self._enable_curve(server.curve_dir)
        self.frontend.bind(server.endpoint)
        self.pool.start()
        verifier = self.pool.ready[VERIFIER]
        max_len = min(r.max_len for r in self.pool.ready.values())
        self.core = SchedulerCore(self.config, make_tokenizer(verifier.tokenizer), verifier.vocab_size, max_len,
                                  verifier.eos_token_ids)
        self.state = "serving"
        if self.http is not None:
            self.http.spawn()

    def _enable_curve(self, curve_dir: str) -> None:
        """CURVE encryption and authentication: only clients whose public key is in
        curve_dir/authorized_clients may talk to the runtime."""
        import zmq.auth
        from zmq.auth.thread import ThreadAuthenticator

        self.auth = ThreadAuthenticator(self.context)
        self.auth.start()
        self.auth.configure_curve(domain="*", location=os.path.join(curve_dir, "authorized_clients"))
        public, secret = zmq.auth.load_certificate(os.path.join(curve_dir, "server.key_secret"))
        self.frontend.curve_publickey, self.frontend.curve_secretkey = public, secret
        self.frontend.curve_server = True

    # --- the loop ---------------------------------------------------------------------------

    def serve(self) -> int:
        while True:
            sockets = [self.frontend, self.pool.recv_from_workers] if self.state != "dead" else [self.frontend]
            if all(sock.poll(0) == 0 for sock in sockets):  # dead: the stopped pool has no sockets
                zmq.select(sockets, [], [], POLL_MS / 1000)
            if self.is_term_requested:
                self.is_term_requested = False
                self.begin_shutdown()
            self._on_worker_messages()
            self._on_client_frames()
            if self.state != "dead":
                reason = self.pool.failure()
                if reason is not None:
                    self._on_worker_failure(reason)
            if self.state in ("serving", "stopping"):
                for role, job in self.core.next_jobs():
                    self.pool.send(role, job)
            self._flush_outputs()
            if self.http is not None:
                self.http.check()
            if self.state == "stopping" and not self.core.requests:
                return 0
            if self.state == "dead" and time.monotonic() - self.dead_since_s >= self.config.server.dead_linger_s:
                return 1

    def _on_worker_messages(self) -> None:
        while self.state != "dead" and (message := self.pool.recv()) is not None:
            if isinstance(message, p.DraftResult):
                self.core.on_draft_result(message)
            elif isinstance(message, p.VerifyResult):
                self.core.on_verify_result(message)
            elif isinstance(message, p.PrefillResult):
                self.core.on_prefill_result(message)
            elif isinstance(message, p.WorkerError):
                log.error("%s failed batch_id=%s: %s\n%s", message.role, message.batch_id, message.message,
                          message.traceback)
                self._on_worker_failure(f"{message.role} failed: {message.message}")

    def _on_worker_failure(self, reason: str) -> None:
        """Every live request fails now; then restart the workers, or linger as dead and exit 1."""
        log.error("runtime dead: %s", reason)
        self.core.abort_all("runtime_dead", f"runtime dead: {reason}")
        self._flush_outputs()
        self.pool.stop()
        if self.config.scheduler.restart_workers and self.state != "stopping":
            try:
                self.pool.start()
                self.core.reset_workers()
                self.num_restarts += 1
                log.info("workers restarted (restart %d)", self.num_restarts)
                return
            except StartupError as exc:
                reason = f"{reason}; restart failed: {exc}"
                log.error("%s", reason)
        self.state, self.dead_reason, self.dead_since_s = "dead", reason, time.monotonic()

    def _on_client_frames(self) -> None:
        for _ in range(MAX_FRAMES_PER_LOOP):
            try:
                frames = self.frontend.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            if len(frames) != 2:
                continue  # not a DEALER frame pair: nothing to answer
            client_id, frame = frames
            try:
                message = p.decode(frame, p.CLIENT_REQUESTS, self.config.scheduler.max_request_bytes)
            except p.ProtocolError as exc:
                request_id = _request_id_of(frame)
                code = "invalid_request" if request_id is not None else "bad_frame"
                self.core.outputs.append((client_id, p.ErrorOutput(request_id, code, str(exc))))
                continue
            try:
                self._on_client_message(client_id, message)
            except Exception as exc:  # a bug must fail one request, not the runtime
                log.exception("request handling failed: %r", message)
                self.core.outputs.append((client_id, p.ErrorOutput(getattr(message, "request_id", None),
                                                                   "internal_error", repr(exc))))

    def _on_client_message(self, client_id: bytes, message) -> None:
        core = self.core
        if isinstance(message, p.GenerateRequest):
            if self.state == "dead":
                core.outputs.append((client_id, p.ErrorOutput(message.request_id, "runtime_dead",
                                                              f"runtime dead: {self.dead_reason}")))
            elif self.state == "stopping":
                core.outputs.append((client_id, p.ErrorOutput(message.request_id, "shutting_down",
                                                              "the runtime is stopping")))
            else:
                core.add_request(client_id, message)
        elif isinstance(message, p.AbortRequest):
            core.abort(message.request_id)
        elif isinstance(message, p.StatusRequest):
            core.outputs.append((client_id, p.StatusOutput(self.status(message.is_detailed))))
        elif isinstance(message, p.ShutdownRequest):
            num_aborted = self.begin_shutdown()
            core.outputs.append((client_id, p.ShutdownOutput(num_aborted)))

    def begin_shutdown(self) -> int:
        """Abort in-flight requests (finish reason "shutdown"); the loop ends once they are gone."""
        num_aborted = len(self.core.requests)
        for request_id in list(self.core.requests):
            self.core.abort(request_id, "shutdown")
        if self.state != "dead":
            self.state = "stopping"
        return num_aborted

    # --- outputs ----------------------------------------------------------------------------

    def _flush_outputs(self) -> None:
        now = time.monotonic()
        for client_id, message in self.core.take_outputs():
            self.backlog.setdefault(client_id, deque()).append((now, p.encode(message)))
        for client_id in list(self.backlog):
            queue = self.backlog[client_id]
            while queue:
                try:
                    self.frontend.send_multipart([client_id, queue[0][1]], zmq.NOBLOCK)
                    queue.popleft()
                except zmq.Again:  # the client is not reading
                    if now - queue[0][0] > self.config.server.client_timeout_s:
                        self._drop_client(client_id, "its outputs went unread")
                    break
                except zmq.ZMQError as exc:  # EHOSTUNREACH: the client is gone
                    self._drop_client(client_id, f"it disconnected ({exc})")
                    break
            if not queue:
                self.backlog.pop(client_id, None)

    def _drop_client(self, client_id: bytes, why: str) -> None:
        aborted = self.core.abort_client(client_id)
        self.backlog.pop(client_id, None)
        self.core.take_outputs()  # their final outputs have nowhere to go
        if aborted:
            log.warning("aborted %d request(s) of a client: %s", len(aborted), why)

    def status(self, is_detailed: bool = False) -> dict:
        status = {
            "state": self.state,
            "dead_reason": self.dead_reason,
            "pid": os.getpid(),
            "endpoint": self.config.server.endpoint,
            "target": self.config.model.target,
            "draft": self.config.model.draft if DRAFTER in self.pool.roles else None,
            "dtype": self.config.model.dtype,
            "worker_pids": self.pool.pids(),
            "num_restarts": self.num_restarts,
            "max_worker_frame_bytes": self.pool.max_frame_bytes,
            "linear_path": {role: ready.linear for role, ready in self.pool.ready.items()},
            "draft_buffers": _connected_status(self.pool.connected),
            "draft_transport": self.pool.connected.kind if self.pool.connected is not None else None,
        }
        status.update(self.core.status(is_detailed))
        tokenizer = self.pool.ready[VERIFIER].tokenizer if VERIFIER in self.pool.ready else {}
        status.update({  # what front ends need to translate requests
            "max_len": self.core.max_len,
            "max_tokens_cap": self.config.scheduler.max_tokens_cap,
            "chat_template": tokenizer.get("chat_template"),
            "special_tokens": {key: tokenizer.get(key) for key in ("bos_token", "eos_token")},
            "http": self.http.status() if self.http is not None else None,
        })
        return status

    # --- shutdown ---------------------------------------------------------------------------

    def close(self) -> None:
        if self.http is not None:  # first: no new HTTP requests while the workers go
            self.http.stop()
        self.pool.stop()
        if self.auth is not None:
            self.auth.stop()
        self.context.destroy(linger=0)
        endpoint = self.config.server.endpoint
        if endpoint.startswith("ipc://") and os.path.exists(endpoint[len("ipc://"):]):
            os.unlink(endpoint[len("ipc://"):])
        _remove_run_dir(self.run_dir, keep_log=self.exit_code != 0)


def _connected_status(connected: p.ConnectResult | None) -> dict | None:
    """Where the verifier reads the draft buffers (None without a drafter)."""
    if connected is None:
        return None
    return {"num_buffers": connected.num_buffers, "device": connected.device, "device_uuid": connected.device_uuid}


def _request_id_of(frame: bytes) -> str | None:
    """The request_id of a refused generate frame, if it has a usable one (to route the error)."""
    try:
        body = msgpack.unpackb(frame, raw=False)
    except Exception:
        return None
    request_id = body.get("request_id") if isinstance(body, dict) else None
    return request_id if isinstance(request_id, str) and 0 < len(request_id) <= 128 else None


def _remove_run_dir(run_dir: str, keep_log: bool) -> None:
    """Remove the run directory; after a failure keep daemon.log so the reason can be read."""
    for name in os.listdir(run_dir) if os.path.isdir(run_dir) else []:
        if not (keep_log and name == LOG_NAME):
            path = os.path.join(run_dir, name)
            shutil.rmtree(path, ignore_errors=True) if os.path.isdir(path) else os.unlink(path)
    if not keep_log or not os.path.exists(os.path.join(run_dir, LOG_NAME)):
        shutil.rmtree(run_dir, ignore_errors=True)


def run_scheduler_process(config: Config, run_dir: str) -> int:
    """The daemon's entry: start workers, serve until stopped; returns the exit code
    (0 after a stop, 1 when the runtime died, 2 when it could not start)."""
    os.makedirs(run_dir, mode=0o700, exist_ok=True)
    with open(os.path.join(run_dir, "config.json"), "w") as f:
        json.dump(config_to_dict(config), f)
    with open(os.path.join(run_dir, "daemon.pid"), "w") as f:
        f.write(str(os.getpid()))
    log.info("effective config:\n%s", format_config(config))
    server = Server(config, run_dir)
    signal.signal(signal.SIGTERM, lambda *_: setattr(server, "is_term_requested", True))
    try:
        server.start()
        log.info("serving on %s (mode %s)", config.server.endpoint, config.scheduler.mode)
        server.exit_code = server.serve()
    except StartupError as exc:
        log.error("start-up failed: %s", exc)
        server.exit_code = 2
    except Exception as exc:
        log.exception("scheduler failed")
        server.exit_code = 1
        try:  # every live request still gets its one terminal outcome
            if server.core is not None:
                server.core.abort_all("runtime_dead", f"runtime dead: scheduler error: {type(exc).__name__}: {exc}")
                server._flush_outputs()
        except Exception:
            log.exception("could not tell clients that the scheduler failed")
    finally:
        server.close()
    return server.exit_code


def main(argv: list[str]) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    (config_path,) = argv
    with open(config_path) as f:
        config = config_from_dict(json.load(f))
    return run_scheduler_process(config, resolve_run_dir(config))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
