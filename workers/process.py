"""Worker processes: run_drafter_process and run_verifier_process wrap the Drafter and Verifier
cores with their sockets, device placement, the start-up handshake and the job loop.
Started by the scheduler as `python -m minedraft.workers.process ROLE CONFIG_JSON JOBS RESULTS [DRAFTS]`
(DRAFTS: the drafter's drafts endpoint, with the frames draft transport).
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
import traceback

import torch
import zmq

from minedraft.common import curve as cv
from minedraft.common import protocol as p
from minedraft.common.config import Config, batch_from_memory, config_from_dict, core_splits, cpu_pool, draft_transport
from minedraft.workers.buffers import SharedBuffers, check_cuda_ipc_allocator, draft_buffer_specs
from minedraft.workers.chat_template import chat_template_info
from minedraft.workers.drafter import Drafter
from minedraft.workers.frames import FrameBuffers, FrameReceiver, FrameSender
from minedraft.workers.memory import NUM_DRAFT_BUFFERS, memory_budget_bytes, memory_report, request_bytes, trim_heap
from minedraft.workers.model.fast_linear import apply_linear_path, pin_threads
from minedraft.workers.model.loader import TinySpec, load_decoder, resolve_spec, save_tokenizer_json
from minedraft.workers.verifier import Verifier

log = logging.getLogger("minedraft.worker")

NUM_BATCHES = NUM_DRAFT_BUFFERS  # one draft buffer per batch id
PARENT_CHECK_S = 1.0  # how often an idle worker checks that the scheduler still lives
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def run_drafter_process(config: Config, jobs_endpoint: str, results_endpoint: str, run_dir: str,
                        drafts_endpoint: str | None = None) -> None:
    """drafts_endpoint: where the drafter binds its drafts socket (the frames transport only)."""
    _serve(p.DRAFTER, config, jobs_endpoint, results_endpoint, run_dir, drafts_endpoint)


def run_verifier_process(config: Config, jobs_endpoint: str, results_endpoint: str, run_dir: str) -> None:
    _serve(p.VERIFIER, config, jobs_endpoint, results_endpoint, run_dir)


def run_remote_worker(role: str, config: Config, jobs_endpoint: str, results_endpoint: str, run_dir: str,
                      drafts_endpoint: str | None, curve: dict[str, str]) -> None:
    """A worker in a Ray actor: tcp:// sockets under CURVE (curve: runtime/curve.for_worker);
    drafts_endpoint (the drafter, frames) may end in ":*" for a free port. Its life is the
    actor's: no parent check, since Ray ends the actors of a scheduler that dies."""
    _serve(role, config, jobs_endpoint, results_endpoint, run_dir, drafts_endpoint, curve, parent_pid=None)


def place(role: str, config: Config) -> torch.device:
    """Pin the process to its cores and thread count; check that its device exists."""
    section = config.worker(role)
    if section.cpu_cores:
        os.sched_setaffinity(0, section.cpu_cores)
    torch.set_num_threads(section.num_threads)
    device = torch.device(section.device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError(f"{role}.device={section.device}: CUDA is not available on this machine")
        index = device.index or 0
        if index >= torch.cuda.device_count():
            raise RuntimeError(f"{role}.device={section.device}: only {torch.cuda.device_count()} CUDA device(s)")
        torch.cuda.set_device(index)
    return device


def check_buffer_allocator(config: Config) -> None:
    """CUDA draft buffers: both ends need an allocator that CUDA IPC can share (checked before the
    model loads, so a wrong PYTORCH_ALLOC_CONF fails the start at once)."""
    if config.scheduler.mode != "ar" and torch.device(config.drafter.device).type == "cuda":
        check_cuda_ipc_allocator()


def connect_result(buffers: list, handles: list[dict] = ()) -> p.ConnectResult:
    """The verifier's answer to a ConnectJob: what it attached, and on which device."""
    devices = {(str(b.device), b.device_uuid) for b in buffers}
    if len(devices) != 1:
        raise RuntimeError(f"the draft buffers must all be on one device, got {sorted(map(str, devices))}")
    ((device, uuid),) = devices
    kinds = {h.get("kind") for h in handles if isinstance(h, dict)}
    return p.ConnectResult(len(buffers), device, uuid, kinds.pop() if len(kinds) == 1 else "")


def apply_placement(num_threads: int | None, cpu_cores: list[int] | None) -> float:
    """Give the process the cores and thread count a job asks for (auto plans on CPU devices);
    returns the seconds it took, 0.0 when nothing changed (the usual case: no syscall then).
    Affinity is set on every thread of the process, as the pool threads torch already started
    keep the mask they were created with; the thread count is set after, so threads it adds
    inherit the new mask."""
    if num_threads is None and cpu_cores is None:
        return 0.0
    start = time.perf_counter()
    is_changed = False
    if cpu_cores is not None and set(cpu_cores) != os.sched_getaffinity(0):
        pin_threads(cpu_cores)
        is_changed = True
    if num_threads is not None and num_threads != torch.get_num_threads():
        torch.set_num_threads(num_threads)
        is_changed = True
    return time.perf_counter() - start if is_changed else 0.0


def linear_placements(config: Config, role: str) -> dict[int, list[int]]:
    """{threads: cores} this worker's jobs may run at, for the linear path's timings: its
    configured count on its cores and, under auto on CPU devices, each count a plan may give it
    (half of the cores the two workers share, the other half, all of them: runtime/plans.py)."""
    section = config.worker(role)
    own = sorted(os.sched_getaffinity(0))  # place() has pinned the process to its cores
    placements = {section.num_threads: own}
    pool = cpu_pool(config, all_cores=list(range(os.cpu_count() or 1)))  # this process is pinned already
    if config.scheduler.is_auto and pool is not None:
        for cores in core_splits(pool):
            placements.setdefault(len(cores), own if len(own) >= len(cores) else pool[:len(cores)])
    return placements


def tiny_spec(config: Config, role: str) -> TinySpec:
    m = config.model
    return TinySpec(
        vocab_size=m.tiny_vocab_size, hidden_size=m.tiny_hidden_size, intermediate_size=m.tiny_intermediate_size,
        num_layers=m.tiny_num_layers, num_heads=m.tiny_num_heads, num_kv_heads=m.tiny_num_kv_heads,
        seed=m.tiny_seed, noise=m.tiny_draft_noise if role == p.DRAFTER else 0.0,
    )


class WorkerLoop:
    """One worker's state between jobs: its core, its buffers and its sockets."""

    def __init__(self, role: str, config: Config, jobs_endpoint: str, results_endpoint: str, run_dir: str,
                 drafts_endpoint: str | None = None, curve: dict[str, str] | None = None,
                 parent_pid: int | None = -1):
        """curve: key pairs for tcp:// sockets (None: ipc://, same host); parent_pid: the
        scheduler to outlive no longer (-1: this process's parent; None: no check)."""
        self.role = role
        self.config = config
        self.drafts_endpoint = drafts_endpoint
        self.curve = curve
        self.parent_pid = os.getppid() if parent_pid == -1 else parent_pid
        self.context = zmq.Context()
        self.auth = None  # the drafts socket's ZAP handler (frames under CURVE)
        self.recv_from_scheduler = self.context.socket(zmq.PULL)
        self.send_to_scheduler = self.context.socket(zmq.PUSH)
        for sock, endpoint, linger in ((self.recv_from_scheduler, jobs_endpoint, 0),
                                       (self.send_to_scheduler, results_endpoint, 1000)):
            sock.setsockopt(zmq.LINGER, linger)
            if curve is not None:
                cv.make_client(sock, curve["scheduler_public"], curve)
            sock.connect(endpoint)
        self.buffers: list[SharedBuffers | FrameBuffers] = []  # drafter: owned; verifier: attached
        self.sender: FrameSender | None = None  # frames transport, drafter
        self.receiver: FrameReceiver | None = None  # frames transport, verifier
        self.core = None
        self.last_predraft = (0.0, 0.0, 0, 0)  # drafter: start, end, forwards, tokens of the last pre-draft
        self._start(config, run_dir)

    def _start(self, config: Config, run_dir: str) -> None:
        device = place(self.role, config)
        check_buffer_allocator(config)
        sc, dtype = config.scheduler, DTYPES[config.model.dtype]
        spec = config.model.draft if self.role == p.DRAFTER else config.model.target
        model = load_decoder(spec, dtype, device, tiny=tiny_spec(config, self.role), cache_dir=config.model.cache_dir)
        weights = config.model.draft_weights if self.role == p.DRAFTER else "float32"
        linear = apply_linear_path(model, config.model.linear_path, config.model.cache_dir, weights,
                                   linear_placements(config, self.role))
        core_cls = Drafter if self.role == p.DRAFTER else Verifier
        self.max_batch = sc.max_batch or batch_from_memory(
            request_bytes(model.config, config, self.role, dtype), memory_budget_bytes(device, sc.kv_cache_memory),
            sc.num_batches)
        log.info("%s: max_batch %d%s", self.role, self.max_batch,
                 f" (scheduler.kv_cache_memory = {sc.kv_cache_memory})" if not sc.max_batch else "")
        self.core = core_cls(model, self.max_batch * sc.num_batches, sc.max_len, sc.max_depth, dtype, device)
        tokenizer = {"kind": "bytes"}
        if self.role == p.DRAFTER:
            specs = draft_buffer_specs(sc.max_rows(self.max_batch), sc.max_depth, model.config.vocab_size)
            if draft_transport(config) == "frames":
                if self.drafts_endpoint is None:
                    raise RuntimeError("cluster.draft_transport = frames, but the drafter was given no drafts endpoint")
                server_keys = None
                if self.curve is not None:
                    self.auth = cv.start_authenticator(self.context, self.curve["worker_public"])
                    server_keys = (self.curve["drafts_public"], self.curve["drafts_secret"])
                self.sender = FrameSender(self.context, self.drafts_endpoint, server_keys, config.cluster.worker_ports)
                self.buffers = [FrameBuffers.create(specs, self.sender.endpoint, self.sender.curve_public)
                                for _ in range(NUM_BATCHES)]
            else:
                self.buffers = [SharedBuffers.create(specs, device) for _ in range(NUM_BATCHES)]
        elif save_tokenizer_json(spec, os.path.join(run_dir, "tokenizer.json"), dtype, config.model.cache_dir):
            tokenizer = {"kind": "file", "path": os.path.join(run_dir, "tokenizer.json"),
                         **chat_template_info(resolve_spec(spec, dtype, config.model.cache_dir))}
        trim_heap()
        self._send(p.ReadyResult(
            self.role, p.PROTOCOL_VERSION, os.getpid(), spec, model.config.vocab_size,
            min(sc.max_len, model.config.max_position_embeddings), list(model.config.eos_token_ids),
            tokenizer, [b.handle() for b in self.buffers], linear.to_dict(), self.max_batch,
            memory_report(model, self.core, self.buffers),
        ))

    def run(self) -> None:
        while True:
            if not self.recv_from_scheduler.poll(int(PARENT_CHECK_S * 1000)):
                if self.parent_pid is not None and os.getppid() != self.parent_pid:  # the scheduler died
                    return
                continue
            job = p.decode(self.recv_from_scheduler.recv(copy=False).bytes, p.WORKER_JOBS)
            if isinstance(job, p.ShutdownJob):
                return
            try:
                self._handle(job)
            except Exception as exc:
                self._send(p.WorkerError(self.role, f"{type(exc).__name__}: {exc}", traceback.format_exc(),
                                         getattr(job, "batch_id", None)))

    def _handle(self, job) -> None:
        if isinstance(job, p.ConnectJob):
            self._connect(job.draft_buffers)
            self._send(connect_result(self.buffers, job.draft_buffers))
            return
        switch_s = apply_placement(job.num_threads, job.cpu_cores)
        placed = {"num_threads": torch.get_num_threads(), "cpu_cores": sorted(os.sched_getaffinity(0)),
                  "switch_s": switch_s}
        start_s = time.monotonic()
        self.core.release(job.release)
        rows = job.rows  # JobRow: the workers' cores take the message's rows as they are
        if isinstance(job, p.PrefillJob):
            self.core.prefill(rows)
            self._send(p.PrefillResult(len(rows), start_s, time.monotonic(), **placed))
            return
        buffers = self.buffers[job.batch_id].tensors if self.buffers else {}  # none in mode ar
        if isinstance(job, p.DraftJob):
            is_predrafting = job.predraft_s is not None
            outcome = self.core.draft(rows, buffers["draft_tokens"], buffers["draft_probs"], job.capacity,
                                      keep_chains=is_predrafting)
            self.buffers[job.batch_id].sync()  # data visible before it is announced
            if self.sender is not None:  # frames: the drafts go to the verifier before the result to the scheduler
                self.sender.send(self.buffers[job.batch_id], job.batch_id, job.draft_id, [
                    (r.buffer_row, kept, is_sampled) for r, kept, is_sampled in
                    zip(rows, outcome.num_kept, outcome.is_sampled)])
            depth = max((r.num_draft for r in rows), default=0)
            forwards_saved = depth - max((r.num_draft - n for r, n in zip(rows, outcome.num_served)), default=0)
            pre_start, pre_end, pre_forwards, pre_tokens = self.last_predraft
            self.last_predraft = (0.0, 0.0, 0, 0)
            self._send(p.DraftResult(job.batch_id, len(rows), start_s, time.monotonic(),
                                     outcome.num_kept, outcome.scores, **placed,
                                     predraft_hits=outcome.predraft_hits, num_served=outcome.num_served,
                                     saved_s=forwards_saved * (self.core.forward_estimate(len(rows)) or 0.0)
                                     if is_predrafting else 0.0,
                                     predraft_start_s=pre_start, predraft_end_s=pre_end,
                                     predraft_forwards=pre_forwards, predraft_tokens=pre_tokens))
            if is_predrafting and job.predraft_s > 0:  # the verifier checks these drafts now: draft on
                pre_start = time.monotonic()
                forwards, tokens = self.core.predraft(rows, outcome.num_kept, job.predraft_s,
                                                      lambda: self.recv_from_scheduler.poll(0) != 0)
                if forwards:
                    self.last_predraft = (pre_start, time.monotonic(), forwards, tokens)
        else:
            num_bytes = 0
            if self.receiver is not None and job.draft_id is not None:
                num_bytes = self.receiver.wait_for(job.batch_id, job.draft_id)  # into this batch's buffer
            emitted = self.core.verify(rows, buffers.get("draft_tokens"), buffers.get("draft_probs"))
            if self.buffers:
                self.buffers[job.batch_id].sync()  # reads done before the buffer goes back to the drafter
            self._send(p.VerifyResult(job.batch_id, emitted, start_s, time.monotonic(), **placed,
                                      draft_frame_bytes=num_bytes))

    def _connect(self, handles: list[dict]) -> None:
        """Attach the drafter's buffer sets: in place (shared memory, CUDA IPC), or as this
        process's own sets filled from the drafter's frames."""
        if handles and all(isinstance(h, dict) and h.get("kind") == "frames" for h in handles):
            self.buffers = [FrameBuffers.attach(h) for h in handles]
            endpoints = {h["endpoint"] for h in handles}
            if len(endpoints) != 1:
                raise ValueError(f"frames handles name several endpoints: {sorted(endpoints)}")
            server_public = {h.get("curve_public") for h in handles}
            if len(server_public) != 1 or (None in server_public) != (self.curve is None):
                raise ValueError("frames handles: a CURVE public key is needed exactly when the workers use CURVE")
            self.receiver = FrameReceiver(self.context, endpoints.pop(), self.buffers,
                                          self.config.scheduler.job_timeout_s, server_public.pop(), self.curve)
        else:
            self.buffers = [SharedBuffers.attach(h) for h in handles]

    def _send(self, message) -> None:
        self.send_to_scheduler.send(p.encode(message))

    def close(self) -> None:
        for buffers in self.buffers:
            buffers.close()
            if self.role == p.DRAFTER:
                buffers.unlink()
        self.buffers = []
        if self.auth is not None:
            self.auth.stop()
        self.context.destroy(linger=0)


def _serve(role: str, config: Config, jobs_endpoint: str, results_endpoint: str, run_dir: str,
           drafts_endpoint: str | None = None, curve: dict[str, str] | None = None, parent_pid: int | None = -1) -> None:
    loop = None
    try:
        loop = WorkerLoop(role, config, jobs_endpoint, results_endpoint, run_dir, drafts_endpoint, curve, parent_pid)
        loop.run()
    except Exception as exc:  # start-up failure: tell the scheduler why, then exit non-zero
        if loop is None:
            _report_startup_failure(role, results_endpoint, exc, curve)
        raise
    finally:
        if loop is not None:
            loop.close()


def _report_startup_failure(role: str, results_endpoint: str, exc: Exception, curve: dict | None = None) -> None:
    context = zmq.Context()
    sock = context.socket(zmq.PUSH)
    sock.setsockopt(zmq.LINGER, 2000)
    if curve is not None:
        cv.make_client(sock, curve["scheduler_public"], curve)
    sock.connect(results_endpoint)
    sock.send(p.encode(p.WorkerError(role, f"{type(exc).__name__}: {exc}", traceback.format_exc())))
    sock.close()
    context.term()


def main(argv: list[str]) -> int:
    role, config_path, jobs_endpoint, results_endpoint, *drafts_endpoint = argv  # the drafter's, with frames
    run_dir = os.path.dirname(config_path)
    with open(config_path) as f:
        config = config_from_dict(json.load(f))
    try:
        if role == p.DRAFTER:
            run_drafter_process(config, jobs_endpoint, results_endpoint, run_dir, *drafts_endpoint)
        else:
            run_verifier_process(config, jobs_endpoint, results_endpoint, run_dir)
    except Exception:
        return 1
    return 0


def exit_process(code: int) -> None:
    """End the worker. Its loop's close() has released its buffers and sockets; what is left is
    the interpreter's teardown of torch and the model, about 1 s that every stop waits for (twice,
    as the workers stop in turn), so a process that never started CUDA skips it. One that did
    exits normally: torch releases CUDA IPC state in its C++ destructors."""
    if torch.cuda.is_initialized():
        sys.exit(code)
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    exit_process(main(sys.argv[1:]))
