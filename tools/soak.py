"""Soak test: a daemon under mixed, hostile load for a bounded time, counting every request's
terminal outcome. Loopback only: it starts its own daemon on a private ipc:// endpoint.

Load: normal generates (greedy and sampled), streams cancelled midway, aborts, invalid requests
sent past the client's checks, and a kill -9 of a worker every --kill-every-s seconds (the daemon
runs with scheduler.restart_workers = true). At the end: requests sent, each terminal outcome
counted, requests lost (must be 0), and RSS growth of every process.

    python tools/soak.py --config tiny --duration-s 600 --json out/soak.json
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time

import zmq
import zmq.asyncio

from minedraft.common import protocol as p
from minedraft.runtime.client import AsyncClient, Client, RequestError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
INVALID = [dict(max_tokens=0), dict(temperature=-1.0), dict(top_p=0.0), dict(top_k=-4),
           dict(prompt=None, prompt_ids=[10**6]), dict(max_tokens=10**7), dict(prompt="")]


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "minedraft.runtime.cli", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)


def rss_kib(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
    except (OSError, StopIteration):
        return None


class Soak:
    def __init__(self, endpoint: str, args):
        self.endpoint = endpoint
        self.args = args
        self.rng = random.Random(args.seed)
        self.outcomes: collections.Counter[str] = collections.Counter()
        self.num_sent = 0
        self.pending: set[str] = set()  # sent, no terminal outcome yet
        self.num_kills = 0

    def _new_id(self) -> str:
        self.num_sent += 1
        request_id = f"soak-{self.num_sent}"
        self.pending.add(request_id)
        return request_id

    def _done(self, request_id: str, outcome: str) -> None:
        self.pending.discard(request_id)
        self.outcomes[outcome] += 1

    async def one(self, client: AsyncClient, raw: zmq.asyncio.Socket) -> None:
        action = self.rng.choices(["generate", "cancel", "abort", "invalid"], [6, 2, 1, 1])[0]
        request_id = self._new_id()
        kwargs = dict(max_tokens=self.rng.randint(1, 96), temperature=self.rng.choice([0.0, 0.0, 0.8]),
                      seed=self.rng.randint(0, 2**31), request_id=request_id)
        prompt = f"soak {self.rng.random():.6f} " * self.rng.randint(1, 8)
        try:
            if action == "invalid":  # straight onto the wire, past the client's own checks
                fields = {"request_id": request_id, "prompt": prompt, **self.rng.choice(INVALID)}
                await raw.send(p.encode(p.GenerateRequest(**fields)))
                reply = p.decode(await asyncio.wait_for(raw.recv(), 60), p.CLIENT_OUTPUTS)
                self._done(request_id, f"error:{reply.code}" if isinstance(reply, p.ErrorOutput) else "unexpected")
            elif action == "generate":
                completion = await client.generate(prompt, **kwargs)
                self._done(request_id, f"finished:{completion.finish_reason}")
            elif action == "cancel":
                stream = client.stream(prompt, **{**kwargs, "max_tokens": 200})
                async for _ in stream:
                    break
                await stream.aclose()  # the client sends the abort
                self._done(request_id, "cancelled")
            else:
                task = asyncio.create_task(client.generate(prompt, **{**kwargs, "max_tokens": 200}))
                await asyncio.sleep(self.rng.random() * 0.2)
                await client.abort(request_id)
                completion = await task
                self._done(request_id, f"finished:{completion.finish_reason}")
        except RequestError as exc:
            self._done(request_id, f"error:{exc.code}")
        except asyncio.TimeoutError:
            pass  # stays pending: counted as lost

    async def killer(self) -> None:
        roles = ["drafter", "verifier"]
        while True:
            await asyncio.sleep(self.args.kill_every_s)
            with Client(self.endpoint, timeout_s=30) as client:
                pids = client.status()["worker_pids"]
            role = roles[self.num_kills % 2]
            if role in pids:
                os.kill(pids[role], signal.SIGKILL)
                self.num_kills += 1

    async def run(self) -> None:
        deadline = time.monotonic() + self.args.duration_s
        async with AsyncClient(self.endpoint, timeout_s=120) as client:
            async def lane(lane_raw):
                while time.monotonic() < deadline and self.num_sent < self.args.max_requests:
                    await self.one(client, lane_raw)

            raws = [zmq.asyncio.Context.instance().socket(zmq.DEALER) for _ in range(self.args.concurrency)]
            for sock in raws:
                sock.connect(self.endpoint)
            killer = asyncio.create_task(self.killer()) if self.args.kill_every_s > 0 else None
            await asyncio.gather(*(lane(sock) for sock in raws))
            if killer is not None:
                killer.cancel()
            for sock in raws:
                sock.close(linger=0)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="tiny")
    parser.add_argument("--duration-s", type=float, default=60.0)
    parser.add_argument("--max-requests", type=int, default=1_000_000)
    parser.add_argument("--concurrency", type=int, default=12)
    parser.add_argument("--kill-every-s", type=float, default=120.0, help="0 = never kill a worker")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    parser.add_argument("--json", help="write the report here")
    args = parser.parse_args()

    tmp = tempfile.mkdtemp(prefix="minedraft-soak-")
    endpoint = f"ipc://{tmp}/client.sock"
    daemon = ["--config", args.config, "--endpoint", endpoint, "--set", f"server.run_dir={tmp}/run",
              "--set", "scheduler.restart_workers=true"] + [x for s in args.set for x in ("--set", s)]
    started = cli("start", *daemon)
    if started.returncode != 0:
        print(started.stdout + started.stderr, file=sys.stderr)
        return 1
    with Client(endpoint, timeout_s=30) as client:
        first = client.status()
    rss_start = {"scheduler": rss_kib(first["pid"]), **{r: rss_kib(pid) for r, pid in first["worker_pids"].items()}}
    soak = Soak(endpoint, args)
    started_s = time.monotonic()
    try:
        asyncio.run(soak.run())
        with Client(endpoint, timeout_s=30) as client:
            last = client.status()
        rss_end = {"scheduler": rss_kib(last["pid"]), **{r: rss_kib(pid) for r, pid in last["worker_pids"].items()}}
    finally:
        cli("stop", *daemon)
    report = {
        "duration_s": time.monotonic() - started_s,
        "num_sent": soak.num_sent,
        "outcomes": dict(sorted(soak.outcomes.items())),
        "num_lost": len(soak.pending),
        "num_worker_kills": soak.num_kills,
        "num_restarts": last["num_restarts"],
        "rss_kib_start": rss_start,
        "rss_kib_end": rss_end,
        "note": "worker RSS at the end is of the processes started by the last restart",
    }
    print(f"{'requests sent':<28}{report['num_sent']}")
    for outcome, n in report["outcomes"].items():
        print(f"  {outcome:<26}{n}")
    print(f"{'requests lost':<28}{report['num_lost']}")
    print(f"{'worker kills / restarts':<28}{soak.num_kills} / {last['num_restarts']}")
    for proc in rss_start:
        print(f"{'RSS ' + proc + ' (MiB)':<28}{(rss_start[proc] or 0) / 1024:.1f} -> {(rss_end.get(proc) or 0) / 1024:.1f}")
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    return 0 if report["num_lost"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
