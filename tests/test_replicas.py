"""Replicas behind one endpoint on the local backend: the router's choice, the merged status,
and a daemon with two replicas whose outputs equal the reference."""

from __future__ import annotations

import asyncio
import os
import signal
import time

from minedraft.runtime.client import Client
from minedraft.runtime.router import Replica, choose_replica, merge_core_status
from tests.runtime_utils import reference_outputs, running_daemon, status
from tests.test_runtime import run_load, workload


class FakeCore:
    def __init__(self, num_requests: int):
        self.num_live = num_requests  # what the router reads of a core: requests waiting or running


def replica(index: int, in_flight: int, state: str = "serving", routed: int = 0) -> Replica:
    return Replica(index, pool=None, core=FakeCore(in_flight), state=state, num_routed=routed)


def test_router_picks_the_live_replica_with_fewest_in_flight():
    assert choose_replica([replica(0, 3), replica(1, 1), replica(2, 2)]).index == 1
    assert choose_replica([replica(0, 3), replica(1, 0, "dead"), replica(2, 0, "restarting")]).index == 0
    assert choose_replica([replica(0, 2, routed=5), replica(1, 2, routed=4)]).index == 1  # ties: sent fewest
    assert choose_replica([replica(0, 0, "dead"), replica(1, 0, "restarting")]) is None


def _core_status(drafted: int, accepted: int, rows: int, tokens: int) -> dict:
    return {"mode": "psd", "num_draft": 4, "num_waiting": 1, "num_running": 2, "batch_sizes": [1, 1],
            "batch_states": ["ready", "drafting"], "uptime_s": 3.0, "num_output_tokens": tokens,
            "output_tokens_per_s": tokens / 3, "num_draft_tokens": drafted, "num_drafted": drafted,
            "num_accepted": accepted, "num_verify_rows": rows, "num_prefill_jobs": 1, "num_draft_frame_bytes": 0,
            "busy_s": {"drafter": 1.0, "verifier": 2.0}, "busy_fraction": {"drafter": 1 / 3, "verifier": 2 / 3},
            "num_jobs": {"drafter": 5, "verifier": 5}, "finish_reasons": {"length": 2},
            "acceptance_rate": accepted / drafted, "mean_accepted_length": 1 + accepted / rows,
            "tokens_per_verified_position": (accepted + rows) / (drafted + rows), "plan": {"x": 1},
            "predraft": {"branches": {"full": {"checked": rows, "hits": accepted // 10,
                                               "hit_rate": (accepted // 10) / rows}},
                         "drafts_served": accepted // 5, "saved_s": 0.5, "busy_s": 1.0, "num_jobs": rows, "num_tokens": 4}}


def test_merged_status_sums_counters_and_recomputes_rates():
    one = _core_status(40, 30, 10, 40)
    assert merge_core_status([one]) == one
    merged = merge_core_status([one, _core_status(20, 5, 5, 10)])
    assert merged["num_drafted"] == 60 and merged["num_accepted"] == 35 and merged["num_output_tokens"] == 50
    assert merged["acceptance_rate"] == 35 / 60 and merged["mean_accepted_length"] == 1 + 35 / 15
    assert merged["busy_s"] == {"drafter": 2.0, "verifier": 4.0} and merged["finish_reasons"] == {"length": 4}
    assert merged["batch_sizes"] == [1, 1, 1, 1] and merged["num_waiting"] == 2
    assert "plan" not in merged  # a plan is per replica: in each replica's entry
    full = merged["predraft"]["branches"]["full"]
    assert (full["checked"], full["hits"], full["hit_rate"]) == (15, 3, 3 / 15)
    assert merged["predraft"]["drafts_served"] == 7 and merged["predraft"]["busy_s"] == 2.0


def test_two_local_replicas_share_requests_exactly(tmp_path):
    """Two replicas on this host: greedy and seeded outputs equal the reference, both replicas
    serve, status sums them; killing one replica's verifier leaves the other serving."""
    requests = workload(12, temperature=0.0) + [dict(r, request_id=f"s{i}") for i, r in
                                                 enumerate(workload(8, temperature=0.8))]
    with running_daemon(tmp_path, "psd", "cluster.replicas=2", "server.dead_linger_s=30") as (endpoint, _):
        outputs = asyncio.run(run_load(endpoint, requests, stagger_s=0.0))
        st = status(endpoint)
        assert [r["state"] for r in st["replicas"]] == ["serving", "serving"]
        assert all(r["num_routed"] > 0 and r["num_jobs"]["verifier"] > 0 for r in st["replicas"])
        assert st["num_output_tokens"] == sum(r["num_output_tokens"] for r in st["replicas"])
        assert st["num_output_tokens"] == sum(len(tokens) for tokens in outputs.values())
        assert set(st["worker_pids"]) == {"drafter.0", "verifier.0", "drafter.1", "verifier.1"}
        assert len({r["worker_pids"]["verifier"] for r in st["replicas"]}) == 2

        os.kill(st["replicas"][1]["worker_pids"]["verifier"], signal.SIGKILL)  # no restart_workers
        deadline = time.monotonic() + 10
        while (after := status(endpoint))["replicas"][1]["state"] != "dead":
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert after["state"] == "serving" and after["num_live_replicas"] == 1
        assert "replica 1: verifier exited" in after["replicas"][1]["dead_reason"]
        with Client(endpoint, timeout_s=30) as client:  # new requests go to the live replica only
            for i in range(4):
                assert client.generate(prompt_ids=[1, 2, 3], max_tokens=8, ignore_eos=True).finish_reason == "length"
        assert status(endpoint)["replicas"][0]["num_routed"] == after["replicas"][0]["num_routed"] + 4
    assert outputs == reference_outputs(requests, mode="sd")
