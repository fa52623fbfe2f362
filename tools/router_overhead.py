"""What the replica router adds per request: the scheduler process's time to take a generate
request through Server._on_client_message (duplicate check across replicas, the choice of
replica, then the chosen core's add_request) against the core's add_request alone, for 1 to N
replicas. In process, no workers, no sockets: the router's own cost, measured side by side.

    python tools/router_overhead.py --replicas 1,2,4,8 --requests 2000 --json out/router.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from minedraft.common import protocol as p  # noqa: E402
from minedraft.common.config import load_config  # noqa: E402
from minedraft.runtime.router import Replica  # noqa: E402
from minedraft.runtime.scheduler import SchedulerCore  # noqa: E402
from minedraft.runtime.server import Server  # noqa: E402
from minedraft.runtime.tokenizer import ByteTokenizer  # noqa: E402


def make_core(config) -> SchedulerCore:
    return SchedulerCore(config, ByteTokenizer(), vocab_size=512, max_len=512, eos_token_ids=[257])


def requests(n: int, tag: str) -> list[p.GenerateRequest]:
    return [p.GenerateRequest(request_id=f"{tag}{i}", prompt=None, prompt_ids=[1 + i % 200] * 16, max_tokens=32,
                              temperature=0.0, top_k=0, top_p=1.0, seed=i, stop=[], stop_token_ids=[],
                              ignore_eos=False) for i in range(n)]


def time_direct(config, n: int, num_in_flight: int) -> float:
    """Seconds per request for core.add_request alone (one core holding num_in_flight)."""
    core = make_core(config)
    for message in requests(num_in_flight, "warm"):
        core.add_request(b"c", message)
    batch = requests(n, "r")
    start = time.perf_counter()
    for message in batch:
        core.add_request(b"c", message)
    return (time.perf_counter() - start) / n


def time_routed(config, n: int, num_in_flight: int, run_dir: str) -> float:
    """Seconds per request through the server's router over config.cluster.replicas cores, each
    holding num_in_flight requests already."""
    server = Server(config, run_dir)
    server.replicas = [Replica(i, pool=None) for i in range(config.cluster.replicas)]
    server.state = "serving"
    for replica in server.replicas:
        replica.core, replica.state = make_core(config), "serving"
        for message in requests(num_in_flight, f"warm{replica.index}-"):
            replica.core.add_request(b"c", message)
    batch = requests(n, "r")
    start = time.perf_counter()
    for message in batch:
        server._on_client_message(b"c", message)
    elapsed = (time.perf_counter() - start) / n
    assert sum(r.core.num_live for r in server.replicas) == len(server.replicas) * num_in_flight + n
    server.context.destroy(linger=0)
    return elapsed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--replicas", default="1,2,4,8")
    parser.add_argument("--requests", type=int, default=2000, help="requests per timing (the queue bound is raised)")
    parser.add_argument("--in-flight", type=int, default=16, help="requests each replica already holds")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for num_replicas in [int(v) for v in args.replicas.split(",")]:
            config = load_config("tiny", [f"cluster.replicas={num_replicas}",
                                          f"scheduler.max_queued_requests={args.requests + args.in_flight + 1}"])
            direct, routed = [], []
            time_direct(config, args.requests, args.in_flight)  # warm-up: first allocations, imports
            for _ in range(args.repeats):  # side by side, alternating
                direct.append(time_direct(config, args.requests, args.in_flight))
                routed.append(time_routed(config, args.requests, args.in_flight, os.path.join(tmp, f"r{num_replicas}")))
            d, r = statistics.median(direct), statistics.median(routed)
            rows.append({"replicas": num_replicas, "add_request_us": d * 1e6, "routed_us": r * 1e6,
                         "router_us": (r - d) * 1e6, "ratio": r / d})
    print(f"{'replicas':>8} {'add_request us':>15} {'through router us':>18} {'router adds us':>15} {'ratio':>6}")
    for row in rows:
        print(f"{row['replicas']:>8} {row['add_request_us']:>15.2f} {row['routed_us']:>18.2f} "
              f"{row['router_us']:>15.2f} {row['ratio']:>6.2f}")
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "rows": rows}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
