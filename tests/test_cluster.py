"""The Ray backend and replicas, on a local multi-node Ray cluster (ray.cluster_utils.Cluster):
a head with no CPUs and two nodes whose custom resources force every drafter onto one node and
every verifier onto the other, so the drafts must cross between nodes as frames."""

from __future__ import annotations

import asyncio
import glob
import logging
import os
import signal
import tempfile
import time

import pytest

from minedraft.runtime.client import AsyncClient, Client, RequestError
from tests.runtime_utils import cli, daemon_args, reference_outputs, running_daemon, status
from tests.test_runtime import run_load, workload

ray = pytest.importorskip("ray", reason="the cluster extra (Ray) is not installed")
from ray.cluster_utils import Cluster  # noqa: E402

NODE_RESOURCES = ({"drafter_host": 4}, {"verifier_host": 4})


@pytest.fixture(scope="module")
def ray_cluster():
    cluster = Cluster(initialize_head=True, connect=False, head_node_args={"num_cpus": 0, "include_dashboard": False})
    for resources in NODE_RESOURCES:
        cluster.add_node(num_cpus=4, resources=resources)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, namespace="minedraft", logging_level=logging.ERROR, log_to_driver=False)
    try:
        yield cluster
    finally:
        ray.shutdown()
        cluster.shutdown()


def ray_overrides(cluster, *more: str) -> list[str]:
    return ["cluster.backend=ray", f"cluster.ray_address={cluster.address}",
            "cluster.drafter_resources={drafter_host = 1}", "cluster.verifier_resources={verifier_host = 1}", *more]


def _worker_actor_pids() -> set[int]:
    """Processes of worker actors on this machine (every simulated node is here)."""
    pids = set()
    for path in glob.glob("/proc/[0-9]*/cmdline"):
        try:
            with open(path, "rb") as f:
                if f.read().startswith(b"ray::WorkerActor"):
                    pids.add(int(path.split("/")[2]))
        except OSError:
            pass
    return pids


def _shm_segments() -> set[str]:
    return set(os.listdir("/dev/shm"))


def assert_nothing_left(daemon_pid: int | None, shm_before: set[str]) -> None:
    """No actor, placement group, process or shared-memory segment of the daemon (None: of any
    daemon) remains."""
    prefix = "minedraft-" if daemon_pid is None else f"minedraft-{daemon_pid}-"
    is_alive = lambda: daemon_pid is not None and os.path.exists(f"/proc/{daemon_pid}")  # noqa: E731
    deadline = time.monotonic() + 10
    while (_worker_actor_pids() or is_alive()) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _worker_actor_pids() == set() and not is_alive()
    names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)]
    assert [n for n in names if n.startswith(prefix)] == []
    groups = ray.util.placement_group_table().values()
    assert [g for g in groups if g["name"].startswith(prefix) and g["state"] != "REMOVED"] == []
    assert {s for s in _shm_segments() - shm_before if "minedraft" in s or s.startswith("psm_")} == set()


def test_workers_on_two_nodes_give_the_local_backends_tokens_over_frames(tmp_path, ray_cluster):
    """Greedy and seeded sampled requests through psd with the drafter and the verifier on
    different Ray nodes equal the local backend's outputs, and the drafts went as frames. Then
    the daemon is killed outright: Ray ends its actors, and nothing of it stays."""
    requests = workload(8, temperature=0.0) + [dict(r, request_id=f"s{i}") for i, r in
                                                enumerate(workload(8, temperature=0.8))]
    shm_before = _shm_segments()
    args = daemon_args(tmp_path / "ray", "psd", *ray_overrides(ray_cluster, "cluster.worker_ports=[41700, 41799]"))
    started = cli("start", *args)
    assert started.returncode == 0, started.stdout + started.stderr
    endpoint = args[args.index("--endpoint") + 1]
    try:
        on_ray = asyncio.run(run_load(endpoint, requests))
        st = status(endpoint)
    finally:
        os.kill(int((tmp_path / "ray" / "run" / "daemon.pid").read_text()), signal.SIGKILL)
    assert_nothing_left(st["pid"], shm_before)
    with running_daemon(tmp_path / "local", "psd") as (endpoint, _):
        local = asyncio.run(run_load(endpoint, requests))
    assert on_ray == local
    assert on_ray == reference_outputs(requests, mode="sd")
    workers = st["replicas"][0]["workers"]
    assert workers["drafter"]["node_id"] != workers["verifier"]["node_id"]
    assert st["backend"] == "ray" and st["draft_transport"] == "frames" and st["num_draft_frame_bytes"] > 0
    assert st["acceptance_rate"] > 0.3
    endpoints = st["replicas"][0]["endpoints"]  # every worker socket in cluster.worker_ports
    assert sorted(endpoints) == ["drafter", "drafts", "results", "verifier"]
    assert all(e.startswith("tcp://") and 41700 <= int(e.rsplit(":", 1)[1]) <= 41799 for e in endpoints.values())


async def _generate_all(endpoint: str, requests: list[dict]) -> dict[str, tuple[str, float, int]]:
    """request_id -> (outcome, time it ended, tokens): outcome is the finish reason or the error code."""
    async with AsyncClient(endpoint, timeout_s=60) as client:
        async def one(r):
            try:
                c = await client.generate(prompt_ids=r["prompt_ids"], max_tokens=r["max_tokens"], request_id=r["request_id"],
                                          temperature=r["temperature"], seed=r["seed"], ignore_eos=True)
                return r["request_id"], (c.finish_reason, time.monotonic(), len(c.token_ids))
            except RequestError as exc:
                return r["request_id"], (exc.code, time.monotonic(), 0)
        return dict(await asyncio.gather(*(one(r) for r in requests)))


def _wait_status(endpoint: str, is_ok, timeout_s: float = 60) -> dict:
    deadline = time.monotonic() + timeout_s
    while True:
        st = status(endpoint)
        if is_ok(st):
            return st
        assert time.monotonic() < deadline, f"status never matched: {st['replicas']}"
        time.sleep(0.05)


def test_two_replicas_serve_lose_a_verifier_and_come_back(tmp_path, ray_cluster):
    """2 replicas on Ray share 32 concurrent requests, also through the HTTP front end; killing
    one replica's verifier actor ends that replica's in-flight requests with runtime_dead within
    5 s while the other replica's finish; with restart_workers the replica returns and serves
    again; stop leaves nothing. The models are folders with a tokenizer file, which the verifier
    actors write on their node and the scheduler fetches."""
    import httpx

    from tests.http_utils import write_chat_model

    shm_before = _shm_segments()
    target, draft = write_chat_model(tmp_path / "target"), write_chat_model(tmp_path / "draft", noise=0.003)
    overrides = ray_overrides(ray_cluster, "cluster.replicas=2", "scheduler.restart_workers=true",
                              f"model.target={target}", f"model.draft={draft}", "server.http=127.0.0.1:0")
    args = daemon_args(tmp_path, "psd", *overrides)
    started = cli("start", *args)
    assert started.returncode == 0, started.stdout + started.stderr
    endpoint = args[args.index("--endpoint") + 1]
    try:
        outcomes = asyncio.run(_generate_all(endpoint, workload(32, temperature=0.0)))
        assert {o for o, _, _ in outcomes.values()} <= {"length", "stop"} and len(outcomes) == 32
        st = status(endpoint)
        assert sum(r["num_routed"] for r in st["replicas"]) == 32 and min(r["num_routed"] for r in st["replicas"]) >= 8
        assert all(r["num_jobs"]["verifier"] > 0 and r["num_jobs"]["drafter"] > 0 for r in st["replicas"])
        reply = httpx.post(st["http"]["url"] + "/v1/completions", timeout=30,
                           json={"model": target, "prompt": "def fib(n):", "max_tokens": 8, "temperature": 0})
        assert reply.status_code == 200 and reply.json()["usage"]["completion_tokens"] == 8, reply.text
        metrics = httpx.get(st["http"]["url"] + "/metrics", timeout=30).text
        assert 'minedraft_replica_up{replica="0"} 1.0' in metrics and 'minedraft_replica_up{replica="1"} 1.0' in metrics
        assert 'minedraft_replica_routed_requests_total{replica="1"}' in metrics
        with Client(endpoint, timeout_s=30) as client:  # the text the scheduler decodes with the fetched tokenizer
            assert client.generate("def fib(n):", max_tokens=8).text == reply.json()["choices"][0]["text"]

        # long requests on both replicas; then replica 0 loses its verifier
        long = [dict(r, request_id=f"long{i}", max_tokens=250) for i, r in enumerate(workload(16))]

        async def kill_while_running():
            task = asyncio.create_task(_generate_all(endpoint, long))
            in_flight = await asyncio.to_thread(
                _wait_status, endpoint, lambda s: sum(r["num_in_flight"] for r in s["replicas"]) == len(long)
                and all(r["num_in_flight"] >= 4 for r in s["replicas"]))  # all sent, both replicas busy
            victim = in_flight["replicas"][0]["workers"]["verifier"]["actor"]
            killed_s = time.monotonic()
            ray.kill(ray.get_actor(victim, namespace="minedraft"), no_restart=True)
            return await task, killed_s, in_flight

        ended, killed_s, before = asyncio.run(kill_while_running())
        dead = {rid: t for rid, (o, t, _) in ended.items() if o == "runtime_dead"}
        finished = [rid for rid, (o, _, n) in ended.items() if o == "length" and n == 250]
        assert len(dead) + len(finished) == len(long)  # every request had its one outcome
        assert 0 < len(dead) <= before["replicas"][0]["num_in_flight"]
        assert max(dead.values()) - killed_s < 5.0
        assert len(finished) >= before["replicas"][1]["num_in_flight"]  # the other replica's all finished

        back = _wait_status(endpoint, lambda s: s["replicas"][0]["state"] == "serving"
                            and s["replicas"][0]["num_restarts"] == 1)
        assert back["state"] == "serving" and back["num_live_replicas"] == 2
        killed_pid = before["replicas"][0]["workers"]["verifier"]["pid"]  # its run directory held the tokenizer
        assert glob.glob(f"{tempfile.gettempdir()}/minedraft-actor-{killed_pid}-*") == []  # removed by its successor
        assert back["replicas"][0]["workers"]["verifier"]["actor"] != before["replicas"][0]["workers"]["verifier"]["actor"]
        again = asyncio.run(_generate_all(endpoint, [dict(r, request_id=f"again{i}") for i, r in
                                                     enumerate(workload(8))]))
        assert {o for o, _, _ in again.values()} <= {"length", "stop"}
        after = status(endpoint)
        assert after["replicas"][0]["num_routed"] > back["replicas"][0]["num_routed"]
    finally:
        stopped = cli("stop", *args)
        assert stopped.returncode == 0, stopped.stdout + stopped.stderr
    assert_nothing_left(st["pid"], shm_before)



def test_ray_backend_refuses_cuda_drafts_between_actors_before_joining(tmp_path):
    """Ray gives each actor only its own GPUs, so CUDA IPC cannot attach and frames are CPU-only:
    the start fails at once with the reason, before joining any cluster."""
    from minedraft.common.config import load_config
    from minedraft.runtime.ray_pool import RayWorkerPool
    from minedraft.runtime.worker_pool import StartupError

    config = load_config("tiny", ["cluster.backend=ray", "cluster.ray_address=198.51.100.1:6379",
                                  "drafter.device=cuda", "verifier.device=cuda:1"])
    with pytest.raises(StartupError, match="CUDA workers is not supported yet"):
        RayWorkerPool(config, str(tmp_path), None)


def test_start_without_ray_says_what_to_install(tmp_path, monkeypatch, capsys):
    import importlib.util

    from minedraft.runtime import cli

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "ray" else real_find_spec(name, *a))
    args = daemon_args(tmp_path, "psd", "cluster.backend=ray")
    assert cli.main(["start", *args]) == 1
    assert "pip install 'minedraft-runtime[cluster]'" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_more_replicas_than_the_cluster_holds_fail_at_once(tmp_path, ray_cluster):
    """5 replicas need 5 drafter_host where the cluster has 4: refused before any actor is made,
    with what is needed and what there is."""
    from minedraft.common.config import load_config
    from minedraft.runtime.ray_pool import RayWorkerPool
    from minedraft.runtime.worker_pool import StartupError

    config = load_config("tiny", ray_overrides(ray_cluster, "cluster.replicas=5"))
    with pytest.raises(StartupError, match=r"cannot hold 5 replica\(s\): they need 5 drafter_host \(the cluster "
                                           r"has 4\), 5 verifier_host \(the cluster has 4\)"):
        RayWorkerPool(config, str(tmp_path), None, 0)


def test_a_new_actor_removes_the_run_directories_of_killed_ones(tmp_path, monkeypatch):
    import subprocess
    import sys

    from minedraft.runtime.ray_pool import remove_stale_actor_dirs

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    (tmp_path / f"minedraft-actor-{gone.pid}-abc").mkdir()
    (tmp_path / f"minedraft-actor-{gone.pid}-abc" / "tokenizer.json").write_text("{}")
    (tmp_path / f"minedraft-actor-{os.getpid()}-def").mkdir()  # a live actor's
    (tmp_path / "minedraft-actor-x-ghi").mkdir()  # not ours by name
    assert remove_stale_actor_dirs() == [str(tmp_path / f"minedraft-actor-{gone.pid}-abc")]
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"minedraft-actor-{os.getpid()}-def", "minedraft-actor-x-ghi"]


def test_a_worker_that_cannot_load_its_model_fails_the_start_with_the_reason(tmp_path, ray_cluster):
    """The actor's start-up error reaches the scheduler over its CURVE socket: start fails with
    the worker's own reason, and nothing stays in the cluster."""
    shm_before = _shm_segments()
    missing = tmp_path / "no-such-model"
    args = daemon_args(tmp_path, "psd", *ray_overrides(ray_cluster, f"model.target={missing}"))
    started = cli("start", *args)
    assert started.returncode == 1
    assert "start-up failed: verifier failed to start" in started.stderr and str(missing) in started.stderr
    assert_nothing_left(None, shm_before)
