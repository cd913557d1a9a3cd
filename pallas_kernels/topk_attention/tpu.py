"""Top-k chunk sparse attention (SPEC §4) as TPU (Mosaic) Pallas kernels, exact cost, custom VJP.

Design (oracle: `reference.topk_chunk_attention_reference`; the pure-JAX twin is
`xla_chunked.topk_chunk_attention` with method="pairs"):

* Selection runs in XLA (`reference.select_chunks`, fp32, not differentiated). Inputs go
  head-major, [G = B*H, Tp, D] (Tp = T padded to whole blocks); batch and heads are the first
  grid axis, never a vmap.
* Own chunk: blocked causal flash attention, grid (G, query block, key block of the segment).
  A segment is one chunk, or the whole sequence when T <= chunk_size * top_k (then every
  earlier chunk is selected and the result is dense causal attention). Blocks above the
  diagonal are skipped under `pl.when`, and their key/value index map is clamped to the last
  needed block so a skipped step issues no DMA.
* Selected chunks ("pairs"): the (query, selected chunk) pairs of each group are sorted by
  chunk in XLA and packed into tiles of `pair_tile` rows that share one chunk (each chunk's run
  padded to whole tiles; empty slots point at a zero dummy row; `plan.pack_pair_tiles`, shared
  with the XLA and GPU versions). The tile queries are gathered into tile order in XLA. The
  kernel grid is (G, tile, key block of the tile's chunk), driven by two scalar-prefetched
  [G, n_tiles] int32 arrays: the tile's chunk and a packed word (`tile_info`: source tile,
  valid, first tile of its chunk). Unused tail tiles (the tile count is a static
  bound) repeat the last used tile's block indices and compute nothing, so they cost a grid
  step but no DMA. Because those tail steps share the last used tile's output block, the
  tile axis is "arbitrary" (sequential on one core); only batch*heads is "parallel", so keep
  B*H >= 2 for two-core chips. The two partial softmaxes are merged by log-sum-exp in XLA
  (`plan.merge_own_and_picks`).
* Backward (one custom_vjp, FlashAttention-2 recompute from the saved log-sum-exp,
  delta = rowsum(o * do) - dlse): own part dq kernel and dk/dv kernel; pairs dq kernel over
  tiles (scattered back to queries by a gather in XLA) and a dk/dv kernel with grid
  (G, key block j within a chunk, tile). Tiles are sorted by chunk, so for a fixed j the output
  block (chunk, j) is revisited on consecutive steps only and is accumulated in place; it
  starts from the own part's dk/dv (input/output aliasing), so key blocks no tile touches keep
  the own gradients and nothing is materialised per tile. This (j, chunk) order needs only the
  per-tile metadata above instead of a flattened per-step work list.
* Backward kernels are key-major (logits as [keys, queries]), so the per-query log-sum-exp and
  delta are lane rows [1, block] of [G, 1, Tp] arrays and dk/dv are plain matmuls; dq uses a
  transposed-lhs product. Forward kernels are query-major and keep m/l as [block, 128]
  lane-broadcast scratch; lse leaves as a row after one in-kernel transpose.
* Softmax, accumulation and all partial results are fp32; fp32 operands use HIGHEST precision,
  bf16 operands go to the MXU as bf16 with fp32 accumulation.
* Work (query-key products): T * chunk / 2 for the own part (whole blocks) plus
  n_tiles * pair_tile * chunk for the pairs; `tpu_work_fraction` reports it against dense
  causal T(T+1)/2 (16.6% at T=64K, chunk 2048, top_k 3, blocks 512, tile 256).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

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

_F32 = jnp.float32
_HIGHEST = lax.Precision.HIGHEST
_LANES = 128
_SUBLANES = 8
# Dot dimension numbers (contracting dims of lhs, rhs).
_NN = ((1,), (0,))
_NT = ((1,), (1,))
_TN = ((0,), (0,))


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Block sizes of the TPU kernels: positive multiples of 8 (sublanes).

    Compiled kernels further need multiples of 128 (log-sum-exp and delta travel as lane rows
    of a block's length); that is checked at the call, which knows whether it is compiled.

    Attributes:
      block_q: query rows of a flash block (capped at chunk_size).
      block_k: key rows of a flash block and of the pair kernels' key blocks (capped likewise).
      pair_tile: (query, chunk) pairs per tile.
    """

    block_q: int = 512
    block_k: int = 512
    pair_tile: int = 256

    def __post_init__(self):
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if not is_int(value) or value <= 0 or value % _SUBLANES:
                raise ValueError(
                    f"BlockSizes.{field.name} must be a positive multiple of {_SUBLANES}, "
                    f"got {value!r}"
                )

    @classmethod
    def get_default(cls) -> BlockSizes:
        """The sizes the kernels use when none are given: 512 x 512 blocks, tiles of 256."""
        return cls()


class _Plan(NamedTuple):
    """Static description of one call (hashable: it is a nondiff argument of the custom VJP)."""

    padded_len: int  # Tp: T rounded up to whole query and key blocks
    block_q: int
    block_k: int
    segment: int  # rows of one causal segment: chunk_size, or padded_len in the dense regime
    chunk_size: int
    pairs: bool  # whether selected chunks exist (sparse regime and top_k > 1)
    n_candidates: int  # chunks that can be selected: all but the last
    pair_tile: int
    n_tiles: int  # static upper bound on pair tiles per group
    scale: float
    interpret: Any  # False, True or pltpu.InterpretParams


# ----------------------------------------------------------------------------- planning


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def _check_interpret(interpret) -> None:
    if not (isinstance(interpret, bool) or isinstance(interpret, pltpu.InterpretParams)):
        raise ValueError(
            f"interpret must be False, True or a pltpu.InterpretParams, got {interpret!r}"
        )


def _make_plan(
    seq_len: int, head_dim: int, chunk_size: int, top_k: int, block_sizes: BlockSizes, interpret
) -> _Plan:
    """Chooses the regime and checks the block sizes against Mosaic's tiling rules.

    Compiled kernels need blocks that are multiples of 128 (log-sum-exp and delta travel as
    lane rows of a block's length); interpret mode accepts multiples of 8 for small tests.
    """
    _check_interpret(interpret)
    if interpret is False:
        for field in dataclasses.fields(block_sizes):
            value = getattr(block_sizes, field.name)
            if value % _LANES:
                raise ValueError(
                    f"BlockSizes.{field.name} must be a multiple of {_LANES} for compiled TPU "
                    f"kernels, got {value!r}"
                )
    align = _SUBLANES if interpret is not False else _LANES
    block_q, block_k, pair_tile = block_sizes.block_q, block_sizes.block_k, block_sizes.pair_tile
    n_chunks = -(-seq_len // chunk_size)
    n_pick = top_k - 1
    if is_dense_causal(seq_len, chunk_size, top_k):
        # One causal segment spanning the sequence, no selection. A short sequence is one
        # block equal to the full length.
        if seq_len <= min(block_q, block_k):
            bq = bk = padded = _round_up(seq_len, _SUBLANES)
        else:
            bq, bk = block_q, block_k
            padded = _round_up(seq_len, math.lcm(bq, bk))
        segment, pairs = padded, False
    else:
        bq, bk = min(block_q, chunk_size), min(block_k, chunk_size)
        if chunk_size % bq or chunk_size % bk or bq % align or bk % align:
            raise ValueError(
                f"chunk_size {chunk_size} must be a multiple of the query and key blocks "
                f"(block_q {block_q}, block_k {block_k}, capped at chunk_size), each a multiple "
                f"of {align}"
            )
        padded = _round_up(seq_len, math.lcm(bq, bk))
        segment, pairs = chunk_size, n_pick > 0
    n_candidates = n_chunks - 1
    n_tiles = 0
    if pairs:
        n_tiles = max_pair_tiles(count_pairs(seq_len, chunk_size, n_pick), n_candidates, pair_tile)
    return _Plan(
        padded_len=padded,
        block_q=bq,
        block_k=bk,
        segment=segment,
        chunk_size=chunk_size,
        pairs=pairs,
        n_candidates=n_candidates,
        pair_tile=pair_tile,
        n_tiles=n_tiles,
        scale=1.0 / math.sqrt(head_dim),
        interpret=interpret,
    )


def _last_key_block(q_block: int, plan: _Plan) -> int:
    """Python twin of the own-part index maps: last key block (within the segment) needed."""
    q_start = q_block * plan.block_q
    segment_start = q_start // plan.segment * plan.segment
    return (q_start + plan.block_q - 1 - segment_start) // plan.block_k


def tpu_work_fraction(
    seq_len: int,
    *,
    chunk_size: int,
    top_k: int,
    block_sizes: BlockSizes | None = None,
) -> float:
    """Query-key products the kernels compute, as a fraction of dense causal T(T+1)/2.

    Counts whole visited blocks (diagonal blocks in full, padding included) for the own part
    and the static tile bound times pair_tile * chunk_size for the pairs, so it is an upper
    bound that does not depend on the inputs. Each backward kernel pair does the same work.

    Args:
      seq_len: T.
      chunk_size, top_k, block_sizes: as in `topk_chunk_attention_tpu`.

    Returns:
      computed products / (T * (T + 1) / 2).
    """
    plan = _make_plan(
        seq_len,
        1,
        chunk_size,
        top_k,
        options_or_default(block_sizes, BlockSizes, "block_sizes"),
        False,
    )
    n_q_blocks = plan.padded_len // plan.block_q
    own = sum(_last_key_block(i, plan) + 1 for i in range(n_q_blocks)) * plan.block_q * plan.block_k
    pairs = plan.n_tiles * plan.pair_tile * plan.chunk_size
    return (own + pairs) / (seq_len * (seq_len + 1) / 2)


# ----------------------------------------------------------------------------- kernel helpers


def _dot(a, b, dims):
    """fp32-accumulated product; fp32 operands at HIGHEST (Mosaic's only exact fp32 mode)."""
    precision = _HIGHEST if a.dtype == _F32 and b.dtype == _F32 else None
    return lax.dot_general(a, b, (dims, ((), ())), precision=precision, preferred_element_type=_F32)


def _idiv(x, n: int):
    """Integer division of a traced scalar (Mosaic's scalar core has no floor-div lowering)."""
    return lax.div(x, jnp.int32(n))


def _causal(q_start, k_start, shape, key_axis: int):
    """Mask of (query, key) positions with key <= query; key_axis says which axis holds keys."""
    keys = k_start + lax.broadcasted_iota(jnp.int32, shape, key_axis)
    queries = q_start + lax.broadcasted_iota(jnp.int32, shape, 1 - key_axis)
    return keys <= queries


def _init_softmax(m_scr, l_scr, acc_scr):
    m_scr[...] = jnp.full(m_scr.shape, MASKED_LOGIT, _F32)
    l_scr[...] = jnp.zeros(l_scr.shape, _F32)
    acc_scr[...] = jnp.zeros(acc_scr.shape, _F32)


def _online_update(s, v, m_scr, l_scr, acc_scr):
    """Folds query-major logits s [bq, bk] into the running (m, l, acc) softmax state.

    m and l are [bq, 128] with all lanes equal (lane-dense VMEM); [:, :1] gives the column.
    A row never meets a fully masked block before a real one (the first key block of its
    segment holds the segment's first key, which every row sees), so masked entries always
    get exp(MASKED_LOGIT - finite) = 0 and need no second mask.
    """
    m_prev = m_scr[...]
    m_new = jnp.maximum(m_prev, s.max(axis=1, keepdims=True))
    p = jnp.exp(s - m_new[:, :1])
    alpha = jnp.exp(m_prev - m_new)
    l_scr[...] = alpha * l_scr[...] + p.sum(axis=1, keepdims=True)
    m_scr[...] = m_new
    acc_scr[...] = acc_scr[...] * alpha[:, :1] + _dot(p.astype(v.dtype), v, _NN)


def _finish_softmax(o_ref, lse_ref, m_scr, l_scr, acc_scr):
    """Writes o = acc / l and lse = m + log l, the latter as a lane row [1, bq]."""
    l = l_scr[...]
    o_ref[...] = acc_scr[...] / l[:, :1]
    lse = m_scr[...] + jnp.log(l)  # [bq, 128], lanes equal
    lse_ref[...] = lse.T[:1, :]


def _grad_terms(q, k, v, do, lse_row, delta_row, scale, mask=None):
    """Key-major recompute: p^T and ds^T, both [bk, bq] fp32 (mask: [bk, bq] bool or None)."""
    p = jnp.exp(_dot(k, q, _NT) * scale - lse_row)
    if mask is not None:
        p = jnp.where(mask, p, 0.0)
    dp = _dot(v, do, _NT)
    return p, p * (dp - delta_row)


# ----------------------------------------------------------------------------- own chunk


def _own_geometry(i, j, plan: _Plan):
    """Query start, key start, and the last needed key block of grid step (query i, key j)."""
    q_start = i * plan.block_q
    segment_start = _idiv(q_start, plan.segment) * plan.segment
    k_start = segment_start + j * plan.block_k
    last = _idiv(q_start + plan.block_q - 1 - segment_start, plan.block_k)
    return q_start, segment_start, k_start, last


def _own_kv_index(g, i, j, plan: _Plan):
    """Key block of step (i, j), clamped to the last needed one so skipped steps issue no DMA."""
    _, segment_start, _, last = _own_geometry(i, j, plan)
    return g, _idiv(segment_start, plan.block_k) + jnp.minimum(j, last), 0


def _run_causal_block(q_start, k_start, j, last, block_k, compute):
    """Calls compute(masked) for a needed block; only blocks crossing the diagonal mask."""
    crosses = k_start + block_k - 1 > q_start
    needed = j <= last
    pl.when(needed & crosses)(lambda: compute(True))
    pl.when(needed & jnp.logical_not(crosses))(lambda: compute(False))


def _own_forward_kernel(q_ref, k_ref, v_ref, o_ref, lse_ref, m_scr, l_scr, acc_scr, *, plan):
    i, j = pl.program_id(1), pl.program_id(2)
    bq, bk = plan.block_q, plan.block_k
    q_start, _, k_start, last = _own_geometry(i, j, plan)

    @pl.when(j == 0)
    def _():
        _init_softmax(m_scr, l_scr, acc_scr)

    def compute(masked):
        s = _dot(q_ref[...], k_ref[...], _NT) * plan.scale
        if masked:
            s = jnp.where(_causal(q_start, k_start, (bq, bk), 1), s, MASKED_LOGIT)
        _online_update(s, v_ref[...], m_scr, l_scr, acc_scr)

    _run_causal_block(q_start, k_start, j, last, bk, compute)

    @pl.when(j == pl.num_programs(2) - 1)
    def _():
        _finish_softmax(o_ref, lse_ref, m_scr, l_scr, acc_scr)


def _own_dq_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dq_ref, *, plan):
    i, j = pl.program_id(1), pl.program_id(2)
    bq, bk = plan.block_q, plan.block_k
    q_start, _, k_start, last = _own_geometry(i, j, plan)

    @pl.when(j == 0)
    def _():
        dq_ref[...] = jnp.zeros(dq_ref.shape, _F32)

    def compute(masked):
        k = k_ref[...]
        mask = _causal(q_start, k_start, (bk, bq), 0) if masked else None
        _, ds = _grad_terms(
            q_ref[...], k, v_ref[...], do_ref[...], lse_ref[...], delta_ref[...], plan.scale, mask
        )
        dq_ref[...] += plan.scale * _dot(ds.astype(k.dtype), k, _TN)

    _run_causal_block(q_start, k_start, j, last, bk, compute)


def _own_dkv_geometry(kb, i, plan: _Plan):
    """For key block kb and step i: key start, query block, first needed step, step in range."""
    k_start = kb * plan.block_k
    segment_start = _idiv(k_start, plan.segment) * plan.segment
    base = _idiv(segment_start, plan.block_q)
    first = _idiv(k_start - segment_start, plan.block_q)
    n_q_blocks = plan.padded_len // plan.block_q
    q_block = jnp.minimum(base + jnp.maximum(i, first), n_q_blocks - 1)
    in_range = (i >= first) & (base + i < n_q_blocks)
    return k_start, q_block, in_range


def _own_dkv_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dk_ref, dv_ref, *, plan):
    kb, i = pl.program_id(1), pl.program_id(2)
    bq, bk = plan.block_q, plan.block_k
    k_start, q_block, in_range = _own_dkv_geometry(kb, i, plan)
    q_start = q_block * bq

    @pl.when(i == 0)
    def _():
        dk_ref[...] = jnp.zeros(dk_ref.shape, _F32)
        dv_ref[...] = jnp.zeros(dv_ref.shape, _F32)

    def compute(masked):
        q, do = q_ref[...], do_ref[...]
        mask = _causal(q_start, k_start, (bk, bq), 0) if masked else None
        p, ds = _grad_terms(
            q, k_ref[...], v_ref[...], do, lse_ref[...], delta_ref[...], plan.scale, mask
        )
        dv_ref[...] += _dot(p.astype(do.dtype), do, _NN)
        dk_ref[...] += plan.scale * _dot(ds.astype(q.dtype), q, _NN)

    crosses = q_start < k_start + bk - 1
    pl.when(in_range & crosses)(lambda: compute(True))
    pl.when(in_range & jnp.logical_not(crosses))(lambda: compute(False))


def _compiler_params(n_parallel: int, n_arbitrary: int):
    return pltpu.CompilerParams(
        dimension_semantics=("parallel",) * n_parallel + ("arbitrary",) * n_arbitrary
    )


def _row_spec(block: int, index_map):
    """BlockSpec of a [G, 1, N] fp32 row array (lse, delta) read as a lane row [1, block]."""
    return pl.BlockSpec((None, 1, block), index_map)


def _own_forward(q, k, v, plan: _Plan):
    """Own-chunk causal attention: o [G, Tp, D] fp32 (normalised) and lse [G, 1, Tp] fp32."""
    g, tp, d = q.shape
    bq, bk = plan.block_q, plan.block_k
    q_spec = pl.BlockSpec((None, bq, d), lambda g, i, j: (g, i, 0))
    kv_spec = pl.BlockSpec((None, bk, d), lambda g, i, j: _own_kv_index(g, i, j, plan))
    return pl.pallas_call(
        lambda *refs: _own_forward_kernel(*refs, plan=plan),
        grid=(g, tp // bq, plan.segment // bk),
        in_specs=[q_spec, kv_spec, kv_spec],
        out_specs=[q_spec, _row_spec(bq, lambda g, i, j: (g, 0, i))],
        out_shape=[
            jax.ShapeDtypeStruct((g, tp, d), _F32),
            jax.ShapeDtypeStruct((g, 1, tp), _F32),
        ],
        scratch_shapes=[
            pltpu.VMEM((bq, _LANES), _F32),
            pltpu.VMEM((bq, _LANES), _F32),
            pltpu.VMEM((bq, d), _F32),
        ],
        compiler_params=_compiler_params(2, 1),
        interpret=plan.interpret,
    )(q, k, v)


def _own_backward(q, k, v, do, lse, delta, plan: _Plan):
    """Own-chunk gradients dq, dk, dv [G, Tp, D] fp32 (lse, delta: [G, 1, Tp] fp32)."""
    g, tp, d = q.shape
    bq, bk = plan.block_q, plan.block_k
    f32_shape = jax.ShapeDtypeStruct((g, tp, d), _F32)

    q_spec = pl.BlockSpec((None, bq, d), lambda g, i, j: (g, i, 0))
    kv_spec = pl.BlockSpec((None, bk, d), lambda g, i, j: _own_kv_index(g, i, j, plan))
    row_spec = _row_spec(bq, lambda g, i, j: (g, 0, i))
    dq = pl.pallas_call(
        lambda *refs: _own_dq_kernel(*refs, plan=plan),
        grid=(g, tp // bq, plan.segment // bk),
        in_specs=[q_spec, kv_spec, kv_spec, q_spec, row_spec, row_spec],
        out_specs=q_spec,
        out_shape=f32_shape,
        compiler_params=_compiler_params(2, 1),
        interpret=plan.interpret,
    )(q, k, v, do, lse, delta)

    def q_index(g, kb, i):
        return g, _own_dkv_geometry(kb, i, plan)[1], 0

    def row_index(g, kb, i):
        return g, 0, _own_dkv_geometry(kb, i, plan)[1]

    q_spec = pl.BlockSpec((None, bq, d), q_index)
    kv_spec = pl.BlockSpec((None, bk, d), lambda g, kb, i: (g, kb, 0))
    row_spec = _row_spec(bq, row_index)
    dk, dv = pl.pallas_call(
        lambda *refs: _own_dkv_kernel(*refs, plan=plan),
        grid=(g, tp // bk, plan.segment // bq),
        in_specs=[q_spec, kv_spec, kv_spec, q_spec, row_spec, row_spec],
        out_specs=[kv_spec, kv_spec],
        out_shape=[f32_shape, f32_shape],
        compiler_params=_compiler_params(2, 1),
        interpret=plan.interpret,
    )(q, k, v, do, lse, delta)
    return dq, dk, dv


# ----------------------------------------------------------------------------- pair tiles


def tile_info(tiles: PairTiles) -> jax.Array:
    """int32 [G, M]: the scalar-prefetched word of each tile, src * 4 + valid * 2 + first.

    src is the tile whose blocks the grid step uses (itself, or the last used tile for unused
    ones, which so issue no DMA), valid marks used tiles and first marks the first tile of a
    chunk's run (where the dk/dv kernel starts a key block from the own part's gradients).
    """
    chunk = tiles.chunk
    n_used = tiles.n_used[:, None]
    tile = jnp.arange(chunk.shape[1], dtype=jnp.int32)
    valid = tile < n_used
    src = jnp.minimum(tile, jnp.maximum(n_used - 1, 0))
    first = jnp.concatenate([jnp.ones_like(chunk[:, :1], bool), chunk[:, 1:] != chunk[:, :-1]], 1)
    return (src * 4 + valid.astype(jnp.int32) * 2 + first.astype(jnp.int32)).astype(jnp.int32)


def _tile_src(info_ref, g, t):
    return _idiv(info_ref[g, t], 4)


def _tile_valid(info_ref, g, t):
    return lax.rem(_idiv(info_ref[g, t], 2), jnp.int32(2)) == 1


def _tile_first(info_ref, g, t):
    return lax.rem(info_ref[g, t], jnp.int32(2)) == 1


def _blocks_per_chunk(plan: _Plan) -> int:
    return plan.chunk_size // plan.block_k


# ----------------------------------------------------------------------------- pairs part


def _pairs_forward_kernel(
    chunk_ref, info_ref, q_ref, k_ref, v_ref, o_ref, lse_ref, m_scr, l_scr, acc_scr, *, plan
):
    del chunk_ref
    g, t, j = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    valid = _tile_valid(info_ref, g, t)

    @pl.when(valid & (j == 0))
    def _():
        _init_softmax(m_scr, l_scr, acc_scr)

    @pl.when(valid)
    def _():
        # Selected chunks are complete and strictly earlier: nothing to mask.
        s = _dot(q_ref[...], k_ref[...], _NT) * plan.scale
        _online_update(s, v_ref[...], m_scr, l_scr, acc_scr)

    # Unused tiles write nothing: their output block is the last used tile's, still resident.
    @pl.when(valid & (j == pl.num_programs(2) - 1))
    def _():
        _finish_softmax(o_ref, lse_ref, m_scr, l_scr, acc_scr)


def _pairs_specs_tile_major(plan: _Plan, d: int):
    """Block specs for grid (G, tile, key block j): tile rows, tile rows as lanes, key blocks."""
    size, bk, bpc = plan.pair_tile, plan.block_k, _blocks_per_chunk(plan)

    def kv_index(g, t, j, chunk_ref, info_ref):
        # Unused tiles stay on the last used tile's final block: no DMA.
        j = jnp.where(_tile_valid(info_ref, g, t), j, bpc - 1)
        return g, chunk_ref[g, t] * bpc + j, 0

    tile_spec = pl.BlockSpec(
        (None, size, d), lambda g, t, j, c, info: (g, _tile_src(info, g, t), 0)
    )
    row_spec = _row_spec(size, lambda g, t, j, c, info: (g, 0, _tile_src(info, g, t)))
    kv_spec = pl.BlockSpec((None, bk, d), kv_index)
    return tile_spec, row_spec, kv_spec


def _pairs_forward(q_t, k, v, tiles: PairTiles, info, plan: _Plan):
    """Attention of each tile slot over its tile's chunk.

    Args:
      q_t: [G, n_tiles * pair_tile, D] queries in tile order.
      k, v: [G, Tp, D].

    Returns:
      o_t [G, n_tiles * pair_tile, D] fp32 (normalised), lse_t [G, 1, n_tiles * pair_tile] fp32.
      Slots of unused tiles are left unwritten.
    """
    g, n, d = q_t.shape
    size = plan.pair_tile
    tile_spec, row_spec, kv_spec = _pairs_specs_tile_major(plan, d)
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=2,
        grid=(g, plan.n_tiles, _blocks_per_chunk(plan)),
        in_specs=[tile_spec, kv_spec, kv_spec],
        out_specs=[tile_spec, row_spec],
        scratch_shapes=[
            pltpu.VMEM((size, _LANES), _F32),
            pltpu.VMEM((size, _LANES), _F32),
            pltpu.VMEM((size, d), _F32),
        ],
    )
    return pl.pallas_call(
        lambda *refs: _pairs_forward_kernel(*refs, plan=plan),
        grid_spec=grid_spec,
        out_shape=[jax.ShapeDtypeStruct((g, n, d), _F32), jax.ShapeDtypeStruct((g, 1, n), _F32)],
        compiler_params=_compiler_params(1, 2),
        interpret=plan.interpret,
    )(tiles.chunk, info, q_t, k, v)


def _pairs_dq_kernel(
    chunk_ref, info_ref, q_ref, do_ref, lse_ref, delta_ref, k_ref, v_ref, dq_ref, *, plan
):
    del chunk_ref
    g, t, j = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    valid = _tile_valid(info_ref, g, t)

    @pl.when(valid & (j == 0))
    def _():
        dq_ref[...] = jnp.zeros(dq_ref.shape, _F32)

    @pl.when(valid)
    def _():
        k = k_ref[...]
        _, ds = _grad_terms(
            q_ref[...], k, v_ref[...], do_ref[...], lse_ref[...], delta_ref[...], plan.scale
        )
        dq_ref[...] += plan.scale * _dot(ds.astype(k.dtype), k, _TN)


def _pairs_dkv_kernel(
    chunk_ref,
    info_ref,
    q_ref,
    do_ref,
    lse_ref,
    delta_ref,
    k_ref,
    v_ref,
    dk_in_ref,
    dv_in_ref,
    dk_ref,
    dv_ref,
    *,
    plan,
):
    del chunk_ref
    g, t = pl.program_id(0), pl.program_id(2)

    # First visit of this key block in the current pass: start from the own-part gradients.
    @pl.when(_tile_first(info_ref, g, t))
    def _():
        dk_ref[...] = dk_in_ref[...]
        dv_ref[...] = dv_in_ref[...]

    @pl.when(_tile_valid(info_ref, g, t))
    def _():
        q, do = q_ref[...], do_ref[...]
        p, ds = _grad_terms(q, k_ref[...], v_ref[...], do, lse_ref[...], delta_ref[...], plan.scale)
        dv_ref[...] += _dot(p.astype(do.dtype), do, _NN)
        dk_ref[...] += plan.scale * _dot(ds.astype(q.dtype), q, _NN)


def _pairs_backward(q_t, do_t, lse_t, delta_t, k, v, dk, dv, tiles: PairTiles, info, plan: _Plan):
    """Pair gradients: dq per tile slot, and dk/dv added in place to the own part's.

    Args:
      q_t, do_t: [G, N, D] tile-ordered (N = n_tiles * pair_tile); lse_t, delta_t: [G, 1, N].
      k, v: [G, Tp, D]; dk, dv: [G, Tp, D] fp32 own-part gradients (donated to the outputs).

    Returns:
      dq_t [G, N, D] fp32 (unused tiles unwritten), dk, dv [G, Tp, D] fp32 totals.
    """
    g, n, d = q_t.shape
    size, bk, bpc = plan.pair_tile, plan.block_k, _blocks_per_chunk(plan)
    tile_spec, row_spec, kv_spec = _pairs_specs_tile_major(plan, d)
    dq_t = pl.pallas_call(
        lambda *refs: _pairs_dq_kernel(*refs, plan=plan),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=2,
            grid=(g, plan.n_tiles, bpc),
            in_specs=[tile_spec, tile_spec, row_spec, row_spec, kv_spec, kv_spec],
            out_specs=tile_spec,
        ),
        out_shape=jax.ShapeDtypeStruct((g, n, d), _F32),
        compiler_params=_compiler_params(1, 2),
        interpret=plan.interpret,
    )(tiles.chunk, info, q_t, do_t, lse_t, delta_t, k, v)

    # Grid (G, j, tile): for a fixed j the key block (chunk, j) is revisited only while the
    # sorted tiles stay on that chunk, i.e. on consecutive steps.
    tile_spec = pl.BlockSpec(
        (None, size, d), lambda g, j, t, c, info: (g, _tile_src(info, g, t), 0)
    )
    row_spec = _row_spec(size, lambda g, j, t, c, info: (g, 0, _tile_src(info, g, t)))
    kv_spec = pl.BlockSpec((None, bk, d), lambda g, j, t, c, info: (g, c[g, t] * bpc + j, 0))
    f32_shape = jax.ShapeDtypeStruct(dk.shape, _F32)
    dk, dv = pl.pallas_call(
        lambda *refs: _pairs_dkv_kernel(*refs, plan=plan),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=2,
            grid=(g, bpc, plan.n_tiles),
            in_specs=[tile_spec, tile_spec, row_spec, row_spec] + [kv_spec] * 4,
            out_specs=[kv_spec, kv_spec],
        ),
        out_shape=[f32_shape, f32_shape],
        # Operand indices count the two scalar-prefetch arrays: dk_in is 8, dv_in is 9.
        input_output_aliases={8: 0, 9: 1},
        compiler_params=_compiler_params(1, 2),
        interpret=plan.interpret,
    )(tiles.chunk, info, q_t, do_t, lse_t, delta_t, k, v, dk, dv)
    return dq_t, dk, dv


# ----------------------------------------------------------------------------- custom VJP


def _forward(q, k, v, sel, plan: _Plan):
    """Returns o [G,Tp,D] fp32, lse [G,Tp] fp32 and the (tiles, info) (None without pairs)."""
    o, lse = _own_forward(q, k, v, plan)
    lse = lse[:, 0]
    if not plan.pairs:
        return o, lse, None
    tiles = pack_pair_tiles(
        sel, pair_tile=plan.pair_tile, n_tiles=plan.n_tiles, n_candidates=plan.n_candidates
    )
    info = tile_info(tiles)
    o_t, lse_t = _pairs_forward(gather_rows(q, tiles.rows, 0.0), k, v, tiles, info, plan)
    # Slots of unused tiles were never written (they may hold NaN): no pick points at them.
    o, lse = merge_own_and_picks(o, lse, o_t, lse_t[:, 0], tiles.slot)
    return o, lse, (tiles, info)


def _backward(plan: _Plan, residuals, d_out, delta):
    q, k, v, _, lse, pair_tiles = residuals
    do = d_out.astype(q.dtype)  # MXU operand dtype
    dq, dk, dv = _own_backward(q, k, v, do, lse[:, None], delta[:, None], plan)
    if plan.pairs:
        tiles, info = pair_tiles
        q_t, do_t, lse_t, delta_t = tile_operands(tiles, q, do, lse, delta)
        dq_t, dk, dv = _pairs_backward(
            q_t, do_t, lse_t[:, None], delta_t[:, None], k, v, dk, dv, tiles, info, plan
        )
        dq = dq + sum_over_picks(dq_t, tiles.slot)
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype)


_attention = attention_vjp(_forward, _backward)


# ----------------------------------------------------------------------------- public API


def topk_chunk_attention_tpu(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    chunk_size: int,
    top_k: int,
    block_sizes: BlockSizes | None = None,
    interpret=False,
    return_lse: bool = False,
):
    """Top-k chunk sparse attention (SPEC §4 train semantics) with TPU Pallas kernels.

    Exact cost: about T * chunk_size / 2 + T * (top_k - 1) * chunk_size query-key products per
    head (see `tpu_work_fraction`), O(T * (D + top_k)) memory.

    Args:
      q, k, v: [B, T, H, D], one float dtype (fp32 or bf16); T need not be a multiple of the
        chunk. D is a block's full last dim (64 or 128 in practice).
      chunk_size: chunk length, chunks aligned at position 0. When T > chunk_size * top_k it
        must be a multiple of the (capped) block sizes.
      top_k: chunks attended per query, own chunk included (>= 1).
      block_sizes: kernel block sizes, `BlockSizes.get_default()` when None; multiples of 128
        when compiled, of 8 in interpret mode.
      interpret: False (compile with Mosaic), True (Pallas interpreter) or a
        `pltpu.InterpretParams` (TPU interpret mode with DMA/race simulation).
      return_lse: also return the fp32 log-sum-exp of each query's logits, [B, T, H]
        (differentiable).

    Returns:
      o [B, T, H, D] in q.dtype, or (o, lse [B, T, H] fp32) when return_lse.
    """
    validate_args(q, k, v, chunk_size, top_k)
    if not (q.dtype == k.dtype == v.dtype) or not jnp.issubdtype(q.dtype, jnp.floating):
        raise ValueError(f"q, k, v must share one float dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    b, t, h, d = q.shape
    block_sizes = options_or_default(block_sizes, BlockSizes, "block_sizes")
    plan = _make_plan(t, d, int(chunk_size), int(top_k), block_sizes, interpret)
    tp = plan.padded_len
    if plan.pairs:
        sel = to_groups(select_chunks(q, k, plan.chunk_size, top_k), tp, fill=-1)
    else:
        sel = jnp.zeros((b * h, tp, 0), jnp.int32)
    o, lse = _attention(to_groups(q, tp), to_groups(k, tp), to_groups(v, tp), sel, plan)
    o = from_groups(o, b, t).astype(q.dtype)
    if return_lse:
        return o, from_groups(lse, b, t)
    return o
