"""Reliability and security against real processes on tiny models: validation of every input,
hostile frames, abort and disconnect, backpressure, dead and hung workers, restarts,
loopback-only defaults and CURVE-authenticated remote access."""

import asyncio
import glob
import os
import random
import signal
import socket
import subprocess
import sys
import time

import msgpack
import pytest
import zmq

from minedraft.common import protocol as p
from minedraft.runtime.client import AsyncClient, Client, RequestError, make_request
from tests.runtime_utils import ROOT, cli, daemon_args, running_daemon, status


# A tiny model slow enough that long requests are still running when a test acts on them.
SLOW_MODEL = ("model.tiny_hidden_size=512", "model.tiny_intermediate_size=2048", "model.tiny_num_layers=6")


def raw_socket(endpoint: str) -> zmq.Socket:
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(endpoint)
    return sock


def ask(sock: zmq.Socket, frame: bytes, timeout_s: float = 10.0):
    sock.send(frame)
    assert sock.poll(int(timeout_s * 1000)), "no answer"
    return p.decode(sock.recv(), p.CLIENT_OUTPUTS)


def generate_frame(**fields) -> bytes:
    body = {"type": "generate", "v": p.PROTOCOL_VERSION, "request_id": "bad", "prompt": "hi", **fields}
    body = {k: v for k, v in body.items() if v is not ...}
    return msgpack.packb(body)


INVALID = [  # (fields, the field its error must name)
    (dict(prompt=""), "prompt"),
    (dict(prompt=..., prompt_ids=[]), "prompt_ids"),
    (dict(prompt=None), "prompt"),
    (dict(prompt_ids=[1, 2]), "prompt"),  # both prompt and prompt_ids
    (dict(prompt=..., prompt_ids=[1] * 500, max_tokens=100), "max_tokens"),  # beyond max_len 512
    (dict(max_tokens=0), "max_tokens"),
    (dict(max_tokens=-5), "max_tokens"),
    (dict(max_tokens=10**6), "max_tokens"),
    (dict(temperature=-0.5), "temperature"),
    (dict(temperature=float("nan")), "temperature"),
    (dict(temperature=float("inf")), "temperature"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"),
    (dict(top_k=-1), "top_k"),
    (dict(prompt=..., prompt_ids=[1, 512]), "prompt_ids"),
    (dict(prompt=..., prompt_ids=[-3]), "prompt_ids"),
    (dict(max_tokens="8"), "max_tokens"),
    (dict(temperature="hot"), "temperature"),
    (dict(prompt=123), "prompt"),
    (dict(request_id=5), "request_id"),
    (dict(request_id=""), "request_id"),
    (dict(stop=[""]), "stop"),
    (dict(stop_token_ids=[10**9]), "stop_token_ids"),
    (dict(seed=-1), "seed"),
    (dict(evil="x"), "evil"),
    (dict(prompt="x" * 1_200_000), "limit"),  # beyond max_request_bytes
]


@pytest.fixture(scope="module")
def tiny_daemon(tmp_path_factory):
    with running_daemon(tmp_path_factory.mktemp("daemon"), "psd") as (endpoint, args):
        yield endpoint, args


@pytest.mark.parametrize("fields,name", INVALID, ids=[f"{n}-{i}" for i, (_, n) in enumerate(INVALID)])
def test_invalid_request_gets_error_naming_the_field(tiny_daemon, fields, name):
    endpoint, _ = tiny_daemon
    sock = raw_socket(endpoint)
    reply = ask(sock, generate_frame(**fields))
    assert isinstance(reply, p.ErrorOutput), reply
    assert reply.code in ("invalid_request", "bad_frame")
    assert name in reply.message, reply.message
    if isinstance(fields.get("request_id", "bad"), str) and fields.get("request_id", "bad"):
        assert reply.request_id == fields.get("request_id", "bad")  # routed to its request
    ok = ask(sock, p.encode(p.GenerateRequest("good-" + name, prompt="hi", max_tokens=3)))
    while isinstance(ok, p.GenerateOutput) and not ok.is_finished:
        assert sock.poll(10000)
        ok = p.decode(sock.recv(), p.CLIENT_OUTPUTS)
    assert isinstance(ok, p.GenerateOutput) and ok.finish_reason in ("length", "stop")
    sock.close()


def test_client_validates_before_sending():
    for kwargs in [dict(prompt=""), dict(prompt="x", max_tokens=0), dict(prompt="x", temperature=-1),
                   dict(prompt="x", top_p=2.0), dict(prompt="x", top_k=-2), dict(prompt_ids=[-1]),
                   dict(prompt="x", max_tokens="3"), dict(prompt="x" * 2_000_000), dict()]:
        with pytest.raises(ValueError):
            make_request(**kwargs)


def test_duplicate_request_id_refused(tiny_daemon):
    endpoint, _ = tiny_daemon
    sock = raw_socket(endpoint)
    first = p.encode(p.GenerateRequest("dup", prompt="hello", max_tokens=200, ignore_eos=True))
    sock.send(first)
    reply = ask(sock, first)
    while not isinstance(reply, p.ErrorOutput):
        assert sock.poll(10000)
        reply = p.decode(sock.recv(), p.CLIENT_OUTPUTS)
    assert reply.code == "invalid_request" and "request_id" in reply.message
    sock.send(p.encode(p.AbortRequest("dup")))
    sock.close()


def hostile_frames(n: int, seed: int = 0):
    rng = random.Random(seed)
    valid = p.encode(p.GenerateRequest("f", prompt="hi", max_tokens=4))
    for i in range(n):
        kind = i % 8
        if kind == 0:
            yield [rng.randbytes(rng.randint(0, 64))]
        elif kind == 1:
            yield [valid[: rng.randint(0, len(valid) - 1)]]
        elif kind == 2:
            depth = rng.randint(10, 5000)
            yield [b"\x91" * depth + b"\x00"]  # deeply nested arrays
        elif kind == 3:
            yield [msgpack.packb({"type": rng.choice(["generate", "abort", "status", "x", 3]), "v": 1,
                                  "request_id": rng.choice([1, None, [], {}, "r"]), "max_tokens": rng.choice(["a", 1.5, None])})]
        elif kind == 4:
            yield [msgpack.packb({"type": "generate", "v": 1, "request_id": f"h{i}", "prompt": "x",
                                  "max_tokens": rng.choice([2**63 - 1, -(2**63)]), "top_k": 2**40})]
        elif kind == 5:
            yield [b"\xdb\xff\xff\xff\xff"]  # str32 claiming 4 GiB
        elif kind == 6:
            yield [valid, valid, rng.randbytes(8)]  # extra frames
        else:
            yield [msgpack.packb(rng.choice([[], {}, 1, "s", None, {"type": "shutdown_job", "v": 1}]))]


def test_fuzz_hostile_frames_then_still_serves(tiny_daemon):
    endpoint, _ = tiny_daemon
    sock = raw_socket(endpoint)
    sock.setsockopt(zmq.RCVHWM, 0)
    num_sent = 0
    for frames in hostile_frames(10_000):
        sock.send_multipart(frames)
        num_sent += 1
        while sock.poll(0):
            p.decode(sock.recv(), p.CLIENT_OUTPUTS)  # every answer is a well-formed message
    assert num_sent == 10_000
    # the oversized frame beyond twice the limit drops this peer: use a fresh socket
    big = raw_socket(endpoint)
    big.send(b"\x00" * 3_000_000)
    big.close()
    with Client(endpoint, timeout_s=30) as client:
        completion = client.generate("still alive?", max_tokens=4)
        assert len(completion.token_ids) >= 1
        assert client.status()["state"] == "serving"
    sock.close()


def test_abort_stops_steps_and_frees_slots(tmp_path):
    # one request per batch and 2 slots per worker: a leaked slot would fail the third request
    with running_daemon(tmp_path, "sd", "scheduler.max_batch=1", *SLOW_MODEL) as (endpoint, _):
        with Client(endpoint, timeout_s=30) as client:
            chunks = client.stream("long one", max_tokens=250, ignore_eos=True, request_id="long")
            seen = 0
            for chunk in chunks:
                seen += len(chunk.token_ids)
                if seen >= 5:
                    client.abort("long")
                    break
            tail = list(chunks)
            assert tail[-1].is_finished and tail[-1].finish_reason == "abort"
            assert seen + sum(len(c.token_ids) for c in tail) < 250
            before = status(endpoint)["num_output_tokens"]
            time.sleep(0.5)
            assert status(endpoint)["num_output_tokens"] == before  # no more steps for it
            client.abort("long")  # twice: harmless
            for i in range(3):
                done = client.generate("next", max_tokens=8, ignore_eos=True)
                client.abort(done.request_id)  # a finished request: harmless
                assert len(done.token_ids) == 8
            st = status(endpoint)
            assert st["num_running"] == 0 and st["state"] == "serving"


def test_cancelled_async_stream_aborts(tmp_path):
    async def main(endpoint):
        async with AsyncClient(endpoint, timeout_s=30) as client:
            first = asyncio.Event()

            async def consume():
                async for _ in client.stream("cancel me", max_tokens=250, ignore_eos=True):
                    first.set()
                    await asyncio.sleep(3600)  # a consumer that is cancelled mid-stream
            task = asyncio.create_task(consume())
            await first.wait()
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            for _ in range(50):
                st = await client.status()
                if st["num_running"] == 0:
                    return st
                await asyncio.sleep(0.1)
            return st

    with running_daemon(tmp_path, "psd", *SLOW_MODEL) as (endpoint, _):
        st = asyncio.run(main(endpoint))
        assert st["num_running"] == 0 and st["finish_reasons"].get("abort") == 1


def test_vanished_client_requests_are_aborted(tmp_path):
    with running_daemon(tmp_path, "psd", *SLOW_MODEL) as (endpoint, _):
        sock = raw_socket(endpoint)
        for i in range(4):
            sock.send(p.encode(p.GenerateRequest(f"gone{i}", prompt="bye", max_tokens=250, ignore_eos=True)))
        time.sleep(0.3)
        sock.close()  # the client vanishes without reading
        deadline = time.monotonic() + 10
        while status(endpoint)["num_running"] and time.monotonic() < deadline:
            time.sleep(0.1)
        st = status(endpoint)
        assert st["num_running"] == 0 and st["finish_reasons"].get("abort") == 4


def test_overload_every_request_gets_an_outcome(tmp_path):
    async def main(endpoint):
        async with AsyncClient(endpoint, timeout_s=60) as client:
            async def one(i):
                try:
                    await client.generate(f"load {i}", max_tokens=16, ignore_eos=True)
                    return "ok"
                except RequestError as exc:
                    return exc.code
            return await asyncio.gather(*(one(i) for i in range(32)))

    with running_daemon(tmp_path, "psd", "scheduler.max_queued_requests=4", "scheduler.max_batch=2") as (endpoint, _):
        outcomes = asyncio.run(main(endpoint))
    assert len(outcomes) == 32
    assert set(outcomes) <= {"ok", "overloaded"}
    assert outcomes.count("overloaded") >= 1 and outcomes.count("ok") >= 4


def _shm_segments() -> set[str]:
    return set(glob.glob("/dev/shm/minedraft-*"))


def _wait_gone(pids, timeout_s=10.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if all(not os.path.exists(f"/proc/{pid}") for pid in pids):
            return True
        time.sleep(0.1)
    return False


@pytest.mark.parametrize("role", ["drafter", "verifier"])
def test_kill_worker_fails_all_requests_fast_and_cleans_up(tmp_path, role):
    shm_before = _shm_segments()
    # a model large enough that no request can finish before the kill
    args = daemon_args(tmp_path, "psd", "server.dead_linger_s=3", *SLOW_MODEL)
    assert cli("start", *args).returncode == 0
    endpoint = args[args.index("--endpoint") + 1]
    st = status(endpoint)
    pids = [st["pid"], *st["worker_pids"].values()]

    async def main():
        async with AsyncClient(endpoint, timeout_s=30) as client:
            async def one(i):
                try:
                    await client.generate(f"work {i}", max_tokens=250, ignore_eos=True)
                    return "ok", time.monotonic()
                except RequestError as exc:
                    return exc.code, time.monotonic()
            tasks = [asyncio.create_task(one(i)) for i in range(16)]
            await asyncio.sleep(1.0)
            killed_at = time.monotonic()
            os.kill(st["worker_pids"][role], signal.SIGKILL)
            results = await asyncio.gather(*tasks)
            late = await asyncio.gather(one(99))
            return killed_at, results, late

    killed_at, results, late = asyncio.run(main())
    assert [code for code, _ in results] == ["runtime_dead"] * 16
    assert max(t for _, t in results) - killed_at < 5.0
    assert late[0][0] == "runtime_dead"  # later calls fail fast
    assert _wait_gone(pids), "processes left behind"
    assert _shm_segments() - shm_before == set()
    log = open(tmp_path / "run" / "daemon.log").read()  # kept after a failure
    assert f"{role} exited" in log


def test_hung_worker_is_detected(tmp_path):
    args = daemon_args(tmp_path, "sd", "scheduler.job_timeout_s=2", "server.dead_linger_s=1")
    assert cli("start", *args).returncode == 0
    endpoint = args[args.index("--endpoint") + 1]
    st = status(endpoint)
    os.kill(st["worker_pids"]["verifier"], signal.SIGSTOP)
    started = time.monotonic()
    with Client(endpoint, timeout_s=30) as client:
        with pytest.raises(RequestError, match="did not answer"):
            client.generate("are you there", max_tokens=8)
    assert time.monotonic() - started < 6.0
    assert _wait_gone([st["pid"], *st["worker_pids"].values()])


def test_restart_workers_serves_after_a_kill(tmp_path):
    with running_daemon(tmp_path, "psd", "scheduler.restart_workers=true", *SLOW_MODEL) as (endpoint, _):
        st = status(endpoint)
        with Client(endpoint, timeout_s=60) as client:
            stream = client.stream("before", max_tokens=250, ignore_eos=True)
            next(stream)
            os.kill(st["worker_pids"]["drafter"], signal.SIGKILL)
            with pytest.raises(RequestError, match="runtime_dead"):
                list(stream)
            done = client.generate("after", max_tokens=8, ignore_eos=True)
            assert len(done.token_ids) == 8
            after = client.status()
        assert after["num_restarts"] == 1 and after["state"] == "serving"
        assert after["worker_pids"]["drafter"] != st["worker_pids"]["drafter"]
        assert not os.path.exists(f"/proc/{st['worker_pids']['drafter']}")


def test_foreground_exits_nonzero_when_a_worker_dies(tmp_path):
    args = daemon_args(tmp_path, "psd", "server.dead_linger_s=0.5")
    proc = subprocess.Popen([sys.executable, "-m", "minedraft.runtime.cli", "start", "--foreground", *args],
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = args[args.index("--endpoint") + 1]
    deadline = time.monotonic() + 60
    while True:
        try:
            st = status(endpoint)
            break
        except TimeoutError:
            assert time.monotonic() < deadline
    os.kill(st["worker_pids"]["verifier"], signal.SIGKILL)
    assert proc.wait(timeout=20) == 1


def test_workers_exit_when_the_scheduler_dies(tmp_path):
    shm_before = _shm_segments()
    args = daemon_args(tmp_path, "psd")
    assert cli("start", *args).returncode == 0
    st = status(args[args.index("--endpoint") + 1])
    os.kill(st["pid"], signal.SIGKILL)
    assert _wait_gone(st["worker_pids"].values())
    assert _shm_segments() - shm_before == set()  # the drafter unlinks its buffers on exit


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_default_binds_loopback_only(tmp_path):
    port = _free_port()
    args = ["--config", "configs/tiny.toml", "--endpoint", f"tcp://127.0.0.1:{port}",
            "--set", f"server.run_dir={tmp_path}/run"]
    assert cli("start", *args).returncode == 0
    try:
        listening = [line.split()[1] for line in open("/proc/net/tcp").read().splitlines()[1:]
                     if line.split()[3] == "0A" and int(line.split()[1].split(":")[1], 16) == port]
        assert listening == [f"0100007F:{port:04X}"]  # 127.0.0.1 only
        assert oct(os.stat(tmp_path / "run").st_mode & 0o777) == "0o700"
    finally:
        assert cli("stop", *args).returncode == 0


def test_non_loopback_bind_refused_without_auth(tmp_path):
    out = cli("start", "--config", "configs/tiny.toml", "--endpoint", "tcp://0.0.0.0:7999",
              "--set", f"server.run_dir={tmp_path}/run")
    assert out.returncode != 0
    assert "refusing to bind the non-loopback address" in out.stderr
    assert not os.path.exists(tmp_path / "run")


def test_curve_authenticated_remote_access(tmp_path):
    keys = tmp_path / "keys"
    assert cli("keys", str(keys)).returncode == 0
    port = _free_port()
    args = ["--config", "configs/tiny.toml", "--endpoint", f"tcp://0.0.0.0:{port}",
            "--set", f"server.run_dir={tmp_path}/run", "--set", "server.allow_remote=true",
            "--set", f"server.curve_dir={keys}"]
    started = cli("start", *args)
    assert started.returncode == 0, started.stderr
    try:
        with Client(f"tcp://127.0.0.1:{port}", timeout_s=30, curve_dir=str(keys)) as client:
            assert len(client.generate("secret", max_tokens=4).token_ids) >= 1
        with Client(f"tcp://127.0.0.1:{port}", timeout_s=2) as stranger:  # no keys: never answered
            with pytest.raises(TimeoutError):
                stranger.status()
        other = tmp_path / "other"
        assert cli("keys", str(other)).returncode == 0
        os.replace(other / "server.key", other / "server.key.own")
        os.link(keys / "server.key", other / "server.key")  # right server, unlisted client key
        with Client(f"tcp://127.0.0.1:{port}", timeout_s=2, curve_dir=str(other)) as unlisted:
            with pytest.raises(TimeoutError):
                unlisted.status()
    finally:
        assert cli("stop", *args).returncode == 0


def test_a_scheduler_error_ends_every_live_request_with_runtime_dead(tmp_path):
    """A bug in the scheduler core must not leave clients waiting for outputs that never come."""
    args = daemon_args(tmp_path, "sd")
    child = ("import sys\n"
             "from minedraft.runtime import cli, scheduler\n"
             "def fail(self, result):\n"
             "    raise RuntimeError('injected scheduler fault')\n"
             "scheduler.SchedulerCore.on_verify_result = fail\n"
             f"sys.exit(cli.main(['start', '--foreground', *{args!r}]))\n")
    proc = subprocess.Popen([sys.executable, "-c", child], cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    endpoint = args[args.index("--endpoint") + 1]
    deadline = time.monotonic() + 60
    while True:
        try:
            status(endpoint)
            break
        except TimeoutError:
            assert time.monotonic() < deadline and proc.poll() is None
    with Client(endpoint, timeout_s=20) as client:
        start_s = time.monotonic()
        with pytest.raises(RequestError) as info:
            client.generate(prompt_ids=[1, 2, 3], max_tokens=8)
    assert info.value.code == "runtime_dead" and "injected scheduler fault" in info.value.message
    assert time.monotonic() - start_s < 10
    assert proc.wait(timeout=20) == 1
