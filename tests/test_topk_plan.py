"""The top-k attention sparsity plan: regime, pair counts, tiles, gathers, merge, layout."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import selection_oracle as oracle

from pallas_kernels.topk_attention import plan


def test_regime_follows_chunks_and_top_k():
    # 77 tokens in chunks of 8 are 10 chunks: dense causal once top_k reaches 10.
    assert plan.is_dense_causal(77, 8, 10) and not plan.is_dense_causal(77, 8, 9)
    assert plan.needs_selection(77, 8, 9) and not plan.needs_selection(77, 8, 10)
    assert not plan.needs_selection(77, 8, 1)  # own chunk only
    assert plan.is_dense_causal(5, 8, 1)  # one chunk


def test_pair_count_and_tile_bound():
    # Chunks of 4 over T = 10: rows 0-3 pick nothing, 4-7 one chunk, 8-9 two (n_pick = 2).
    assert plan.count_pairs(10, 4, 2) == 4 * 1 + 2 * 2
    assert plan.count_pairs(10, 4, 0) == 0
    assert plan.max_pair_tiles(8, 2, 4) == 2 + 2
    assert plan.max_pair_tiles(9, 2, 4) == 3 + 2


def test_is_int_rejects_bools_and_floats():
    assert plan.is_int(3) and plan.is_int(np.int32(3))
    assert not plan.is_int(True) and not plan.is_int(3.0) and not plan.is_int(np.bool_(True))


def _packed(t=100, chunk_size=16, top_k=3, size=8, pad=4, seed=4):
    keys = jax.random.split(jax.random.PRNGKey(seed), 2)
    q, k = (jax.random.normal(x, (1, t, 2, 32)) for x in keys)
    picks = jnp.asarray(oracle.select_chunks(q, k, chunk_size, top_k), jnp.int32)
    sel = plan.to_groups(picks, t + pad, fill=-1)  # [2, Tp, 2]
    n_candidates = -(-t // chunk_size) - 1
    n_tiles = plan.max_pair_tiles(plan.count_pairs(t, chunk_size, top_k - 1), n_candidates, size)
    tiles = plan.pack_pair_tiles(sel, pair_tile=size, n_tiles=n_tiles, n_candidates=n_candidates)
    return np.asarray(sel), jax.tree.map(np.asarray, tiles), n_tiles


def test_pair_tiles_are_single_chunk_and_cover_every_pair():
    sel, tiles, n_tiles = _packed()
    size, tp = 8, sel.shape[1]
    for g in range(sel.shape[0]):
        rows, chunk, slot = tiles.rows[g], tiles.chunk[g], tiles.slot[g]
        n_used = int(tiles.n_used[g])
        assert 0 < n_used < n_tiles
        assert (np.diff(chunk) >= 0).all()  # sorted by chunk: a chunk's tiles are consecutive
        assert (chunk[n_used:] == chunk[n_used - 1]).all()  # unused: the last used tile's chunk
        by_tile = rows.reshape(n_tiles, size)
        for m in range(n_used):
            real = by_tile[m][by_tile[m] < tp]
            assert real.size > 0 and real[0] == by_tile[m][0]  # filled from the first slot
            assert (np.diff(real) > 0).all()  # queries in order, none twice
            assert all(chunk[m] in sel[g, r] for r in real)  # every row picked the tile's chunk
        assert (rows[n_used * size :] == tp).all()
        for r in range(tp):
            for i in range(sel.shape[2]):
                if sel[g, r, i] >= 0:
                    assert rows[slot[r, i]] == r and chunk[slot[r, i] // size] == sel[g, r, i]
                else:
                    assert slot[r, i] == n_tiles * size  # the padding slot
        # Each chunk's run: where it starts, how many tiles, and that they hold its pairs.
        counts = np.bincount(sel[g][sel[g] >= 0], minlength=tiles.tile_count.shape[1])
        np.testing.assert_array_equal(tiles.tile_count[g], -(-counts // size))
        np.testing.assert_array_equal(
            tiles.first_tile[g], np.cumsum(tiles.tile_count[g]) - tiles.tile_count[g]
        )
        assert tiles.tile_count[g].sum() == n_used


def test_gathers_read_the_fill_one_past_the_end():
    x = jnp.arange(2 * 3 * 2, dtype=jnp.float32).reshape(2, 3, 2)
    rows = jnp.array([[2, 3, 0], [3, 1, 1]])
    got = np.asarray(plan.gather_rows(x, rows, -5.0))
    np.testing.assert_array_equal(got[0], [[4, 5], [-5, -5], [0, 1]])
    np.testing.assert_array_equal(got[1], [[-5, -5], [8, 9], [8, 9]])
    np.testing.assert_array_equal(plan.take_rows(x, rows[:, 2:]), x[:, [0]].at[1].set(x[1, [1]]))


def test_sum_over_picks_adds_each_querys_slots():
    x_slots = jnp.array([[1.0, 10.0, 100.0, 1000.0]])  # [G = 1, S = 4]
    slot = jnp.array([[[0, 2], [4, 1], [4, 4]]])  # query 2 picks nothing (slot S = 4)
    np.testing.assert_array_equal(plan.sum_over_picks(x_slots, slot), [[101.0, 10.0, 0.0]])


def test_tile_operands_zero_empty_slots():
    q = jnp.ones((1, 2, 3))
    lse = jnp.array([[0.5, 1.5]])
    tiles = plan.PairTiles(
        rows=jnp.array([[1, 2]]),
        chunk=jnp.zeros((1, 1), jnp.int32),
        slot=jnp.zeros((1, 2, 1), jnp.int32),
        first_tile=jnp.zeros((1, 1), jnp.int32),
        tile_count=jnp.ones((1, 1), jnp.int32),
        n_used=jnp.ones((1,), jnp.int32),
    )
    q_t, do_t, lse_t, delta_t = plan.tile_operands(tiles, q, 2 * q, lse, lse)
    np.testing.assert_array_equal(q_t[0, :, 0], [1.0, 0.0])
    np.testing.assert_array_equal(do_t[0, :, 0], [2.0, 0.0])
    np.testing.assert_array_equal(lse_t, np.float32([[1.5, plan.EMPTY_SLOT_LSE]]))
    np.testing.assert_array_equal(delta_t, [[1.5, 0.0]])


def _softmax_part(s, v):
    """Normalised attention output and log-sum-exp of logits s [..., K] over values v [K, D]."""
    lse = jax.nn.logsumexp(s, axis=-1)
    return jnp.exp(s - lse[..., None]) @ v, lse


def test_merge_equals_one_softmax_over_all_parts():
    keys = jax.random.split(jax.random.PRNGKey(0), 6)
    tp, d = 3, 4
    s_own, v_own = jax.random.normal(keys[0], (tp, 5)), jax.random.normal(keys[1], (5, d))
    s_sel, v_sel = jax.random.normal(keys[2], (2, tp, 6)), jax.random.normal(keys[3], (2, 6, d))
    # Query 0 picked both chunks, query 1 only the second, query 2 none.
    picked = np.array([[True, True], [False, True], [False, False]])
    o_own, lse_own = _softmax_part(s_own, v_own)
    # Tile slots: chunk 0 holds query 0 (slot 0), chunk 1 queries 0 and 1 (slots 2, 3); slot 1
    # is an empty slot of chunk 0's tile, never written: NaN must not leak from it.
    o_slots = jnp.full((5, d), jnp.nan)
    lse_slots = jnp.full((5,), jnp.nan)
    slot = np.full((tp, 2), 5)
    for (query, pick), s_i in (((0, 0), 0), ((0, 1), 2), ((1, 1), 3)):
        o, lse = _softmax_part(s_sel[pick, query], v_sel[pick])
        o_slots, lse_slots = o_slots.at[s_i].set(o), lse_slots.at[s_i].set(lse)
        slot[query, pick] = s_i
    o, lse = plan.merge_own_and_picks(
        o_own[None], lse_own[None], o_slots[None], lse_slots[None], jnp.asarray(slot)[None]
    )
    for query in range(tp):
        s = [s_own[query]] + [s_sel[p, query] for p in range(2) if picked[query, p]]
        v = [v_own] + [v_sel[p] for p in range(2) if picked[query, p]]
        want_o, want_lse = _softmax_part(jnp.concatenate(s), jnp.concatenate(v))
        np.testing.assert_allclose(o[0, query], want_o, rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(lse[0, query], want_lse, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("trailing", [(), (3,)])
def test_groups_round_trip(trailing):
    x = jnp.arange(2 * 5 * 3 * int(np.prod(trailing)), dtype=jnp.float32)
    x = x.reshape(2, 5, 3, *trailing)
    grouped = plan.to_groups(x, 8, fill=-1)
    assert grouped.shape == (6, 8, *trailing)
    np.testing.assert_array_equal(grouped[4, :5], x[1, :, 1])  # group g = b * H + h
    assert (grouped[:, 5:] == -1).all()
    np.testing.assert_array_equal(plan.from_groups(grouped, 2, 5), x)
