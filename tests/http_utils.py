"""Helpers for the HTTP front-end tests: a tiny model folder whose tokenizer files ship a chat
template (the built-in tiny models have a byte tokenizer and none), and waiting on processes."""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path

# A ChatML-style template in the Jinja dialect of Hugging Face chat templates: bos_token,
# raise_exception and loop variables, as real templates use them.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('roles must be system, user or assistant') }}"
    "{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_end|>", "<|im_start|>"]  # ids 256 (bos), 257 (eos), 258


def byte_level_tokenizer(vocab_size: int = 512):
    """A byte-level BPE tokenizer: id b is byte b, then the special tokens, then merged letter
    pairs up to vocab_size (so every id the tiny model can emit decodes)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    byte_symbol = bytes_to_unicode()
    vocab = {byte_symbol[b]: b for b in range(256)}
    vocab.update({token: 256 + i for i, token in enumerate(SPECIAL_TOKENS)})
    letters = "abcdefghijklmnopqrstuvwxyz"
    merges = [(a, b) for a in letters for b in letters][: vocab_size - len(vocab)]
    vocab.update({a + b: len(vocab) + i for i, (a, b) in enumerate(merges)})
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens(SPECIAL_TOKENS)
    return tokenizer


def write_chat_model(folder: Path, noise: float = 0.0, chat_template: str | None = CHAT_TEMPLATE) -> str:
    """A tiny Llama folder (config, safetensors, tokenizer.json, tokenizer_config.json and the
    chat template), seeded like configs/tiny.toml's models; returns its path."""
    from transformers import PreTrainedTokenizerFast

    from minedraft.workers.model import TinySpec, tiny_hf_model

    folder.mkdir(parents=True, exist_ok=True)
    tiny_hf_model("tiny-llama", TinySpec(seed=0, noise=noise)).save_pretrained(folder)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=byte_level_tokenizer(), bos_token=SPECIAL_TOKENS[0],
                                        eos_token=SPECIAL_TOKENS[1])
    if chat_template is not None:
        tokenizer.chat_template = chat_template
    tokenizer.save_pretrained(folder)
    return str(folder)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def is_listening(url: str) -> bool:
    host, port = url.removeprefix("http://").rsplit(":", 1)
    with socket.socket() as s:
        s.settimeout(1.0)
        return s.connect_ex((host, int(port))) == 0


def is_alive(pid: int) -> bool:
    """True for a live process (a zombie, exited but not yet reaped, counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def wait_until(predicate, timeout_s: float, interval_s: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval_s)
    return predicate()


def api_key_env(key: str | None) -> dict:
    """This process's environment with MINEDRAFT_API_KEY set to key (or removed)."""
    env = {k: v for k, v in os.environ.items() if k != "MINEDRAFT_API_KEY"}
    if key is not None:
        env["MINEDRAFT_API_KEY"] = key
    return env
