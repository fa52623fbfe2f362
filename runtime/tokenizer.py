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
    string counts only when a token after the first min_tokens completes it.

    Linear in the output: each update decodes only the new ids plus a window that starts at
    least one already-decoded token before them (so a decoder's first-token rules, such as a
    SentencePiece leading-space strip, apply as in a full decode) and takes the text difference;
    a stop string is searched only where it could end in new text. Positions count characters
    of the full decoded text, which is never built: `text` holds its unsent settled part."""

    def __init__(self, tokenizer, stop: list[str], min_tokens: int = 0):
        self.tokenizer = tokenizer
        self.stop = [s for s in stop if s]
        self.max_hold_chars = max((len(s) - 1 for s in self.stop), default=0)  # a stop string's tail
        self.min_tokens = min_tokens
        self.min_chars: int | None = None  # characters of the first min_tokens tokens' text, once known
        self.num_ids = 0  # ids read so far
        self.prefix_offset = 0  # window start: ids[prefix_offset:read_offset] are decoded context
        self.read_offset = 0  # ids[:read_offset] decode to settled text (not ending in "\ufffd")
        self.num_prefix_chars = 0  # len(decode(ids[prefix_offset:read_offset]))
        self.num_settled_chars = 0  # len(decode(ids[:read_offset]))
        self.num_searched_chars = 0  # settled text already searched for stop strings
        self.num_sent_chars = 0
        self.text_start = 0  # full-text position of text[0]
        self.text = ""  # the settled text from text_start on: what is not sent yet
        self.is_stopped = False

    def update(self, output_ids: list[int], is_final: bool) -> tuple[str, bool]:
        """-> (text delta to send, whether a stop string was found). On a stop string the text
        is cut just before it and is final. output_ids only grows between calls."""
        assert len(output_ids) >= self.num_ids, "output ids only grow"
        if self.is_stopped:
            return "", True
        # 1. The new ids' text: decode the window, drop its context's text; it may still change
        #    while it ends in "\ufffd" (an incomplete character), so it settles only after that.
        self.num_ids = len(output_ids)
        window = self.tokenizer.decode(output_ids[self.prefix_offset : self.num_ids])
        unsettled = window[self.num_prefix_chars :]
        if unsettled and not unsettled.endswith("\ufffd"):
            self.text += unsettled
            self.num_settled_chars += len(unsettled)
            self.num_prefix_chars = len(self.tokenizer.decode(output_ids[self.read_offset : self.num_ids]))
            self.prefix_offset, self.read_offset, unsettled = self.read_offset, self.num_ids, ""
        text = self.text + unsettled  # the full text from text_start
        num_chars = self.text_start + len(text)
        # 2. Stop strings: only where one could end past both the searched text and min_chars.
        if self.min_chars is None and self.num_ids > self.min_tokens:
            head = self.tokenizer.decode(output_ids[: self.min_tokens])  # once per request
            self.min_chars = len(head) - head.endswith("\ufffd")  # a character cut at min_tokens ends later
        if self.min_chars is not None:
            for s in self.stop:
                start = max(self.min_chars, self.num_searched_chars) - len(s) + 1
                at = text.find(s, max(0, start - self.text_start))
                if at >= 0:
                    self.is_stopped = True
                    return self._flush(text, self.text_start + at), True
            self.num_searched_chars = self.num_settled_chars
        # 3. Send all but an incomplete character and the tail that could start a stop string.
        end = num_chars
        if not is_final:
            end -= text.endswith("\ufffd")
            end = max(self.num_sent_chars, end - self.max_hold_chars)
        delta = self._flush(text, end)
        # 4. Keep only the settled text still unsent: a stop string found later starts there, as
        #    the hold-back never sends the first characters of one that new text could complete.
        keep_from = min(self.num_sent_chars, self.num_settled_chars)
        if keep_from > self.text_start:
            self.text = self.text[keep_from - self.text_start :]
            self.text_start = keep_from
        return delta, False

    def _flush(self, text: str, end: int) -> str:
        delta = text[self.num_sent_chars - self.text_start : end - self.text_start]
        self.num_sent_chars = max(self.num_sent_chars, end)
        return delta
