"""The GPU path: random-weight Qwen2.5-Coder shapes (checked on the CPU and the meta device),
tools/gpu_check.py (imports without CUDA, skips cleanly, and runs end to end with --device cpu),
device placement errors, and `cuda`-marked tests that run where torch sees a GPU: among them the
ones that fail if the draft exchange over CUDA IPC breaks (seeded sampling reads the draft
probabilities, which greedy rows never do).

Run: .venv/bin/python -m pytest -q tests/test_gpu.py
"""

import asyncio
import dataclasses
import json
import os
import subprocess
import sys

import msgpack
import pytest
import torch
import transformers

from minedraft.workers.buffers import SharedBuffers
from minedraft.workers.model.kv_cache import KVCache
from minedraft.workers.model.config import ModelConfig
from minedraft.workers.model.loader import load_decoder, save_tokenizer_json
from minedraft.workers.model.shapes import RANDOM_MODELS, random_decoder
from tests.runtime_utils import ROOT, cli, daemon_args, reference_outputs, running_daemon, status

GPU_CHECK = os.path.join(ROOT, "tools", "gpu_check.py")
NO_CUDA_ENV = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}

# The released config.json of each model (Qwen/Qwen2.5-Coder-*-Instruct), as transformers reads it.
QWEN_CONFIG_JSON = {
    "random-qwen2.5-coder-1.5b": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                                      num_attention_heads=12, num_key_value_heads=2, max_window_layers=21),
    "random-qwen2.5-coder-0.5b": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                                      num_attention_heads=14, num_key_value_heads=2, max_window_layers=21),
}
QWEN_COMMON = dict(vocab_size=151936, max_position_embeddings=32768, rope_theta=1e6, rms_norm_eps=1e-6,
                   tie_word_embeddings=True, use_sliding_window=False, sliding_window=131072, hidden_act="silu",
                   bos_token_id=151643, eos_token_id=151645, initializer_range=0.02)
NUM_PARAMETERS = {"random-qwen2.5-coder-1.5b": 1_543_714_304, "random-qwen2.5-coder-0.5b": 494_032_768}
SMALL = ModelConfig(arch="qwen2", vocab_size=96, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4,
                    num_kv_heads=2, head_dim=8, rms_norm_eps=1e-6, rope_theta=1e6, attention_bias=True,
                    tie_word_embeddings=True, max_position_embeddings=256, eos_token_ids=(95,))


# ---------------------------------------------------------------- random-weight real shapes


@pytest.mark.parametrize("name", sorted(RANDOM_MODELS))
def test_random_shapes_match_transformers_qwen2_config(name):
    hf_config = transformers.Qwen2Config(**QWEN_COMMON, **QWEN_CONFIG_JSON[name])
    expected = ModelConfig.from_hf(hf_config)
    assert dataclasses.replace(RANDOM_MODELS[name], eos_token_ids=expected.eos_token_ids) == expected
    decoder = load_decoder(name, torch.bfloat16, "meta")  # shapes only: no memory, no time
    assert sum(p.numel() for p in decoder.parameters()) == NUM_PARAMETERS[name]
    assert decoder.lm_head.weight is decoder.model.embed_tokens.weight
    assert decoder.model.layers[0].self_attn.q_proj.bias is not None
    assert decoder.model.layers[0].self_attn.o_proj.bias is None
    assert save_tokenizer_json(name, "/nonexistent/tokenizer.json") is False  # byte tokenizer


def test_random_decoder_init_seeded_and_runs():
    model = random_decoder(SMALL, torch.float32, "cpu", seed=3)
    weights = dict(model.named_parameters())
    assert model.lm_head.weight is model.model.embed_tokens.weight
    for key, value in weights.items():
        assert value.dtype == torch.float32 and not value.requires_grad
        if key.endswith("norm.weight"):
            assert bool((value == 1).all()), key
        elif key.endswith(".bias"):
            assert not value.any(), key
        else:
            assert abs(value.std().item() - 0.02) < 0.004, key
    again, other = random_decoder(SMALL, torch.float32, seed=3), random_decoder(SMALL, torch.float32, seed=4)
    assert all(torch.equal(v, dict(again.named_parameters())[k]) for k, v in weights.items())
    assert not torch.equal(weights["model.embed_tokens.weight"], other.model.embed_tokens.weight)
    cache = KVCache(SMALL, 2, 32, torch.bfloat16)
    model = random_decoder(SMALL, torch.bfloat16, seed=3)
    logits = model(torch.tensor([[1, 2, 3], [4, 5, 0]]), cache, [cache.alloc(), cache.alloc()], [3, 2])
    assert logits.shape == (2, 3, 96) and logits.dtype == torch.float32 and torch.isfinite(logits).all()


# ---------------------------------------------------------------- tools/gpu_check.py without CUDA


def test_buffers_and_gpu_check_import_without_cuda():
    code = ("import importlib.util, sys; import minedraft.workers.buffers; "
            f"spec = importlib.util.spec_from_file_location('gpu_check', {GPU_CHECK!r}); "
            "module = importlib.util.module_from_spec(spec); spec.loader.exec_module(module); "
            "assert callable(module.main)")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120, env=NO_CUDA_ENV)


def test_gpu_check_without_cuda_is_skipped(tmp_path):
    done = subprocess.run([sys.executable, GPU_CHECK, "--json", str(tmp_path / "r.json")], cwd=ROOT, env=NO_CUDA_ENV,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "skipped: no CUDA device" in done.stdout
    assert json.loads((tmp_path / "r.json").read_text())["status"] == "skipped: no CUDA device"


def test_gpu_check_cpu_smoke(tmp_path):
    out = tmp_path / "gpu_check.json"
    done = subprocess.run([sys.executable, GPU_CHECK, "--device", "cpu", "--quick", "--json", str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr[-4000:]
    report = json.loads(out.read_text())
    assert report["status"] == "ok"
    a, b, c, d = report["a"], report["b"], report["c"], report["d"]
    assert a["status"] == "ok" and all(r["max_abs_diff"] < 1e-4 for r in a["parity"].values())
    assert a["greedy"]["sd_equals_ar"] and all(a["sampler"]["checks"].values())
    assert b["status"] == "ok" and b["kind"] == "shm" and b["cuda_ipc"].startswith("skipped")
    assert b["num_sets"] == 3 and b["consumer_checksum_ok"] and b["write_back_ok"] and b["device_uuid_ok"]
    assert d["status"] == "ok" and all(d["checks"].values()) and d["source"] == "section c's sd and psd daemons"
    assert d["draft_buffers"] == {"num_buffers": 2, "device": "cpu", "device_uuid": None}
    assert all("exchange" not in run for run in c["runs"])  # section d took the sampled outputs
    assert c["status"] == "ok" and [(r["batch"], r["mode"]) for r in c["runs"]] == [(4, "ar"), (4, "sd"), (4, "psd")]
    for run in c["runs"]:
        assert run["status"] == "ok" and run["greedy_match_vs_ar"] == 1.0
        assert run["output_tokens_per_s"] > 0 and run["num_jobs"]["verifier"] > 0
    psd = c["runs"][2]
    assert psd["num_jobs"]["drafter"] > 0 and 0 < psd["overlap_efficiency"] <= 1
    assert "out tok/s" in done.stdout and "d  ok" in done.stdout  # the table and section d's line


@pytest.mark.skipif(torch.cuda.device_count() >= 2, reason="cuda:1 exists here")
def test_start_fails_when_the_verifier_device_is_missing(tmp_path):
    started = cli("start", *daemon_args(tmp_path, "psd", "verifier.device=cuda:1", "verifier.cpu_cores=[]"))
    assert started.returncode != 0
    assert "verifier.device=cuda:1" in started.stderr, started.stderr[-3000:]


# ---------------------------------------------------------------- on a GPU


def cuda_placement() -> tuple[str, str]:
    """The drafter on cuda:0; the verifier on cuda:1 when there is one (IPC between two GPUs)."""
    return "cuda:0", f"cuda:{min(torch.cuda.device_count() - 1, 1)}"


def cuda_overrides() -> list[str]:
    drafter, verifier = cuda_placement()
    return [f"drafter.device={drafter}", f"verifier.device={verifier}", "drafter.cpu_cores=[]", "verifier.cpu_cores=[]"]


@pytest.mark.cuda
def test_runtime_greedy_psd_equals_ar_on_cuda(tmp_path):
    from tests.test_runtime import run_load, workload

    outputs = {}
    for mode in ("psd", "ar"):
        with running_daemon(tmp_path / mode, mode, *cuda_overrides()) as (endpoint, _):
            outputs[mode] = asyncio.run(run_load(endpoint, workload(12)))
    assert outputs["psd"] == outputs["ar"]


@pytest.mark.cuda
def test_seeded_sampling_reads_the_draft_probabilities_across_processes_on_cuda(tmp_path):
    """Sampled rows accept a draft with probability min(1, p/q), q read over CUDA IPC: zeroed,
    stale or misplaced drafts change the tokens. psd and sd through real daemons must equal the
    in-process engine (no IPC) on the same devices token for token; the near-copy draft of
    configs/tiny.toml must be mostly accepted (0.96 on the CPU); and the verifier must read the
    buffers on the GPU the config gives the drafter, by UUID."""
    from tests.test_runtime import run_load, workload

    requests = workload(12, temperature=0.8)
    with running_daemon(tmp_path / "psd", "psd", *cuda_overrides()) as (endpoint, _):
        psd = asyncio.run(run_load(endpoint, requests))
        st = status(endpoint)
    with running_daemon(tmp_path / "sd", "sd", *cuda_overrides()) as (endpoint, _):
        sd = asyncio.run(run_load(endpoint, requests))
    drafter, verifier = cuda_placement()
    reference = reference_outputs(requests, mode="sd", draft_device=drafter, target_device=verifier)
    assert psd == reference
    assert sd == reference
    assert len({tuple(v) for v in psd.values()}) > 1
    assert st["acceptance_rate"] > 0.6, st["acceptance_rate"]
    assert st["draft_buffers"] == {"num_buffers": 2, "device": drafter,
                                   "device_uuid": str(torch.cuda.get_device_properties(drafter).uuid)}


# The consumer of test_buffer_sets_sharing_a_segment_attach_in_another_process: attaches every
# handle (msgpack on stdin), reports what it reads and where, adds 100 x (i + 1) to set i in place.
SEGMENT_CONSUMER = r"""
import json, sys, msgpack, torch
from minedraft.workers.buffers import SharedBuffers
views = [SharedBuffers.attach(h) for h in msgpack.unpackb(sys.stdin.buffer.read(), raw=False)]
report = [{"values": v.tensors["x"].cpu().tolist(), "device": str(v.device),
           "device_uuid": str(torch.cuda.get_device_properties(v.device).uuid)} for v in views]
for i, view in enumerate(views):
    view.tensors["x"].add_(100 * (i + 1))
    view.sync()  # writes done before we answer
print(json.dumps(report))
for view in views:
    view.close()
"""


@pytest.mark.cuda
def test_buffer_sets_sharing_a_segment_attach_in_another_process():
    """Small blocks share one cudaMalloc segment, hence one IPC handle at different offsets: each
    set must still open its own bytes in another process, whose CUDA_VISIBLE_DEVICES lists the
    GPUs in reverse (so the producer's cuda:0 is the consumer's last device)."""
    made = [SharedBuffers.create({"x": ((16,), torch.float32)}, "cuda:0") for _ in range(6)]
    try:
        by_segment: dict[bytes, list[int]] = {}
        for i, buffers in enumerate(made):
            by_segment.setdefault(buffers.handle()["ipc"]["handle"], []).append(i)
            buffers.tensors["x"].copy_(torch.arange(16.0, device="cuda:0") + 1000 * i)
        shared = max(by_segment.values(), key=len)
        offsets = [made[i].handle()["ipc"]["offset_bytes"] for i in shared]
        assert len(shared) >= 2 and len(set(offsets)) == len(offsets) and max(offsets) > 0, by_segment
        torch.cuda.synchronize()
        visible = os.environ.get("CUDA_VISIBLE_DEVICES") or ",".join(map(str, range(torch.cuda.device_count())))
        env = {**os.environ, "CUDA_VISIBLE_DEVICES": ",".join(reversed(visible.split(",")))}
        child = subprocess.run([sys.executable, "-c", SEGMENT_CONSUMER], env=env, capture_output=True, timeout=300,
                               input=msgpack.packb([b.handle() for b in made], use_bin_type=True))
        assert child.returncode == 0, child.stderr.decode()[-3000:]
        report = json.loads(child.stdout.decode().splitlines()[-1])
        uuid = str(torch.cuda.get_device_properties(0).uuid)
        for i, (buffers, seen) in enumerate(zip(made, report)):
            assert seen["values"] == (torch.arange(16.0) + 1000 * i).tolist(), (i, seen)
            assert seen["device_uuid"] == uuid and seen["device"] == f"cuda:{torch.cuda.device_count() - 1}"
            assert torch.equal(buffers.tensors["x"].cpu(), torch.arange(16.0) + 1000 * i + 100 * (i + 1))
    finally:
        for buffers in made:
            buffers.close()


@pytest.mark.cuda
@pytest.mark.parametrize("name", sorted(RANDOM_MODELS))
def test_random_qwen_shapes_load_on_cuda(name):
    model = load_decoder(name, torch.bfloat16, "cuda")
    assert sum(p.numel() for p in model.parameters()) == NUM_PARAMETERS[name]
    assert all(p.is_cuda and p.dtype == torch.bfloat16 for p in model.parameters())
    cache = KVCache(model.config, 2, 64, torch.bfloat16, "cuda")
    logits = model(torch.tensor([[1, 2, 3], [4, 5, 0]]), cache, [cache.alloc(), cache.alloc()], [3, 2])
    assert logits.shape == (2, 3, 151936) and logits.is_cuda and torch.isfinite(logits).all()
    del model, cache, logits
    torch.cuda.empty_cache()


@pytest.mark.cuda
def test_engine_greedy_sd_equals_ar_on_cuda():
    sys.path.insert(0, os.path.join(ROOT, "tools"))
    try:
        import gpu_check
    finally:
        sys.path.pop(0)
    assert gpu_check.check_engine_greedy("cuda", quick=True)["sd_equals_ar"]


@pytest.mark.cuda
def test_small_cuda_buffers_attach_in_process_to_their_own_memory():
    from minedraft.workers.buffers import SharedBuffers

    specs = {"x": ((16,), torch.float32)}  # small: both blocks likely share one cudaMalloc segment
    made = [SharedBuffers.create(specs, "cuda") for _ in range(2)]
    for value, buffers in enumerate(made, 1):
        buffers.tensors["x"].fill_(value)
    views = [SharedBuffers.attach(buffers.handle()) for buffers in made]
    for value, (buffers, view) in enumerate(zip(made, views), 1):
        assert view.tensors["x"].data_ptr() == buffers.tensors["x"].data_ptr()
        assert bool((view.tensors["x"] == value).all())
    for buffers in views + made:
        buffers.close()
