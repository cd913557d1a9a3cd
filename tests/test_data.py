"""Tests for rwkvx_jax.data: binidx files, windows and orders, the grain pipeline, corpora."""

import json
import os
import struct
import sysconfig

import grain
import numpy as np
import orbax.checkpoint as ocp
import pytest

from rwkvx_jax.data import (
    BinIdxError,
    BinIdxTokens,
    TokenWindows,
    jsonl_documents,
    magic_prime,
    magic_prime_window,
    make_train_iterator,
    pack_documents,
    stdlib_corpus_tokens,
    stdlib_source_paths,
    write_binidx,
)

DOCUMENTS = [[5, 6, 7, 0], [8, 0], [9, 10, 11, 65535, 0]]


def take(iterator, n):
    return [next(iterator)["tokens"] for _ in range(n)]


# ---------------------------------------------------------------- binidx


@pytest.mark.parametrize(("dtype", "code"), [(np.uint16, 8), (np.int32, 4)])
def test_binidx_header_field_by_field(tmp_path, dtype, code):
    prefix = str(tmp_path / "corpus")
    assert write_binidx(prefix, DOCUMENTS, dtype=dtype) == 11
    assert sorted(os.listdir(tmp_path)) == ["corpus.bin", "corpus.idx"]  # no temp files left
    idx = (tmp_path / "corpus.idx").read_bytes()
    itemsize = np.dtype(dtype).itemsize
    assert idx[0:9] == b"MMIDIDX\x00\x00"
    assert struct.unpack("<Q", idx[9:17]) == (1,)  # version
    assert idx[17] == code  # dtype code
    assert struct.unpack("<Q", idx[18:26]) == (3,)  # number of items (documents)
    assert struct.unpack("<Q", idx[26:34]) == (4,)  # doc_idx entries
    assert struct.unpack("<3i", idx[34:46]) == (4, 2, 5)  # sizes, int32
    assert struct.unpack("<3q", idx[46:70]) == (0, 4 * itemsize, 6 * itemsize)  # byte pointers
    assert struct.unpack("<4q", idx[70:102]) == (0, 1, 2, 3)  # doc_idx
    assert len(idx) == 102
    flat = sum(DOCUMENTS, [])
    assert (tmp_path / "corpus.bin").read_bytes() == np.asarray(flat, dtype).astype(
        np.dtype(dtype).newbyteorder("<")
    ).tobytes()

    tokens = BinIdxTokens(prefix)
    assert len(tokens) == 11 and tokens.dtype == np.dtype(dtype)
    np.testing.assert_array_equal(tokens[:], flat)
    np.testing.assert_array_equal(tokens[4:7], flat[4:7])
    assert tokens[10] == 0
    np.testing.assert_array_equal(np.asarray(tokens), flat)
    assert tokens.num_documents == 3
    for i, document in enumerate(DOCUMENTS):
        np.testing.assert_array_equal(tokens.document(i), document)


def test_binidx_empty_and_bytes_documents(tmp_path):
    write_binidx(tmp_path / "empty", [])
    assert len(BinIdxTokens(tmp_path / "empty")) == 0
    write_binidx(tmp_path / "bytes", [b"ab\0", b"c\0"], dtype=np.uint8)
    np.testing.assert_array_equal(BinIdxTokens(tmp_path / "bytes")[:], [97, 98, 0, 99, 0])


def test_write_binidx_rejects_ids_outside_dtype(tmp_path):
    with pytest.raises(ValueError, match=r"document 1: token ids span \[0, 70000\]"):
        write_binidx(tmp_path / "x", [[1, 0], [70000, 0]])
    assert os.listdir(tmp_path) == []


def _corrupt(path, offset, data):
    raw = bytearray(path.read_bytes())
    raw[offset : offset + len(data)] = data
    path.write_bytes(bytes(raw))


@pytest.mark.parametrize(
    ("suffix", "offset", "data", "message"),
    [
        (".idx", 0, b"XX", r"corpus\.idx: magic .* expected b'MMIDIDX"),
        (".idx", 9, struct.pack("<Q", 2), r"corpus\.idx: version 2, expected 1"),
        (".idx", 17, bytes([6]), r"corpus\.idx: dtype code 6, expected an integer token type"),
    ],
)
def test_binidx_reader_rejects_bad_header(tmp_path, suffix, offset, data, message):
    write_binidx(tmp_path / "corpus", DOCUMENTS)
    _corrupt(tmp_path / f"corpus{suffix}", offset, data)
    with pytest.raises(BinIdxError, match=message):
        BinIdxTokens(tmp_path / "corpus")


@pytest.mark.parametrize(
    ("suffix", "message"),
    [
        (".bin", r"corpus\.bin: 20 bytes, expected 22 .*truncated"),
        (".idx", r"corpus\.idx: 100 bytes, expected 102 .*truncated"),
    ],
)
def test_binidx_reader_rejects_truncated_files(tmp_path, suffix, message):
    write_binidx(tmp_path / "corpus", DOCUMENTS)
    path = tmp_path / f"corpus{suffix}"
    path.write_bytes(path.read_bytes()[:-2])
    with pytest.raises(BinIdxError, match=message):
        BinIdxTokens(tmp_path / "corpus")


def test_binidx_reader_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing.idx"):
        BinIdxTokens(tmp_path / "nothing")


# ---------------------------------------------------------------- windows and orders


def test_windows_are_contiguous_overlapping_slices():
    windows = TokenWindows(np.arange(103, dtype=np.uint16), ctx=10)
    assert len(windows) == 10  # (103 - 1) // 10
    for i in range(len(windows)):
        sample = windows[i]["tokens"]
        assert sample.dtype == np.int32
        np.testing.assert_array_equal(sample, np.arange(i * 10, i * 10 + 11))
    with pytest.raises(IndexError):
        windows[10]
    assert len(TokenWindows(np.arange(101), ctx=10)) == 10  # last window ends exactly at the end
    assert len(TokenWindows(np.arange(100), ctx=10)) == 9


def _is_prime(n):
    return n >= 2 and all(n % d for d in range(2, int(n**0.5) + 1))


@pytest.mark.parametrize(("num_tokens", "ctx"), [(30, 10), (1000, 10), (4097, 4), (12345, 7)])
def test_magic_prime_rule(num_tokens, ctx):
    bound = num_tokens // ctx - 1
    expected = max(p for p in range(2, bound + 1) if p % 3 == 2 and _is_prime(p))
    assert magic_prime(num_tokens, ctx) == expected


def test_magic_prime_matches_rwkv_lm_published_values():
    # make_data.py's output for MiniPile (1,498,226,207 tokens) and the 75B-token set, as used in
    # RWKV-LM's demo-training scripts.
    assert magic_prime(1498226207, 512) == 2926181
    assert magic_prime(1498226207, 2048) == 731531
    assert magic_prime(74958479689, 512) == 146403263
    with pytest.raises(ValueError, match="no magic prime"):
        magic_prime(29, 10)


@pytest.mark.parametrize("p", [2, 5, 11, 89, 1013, 2926181])
def test_magic_prime_order_visits_each_window_once(p):
    steps = min(p, 5000)
    start = p * 3 + 7  # any run of p consecutive samples is a permutation
    if steps == p:
        assert sorted(magic_prime_window(s, p) for s in range(p)) == list(range(p))
        assert sorted(magic_prime_window(s, p) for s in range(start, start + p)) == list(range(p))
    else:  # large prime: injective on a long prefix, all in range
        seen = {magic_prime_window(s, p) for s in range(steps)}
        assert len(seen) == steps and max(seen) < p


def test_magic_prime_window_formula_and_scatter():
    p = 2926181
    factor = int(p * ((5**0.5 - 1) / 2))
    big = 10**12  # Python ints: no overflow far past 2**64 / s**3
    assert magic_prime_window(big, p) == (factor * pow(big + 1, 3, p)) % p
    assert [magic_prime_window(s, 89) for s in range(4)] != [0, 1, 8, 27]


# ---------------------------------------------------------------- the grain pipeline


def _iterator(tokens=None, **kwargs):
    tokens = np.arange(2000, dtype=np.int32) if tokens is None else tokens
    options = dict(ctx=8, batch_size=4, seed=0, shard_index=0, shard_count=1)
    return make_train_iterator(tokens, **{**options, **kwargs})


def test_sequential_batches_are_windows_in_order():
    batches = take(_iterator(order="sequential", prefetch=0), 2)
    assert batches[0].shape == (4, 9) and batches[0].dtype == np.int32
    starts = np.concatenate(batches)[:, 0]
    np.testing.assert_array_equal(starts, np.arange(8) * 8)
    np.testing.assert_array_equal(np.diff(batches[1], axis=1), 1)


def test_magic_prime_batches_follow_the_official_order():
    batches = np.concatenate(take(_iterator(order="magic_prime"), 3))
    p = magic_prime(2000, 8)
    np.testing.assert_array_equal(batches[:, 0], [magic_prime_window(k, p) * 8 for k in range(12)])


def test_shuffle_is_deterministic_per_seed_and_covers_an_epoch():
    np.testing.assert_array_equal(take(_iterator(seed=3), 3), take(_iterator(seed=3), 3))
    assert not np.array_equal(take(_iterator(seed=3), 3), take(_iterator(seed=4), 3))
    # 2000 tokens at ctx 8 are 249 windows; one epoch in batches of 3 is 83 batches.
    epoch = np.concatenate([b["tokens"] for b in _iterator(num_epochs=1, batch_size=3)])
    assert sorted(epoch[:, 0] // 8) == list(range(249))
    next_epoch = np.concatenate(take(_iterator(num_epochs=2, batch_size=3), 166)[83:])
    assert sorted(next_epoch[:, 0] // 8) == list(range(249))
    assert not np.array_equal(epoch, next_epoch)  # reshuffled


@pytest.mark.parametrize("order", ["shuffle", "magic_prime"])
def test_shards_are_disjoint_slices_of_the_global_batch(order):
    full = take(_iterator(order=order, batch_size=6), 4)
    hosts = [
        take(_iterator(order=order, batch_size=3, shard_index=h, shard_count=2), 4) for h in (0, 1)
    ]
    for step in range(4):
        np.testing.assert_array_equal(np.concatenate([hosts[0][step], hosts[1][step]]), full[step])
    starts = [set(np.concatenate(h)[:, 0]) for h in hosts]
    assert not starts[0] & starts[1]


def test_finite_epochs_drop_the_partial_global_batch():
    assert len(list(_iterator(order="sequential", num_epochs=1, batch_size=100))) == 2
    with pytest.raises(ValueError, match="cannot fill one global batch"):
        _iterator(num_epochs=1, batch_size=200, shard_count=2)


@pytest.mark.parametrize("order", ["shuffle", "magic_prime", "sequential"])
def test_iterator_state_resumes_exactly(order):
    iterator = _iterator(order=order)
    take(iterator, 3)
    state = json.loads(json.dumps(iterator.get_state()))  # as orbax/grain stores it
    expected = take(iterator, 3)
    resumed = _iterator(order=order)
    resumed.set_state(state)
    np.testing.assert_array_equal(take(resumed, 3), expected)


def test_orbax_checkpoint_of_iterator(tmp_path):
    iterator = _iterator()
    take(iterator, 2)
    with ocp.CheckpointManager(tmp_path / "ckpt") as manager:
        manager.save(2, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(iterator)))
        manager.wait_until_finished()
    expected = take(iterator, 2)
    resumed = _iterator()
    with ocp.CheckpointManager(tmp_path / "ckpt") as manager:
        restore = grain.checkpoint.CheckpointRestore(resumed)
        manager.restore(2, args=ocp.args.Composite(data=restore))
    np.testing.assert_array_equal(take(resumed, 2), expected)


def test_iterator_reads_binidx(tmp_path):
    documents = [list(range(1, 50)) + [0] for _ in range(10)]
    write_binidx(tmp_path / "c", documents)
    from_file = take(_iterator(BinIdxTokens(tmp_path / "c"), order="sequential"), 2)
    in_memory = take(_iterator(pack_documents(documents), order="sequential"), 2)
    np.testing.assert_array_equal(from_file, in_memory)


# ---------------------------------------------------------------- corpora


class CharTokenizer:
    end_of_document = 0

    def encode(self, text):
        return [ord(c) for c in text]


def test_jsonl_documents_pack_and_binidx(tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_text('{"text": "ab"}\n\n{"text": "c", "meta": 1}\n', encoding="utf-8")
    documents = list(jsonl_documents(path, CharTokenizer()))
    assert documents == [[97, 98, 0], [99, 0]]
    np.testing.assert_array_equal(pack_documents(documents), [97, 98, 0, 99, 0])
    write_binidx(tmp_path / "docs", jsonl_documents(path, CharTokenizer()))
    np.testing.assert_array_equal(BinIdxTokens(tmp_path / "docs")[:], [97, 98, 0, 99, 0])
    path.write_text('{"body": "x"}\n', encoding="utf-8")
    assert list(jsonl_documents(path, CharTokenizer(), field="body")) == [[120, 0]]


@pytest.mark.parametrize(
    ("third_line", "message"),
    [
        ('{"text": "unterminated}', "invalid JSON"),
        ('["text"]', "expected a JSON object, got list"),
        ('{"txt": "x"}', "expected a string field 'text', found no such key"),
        ('{"text": 3}', "expected a string field 'text', found int"),
    ],
)
def test_jsonl_bad_line_names_file_and_line(tmp_path, third_line, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(f'{{"text": "a"}}\n{{"text": "b"}}\n{third_line}\n', encoding="utf-8")
    with pytest.raises(ValueError, match=rf"bad\.jsonl:3: {message}"):
        list(jsonl_documents(path, CharTokenizer()))


def test_stdlib_corpus_is_deterministic_byte_documents():
    paths = stdlib_source_paths()
    assert paths == sorted(paths) and "os.py" in paths
    assert not any("site-packages" in p or "dist-packages" in p for p in paths)
    tokens = stdlib_corpus_tokens(max_bytes=300_000)
    assert tokens.dtype == np.uint8 and len(tokens) == 300_000
    np.testing.assert_array_equal(tokens, stdlib_corpus_tokens(max_bytes=300_000))
    # Zeros only separate documents: the segments are the files, in path order.
    segments = tokens.tobytes().split(b"\0")[:-1]
    root = sysconfig.get_paths()["stdlib"]
    for path, segment in zip(paths, segments, strict=False):
        with open(os.path.join(root, path), "rb") as f:
            assert f.read() == segment
    assert len(segments) >= 3
