"""WorkerPool start-up and shutdown against fake workers (threads on the pool's real ipc://
sockets, no model, no torch): start waits for the verifier to attach the draft buffers and fails
with the reason when it cannot; stop takes the verifier down before the drafter. Fast on the CPU.

Run: .venv/bin/python -m pytest -q tests/test_worker_pool.py
"""

import subprocess
import threading
import time

import pytest
import zmq

from minedraft.common import protocol as p
from minedraft.runtime import worker_pool
from minedraft.common.config import load_config
from minedraft.common.protocol import DRAFTER, VERIFIER
from minedraft.runtime.worker_pool import StartupError, WorkerPool, connect_mismatch

UUID_A = "0a1b2c3d-0000-1111-2222-333344445555"
UUID_B = "9f8e7d6c-0000-1111-2222-333344445555"
SHM_HANDLES = [{"kind": "shm", "name": f"minedraft-{i:024x}", "size_bytes": 64, "tensors": {}} for i in range(2)]
CUDA_HANDLES = [{"kind": "cuda_ipc", "device_uuid": UUID_A, "size_bytes": 64, "tensors": {}, "ipc": {}}
                for _ in range(2)]


def ready(role: str, buffers: list[dict]) -> p.ReadyResult:
    return p.ReadyResult(role, p.PROTOCOL_VERSION, 1, "fake", 512, 512, [257], {"kind": "bytes"}, buffers)


class FakeWorker:
    """A worker thread with the Popen surface the pool uses (poll, wait, kill, returncode, pid).
    It sends its ReadyResult, answers a ConnectJob with on_connect(job) (None: no answer) and
    exits on a ShutdownJob, or when killed."""

    def __init__(self, role: str, pool: WorkerPool, buffers: list[dict], on_connect, events: list):
        self.role, self.buffers, self.on_connect, self.events = role, buffers, on_connect, events
        self.jobs_endpoint, self.results_endpoint = pool._endpoint(role), pool._endpoint("results")
        self.returncode, self.pid, self.is_killed = None, 0, False
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        context = zmq.Context()
        jobs, results = context.socket(zmq.PULL), context.socket(zmq.PUSH)
        jobs.connect(self.jobs_endpoint)
        results.connect(self.results_endpoint)
        results.send(p.encode(ready(self.role, self.buffers)))
        while not self.is_killed:
            if not jobs.poll(20):
                continue
            job = p.decode(jobs.recv(), p.WORKER_JOBS)
            self.events.append(f"{self.role} got {job.TYPE}")
            if isinstance(job, p.ShutdownJob):
                break
            answer = self.on_connect(job)
            if answer is not None:
                results.send(p.encode(answer))
        context.destroy(linger=200)
        self.returncode = -9 if self.is_killed else 0

    def poll(self):
        return self.returncode

    def wait(self, timeout=None):
        self.thread.join(timeout)
        if self.thread.is_alive():
            raise subprocess.TimeoutExpired(self.role, timeout)
        return self.returncode

    def kill(self):
        self.is_killed = True


class FakePool(WorkerPool):
    def __init__(self, tmp_path, on_connect, buffers=SHM_HANDLES, timeout_s: float = 5.0):
        config = load_config("configs/tiny.toml", [f"server.startup_timeout_s={timeout_s}"])
        super().__init__(config, str(tmp_path), zmq.Context())
        self.on_connect, self.buffers, self.events = on_connect, buffers, []

    def _spawn(self, role: str) -> FakeWorker:
        return FakeWorker(role, self, self.buffers if role == DRAFTER else [], self.on_connect, self.events)


def attached(num_buffers=2, device="cpu", device_uuid=None):
    return lambda job: p.ConnectResult(num_buffers, device, device_uuid)


def start_fails(pool: FakePool) -> str:
    try:
        with pytest.raises(StartupError) as failure:
            pool.start()
    finally:
        pool.stop()
        pool.context.destroy(linger=0)
    return str(failure.value)


def test_start_waits_for_the_verifier_to_attach(tmp_path):
    def slow_attach(job):
        time.sleep(0.3)
        return p.ConnectResult(len(job.draft_buffers), "cpu", None)

    pool = FakePool(tmp_path, slow_attach)
    start_s = time.monotonic()
    pool.start()
    try:
        assert time.monotonic() - start_s >= 0.3
        assert pool.connected == p.ConnectResult(2, "cpu", None)
        assert pool.events == ["verifier got connect_job"]
        assert pool.job_started_s == {DRAFTER: None, VERIFIER: None}  # no job in flight once started
    finally:
        pool.stop()
        pool.context.destroy(linger=0)
    assert pool.connected is None


def test_start_fails_with_the_verifiers_attach_error(tmp_path):
    def refuse(job):
        return p.WorkerError(VERIFIER, "RuntimeError: pidfd_getfd: Operation not permitted", "traceback")

    reason = start_fails(FakePool(tmp_path, refuse))
    assert reason == "verifier failed to attach the draft buffers: RuntimeError: pidfd_getfd: Operation not permitted"


def test_start_fails_when_the_verifier_never_answers(tmp_path):
    reason = start_fails(FakePool(tmp_path, lambda job: None, timeout_s=0.5))
    assert reason == "workers did not attach the draft buffers within 0.5 s"


@pytest.mark.parametrize("answer, buffers, words", [
    (attached(num_buffers=1), SHM_HANDLES, "attached 1 buffer set(s), the drafter made 2"),
    (attached(device="cuda:0", device_uuid=UUID_A), SHM_HANDLES, "CPU shared-memory buffers attached on cuda:0"),
    (attached(device="cuda:1", device_uuid=UUID_B), CUDA_HANDLES, f"GPU with UUID {UUID_A} attached on cuda:1"),
], ids=["count", "cpu-buffers-on-a-gpu", "another-gpu"])
def test_start_fails_when_the_verifier_attached_the_wrong_buffers(tmp_path, answer, buffers, words):
    reason = start_fails(FakePool(tmp_path, answer, buffers))
    assert reason.startswith("the verifier attached the wrong draft buffers: ") and words in reason, reason


def test_connect_mismatch():
    assert connect_mismatch(SHM_HANDLES, p.ConnectResult(2, "cpu", None)) is None
    assert connect_mismatch(CUDA_HANDLES, p.ConnectResult(2, "cuda:1", UUID_A)) is None  # any local index
    assert "attached on cpu" in connect_mismatch(CUDA_HANDLES, p.ConnectResult(2, "cpu", None))
    assert "mix" in connect_mismatch([SHM_HANDLES[0], CUDA_HANDLES[0]], p.ConnectResult(2, "cpu", None))
    other = [CUDA_HANDLES[0], {**CUDA_HANDLES[1], "device_uuid": UUID_B}]
    assert "mix" in connect_mismatch(other, p.ConnectResult(2, "cuda:0", UUID_A))


def test_connect_result_is_a_verifier_result():
    frame = p.encode(p.ConnectResult(2, "cuda:1", UUID_A))
    assert p.decode(frame, p.WORKER_RESULTS) == p.ConnectResult(2, "cuda:1", UUID_A)
    with pytest.raises(p.ProtocolError):
        p.decode(frame, p.CLIENT_OUTPUTS)


# ---------------------------------------------------------------- shutdown order


class RecordingProc:
    """A worker process that exits when its shutdown job arrives, or never (is_stuck)."""

    def __init__(self, role: str, events: list, is_stuck: bool = False):
        self.role, self.events, self.is_stuck = role, events, is_stuck
        self.returncode, self.pid, self.has_job = None, 0, False

    def poll(self):
        return self.returncode

    def wait(self, timeout=None):
        self.events.append(f"wait {self.role}")
        if self.returncode is None and (self.is_stuck or not self.has_job):
            raise subprocess.TimeoutExpired(self.role, timeout)
        self.returncode = 0 if self.returncode is None else self.returncode
        self.events.append(f"{self.role} exited")
        return self.returncode

    def kill(self):
        self.events.append(f"kill {self.role}")
        self.returncode = -9


class RecordingSocket:
    def __init__(self, proc: RecordingProc | None, events: list):
        self.proc, self.events = proc, events

    def send(self, frame, flags=0):
        job = p.decode(frame, p.WORKER_JOBS)
        self.events.append(f"{job.TYPE} to {self.proc.role}")
        self.proc.has_job = True

    def close(self, linger=None):
        pass


def recording_pool(tmp_path, stuck: set[str]) -> tuple[WorkerPool, list]:
    events: list[str] = []
    pool = WorkerPool(load_config("configs/tiny.toml"), str(tmp_path), context=None)
    pool.procs = {role: RecordingProc(role, events, role in stuck) for role in (DRAFTER, VERIFIER)}
    pool.send_to = {role: RecordingSocket(proc, events) for role, proc in pool.procs.items()}
    pool.recv_from_workers = RecordingSocket(None, events)
    return pool, events


def test_stop_takes_the_verifier_down_before_the_drafter(tmp_path):
    pool, events = recording_pool(tmp_path, stuck=set())
    pool.stop()
    assert events == ["shutdown_job to verifier", "wait verifier", "verifier exited",
                      "shutdown_job to drafter", "wait drafter", "drafter exited"]
    assert pool.procs == {} and pool.send_to == {}


def test_stop_kills_a_verifier_that_does_not_exit_before_it_stops_the_drafter(tmp_path, monkeypatch):
    monkeypatch.setattr(worker_pool, "EXIT_WAIT_S", 0.01)
    pool, events = recording_pool(tmp_path, stuck={VERIFIER})
    pool.stop()
    assert events == ["shutdown_job to verifier", "wait verifier", "kill verifier", "wait verifier",
                      "verifier exited", "shutdown_job to drafter", "wait drafter", "drafter exited"]
