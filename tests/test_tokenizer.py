"""The incremental Detokenizer against the former full-decode algorithm (kept unchanged in
tools/detok_cost.py, which measures both, and used here as the reference): equal deltas and stop results for random ids fed in random growing commits, with and
without stop strings and min_tokens, on the byte tokenizer, on byte-level and SentencePiece-style
("▁") BPE tokenizers trained here, and on the Qwen tokenizer when its model is prepared."""

import importlib.util
import itertools
import json
import os
import subprocess
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from minedraft.runtime.tokenizer import ByteTokenizer, Detokenizer, FileTokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CORPUS = [  # accents, CJK, emoji: characters of 2 to 4 UTF-8 bytes, some split across tokens
    "The café's naïve crème brûlée, déjà vu for Zoë. Straße, façade, Ångström, ±½ “quoted”.",
    "今天天气很好，我们去公园散步吧。日本語のテキスト。한국어 문장입니다.",
    "Done 🎉🚀👍🏽, family 👨‍👩‍👧, flags 🇫🇷🇯🇵 ✨ and more 😀😃😄.",
    "def step(x: int) -> int:\n    return x * 2  # ünïcödé\n",
    "Привет, мир! Ελληνικά κείμενα. ¿Qué tal?",
]
ALPHABET = "".join(sorted(set("".join(CORPUS)))) + "\ufffd"


def load_tool(name: str):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "tools", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


FullDecode = load_tool("detok_cost").FullDecode  # the former Detokenizer, unchanged: the reference


def feed(detokenizer, ids: list[int], commits: list[int]) -> list[tuple[str, bool]]:
    """Each update's (delta, is_stop) as the scheduler calls it: one growing list, the last
    commit final, nothing after a stop string."""
    output_ids, results = [], []
    for size in commits:
        output_ids.extend(ids[len(output_ids) : len(output_ids) + size])
        results.append(detokenizer.update(output_ids, len(output_ids) == len(ids)))
        if results[-1][1]:
            break
    return results


def check_same_as_full_decode(tokenizer, data, ids: list[int]) -> None:
    """Random commits, stop strings (often cut from the text itself) and min_tokens."""
    commits = []
    while sum(commits) < len(ids) or not commits:  # 1 to 6 tokens each, as many as the ids hold
        commits.append(min(data.draw(st.integers(1, 6), label="commit"), len(ids) - sum(commits)))
    text = tokenizer.decode(ids)
    cut = st.tuples(st.integers(0, len(text)), st.integers(1, 4)).map(lambda p: text[p[0] : p[0] + p[1]])
    stop = data.draw(st.lists(st.one_of(cut, st.text(ALPHABET, max_size=3)), max_size=3), label="stop")
    min_tokens = data.draw(st.integers(0, len(ids) + 1), label="min_tokens")
    got = feed(Detokenizer(tokenizer, stop, min_tokens), ids, commits)
    assert got == feed(FullDecode(tokenizer, stop, min_tokens), ids, commits)
    if not stop:
        assert "".join(delta for delta, _ in got) == text


# Byte ids: whole characters, bytes of characters (split across commits when the commits cut
# them), any byte (invalid UTF-8 included) and the specials 256/257, which decode to nothing.
BYTE_IDS = st.lists(st.one_of(st.text(ALPHABET, max_size=4).map(lambda s: list(s.encode())),
                              st.lists(st.integers(0, 257), max_size=4),
                              st.lists(st.sampled_from([0xE4, 0xB8, 0xAD, 0xF0, 0x9F, 0x8E, 0x89, 0xC3, 0xA9, 0x80]),
                                       max_size=4)),
                    max_size=12).map(lambda pieces: [i for piece in pieces for i in piece])


@settings(max_examples=400, deadline=None, derandomize=True)
@given(ids=BYTE_IDS, data=st.data())
def test_byte_tokenizer_equals_full_decode(ids, data):
    check_same_as_full_decode(ByteTokenizer(), data, ids)


def test_a_character_split_across_commits_is_held_back_until_complete():
    detokenizer, ids = Detokenizer(ByteTokenizer(), []), list("a中🎉".encode())
    deltas = [detokenizer.update(ids[:n], n == len(ids))[0] for n in range(1, len(ids) + 1)]
    assert deltas == ["a", "", "", "中", "", "", "", "🎉"]


def test_the_state_stays_bounded_as_the_output_grows():
    """Linear time without a timed assertion: the ids decoded per update and the text kept do not
    grow with the output (tools/detok_cost.py measures the time)."""
    stop, text, sizes = ["</answer>", "\nUser:"], "".join(CORPUS * 20), itertools.cycle([1, 3, 5, 2, 4])
    ids, detokenizer, output_ids, sent = list(text.encode()), Detokenizer(ByteTokenizer(), stop), [], ""
    while len(output_ids) < len(ids):
        output_ids.extend(ids[len(output_ids) : len(output_ids) + next(sizes)])
        sent += detokenizer.update(output_ids, len(output_ids) == len(ids))[0]
        assert len(output_ids) - detokenizer.prefix_offset <= 32  # the emoji run, cut by every commit: 30
        assert len(detokenizer.text) <= max(map(len, stop))
    assert sent == text


def train_bpe(path, kind: str) -> tuple[FileTokenizer, int]:
    """-> (the tokenizer, its number of ids), a small BPE trained on CORPUS and saved to path."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    specials = ["<unk>", "<|end|>"]
    if kind == "byte_level":  # GPT-2 / Qwen style: characters of several bytes split across tokens
        tokenizer = Tokenizer(models.BPE())
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tokenizer.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=specials,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    else:  # SentencePiece style: "▁" for spaces, the first token's leading space dropped by the decoder
        tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
        tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
        tokenizer.decoder = decoders.Metaspace()
        trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=specials)
    tokenizer.train_from_iterator(CORPUS * 4, trainer)
    tokenizer.add_tokens(["<tool>"])  # an added token that is not special: decoded as its text
    tokenizer.save(str(path))
    return FileTokenizer(str(path)), tokenizer.get_vocab_size()


@pytest.fixture(scope="module", params=["byte_level", "metaspace"])
def bpe(request, tmp_path_factory):
    return train_bpe(tmp_path_factory.mktemp("bpe") / "tokenizer.json", request.param)


@pytest.fixture(scope="module")
def qwen():
    path = load_tool("detok_cost").find_qwen_tokenizer()
    if path is None:
        pytest.skip("the Qwen tokenizer.json is absent (~/.cache/minedraft/qwen2.5-coder-1.5b-instruct/**/, "
                    "written by `minedraft-runtime prepare`)")
    return FileTokenizer(path)


def file_ids(tokenizer: FileTokenizer, num_ids: int):
    """Encoded text and any ids (specials and ids past the vocabulary included)."""
    return st.lists(st.one_of(st.text(ALPHABET, max_size=8).map(tokenizer.encode),
                              st.lists(st.integers(0, num_ids + 2), max_size=4)),
                    max_size=8).map(lambda pieces: [i for piece in pieces for i in piece])


@settings(max_examples=150, deadline=None, derandomize=True)
@given(data=st.data())
def test_trained_bpe_tokenizers_equal_full_decode(bpe, data):
    tokenizer, num_ids = bpe
    check_same_as_full_decode(tokenizer, data, data.draw(file_ids(tokenizer, num_ids), label="ids"))


def test_byte_level_bpe_splits_characters_across_tokens(tmp_path):
    """Else the held-back "\ufffd" would go untested on the trained byte-level tokenizer."""
    tokenizer, _ = train_bpe(tmp_path / "tokenizer.json", "byte_level")
    ids = tokenizer.encode("".join(CORPUS))
    assert any(tokenizer.decode(ids[:n]).endswith("\ufffd") for n in range(len(ids)))


QWEN_TEXT = ("Sure! Here is the plan 🎉:\n1. Read the file `données.csv` (UTF-8, ~1,2 Mo).\n"
             "2. 计算每一列的平均值，然后画图。グラフは日本語で。\n3. Ship it 🚀👍🏽 — done ✅.\n"
             "```python\ndef mean(xs: list[float]) -> float:\n    return sum(xs) / len(xs)  # ünïcödé\n```\n"
             "Family 👨‍👩‍👧 and flags 🇫🇷🇯🇵; Привет, мир! Ελληνικά.")


@settings(max_examples=100, deadline=None, derandomize=True)
@given(data=st.data())
def test_qwen_tokenizer_equals_full_decode(qwen, data):
    ids = qwen.encode(QWEN_TEXT)
    start = data.draw(st.integers(0, len(ids)), label="start")
    ids = ids[start : start + 40]
    for _ in range(data.draw(st.integers(0, 3), label="num_inserted")):  # any id; 151643 on: specials
        ids.insert(data.draw(st.integers(0, len(ids)), label="at"), data.draw(st.integers(0, 151664), label="id"))
    check_same_as_full_decode(qwen, data, ids)


def test_detok_cost_tool_end_to_end(tmp_path):
    out = tmp_path / "detok_cost.json"
    done = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "detok_cost.py"), "--tokenizer", "bytes",
                           "--num-tokens", "300", "--window", "100", "--repeats", "1", "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr[-4000:]
    assert "texts equal (new, old, with and without stop strings, and one full decode): yes" in done.stdout
    report = json.loads(out.read_text())
    assert report["is_text_equal"] and report["num_tokens"] == 300
    assert [(w["start"], w["end"]) for w in report["windows"]] == [(0, 100), (100, 200), (200, 300)]
    keys = {f"{kind}{stop}_us_per_token" for kind in ("new", "old") for stop in ("", "_stop")}
    assert all(keys <= set(w) and all(w[k] > 0 for k in keys) for w in report["windows"])
    assert report["decode_floor_us_per_token"] > 0
