"""Section d of tools/gpu_check.py: the draft exchange between the drafter and verifier processes.

Greedy rows never read the draft probabilities (a draft is accepted only if it is the target's
argmax), so greedy output stays right with drafts arriving zeroed, stale or from the wrong place.
Sampled rows accept a draft with probability min(1, p/q), q read in place from the shared buffer.
Here seeded sampled requests (temperature 0.8) through a psd and an sd daemon, on the tiny float32
models of configs/tiny.toml (the draft is the target plus small noise), must equal the in-process
engine, which crosses no process, on the same devices, token for token; the near-copy draft must be
mostly accepted; and the verifier must read the buffers on the drafter's device, named by UUID.
Measured on the CPU with the in-process engine fed corrupted drafts, these 16 requests match the
clean output at 0.69 with q zeroed, 0.06 with another row's q and 0.12 with a uniform q; the
acceptance (0.96 clean) stays 0.78 to 1.00 then, so it catches only gross breakage by itself.

On the GPU it starts its own two daemons (drafter on cuda:0, verifier on cuda:1 when there is one).
With --device cpu section c's sd and psd daemons already run these models, so they serve the sampled
requests too and nothing is started here (unless section c was skipped or failed).
"""

from __future__ import annotations

import asyncio

from gpu_throughput import finish_stops, running_daemon, sampled_pass, sampled_requests

EXCHANGE_MODES = ("psd", "sd")
MIN_ACCEPTANCE = 0.6  # near-copy draft at temperature 0.8: 0.96 on the CPU; broken drafts go near 0 or differ


def section_d(device: str, num_gpus: int, c_report: dict) -> dict:
    requests = sampled_requests()
    if device == "cuda":
        placement = ("cuda:0", "cuda:1" if num_gpus >= 2 else "cuda:0")
    else:
        placement = ("cpu", "cpu")
    exchanges = {r["mode"]: r.pop("exchange") for r in c_report.get("runs", []) if "exchange" in r}
    source = "section c's sd and psd daemons"
    if device == "cuda" or set(exchanges) != set(EXCHANGE_MODES):
        exchanges, source = run_daemons(placement, requests), "its own daemons"
    reference = engine_outputs(requests, placement)
    expected_buffers = {"num_buffers": 2, "device": placement[0], "device_uuid": device_uuid(placement[0])}
    checks = {}
    for mode in EXCHANGE_MODES:
        checks[f"{mode}_equals_engine"] = exchanges[mode]["output_token_ids"] == reference
        checks[f"{mode}_buffers_on_drafter_device"] = exchanges[mode]["draft_buffers"] == expected_buffers
    checks["requests_differ"] = len({tuple(ids) for ids in reference.values()}) > 1  # the check has power
    checks["psd_acceptance_high"] = (exchanges["psd"]["acceptance_rate"] or 0.0) > MIN_ACCEPTANCE
    return {
        "status": "ok" if all(checks.values()) else "failed", "source": source, "num_requests": len(requests),
        "devices": {"drafter": placement[0], "verifier": placement[1]}, "checks": checks,
        "match_vs_engine": {mode: match_fraction(exchanges[mode]["output_token_ids"], reference)
                            for mode in EXCHANGE_MODES},
        "acceptance_rate": {mode: exchanges[mode]["acceptance_rate"] for mode in EXCHANGE_MODES},
        "draft_buffers": exchanges["psd"]["draft_buffers"], "expected_draft_buffers": expected_buffers,
    }


def run_daemons(placement: tuple[str, str], requests: list[dict]) -> dict:
    """One daemon per mode on configs/tiny.toml's models, serving only the sampled requests."""
    overrides = [f"drafter.device={placement[0]}", f"verifier.device={placement[1]}", "drafter.cpu_cores=[]",
                 "verifier.cpu_cores=[]", "server.startup_timeout_s=300"]
    exchanges, stopping = {}, []
    try:
        for mode in EXCHANGE_MODES:
            with running_daemon([*overrides, f"scheduler.mode={mode}"], stopping) as endpoint:
                exchanges[mode] = asyncio.run(serve_sampled(endpoint, requests))
    finally:
        finish_stops(stopping)
    return exchanges


async def serve_sampled(endpoint: str, requests: list[dict]) -> dict:
    from minedraft.runtime.client import AsyncClient

    async with AsyncClient(endpoint, timeout_s=600) as client:
        return await sampled_pass(client, requests)


def engine_outputs(requests: list[dict], placement: tuple[str, str]) -> dict[str, list[int]]:
    """The in-process sd engine (no processes, no shared buffers): the draft model on the drafter's
    device, the target on the verifier's, as in the daemons (sampled rows draw from generators on
    their model's device), and configs/tiny.toml's models, k and batch."""
    import torch

    from minedraft.common.request import Request
    from minedraft.workers.engine import Engine
    from minedraft.workers.model.loader import TinySpec, load_decoder
    from minedraft.workers.sampling import SamplingParams

    target = load_decoder("tiny-llama", torch.float32, placement[1], tiny=TinySpec(seed=0))
    draft = load_decoder("tiny-llama", torch.float32, placement[0], tiny=TinySpec(seed=0, noise=0.003))
    engine = Engine(target, draft, mode="sd", num_draft=4, max_batch=8, max_len=512)
    for r in requests:
        params = SamplingParams(r["temperature"], 0, 1.0, r["seed"])
        engine.add_request(Request(r["request_id"], r["prompt_ids"], r["max_tokens"], params))
    return {rid: request.output_ids for rid, request in engine.run().items()}


def device_uuid(device: str) -> str | None:
    import torch

    return str(torch.cuda.get_device_properties(device).uuid) if device.startswith("cuda") else None


def match_fraction(outputs: dict, reference: dict) -> float:
    return sum(outputs.get(k) == v for k, v in reference.items()) / len(reference)


def summary_line(d: dict) -> str:
    if "checks" not in d:
        return f"d  {d['status']}"
    match, accept, buffers = d["match_vs_engine"], d["acceptance_rate"], d["draft_buffers"] or {}
    return (f"d  {d['status']:<8} seeded sampling == in-process engine: psd {match['psd']:.2f}, sd {match['sd']:.2f} "
            f"({d['num_requests']} requests, {d['source']}); accept psd {fmt(accept['psd'])}; buffers read on "
            f"{buffers.get('device')} uuid {buffers.get('device_uuid')}: "
            f"{d['checks']['psd_buffers_on_drafter_device'] and d['checks']['sd_buffers_on_drafter_device']}")


def fmt(value) -> str:
    return "-" if value is None else f"{value:.2f}"

