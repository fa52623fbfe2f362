"""The scheduler process (the daemon's main process): sockets, worker processes, the event loop
around SchedulerCore, and clean-up. Never imports torch; workers are started as subprocesses.
Run as `python -m minedraft.runtime.server RUN_DIR` (RUN_DIR holds config.json).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time

import _posixshmem
import zmq

from minedraft.runtime import protocol as p
from minedraft.runtime.config import Config, config_from_dict, format_config
from minedraft.runtime.scheduler import DRAFTER, VERIFIER, SchedulerCore
from minedraft.runtime.tokenizer import make_tokenizer

log = logging.getLogger("minedraft.server")
POLL_MS = 100
WORKER_EXIT_WAIT_S = 5.0
LOG_NAME = "daemon.log"
CLIENT_HWM = 10000  # queued frames per client socket before zmq pushes back


class StartupError(RuntimeError):
    pass


class Server:
    def __init__(self, config: Config, run_dir: str):
        self.config = config
        self.run_dir = run_dir
        self.roles = [VERIFIER] if config.scheduler.mode == "ar" else [DRAFTER, VERIFIER]
        self.context = zmq.Context()
        self.procs: dict[str, subprocess.Popen] = {}
        self.ready: dict[str, p.ReadyResult] = {}
        self.send_to: dict[str, zmq.Socket] = {}
        self.core: SchedulerCore | None = None
        self.is_stopping = False
        self.exit_code = 0
        self.max_worker_frame_bytes = 0

    # --- start-up ---------------------------------------------------------------------------

    def start(self) -> None:
        cfg = self.config
        self.frontend = self.context.socket(zmq.ROUTER)
        self.frontend.setsockopt(zmq.MAXMSGSIZE, cfg.scheduler.max_request_bytes)
        self.frontend.setsockopt(zmq.SNDHWM, CLIENT_HWM)
        self.frontend.setsockopt(zmq.RCVHWM, CLIENT_HWM)
        self.frontend.setsockopt(zmq.LINGER, 0)
        self.frontend.bind(cfg.server.endpoint)
        self.recv_from_workers = self.context.socket(zmq.PULL)
        self.recv_from_workers.bind(self._ipc("results"))
        for role in self.roles:
            self.send_to[role] = self.context.socket(zmq.PUSH)
            self.send_to[role].setsockopt(zmq.LINGER, 0)
            self.send_to[role].bind(self._ipc(role))
        config_path = os.path.join(self.run_dir, "config.json")
        for role in self.roles:
            cmd = [sys.executable, "-m", "minedraft.workers.process", role, config_path, self._ipc(role), self._ipc("results")]
            self.procs[role] = subprocess.Popen(cmd, stdin=subprocess.DEVNULL)
        self._handshake()
        verifier = self.ready[VERIFIER]
        if DRAFTER in self.ready:
            drafter = self.ready[DRAFTER]
            if drafter.vocab_size != verifier.vocab_size:
                raise StartupError(f"vocab mismatch: draft {cfg.model.draft} has {drafter.vocab_size} ids, "
                                   f"target {cfg.model.target} has {verifier.vocab_size}")
            self._send(VERIFIER, p.ConnectJob(drafter.buffers))
        max_len = min(r.max_len for r in self.ready.values())
        self.core = SchedulerCore(cfg, make_tokenizer(verifier.tokenizer), verifier.vocab_size, max_len,
                                  verifier.eos_token_ids)

    def _handshake(self) -> None:
        deadline = time.monotonic() + self.config.server.startup_timeout_s
        while len(self.ready) < len(self.roles):
            for role, proc in self.procs.items():
                if proc.poll() is not None and role not in self.ready:
                    self._drain_startup_errors()
                    raise StartupError(f"{role} exited with code {proc.returncode} during start-up")
            if time.monotonic() > deadline:
                raise StartupError(f"workers not ready within {self.config.server.startup_timeout_s} s")
            if not self.recv_from_workers.poll(POLL_MS):
                continue
            message = p.decode(self.recv_from_workers.recv(), p.WORKER_RESULTS)
            if isinstance(message, p.WorkerError):
                raise StartupError(f"{message.role} failed to start: {message.message}")
            if not isinstance(message, p.ReadyResult) or message.protocol_version != p.PROTOCOL_VERSION:
                raise StartupError(f"unexpected start-up message {message!r}")
            self.ready[message.role] = message
            log.info("%s ready: pid=%d model=%s vocab=%d", message.role, message.pid, message.model, message.vocab_size)

    def _drain_startup_errors(self) -> None:
        while self.recv_from_workers.poll(200):
            message = p.decode(self.recv_from_workers.recv(), p.WORKER_RESULTS)
            if isinstance(message, p.WorkerError):
                raise StartupError(f"{message.role} failed to start: {message.message}")

    # --- serving ----------------------------------------------------------------------------

    def serve(self) -> int:
        poller = zmq.Poller()
        poller.register(self.frontend, zmq.POLLIN)
        poller.register(self.recv_from_workers, zmq.POLLIN)
        while not self.is_stopping or self.core.requests:
            events = dict(poller.poll(POLL_MS))
            if self.recv_from_workers in events:
                self._on_worker_frames()
            if self.frontend in events:
                self._on_client_frames()
            self._check_workers()
            if self.exit_code:
                break
            for role, job in self.core.next_jobs():
                self._send(role, job)
            self._flush_outputs()
        self._flush_outputs()
        return self.exit_code

    def _on_client_frames(self) -> None:
        while True:
            try:
                frames = self.frontend.recv_multipart(zmq.NOBLOCK, copy=True)
            except zmq.Again:
                return
            if len(frames) != 2:
                continue  # not a DEALER frame pair: nothing to answer
            client_id, frame = frames
            try:
                message = p.decode(frame, p.CLIENT_REQUESTS, self.config.scheduler.max_request_bytes)
            except p.ProtocolError as exc:
                self.core.outputs.append((client_id, p.ErrorOutput(None, "bad_frame", str(exc))))
                continue
            self._on_client_message(client_id, message)

    def _on_client_message(self, client_id: bytes, message) -> None:
        core = self.core
        if isinstance(message, p.GenerateRequest):
            if self.is_stopping:
                core.outputs.append((client_id, p.ErrorOutput(message.request_id, "shutting_down", "the runtime is stopping")))
            else:
                core.add_request(client_id, message)
        elif isinstance(message, p.AbortRequest):
            core.abort(message.request_id)
        elif isinstance(message, p.StatusRequest):
            core.outputs.append((client_id, p.StatusOutput(self.status(message.is_detailed))))
        elif isinstance(message, p.ShutdownRequest):
            num_aborted = len(core.requests)
            for request_id in list(core.requests):
                core.abort(request_id)
            self.is_stopping = True
            core.outputs.append((client_id, p.ShutdownOutput(num_aborted)))

    def _on_worker_frames(self) -> None:
        while True:
            try:
                frame = self.recv_from_workers.recv(zmq.NOBLOCK)
            except zmq.Again:
                return
            self.max_worker_frame_bytes = max(self.max_worker_frame_bytes, len(frame))
            message = p.decode(frame, p.WORKER_RESULTS)
            if isinstance(message, p.DraftResult):
                self.core.on_draft_result(message)
            elif isinstance(message, p.VerifyResult):
                self.core.on_verify_result(message)
            elif isinstance(message, p.WorkerError):
                log.error("%s failed batch_id=%s: %s\n%s", message.role, message.batch_id, message.message, message.traceback)
                self._die(f"{message.role} failed: {message.message}")

    def _check_workers(self) -> None:
        for role, proc in self.procs.items():
            if proc.poll() is not None and not self.exit_code:
                self._die(f"{role} exited with code {proc.returncode}")

    def _die(self, reason: str) -> None:
        log.error("runtime dead: %s", reason)
        self.core.abort_all("runtime_dead", f"runtime dead: {reason}")
        self.exit_code = 1

    def _send(self, role: str, job) -> None:
        frame = p.encode(job)
        self.max_worker_frame_bytes = max(self.max_worker_frame_bytes, len(frame))
        self.send_to[role].send(frame)

    def _flush_outputs(self) -> None:
        for client_id, message in self.core.take_outputs():
            try:
                self.frontend.send_multipart([client_id, p.encode(message)], zmq.NOBLOCK)
            except zmq.Again:
                log.warning("client output dropped (client not reading): request_id=%s", getattr(message, "request_id", None))

    def status(self, is_detailed: bool = False) -> dict:
        status = {
            "state": "stopping" if self.is_stopping else "serving",
            "pid": os.getpid(),
            "endpoint": self.config.server.endpoint,
            "target": self.config.model.target,
            "draft": self.config.model.draft if DRAFTER in self.roles else None,
            "dtype": self.config.model.dtype,
            "worker_pids": {role: proc.pid for role, proc in self.procs.items()},
            "max_worker_frame_bytes": self.max_worker_frame_bytes,
        }
        status.update(self.core.status(is_detailed))
        return status

    # --- shutdown ---------------------------------------------------------------------------

    def close(self) -> None:
        for role, sock in self.send_to.items():
            if self.procs.get(role) is not None and self.procs[role].poll() is None:
                try:
                    sock.send(p.encode(p.ShutdownJob()), zmq.NOBLOCK)
                except zmq.ZMQError:
                    pass
        deadline = time.monotonic() + WORKER_EXIT_WAIT_S
        for proc in self.procs.values():
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for ready in self.ready.values():  # segments a killed worker left behind
            _unlink_segments(ready.buffers)
        self.context.destroy(linger=0)
        endpoint = self.config.server.endpoint
        if endpoint.startswith("ipc://") and os.path.exists(endpoint[len("ipc://"):]):
            os.unlink(endpoint[len("ipc://"):])
        _remove_run_dir(self.run_dir, keep_log=self.exit_code != 0)

    def _ipc(self, name: str) -> str:
        return f"ipc://{os.path.join(self.run_dir, name + '.sock')}"


def _unlink_segments(handles: list[dict]) -> None:
    """Remove the CPU shared-memory segments named in buffer handles, if they still exist."""
    for handle in handles:
        if handle.get("kind") == "shm":
            try:
                _posixshmem.shm_unlink("/" + handle["name"].lstrip("/"))
            except FileNotFoundError:
                pass


def _remove_run_dir(run_dir: str, keep_log: bool) -> None:
    """Remove the run directory; after a failure keep daemon.log so the reason can be read."""
    for name in os.listdir(run_dir) if os.path.isdir(run_dir) else []:
        if not (keep_log and name == LOG_NAME):
            path = os.path.join(run_dir, name)
            shutil.rmtree(path, ignore_errors=True) if os.path.isdir(path) else os.unlink(path)
    if not keep_log or not os.path.exists(os.path.join(run_dir, LOG_NAME)):
        shutil.rmtree(run_dir, ignore_errors=True)


def run_scheduler_process(config: Config, run_dir: str) -> int:
    """The daemon's entry: start workers, serve until stopped; returns the exit code."""
    os.makedirs(run_dir, mode=0o700, exist_ok=True)
    with open(os.path.join(run_dir, "config.json"), "w") as f:
        json.dump(_config_dict(config), f)
    with open(os.path.join(run_dir, "daemon.pid"), "w") as f:
        f.write(str(os.getpid()))
    log.info("effective config:\n%s", format_config(config))
    server = Server(config, run_dir)
    signal.signal(signal.SIGTERM, lambda *_: setattr(server, "is_stopping", True))
    try:
        server.start()
        log.info("serving on %s (mode %s)", config.server.endpoint, config.scheduler.mode)
        return server.serve()
    except StartupError as exc:
        log.error("start-up failed: %s", exc)
        server.exit_code = 2
        return 2
    except Exception:
        log.exception("scheduler failed")
        server.exit_code = 1
        return 1
    finally:
        server.close()


def _config_dict(config: Config) -> dict:
    from minedraft.runtime.config import config_to_dict

    return config_to_dict(config)


def main(argv: list[str]) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    (config_path,) = argv
    with open(config_path) as f:
        config = config_from_dict(json.load(f))
    from minedraft.runtime.config import resolve_run_dir

    return run_scheduler_process(config, resolve_run_dir(config))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
