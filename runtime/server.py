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

from minedraft.common import protocol as p
from minedraft.common.config import Config, config_from_dict, config_to_dict, format_config, resolve_run_dir
from minedraft.runtime import calibration as cal
from minedraft.runtime.http_front_end import HttpFrontEnd
from minedraft.runtime.router import (
    DEAD, RESTARTING, SERVING, STARTING, STOPPING, Replica, choose_replica, merge_core_status,
)
from minedraft.runtime.scheduler import SchedulerCore
from minedraft.runtime.tokenizer import chat_template, make_tokenizer
from minedraft.common.protocol import DRAFTER, VERIFIER
from minedraft.runtime.worker_pool import StartupError, WorkerPool

log = logging.getLogger("minedraft.server")
POLL_MS = 50
LOG_NAME = "daemon.log"
CLIENT_HWM = 10000  # queued frames per client before sends would block (then backlogged)
MAX_FRAMES_PER_LOOP = 1000  # client frames handled before worker results get a turn
BURST_GAP_MS = 3.0  # an idle runtime given requests reads on while more arrive this close together ...
BURST_MAX_MS = 25.0  # ... for at most this long, so a burst is admitted, planned and prefilled as one load


def make_pool(config: Config, run_dir: str, context: zmq.Context, index: int):
    """Replica index's worker pool: processes on this host, or Ray actors (cluster.backend)."""
    if config.cluster.backend == "ray":
        from minedraft.runtime.ray_pool import RayWorkerPool

        return RayWorkerPool(config, run_dir, context, index)
    return WorkerPool(config, run_dir, context)


def replica_dir(config: Config, run_dir: str, index: int) -> str:
    """Where replica index keeps its config, sockets and tokenizer: the run directory itself when
    there is one replica, else run_dir/rINDEX (0700), so replicas never share a file."""
    if config.cluster.replicas == 1:
        return run_dir
    path = os.path.join(run_dir, f"r{index}")
    os.makedirs(path, mode=0o700, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config_to_dict(config), f)
    return path


class Server:
    def __init__(self, config: Config, run_dir: str):
        self.config = config
        self.run_dir = run_dir
        self.context = zmq.Context()
        self.replicas: list[Replica] = []  # made by start (joining a Ray cluster can fail)
        self.state = STARTING  # starting -> serving -> stopping | dead (every replica dead)
        self.dead_reason: str | None = None
        self.dead_since_s = 0.0
        self.exit_code = 0
        self.outputs: list[tuple[bytes, object]] = []  # the server's own answers (status, refusals)
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
        for i in range(self.config.cluster.replicas):
            self.replicas.append(Replica(i, make_pool(self.config, replica_dir(self.config, self.run_dir, i),
                                                      self.context, i)))
        for replica in self.replicas:  # every replica loads its models at the same time
            replica.pool.begin_start()
        for replica in self.replicas:
            while not replica.pool.poll_start():
                replica.pool.recv_from_workers.poll(POLL_MS)
            self._on_replica_started(replica)
        self.state = SERVING
        if self.http is not None:
            self.http.spawn()

    def _on_replica_started(self, replica: Replica) -> None:
        """Its workers are ready: a first start makes its scheduler core; a restart resets it."""
        if replica.core is None:
            verifier = replica.pool.ready[VERIFIER]
            max_len = min(r.max_len for r in replica.pool.ready.values())
            max_batch = min((r.max_batch for r in replica.pool.ready.values() if r.max_batch), default=None)  # both hold it
            replica.core = SchedulerCore(self.config, make_tokenizer(verifier.tokenizer), verifier.vocab_size,
                                         max_len, verifier.eos_token_ids, max_batch=max_batch)
            self._begin_calibration(replica)
        else:
            replica.num_restarts += 1
            log.info("replica %d: workers restarted (restart %d)", replica.index, replica.num_restarts)
        replica.state = SERVING

    def _begin_calibration(self, replica: Replica) -> None:
        """auto: seed the plans' fits from the cached calibration for these workers, or run the
        calibration load before serving (its requests wait meanwhile; runtime/calibration.py)."""
        sc = self.config.scheduler
        if not (sc.is_auto and sc.calibrate and not sc.plan_rotate_steps):
            return
        core, path = replica.core, cal.cache_path(self.config)
        machines = {role: ready.linear.get("machine", "") for role, ready in sorted(replica.pool.ready.items())}
        replica.calibration_key = cal.cache_key(self.config, machines, core.max_batch)
        cached = cal.read_cache(path, replica.calibration_key)
        if cached is not None:
            core.load_calibration(cached["budget"], cached.get("seconds"))
            core.calibration.cache_path = str(path)
            replica.is_calibration_saved = True
            log.info("replica %d: auto's calibration from the cache %s (key %s; measured in %.1f s)",
                     replica.index, path, replica.calibration_key, cached.get("seconds", 0.0))
            return
        core.start_calibration()
        core.calibration.cache_path = str(path)
        log.info("replica %d: calibrating auto's plans (%d phases; no calibration cached in %s for key %s)",
                 replica.index, len(core.calibration.phases), path, replica.calibration_key)

    def _check_calibration(self, replica: Replica) -> None:
        """Once a calibration this start measured is over: cache it (or say why it failed)."""
        calibration = replica.core.calibration if replica.core is not None else None
        if calibration is None or calibration.is_running or replica.is_calibration_saved:
            return
        replica.is_calibration_saved = True
        seconds = calibration.measured_s
        if calibration.state != "done":
            log.warning("replica %d: calibration failed after %.1f s: %s; auto explores as it serves",
                        replica.index, seconds, calibration.reason)
            return
        path = cal.cache_path(self.config)
        try:
            cal.write_cache(path, replica.calibration_key, {
                "budget": replica.core.budget.calibration(), "seconds": round(seconds, 3),
                "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S"), "steps_by_plan": calibration.steps_by_plan,
                "models": [self.config.model.target, self.config.model.draft], "max_batch": replica.core.max_batch})
            log.info("replica %d: calibrated auto's plans in %.1f s (%d timed jobs); cached in %s",
                     replica.index, seconds, calibration.num_jobs, path)
        except OSError as exc:
            log.warning("replica %d: calibrated in %.1f s, but could not cache it in %s: %s",
                        replica.index, seconds, path, exc)

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
            sockets = [self.frontend] + [r.pool.recv_from_workers for r in self.replicas if r.state != DEAD]
            if all(sock.poll(0) == 0 for sock in sockets):  # a dead replica's stopped pool has no sockets
                zmq.select(sockets, [], [], POLL_MS / 1000)
            if self.is_term_requested:
                self.is_term_requested = False
                self.begin_shutdown()
            for replica in self.replicas:
                self._step_replica(replica)
            if self._on_client_frames() and self._is_idle():
                self._admit_burst()
            for replica in self.replicas:
                if replica.is_live and self.state in (SERVING, STOPPING):
                    for role, job in replica.core.next_jobs():
                        replica.pool.send(role, job)
                    self._check_calibration(replica)
            self.flush_outputs()
            if self.http is not None:
                self.http.check()
            if self.state == STOPPING and not any(r.num_in_flight for r in self.replicas):
                return 0
            if self.state == DEAD and time.monotonic() - self.dead_since_s >= self.config.server.dead_linger_s:
                return 1

    def _step_replica(self, replica: Replica) -> None:
        """Take its workers' messages and check their health; advance a restart."""
        if replica.state == RESTARTING:
            try:
                if replica.pool.poll_start():
                    self._on_replica_started(replica)
            except Exception as exc:  # StartupError, or the Ray cluster failing under the restart
                log.exception("replica %d: restart failed", replica.index)
                replica.pool.stop()
                self._on_replica_dead(replica, f"{replica.dead_reason}; restart failed: {exc}")
            return
        while replica.is_live and (message := replica.pool.recv()) is not None:
            if isinstance(message, p.DraftResult):
                replica.core.on_draft_result(message)
            elif isinstance(message, p.VerifyResult):
                replica.core.on_verify_result(message)
            elif isinstance(message, p.PrefillResult):
                replica.core.on_prefill_result(message)
            elif isinstance(message, p.WorkerError):
                log.error("replica %d: %s failed batch_id=%s: %s\n%s", replica.index, message.role,
                          message.batch_id, message.message, message.traceback)
                self._on_worker_failure(replica, f"{message.role} failed: {message.message}")
        if replica.is_live:
            reason = replica.pool.failure()
            if reason is not None:
                self._on_worker_failure(replica, reason)

    def _on_worker_failure(self, replica: Replica, reason: str) -> None:
        """Every live request of the replica fails now; then its workers restart in the background
        (requests keep going to the other replicas), or the replica is dead."""
        if len(self.replicas) > 1:
            reason = f"replica {replica.index}: {reason}"
        log.error("runtime dead: %s", reason)
        replica.core.abort_all("runtime_dead", f"runtime dead: {reason}")
        self.flush_outputs()
        replica.pool.stop()
        replica.core.reset_workers()  # the new workers hold nothing; requests may queue meanwhile
        replica.dead_reason = reason
        if self.config.scheduler.restart_workers and self.state != STOPPING:
            try:
                replica.pool.begin_start()
                replica.state = RESTARTING
                return
            except Exception as exc:  # StartupError, or the Ray cluster failing under the restart
                log.exception("replica %d: restart failed", replica.index)
                replica.pool.stop()
                reason = f"{reason}; restart failed: {exc}"
        self._on_replica_dead(replica, reason)

    def _on_replica_dead(self, replica: Replica, reason: str) -> None:
        log.error("%s", reason)
        replica.core.abort_all("runtime_dead", f"runtime dead: {reason}")  # requests queued during a restart
        replica.state, replica.dead_reason = DEAD, reason
        if all(r.state == DEAD for r in self.replicas):
            self.state, self.dead_since_s = DEAD, time.monotonic()
            self.dead_reason = "; ".join(r.dead_reason for r in self.replicas)

    def _is_idle(self) -> bool:
        """No worker of a live replica has a job: the next step has not started anywhere."""
        return self.state == SERVING and all(not any(r.core.is_busy.values()) for r in self.replicas if r.is_live)

    def _admit_burst(self) -> None:
        """Requests that arrive together (a client's burst, a wave of users) reach the socket a
        few milliseconds apart. Started on the first of them, a step would prefill them in two
        or more passes and auto would plan it for a fraction of the load (issue 26: at c = 8 the
        first step ran sd x2 for 5 of the 8 requests, seconds long with their prompts, before
        ar x2). So an idle runtime that has just admitted requests reads on while more arrive
        within BURST_GAP_MS of each other, for at most BURST_MAX_MS: a lone request waits
        BURST_GAP_MS, a step in progress never waits."""
        deadline = time.monotonic() + BURST_MAX_MS / 1000
        while (left_ms := 1000 * (deadline - time.monotonic())) > 0:
            if not self.frontend.poll(min(BURST_GAP_MS, left_ms)) or not self._on_client_frames():
                return

    def _on_client_frames(self) -> int:
        """Read what clients sent (at most MAX_FRAMES_PER_LOOP frames); the number of new requests."""
        num_requests = 0
        for _ in range(MAX_FRAMES_PER_LOOP):
            try:
                frames = self.frontend.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return num_requests
            if len(frames) != 2:
                continue  # not a DEALER frame pair: nothing to answer
            client_id, frame = frames
            try:
                message = p.decode(frame, p.CLIENT_REQUESTS, self.config.scheduler.max_request_bytes)
            except p.ProtocolError as exc:
                request_id = _request_id_of(frame)
                code = "invalid_request" if request_id is not None else "bad_frame"
                self._reply(client_id, p.ErrorOutput(request_id, code, str(exc)))
                continue
            try:
                self._on_client_message(client_id, message)
            except Exception as exc:  # a bug must fail one request, not the runtime
                log.exception("request handling failed: %r", message)
                self._reply(client_id, p.ErrorOutput(getattr(message, "request_id", None), "internal_error", repr(exc)))
            num_requests += isinstance(message, p.GenerateRequest)
        return num_requests

    def _reply(self, client_id: bytes, message) -> None:
        self.outputs.append((client_id, message))

    def _on_client_message(self, client_id: bytes, message) -> None:
        if isinstance(message, p.GenerateRequest):
            if self.state == DEAD:
                self._reply(client_id, p.ErrorOutput(message.request_id, "runtime_dead",
                                                     f"runtime dead: {self.dead_reason}"))
            elif self.state == STOPPING:
                self._reply(client_id, p.ErrorOutput(message.request_id, "shutting_down", "the runtime is stopping"))
            elif any(r.core is not None and r.core.has_request(message.request_id) for r in self.replicas):
                self._reply(client_id, p.ErrorOutput(message.request_id, "invalid_request",
                                                     f"request_id: {message.request_id!r} is already in use"))
            else:
                replica = self.route()
                replica.num_routed += 1
                replica.core.add_request(client_id, message)
        elif isinstance(message, p.AbortRequest):
            for replica in self.replicas:
                replica.core.abort(message.request_id)
        elif isinstance(message, p.StatusRequest):
            self._reply(client_id, p.StatusOutput(self.status(message.is_detailed)))
        elif isinstance(message, p.ShutdownRequest):
            num_aborted = self.begin_shutdown()
            self._reply(client_id, p.ShutdownOutput(num_aborted))

    def route(self) -> Replica:
        """The live replica with the fewest requests in flight; with none live (restarts under
        way), the restarting one with the fewest, where the request waits for its workers."""
        replica = choose_replica(self.replicas)
        if replica is None:
            restarting = [r for r in self.replicas if r.state == RESTARTING]
            replica = min(restarting, key=lambda r: (r.num_in_flight, r.index))
        return replica

    def begin_shutdown(self) -> int:
        """Abort in-flight requests (finish reason "shutdown"); the loop ends once they are gone."""
        num_aborted = 0
        for replica in self.replicas:
            if replica.core is not None:
                num_aborted += replica.core.abort_every("shutdown")
        if self.state != DEAD:
            self.state = STOPPING
        return num_aborted

    # --- outputs ----------------------------------------------------------------------------

    def flush_outputs(self) -> None:
        """Send every reply and core output queued so far, in order per client; a client that
        stops reading past server.client_timeout_s, or disconnects, is dropped."""
        now = time.monotonic()
        outputs, self.outputs = self.outputs, []
        for replica in self.replicas:
            outputs += replica.core.take_outputs() if replica.core is not None else []
        for client_id, message in outputs:
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
        aborted = []
        for replica in self.replicas:
            aborted += replica.core.abort_client(client_id)
            replica.core.take_outputs()  # their final outputs have nowhere to go
        self.backlog.pop(client_id, None)
        if aborted:
            log.warning("aborted %d request(s) of a client: %s", len(aborted), why)

    def status(self, is_detailed: bool = False) -> dict:
        replicas = [self._replica_status(r) for r in self.replicas]
        cores = [r.core.status(is_detailed) for r in self.replicas]
        single = len(replicas) == 1
        status = {
            "state": self.state,
            "dead_reason": self.dead_reason,
            "pid": os.getpid(),
            "endpoint": self.config.server.endpoint,
            "target": self.config.model.target,
            "draft": self.config.model.draft if DRAFTER in self.replicas[0].pool.roles else None,
            "dtype": self.config.model.dtype,
            "backend": self.config.cluster.backend,
            "num_replicas": len(replicas),
            "num_live_replicas": sum(r.is_live for r in self.replicas),
            "worker_pids": replicas[0]["worker_pids"] if single else {
                f"{role}.{r['index']}": pid for r in replicas for role, pid in r["worker_pids"].items()},
            "num_restarts": sum(r.num_restarts for r in self.replicas),
            "max_worker_frame_bytes": max(r.pool.max_frame_bytes for r in self.replicas),
            "linear_path": replicas[0]["linear_path"],
            "memory": replicas[0]["memory"],
            "draft_buffers": replicas[0]["draft_buffers"],
            "draft_transport": replicas[0]["draft_transport"] if single else ",".join(
                sorted({str(r["draft_transport"]) for r in replicas})),
        }
        status.update(merge_core_status(cores))
        if not single:  # each replica's own scheduler figures next to its state
            for entry, core in zip(replicas, cores):
                entry.update(core)
        status["replicas"] = replicas
        core = self.replicas[0].core
        tokenizer = self.replicas[0].pool.ready[VERIFIER].tokenizer if VERIFIER in self.replicas[0].pool.ready else {}
        status.update({  # what front ends need to translate requests
            "max_len": core.max_len,
            "max_tokens_cap": self.config.scheduler.max_tokens_cap,
            "chat_template": chat_template(tokenizer),
            "special_tokens": {key: tokenizer.get(key) for key in ("bos_token", "eos_token")},
            "http": self.http.status() if self.http is not None else None,
        })
        return status

    def _replica_status(self, replica: Replica) -> dict:
        pool = replica.pool
        return {
            "index": replica.index,
            "state": replica.state,
            "dead_reason": replica.dead_reason if replica.state != SERVING else None,
            "num_in_flight": replica.num_in_flight,
            "num_routed": replica.num_routed,
            "num_restarts": replica.num_restarts,
            "worker_pids": pool.pids(),
            "workers": pool.placement(),
            "endpoints": pool.endpoints(),
            "linear_path": {role: ready.linear for role, ready in pool.ready.items()},
            "memory": {role: ready.memory for role, ready in pool.ready.items()},
            "draft_buffers": _connected_status(pool.connected),
            "draft_transport": pool.connected.kind if pool.connected is not None else None,
        }

    # --- shutdown ---------------------------------------------------------------------------

    def close(self) -> None:
        if self.http is not None:  # first: no new HTTP requests while the workers go
            self.http.stop()
        for replica in self.replicas:
            replica.pool.stop()
        if self.config.cluster.backend == "ray":
            from minedraft.runtime.ray_pool import disconnect_ray

            disconnect_ray()
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
            for replica in server.replicas:
                if replica.core is not None:
                    replica.core.abort_all("runtime_dead",
                                           f"runtime dead: scheduler error: {type(exc).__name__}: {exc}")
            server.flush_outputs()
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
