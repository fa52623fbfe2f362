"""What the detokenizer costs per committed token as a request's output grows: N tokens of a long
mixed text (prose with accents, code, CJK, emoji) committed 1 to 5 at a time, as the scheduler
commits them, through runtime.tokenizer.Detokenizer and through FullDecode (the former algorithm:
decode the whole output and search the whole text on every commit), with and without stop
strings. Mean microseconds per token in successive windows of the output: a flat row is linear
time. The bound is one decode() of each commit's ids alone, which no detokenizer goes below.

    python tools/detok_cost.py
    python tools/detok_cost.py --tokenizer bytes --num-tokens 8000 --window 1000 --out out/detok_cost.json
    python tools/detok_cost.py --tokenizer ~/.cache/minedraft/qwen2.5-coder-1.5b-instruct/float32/tokenizer.json
"""

from __future__ import annotations

import argparse
import functools
import gc
import glob
import json
import os
import random
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from minedraft.runtime.tokenizer import ByteTokenizer, Detokenizer, FileTokenizer  # noqa: E402

QWEN_DIR = "~/.cache/minedraft/qwen2.5-coder-1.5b-instruct"  # where `prepare` keeps the known model
STOP = ["</answer>", "\nUser:", "🛑"]  # absent from the text: searched on every commit, never found
PARAGRAPHS = [
    "Paragraph {i}: the café's naïve crème brûlée costs €{i}.50, déjà vu for Zoë and Ångström. ",
    "第{i}段：今天天气很好，我们去公园散步吧。日本語のテキストも少し。한국어 문장입니다. ",
    "Status {i}: 🎉🚀 done 👍🏽, family 👨‍👩‍👧 and flags 🇫🇷🇯🇵 ✨\n",
    "def step_{i}(x: int) -> int:\n    return x * {i}  # ünïcödé — “quoted” ±½\n",
    "Привет, мир {i}! Ελληνικά κείμενα. ¿Qué tal? Straße, façade, coöperate.\n",
]


class FullDecode:
    """The former Detokenizer (quadratic): decodes the whole output and searches the whole text
    on every update. Kept here, unchanged, as the reference the new one is measured against."""

    def __init__(self, tokenizer, stop: list[str], min_tokens: int = 0):
        self.tokenizer = tokenizer
        self.stop = [s for s in stop if s]
        self.min_tokens = min_tokens
        self.min_chars: int | None = None
        self.num_sent_chars = 0
        self.text = ""

    def update(self, output_ids: list[int], is_final: bool) -> tuple[str, bool]:
        self.text = self.tokenizer.decode(output_ids)
        if self.min_chars is None and len(output_ids) > self.min_tokens:
            head = self.tokenizer.decode(output_ids[: self.min_tokens])
            self.min_chars = len(head) - head.endswith("\ufffd")
        for s in self.stop if self.min_chars is not None else ():
            at = self.text.find(s, max(0, self.min_chars - len(s) + 1))
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


def find_qwen_tokenizer() -> str | None:
    """The Qwen tokenizer.json under the model cache, or None when the model is not prepared."""
    root = os.path.expanduser(QWEN_DIR)
    found = sorted(glob.glob(os.path.join(root, "**", "tokenizer.json"), recursive=True))
    return found[0] if found else None


def load_tokenizer(name: str):
    return ByteTokenizer() if name == "bytes" else FileTokenizer(os.path.expanduser(name))


def make_ids(tokenizer, num_tokens: int) -> list[int]:
    """The first num_tokens ids of a long mixed text (it must not contain a stop string)."""
    lines, ids = [], []
    while len(ids) < num_tokens:
        lines += [PARAGRAPHS[i % len(PARAGRAPHS)].format(i=i) for i in range(len(lines), 2 * len(lines) + 16)]
        ids = tokenizer.encode("".join(lines))
    assert not any(s in "".join(lines) for s in STOP)
    return ids[:num_tokens]


def make_commits(num_tokens: int, seed: int) -> list[int]:
    """Commit sizes of 1 to 5 tokens that add up to num_tokens."""
    rng, commits = random.Random(seed), []
    while sum(commits) < num_tokens:
        commits.append(min(rng.randint(1, 5), num_tokens - sum(commits)))
    return commits


def run_once(make, ids: list[int], commits: list[int], window: int) -> tuple[list[float], str]:
    """-> (seconds spent in update() per window of the output, the text sent). A commit counts in
    the window of its first token."""
    detokenizer, output_ids, pieces = make(), [], []
    seconds = [0.0] * -(-len(ids) // window)
    for size in commits:
        start = len(output_ids)
        output_ids.extend(ids[start : start + size])
        began = time.perf_counter()
        delta, is_stop = detokenizer.update(output_ids, len(output_ids) == len(ids))
        seconds[start // window] += time.perf_counter() - began
        pieces.append(delta)
        assert not is_stop, "a stop string was found in the text"
    return seconds, "".join(pieces)


def measure(make, ids: list[int], commits: list[int], window: int, repeats: int) -> tuple[list[float], str]:
    """-> (median microseconds per token in each window over the repeats, the text sent)."""
    runs = []
    gc.disable()  # a collection landing in one window would read as that window's cost
    try:
        for _ in range(repeats):
            runs.append(run_once(make, ids, commits, window))
            gc.collect()
    finally:
        gc.enable()
    num_in = [min(window, len(ids) - w * window) for w in range(len(runs[0][0]))]
    us = [statistics.median(r[0][w] for r in runs) * 1e6 / num_in[w] for w in range(len(num_in))]
    return us, runs[0][1]


def decode_floor_us(tokenizer, ids: list[int], commits: list[int], repeats: int) -> float:
    """Microseconds per token of one decode() of each commit's ids alone."""
    slices, start = [], 0
    for size in commits:
        slices.append(ids[start : start + size])
        start += size
    best = float("inf")
    for _ in range(repeats):
        began = time.perf_counter()
        for piece in slices:
            tokenizer.decode(piece)
        best = min(best, time.perf_counter() - began)
    return best * 1e6 / len(ids)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokenizer", help="'bytes' or a tokenizer.json (default: Qwen's when prepared, else bytes)")
    parser.add_argument("--num-tokens", type=int, default=4000, help="output tokens per request")
    parser.add_argument("--window", type=int, default=500, help="tokens per row of the table")
    parser.add_argument("--repeats", type=int, default=3, help="passes per variant; the median is reported")
    parser.add_argument("--seed", type=int, default=0, help="seeds the commit sizes")
    parser.add_argument("--out", help="write the results as JSON to this file")
    args = parser.parse_args()
    name = args.tokenizer or find_qwen_tokenizer() or "bytes"
    tokenizer = load_tokenizer(name)
    ids = make_ids(tokenizer, args.num_tokens)
    commits = make_commits(len(ids), args.seed)
    columns, texts = {}, {}
    for label, stop in (("", []), ("_stop", STOP)):
        for kind, cls in (("new", Detokenizer), ("old", FullDecode)):
            make, key = functools.partial(cls, tokenizer, stop), f"{kind}{label}"
            columns[key], texts[key] = measure(make, ids, commits, args.window, args.repeats)
    is_equal = len(set(texts.values())) == 1 and texts["new"] == tokenizer.decode(ids)
    floor_us = decode_floor_us(tokenizer, ids, commits, args.repeats)
    rows = [{"start": w * args.window, "end": min((w + 1) * args.window, len(ids)),
             **{f"{key}_us_per_token": us[w] for key, us in columns.items()}} for w in range(len(columns["new"]))]

    print(f"tokenizer: {name}; {len(ids)} tokens in {len(commits)} commits of 1-5; "
          f"stop strings {STOP!r} (never found); median of {args.repeats}")
    print(f"{'tokens':>11} {'new us/tok':>11} {'old us/tok':>11} {'new+stop':>9} {'old+stop':>9}")
    for row in rows:
        print(f"{row['start']:>5}-{row['end']:<5} {row['new_us_per_token']:>11.2f} {row['old_us_per_token']:>11.2f} "
              f"{row['new_stop_us_per_token']:>9.2f} {row['old_stop_us_per_token']:>9.2f}")
    print(f"bound: one decode() of each commit's ids alone: {floor_us:.2f} us/token")
    print(f"texts equal (new, old, with and without stop strings, and one full decode): {'yes' if is_equal else 'NO'}")
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump({"args": vars(args), "tokenizer": name, "num_tokens": len(ids), "num_commits": len(commits),
                       "stop": STOP, "windows": rows, "decode_floor_us_per_token": floor_us,
                       "is_text_equal": is_equal}, f, indent=2, ensure_ascii=False)
    return 0 if is_equal else 1


if __name__ == "__main__":
    sys.exit(main())
