"""Helpers for tests that run the real daemon: start it through the CLI on a private ipc://
endpoint and run directory, and the in-process reference outputs to compare with."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys

from minedraft.runtime.client import Client

TINY = "configs/tiny.toml"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def cli(*args: str, timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "minedraft.runtime.cli", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)


def daemon_args(tmp_path, mode: str, *overrides: str) -> list[str]:
    endpoint = f"ipc://{tmp_path}/client.sock"
    args = ["--config", TINY, "--endpoint", endpoint, "--set", f"server.run_dir={tmp_path}/run",
            "--set", f"scheduler.mode={mode}"]
    for override in overrides:
        args += ["--set", override]
    return args


@contextlib.contextmanager
def running_daemon(tmp_path, mode: str, *overrides: str):
    """Start a daemon, yield (endpoint, args), stop it at the end (asserting a clean stop)."""
    args = daemon_args(tmp_path, mode, *overrides)
    started = cli("start", *args)
    assert started.returncode == 0, started.stdout + started.stderr
    endpoint = args[args.index("--endpoint") + 1]
    try:
        yield endpoint, args
    finally:
        stopped = cli("stop", *args)
        assert stopped.returncode == 0, stopped.stdout + stopped.stderr


def status(endpoint: str, is_detailed: bool = False) -> dict:
    with Client(endpoint, timeout_s=10) as client:
        return client.status(is_detailed)


def reference_outputs(requests, mode: str = "ar", noise: float = 0.003, draft_device: str = "cpu",
                      target_device: str = "cpu") -> dict[str, list[int]]:
    """In-process engine on the same tiny models as configs/tiny.toml (no process, no shared
    buffer). Sampled rows draw from generators on their model's device, so compare a daemon with
    the reference on the same devices."""
    from minedraft.common.request import Request
    from minedraft.workers.engine import Engine
    from minedraft.workers.model.loader import TinySpec, load_decoder
    from minedraft.workers.sampling import SamplingParams
    import torch

    target = load_decoder("tiny-llama", torch.float32, target_device, tiny=TinySpec(seed=0))
    draft = load_decoder("tiny-llama", torch.float32, draft_device, tiny=TinySpec(seed=0, noise=noise)) \
        if mode == "sd" else None
    engine = Engine(target, draft, mode=mode, num_draft=4, max_batch=8, max_len=512)
    for r in requests:
        params = SamplingParams(r["temperature"], 0, 1.0, r.get("seed", 0))
        engine.add_request(Request(r["request_id"], r["prompt_ids"], r["max_tokens"], params))
    return {rid: req.output_ids for rid, req in engine.run().items()}
