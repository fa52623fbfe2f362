"""Runtime-wide counters and their summary (definitions in docs/design.md section 7). Pure Python."""

from __future__ import annotations

from collections import Counter, deque

from minedraft.common.protocol import DRAFTER, ROLES

RATE_WINDOW_S = 10.0  # tokens/s is measured over this trailing window
MAX_INTERVALS = 512  # recent busy intervals kept per worker


class Metrics:
    def __init__(self, clock):
        self.clock = clock
        self.start_s = clock()
        self.busy_s = {role: 0.0 for role in ROLES}
        self.intervals = {role: deque(maxlen=MAX_INTERVALS) for role in self.busy_s}
        self.jobs: deque[dict] = deque(maxlen=2 * MAX_INTERVALS)  # recent jobs of both workers, with their sizes
        self.num_jobs = {role: 0 for role in self.busy_s}  # draft / verify jobs answered (steps)
        self.num_prefill_jobs = 0  # verifier prefill-ahead jobs (not steps; their time is in busy_s)
        self.num_draft_frame_bytes = 0  # frames transport: draft bytes the verifier received
        self.num_draft_tokens = 0  # drafted, including those TETRIS did not keep
        self.num_drafted = 0  # drafts verified
        self.num_accepted = 0
        self.num_verify_rows = 0
        self.num_output_tokens = 0
        self.recent_tokens: deque[tuple[float, int]] = deque()
        self.finish_reasons: Counter[str] = Counter()
        # pre-drafting (docs/design.md section 5): rows whose pre-drafted chain was checked
        # against the outcome, hits, drafts served without a forward, and the drafter's work
        self.predraft = {"checked": 0, "hits": 0, "branch_hits": 0, "drafts_served": 0, "saved_s": 0.0, "busy_s": 0.0,
                         "num_jobs": 0, "num_tokens": 0}

    def add_busy(self, role: str, start_s: float, end_s: float, is_step: bool = True, job: dict | None = None) -> None:
        """A worker's job ran from start_s to end_s; `job` describes it for the timeline
        (kind, batch, rows, positions)."""
        self.busy_s[role] += max(0.0, end_s - start_s)
        self.num_jobs[role] += is_step
        self.num_prefill_jobs += not is_step
        self.intervals[role].append((start_s, end_s))
        if job is not None:
            self.jobs.append({"role": role, "start_s": start_s, "end_s": end_s, **job})

    def add_predraft_rows(self, hits: list[int], served: list[int], saved_s: float) -> None:
        """A draft job's rows: per row -1 (no pre-drafted chain), 0 (a miss), 1 (its chain was
        the outcome) or 2 (a branch was), and the drafts each took from its chain or branch."""
        self.predraft["checked"] += sum(h >= 0 for h in hits)
        self.predraft["hits"] += sum(h == 1 for h in hits)
        self.predraft["branch_hits"] += sum(h == 2 for h in hits)
        self.predraft["drafts_served"] += sum(served)
        self.predraft["saved_s"] += saved_s

    def add_predraft_job(self, start_s: float, end_s: float, num_tokens: int, job: dict) -> None:
        """The drafter drafted on after a job's result (worker clock), while the verifier ran."""
        self.busy_s[DRAFTER] += max(0.0, end_s - start_s)
        self.intervals[DRAFTER].append((start_s, end_s))
        self.predraft["busy_s"] += max(0.0, end_s - start_s)
        self.predraft["num_jobs"] += 1
        self.predraft["num_tokens"] += num_tokens
        self.jobs.append({"role": DRAFTER, "start_s": start_s, "end_s": end_s, **job})

    def add_draft_tokens(self, n: int) -> None:
        self.num_draft_tokens += n

    def add_verify_row(self, num_draft: int, num_accepted: int) -> None:
        self.num_drafted += num_draft
        self.num_accepted += num_accepted
        self.num_verify_rows += 1

    def add_output_tokens(self, n: int) -> None:
        self.num_output_tokens += n
        now = self.clock()
        self.recent_tokens.append((now, n))
        while self.recent_tokens and self.recent_tokens[0][0] < now - RATE_WINDOW_S:
            self.recent_tokens.popleft()

    def add_finished(self, reason: str) -> None:
        self.finish_reasons[reason] += 1

    def summary(self, is_detailed: bool = False) -> dict:
        now = self.clock()
        uptime_s = max(now - self.start_s, 1e-9)
        window_s = min(RATE_WINDOW_S, uptime_s)
        recent = sum(n for t, n in self.recent_tokens if t >= now - window_s)
        summary = {
            "uptime_s": uptime_s,
            "num_output_tokens": self.num_output_tokens,
            "output_tokens_per_s": recent / window_s,
            "num_draft_tokens": self.num_draft_tokens,
            "num_drafted": self.num_drafted,
            "num_accepted": self.num_accepted,
            "num_verify_rows": self.num_verify_rows,
            "acceptance_rate": self.num_accepted / self.num_drafted if self.num_drafted else None,
            "mean_accepted_length": 1 + self.num_accepted / self.num_verify_rows if self.num_verify_rows else None,
            # committed tokens (accepted drafts + one per row) per position the verifier checked
            "tokens_per_verified_position": (self.num_accepted + self.num_verify_rows)
            / (self.num_drafted + self.num_verify_rows) if self.num_verify_rows else None,
            "busy_s": dict(self.busy_s),
            "busy_fraction": {role: busy / uptime_s for role, busy in self.busy_s.items()},
            "num_jobs": dict(self.num_jobs),
            "num_prefill_jobs": self.num_prefill_jobs,
            "num_draft_frame_bytes": self.num_draft_frame_bytes,
            "finish_reasons": dict(self.finish_reasons),
            "predraft": self.predraft_summary(),
        }
        if is_detailed:
            summary["busy_intervals"] = {role: [list(i) for i in v] for role, v in self.intervals.items()}
            summary["recent_jobs"] = list(self.jobs)
        return summary

    def predraft_summary(self) -> dict:
        p = self.predraft
        # per branch kind, of the steps checked against a pre-draft: "full" every kept draft
        # accepted and the bonus token the draft's own next one (the chain); "short" fewer
        # accepted and the correction one the draft guessed (its second or third choice: a branch, greedy rows)
        rate = lambda hits: hits / p["checked"] if p["checked"] else None  # noqa: E731
        return {"branches": {"full": {"checked": p["checked"], "hits": p["hits"], "hit_rate": rate(p["hits"])},
                             "short": {"checked": p["checked"], "hits": p["branch_hits"],
                                       "hit_rate": rate(p["branch_hits"])}},
                "drafts_served": p["drafts_served"], "saved_s": round(p["saved_s"], 6),
                "busy_s": round(p["busy_s"], 6), "num_jobs": p["num_jobs"], "num_tokens": p["num_tokens"]}


def merge_predraft(summaries: list[dict]) -> dict:
    """Several replicas' `predraft` summaries as one: counters summed, the hit rate recomputed."""
    branches = {}
    for kind in summaries[0]["branches"]:
        each = [p["branches"][kind] for p in summaries if kind in p["branches"]]
        checked, hits = sum(b["checked"] for b in each), sum(b["hits"] for b in each)
        branches[kind] = {"checked": checked, "hits": hits, "hit_rate": hits / checked if checked else None}
    merged = {key: sum(p[key] for p in summaries) for key in ("drafts_served", "saved_s", "busy_s", "num_jobs",
                                                              "num_tokens")}
    return {"branches": branches, **merged, "is_on": any(p.get("is_on") for p in summaries), "off_reason": summaries[0].get("off_reason")}


def format_memory(memory: dict) -> str:
    """A worker's memory report (workers/process.memory_report) in one line, in GB."""
    gb = lambda key: f"{memory.get(key, 0) / 1e9:.2f}"  # noqa: E731
    resident = sum(memory.get(k, 0) for k in ("rss_anon", "rss_file", "rss_shmem"))
    weights = memory.get("weights_packed", 0) + memory.get("weights_plain", 0)
    return (f"resident {resident / 1e9:.2f} GB (anon {gb('rss_anon')}, file {gb('rss_file')}, shmem {gb('rss_shmem')}) "
            f"for weights {weights / 1e9:.2f} GB (packed {gb('weights_packed')}, plain {gb('weights_plain')}, "
            f"second copies {gb('second_copies')}), KV cache {gb('kv_cache')}, draft buffers {gb('draft_buffers')}, "
            f"other {gb('other')}")
