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

import zmq

from minedraft.common import protocol as p
from minedraft.common.protocol import DRAFTER, VERIFIER
from minedraft.common.config import Config, draft_transport
from minedraft.runtime.metrics import format_memory

log = logging.getLogger("minedraft.workers")
POLL_MS = 100
EXIT_WAIT_S = 5.0


class StartupError(RuntimeError):
    pass


class WorkerPool:
    def __init__(self, config: Config, run_dir: str, context: zmq.Context):
        self.config = config
        self.run_dir = run_dir
        self.context = context
        self.roles = [DRAFTER, VERIFIER] if config.scheduler.speculates else [VERIFIER]
        self.generation = 0
        self.procs: dict[str, subprocess.Popen] = {}
        self.ready: dict[str, p.ReadyResult] = {}
        self.send_to: dict[str, zmq.Socket] = {}
        self.recv_from_workers: zmq.Socket | None = None
        self.job_started_s: dict[str, float | None] = {}
        self.max_frame_bytes = 0
        self.connected: p.ConnectResult | None = None  # what the verifier attached (None: no drafter)
        self._start_phase, self._start_deadline = "done", 0.0  # poll_start's progress

    def start(self) -> None:
        """Spawn the workers, complete the handshake and, with a drafter, wait until the verifier
        has attached the draft buffers; StartupError (with the reason) if any of it fails."""
        self.begin_start()
        while not self.poll_start():
            self.recv_from_workers.poll(POLL_MS)

    def begin_start(self) -> None:
        """Spawn the workers; poll_start then follows their start-up without blocking, so a
        replica restarting does not hold up the others."""
        self.generation += 1
        self._prepare_sockets()
        self.recv_from_workers = self._socket(zmq.PULL, "results")
        for role in self.roles:
            self.send_to[role] = self._socket(zmq.PUSH, role)
        self.ready, self.connected, self.procs = {}, None, {}
        self.job_started_s = {role: None for role in self.roles}
        self._start_deadline = time.monotonic() + self.config.server.startup_timeout_s
        self._start_phase = self._launch()

    def _prepare_sockets(self) -> None:
        """Before this start's sockets are made (ipc:// sockets need nothing)."""

    def _launch(self) -> str:
        """Start the workers; returns the first start-up phase."""
        for role in self.roles:
            self.procs[role] = self._spawn(role)
        return "start"

    def _spawn(self, role: str) -> subprocess.Popen:
        cmd = [sys.executable, "-m", "minedraft.workers.process", role, os.path.join(self.run_dir, "config.json"),
               self._endpoint(role), self._endpoint("results")]
        if role == DRAFTER and draft_transport(self.config) == "frames":
            cmd.append(self._endpoint("drafts"))  # the drafter binds it, the verifier connects
        return subprocess.Popen(cmd, stdin=subprocess.DEVNULL)

    def poll_start(self) -> bool:
        """Take the start-up messages that have come: True once every worker is ready and the
        verifier has attached the draft buffers; StartupError when a worker exits or reports an
        error, or a phase passes server.startup_timeout_s."""
        while self._start_phase != "done":
            message = self._next_startup_message(self._start_phase)
            if message is None:
                return False
            if self._start_phase == "start":
                self._on_ready(message)
            else:
                self._on_connected(message)
        return True

    def _on_ready(self, message) -> None:
        if not isinstance(message, p.ReadyResult) or message.protocol_version != p.PROTOCOL_VERSION:
            raise StartupError(f"unexpected start-up message {message!r}")
        self.ready[message.role] = message
        log.info("%s linear path: %s", message.role, message.linear)
        if message.memory:
            log.info("%s memory at start: %s", message.role, format_memory(message.memory))
        log.info("%s ready: pid=%d model=%s vocab=%d", message.role, message.pid, message.model, message.vocab_size)
        if len(self.ready) < len(self.roles):
            return
        if DRAFTER not in self.ready:
            self._start_phase = "done"
            return
        drafter, verifier = self.ready[DRAFTER], self.ready[VERIFIER]
        if drafter.vocab_size != verifier.vocab_size:
            raise StartupError(f"vocab mismatch: draft {self.config.model.draft} has {drafter.vocab_size} ids, "
                               f"target {self.config.model.target} has {verifier.vocab_size}")
        self.send(VERIFIER, p.ConnectJob(drafter.buffers))  # hand the drafter's buffer handles to the verifier
        self._start_phase = "attach the draft buffers"
        self._start_deadline = time.monotonic() + self.config.server.startup_timeout_s

    def _on_connected(self, message) -> None:
        self.job_started_s[VERIFIER] = None
        if not isinstance(message, p.ConnectResult):
            raise StartupError(f"unexpected answer to the connect job: {message!r}")
        reason = connect_mismatch(self.ready[DRAFTER].buffers, message)
        if reason is not None:
            raise StartupError(f"the verifier attached the wrong draft buffers: {reason}")
        self.connected = message
        self._start_phase = "done"
        log.info("verifier attached %d draft buffer set(s) on %s (uuid %s)", message.num_buffers, message.device,
                 message.device_uuid)

    def _next_startup_message(self, action: str):
        """The next worker message while starting, None if none has come yet; StartupError when a
        worker exits or reports an error, or nothing came by the deadline. action: what the workers
        are doing, for errors."""
        for role, proc in self.procs.items():
            if proc.poll() is not None:
                self._raise_startup_errors(action)
                raise StartupError(f"{self._exit_reason(role, proc)} during start-up")
        if self.recv_from_workers.poll(0):
            message = p.decode(self.recv_from_workers.recv(), p.WORKER_RESULTS)
            if isinstance(message, p.WorkerError):
                raise StartupError(f"{message.role} failed to {action}: {message.message}")
            return message
        if time.monotonic() > self._start_deadline:
            raise StartupError(f"workers did not {action} within {self.config.server.startup_timeout_s} s")
        return None

    def _raise_startup_errors(self, action: str) -> None:
        while self.recv_from_workers.poll(200):
            message = p.decode(self.recv_from_workers.recv(), p.WORKER_RESULTS)
            if isinstance(message, p.WorkerError):
                raise StartupError(f"{message.role} failed to {action}: {message.message}")

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
        role = message.role if isinstance(message, p.WorkerError) else (  # verify, prefill, connect: verifier
            DRAFTER if isinstance(message, p.DraftResult) else VERIFIER)
        self.job_started_s[role] = None
        return message

    def failure(self) -> str | None:
        """Why the workers can no longer serve (a process exited, or a job passed its deadline)."""
        for role, proc in self.procs.items():
            if proc.poll() is not None:
                return self._exit_reason(role, proc)
        now = time.monotonic()
        for role, started in self.job_started_s.items():
            if started is not None and now - started > self.config.scheduler.job_timeout_s:
                return f"{role} did not answer a job within {self.config.scheduler.job_timeout_s} s"
        return None

    def stop(self) -> None:
        """Stop the verifier and wait for it, then the drafter: the consumer of the draft buffers
        goes before their producer, which torch's CUDA IPC needs to outlive its consumers. A worker
        that does not exit within EXIT_WAIT_S is killed. Then remove their sockets and buffers."""
        for role in (VERIFIER, DRAFTER):
            self._stop_worker(role)
        for ready in self.ready.values():  # segments of a worker that died without cleaning up
            unlink_segments(ready.buffers)
        for sock in [*self.send_to.values(), self.recv_from_workers]:
            if sock is not None:
                sock.close(linger=0)
        self._remove_endpoints()
        self.procs, self.ready, self.send_to, self.recv_from_workers = {}, {}, {}, None
        self.connected = None

    def _remove_endpoints(self) -> None:
        for name in [*self.send_to, "results", "drafts"]:
            path = self._endpoint(name)[len("ipc://"):]
            if os.path.exists(path):
                os.unlink(path)

    def _exit_reason(self, role: str, proc) -> str:
        return f"{role} exited with code {proc.returncode}"

    def _stop_worker(self, role: str) -> None:
        proc, sock = self.procs.get(role), self.send_to.get(role)
        if proc is None:
            return
        if proc.poll() is None and sock is not None:
            try:
                sock.send(p.encode(p.ShutdownJob()), zmq.NOBLOCK)
            except zmq.ZMQError:
                pass
        try:
            proc.wait(EXIT_WAIT_S)
        except subprocess.TimeoutExpired:
            log.warning("%s did not exit within %.1f s of its shutdown job: killing it", role, EXIT_WAIT_S)
            proc.kill()
            proc.wait()

    def pids(self) -> dict[str, int]:
        return {role: proc.pid for role, proc in self.procs.items()}

    def endpoints(self) -> dict[str, str]:
        """Where the workers' sockets are (for status): the scheduler's, and the drafter's
        drafts socket with the frames transport."""
        if self.recv_from_workers is None:
            return {}
        endpoints = {name: self._endpoint(name) for name in [*self.send_to, "results"]}
        drafter = self.ready.get(DRAFTER)
        if drafter is not None and drafter.buffers and drafter.buffers[0].get("kind") == "frames":
            endpoints["drafts"] = drafter.buffers[0]["endpoint"]
        return endpoints

    def placement(self) -> dict[str, dict]:
        """Where each worker runs (for status)."""
        return {role: {"host": "local", "pid": proc.pid} for role, proc in self.procs.items()}

    def _socket(self, kind: int, name: str) -> zmq.Socket:
        sock = self.context.socket(kind)
        sock.setsockopt(zmq.LINGER, 0)
        sock.bind(self._endpoint(name))
        return sock

    def _endpoint(self, name: str) -> str:
        return f"ipc://{os.path.join(self.run_dir, f'{name}-{self.generation}.sock')}"


def connect_mismatch(handles: list[dict], result: p.ConnectResult) -> str | None:
    """Why the verifier's ConnectResult does not match the drafter's buffer handles; None if it does:
    every set attached, CPU segments on the CPU, CUDA buffers on the GPU with the handles' UUID."""
    if result.num_buffers != len(handles):
        return f"it attached {result.num_buffers} buffer set(s), the drafter made {len(handles)}"
    kinds = {h.get("kind") for h in handles}
    uuids = {h.get("device_uuid") for h in handles}
    if result.kind and {result.kind} != kinds:
        return f"it attached {result.kind} buffers, the drafter made {sorted(map(str, kinds))}"
    if kinds == {"frames"}:
        if result.device != "cpu":
            return f"frames buffers received on {result.device} (CPU only)"
        return None
    if kinds == {"shm"}:
        if result.device != "cpu" or result.device_uuid is not None:
            return f"CPU shared-memory buffers attached on {result.device} (uuid {result.device_uuid})"
        return None
    if kinds == {"cuda_ipc"} and len(uuids) == 1:
        (uuid,) = uuids
        if result.device_uuid != uuid or not result.device.startswith("cuda"):
            return (f"buffers of the GPU with UUID {uuid} attached on {result.device} "
                    f"(UUID {result.device_uuid})")
        return None
    return f"the drafter's handles mix kinds {sorted(map(str, kinds))} or devices {sorted(map(str, uuids))}"


def unlink_segments(handles: list[dict]) -> None:
    """Remove the CPU shared-memory segments named in buffer handles, if they still exist
    (POSIX shared memory is the files of /dev/shm on Linux)."""
    for handle in handles:
        if handle.get("kind") == "shm":
            try:
                os.unlink(os.path.join("/dev/shm", os.path.basename(handle["name"])))
            except FileNotFoundError:
                pass
