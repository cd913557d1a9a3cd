"""Top-k chunk attention on GPU: Pallas-Triton kernels with exact cost (own chunk + packed pairs).

Design (SPEC §4 train semantics; the oracle is `reference.topk_chunk_attention_reference`, the
pure-JAX twin is `xla_chunked` with method="pairs"):

* Selection runs in XLA (`reference.select_chunks`, fp32, not differentiated).
* Own chunk: a flash-attention kernel, one program per (batch*head, query block), looping over
  the key blocks of the query's own chunk up to the diagonal only (dynamic trip count), online
  fp32 softmax; it returns the normalised output and the log-sum-exp. When T <= chunk_size *
  top_k every earlier chunk is selected and the whole sequence is one causal segment.
* Pairs: the (query, selected chunk) pairs of each (batch, head) are sorted by chunk and packed
  into tiles of `pair_tile` rows that share one chunk (each chunk's run padded to whole tiles;
  `plan.pack_pair_tiles`, shared with the XLA and TPU versions).
  Queries are gathered into tile order in XLA; a kernel with one program per (batch*head, tile)
  reads its tile's chunk id from an int32 input (Triton has no scalar prefetch) and loops over
  that chunk's key blocks. Per-pair (o, lse) are merged with the own-chunk result by log-sum-exp
  in XLA, by gathers (deterministic: no scatter-add).
* Why not a per-query-block union of selected chunks (the TPU splash-style layout): with random
  queries the rows of one block select nearly every earlier chunk between them, so the union
  visits ~100% of the dense-causal blocks; the pairs layout computes T * (top_k - 1) * chunk
  products per head plus tile padding (`gpu_work_fraction`: ~16% of dense causal at T = 64K,
  chunk 2048, top_k 3).
* Backward (one custom VJP, FlashAttention-2 recompute from the saved lse, delta = rowsum(o*do)
  in XLA): own-chunk dq and dk/dv kernels; pairs dq per tile (gathered back per query), and a
  pairs dk/dv kernel per (batch*head, chunk, key block) that loops over that chunk's tiles
  (per-chunk tile start/count as int32 inputs, megablox-style group metadata), so no per-tile
  dk/dv copies are materialised.
* Scores, softmax and accumulators are fp32; fp32 inputs use IEEE fp32 dots (HIGHEST), bf16
  inputs bf16 dots with fp32 accumulation. Masked logits use a finite large negative so the
  online-softmax rescale never computes inf - inf.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from .plan import (
    MASKED_LOGIT,
    PairTiles,
    count_pairs,
    from_groups,
    gather_rows,
    is_dense_causal,
    is_int,
    max_pair_tiles,
    merge_own_and_picks,
    options_or_default,
    pack_pair_tiles,
    sum_over_picks,
    tile_operands,
    to_groups,
)
from .reference import select_chunks, validate_args
from .vjp import attention_vjp

_MIN_BLOCK = 16  # Triton dots need every dimension >= 16


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Block sizes of the GPU kernels: powers of 2 >= 16 (Triton block shapes and dots).

    Attributes:
      block_q: query rows of an own-chunk block (reduced to divide chunk_size).
      block_k: key rows of an own-chunk block (reduced likewise), and of the pair kernels'
        key blocks.
      pair_tile: (query, chunk) pairs per tile.
    """

    block_q: int = 64
    block_k: int = 64
    pair_tile: int = 64

    def __post_init__(self):
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if not _is_pow2(value) or value < _MIN_BLOCK:
                raise ValueError(
                    f"BlockSizes.{field.name} must be a power of 2 >= {_MIN_BLOCK} (Triton block "
                    f"shapes), got {value!r}"
                )

    @classmethod
    def get_default(cls) -> BlockSizes:
        """The sizes the kernels use when none are given: 64 x 64 blocks, tiles of 64 pairs."""
        return cls()


class _Plan(NamedTuple):
    """Static description of one call (hashable: a nondiff argument of the custom VJP)."""

    padded_len: int  # T rounded up to a multiple of max(block_q, block_k)
    head_dim: int  # D padded to a power of 2 >= 16 (zero columns change no dot product)
    segment: int  # length of a causal segment: chunk_size, or padded_len when dense
    chunk_size: int
    n_pick: int  # top_k - 1
    use_pairs: bool  # False when every earlier chunk is attended anyway, or top_k == 1
    n_candidates: int  # chunks that can be selected: all but the last
    block_q: int
    block_k: int
    pair_tile: int
    n_tiles: int  # static upper bound on pair tiles per (batch, head)
    scale: float
    num_warps: int
    num_stages: int
    interpret: bool


# ----------------------------------------------------------------------------- planning


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _is_pow2(n) -> bool:
    return is_int(n) and n > 0 and (n & (n - 1)) == 0


def _block_dividing(chunk_size: int, block: int) -> int:
    """Largest power of 2 <= block that divides chunk_size."""
    b = block
    while chunk_size % b:
        b //= 2
    return b


def _make_plan(shape, chunk_size, top_k, block_sizes: BlockSizes, interpret) -> _Plan:
    """Chooses the regime, block sizes and tile bound for [B, T, H, D] inputs."""
    _, t, _, d = shape
    block_q, block_k, pair_tile = block_sizes.block_q, block_sizes.block_k, block_sizes.pair_tile
    n_chunks = -(-t // chunk_size)
    n_pick = top_k - 1
    dense = is_dense_causal(t, chunk_size, top_k)  # one causal segment
    if dense:
        span = max(_MIN_BLOCK, _next_pow2(t))
        bq, bk = min(block_q, span), min(block_k, span)
    else:
        bq, bk = _block_dividing(chunk_size, block_q), _block_dividing(chunk_size, block_k)
        if min(bq, bk) < _MIN_BLOCK:
            raise ValueError(
                f"chunk_size must be a multiple of {_MIN_BLOCK} for the GPU kernel when T > "
                f"chunk_size * top_k (blocks must divide the chunk), got chunk_size={chunk_size}"
            )
    step = max(bq, bk)
    padded = -(-t // step) * step
    use_pairs = not dense and n_pick > 0
    n_candidates = n_chunks - 1
    n_tiles = 0
    if use_pairs:
        n_tiles = max_pair_tiles(count_pairs(t, chunk_size, n_pick), n_candidates, pair_tile)
    return _Plan(
        padded_len=padded,
        head_dim=max(_MIN_BLOCK, _next_pow2(d)),
        segment=padded if dense else chunk_size,
        chunk_size=chunk_size,
        n_pick=n_pick,
        use_pairs=use_pairs,
        n_candidates=n_candidates,
        block_q=bq,
        block_k=bk,
        pair_tile=pair_tile,
        n_tiles=n_tiles,
        scale=1.0 / math.sqrt(d),
        num_warps=4 if max(bq, pair_tile) <= 64 else 8,
        num_stages=2,
        interpret=bool(interpret),
    )


# ----------------------------------------------------------------------------- kernel maths


def _dot(a, b, contract_a: int = 1, contract_b: int = 0):
    """2-D matmul with fp32 accumulation; IEEE fp32 (not TF32) when the operands are fp32."""
    precision = lax.Precision.HIGHEST if a.dtype == jnp.float32 else lax.Precision.DEFAULT
    return lax.dot_general(
        a,
        b,
        (((contract_a,), (contract_b,)), ((), ())),
        precision=precision,
        preferred_element_type=jnp.float32,
    )


def _dot_nt(a, b):
    """a [m, k] x b [n, k] -> [m, n] (contract the last dims)."""
    return _dot(a, b, 1, 1)


def _causal(row0, n_rows: int, col0, n_cols: int, key_major: bool = False):
    """[n_rows, n_cols] mask, True where key position <= query position.

    Rows are queries and columns keys, or the other way round when key_major.
    """
    rows = row0 + lax.broadcasted_iota(jnp.int32, (n_rows, n_cols), 0)
    cols = col0 + lax.broadcasted_iota(jnp.int32, (n_rows, n_cols), 1)
    return rows <= cols if key_major else cols <= rows


def _online_step(carry, s, v):
    """Folds logits s [bq, bk] (masked entries already MASKED_LOGIT) and v into (m, l, acc)."""
    m, l, acc = carry
    m_new = jnp.maximum(m, s.max(axis=1))
    p = jnp.exp(s - m_new[:, None])
    alpha = jnp.exp(m - m_new)
    l = alpha * l + p.sum(axis=1)
    acc = alpha[:, None] * acc + _dot(p.astype(v.dtype), v)
    return m_new, l, acc


def _own_key_range(row0, plan: _Plan):
    """Key blocks seen by the query block starting at row0: [lo, mid) unmasked, [mid, hi) masked."""
    bq, bk = plan.block_q, plan.block_k
    seg_start = (row0 // plan.segment) * plan.segment
    return seg_start // bk, row0 // bk, (row0 + bq + bk - 1) // bk


def _own_query_range(col0, plan: _Plan):
    """Query blocks seeing the key block starting at col0: [lo, mid) masked, [mid, hi) unmasked."""
    bq, bk = plan.block_q, plan.block_k
    seg_end = jnp.minimum((col0 // plan.segment + 1) * plan.segment, plan.padded_len)
    hi = seg_end // bq
    return col0 // bq, jnp.minimum((col0 + bk + bq - 1) // bq, hi), hi


def _trip_count(chunk, n_blocks: int):
    """n_blocks for a used tile (chunk >= 0), 0 for an unused one (chunk -1).

    Integer arithmetic, not jnp.where: the Triton lowering of jax 0.10 turns a select between two
    scalar literals into an i1 select, which breaks the scf.for bounds.
    """
    return (chunk >= 0).astype(jnp.int32) * n_blocks


# ----------------------------------------------------------------------------- own-chunk kernels


def _own_fwd_kernel(q_ref, k_ref, v_ref, o_ref, lse_ref, *, plan: _Plan):
    bq, bk = plan.block_q, plan.block_k
    row0 = pl.program_id(1) * bq
    q = q_ref[...]
    lo, mid, hi = _own_key_range(row0, plan)

    def key_block(j, carry, masked):
        k = k_ref[pl.ds(j * bk, bk), :]
        v = v_ref[pl.ds(j * bk, bk), :]
        s = _dot_nt(q, k) * plan.scale
        if masked:
            s = jnp.where(_causal(row0, bq, j * bk, bk), s, MASKED_LOGIT)
        return _online_step(carry, s, v)

    carry = (
        jnp.full((bq,), MASKED_LOGIT, jnp.float32),
        jnp.zeros((bq,), jnp.float32),
        jnp.zeros((bq, plan.head_dim), jnp.float32),
    )
    carry = lax.fori_loop(lo, mid, functools.partial(key_block, masked=False), carry)
    # Every row meets its own diagonal key in the first masked block, so m is real from there.
    m, l, acc = lax.fori_loop(mid, hi, functools.partial(key_block, masked=True), carry)
    o_ref[...] = (acc / l[:, None]).astype(o_ref.dtype)
    lse_ref[...] = m + jnp.log(l)


def _own_dq_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dq_ref, *, plan: _Plan):
    bq, bk = plan.block_q, plan.block_k
    row0 = pl.program_id(1) * bq
    q, do = q_ref[...], do_ref[...]
    lse, delta = lse_ref[...], delta_ref[...]
    lo, mid, hi = _own_key_range(row0, plan)

    def key_block(j, dq, masked):
        k = k_ref[pl.ds(j * bk, bk), :]
        v = v_ref[pl.ds(j * bk, bk), :]
        p = jnp.exp(_dot_nt(q, k) * plan.scale - lse[:, None])
        if masked:
            p = jnp.where(_causal(row0, bq, j * bk, bk), p, 0.0)
        ds = p * (_dot_nt(do, v) - delta[:, None])
        return dq + _dot(ds.astype(k.dtype), k)

    dq = jnp.zeros((bq, plan.head_dim), jnp.float32)
    dq = lax.fori_loop(lo, mid, functools.partial(key_block, masked=False), dq)
    dq = lax.fori_loop(mid, hi, functools.partial(key_block, masked=True), dq)
    dq_ref[...] = dq * plan.scale


def _own_dkv_kernel(
    q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dk_ref, dv_ref, *, plan: _Plan
):
    bq, bk = plan.block_q, plan.block_k
    col0 = pl.program_id(1) * bk
    k, v = k_ref[...], v_ref[...]
    lo, mid, hi = _own_query_range(col0, plan)

    def query_block(i, carry, masked):
        dk, dv = carry
        q = q_ref[pl.ds(i * bq, bq), :]
        do = do_ref[pl.ds(i * bq, bq), :]
        lse = lse_ref[pl.ds(i * bq, bq)]
        delta = delta_ref[pl.ds(i * bq, bq)]
        # Key-major [bk, bq] blocks: dk and dv are then plain matmuls.
        p = jnp.exp(_dot_nt(k, q) * plan.scale - lse[None, :])
        if masked:
            p = jnp.where(_causal(col0, bk, i * bq, bq, key_major=True), p, 0.0)
        ds = p * (_dot_nt(v, do) - delta[None, :])
        dv = dv + _dot(p.astype(do.dtype), do)
        dk = dk + _dot(ds.astype(q.dtype), q)
        return dk, dv

    zeros = jnp.zeros((bk, plan.head_dim), jnp.float32)
    carry = lax.fori_loop(lo, mid, functools.partial(query_block, masked=True), (zeros, zeros))
    dk, dv = lax.fori_loop(mid, hi, functools.partial(query_block, masked=False), carry)
    dk_ref[...] = dk * plan.scale
    dv_ref[...] = dv


# ----------------------------------------------------------------------------- pair kernels


def _pairs_fwd_kernel(chunk_ref, q_ref, k_ref, v_ref, o_ref, lse_ref, *, plan: _Plan):
    bk, size = plan.block_k, plan.pair_tile
    chunk = chunk_ref[pl.program_id(1)]
    n_blocks = plan.chunk_size // bk
    first = chunk * n_blocks
    q = q_ref[...]

    def key_block(j, carry):
        k = k_ref[pl.ds((first + j) * bk, bk), :]
        v = v_ref[pl.ds((first + j) * bk, bk), :]
        # Candidate chunks are complete and wholly before the query: nothing to mask.
        return _online_step(carry, _dot_nt(q, k) * plan.scale, v)

    carry = (
        jnp.full((size,), MASKED_LOGIT, jnp.float32),
        jnp.zeros((size,), jnp.float32),
        jnp.zeros((size, plan.head_dim), jnp.float32),
    )
    # Unused tiles (chunk -1) run no iteration and report an empty softmax (o = 0, lse masked).
    m, l, acc = lax.fori_loop(0, _trip_count(chunk, n_blocks), key_block, carry)
    some = l > 0
    l_safe = jnp.where(some, l, 1.0)
    o_ref[...] = acc / l_safe[:, None]
    lse_ref[...] = jnp.where(some, m + jnp.log(l_safe), MASKED_LOGIT)


def _pairs_dq_kernel(
    chunk_ref, q_ref, do_ref, lse_ref, delta_ref, k_ref, v_ref, dq_ref, *, plan: _Plan
):
    bk, size = plan.block_k, plan.pair_tile
    chunk = chunk_ref[pl.program_id(1)]
    n_blocks = plan.chunk_size // bk
    first = chunk * n_blocks
    q, do = q_ref[...], do_ref[...]
    lse, delta = lse_ref[...], delta_ref[...]

    def key_block(j, dq):
        k = k_ref[pl.ds((first + j) * bk, bk), :]
        v = v_ref[pl.ds((first + j) * bk, bk), :]
        p = jnp.exp(_dot_nt(q, k) * plan.scale - lse[:, None])  # empty rows: lse = +1e30
        ds = p * (_dot_nt(do, v) - delta[:, None])
        return dq + _dot(ds.astype(k.dtype), k)

    dq = jnp.zeros((size, plan.head_dim), jnp.float32)
    dq = lax.fori_loop(0, _trip_count(chunk, n_blocks), key_block, dq)
    dq_ref[...] = dq * plan.scale


def _pairs_dkv_kernel(
    start_ref,
    count_ref,
    q_ref,
    do_ref,
    lse_ref,
    delta_ref,
    k_ref,
    v_ref,
    dk_ref,
    dv_ref,
    *,
    plan: _Plan,
):
    size = plan.pair_tile
    chunk = pl.program_id(1)
    first = start_ref[chunk]
    k, v = k_ref[...], v_ref[...]

    def tile(t, carry):
        dk, dv = carry
        rows = pl.ds((first + t) * size, size)
        q, do = q_ref[rows, :], do_ref[rows, :]
        lse, delta = lse_ref[rows], delta_ref[rows]
        p = jnp.exp(_dot_nt(k, q) * plan.scale - lse[None, :])  # [bk, P]; empty rows give 0
        ds = p * (_dot_nt(v, do) - delta[None, :])
        dv = dv + _dot(p.astype(do.dtype), do)
        dk = dk + _dot(ds.astype(q.dtype), q)
        return dk, dv

    zeros = jnp.zeros((plan.block_k, plan.head_dim), jnp.float32)
    dk, dv = lax.fori_loop(0, count_ref[chunk], tile, (zeros, zeros))
    dk_ref[...] = dk * plan.scale
    dv_ref[...] = dv


# ----------------------------------------------------------------------------- pallas calls


def _call(kernel, plan: _Plan, grid, in_specs, out_specs, out_shape, name: str):
    return pl.pallas_call(
        functools.partial(kernel, plan=plan),
        grid=grid,
        in_specs=in_specs,
        out_specs=out_specs,
        out_shape=out_shape,
        # Naming the Triton params explicitly keeps JAX from routing to Mosaic GPU.
        compiler_params=plgpu.CompilerParams(num_warps=plan.num_warps, num_stages=plan.num_stages),
        interpret=plan.interpret,
        name=name,
    )


def _whole(length: int, d: int | None = None):
    """BlockSpec of a group's whole [length, d] (or [length]) slab."""
    if d is None:
        return pl.BlockSpec((None, length), lambda g, *_: (g, 0))
    return pl.BlockSpec((None, length, d), lambda g, *_: (g, 0, 0))


def _rows_spec(rows: int, d: int | None = None):
    """BlockSpec of row block program_id(1) of a group ([rows, d] or [rows])."""
    if d is None:
        return pl.BlockSpec((None, rows), lambda g, i: (g, i))
    return pl.BlockSpec((None, rows, d), lambda g, i: (g, i, 0))


def _own_forward(q, k, v, plan: _Plan):
    g, tp, d = q.shape
    bq = plan.block_q
    f32 = jnp.float32
    return _call(
        _own_fwd_kernel,
        plan,
        grid=(g, tp // bq),
        in_specs=[_rows_spec(bq, d), _whole(tp, d), _whole(tp, d)],
        out_specs=[_rows_spec(bq, d), _rows_spec(bq)],
        out_shape=[jax.ShapeDtypeStruct((g, tp, d), f32), jax.ShapeDtypeStruct((g, tp), f32)],
        name="topk_own_fwd",
    )(q, k, v)


def _own_backward(q, k, v, do, lse, delta, plan: _Plan):
    g, tp, d = q.shape
    bq, bk = plan.block_q, plan.block_k
    f32 = jnp.float32
    dq = _call(
        _own_dq_kernel,
        plan,
        grid=(g, tp // bq),
        in_specs=[
            _rows_spec(bq, d),
            _whole(tp, d),
            _whole(tp, d),
            _rows_spec(bq, d),
            _rows_spec(bq),
            _rows_spec(bq),
        ],
        out_specs=_rows_spec(bq, d),
        out_shape=jax.ShapeDtypeStruct((g, tp, d), f32),
        name="topk_own_dq",
    )(q, k, v, do, lse, delta)
    dk, dv = _call(
        _own_dkv_kernel,
        plan,
        grid=(g, tp // bk),
        in_specs=[
            _whole(tp, d),
            _rows_spec(bk, d),
            _rows_spec(bk, d),
            _whole(tp, d),
            _whole(tp),
            _whole(tp),
        ],
        out_specs=[_rows_spec(bk, d), _rows_spec(bk, d)],
        out_shape=[jax.ShapeDtypeStruct((g, tp, d), f32)] * 2,
        name="topk_own_dkv",
    )(q, k, v, do, lse, delta)
    return dq, dk, dv


def _pairs_forward(q_tiles, k, v, tile_chunk, plan: _Plan):
    """Per tile slot (o [G, M*P, D], lse [G, M*P]) over the slot's chunk.

    tile_chunk: int32 [G, M] from `_launched_chunks`.
    """
    g, tp, d = k.shape
    m, size = plan.n_tiles, plan.pair_tile
    f32 = jnp.float32
    return _call(
        _pairs_fwd_kernel,
        plan,
        grid=(g, m),
        in_specs=[_whole(m), _rows_spec(size, d), _whole(tp, d), _whole(tp, d)],
        out_specs=[_rows_spec(size, d), _rows_spec(size)],
        out_shape=[
            jax.ShapeDtypeStruct((g, m * size, d), f32),
            jax.ShapeDtypeStruct((g, m * size), f32),
        ],
        name="topk_pairs_fwd",
    )(tile_chunk, q_tiles, k, v)


def _pairs_backward(q_t, do_t, lse_t, delta_t, k, v, tiles: PairTiles, plan: _Plan):
    """Per tile slot dq [G, M*P, D] and per candidate-chunk key dk, dv [G, nCand*chunk, D]."""
    g, tp, d = k.shape
    m, size, bk = plan.n_tiles, plan.pair_tile, plan.block_k
    slots = m * size
    f32 = jnp.float32
    dq = _call(
        _pairs_dq_kernel,
        plan,
        grid=(g, m),
        in_specs=[
            _whole(m),
            _rows_spec(size, d),
            _rows_spec(size, d),
            _rows_spec(size),
            _rows_spec(size),
            _whole(tp, d),
            _whole(tp, d),
        ],
        out_specs=_rows_spec(size, d),
        out_shape=jax.ShapeDtypeStruct((g, slots, d), f32),
        name="topk_pairs_dq",
    )(_launched_chunks(tiles), q_t, do_t, lse_t, delta_t, k, v)
    n_kb = plan.chunk_size // bk
    key_spec = pl.BlockSpec((None, bk, d), lambda gi, c, j: (gi, c * n_kb + j, 0))
    dk, dv = _call(
        _pairs_dkv_kernel,
        plan,
        grid=(g, plan.n_candidates, n_kb),
        in_specs=[
            _whole(plan.n_candidates),
            _whole(plan.n_candidates),
            _whole(slots, d),
            _whole(slots, d),
            _whole(slots),
            _whole(slots),
            key_spec,
            key_spec,
        ],
        out_specs=[key_spec, key_spec],
        out_shape=[jax.ShapeDtypeStruct((g, plan.n_candidates * plan.chunk_size, d), f32)] * 2,
        name="topk_pairs_dkv",
    )(tiles.first_tile, tiles.tile_count, q_t, do_t, lse_t, delta_t, k, v)
    return dq, dk, dv


# ----------------------------------------------------------------------------- tiles (XLA)


def _launched_chunks(tiles: PairTiles):
    """int32 [G, M]: each tile's chunk, -1 for an unused tile (its kernels run no iteration)."""
    used = jnp.arange(tiles.chunk.shape[1]) < tiles.n_used[:, None]
    return jnp.where(used, tiles.chunk, -1)


# ----------------------------------------------------------------------------- custom VJP


def _forward(q, k, v, sel, plan: _Plan):
    """q, k, v [G, Tp, D]; sel [G, Tp, n_pick] -> (o [G,Tp,D] fp32, lse [G,Tp], tiles | None)."""
    o, lse = _own_forward(q, k, v, plan)
    if not plan.use_pairs:
        return o, lse, None
    tiles = pack_pair_tiles(
        sel, pair_tile=plan.pair_tile, n_tiles=plan.n_tiles, n_candidates=plan.n_candidates
    )
    o_p, lse_p = _pairs_forward(gather_rows(q, tiles.rows, 0), k, v, _launched_chunks(tiles), plan)
    o, lse = merge_own_and_picks(o, lse, o_p, lse_p, tiles.slot)
    return o, lse, tiles


def _backward(plan: _Plan, residuals, d_o, delta):
    q, k, v, _, lse, tiles = residuals
    do = d_o.astype(q.dtype)
    dq, dk, dv = _own_backward(q, k, v, do, lse, delta, plan)
    if plan.use_pairs:
        q_t, do_t, lse_t, delta_t = tile_operands(tiles, q, do, lse, delta)
        dq_t, dk_p, dv_p = _pairs_backward(q_t, do_t, lse_t, delta_t, k, v, tiles, plan)
        dq = dq + sum_over_picks(dq_t, tiles.slot)
        tail = ((0, 0), (0, plan.padded_len - dk_p.shape[1]), (0, 0))
        dk, dv = dk + jnp.pad(dk_p, tail), dv + jnp.pad(dv_p, tail)
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype)


_attention = attention_vjp(_forward, _backward)


# ----------------------------------------------------------------------------- public API


def topk_chunk_attention_gpu(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    chunk_size: int,
    top_k: int,
    block_sizes: BlockSizes | None = None,
    interpret: bool = False,
    return_lse: bool = False,
):
    """Top-k chunk sparse attention (SPEC §4 train semantics) with Pallas-Triton GPU kernels.

    Exact cost: own-chunk causal flash attention plus packed (query, selected chunk) pair
    tiles, merged by log-sum-exp; differentiable in q, k, v (selection is not differentiated).

    Args:
      q, k, v: [B, T, H, D] fp32 or bf16; any T (padded internally).
      chunk_size: chunk length, chunks aligned at position 0. When T > chunk_size * top_k it
        must be a multiple of 16 (kernel blocks divide it).
      top_k: chunks attended per query, own chunk included (>= 1).
      block_sizes: kernel block sizes, `BlockSizes.get_default()` when None.
      interpret: run the kernels in Pallas interpret mode (CPU tests).
      return_lse: also return the fp32 log-sum-exp of the scaled logits (differentiable).

    Returns:
      o [B, T, H, D] in q.dtype, or (o, lse [B, T, H] fp32) when return_lse.
    """
    validate_args(q, k, v, chunk_size, top_k)
    plan = _make_plan(
        q.shape,
        chunk_size,
        top_k,
        options_or_default(block_sizes, BlockSizes, "block_sizes"),
        interpret,
    )
    b, t, h, d = q.shape

    def kernel_layout(x):  # [B, T, H, D] -> [B*H, Tp, Dp], dtype kept
        return jnp.pad(to_groups(x, plan.padded_len), ((0, 0), (0, 0), (0, plan.head_dim - d)))

    if plan.use_pairs:
        sel = to_groups(select_chunks(q, k, chunk_size, top_k), plan.padded_len, fill=-1)
    else:
        sel = jnp.zeros((b * h, plan.padded_len, 0), jnp.int32)
    o, lse = _attention(kernel_layout(q), kernel_layout(k), kernel_layout(v), sel, plan)
    o = from_groups(o, b, t)[..., :d].astype(q.dtype)
    if return_lse:
        return o, from_groups(lse, b, t)
    return o


def gpu_work_fraction(
    seq_len: int,
    *,
    chunk_size: int,
    top_k: int,
    block_sizes: BlockSizes | None = None,
    sel=None,
) -> float:
    """Fraction of the dense-causal (query, key) products the forward kernels compute, per head.

    Counts every own-chunk block visited (bq * bk products, masked parts included) and every pair
    tile times chunk_size keys (empty rows included), over T(T+1)/2. The backward visits the same
    blocks. Computed from shapes, no kernel run.

    Args:
      seq_len: T.
      chunk_size, top_k, block_sizes: as in `topk_chunk_attention_gpu`.
      sel: optional int32 [B, T, H, top_k - 1] selection (`select_chunks`); when given, tiles are
        counted exactly (averaged over batch and heads), else the static bound the kernels launch.

    Returns:
      Visited products / (T (T + 1) / 2).
    """
    if not is_int(seq_len) or seq_len < 1:
        raise ValueError(f"seq_len must be an int >= 1, got {seq_len!r}")
    block_sizes = options_or_default(block_sizes, BlockSizes, "block_sizes")
    dummy = jax.ShapeDtypeStruct((1, seq_len, 1, 1), jnp.float32)
    validate_args(dummy, dummy, dummy, chunk_size, top_k)
    plan = _make_plan(dummy.shape, chunk_size, top_k, block_sizes, False)
    bq, bk, pair_tile = plan.block_q, plan.block_k, plan.pair_tile
    own = 0
    for i in range(plan.padded_len // bq):
        row0 = i * bq
        lo = (row0 // plan.segment) * plan.segment // bk
        own += ((row0 + bq + bk - 1) // bk - lo) * bq * bk
    tiles = 0.0
    if plan.use_pairs:
        tiles = float(plan.n_tiles)
        if sel is not None:
            picks = np.asarray(sel)
            if picks.shape[:2] != (picks.shape[0], seq_len) or picks.shape[-1] != plan.n_pick:
                raise ValueError(f"sel must be [B, {seq_len}, H, {plan.n_pick}], got {picks.shape}")
            picks = np.moveaxis(picks, 2, 1).reshape(-1, seq_len * plan.n_pick)
            used = []
            for group in picks:
                counts = np.bincount(group[group >= 0], minlength=plan.n_candidates)
                used.append(int((-(-counts // pair_tile)).sum()))
            tiles = float(np.mean(used))
    pairs = tiles * pair_tile * chunk_size
    return (own + pairs) / (seq_len * (seq_len + 1) / 2)
