"""Cached top-k chunk attention (prefill pieces and single tokens) against the parallel oracle."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import selection_oracle as oracle

from rwkvx_jax.sparse import cached_attention
from rwkvx_jax.sparse.chunk_sources import selected_chunks_attention
from rwkvx_jax.sparse.kv_cache import init_cache, push_chunks

TOL = 1e-5

# Compiled as the model's decoder compiles them: one program per piece shape, not hundreds of
# op-by-op dispatches (this file ran 79 s eagerly, 31 s so).
attend_piece = jax.jit(cached_attention.attend_piece, static_argnames=("top_k", "eviction"))
attend_token = jax.jit(cached_attention.attend_token, static_argnames=("top_k", "eviction"))


def _qkv(seed, batch, length, heads=2, n=8, scale=1.0):
    keys = jax.random.split(jax.random.PRNGKey(seed), 3)
    return [scale * jax.random.normal(key, (batch, length, heads, n)) for key in keys]


def _run_cached(q, k, v, pieces, *, chunk, top_k, n_slots):
    """Feeds q/k/v through the cache in the given piece lengths (1 = decode step)."""
    batch, length, heads, n = q.shape
    cache = init_cache(batch, n_slots, chunk, heads, n, jnp.float32)
    lengths = jnp.zeros((batch,), jnp.int32)
    outs, start = [], 0
    for size in pieces:
        sl = slice(start, start + size)
        if size == 1:
            out, cache = attend_token(
                q[:, start], k[:, start], v[:, start], cache, lengths,
                jnp.ones((batch,), bool), top_k=top_k, eviction="distinct",
            )  # fmt: skip
            out = out[:, None]
        else:
            out, cache = attend_piece(
                q[:, sl], k[:, sl], v[:, sl], cache, lengths,
                jnp.full((batch,), size, jnp.int32), top_k=top_k, eviction="distinct",
            )  # fmt: skip
        outs.append(out)
        lengths = lengths + size
        start += size
    return jnp.concatenate(outs, axis=1), cache


@pytest.mark.parametrize(
    "pieces,chunk,top_k",
    [
        ([16] * 5, 16, 3),  # aligned pieces, sparse regime
        ([5, 23, 1, 1, 23, 5, 1, 23], 8, 3),  # misaligned pieces and single tokens
        ([1] * 24, 4, 2),  # decode only
        ([37, 1, 1, 1, 13], 4, 1),  # own chunk only
    ],
)
def test_cached_attention_equals_parallel_oracle(pieces, chunk, top_k):
    length = sum(pieces)
    q, k, v = _qkv(0, 2, length)
    # The independent oracle (`selection_oracle`, numpy); the margin rules out fp32 near ties.
    assert oracle.decision_margin(q, k, chunk, top_k) > 1e-4
    expected = oracle.topk_chunk_attention(q, k, v, chunk, top_k)[0]
    got, cache = _run_cached(q, k, v, pieces, chunk=chunk, top_k=top_k, n_slots=64)
    np.testing.assert_allclose(got, expected, atol=TOL, rtol=TOL)
    assert int(cache.n_filled[0]) == length // chunk
    np.testing.assert_array_equal(cache.chunk_ids[0, : length // chunk], np.arange(length // chunk))


def test_cached_selection_breaks_ties_to_the_lower_chunk():
    """Exact ties (row-permuted copies of a chunk, dyadic inputs) at the top_k-th place: prefill
    pieces and decode steps pick the lower chunk, as the parallel forward does."""
    # The shapes of the misaligned case above, so the compiled pieces are shared.
    pieces, chunk, top_k = [5, 23, 1, 1, 23, 5, 1, 23], 8, 3
    q, k, v = oracle.dyadic_inputs(
        (2, sum(pieces), 2, 8), chunk, seed=3, copies=((0, 3), (1, 5), (0, 7), (2, 9))
    )
    across, within = oracle.count_ties(q, k, chunk, top_k)
    assert across > 0 and within > 0
    expected = oracle.topk_chunk_attention(q, k, v, chunk, top_k)[0]
    got, _ = _run_cached(*map(jnp.asarray, (q, k, v)), pieces, chunk=chunk, top_k=top_k, n_slots=64)
    np.testing.assert_allclose(got, expected, atol=TOL, rtol=TOL)


def test_piece_padding_never_changes_a_sequence():
    """Row 1 is row 0 with its second piece right-padded: same outputs and cache contents."""
    q, k, v = _qkv(1, 1, 40)
    chunk, top_k = 8, 3
    cache = init_cache(2, 8, chunk, 2, 8, jnp.float32)
    two = lambda x: jnp.concatenate([x, x], axis=0)
    out1, cache = attend_piece(
        two(q[:, :20]), two(k[:, :20]), two(v[:, :20]), cache, jnp.zeros((2,), jnp.int32),
        jnp.array([20, 13]), top_k=top_k, eviction="distinct",
    )  # fmt: skip
    np.testing.assert_allclose(out1[1, :13], out1[0, :13], atol=TOL)
    # Row 0 continues at 20, row 1 at 13, with the same remaining tokens.
    rest0 = lambda x: x[:, 20:40]
    rest1 = lambda x: x[:, 13:33]
    both = lambda x: jnp.concatenate([rest0(x), rest1(x)], axis=0)
    out2, cache = attend_piece(
        both(q), both(k), both(v), cache, jnp.array([20, 13]), jnp.array([20, 20]),
        top_k=top_k, eviction="distinct",
    )  # fmt: skip
    expected = oracle.topk_chunk_attention(q, k, v, chunk, top_k)[0]
    np.testing.assert_allclose(out2[0], expected[0, 20:40], atol=TOL)
    np.testing.assert_allclose(out2[1], expected[0, 13:33], atol=TOL)


def test_invalid_decode_rows_absorb_nothing():
    """A row stepped with valid=False absorbs nothing: its cache is bit for bit the cache of
    its valid tokens alone (slots, chunk means, ids and the open chunk), past the eviction."""
    q, k, v = _qkv(2, 2, 24)
    cache = init_cache(2, 2, 4, 2, 8, jnp.float32)
    alone = init_cache(1, 2, 4, 2, 8, jnp.float32)
    lengths = jnp.zeros((2,), jnp.int32)
    length_alone = jnp.zeros((1,), jnp.int32)
    for t in range(24):
        valid = jnp.array([True, t % 2 == 0])
        _, cache = attend_token(
            q[:, t], k[:, t], v[:, t], cache, lengths, valid, top_k=2, eviction="oldest"
        )
        lengths = lengths + valid
        if t % 2 == 0:
            _, alone = attend_token(
                q[1:, t], k[1:, t], v[1:, t], alone, length_alone, jnp.array([True]),
                top_k=2, eviction="oldest",
            )  # fmt: skip
            length_alone = length_alone + 1
    assert list(np.asarray(cache.n_filled)) == [2, 2]  # both rows evicted at least once
    for name, row, ref in zip(cache._fields, cache, alone, strict=True):
        np.testing.assert_array_equal(np.asarray(row)[1:], np.asarray(ref), err_msg=name)


def test_eviction_keeps_a_distinct_chunk_and_oldest_drops_it():
    """Slots full of near-identical chunks plus one unlike them: "distinct" keeps the odd one."""
    chunk, heads, n, n_slots = 4, 2, 8, 3
    base = jax.random.normal(jax.random.PRNGKey(0), (1, heads, chunk, n))
    odd = -base + 0.01
    caches = {}
    for policy in ("distinct", "oldest"):
        cache = init_cache(1, n_slots, chunk, heads, n, jnp.float32)
        for i in range(6):
            keys = odd if i == 1 else base + 0.001 * i
            cache = push_chunks(cache, keys, keys, jnp.array([i]), jnp.array([True]), policy)
        caches[policy] = cache
    assert 1 in list(np.asarray(caches["distinct"].chunk_ids[0]))
    assert sorted(np.asarray(caches["oldest"].chunk_ids[0]).tolist()) == [3, 4, 5]


def test_selected_chunks_attention_matches_dense_gather():
    q, _, _ = _qkv(3, 1, 5, heads=2, n=8)
    k, v, _ = _qkv(4, 1, 24, heads=2, n=8)
    sel = jnp.array([[[0, 2], [1, -1]], [[-1, -1], [2, 1]], [[2, -1], [0, 1]],
                     [[1, 0], [-1, 2]], [[0, -1], [-1, -1]]])[None]  # fmt: skip
    out, lse = selected_chunks_attention(q, k, v, sel, chunk_size=8, pair_tile=3)
    for t in range(5):
        for h in range(2):
            picks = [int(c) for c in sel[0, t, h] if c >= 0]
            if not picks:
                assert out[0, t, h].tolist() == [0.0] * 8 and lse[0, t, h] == -np.inf
                continue
            rows = np.concatenate([np.arange(c * 8, c * 8 + 8) for c in picks])
            logits = k[0, rows, h] @ q[0, t, h] / np.sqrt(8)
            p = jax.nn.softmax(logits)
            np.testing.assert_allclose(out[0, t, h], p @ v[0, rows, h], atol=TOL)
            np.testing.assert_allclose(lse[0, t, h], jax.nn.logsumexp(logits), atol=TOL)
