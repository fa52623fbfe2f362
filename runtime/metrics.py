"""Runtime-wide counters and their summary (definitions in DESIGN.md section 7). Pure Python."""

from __future__ import annotations

from collections import Counter, deque

RATE_WINDOW_S = 10.0  # tokens/s is measured over this trailing window
MAX_INTERVALS = 512  # recent busy intervals kept per worker


class Metrics:
    def __init__(self, clock):
        self.clock = clock
        self.start_s = clock()
        self.busy_s = {"drafter": 0.0, "verifier": 0.0}
        self.intervals = {role: deque(maxlen=MAX_INTERVALS) for role in self.busy_s}
        self.num_jobs = {role: 0 for role in self.busy_s}  # draft / verify jobs answered (steps)
        self.num_prefill_jobs = 0  # verifier prefill-ahead jobs (not steps; their time is in busy_s)
        self.num_drafted = 0
        self.num_accepted = 0
        self.num_verify_rows = 0
        self.num_output_tokens = 0
        self.recent_tokens: deque[tuple[float, int]] = deque()
        self.finish_reasons: Counter[str] = Counter()

    def add_busy(self, role: str, start_s: float, end_s: float, is_step: bool = True) -> None:
        self.busy_s[role] += max(0.0, end_s - start_s)
        self.num_jobs[role] += is_step
        self.num_prefill_jobs += not is_step
        self.intervals[role].append((start_s, end_s))

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
            "num_drafted": self.num_drafted,
            "num_accepted": self.num_accepted,
            "num_verify_rows": self.num_verify_rows,
            "acceptance_rate": self.num_accepted / self.num_drafted if self.num_drafted else None,
            "mean_accepted_length": 1 + self.num_accepted / self.num_verify_rows if self.num_verify_rows else None,
            "busy_s": dict(self.busy_s),
            "busy_fraction": {role: busy / uptime_s for role, busy in self.busy_s.items()},
            "num_jobs": dict(self.num_jobs),
            "num_prefill_jobs": self.num_prefill_jobs,
            "finish_reasons": dict(self.finish_reasons),
        }
        if is_detailed:
            summary["busy_intervals"] = {role: [list(i) for i in v] for role, v in self.intervals.items()}
        return summary
