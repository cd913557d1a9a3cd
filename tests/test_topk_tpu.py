"""TPU (Mosaic) top-k chunk attention kernels on CPU: interpret mode vs the oracle, TPU lowering."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import selection_oracle as oracle
from tpu_races import race_params, run_planted_race

from pallas_kernels.topk_attention import plan
from pallas_kernels.topk_attention.reference import attended_mask
from pallas_kernels.topk_attention.tpu import (
    BlockSizes,
    tile_info,
    topk_chunk_attention_tpu,
    tpu_work_fraction,
)

H = 2
TOL = 1e-5


def _qkv(t, d=32, seed=0, dtype=jnp.float32):
    keys = jax.random.split(jax.random.PRNGKey(seed), 3)
    return tuple(jax.random.normal(kk, (1, t, H, d), dtype) for kk in keys)


def _weights(shape, seed):
    """Random cotangent weights for o [B,T,H,D] and lse [B,T,H]."""
    k1, k2 = jax.random.split(jax.random.PRNGKey(seed))
    return jax.random.normal(k1, shape), jax.random.normal(k2, shape[:3])


def _rel_err(x, ref):
    return float(jnp.abs(x.astype(jnp.float32) - ref).max() / jnp.abs(ref).max())


def _dense_masked(q, k, v, mask):
    """fp32 masked attention and its log-sum-exp; mask [B,H,T,T] or [T,T]."""
    q, k, v = (x.astype(jnp.float32) for x in (q, k, v))
    s = jnp.einsum("bqhd,bkhd->bhqk", q, k, precision="highest") / math.sqrt(q.shape[-1])
    s = jnp.where(mask, s, -jnp.inf)
    o = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(s, axis=-1), v, precision="highest")
    return o, jnp.swapaxes(jax.nn.logsumexp(s, axis=-1), 1, 2)


def _loss(attention):
    """sum(o * w_o) + sum(lse * w_lse) of attention(q, k, v, *extra) -> (o, lse); aux (o, lse).

    The lse term makes every test also check the differentiable log-sum-exp output.
    """

    def loss(q, k, v, w_o, w_lse, *extra):
        o, lse = attention(q, k, v, *extra)
        return (o.astype(jnp.float32) * w_o).sum() + (lse * w_lse).sum(), (o, lse)

    return jax.jit(jax.grad(loss, argnums=(0, 1, 2), has_aux=True))


@functools.cache
def _loss_and_grads(chunk_size, top_k, **options):
    """Jitted (q, k, v, w_o, w_lse) -> ((dq, dk, dv), (o, lse)) of the kernel."""
    return _loss(
        functools.partial(
            topk_chunk_attention_tpu, chunk_size=chunk_size, top_k=top_k, return_lse=True, **options
        )
    )


# Jitted (q, k, v, w_o, w_lse, mask) -> ((dq, dk, dv), (o, lse)) of dense attention under a mask
# from the independent oracle (`selection_oracle`: no selection code shared with the kernels).
_oracle_loss_and_grads = _loss(_dense_masked)


def _check_against_oracle(q, k, v, chunk_size, top_k, tol=TOL, **options):
    w_o, w_lse = _weights(q.shape, seed=q.shape[1])
    grads, (o, lse) = _loss_and_grads(chunk_size, top_k, **options)(q, k, v, w_o, w_lse)
    q32, k32, v32 = (x.astype(jnp.float32) for x in (q, k, v))
    mask = jnp.asarray(oracle.attended_mask(q32, k32, chunk_size, top_k))
    grads_ref, (o_ref, lse_ref) = _oracle_loss_and_grads(q32, k32, v32, w_o, w_lse, mask)
    assert o.dtype == q.dtype and o.shape == q.shape
    assert lse.dtype == jnp.float32 and lse.shape == q.shape[:3]
    assert _rel_err(o, o_ref) < tol
    assert _rel_err(lse, lse_ref) < tol
    for name, g, g_ref in zip("qkv", grads, grads_ref, strict=True):
        assert g.dtype == q.dtype, name
        assert _rel_err(g, g_ref) < tol, name


# (T, D, chunk_size, top_k, block_q, block_k, pair_tile): T is never a multiple of the chunk.
SPARSE_CASES = [
    (100, 32, 16, 3, 8, 16, 8),  # block_q != block_k, several blocks and tiles per chunk
    (200, 32, 32, 2, 16, 8, 16),  # block_k < block_q, one pick
    (90, 128, 16, 4, 16, 16, 8),  # D = 128, one block per chunk
    (120, 32, 16, 1, 8, 8, 8),  # top_k = 1: own chunk only, no pairs
]


@pytest.mark.parametrize("t, d, chunk_size, top_k, block_q, block_k, pair_tile", SPARSE_CASES)
def test_sparse_matches_oracle(t, d, chunk_size, top_k, block_q, block_k, pair_tile):
    q, k, v = _qkv(t, d, seed=t)
    assert not plan.is_dense_causal(t, chunk_size, top_k)
    assert plan.needs_selection(t, chunk_size, top_k) == (top_k > 1)
    blocks = BlockSizes(block_q=block_q, block_k=block_k, pair_tile=pair_tile)
    _check_against_oracle(q, k, v, chunk_size, top_k, block_sizes=blocks, interpret=True)


@pytest.mark.parametrize(
    "t, chunk_size, top_k, block",
    [(150, 32, 9, 16), (100, 32, 4, 128)],  # top_k > chunks; T <= chunk * top_k in one block
)
def test_short_sequences_are_one_causal_segment(t, chunk_size, top_k, block):
    q, k, v = _qkv(t, seed=3)
    assert plan.is_dense_causal(t, chunk_size, top_k)
    # The oracle's mask is dense causal here; assert it so the comparison means what it says.
    assert (oracle.attended_mask(q, k, chunk_size, top_k) == np.tri(t, dtype=bool)).all()
    blocks = BlockSizes(block_q=block, block_k=block, pair_tile=block)
    _check_against_oracle(q, k, v, chunk_size, top_k, block_sizes=blocks, interpret=True)


def _tied_inputs(t=112, d=32, chunk_size=16):
    """Chunks of 16 with identical integer keys except chunk 1 (negated: scores lower).

    q = 1 makes every score sum(mean key), exact in fp32, so all other candidates tie and
    every query picks the lowest-index ones: many tiles land on chunks 0 and 2 while later
    chunks get none (their key blocks are never visited by the pairs dk/dv kernel).
    """
    rng = np.random.default_rng(0)
    base = rng.integers(0, 3, size=(chunk_size, d)).astype(np.float32)
    keys = np.tile(base, (-(-t // chunk_size), 1))[:t]
    keys[chunk_size : 2 * chunk_size] = -base
    k = np.broadcast_to(keys[None, :, None, :], (1, t, H, d)).copy()
    q = np.full((1, t, H, d), 0.25, np.float32)
    v = np.asarray(jax.random.normal(jax.random.PRNGKey(5), (1, t, H, d)))
    return jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), chunk_size


def test_ties_go_to_lower_chunks():
    q, k, v, chunk_size = _tied_inputs()
    t, top_k = q.shape[1], 3
    # Hand-written mask: own chunk causal; chunk 1 -> chunk 0; chunk 2 -> 0, 1; later -> 0, 2.
    pos = np.arange(t)
    chunk = pos // chunk_size
    mask = (chunk[:, None] == chunk[None, :]) & (pos[None, :] <= pos[:, None])
    mask |= (chunk[:, None] >= 1) & (chunk[None, :] == 0)
    mask |= (chunk[:, None] == 2) & (chunk[None, :] == 1)
    mask |= (chunk[:, None] >= 3) & (chunk[None, :] == 2)
    assert bool((attended_mask(q, k, chunk_size, top_k) == mask).all())  # the library's
    assert (oracle.attended_mask(q, k, chunk_size, top_k) == mask).all()  # the oracle's
    blocks = BlockSizes(block_q=8, block_k=16, pair_tile=8)
    _check_against_oracle(q, k, v, chunk_size, top_k, block_sizes=blocks, interpret=True)


def test_bfloat16_inputs_close_to_fp32_oracle():
    # bf16 MXU operands (p and ds rounded to bf16) against the fp32 oracle on the same inputs.
    q, k, v = _qkv(100, seed=11, dtype=jnp.bfloat16)
    blocks = BlockSizes(block_q=16, block_k=16, pair_tile=8)
    _check_against_oracle(q, k, v, 16, 3, tol=2e-2, block_sizes=blocks, interpret=True)


def test_tile_info_marks_source_valid_and_first_tiles():
    t, chunk_size, top_k, size = 100, 16, 3, 8
    q, k, _ = _qkv(t, seed=4)
    n_candidates = -(-t // chunk_size) - 1
    n_tiles = plan.max_pair_tiles(plan.count_pairs(t, chunk_size, top_k - 1), n_candidates, size)
    sel = oracle.select_chunks(q, k, chunk_size, top_k).astype(np.int32)[:, :, 0]  # [1, T, 2]
    tiles = plan.pack_pair_tiles(
        jnp.asarray(sel), pair_tile=size, n_tiles=n_tiles, n_candidates=n_candidates
    )
    info, chunk = np.asarray(tile_info(tiles))[0], np.asarray(tiles.chunk)[0]
    src, valid, first = info // 4, (info // 2) % 2 == 1, info % 2 == 1
    n_used = int(tiles.n_used[0])
    assert 0 < n_used < n_tiles and (valid == (np.arange(n_tiles) < n_used)).all()
    # Unused tiles reuse the last used tile's blocks, so their grid steps issue no DMA.
    assert (src[:n_used] == np.arange(n_used)).all() and (src[n_used:] == n_used - 1).all()
    assert (chunk[n_used:] == chunk[n_used - 1]).all()
    assert (first == np.concatenate([[True], chunk[1:] != chunk[:-1]])).all()


def test_race_detector_sees_a_planted_race(race_states):
    """Control: two cores writing one output block is reported, so a clean run means something."""
    run_planted_race()
    assert [state.races_found for state in race_states] == [True]


def test_tpu_interpret_mode_has_no_races(race_states):
    # Sparse (T = 48 > 16 * 2) with two heads: own-chunk and pair kernels, forward and backward.
    q, k, v = _qkv(48, seed=9)
    blocks = BlockSizes(block_q=16, block_k=16, pair_tile=8)
    _check_against_oracle(q, k, v, 16, 2, block_sizes=blocks, interpret=race_params())
    # Own and pairs forward; own dq, own dk/dv, pairs dq, pairs dk/dv: each checked, not the last.
    assert len(race_states) == 6
    assert [state.races_found for state in race_states] == [False] * 6


def test_work_fraction_is_exact_cost():
    t, chunk_size, top_k = 65536, 2048, 3
    fraction = tpu_work_fraction(t, chunk_size=chunk_size, top_k=top_k)
    # Products actually needed: own chunk causal plus min(c, top_k - 1) whole chunks per query.
    needed = sum(
        chunk_size * (chunk_size + 1) / 2 + chunk_size * min(c, top_k - 1) * chunk_size
        for c in range(t // chunk_size)
    ) / (t * (t + 1) / 2)
    assert needed <= fraction <= 0.20, (needed, fraction)
    # In the dense regime it is whole causal blocks: 8 * 9 / 2 blocks of 512 x 512.
    dense = tpu_work_fraction(4096, chunk_size=2048, top_k=3)
    assert dense == pytest.approx(36 * 512 * 512 / (4096 * 4097 / 2), rel=1e-12)


@pytest.mark.parametrize(
    "d, dtype, top_k, kernels",
    [
        (64, jnp.float32, 3, (2, 6)),  # own + pairs forward; + own dq, dkv, pairs dq, dkv
        (128, jnp.bfloat16, 3, (2, 6)),
        (64, jnp.bfloat16, 4, (1, 3)),  # T = chunk * top_k: one causal segment
        (128, jnp.float32, 1, (1, 3)),  # own chunk only
    ],
)
def test_lowers_for_tpu_at_production_blocks(d, dtype, top_k, kernels):
    arg = jax.ShapeDtypeStruct((1, 8192, 2, d), dtype)
    attention = functools.partial(topk_chunk_attention_tpu, chunk_size=2048, top_k=top_k)

    def loss(q, k, v):
        return attention(q, k, v).astype(jnp.float32).sum()

    grad = jax.grad(loss, argnums=(0, 1, 2))
    for fn, n_kernels in ((attention, kernels[0]), (grad, kernels[1])):
        text = jax.jit(fn).trace(arg, arg, arg).lower(lowering_platforms=("tpu",)).as_text()
        assert text.count("tpu_custom_call") == n_kernels


@pytest.mark.parametrize(
    "shapes, options, match",
    [
        ((1, 64, 2, 32), {"chunk_size": 0, "top_k": 2}, "chunk_size"),
        ((1, 64, 2, 32), {"chunk_size": 16, "top_k": 0}, "top_k"),
        (
            (1, 64, 2, 32),
            {"chunk_size": 16, "top_k": 2, "block_sizes": BlockSizes(block_q=64)},
            "block_q.*128",
        ),
        (
            (1, 64, 2, 32),
            {
                "chunk_size": 24,
                "top_k": 2,
                "block_sizes": BlockSizes(block_q=16),
                "interpret": True,
            },
            "chunk_size 24",
        ),
        ((1, 64, 2, 32), {"chunk_size": 16, "top_k": 2, "interpret": "yes"}, "interpret"),
        ((1, 64, 32), {"chunk_size": 16, "top_k": 2}, "B, T, H, D"),
    ],
)
def test_bad_arguments_raise(shapes, options, match):
    q = jnp.zeros(shapes, jnp.float32)
    with pytest.raises(ValueError, match=match):
        topk_chunk_attention_tpu(q, q, q, **options)


@pytest.mark.parametrize(
    "sizes, match", [({"pair_tile": 0}, "pair_tile.*0"), ({"block_k": 12}, "block_k.*12")]
)
def test_bad_block_sizes_raise(sizes, match):
    with pytest.raises(ValueError, match=match):
        BlockSizes(**sizes)


def test_block_sizes_defaults_and_type():
    assert BlockSizes.get_default() == BlockSizes(block_q=512, block_k=512, pair_tile=256)
    q = jnp.zeros((1, 64, 2, 32), jnp.float32)
    with pytest.raises(ValueError, match="block_sizes"):
        topk_chunk_attention_tpu(q, q, q, chunk_size=16, top_k=2, block_sizes=(8, 8, 8))


def test_mismatched_dtypes_raise():
    q = jnp.zeros((1, 64, 2, 32), jnp.float32)
    with pytest.raises(ValueError, match="dtype"):
        topk_chunk_attention_tpu(q, q.astype(jnp.bfloat16), q, chunk_size=16, top_k=2)
