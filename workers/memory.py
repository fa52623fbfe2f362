"""What a worker's memory holds: the bytes one live request costs it (sizing the KV cache from
scheduler.kv_cache_memory), its weights, KV cache and draft buffers against its resident memory,
and giving load-time garbage back. No model code, no sockets."""

from __future__ import annotations

import ctypes
import math
import os

import torch

from minedraft.common.config import Config
from minedraft.common.protocol import DRAFTER
from minedraft.workers.buffers import draft_buffer_specs
from minedraft.workers.model.fast_linear import PackedLinear

NUM_DRAFT_BUFFERS = 2  # the drafter's buffer sets, one per batch id


def request_bytes(model_config, config: Config, role: str, dtype: torch.dtype) -> int:
    """What one live request costs a worker at scheduler.max_len: its KV-cache slot and, on the
    drafter, its draft buffer rows (a row per batch buffer, twice under auto's one-batch plans)."""
    sc = config.scheduler
    m = model_config
    element = torch.finfo(dtype).bits // 8
    kv = m.num_layers * 2 * m.num_kv_heads * sc.max_len * m.head_dim * element
    if role != DRAFTER or not sc.speculates:
        return kv
    buffer_row = sum(math.prod(shape[1:]) * torch.empty(0, dtype=t).element_size()
                     for shape, t in draft_buffer_specs(1, sc.max_depth, m.vocab_size).values())
    rows_per_request = NUM_DRAFT_BUFFERS * sc.max_rows(1) // sc.num_batches
    return kv + rows_per_request * buffer_row


def memory_budget_bytes(device: torch.device, share: float) -> int:
    """share of the device's memory: the host's physical memory, or the GPU's."""
    if device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory
    else:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return int(share * total)


def memory_report(model, core, buffers: list) -> dict:
    """What this worker holds, in bytes: the weights (packed panels; plain tensors: norms, biases,
    embeddings and linears F.linear serves; of those, second copies kept beside panels), its KV
    cache and draft buffers, against its resident memory (/proc/self/status: anonymous, file
    mappings, shared memory). other = resident - what is accounted for (the interpreter, torch)."""
    packed = [m for m in model.modules() if isinstance(m, PackedLinear)]
    params = {id(t): t for t in model.parameters()}
    params.update({id(t): t for m in packed for t in (m.weight, m.bias) if t is not None})
    report = {
        "weights_packed": sum(m.packed.nbytes for m in packed),
        "weights_plain": sum(t.nbytes for t in params.values()),
        "second_copies": sum(m.plain_bytes for m in packed),
        "kv_cache": core.cache.data.nbytes,
        "draft_buffers": sum(t.nbytes for b in buffers for t in b.tensors.values()),
        **resident_bytes(),
    }
    accounted = report["weights_packed"] + report["weights_plain"] + report["kv_cache"] + report["draft_buffers"]
    report["other"] = report["rss_anon"] + report["rss_file"] + report["rss_shmem"] - accounted
    return report


def trim_heap() -> None:
    """Give the C heap's free pages back to the system (glibc): loading a model frees gigabytes
    of transient tensors (float32 weights before packing, state dicts) that malloc keeps."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def resident_bytes(pid: int | str = "self") -> dict:
    """A local process's resident memory by kind (Linux; zeros where /proc cannot be read)."""
    keys = {"RssAnon": "rss_anon", "RssFile": "rss_file", "RssShmem": "rss_shmem"}
    out = dict.fromkeys(keys.values(), 0)
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                name, _, value = line.partition(":")
                if name in keys:
                    out[keys[name]] = int(value.split()[0]) * 1024  # kB
    except OSError:
        pass
    return out
