"""Tokenizers the scheduler uses (torch-free): a byte tokenizer for the built-in tiny models and
the `tokenizers` library for real ones; plus incremental detokenization with stop strings."""

from __future__ import annotations


class ByteTokenizer:
    """UTF-8 bytes are ids 0..255; 256 is BOS, 257 EOS; other ids decode to nothing. The
    tokenizer of the built-in tiny-* and random-* models, which it gives a small chat template."""

    # Plain text (no special ids), so any byte model serves /v1/chat/completions:
    # "<|user|>\nhi\n<|assistant|>\n". Rendered as transformers' apply_chat_template would.
    CHAT_TEMPLATE = ("{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}\n{% endfor %}"
                     "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int]) -> str:
        return bytes(i for i in ids if 0 <= i < 256).decode("utf-8", errors="replace")


class FileTokenizer:
    """A tokenizer.json (the `tokenizers` library's format), as written by the verifier."""

    def __init__(self, path: str):
        from tokenizers import Tokenizer

        self._tokenizer = Tokenizer.from_file(path)

    def encode(self, text: str) -> list[int]:
        return self._tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=True)


def make_tokenizer(spec: dict):
    """spec from the verifier's ReadyResult: {"kind": "bytes"} or {"kind": "file", "path": ...}."""
    kind = spec.get("kind")
    if kind == "bytes":
        return ByteTokenizer()
    if kind == "file" and isinstance(spec.get("path"), str):
        return FileTokenizer(spec["path"])
    raise ValueError(f"unknown tokenizer spec {spec!r}")


def chat_template(spec: dict) -> str | None:
    """The chat template that comes with the verifier's tokenizer spec (None: the model has none)."""
    return ByteTokenizer.CHAT_TEMPLATE if spec.get("kind") == "bytes" else spec.get("chat_template")


class Detokenizer:
    """Turns a growing list of output ids into text deltas, holding back an incomplete UTF-8
    character and any tail that could still become a stop string. With min_tokens, a stop
    string counts only when a token after the first min_tokens completes it."""

    def __init__(self, tokenizer, stop: list[str], min_tokens: int = 0):
        self.tokenizer = tokenizer
        self.stop = [s for s in stop if s]
        self.min_tokens = min_tokens
        self.min_chars: int | None = None  # characters of the first min_tokens tokens' text, once known
        self.num_sent_chars = 0
        self.text = ""

    def update(self, output_ids: list[int], is_final: bool) -> tuple[str, bool]:
        """-> (text delta to send, whether a stop string was found). On a stop string the text
        is cut just before it and is final."""
        self.text = self.tokenizer.decode(output_ids)
        if self.min_chars is None and len(output_ids) > self.min_tokens:
            head = self.tokenizer.decode(output_ids[: self.min_tokens])
            self.min_chars = len(head) - head.endswith("\ufffd")  # a character cut at min_tokens ends later
        for s in self.stop if self.min_chars is not None else ():
            at = self.text.find(s, max(0, self.min_chars - len(s) + 1))  # must end past the first min_chars
            if at >= 0:
                self.text = self.text[:at]
                return self._flush(len(self.text)), True
        end = len(self.text)
        if not is_final:
            if self.text.endswith("\ufffd"):
                end -= 1
            hold = max((len(s) - 1 for s in self.stop), default=0)
            end = max(self.num_sent_chars, end - hold)
        return self._flush(end), False

    def _flush(self, end: int) -> str:
        delta = self.text[self.num_sent_chars : end]
        self.num_sent_chars = max(self.num_sent_chars, end)
        return delta
