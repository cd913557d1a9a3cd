"""Tokenizers: ids identical to the official TRIE_TOKENIZER, round trips, streaming, errors."""

import hashlib
import os
import random
import sysconfig

import numpy as np
import pytest
import rwkv
from rwkv.rwkv_tokenizer import TRIE_TOKENIZER

from rwkvx_jax import tokenizer as tk

OFFICIAL_VOCAB = os.path.join(os.path.dirname(rwkv.__file__), tk.WORLD_VOCAB_FILE)
SHIPPED_VOCAB = os.path.join(os.path.dirname(tk.__file__), "assets", tk.WORLD_VOCAB_FILE)

# Code point ranges for random text: scripts, controls, combining marks, emoji, astral planes.
CODE_POINT_RANGES = [
    (0x20, 0x7E),  # ASCII printable
    (0x00, 0x1F),  # C0 controls, NUL, \t \n \r among them
    (0x7F, 0x9F),  # DEL, C1 controls
    (0xA0, 0x24F),  # Latin-1, Latin Extended
    (0x300, 0x36F),  # combining diacritical marks
    (0x370, 0x4FF),  # Greek, Cyrillic
    (0x590, 0x6FF),  # Hebrew, Arabic
    (0x900, 0x97F),  # Devanagari
    (0x3000, 0x30FF),  # CJK punctuation, kana
    (0x4E00, 0x9FFF),  # CJK ideographs
    (0xAC00, 0xD7A3),  # Hangul
    (0xFE00, 0xFE0F),  # variation selectors
    (0x200B, 0x200F),  # zero-width space / joiner, direction marks
    (0x1F300, 0x1FAFF),  # emoji
    (0x10000, 0x10FFFF),  # anything astral
]
SNIPPETS = [
    " the",
    "\n\n",
    "    ",
    " " * 40,
    "def ",
    "的",
    "。",
    "🙂\u200d🙂",
    "e\u0301",
    "\r\n",
    "-" * 90,
]


def random_text(rng: random.Random, max_len: int = 120) -> str:
    parts = []
    for _ in range(rng.randrange(max_len + 1)):
        if rng.random() < 0.1:
            parts.append(rng.choice(SNIPPETS))
        else:
            low, high = rng.choice(CODE_POINT_RANGES)
            parts.append(chr(rng.randint(low, high)))
    return "".join(parts)


def random_bytes(rng: random.Random, max_len: int = 120) -> bytes:
    """Uniform bytes, or valid UTF-8 with stray, cut, overlong and surrogate sequences mixed in."""
    if rng.random() < 0.3:
        return rng.randbytes(rng.randrange(max_len + 1))
    data = bytearray(random_text(rng, max_len // 3).encode("utf-8"))
    broken = [b"\x80", b"\xbf", b"\xc3", b"\xe6\x97", b"\xf0\x9f\x99", b"\xc0\x80", b"\xed\xa0\x80"]
    for _ in range(rng.randrange(6)):
        position = rng.randrange(len(data) + 1)
        if data and rng.random() < 0.5:
            del data[position : position + rng.randrange(1, 3)]  # may cut a character
        else:
            data[position:position] = rng.choice(broken)
    return bytes(data)


THIRD_PARTY_DIRS = ("site-packages", "dist-packages")


def stdlib_sources(step: int) -> list[str]:
    """Every `step`-th .py file of the standard library, sorted, third-party packages excluded."""
    root = sysconfig.get_paths()["stdlib"]
    paths = []
    for directory, subdirectories, files in os.walk(root):
        subdirectories[:] = [
            d for d in subdirectories if d not in ("site-packages", "dist-packages")
        ]
        paths += [os.path.join(directory, f) for f in files if f.endswith(".py")]
    return sorted(paths)[::step]


@pytest.fixture(scope="module")
def official():
    return TRIE_TOKENIZER(OFFICIAL_VOCAB)


@pytest.fixture(scope="module")
def world():
    return tk.tokenizer_for_vocab(tk.WORLD_VOCAB_SIZE)


def assert_same_ids(ours: list[int], theirs: list[int], what: str):
    if ours != theirs:
        pairs = enumerate(zip(ours, theirs, strict=False))
        first = next((i for i, (a, b) in pairs if a != b), min(len(ours), len(theirs)))
        pytest.fail(
            f"{what}: ids differ at index {first}: ours {ours[first : first + 5]}, "
            f"official {theirs[first : first + 5]} (lengths {len(ours)}, {len(theirs)})"
        )


def check_stdlib(world, official, step: int):
    paths = stdlib_sources(step)
    assert len(paths) > 20, paths
    for path in paths:
        with open(path, "rb") as f:
            data = f.read()
        assert_same_ids(world.encode_bytes(data), official.encodeBytes(data), path)


def test_shipped_vocab_is_the_official_file():
    digests = []
    for path in (SHIPPED_VOCAB, OFFICIAL_VOCAB):
        with open(path, "rb") as f:
            digests.append(hashlib.sha256(f.read()).hexdigest())
    assert digests[0] == digests[1]


def test_token_table_matches_official(world, official):
    assert world.vocab_size == 65536 and world.end_of_document == 0
    assert max(official.idx2token) == 65529
    for token_id, token in official.idx2token.items():
        assert world.decode_bytes([token_id]) == token, token_id
    assert world.encode("\n\n") == [261]  # SPEC §7


def test_stdlib_sample_matches_official(world, official):
    check_stdlib(world, official, step=10)


@pytest.mark.slow  # 23 s on 2 cores: every file of the standard library (.ci/extended)
def test_whole_stdlib_matches_official(world, official):
    check_stdlib(world, official, step=1)


def test_random_text_matches_official_and_round_trips(world, official):
    rng = random.Random(0)
    for _ in range(400):
        text = random_text(rng)
        ids = world.encode(text)
        assert_same_ids(ids, official.encode(text), repr(text))
        assert world.decode(ids) == text


def test_random_bytes_match_official_and_round_trip(world, official):
    rng = random.Random(1)
    for _ in range(400):
        data = random_bytes(rng)
        ids = world.encode_bytes(data)
        assert_same_ids(ids, official.encodeBytes(data), repr(data))
        assert world.decode_bytes(ids) == data
        assert world.decode(ids) == data.decode("utf-8", errors="replace")


def test_empty_and_buffer_inputs(world):
    assert world.encode("") == [] and world.encode_bytes(b"") == []
    assert world.decode([]) == "" and world.decode_bytes([]) == b""
    ids = world.encode("Hello\n\n")
    assert world.encode_bytes(bytearray(b"Hello\n\n")) == ids
    assert world.encode_bytes(memoryview(b"Hello\n\n")) == ids
    assert world.decode(np.array(ids, dtype=np.int32)) == "Hello\n\n"
    assert world.decode(np.int64(261)) == "\n\n"


def test_chunked_encoding_matches_official(world, official, monkeypatch):
    # Small chunks put many chunk ends inside long tokens (runs of 128 spaces, 80 dashes).
    monkeypatch.setattr(world, "_chunk_bytes", 300)
    rng = random.Random(2)
    inputs = [b" " * 1000, b"-" * 777 + b"x", b"\n" * 500]
    inputs += [" ".join(random_text(rng, 400) for _ in range(8)).encode("utf-8") for _ in range(5)]
    inputs += [b"".join(random_bytes(rng) for _ in range(30)) for _ in range(5)]
    with open(stdlib_sources(1)[0], "rb") as f:
        inputs.append(f.read())
    for data in inputs:
        assert_same_ids(world.encode_bytes(data), official.encodeBytes(data), repr(data[:40]))


def test_decoding_any_id_never_raises(world):
    rng = random.Random(3)
    assert world.decode([0]) == "" and world.decode_bytes([0]) == b""
    assert world.decode_bytes(list(range(65530, 65536))) == b""  # ids the vocabulary leaves unused
    for _ in range(200):
        ids = [rng.randrange(65536) for _ in range(rng.randrange(50))]
        text = world.decode(ids)
        assert isinstance(text, str)
        assert len(world.decode_bytes(ids)) == sum(len(world.decode_bytes([i])) for i in ids)


@pytest.mark.parametrize("make", [lambda: tk.tokenizer_for_vocab(65536), tk.ByteTokenizer])
@pytest.mark.parametrize("bad_position", [0, 2])
def test_out_of_range_ids_are_named(make, bad_position):
    tokenizer = make()
    for bad in (-1, tokenizer.vocab_size, 70000):
        ids = [1, 2, 3]
        ids[bad_position] = bad
        for decode in (
            tokenizer.decode,
            tokenizer.decode_bytes,
            tokenizer.streaming_decoder().push,
        ):
            with pytest.raises(ValueError, match=rf"token id {bad} at position {bad_position}\b"):
                decode(ids)


def test_encode_type_errors(world):
    with pytest.raises(TypeError, match="encode_bytes"):
        world.encode(b"bytes")
    with pytest.raises(TypeError, match="encode\\(\\)"):
        world.encode_bytes("text")


def split_utf8_ids(world, text: str, rng: random.Random) -> list[int]:
    """Ids of `text` tokenized in random byte segments, so tokens end inside characters."""
    data, ids, start = text.encode("utf-8"), [], 0
    while start < len(data):
        end = start + rng.randint(1, 4)
        ids += world.encode_bytes(data[start:end])
        start = end
    return ids


def test_streaming_never_splits_characters(world):
    rng = random.Random(4)
    texts = ["日本語のテキスト 🙂\u200d🙂 naïve e\u0301 한국어 Ελληνικά"]
    texts += [random_text(rng) for _ in range(100)]
    for text in texts:
        ids = split_utf8_ids(world, text, rng)
        assert world.decode(ids) == text
        stream, shown = world.streaming_decoder(), ""
        for token_id in ids:
            piece = stream.push(token_id)
            assert "\ufffd" not in piece or "\ufffd" in text
            shown += piece
            assert text.startswith(shown)
        assert shown + stream.flush() == text


def test_streaming_equals_whole_decode_on_random_ids(world):
    rng = random.Random(5)
    # Random ids include tokens that are fragments of UTF-8 characters and invalid bytes.
    for _ in range(200):
        ids = [rng.randrange(65536) for _ in range(rng.randrange(60))]
        stream, pieces, start = world.streaming_decoder(), [], 0
        while start < len(ids):
            end = start + rng.randint(1, 3)
            pieces.append(stream.push(ids[start:end]))
            start = end
        pieces.append(stream.flush())
        assert "".join(pieces) == world.decode(ids), ids


def test_streaming_flush_reports_incomplete_character(world):
    stream = world.streaming_decoder()
    lead = world.encode_bytes(b"\xe6")  # first byte of a 3-byte character
    assert stream.push(lead) == ""
    assert stream.flush() == "\ufffd"


def test_byte_tokenizer_round_trip():
    tokenizer = tk.ByteTokenizer()
    assert tokenizer.vocab_size == 256 and tokenizer.end_of_document == 0
    assert tokenizer.encode("é\n") == [0xC3, 0xA9, 0x0A]
    rng = random.Random(6)
    for _ in range(100):
        data = random_bytes(rng)
        assert tokenizer.decode_bytes(tokenizer.encode_bytes(data)) == data
        text = random_text(rng)
        assert tokenizer.decode(tokenizer.encode(text)) == text
        ids = split_utf8_ids(tokenizer, text, rng)
        stream = tokenizer.streaming_decoder()
        assert "".join(stream.push(i) for i in ids) + stream.flush() == text


def test_tokenizer_for_vocab():
    world = tk.tokenizer_for_vocab(65536)
    assert isinstance(world, tk.WorldTokenizer) and tk.tokenizer_for_vocab(65536) is world
    assert isinstance(tk.tokenizer_for_vocab(256), tk.ByteTokenizer)
    with pytest.raises(ValueError, match=r"vocab_size=50277.*65536.*256"):
        tk.tokenizer_for_vocab(50277)


def write_vocab(tmp_path, extra_lines: list[str], skip_byte: int | None = None) -> str:
    lines = [f"{b + 1} {bytes([b])!r} 1" for b in range(256) if b != skip_byte]
    path = tmp_path / "vocab.txt"
    path.write_text("\n".join(lines + extra_lines) + "\n", encoding="utf-8")
    return str(path)


def test_custom_vocab_longest_match(tmp_path):
    path = write_vocab(tmp_path, ["300 'ab' 2", "301 'abc' 3", "302 'bcd' 3", "303 '世' 3"])
    tokenizer = tk.WorldTokenizer(path)
    a, d = ord("a") + 1, ord("d") + 1
    assert tokenizer.encode("abcd") == [301, d]  # greedy, not the 2-token optimum 'a' 'bcd'
    assert tokenizer.encode("aab世") == [a, 300, 303]
    assert tokenizer.decode([301, 302, 303]) == "abcbcd世"


@pytest.mark.parametrize(
    "line, message",
    [
        ("300 'abc' 2", r"vocab.txt:257: token 'abc' is 3 bytes but the line says 2"),
        ("300 '世' 1", r"vocab.txt:257: token '世' is 3 bytes but the line says 1"),
        ("300 __import__('os').getcwd() 3", r"vocab.txt:257: token is not a str or bytes literal"),
        ("300 12 2", r"vocab.txt:257: token must be a str or bytes literal"),
        ("300 'a' 1", r"vocab.txt:257: token b'a' already has id 98"),
        ("65536 'xy' 2", r"vocab.txt:257: token id 65536 is outside \[1, 65536\)"),
        ("1 'xy' 2", r"vocab.txt:257: token id 1 appears twice"),
        ("300 'xy'", r"vocab.txt:257: expected `id repr\(token\) length`"),
        ("300 'xy' two", r"vocab.txt:257: id and length must be integers"),
        ("300 '' 0", r"vocab.txt:257: token 300 is empty"),
    ],
)
def test_bad_vocab_lines_are_named(tmp_path, line, message):
    with pytest.raises(tk.VocabError, match=message):
        tk.load_world_vocab(write_vocab(tmp_path, [line]))


def test_vocab_missing_a_byte_is_rejected(tmp_path):
    with pytest.raises(tk.VocabError, match=r"no single-byte token for byte\(s\) 0x41"):
        tk.load_world_vocab(write_vocab(tmp_path, [], skip_byte=0x41))
