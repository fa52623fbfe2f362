"""Prometheus metrics of the HTTP front end: what it measures per request it serves (finish
reasons, tokens, TTFT / inter-token / end-to-end latency histograms) and the runtime-wide figures
of the scheduler's status (docs/design.md section 7), read at each scrape. prometheus-client only.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily

from minedraft.common.protocol import ROLES

TTFT_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 25, 50, 100)
ITL_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
E2E_BUCKETS_S = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 25, 50, 100, 250, 500)


class RuntimeCollector:
    """The last status the front end read from the scheduler, as metric families."""

    def __init__(self):
        self.status: dict | None = None  # None: the runtime did not answer

    def collect(self):
        s = self.status
        up = GaugeMetricFamily("minedraft_runtime_up", "1 while the runtime serves; 0 when dead, stopping or silent")
        up.add_metric([], 1.0 if s is not None and s.get("state") == "serving" else 0.0)
        yield up
        if s is None:
            return
        info = InfoMetricFamily("minedraft_runtime", "the served models and the decoding mode")
        info.add_metric([], {key: str(s.get(key)) for key in ("mode", "target", "draft", "dtype", "num_draft",
                                                              "max_batch")})
        yield info
        yield _gauge("minedraft_num_requests_running", "requests in the two batches", s.get("num_running"))
        yield _gauge("minedraft_num_requests_waiting", "requests in the admission queue", s.get("num_waiting"))
        yield _gauge("minedraft_output_tokens_per_second", "committed output tokens/s over the last 10 s",
                     s.get("output_tokens_per_s"))
        yield _gauge("minedraft_spec_acceptance_rate", "accepted / drafted tokens since start",
                     s.get("acceptance_rate"))
        yield _gauge("minedraft_spec_mean_accepted_length", "1 + accepted tokens / verify rows since start",
                     s.get("mean_accepted_length"))
        yield _counter("minedraft_output_tokens", "output tokens committed (every front end)",
                       s.get("num_output_tokens"))
        yield _counter("minedraft_spec_drafted_tokens", "draft tokens verified", s.get("num_drafted"))
        yield _counter("minedraft_spec_accepted_tokens", "draft tokens accepted", s.get("num_accepted"))
        yield _counter("minedraft_spec_verify_rows", "request rows verified (steps x requests)",
                       s.get("num_verify_rows"))
        predraft = s.get("predraft")
        if predraft:
            full = predraft["branches"]["full"]
            yield _counter("minedraft_spec_predraft_checked", "steps whose pre-drafted drafts were checked against the outcome",
                           full["checked"])
            hits = CounterMetricFamily("minedraft_spec_predraft_hits", "steps whose drafts were ready (pre-drafted), by "
                                       "branch kind (full: the chain; short: a shorter outcome's branch)", labels=["branch"])
            for kind, branch in sorted(predraft["branches"].items()):
                hits.add_metric([kind], branch["hits"])
            yield hits
            yield _counter("minedraft_spec_predraft_drafts_served", "drafts served from pre-drafted chains",
                           predraft["drafts_served"])
            yield _counter("minedraft_spec_predraft_busy_seconds", "drafter time spent pre-drafting", predraft["busy_s"])
        requests = CounterMetricFamily("minedraft_requests", "finished requests (every front end) by finish reason",
                                       labels=["finish_reason"])
        for reason, count in sorted((s.get("finish_reasons") or {}).items()):
            requests.add_metric([reason], count)
        yield requests
        busy_s = CounterMetricFamily("minedraft_worker_busy_seconds", "time each worker spent on jobs",
                                     labels=["role"])
        busy = GaugeMetricFamily("minedraft_worker_busy_fraction", "busy time / uptime of each worker",
                                 labels=["role"])
        for role in ROLES:
            if role in (s.get("busy_s") or {}):
                busy_s.add_metric([role], s["busy_s"][role])
                busy.add_metric([role], s["busy_fraction"][role])
        yield busy_s
        yield busy
        yield _gauge("minedraft_uptime_seconds", "seconds since the runtime started", s.get("uptime_s"))
        yield from _replica_families(s.get("replicas") or [])


def _replica_families(replicas: list[dict]):
    """Per replica (label replica = its index): whether it serves, requests in flight and routed,
    restarts."""
    families = (
        (GaugeMetricFamily, "minedraft_replica_up", "1 while the replica serves; 0 when restarting or dead",
         lambda r: 1.0 if r["state"] == "serving" else 0.0),
        (GaugeMetricFamily, "minedraft_replica_requests_in_flight", "requests the replica holds",
         lambda r: r["num_in_flight"]),
        (CounterMetricFamily, "minedraft_replica_routed_requests", "requests the router sent to the replica",
         lambda r: r["num_routed"]),
        (CounterMetricFamily, "minedraft_replica_restarts", "times the replica's workers were restarted",
         lambda r: r["num_restarts"]),
    )
    for cls, name, documentation, value in families:
        family = cls(name, documentation, labels=["replica"])
        for replica in replicas:
            family.add_metric([str(replica["index"])], float(value(replica)))
        yield family


def _gauge(name: str, documentation: str, value) -> GaugeMetricFamily:
    family = GaugeMetricFamily(name, documentation)
    if value is not None:
        family.add_metric([], float(value))
    return family


def _counter(name: str, documentation: str, value) -> CounterMetricFamily:
    family = CounterMetricFamily(name, documentation)
    if value is not None:
        family.add_metric([], float(value))
    return family


class HttpMetrics:
    """Everything /metrics shows, in a registry of its own (no process-global state)."""

    def __init__(self):
        self.registry = CollectorRegistry(auto_describe=False)
        self.runtime = RuntimeCollector()
        self.registry.register(self.runtime)
        r = self.registry
        self.requests = Counter("minedraft_http_requests", "HTTP generate requests by finish reason "
                                "(error: answered with an error status)", ["finish_reason"], registry=r)
        self.errors = Counter("minedraft_http_errors", "HTTP error answers by error code", ["code"], registry=r)
        self.prompt_tokens = Counter("minedraft_http_prompt_tokens", "prompt tokens of HTTP requests", registry=r)
        self.output_tokens = Counter("minedraft_http_output_tokens", "output tokens sent over HTTP", registry=r)
        self.ttft = Histogram("minedraft_http_time_to_first_token_seconds", "request arrival to its first token",
                              buckets=TTFT_BUCKETS_S, registry=r)
        self.itl = Histogram("minedraft_http_inter_token_latency_seconds", "gap between tokens (a chunk of n tokens "
                             "after a gap g counts n gaps of g / n)", buckets=ITL_BUCKETS_S, registry=r)
        self.e2e = Histogram("minedraft_http_e2e_request_latency_seconds", "request arrival to its last token",
                             buckets=E2E_BUCKETS_S, registry=r)

    def render(self, status: dict | None) -> bytes:
        self.runtime.status = status
        return generate_latest(self.registry)
