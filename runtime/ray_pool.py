"""The Ray backend of a replica's workers (cluster.backend = "ray"): the drafter and the
verifier run as Ray actors where their resources are, one placement group per replica, and
talk to the scheduler over the same ZeroMQ messages as local workers, on tcp:// sockets under
CURVE with keys made for each start (common/curve.py). Ray places and watches the processes;
it never carries a job, a result or a draft.

Start-up, without blocking the scheduler's loop (a replica restarting must not hold up the
others): the placement group and the actors are created, each actor reports its node; the
draft transport is then chosen (cluster.draft_transport = auto: shared memory when both actors
landed on one node, frames when they did not) and each actor runs the worker loop of
workers/process.py, which answers the same handshake as a local worker. An actor's death is a
worker's death: its run call ends, failure() says so, and the replica's restart policy applies.
Never imports torch (the actors do).
"""

from __future__ import annotations

import dataclasses
import glob
import logging
import os
import shutil
import socket
import subprocess
import tempfile
import time

import zmq

from minedraft.common import curve as cv
from minedraft.common import protocol as p
from minedraft.common.config import Config, config_to_dict
from minedraft.common.protocol import DRAFTER, VERIFIER
from minedraft.runtime.worker_pool import StartupError, WorkerPool

log = logging.getLogger("minedraft.ray")
LIVENESS_CHECK_S = 0.1  # how often a worker actor's run call is checked (ray.wait costs ~0.1 ms)
NAMESPACE = "minedraft"
PLACE_PHASE = "be placed by Ray"
ACTOR_DIR_PREFIX = "minedraft-actor-"  # a worker actor's run directory on its node: PREFIX<pid>-<random>


def import_ray():
    try:
        import ray
    except ImportError:
        raise StartupError("cluster.backend = ray needs Ray: pip install 'minedraft-runtime[cluster]'") from None
    return ray


def connect_ray(config: Config) -> str:
    """Join the configured Ray cluster once per process (a private one-node Ray when
    cluster.ray_address is ""); returns this node's IP address, where the worker sockets bind."""
    ray = import_ray()
    if not ray.is_initialized():
        address = config.cluster.ray_address or None
        log.info("joining Ray at %s", address or "a new private instance")
        ray.init(address=address, namespace=NAMESPACE, logging_level=logging.WARNING, include_dashboard=False)
    return ray.util.get_node_ip_address()


class WorkerActor:
    """A worker's process in the Ray cluster: it reports where it is, then runs the worker loop
    until shut down (max_concurrency 2, so the scheduler may fetch its tokenizer meanwhile)."""

    def __init__(self):
        remove_stale_actor_dirs()
        self.run_dir = tempfile.mkdtemp(prefix=f"{ACTOR_DIR_PREFIX}{os.getpid()}-")

    def node(self) -> dict:
        import ray

        return {"node_id": ray.get_runtime_context().get_node_id(), "ip": ray.util.get_node_ip_address(),
                "hostname": socket.gethostname(), "pid": os.getpid()}

    def run(self, role: str, config: dict, jobs_endpoint: str, results_endpoint: str, drafts_endpoint: str | None,
            keys: dict[str, str]) -> int:
        from minedraft.common.config import config_from_dict
        from minedraft.workers.process import run_remote_worker

        try:
            run_remote_worker(role, config_from_dict(config), jobs_endpoint, results_endpoint, self.run_dir,
                              drafts_endpoint, keys)
        finally:
            shutil.rmtree(self.run_dir, ignore_errors=True)
        return 0

    def read_tokenizer(self) -> bytes:
        """The tokenizer.json the verifier wrote into its own run directory."""
        with open(os.path.join(self.run_dir, "tokenizer.json"), "rb") as f:
            return f.read()


def remove_stale_actor_dirs() -> list[str]:
    """Remove the run directories of this node's worker actors whose process is gone (killed
    outright, so their own clean-up never ran); returns them. Each new actor does this."""
    removed = []
    for path in glob.glob(os.path.join(tempfile.gettempdir(), ACTOR_DIR_PREFIX + "*")):
        pid = os.path.basename(path)[len(ACTOR_DIR_PREFIX):].split("-")[0]
        if not pid.isdigit():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            shutil.rmtree(path, ignore_errors=True)  # another user's stays: not ours to remove
            removed.append(path)
        except PermissionError:  # alive, another user's
            pass
    return removed


class ActorProcess:
    """A worker actor seen as a process (poll, wait, kill, pid, returncode), for WorkerPool."""

    def __init__(self, ray, actor, run_ref, node: dict):
        self.ray, self.actor, self.run_ref, self.node = ray, actor, run_ref, node
        self.pid = node["pid"]
        self.returncode: int | None = None
        self.reason = ""
        self._checked_s = 0.0

    def poll(self) -> int | None:
        now = time.monotonic()
        if self.returncode is None and now - self._checked_s >= LIVENESS_CHECK_S:
            self._checked_s = now
            done, _ = self.ray.wait([self.run_ref], timeout=0)
            if done:
                self._finish()
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        if self.returncode is None:
            done, _ = self.ray.wait([self.run_ref], timeout=timeout)
            if not done:
                raise subprocess.TimeoutExpired(f"worker actor pid {self.pid}", timeout)
            self._finish()
        return self.returncode

    def kill(self) -> None:
        self.ray.kill(self.actor, no_restart=True)

    def _finish(self) -> None:
        from ray.exceptions import RayActorError

        try:
            self.returncode = self.ray.get(self.run_ref, timeout=0)
            self.reason = f"ended (code {self.returncode})"
        except RayActorError as exc:
            self.returncode, self.reason = -9, f"actor died ({type(exc).__name__})"
        except Exception as exc:  # the worker loop raised (RayTaskError wraps it)
            self.returncode, self.reason = 1, f"failed: {str(exc).strip().splitlines()[-1][:300]}"


class RayWorkerPool(WorkerPool):
    """WorkerPool whose workers are Ray actors of replica `index`; the same interface."""

    def __init__(self, config: Config, run_dir: str, context: zmq.Context, index: int = 0):
        super().__init__(config, run_dir, None)  # a context of its own per start: its own ZAP handler
        self._check_devices()  # before joining the cluster
        self.ray = import_ray()
        self.index = index
        self.ip = connect_ray(config)
        if index == 0:
            self._check_capacity()
        self.keys: dict[str, str] = {}
        self.auth = None
        self.bound: dict[str, str] = {}
        self.actors: dict[str, object] = {}
        self.nodes: dict[str, dict] = {}
        self.node_refs: dict[str, object] = {}
        self.placement_group = None
        self.transport: str | None = None  # the draft transport this start chose

    def _prepare_sockets(self) -> None:
        """This start's context, keys and ZAP handler, for the tcp:// sockets under CURVE."""
        self.context = zmq.Context()
        self.keys = cv.new_worker_keys()
        self.auth = cv.start_authenticator(self.context, self.keys["worker_public"])

    def _launch(self) -> str:
        """The placement group and the actors; each reports its node, then _run_workers."""
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        self.nodes = {}
        bundles = [dict(self._resources(role)) for role in self.roles]
        self.placement_group = placement_group(bundles, strategy="PACK", name=f"{self._name()}-workers")
        actor_cls = self.ray.remote(max_concurrency=2)(WorkerActor)
        for i, role in enumerate(self.roles):
            resources = dict(self._resources(role))
            self.actors[role] = actor_cls.options(
                name=f"{self._name()}-{role}", namespace=NAMESPACE,
                num_cpus=resources.pop("CPU", 0), num_gpus=resources.pop("GPU", 0), resources=resources,
                scheduling_strategy=PlacementGroupSchedulingStrategy(self.placement_group, placement_group_bundle_index=i),
            ).remote()
            self.node_refs[role] = self.actors[role].node.remote()
        return PLACE_PHASE

    def poll_start(self) -> bool:
        if self._start_phase == PLACE_PHASE:
            done, _ = self.ray.wait(list(self.node_refs.values()), num_returns=len(self.node_refs), timeout=0)
            if len(done) < len(self.node_refs):
                if time.monotonic() > self._start_deadline:
                    raise StartupError(
                        f"Ray did not place replica {self.index}'s workers within {self.config.server.startup_timeout_s}"
                        f" s: they need {[self._resources(r) for r in self.roles]} (drafter, verifier); the cluster "
                        f"has {self.ray.available_resources()} free")
                return False
            self.nodes = dict(zip(self.node_refs, self.ray.get(list(self.node_refs.values()))))
            self._run_workers()
            self._start_phase = "start"
            self._start_deadline = time.monotonic() + self.config.server.startup_timeout_s
        return super().poll_start()

    def _run_workers(self) -> None:
        """Choose the draft transport from where the actors landed, then run the worker loops."""
        self.transport = self._choose_transport()
        cluster = dataclasses.replace(self.config.cluster, draft_transport=self.transport or "auto")
        config = config_to_dict(dataclasses.replace(self.config, cluster=cluster))
        for role in self.roles:
            drafts = f"tcp://{_host(self.nodes[DRAFTER]['ip'])}:*" if role == DRAFTER and self.transport == "frames" else None
            ref = self.actors[role].run.remote(role, config, self.bound[role], self.bound["results"], drafts,
                                               cv.for_worker(self.keys, role))
            self.procs[role] = ActorProcess(self.ray, self.actors[role], ref, self.nodes[role])
        log.info("replica %d: %s (draft transport %s)", self.index,
                 ", ".join(f"{role} on {n['hostname']} ({n['ip']}, node {n['node_id'][:8]}, pid {n['pid']})"
                           for role, n in self.nodes.items()), self.transport)

    def _choose_transport(self) -> str | None:
        if DRAFTER not in self.roles:
            return None
        is_split = self.nodes[DRAFTER]["node_id"] != self.nodes[VERIFIER]["node_id"]
        setting = self.config.cluster.draft_transport
        if setting == "shared" and is_split:
            raise StartupError(f"cluster.draft_transport = shared, but Ray placed replica {self.index}'s drafter "
                               f"and verifier on different nodes ({self.nodes[DRAFTER]['ip']}, "
                               f"{self.nodes[VERIFIER]['ip']}): use auto or frames, or resources that keep them together")
        return "frames" if setting == "frames" or (setting == "auto" and is_split) else "shared"

    def _check_capacity(self) -> None:
        """Fail at once when the cluster's nodes hold less of a resource than the replicas need in
        all (a placement group that can never be placed would only time out)."""
        totals = self.ray.cluster_resources()
        n = self.config.cluster.replicas
        need: dict[str, float] = {}
        for role in self.roles:
            for name, amount in self._resources(role).items():
                need[name] = need.get(name, 0.0) + n * amount
        short = {name: (amount, totals.get(name, 0.0)) for name, amount in need.items() if amount > totals.get(name, 0.0)}
        if short:
            raise StartupError(
                f"the Ray cluster cannot hold {n} replica(s): they need "
                + ", ".join(f"{amount:g} {name} (the cluster has {have:g})" for name, (amount, have) in short.items())
                + f", as cluster.drafter_resources = {self.config.cluster.drafter_resources} and "
                f"cluster.verifier_resources = {self.config.cluster.verifier_resources} per replica; give fewer "
                "replicas, smaller amounts (e.g. {CPU = 0.5}) or more nodes")

    def _check_devices(self) -> None:
        """Fail at once where the draft exchange between actors cannot work yet."""
        devices = {self.config.drafter.device, self.config.verifier.device}
        if DRAFTER in self.roles and any(d.startswith("cuda") for d in devices):
            raise StartupError(
                "cluster.backend = ray with CUDA workers is not supported yet: Ray gives each actor only its own "
                "GPUs, so the verifier cannot attach the drafter's CUDA buffers, and the frames transport carries "
                "CPU buffers only (mode ar, with no drafter, works)")

    def _on_ready(self, message) -> None:
        """The verifier's tokenizer file is on its node: fetch it into this replica's run directory."""
        if isinstance(message, p.ReadyResult) and message.tokenizer.get("kind") == "file":
            data = self.ray.get(self.actors[message.role].read_tokenizer.remote(),
                                timeout=self.config.server.startup_timeout_s)
            path = os.path.join(self.run_dir, "tokenizer.json")
            with open(path, "wb") as f:
                f.write(data)
            message = dataclasses.replace(message, tokenizer={**message.tokenizer, "path": path})
        super()._on_ready(message)

    def stop(self) -> None:
        """Stop the worker loops as WorkerPool does, then end the actors and free their
        placement group; nothing of this replica stays in the cluster."""
        super().stop()
        for actor in self.actors.values():
            try:
                self.ray.kill(actor, no_restart=True)
            except Exception as exc:  # already gone
                log.debug("kill: %s", exc)
        if self.placement_group is not None:
            from ray.util.placement_group import remove_placement_group

            remove_placement_group(self.placement_group)
        if self.auth is not None:
            self.auth.stop()
        if self.context is not None:
            self.context.destroy(linger=0)
        self.actors, self.node_refs, self.nodes = {}, {}, {}
        self.placement_group, self.auth, self.context = None, None, None
        self.bound, self.transport = {}, None

    def placement(self) -> dict[str, dict]:
        return {role: {**self.nodes[role], "actor": f"{self._name()}-{role}"} for role in self.nodes}

    def _resources(self, role: str) -> dict[str, float]:
        return self.config.cluster.drafter_resources if role == DRAFTER else self.config.cluster.verifier_resources

    def _name(self) -> str:
        return f"minedraft-{os.getpid()}-r{self.index}-g{self.generation}"

    def _socket(self, kind: int, name: str) -> zmq.Socket:
        sock = self.context.socket(kind)
        sock.setsockopt(zmq.LINGER, 0)
        cv.make_server(sock, self.keys["scheduler_public"], self.keys["scheduler_secret"])
        try:
            self.bound[name] = cv.bind_tcp(sock, _host(self.ip), self.config.cluster.worker_ports)
        except ValueError as exc:
            sock.close(linger=0)
            raise StartupError(str(exc)) from None
        return sock

    def _endpoint(self, name: str) -> str:
        return self.bound[name]

    def _remove_endpoints(self) -> None:
        """tcp:// endpoints leave nothing on disk."""

    def _exit_reason(self, role: str, proc: ActorProcess) -> str:
        return f"{role} actor {proc.reason} on {proc.node['ip']}"


def disconnect_ray() -> None:
    """Leave the Ray cluster (a private instance stops with it)."""
    import ray

    if ray.is_initialized():
        ray.shutdown()


def _host(ip: str) -> str:
    return f"[{ip}]" if ":" in ip else ip
