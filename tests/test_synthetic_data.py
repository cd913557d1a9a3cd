"""Tests for rwkvx_jax.data.synthetic: the passkey retrieval mix used by bench/paper_claim.py."""

import numpy as np
import pytest

from rwkvx_jax import ByteTokenizer
from rwkvx_jax.data import BinIdxTokens, TokenWindows
from rwkvx_jax.data.passkey import NEEDLE, QUESTION, TASK, PasskeyPromptBuilder
from rwkvx_jax.data.synthetic import RetrievalMix

CTX = 512
# Plain text with digits in it, so that avoiding the keys' digits is actually exercised.
PLAIN = np.frombuffer(
    b"".join(
        f"def f{i}(x):\n    return x * {i} + {i * 7919 % 100000}\n".encode() for i in range(4000)
    )
    + b"\0",
    np.uint8,
)


def make_mix(**kwargs):
    kwargs = {"seed": 3, "curriculum_windows": 40, **kwargs}
    return RetrievalMix(ByteTokenizer(), PLAIN, CTX, **kwargs)


def passkey_segments(mix, count):
    for index in range(count):
        tokens, segments = mix.window(index)
        for segment in segments:
            if segment.kind == "passkey":
                yield index, tokens, segment


def test_windows_are_deterministic_by_seed_and_random_access():
    a, b = make_mix(), make_mix()
    assert [a.window(i)[0] for i in (7, 0, 30)] == [b.window(i)[0] for i in (7, 0, 30)]
    assert a.window(5)[0] != make_mix(seed=4).window(5)[0]
    np.testing.assert_array_equal(a.tokens(12), b.tokens(12))
    assert not np.array_equal(a.tokens(12), make_mix(seed=4).tokens(12))


def test_every_window_has_ctx_tokens_and_contiguous_segments():
    mix = make_mix(plain_fraction=0.2)
    kinds = set()
    for index in range(80):
        tokens, segments = mix.window(index)
        assert len(tokens) == CTX
        assert segments[0].start == 0 and segments[-1].stop == CTX
        assert all(x.stop == y.start for x, y in zip(segments, segments[1:], strict=False))
        assert sum(s.kind == "passkey" for s in segments) <= 1
        for segment in segments:
            kinds.add((segment.kind, segment.start == 0))
            # Every segment ends a document.
            assert tokens[segment.stop - 1] == 0
    # Plain-only windows, documents opening a window and documents after plain text all occur.
    assert {("plain", True), ("passkey", True), ("passkey", False)} <= kinds


def test_passkey_document_is_the_evaluation_prompt_plus_answer():
    mix = make_mix()
    builder = PasskeyPromptBuilder(ByteTokenizer())
    found = 0
    for _, tokens, segment in passkey_segments(mix, 30):
        document = segment.document
        text = bytes(tokens[segment.start : segment.stop]).decode()
        key = document.key
        assert len(key) == 5 and key[0] != "0" and key.isdigit()
        assert document.tokens == tokens[segment.start : segment.stop]
        prompt = document.tokens[: document.answer_start]
        # The prompt is exactly what the evaluator builds for its length and needle position.
        needle = builder.needle(key)
        assert prompt[document.needle_start : document.needle_end] == needle
        assert text.startswith(TASK)
        assert text.endswith(f" {QUESTION} {key}.\0")
        # Key digits: twice on the one pass-key line (as the protocol writes it), once as the
        # answer, nowhere else in the window (plain text included).
        assert text.count(NEEDLE.format(key=key)) == 1
        assert text.count(f"{QUESTION} {key}.") == 1
        assert bytes(tokens).decode().count(key) == 3
        found += 1
    assert found > 20


def test_document_matches_prompt_builder_exactly():
    mix = make_mix()
    builder = PasskeyPromptBuilder(ByteTokenizer())
    for length, depth in ((300, 0.0), (400, 0.5), (512, 1.0)):
        document = mix.document(length, depth, "12345")
        prompt = builder.build(length - len(b" 12345.") - 1, depth, "12345")
        assert document.tokens == prompt.tokens + list(b" 12345.") + [0]
        assert document.needle_start == prompt.needle_start
        assert document.answer_start == len(prompt.tokens)
        # At most the requested length, short by less than one haystack sentence.
        assert length - 21 <= len(document.tokens) <= length


def test_lengths_follow_the_curriculum():
    mix = make_mix(curriculum_windows=40)
    assert mix.min_length == mix.shortest_document() == 251  # 243-byte prompt + " N." + end
    assert mix.longest_document(0) < mix.longest_document(20) < mix.longest_document(39) == CTX
    assert mix.longest_document(1000) == CTX
    lengths = {}
    for index, _, segment in passkey_segments(mix, 200):
        n = segment.stop - segment.start
        assert mix.min_length - 21 <= n <= mix.longest_document(index)
        lengths[index] = n
    late = [n for i, n in lengths.items() if i >= 40]
    assert max(late) > CTX - 40 and min(late) < mix.min_length + 60  # spans the whole range
    assert make_mix(curriculum_windows=0).longest_document(0) == CTX


def test_stream_and_binidx_read_back_as_the_windows(tmp_path):
    mix = make_mix()
    stream = mix.tokens(6)
    assert stream.shape == (6 * CTX + 1,) and stream[-1] == 0
    windows = TokenWindows(stream, CTX)
    assert len(windows) == 6
    for index in range(6):
        assert windows.window(index)[:CTX].tolist() == mix.window(index)[0]
    assert mix.write_binidx(tmp_path / "mix", 6) == 6 * CTX + 1
    on_disk = BinIdxTokens(str(tmp_path / "mix"))
    assert on_disk.dtype == np.uint8
    np.testing.assert_array_equal(on_disk[:], stream)


def test_invalid_settings_are_named():
    with pytest.raises(ValueError, match="ctx=200 is shorter than the shortest passkey"):
        RetrievalMix(ByteTokenizer(), PLAIN, 200)
    with pytest.raises(ValueError, match="min_length=100 is below"):
        make_mix(min_length=100)
    with pytest.raises(ValueError, match="plain_fraction must lie in"):
        make_mix(plain_fraction=1.5)
    with pytest.raises(ValueError, match="fewer than ctx"):
        RetrievalMix(ByteTokenizer(), PLAIN[:100], CTX)
    with pytest.raises(ValueError, match="1-D integer"):
        RetrievalMix(ByteTokenizer(), np.zeros((2, 600), np.uint8), CTX)


def test_documents_without_the_task_fit_short_windows():
    mix = RetrievalMix(ByteTokenizer(), PLAIN, 128, seed=1, task_probability=0.0)
    assert mix.min_length == 251 - len(TASK) == 105
    found = 0
    for index in range(40):
        tokens, segments = mix.window(index)
        assert len(tokens) == 128
        for segment in segments:
            if segment.kind != "passkey":
                continue
            text = bytes(tokens[segment.start : segment.stop]).decode()
            key = segment.document.key
            assert TASK not in text
            assert text.startswith(" The ")  # a haystack sentence or the pass-key line
            assert text.endswith(f" {QUESTION} {key}.\0")
            assert text.count(NEEDLE.format(key=key)) == 1
            assert bytes(tokens).decode().count(key) == 3
            found += 1
    assert found > 30
    # Long enough documents open with the task as often as asked (here: always or never).
    mixed = RetrievalMix(ByteTokenizer(), PLAIN, CTX, seed=1, task_probability=0.5)
    opens = {
        bytes(segment.document.tokens).decode().startswith(TASK)
        for _, _, segment in passkey_segments(mixed, 40)
    }
    assert opens == {True, False}
    document = mixed.document(200, 0.0, "12345", with_task=False)
    assert bytes(document.tokens[document.needle_start : document.needle_end]) == (
        b" " + NEEDLE.format(key="12345").encode()
    )
