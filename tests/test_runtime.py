"""The runtime as real processes (scheduler, drafter, verifier) on tiny CPU models: lossless
greedy output in every mode, seeded sampling independent of mode and arrival order, real
drafter/verifier overlap in psd, zero-copy worker frames, and a clean stop."""

import asyncio
import glob
import os
import re
import subprocess
import sys

import pytest

from minedraft.runtime.client import AsyncClient, Client
from tests.runtime_utils import TINY, cli, reference_outputs, running_daemon, status


def workload(n: int = 24, temperature: float = 0.0) -> list[dict]:
    requests = []
    for i in range(n):
        prompt = [(31 * i + 7 * j) % 256 for j in range(1 + (13 * i) % 40)]
        requests.append({"request_id": f"q{i}", "prompt_ids": prompt, "max_tokens": 4 + (11 * i) % 37,
                         "temperature": temperature, "seed": 1000 + i})
    return requests


async def run_load(endpoint: str, requests: list[dict], stagger_s: float = 0.01) -> dict[str, list[int]]:
    async with AsyncClient(endpoint, timeout_s=120) as client:
        async def one(i, r):
            await asyncio.sleep(stagger_s * i)  # arrivals spread over time
            c = await client.generate(prompt_ids=r["prompt_ids"], max_tokens=r["max_tokens"],
                                      temperature=r["temperature"], seed=r["seed"], request_id=r["request_id"])
            return r["request_id"], c.token_ids
        return dict(await asyncio.gather(*(one(i, r) for i, r in enumerate(requests))))


@pytest.fixture(scope="module")
def greedy_reference():
    return reference_outputs(workload())


@pytest.mark.parametrize("linear_path", ["plain", "packed"])
@pytest.mark.parametrize("mode", ["psd", "sd", "ar"])
def test_greedy_equals_reference(tmp_path, mode, linear_path, greedy_reference):
    """Every mode on each linear path against the in-process plain-path reference."""
    import torch
    from minedraft.workers.model.fast_linear import kernel_unavailable_reason

    reason = kernel_unavailable_reason(torch.device("cpu"), torch.float32)
    if linear_path == "packed" and reason is not None:
        pytest.skip(f"kernel unavailable: {reason}")
    with running_daemon(tmp_path, mode, f"model.linear_path={linear_path}") as (endpoint, _):
        outputs = asyncio.run(run_load(endpoint, workload()))
        st = status(endpoint)
    assert outputs == greedy_reference
    roles = ["verifier"] if mode == "ar" else ["drafter", "verifier"]
    assert sorted(st["linear_path"]) == roles
    for role in roles:
        assert st["linear_path"][role]["requested"] == linear_path
        assert set(st["linear_path"][role]["shapes"].values()) == {linear_path}
    if mode != "ar":
        assert 0 < st["acceptance_rate"] <= 1
        assert 1 < st["mean_accepted_length"] <= 5


def test_bfloat16_draft_weights_keep_outputs_exact(tmp_path, greedy_reference):
    """A draft whose linears are rounded to bfloat16 proposes differently, and nothing else
    changes: greedy output is the target's own; seeded sampling is the same in psd and sd."""
    import torch
    from minedraft.workers.model.fast_linear import kernel_unavailable_reason

    requests = workload(12, temperature=0.8)
    sampled = {}
    for mode in ("psd", "sd"):
        with running_daemon(tmp_path / mode, mode, "model.draft_weights=bfloat16") as (endpoint, _):
            if mode == "psd":
                assert asyncio.run(run_load(endpoint, workload())) == greedy_reference
            sampled[mode] = asyncio.run(run_load(endpoint, requests))
            st = status(endpoint)
        assert st["linear_path"]["drafter"]["weights"] == "bfloat16"
        assert st["linear_path"]["verifier"]["weights"] == "float32"
        if kernel_unavailable_reason(torch.device("cpu"), torch.float32) is None:
            assert set(st["linear_path"]["drafter"]["shapes"].values()) == {"packed"}
        assert 0 < st["acceptance_rate"] <= 1
    assert sampled["psd"] == sampled["sd"] and all(sampled["sd"].values())


def test_seeded_sampling_same_in_psd_and_sd_and_any_order(tmp_path):
    requests = workload(16, temperature=0.8)
    with running_daemon(tmp_path / "psd", "psd") as (endpoint, _):
        psd = asyncio.run(run_load(endpoint, requests))
        psd_reversed = asyncio.run(run_load(endpoint, requests[::-1], stagger_s=0.003))
    with running_daemon(tmp_path / "sd", "sd") as (endpoint, _):
        sd = asyncio.run(run_load(endpoint, requests))
    assert psd == sd
    assert psd == psd_reversed
    assert psd == reference_outputs(requests, mode="sd")
    assert len({tuple(v) for v in psd.values()}) > 1


def test_psd_overlap_and_zero_copy_frames(tmp_path):
    # A 32k vocabulary makes each batch's draft probabilities 8 x 4 x 32768 x 4 B = 4 MiB.
    with running_daemon(tmp_path, "psd", "model.tiny_vocab_size=32768", "model.tiny_num_layers=4") as (endpoint, _):
        asyncio.run(run_load(endpoint, workload(24, temperature=0.7), stagger_s=0.0))
        st = status(endpoint, is_detailed=True)
    assert overlap_s(st) > 0.2 * min(st["busy_s"]["drafter"], st["busy_s"]["verifier"])
    assert 0 < st["busy_fraction"]["drafter"] <= 1 and 0 < st["busy_fraction"]["verifier"] <= 1
    assert st["max_worker_frame_bytes"] < 4096, st["max_worker_frame_bytes"]


def overlap_s(st: dict) -> float:
    drafter, verifier = st["busy_intervals"]["drafter"], st["busy_intervals"]["verifier"]
    assert drafter and verifier
    return sum(max(0.0, min(d1, v1) - max(d0, v0)) for d0, d1 in drafter for v0, v1 in verifier)


def test_sd_steps_never_overlap_and_prefill_ahead_uses_the_gap(tmp_path):
    requests = workload(8, temperature=0.7)
    # Staggered arrivals: each step admits new prompts, so there are several prefill jobs. With
    # one (all arrivals at once) a loaded machine could start it after the short tiny-model draft
    # ended, and the overlap asserted below would depend on the OS scheduler.
    # Pre-drafting off in both: it runs the drafter beside the verifier by design (test_predraft.py).
    with running_daemon(tmp_path / "off", "sd", "scheduler.prefill_ahead=false", "scheduler.predraft=false") as (endpoint, _):
        off = asyncio.run(run_load(endpoint, requests, stagger_s=0.02))
        st = status(endpoint, is_detailed=True)
    assert overlap_s(st) == 0 and st["num_prefill_jobs"] == 0
    # The verifier caches new prompts while the drafter drafts them: same tokens, overlapped.
    with running_daemon(tmp_path / "on", "sd", "scheduler.predraft=false") as (endpoint, _):
        on = asyncio.run(run_load(endpoint, requests, stagger_s=0.02))
        st = status(endpoint, is_detailed=True)
    assert st["num_prefill_jobs"] > 1 and overlap_s(st) > 0
    assert on == off


def test_streaming_text_and_stop_string(tmp_path):
    with running_daemon(tmp_path, "psd") as (endpoint, _):
        with Client(endpoint, timeout_s=60) as client:
            full = client.generate("hello", max_tokens=40, ignore_eos=True)
            chunks = list(client.stream("hello", max_tokens=40, ignore_eos=True))
            assert [t for c in chunks for t in c.token_ids] == full.token_ids
            assert "".join(c.text for c in chunks) == full.text
            assert chunks[-1].is_finished and chunks[-1].finish_reason == "length"
            text = full.text
            stop = text[len(text) // 2: len(text) // 2 + 2] if len(text) > 4 else None
            if stop and stop.strip("\ufffd"):
                cut = client.generate("hello", max_tokens=40, stop=[stop], ignore_eos=True)
                assert cut.finish_reason == "stop"
                assert cut.text == text[: text.index(stop)]


def test_min_tokens_equals_the_reference_engine(tmp_path):
    """No stop token (EOS included) ends a request before min_tokens: the daemon's greedy tokens
    equal the in-process engine's, and (independently of the commit both share,
    common/request.py) end at the first stop id past min_tokens of the free-running output."""
    from minedraft.common.request import Request
    from minedraft.workers.engine import Engine
    from minedraft.workers.model.loader import TinySpec, load_decoder
    import torch

    prompt, min_tokens = [72, 101, 108, 108, 111], 10
    with running_daemon(tmp_path, "psd") as (endpoint, _):
        with Client(endpoint, timeout_s=60) as client:
            ids = client.generate(prompt_ids=prompt, max_tokens=40, ignore_eos=True).token_ids
            stop_ids = [next(t for t in ids[:min_tokens] if t in ids[min_tokens:])]  # early, and again later
            got = {n: client.generate(prompt_ids=prompt, max_tokens=40, stop_token_ids=stop_ids, min_tokens=n)
                   for n in (0, min_tokens, 40)}
    engine = Engine(load_decoder("tiny-llama", torch.float32, tiny=TinySpec(seed=0)), mode="ar", max_len=512)
    for n in got:
        engine.add_request(Request(f"m{n}", prompt, 40, stop_token_ids=tuple(stop_ids), min_tokens=n))
    expected = {int(rid[1:]): r.output_ids for rid, r in engine.run().items()}
    assert {n: c.token_ids for n, c in got.items()} == expected
    assert got[0].token_ids == ids[: ids.index(stop_ids[0]) + 1]
    assert got[min_tokens].token_ids == ids[: ids.index(stop_ids[0], min_tokens) + 1]
    assert got[min_tokens].finish_reason == "stop" and got[40].finish_reason == "length"


def test_detokenizer_counts_a_stop_string_only_past_min_tokens():
    from minedraft.runtime.tokenizer import ByteTokenizer, Detokenizer

    ids = list(b"ab-ab-ab")
    for min_tokens, cut in ((0, "ab"), (3, "ab-ab"), (4, "ab-ab"), (5, "ab-ab"), (6, "ab-ab-ab")):
        detokenizer, text, is_stop = Detokenizer(ByteTokenizer(), ["-"], min_tokens), "", False
        for n in range(1, len(ids) + 1):
            delta, is_stop = detokenizer.update(ids[:n], n == len(ids))
            text += delta
            if is_stop:
                break
        assert (text, is_stop) == (cut, cut != "ab-ab-ab"), min_tokens


def test_every_subcommand_has_help_with_an_example(capsys):
    from minedraft.runtime import cli as cli_module

    (sub,) = [a for a in cli_module.build_parser()._actions if a.choices and "start" in a.choices]
    for name in sub.choices:
        with pytest.raises(SystemExit) as done:
            cli_module.main([name, "--help"])
        assert done.value.code == 0
        shown = capsys.readouterr().out
        assert re.search(rf"\nexamples?[^\n]*:\n  minedraft-runtime {name}\b", shown), name


def _into_a_closed_pipe(*args: str) -> subprocess.CompletedProcess:
    """The CLI with its stdout a pipe nobody reads any more, as `| head -1` leaves it."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        return subprocess.run([sys.executable, "-m", "minedraft.runtime.cli", *args], stdout=write_end,
                              stderr=subprocess.PIPE, text=True, timeout=60, cwd=os.path.dirname(os.path.dirname(
                                  os.path.abspath(__file__))))
    finally:
        os.close(write_end)


def test_output_into_a_closed_pipe_ends_quietly(tmp_path):
    for args in (["keys", str(tmp_path / "keys")], ["--help"], ["status", "--help"]):
        done = _into_a_closed_pipe(*args)
        assert done.stderr == "" and done.returncode in (0, 141), (args, done.returncode, done.stderr)
    assert _into_a_closed_pipe("keys", str(tmp_path / "more")).returncode == 141  # 128 + SIGPIPE, as a shell says


def test_scheduler_client_cli_import_without_torch():
    code = ("import sys; import minedraft.runtime.scheduler, minedraft.runtime.server, "
            "minedraft.runtime.client, minedraft.runtime.cli, minedraft.common.protocol; "
            "assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_start_generate_stop_leaves_nothing(tmp_path):
    before = set(glob.glob("/dev/shm/minedraft-*"))
    with running_daemon(tmp_path, "psd") as (endpoint, args):
        st = status(endpoint)
        assert st["draft_buffers"] == {"num_buffers": 2, "device": "cpu", "device_uuid": None}  # attached at start
        pids = [st["pid"], *st["worker_pids"].values()]
        during = set(glob.glob("/dev/shm/minedraft-*")) - before
        assert len(during) == 2  # one draft buffer per batch
        out = cli("generate", *args, "--prompt", "def fib(n):", "--max-tokens", "8", "--min-tokens", "8")
        assert out.returncode == 0, out.stderr
        assert "8 tokens" in out.stderr
        piped = _into_a_closed_pipe("status", *args)  # `minedraft-runtime status | head -1`
        assert (piped.returncode, piped.stderr) == (141, "")
        shell = subprocess.run(f"{sys.executable} -m minedraft.runtime.cli status {' '.join(args)} | head -1",
                               shell=True, capture_output=True, text=True, timeout=60,
                               cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        assert shell.stdout.startswith("state") and shell.stdout.count("\n") == 1 and shell.stderr == ""
    for pid in pids:
        assert not os.path.exists(f"/proc/{pid}") or open(f"/proc/{pid}/stat").read().split()[2] == "Z"
    assert set(glob.glob("/dev/shm/minedraft-*")) - before == set()
    assert not os.path.exists(tmp_path / "run")


def test_workers_do_not_import_the_scheduler():
    code = ("import sys; import minedraft.workers.process, minedraft.workers.engine; "
            "bad = [m for m in ('minedraft.runtime.scheduler', 'minedraft.runtime.server', "
            "'minedraft.runtime.worker_pool', 'minedraft.runtime.client') if m in sys.modules]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_max_batch_from_kv_cache_memory(tmp_path, greedy_reference):
    """scheduler.max_batch = 0: each worker sizes its cache from kv_cache_memory, the scheduler
    takes the smaller, and the daemon serves as before."""
    import torch

    from minedraft.common.config import batch_from_memory, load_config
    from minedraft.workers.memory import memory_budget_bytes, request_bytes
    from minedraft.workers.model.loader import load_decoder
    from minedraft.workers.process import tiny_spec

    share = 1e-4
    config = load_config(TINY, ["scheduler.max_batch=0", f"scheduler.kv_cache_memory={share}", "scheduler.mode=psd"])
    expected = min(
        batch_from_memory(request_bytes(load_decoder(spec, torch.float32, tiny=tiny_spec(config, role)).config,
                                        config, role, torch.float32),
                          memory_budget_bytes(torch.device("cpu"), share), 2)
        for role, spec in (("drafter", config.model.draft), ("verifier", config.model.target)))
    assert 1 < expected < 16  # the share above binds on this machine's memory
    with running_daemon(tmp_path, "psd", "scheduler.max_batch=0", f"scheduler.kv_cache_memory={share}") as (endpoint, _):
        assert status(endpoint)["max_batch"] == expected
        assert asyncio.run(run_load(endpoint, workload())) == greedy_reference


def test_a_burst_of_requests_is_admitted_as_one_load(tmp_path):
    """Requests sent together reach the socket a few milliseconds apart; an idle runtime reads
    on while they arrive (runtime/server.py BURST_GAP_MS), so the first step prefills them all
    at once instead of starting on the first few (and auto plans it for the whole load)."""
    requests = workload(12)
    with running_daemon(tmp_path, "ar", "scheduler.max_batch=16") as (endpoint, _):
        asyncio.run(run_load(endpoint, requests, stagger_s=0.0))
        st = status(endpoint, is_detailed=True)
    first = min((j for j in st["recent_jobs"] if j["role"] == "verifier"), key=lambda j: j["start_s"])
    assert first["rows"] == len(requests), first
