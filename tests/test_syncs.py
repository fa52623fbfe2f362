"""Host-device synchronizations per worker job, counted on the CPU by tests/sync_audit.py: a
draft job and a verify job each make at most 2 (one device-to-host read of what the scheduler
needs, plus the buffer sync of the worker loop's contract), whatever the mix of greedy and
sampled rows, prompts and drafts. Also checks that the audit itself sees the syncs it models."""

import pytest
import torch

from minedraft.common.protocol import JobRow
from minedraft.workers.drafter import Drafter
from minedraft.workers.model.loader import TinySpec, load_decoder
from minedraft.workers.sampling import SamplingParams
from minedraft.workers.model.transfer import to_device
from minedraft.workers.verifier import Verifier
from tests.sync_audit import SyncAudit, mark_device

MAX_SYNCS_PER_JOB = 2
BUFFER_SYNCS_PER_JOB = 1  # SharedBuffers.sync() after each draft and verify job (workers/process.py)
K = 4


def _mark_model(model, cache) -> None:
    mark_device(*model.parameters(), *model.buffers(), cache.data)
    mark_device(model.inv_freq)  # moved to the device by the first forward on a GPU


def _cores():
    target = load_decoder("tiny-llama", torch.float32, tiny=TinySpec(seed=0))
    draft = load_decoder("tiny-llama", torch.float32, tiny=TinySpec(seed=0, noise=0.003))
    drafter = Drafter(draft, 8, 256, K, torch.float32)
    verifier = Verifier(target, 8, 256, K, torch.float32)
    _mark_model(draft, drafter.cache)
    _mark_model(target, verifier.cache)
    tokens = torch.zeros(8, K, dtype=torch.long)  # [B, k] the draft buffers, on the drafter's device
    probs = torch.zeros(8, K, target.config.vocab_size)  # [B, k, V]
    mark_device(tokens, probs)
    return drafter, verifier, tokens, probs


def _run_steps(drafter, verifier, tokens, probs, params: list[SamplingParams], num_steps: int,
               capacity: int | None = None) -> list[tuple[str, int, list[str]]]:
    """Drive the two cores as the scheduler does (sd: draft, then verify) for num_steps steps;
    returns (kind, syncs, events) per job."""
    prompts = [[(7 * i + 3 * j) % 250 + 1 for j in range(3 + 5 * i)] for i in range(len(params))]
    committed = [list(p) for p in prompts]
    sent = {"drafter": [0] * len(params), "verifier": [0] * len(params)}
    jobs = []

    def rows(role: str) -> list[JobRow]:
        out = []
        for i, p in enumerate(params):
            start = sent[role][i]
            sent[role][i] = len(committed[i])
            out.append(JobRow(f"r{i}", committed[i][start:], K - (i % 2), i, p if start == 0 else None))
        return out

    for _ in range(num_steps):
        with SyncAudit() as audit:
            outcome = drafter.draft(rows("drafter"), tokens, probs, capacity)
        jobs.append(("draft", audit.total + BUFFER_SYNCS_PER_JOB, audit.events))
        draft_rows = [JobRow(r.request_id, r.new_tokens, kept, r.buffer_row, r.params)
                      for r, kept in zip(rows("verifier"), outcome.num_kept)]
        with SyncAudit() as audit:
            emitted = verifier.verify(draft_rows, tokens, probs)
        jobs.append(("verify", audit.total + BUFFER_SYNCS_PER_JOB, audit.events))
        for i, new in enumerate(emitted):
            committed[i] += new
    return jobs


@pytest.mark.parametrize("case", ["greedy", "sampled", "mixed", "mixed_tetris"])
def test_each_job_syncs_at_most_twice(case):
    greedy, sampled = SamplingParams(), SamplingParams(temperature=0.8, top_k=20, top_p=0.9, seed=5)
    params = {"greedy": [greedy] * 3, "sampled": [sampled] * 3,
              "mixed": [greedy, sampled, greedy, sampled], "mixed_tetris": [greedy, sampled, greedy, sampled]}[case]
    capacity = 5 if case == "mixed_tetris" else None
    jobs = _run_steps(*_cores(), params, num_steps=3, capacity=capacity)
    for kind, syncs, events in jobs:
        assert syncs <= MAX_SYNCS_PER_JOB, (kind, events)


def test_prefill_job_syncs_at_most_once():
    drafter, verifier, tokens, probs = _cores()
    rows = [JobRow(f"r{i}", list(range(1, 6 + 4 * i)), 0, i, SamplingParams()) for i in range(3)]
    with SyncAudit() as audit:
        verifier.prefill(rows)
    assert audit.total <= 1, audit.events


def test_audit_counts_the_syncs_it_models():
    """The hook has power: each kind of sync it claims to see is counted once."""
    device = torch.device("cpu")  # a torch.device names the worker's device; the string "cpu" the host
    with SyncAudit() as audit:
        x = torch.arange(6.0, device=device)  # on the device: no sync
        host = torch.arange(3)  # host
        _ = x.sum().item()  # 1 read
        _ = x[:2].tolist()  # 2
        _ = bool(x[0] > 1)  # 3
        _ = x.cpu()  # 4
        _ = host.to(device)  # 5 blocking copy
        _ = to_device(host, device)  # none: pinned (on CUDA), non-blocking
        _ = host.to(device, non_blocking=True)  # 6: from pageable memory
        _ = x[host]  # 7 implicit copy of the index
        _ = x[x > 2]  # 8 data-dependent size
        _ = torch.tensor([1, 2], device=device)  # 9 blocking copy of the data
        y = host.clone()
        y[:2] = x[:2].long()  # 10 device value into a host tensor
        _ = x * 2 + 1  # none
    assert audit.total == 10, audit.events
