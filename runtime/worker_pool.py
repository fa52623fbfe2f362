"""The scheduler's side of the worker processes: spawning them, the start-up handshake, their
sockets, liveness (process sentinels and job deadlines) and clean-up. Never imports torch.

Each start is a new generation with fresh ipc socket names, so nothing a dead worker left in a
socket queue can reach its successor.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time

import _posixshmem
import zmq

from minedraft.runtime import protocol as p
from minedraft.runtime.config import Config

log = logging.getLogger("minedraft.workers")
POLL_MS = 100
EXIT_WAIT_S = 5.0
DRAFTER, VERIFIER = "drafter", "verifier"


class StartupError(RuntimeError):
    pass


class WorkerPool:
    def __init__(self, config: Config, run_dir: str, context: zmq.Context):
        self.config = config
        self.run_dir = run_dir
        self.context = context
        self.roles = [VERIFIER] if config.scheduler.mode == "ar" else [DRAFTER, VERIFIER]
        self.generation = 0
        self.procs: dict[str, subprocess.Popen] = {}
        self.ready: dict[str, p.ReadyResult] = {}
        self.send_to: dict[str, zmq.Socket] = {}
        self.recv_from_workers: zmq.Socket | None = None
        self.job_started_s: dict[str, float | None] = {}
        self.max_frame_bytes = 0

    def start(self) -> None:
        """Spawn the workers and complete the handshake; StartupError if they fail."""
        self.generation += 1
        self.recv_from_workers = self._socket(zmq.PULL, "results")
        for role in self.roles:
            self.send_to[role] = self._socket(zmq.PUSH, role)
        config_path = os.path.join(self.run_dir, "config.json")
        for role in self.roles:
            cmd = [sys.executable, "-m", "minedraft.workers.process", role, config_path,
                   self._endpoint(role), self._endpoint("results")]
            self.procs[role] = subprocess.Popen(cmd, stdin=subprocess.DEVNULL)
        self.job_started_s = {role: None for role in self.roles}
        self._handshake()
        if DRAFTER in self.ready:
            drafter, verifier = self.ready[DRAFTER], self.ready[VERIFIER]
            if drafter.vocab_size != verifier.vocab_size:
                raise StartupError(f"vocab mismatch: draft {self.config.model.draft} has {drafter.vocab_size} ids, "
                                   f"target {self.config.model.target} has {verifier.vocab_size}")
            self.send(VERIFIER, p.ConnectJob(drafter.buffers))
            self.job_started_s[VERIFIER] = None  # the connect job needs no answer

    def _handshake(self) -> None:
        deadline = time.monotonic() + self.config.server.startup_timeout_s
        self.ready = {}
        while len(self.ready) < len(self.roles):
            for role, proc in self.procs.items():
                if proc.poll() is not None and role not in self.ready:
                    self._raise_startup_errors()
                    raise StartupError(f"{role} exited with code {proc.returncode} during start-up")
            if time.monotonic() > deadline:
                raise StartupError(f"workers not ready within {self.config.server.startup_timeout_s} s")
            if self.recv_from_workers.poll(POLL_MS):
                message = p.decode(self.recv_from_workers.recv(), p.WORKER_RESULTS)
                if isinstance(message, p.WorkerError):
                    raise StartupError(f"{message.role} failed to start: {message.message}")
                if not isinstance(message, p.ReadyResult) or message.protocol_version != p.PROTOCOL_VERSION:
                    raise StartupError(f"unexpected start-up message {message!r}")
                self.ready[message.role] = message
                log.info("%s linear path: %s", message.role, message.linear)
                log.info("%s ready: pid=%d model=%s vocab=%d", message.role, message.pid, message.model,
                         message.vocab_size)

    def _raise_startup_errors(self) -> None:
        while self.recv_from_workers.poll(200):
            message = p.decode(self.recv_from_workers.recv(), p.WORKER_RESULTS)
            if isinstance(message, p.WorkerError):
                raise StartupError(f"{message.role} failed to start: {message.message}")

    def send(self, role: str, job) -> None:
        frame = p.encode(job)
        self.max_frame_bytes = max(self.max_frame_bytes, len(frame))
        self.send_to[role].send(frame)
        self.job_started_s[role] = time.monotonic()

    def recv(self):
        """The next worker message, or None; marks its worker as not busy."""
        try:
            frame = self.recv_from_workers.recv(zmq.NOBLOCK)
        except zmq.Again:
            return None
        self.max_frame_bytes = max(self.max_frame_bytes, len(frame))
        message = p.decode(frame, p.WORKER_RESULTS)
        role = message.role if isinstance(message, p.WorkerError) else (
            DRAFTER if isinstance(message, p.DraftResult) else VERIFIER)
        self.job_started_s[role] = None
        return message

    def failure(self) -> str | None:
        """Why the workers can no longer serve (a process exited, or a job passed its deadline)."""
        for role, proc in self.procs.items():
            if proc.poll() is not None:
                return f"{role} exited with code {proc.returncode}"
        now = time.monotonic()
        for role, started in self.job_started_s.items():
            if started is not None and now - started > self.config.scheduler.job_timeout_s:
                return f"{role} did not answer a job within {self.config.scheduler.job_timeout_s} s"
        return None

    def stop(self) -> None:
        """Ask the workers to exit, kill those that do not, remove their sockets and buffers."""
        for role, sock in self.send_to.items():
            proc = self.procs.get(role)
            if proc is not None and proc.poll() is None:
                try:
                    sock.send(p.encode(p.ShutdownJob()), zmq.NOBLOCK)
                except zmq.ZMQError:
                    pass
        deadline = time.monotonic() + EXIT_WAIT_S
        for proc in self.procs.values():
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for ready in self.ready.values():  # segments of a worker that died without cleaning up
            unlink_segments(ready.buffers)
        for sock in [*self.send_to.values(), self.recv_from_workers]:
            if sock is not None:
                sock.close(linger=0)
        for name in [*self.send_to, "results"]:
            path = self._endpoint(name)[len("ipc://"):]
            if os.path.exists(path):
                os.unlink(path)
        self.procs, self.ready, self.send_to, self.recv_from_workers = {}, {}, {}, None

    def pids(self) -> dict[str, int]:
        return {role: proc.pid for role, proc in self.procs.items()}

    def _socket(self, kind: int, name: str) -> zmq.Socket:
        sock = self.context.socket(kind)
        sock.setsockopt(zmq.LINGER, 0)
        sock.bind(self._endpoint(name))
        return sock

    def _endpoint(self, name: str) -> str:
        return f"ipc://{os.path.join(self.run_dir, f'{name}-{self.generation}.sock')}"


def unlink_segments(handles: list[dict]) -> None:
    """Remove the CPU shared-memory segments named in buffer handles, if they still exist."""
    for handle in handles:
        if handle.get("kind") == "shm":
            try:
                _posixshmem.shm_unlink("/" + handle["name"].lstrip("/"))
            except FileNotFoundError:
                pass
