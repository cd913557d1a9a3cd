"""Top-k chunk attention in pure JAX with O(T * chunk) memory and a flash-style custom VJP.

Design (SPEC §4 train semantics; the oracle is `reference.topk_chunk_attention_reference`):

* Every query attends (a) its own chunk causally and (b) all keys of up to top_k - 1 selected
  earlier chunks. Part (a) is a blocked causal flash attention: query blocks of `block` rows
  (a divisor of chunk_size, at most `block_size`) loop over the key blocks of their chunk with
  an online fp32 softmax; blocks above the diagonal are never computed.
* Part (b) has two implementations (`method`):
  - "pairs" (default): exact cost. The (query, selected chunk) pairs of each (batch, head) are
    sorted by chunk and packed into tiles of `pair_tile` pairs that share one chunk, so a tile
    is one [tile, D] x [D, chunk] matmul against a contiguous key chunk (`plan.pack_pair_tiles`,
    shared with the Pallas versions). Tiles are folded into the per-query online-softmax state
    (`fold_pair_tiles`). Work is T * (top_k - 1) * chunk per head.
  - "blocks": dense by block. Each query block also loops over every key block of every
    earlier chunk, masking rows that did not select that chunk and skipping a block only when
    no row of any (batch, head) in it selected the chunk. Work is ~T²/2 per head whatever
    top_k is (random queries leave nothing to skip), so it loses once T is a few chunks past
    chunk_size * top_k; it is kept as an independent cross-check.
  Measured on a shared 2-core CPU, fp32, B=1, H=12, D=64, chunk 2048, top_k 3, random inputs
  (timings +-30% with the machine's load):
    T=16K  forward        pairs 3.4 s    blocks 6.0 s
    T=16K  forward+grads  pairs 10.5 s   blocks 21.9 s
    T=64K  forward        pairs 20-25 s (2.5 GiB peak RSS)   blocks 79 s
    T=64K  forward+grads  pairs 77 s (4.4 GiB peak RSS)
  Gathering each query's selected keys directly was not pursued: it moves chunk * D keys
  per (query, chunk) pair, memory-bound, while a tile reuses one key chunk for `pair_tile`
  queries at matmul speed.
* When T <= chunk_size * top_k every earlier chunk is selected: no selection is computed and
  the whole sequence is one causal segment (plain blocked causal attention). T=4096 (the
  benchmark model's case): forward 0.37-0.53 s vs 2.0-2.7 s for a naive dense softmax
  attention; forward+grads 1.2-1.9 s vs 7.6-12.6 s.
* Scores, softmax and accumulation are fp32 whatever the input dtype; the output is q.dtype.
  The backward recomputes probabilities from the saved log-sum-exp (FlashAttention-2 style):
  one key-major pass over the flash blocks (dq carried, dk/dv local to the key block) and one
  pass over the pair tiles. Chunk selection is not differentiated, as in the reference.
* Memory: O(T * (D + top_k)) for inputs, softmax state and tiles, plus O(block² + tile * chunk)
  per loop step; nothing is O(T²).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from .plan import (
    MASKED_LOGIT,
    PairTiles,
    count_pairs,
    is_dense_causal,
    max_pair_tiles,
    pack_pair_tiles,
    take_rows,
)
from .reference import select_chunks, validate_args
from .vjp import attention_vjp

_HIGHEST = lax.Precision.HIGHEST


class _Plan(NamedTuple):
    """Static description of one call (hashable: it is a nondiff argument of the custom VJP)."""

    seq_len: int  # true T
    padded_len: int  # T rounded up to a multiple of `block`
    block: int  # rows/cols of one flash block; divides chunk_size in the sparse regime
    segment_blocks: int  # blocks per causal segment: one chunk, or the whole sequence when dense
    chunk_size: int
    cross: str  # "none" (no selection needed), "pairs" or "blocks"
    n_candidates: int  # chunks that can be selected: all but the last
    pair_tile: int
    n_tiles: int  # static upper bound on pair tiles per (batch, head)
    scale: float


# ----------------------------------------------------------------------------- planning


def _pick_block(chunk_size: int, block_size: int) -> int:
    """Largest divisor of chunk_size that is <= block_size (whole chunk if only tiny ones exist)."""
    best = max(d for d in range(1, min(chunk_size, block_size) + 1) if chunk_size % d == 0)
    # A prime-ish chunk would give absurdly small blocks; one whole-chunk block is better then.
    return chunk_size if best < min(chunk_size, 64) else best


def _whole_sequence_block(seq_len: int, block_size: int) -> int:
    """Block for one causal segment spanning the sequence: <= block_size, little padding."""
    if seq_len <= block_size:
        return seq_len
    per_block = -(-seq_len // -(-seq_len // block_size))  # even split into the fewest blocks
    return min(-(-per_block // 8) * 8, block_size)  # rows in multiples of 8 for the SIMD units


def _make_plan(shape, chunk_size, top_k, method, block_size, pair_tile) -> _Plan:
    """Chooses the regime, block and tile sizes for [B, T, H, D] inputs."""
    _, t, _, d = shape
    n_chunks = -(-t // chunk_size)
    n_pick = top_k - 1
    if is_dense_causal(t, chunk_size, top_k):
        # Plain causal attention over one segment spanning the sequence, no selection.
        block = _whole_sequence_block(t, block_size)
        padded = -(-t // block) * block
        segment_blocks, cross = padded // block, "none"
    else:
        block = _pick_block(chunk_size, block_size)
        padded = -(-t // block) * block
        segment_blocks = chunk_size // block
        cross = "none" if n_pick == 0 else method  # top_k == 1: own chunk only
    n_candidates = n_chunks - 1  # the last chunk is nobody's candidate
    n_tiles = 0
    if cross == "pairs":
        n_tiles = max_pair_tiles(count_pairs(t, chunk_size, n_pick), n_candidates, pair_tile)
    return _Plan(
        seq_len=t,
        padded_len=padded,
        block=block,
        segment_blocks=segment_blocks,
        chunk_size=chunk_size,
        cross=cross,
        n_candidates=n_candidates,
        pair_tile=pair_tile,
        n_tiles=n_tiles,
        scale=1.0 / math.sqrt(d),
    )


# ----------------------------------------------------------------------------- block maths


def _rows(x: jax.Array, start, size: int) -> jax.Array:
    """Rows [start, start + size) of a [B, H, T, ...] array."""
    return lax.dynamic_slice_in_dim(x, start, size, axis=2)


def _logits(q_blk, k_blk, scale: float) -> jax.Array:
    """[B, H, bq, D] x [B, H, bk, D] -> scaled fp32 logits [B, H, bq, bk]."""
    return jnp.einsum("bhqd,bhkd->bhqk", q_blk, k_blk, precision=_HIGHEST) * scale


def _causal_mask(block: int) -> jax.Array:
    """[block, block] mask of a diagonal block: key col <= query row."""
    pos = jnp.arange(block)
    return pos[None, :] <= pos[:, None]


def online_softmax_update(state, s, mask, v_blk):
    """Folds one block of logits into the running (max, sum, weighted-value) softmax state.

    Shared with the decoder's cached attention (`rwkvx_jax.sparse.cached_attention`).

    Args:
      state: (m [B,H,bq], l [B,H,bq], acc [B,H,bq,D]) fp32.
      s: [B, H, bq, bk] fp32 logits.
      mask: bool broadcastable to s, or None when every entry counts.
      v_blk: [B, H, bk, D].
    """
    m, l, acc = state
    if mask is not None:
        s = jnp.where(mask, s, MASKED_LOGIT)
    m_new = jnp.maximum(m, s.max(axis=-1))
    p = jnp.exp(s - m_new[..., None])
    if mask is not None:
        p = jnp.where(mask, p, 0.0)  # a fully masked row would otherwise see exp(0) = 1
    alpha = jnp.exp(m - m_new)
    l = alpha * l + p.sum(axis=-1)
    acc = alpha[..., None] * acc + jnp.einsum("bhqk,bhkd->bhqd", p, v_blk, precision=_HIGHEST)
    return m_new, l, acc


def _selected_rows(sel_blk, key_block, plan: _Plan):
    """[B, H, bq] mask: which query rows selected the chunk holding `key_block`."""
    chunk = key_block // plan.segment_blocks
    return (sel_blk == chunk).any(axis=-1)


def _skip_unless(row_mask, fn, state):
    """Runs fn(state) only if some row needs this block (a real branch in a CPU while loop)."""
    return lax.cond(row_mask.any(), fn, lambda x: x, state)


# ----------------------------------------------------------------------------- flash part


def _flash_forward(q, k, v, sel, plan: _Plan):
    """Causal-segment attention (+ dense-by-block cross chunks when plan.cross == "blocks").

    Args:
      q, k, v: [B, H, Tp, D] fp32.
      sel: [B, H, Tp, n_pick] int32 selected chunk ids (used for "blocks" only).

    Returns:
      Unnormalised softmax state (m [B,H,Tp], l [B,H,Tp], acc [B,H,Tp,D]).
    """
    b, h, tp, d = q.shape
    bs, spb = plan.block, plan.segment_blocks
    diag_mask = _causal_mask(bs)

    def query_block(i):
        q_i = _rows(q, i * bs, bs)
        state = (
            jnp.full((b, h, bs), MASKED_LOGIT, jnp.float32),
            jnp.zeros((b, h, bs), jnp.float32),
            jnp.zeros((b, h, bs, d), jnp.float32),
        )
        segment_start = (i // spb) * spb

        def full_block(j, state, mask=None):
            s = _logits(q_i, _rows(k, j * bs, bs), plan.scale)
            return online_softmax_update(state, s, mask, _rows(v, j * bs, bs))

        if plan.cross == "blocks":
            sel_i = _rows(sel, i * bs, bs)

            def cross_block(j, state):
                rows = _selected_rows(sel_i, j, plan)[..., None]
                return _skip_unless(rows, lambda st: full_block(j, st, rows), state)

            state = lax.fori_loop(0, segment_start, cross_block, state)
        state = lax.fori_loop(segment_start, i, full_block, state)
        return full_block(i, state, diag_mask)

    m, l, acc = lax.map(query_block, jnp.arange(tp // bs))
    # [nb, B, H, bs, ...] -> [B, H, Tp, ...]
    m, l = (jnp.moveaxis(x, 0, 2).reshape(b, h, tp) for x in (m, l))
    acc = jnp.moveaxis(acc, 0, 2).reshape(b, h, tp, d)
    return m, l, acc


def _flash_backward(q, k, v, sel, do, lse, delta, plan: _Plan):
    """Gradients of the flash part in one key-major pass (FlashAttention-2 style recompute).

    Each key block keeps its dk/dv local while visiting the query blocks that see it; dq is a
    [B, H, Tp, D] carry updated in place. Blocks are computed key-major ([bk, bq] logits) so
    the dk and dv products need no transposes.

    Args:
      q, k, v, do: [B, H, Tp, D] fp32; lse, delta: [B, H, Tp] fp32; sel as in `_flash_forward`.

    Returns:
      dq, dk, dv: [B, H, Tp, D] fp32.
    """
    b, h, tp, d = q.shape
    bs, spb, nb = plan.block, plan.segment_blocks, tp // plan.block
    diag_mask = _causal_mask(bs).T  # key-major: [key row, query col]

    def key_block(dq, j):
        k_j, v_j = _rows(k, j * bs, bs), _rows(v, j * bs, bs)

        def add_block(i, carry, mask=None):
            dq, dk_j, dv_j = carry
            q_i, do_i = _rows(q, i * bs, bs), _rows(do, i * bs, bs)
            s = jnp.einsum("bhkd,bhqd->bhkq", k_j, q_i, precision=_HIGHEST) * plan.scale
            p = jnp.exp(s - _rows(lse, i * bs, bs)[..., None, :])
            if mask is not None:
                p = jnp.where(mask, p, 0.0)
            dp = jnp.einsum("bhkd,bhqd->bhkq", v_j, do_i, precision=_HIGHEST)
            ds = p * (dp - _rows(delta, i * bs, bs)[..., None, :])
            dv_j = dv_j + jnp.einsum("bhkq,bhqd->bhkd", p, do_i, precision=_HIGHEST)
            dk_j = dk_j + plan.scale * jnp.einsum("bhkq,bhqd->bhkd", ds, q_i, precision=_HIGHEST)
            dq_i = plan.scale * jnp.einsum("bhkq,bhkd->bhqd", ds, k_j, precision=_HIGHEST)
            dq = lax.dynamic_update_slice_in_dim(dq, _rows(dq, i * bs, bs) + dq_i, i * bs, 2)
            return dq, dk_j, dv_j

        zeros = jnp.zeros((b, h, bs, d), jnp.float32)
        carry = add_block(j, (dq, zeros, zeros), diag_mask)
        segment_end = jnp.minimum((j // spb + 1) * spb, nb)
        carry = lax.fori_loop(j + 1, segment_end, add_block, carry)
        if plan.cross == "blocks":

            def cross_block(i, carry):
                rows = _selected_rows(_rows(sel, i * bs, bs), j, plan)[..., None, :]
                return _skip_unless(rows, lambda c: add_block(i, c, rows), carry)

            carry = lax.fori_loop(segment_end, nb, cross_block, carry)
        dq, dk_j, dv_j = carry
        return dq, (dk_j, dv_j)

    dq, (dk, dv) = lax.scan(key_block, jnp.zeros_like(q), jnp.arange(nb))
    dk, dv = (jnp.moveaxis(x, 0, 2).reshape(b, h, tp, d) for x in (dk, dv))
    return dq, dk, dv


# ----------------------------------------------------------------------------- pairs part


def _tiles_by_index(tiles: PairTiles):
    """(rows [G, M, P], chunk [G, M]): the tiles' query rows split per tile, and their chunks."""
    g, n_tiles = tiles.chunk.shape
    return tiles.rows.reshape(g, n_tiles, -1), tiles.chunk


def chunk_reader(k, v, chunk_size: int):
    """read(chunk [G]) -> (k_c, v_c) [G, chunk_size, D]: chunk c of every group's keys/values.

    Args:
      k, v: [G, Tk, D] keys and values, Tk a multiple of chunk_size.
      chunk_size: chunk length.
    """
    cut = jax.vmap(lambda x, c: lax.dynamic_slice_in_dim(x, c * chunk_size, chunk_size, 0))
    return lambda chunk: (cut(k, chunk), cut(v, chunk))


def fold_pair_tiles(q, tiles: PairTiles, state, read_chunks, sources, *, scale: float):
    """Folds the (query, selected chunk) pairs into each query's online-softmax state.

    Only the tiles that hold pairs in some group are visited (a dynamic trip count), so the
    cost follows the pairs actually selected, not the static tile bound (which grows with the
    candidates).

    Args:
      q: [G, Tp, D] fp32 queries.
      tiles: `plan.PairTiles` of the pairs, chunks indexing the keys `read_chunks` reads.
      state: (m [G, Tp], l [G, Tp], acc [G, Tp, D]) fp32 running softmax state.
      read_chunks: read_chunks(sources, chunk [G]) -> fp32 (k_c, v_c) [G, chunk_size, D].
      sources: the keys and values in any form `read_chunks` takes (one array each, or a KV
        cache's slots followed by new tokens). They travel through the loop and come back
        unchanged, so that a caller who then updates them in place (the KV cache) gets the
        buffers without XLA copying them for the loop.
      scale: logit scale, 1 / sqrt(D).

    Returns:
      (state, sources): the updated state, same shapes, and the sources.
    """
    tp = q.shape[1]
    q_ext = jnp.pad(q, ((0, 0), (0, 1), (0, 0)))  # dummy row Tp absorbs empty tile slots
    state = tuple(jnp.pad(x, ((0, 0), (0, 1)) + ((0, 0),) * (x.ndim - 2)) for x in state)
    scatter = jax.vmap(lambda x, r, val: x.at[r].set(val))
    all_rows, all_chunks = _tiles_by_index(tiles)

    def tile_step(i, carry):
        state, sources = carry
        rows, chunk = all_rows[:, i], all_chunks[:, i]
        q_t, m_old, l_old, a_old = (take_rows(x, rows) for x in (q_ext, *state))
        k_c, v_c = read_chunks(sources, chunk)
        s = jnp.einsum("gpd,gcd->gpc", q_t, k_c, precision=_HIGHEST) * scale
        m_new = jnp.maximum(m_old, s.max(axis=-1))
        p = jnp.exp(s - m_new[..., None])  # candidate chunks are complete: nothing to mask
        alpha = jnp.exp(m_old - m_new)
        l_new = alpha * l_old + p.sum(axis=-1)
        a_new = alpha[..., None] * a_old + jnp.einsum("gpc,gcd->gpd", p, v_c, precision=_HIGHEST)
        # Rows are distinct inside a tile (a query picks a chunk once); only the dummy repeats.
        new_state = tuple(
            scatter(x, rows, val) for x, val in zip(state, (m_new, l_new, a_new), strict=True)
        )
        # Opaque to XLA's while-loop simplifier, which would otherwise see the sources as
        # loop-invariant and hand the caller the loop's input again: that input is then
        # still live after the loop, and XLA copies it (a whole KV cache) for the loop.
        return new_state, lax.optimization_barrier(sources)

    n_used = jnp.max(tiles.n_used)
    state, sources = lax.fori_loop(0, n_used, tile_step, (state, sources))
    return tuple(x[:, :tp] for x in state), sources


def _pairs_backward(q, k, v, do, lse, delta, tiles: PairTiles, grads, plan: _Plan):
    """Adds the selected-chunk pairs' gradients to (dq, dk, dv) [G, Tp, D]."""
    g, tp, d = q.shape
    size = plan.chunk_size
    pad_row = lambda x: jnp.pad(x, ((0, 0), (0, 1)) + ((0, 0),) * (x.ndim - 2))
    q_ext, do_ext, lse_ext, delta_ext = (pad_row(x) for x in (q, do, lse, delta))
    dq, dk, dv = grads
    dq = pad_row(dq)
    add_rows = jax.vmap(lambda x, r, val: x.at[r].add(val))
    read = chunk_reader(k, v, size)

    def add_chunk(x, chunk, val):
        def one(x_g, c, val_g):
            start = c * size
            cur = lax.dynamic_slice_in_dim(x_g, start, size, 0)
            return lax.dynamic_update_slice_in_dim(x_g, cur + val_g, start, 0)

        return jax.vmap(one)(x, chunk, val)

    def tile_step(grads, tile):
        dq, dk, dv = grads
        rows, chunk = tile
        q_t, do_t, lse_t, delta_t = (
            take_rows(x, rows) for x in (q_ext, do_ext, lse_ext, delta_ext)
        )
        k_c, v_c = read(chunk)
        # Chunk-major [G, C, P] logits: dk and dv become plain matmuls (measured ~1.6x faster).
        s = jnp.einsum("gcd,gpd->gcp", k_c, q_t, precision=_HIGHEST) * plan.scale
        p = jnp.where((rows < tp)[:, None, :], jnp.exp(s - lse_t[:, None, :]), 0.0)
        dp = jnp.einsum("gcd,gpd->gcp", v_c, do_t, precision=_HIGHEST)
        ds = p * (dp - delta_t[:, None, :])
        dq_t = plan.scale * jnp.einsum("gcp,gcd->gpd", ds, k_c, precision=_HIGHEST)
        dq = add_rows(dq, rows, dq_t)
        dk = add_chunk(
            dk, chunk, plan.scale * jnp.einsum("gcp,gpd->gcd", ds, q_t, precision=_HIGHEST)
        )
        dv = add_chunk(dv, chunk, jnp.einsum("gcp,gpd->gcd", p, do_t, precision=_HIGHEST))
        return (dq, dk, dv), None

    rows, chunk = _tiles_by_index(tiles)
    (dq, dk, dv), _ = lax.scan(
        tile_step, (dq, dk, dv), (jnp.moveaxis(rows, 1, 0), jnp.moveaxis(chunk, 1, 0))
    )
    return dq[:, :tp], dk, dv


# ----------------------------------------------------------------------------- custom VJP


def _groups(x):
    """[B, H, T, ...] -> [B*H, T, ...] (pairs work per (batch, head) group)."""
    return x.reshape(x.shape[0] * x.shape[1], *x.shape[2:])


def _forward(q, k, v, sel, plan: _Plan):
    """Returns o [B,H,Tp,D], lse [B,H,Tp] and (sel, the pair tiles or None) for the backward."""
    b, h, tp, d = q.shape
    m, l, acc = _flash_forward(q, k, v, sel, plan)
    tiles = None
    if plan.cross == "pairs":
        tiles = pack_pair_tiles(
            _groups(sel),
            pair_tile=plan.pair_tile,
            n_tiles=plan.n_tiles,
            n_candidates=plan.n_candidates,
        )
        read = lambda kv, chunk: chunk_reader(*kv, plan.chunk_size)(chunk)
        state = (_groups(m), _groups(l), _groups(acc))
        state, _ = fold_pair_tiles(
            _groups(q), tiles, state, read, (_groups(k), _groups(v)), scale=plan.scale
        )
        m, l, acc = (x.reshape(b, h, *x.shape[1:]) for x in state)
    out = acc / l[..., None]
    lse = m + jnp.log(l)
    return out, lse, (sel, tiles)


def _backward(plan: _Plan, residuals, d_out, delta):
    q, k, v, _, lse, (sel, tiles) = residuals
    b, h, tp, d = q.shape
    dq, dk, dv = _flash_backward(q, k, v, sel, d_out, lse, delta, plan)
    if plan.cross == "pairs":
        grads = _pairs_backward(
            *(_groups(x) for x in (q, k, v, d_out, lse, delta)),
            tiles,
            tuple(_groups(x) for x in (dq, dk, dv)),
            plan,
        )
        dq, dk, dv = (x.reshape(b, h, tp, d) for x in grads)
    return dq, dk, dv


_attention = attention_vjp(_forward, _backward)


# ----------------------------------------------------------------------------- public API


def topk_chunk_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    chunk_size: int,
    top_k: int,
    method: str = "pairs",
    block_size: int = 512,
    pair_tile: int = 256,
    return_lse: bool = False,
):
    """Top-k chunk sparse attention (SPEC §4 train semantics), O(T * chunk) memory.

    Args:
      q, k, v: [B, T, H, D]; any float dtype (computed in fp32).
      chunk_size: chunk length, chunks aligned at position 0; T need not be a multiple.
      top_k: chunks attended per query, own chunk included (>= 1).
      method: "pairs" (exact-cost packed pairs, default) or "blocks" (dense by block, masked);
        irrelevant when T <= chunk_size * top_k or top_k == 1.
      block_size: largest flash block (rows and cols); the block used divides chunk_size.
      pair_tile: (query, chunk) pairs per tile in the "pairs" method.
      return_lse: also return the fp32 log-sum-exp of the logits, [B, T, H] (differentiable).

    Returns:
      o [B, T, H, D] in q.dtype, or (o, lse) when return_lse.
    """
    validate_args(q, k, v, chunk_size, top_k)
    if method not in ("pairs", "blocks"):
        raise ValueError(f"method must be 'pairs' or 'blocks', got {method!r}")
    if block_size < 1 or pair_tile < 1:
        raise ValueError(f"block_size and pair_tile must be >= 1, got {block_size}, {pair_tile}")
    plan = _make_plan(q.shape, int(chunk_size), int(top_k), method, block_size, pair_tile)
    pad = plan.padded_len - plan.seq_len

    def to_internal(x):  # [B, T, H, D] -> fp32 [B, H, Tp, D]
        x = jnp.swapaxes(x.astype(jnp.float32), 1, 2)
        return jnp.pad(x, ((0, 0), (0, 0), (0, pad), (0, 0)))

    if plan.cross == "none":
        sel = jnp.zeros((q.shape[0], q.shape[2], plan.padded_len, 0), jnp.int32)
    else:
        sel = jnp.swapaxes(select_chunks(q, k, plan.chunk_size, top_k), 1, 2)
        sel = jnp.pad(sel, ((0, 0), (0, 0), (0, pad), (0, 0)), constant_values=-1)
    out, lse = _attention(to_internal(q), to_internal(k), to_internal(v), sel, plan)
    out = jnp.swapaxes(out[:, :, : plan.seq_len], 1, 2).astype(q.dtype)
    if return_lse:
        return out, jnp.swapaxes(lse[:, :, : plan.seq_len], 1, 2)
    return out


# ----------------------------------------------------------------------------- chosen chunks


class _PicksPlan(NamedTuple):
    """Static description of a `selected_chunks_attention` call (what `_pairs_backward` reads)."""

    chunk_size: int
    pair_tile: int
    n_tiles: int
    n_candidates: int
    scale: float


def _picks_forward(q, k, v, sel, plan: _PicksPlan):
    """(o, lse, tiles) of queries [G, Tq, D] over their chosen chunks of k, v [G, Tk, D]."""
    g, tq, d = q.shape
    tiles = pack_pair_tiles(
        sel, pair_tile=plan.pair_tile, n_tiles=plan.n_tiles, n_candidates=plan.n_candidates
    )
    state = (
        jnp.full((g, tq), MASKED_LOGIT, jnp.float32),
        jnp.zeros((g, tq), jnp.float32),
        jnp.zeros((g, tq, d), jnp.float32),
    )

    def read(kv, chunk):  # one chunk per group, fp32 (the sources keep their dtype)
        return tuple(x.astype(jnp.float32) for x in chunk_reader(*kv, plan.chunk_size)(chunk))

    (m, l, acc), _ = fold_pair_tiles(q, tiles, state, read, (k, v), scale=plan.scale)
    some = l > 0
    out = jnp.where(some[..., None], acc / jnp.where(some, l, 1.0)[..., None], 0.0)
    lse = jnp.where(some, m + jnp.log(jnp.where(some, l, 1.0)), -jnp.inf)
    return out, lse, tiles


def _picks_backward(plan: _PicksPlan, residuals, d_out, delta):
    q, k, v, _, lse, tiles = residuals
    zeros = lambda x: jnp.zeros(x.shape, jnp.float32)
    # k, v stay in their dtype (each chunk read is promoted to fp32): no fp32 copy of the keys;
    # their gradients accumulate in fp32.
    dq, dk, dv = _pairs_backward(
        q, k, v, d_out, lse, delta, tiles, (zeros(q), zeros(k), zeros(v)), plan
    )
    return dq, dk.astype(k.dtype), dv.astype(v.dtype)


_picks_attention = attention_vjp(_picks_forward, _picks_backward)


def selected_chunks_attention(
    q, k, v, sel, *, chunk_size: int, pair_tile: int = 256, head_major_keys: bool = False
):
    """Attention of each query over whole key chunks it chose, differentiable in q, k and v.

    The other half of `topk_chunk_attention` ("pairs"): the keys may be longer than the
    queries and lie anywhere (context parallelism gathers the sequence's keys and lets each
    shard's queries read their choices from them). Cost follows the pairs:
    Tq * n * chunk_size query-key products per (batch, head), forward and backward.

    Args:
      q: [B, Tq, H, D] queries (computed in fp32).
      k, v: [B, Tk, H, D] keys and values, Tk a multiple of chunk_size (kept in their dtype;
        each chunk is read in fp32).
      sel: int32 [B, Tq, H, n] chunk indices into k (chunk j: rows [j*chunk, (j+1)*chunk)),
        -1 for none; a query names a chunk at most once. Not differentiated.
      chunk_size: chunk length; pair_tile: (query, chunk) pairs per tile.
      head_major_keys: k and v are [B, H, Tk, D] instead (read without a transposed copy:
        the gathered keys of a long sequence are large).

    Returns:
      (o [B, Tq, H, D] fp32, lse [B, Tq, H] fp32): the softmax over the union of the chosen
      chunks and its log-sum-exp; a query that chose nothing gets o = 0 and lse = -inf.
    """
    b, tq, h, d = q.shape
    if not head_major_keys:
        k, v = jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2)
    if k.shape != v.shape or k.ndim != 4 or (*k.shape[:2], k.shape[3]) != (b, h, d):
        raise ValueError(
            f"k, v must be [B, Tk, H, D] ([B, H, Tk, D] head-major) matching q {q.shape}; got "
            f"{k.shape}"
        )
    if k.shape[2] % chunk_size:
        raise ValueError(f"key length {k.shape[2]} is not a multiple of chunk_size {chunk_size}")
    if sel.shape[:3] != (b, tq, h):
        raise ValueError(f"sel must be [B, Tq, H, n] = [{b}, {tq}, {h}, n], got {sel.shape}")
    n_candidates = k.shape[2] // chunk_size
    plan = _PicksPlan(
        chunk_size=chunk_size,
        pair_tile=pair_tile,
        n_tiles=max_pair_tiles(tq * sel.shape[-1], n_candidates, pair_tile),
        n_candidates=n_candidates,
        scale=1.0 / math.sqrt(d),
    )
    groups = lambda x: jnp.swapaxes(x, 1, 2).reshape(b * h, x.shape[1], *x.shape[3:])
    heads = lambda x: x.reshape(b * h, *x.shape[2:])  # [B, H, T, ...] -> [B*H, T, ...]
    out, lse = _picks_attention(
        groups(q.astype(jnp.float32)), heads(k), heads(v), groups(sel.astype(jnp.int32)), plan
    )
    back = lambda x: jnp.swapaxes(x.reshape(b, h, *x.shape[1:]), 1, 2)
    return back(out), back(lse)
