"""Replicas behind one endpoint: each replica is an independent scheduler core with its own
worker pool (a drafter and a verifier); the router sends each new request to the live replica
with the fewest requests in flight and merges their status. Pure Python, never imports torch.
"""

from __future__ import annotations

from dataclasses import dataclass

from minedraft.runtime.metrics import merge_predraft
from minedraft.runtime.scheduler import SchedulerCore

# States of a replica (starting -> serving -> restarting -> serving, or dead) and of the daemon
# (starting -> serving -> stopping, or dead once every replica is); status reports them as is.
STARTING, SERVING, RESTARTING, STOPPING, DEAD = "starting", "serving", "restarting", "stopping", "dead"

# Core status fields that add up across replicas; the rates derived from them are recomputed.
_SUMMED = ("num_waiting", "num_running", "num_output_tokens", "output_tokens_per_s", "num_draft_tokens",
           "num_drafted", "num_accepted", "num_verify_rows", "num_prefill_jobs", "num_draft_frame_bytes")
_SUMMED_BY_KEY = ("busy_s", "num_jobs", "finish_reasons")
_PER_REPLICA_ONLY = ("plan", "draft_budget", "busy_intervals", "recent_jobs", "calibration")


@dataclass
class Replica:
    index: int
    pool: object  # WorkerPool or RayWorkerPool: the same interface
    core: SchedulerCore | None = None  # made once its workers are ready
    state: str = STARTING  # starting -> serving -> dead (workers gone and not restarted)
    dead_reason: str | None = None
    num_restarts: int = 0
    num_routed: int = 0  # requests sent to it
    calibration_key: str | None = None  # auto's calibration cache key for its workers (runtime/calibration.py)
    is_calibration_saved: bool = False  # a calibration it measured has been written to the cache (or failed)

    @property
    def is_live(self) -> bool:
        return self.state == SERVING

    @property
    def num_in_flight(self) -> int:
        return self.core.num_live if self.core is not None else 0


def choose_replica(replicas: list[Replica]) -> Replica | None:
    """The live replica with the fewest requests in flight (ties: the one sent fewest so far,
    then the lowest index); None when none is live."""
    live = [r for r in replicas if r.is_live]
    return min(live, key=lambda r: (r.num_in_flight, r.num_routed, r.index)) if live else None


def merge_core_status(statuses: list[dict]) -> dict:
    """One replica's core status as it is; several: counters summed, rates recomputed from the
    sums, batches listed one after another, per-replica plans left to each replica's entry."""
    if len(statuses) == 1:
        return dict(statuses[0])
    merged = {key: value for key, value in statuses[0].items() if key not in _PER_REPLICA_ONLY}
    for key in _SUMMED:
        merged[key] = sum(s[key] for s in statuses)
    for key in _SUMMED_BY_KEY:
        totals: dict = {}
        for s in statuses:
            for name, value in s[key].items():
                totals[name] = totals.get(name, 0) + value
        merged[key] = totals
    merged["uptime_s"] = max(s["uptime_s"] for s in statuses)
    merged["batch_sizes"] = [size for s in statuses for size in s["batch_sizes"]]
    merged["batch_states"] = [state for s in statuses for state in s["batch_states"]]
    merged["busy_fraction"] = {role: sum(s["busy_fraction"][role] for s in statuses) / len(statuses)
                               for role in statuses[0]["busy_fraction"]}
    drafted, accepted, rows = merged["num_drafted"], merged["num_accepted"], merged["num_verify_rows"]
    merged["acceptance_rate"] = accepted / drafted if drafted else None
    merged["mean_accepted_length"] = 1 + accepted / rows if rows else None
    merged["tokens_per_verified_position"] = (accepted + rows) / (drafted + rows) if rows else None
    if all("predraft" in s for s in statuses):
        merged["predraft"] = merge_predraft([s["predraft"] for s in statuses])
    return merged
