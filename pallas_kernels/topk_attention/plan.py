"""Sparsity plan of top-k chunk attention (plain JAX), shared by the XLA, GPU and TPU backends.

Every backend splits a query's attention in two: causal attention inside its own chunk, and
full attention over each chunk it selected. The second part works on (query, selected chunk)
pairs, sorted by chunk and packed into tiles of `pair_tile` pairs that share one chunk, so a
tile is one [pair_tile, D] x [D, chunk_size] product against a contiguous key chunk. This module
holds that plan and what surrounds it: which regime a call is in, how many pairs and tiles
there can be, the packing, the gathers between query order and tile order, and the
log-sum-exp merge of the two parts.

Layout: backends work per group g = (batch, head), on [G = B*H, Tp, ...] arrays (Tp: T padded
to whole blocks). Index Tp of a query-order array and index S = n_tiles * pair_tile of a
tile-order array are padding rows: an empty tile slot points at row Tp, a missing pick at
slot S, and `gather_rows` reads a fill value there.
"""

from __future__ import annotations

import numbers
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

# Finite stand-in for -inf on masked logits: keeps exp(m_old - m_new) free of inf - inf NaNs.
MASKED_LOGIT = -1e30
# Log-sum-exp given to empty tile slots in a backward pass: exp(logit - 1e30) == 0, so those
# slots add no gradient without a mask.
EMPTY_SLOT_LSE = 1e30


def is_int(x) -> bool:
    """True for Python/NumPy integers (not bools): static sizes must be concrete ints."""
    return isinstance(x, numbers.Integral) and not isinstance(x, (bool, np.bool_))


def options_or_default(options, options_type: type, name: str):
    """`options`, or `options_type.get_default()` for None; a ValueError naming anything else.

    Args:
      options: the kernel options a caller passed as argument `name`, or None.
      options_type: the backend's options dataclass (e.g. `gpu.BlockSizes`).
      name: the argument's name, for the error.
    """
    if options is None:
        return options_type.get_default()
    if not isinstance(options, options_type):
        expected = f"{options_type.__module__}.{options_type.__qualname__}"
        raise ValueError(f"{name} must be a {expected} or None, got {options!r}")
    return options


# ----------------------------------------------------------------------------- regime and counts


def is_dense_causal(seq_len: int, chunk_size: int, top_k: int) -> bool:
    """True when every query attends every earlier position: T <= chunk_size * top_k.

    Then no query has more earlier chunks than it may select (own chunk included), so the
    attention is plain causal attention over one segment spanning the sequence.
    """
    return -(-seq_len // chunk_size) <= top_k


def needs_selection(seq_len: int, chunk_size: int, top_k: int) -> bool:
    """True when queries choose among earlier chunks: the regime with pair tiles.

    False when the attention is dense causal (`is_dense_causal`) or own-chunk only (top_k 1).
    """
    return top_k > 1 and not is_dense_causal(seq_len, chunk_size, top_k)


def count_pairs(seq_len: int, chunk_size: int, n_pick: int) -> int:
    """Number of valid (query, selected chunk) pairs: query t has min(t // chunk, n_pick)."""
    total = 0
    for c in range(-(-seq_len // chunk_size)):
        rows = min(chunk_size, seq_len - c * chunk_size)
        total += rows * min(c, n_pick)
    return total


def max_pair_tiles(n_pairs: int, n_candidates: int, pair_tile: int) -> int:
    """Static bound on the pair tiles of one group holding at most n_pairs pairs.

    Each candidate chunk's run of pairs is padded to whole tiles: at most one extra tile per
    candidate chunk.
    """
    return -(-n_pairs // pair_tile) + n_candidates


# ----------------------------------------------------------------------------- pair tiles


class PairTiles(NamedTuple):
    """The (query, selected chunk) pairs of every group, packed into single-chunk tiles.

    M = n_tiles (a static bound), P = pair_tile, S = M * P tile slots, nCand candidate chunks.
    Tiles are sorted by chunk, and a chunk's pairs fill its tiles from their first slot, so the
    used tiles of a group are a prefix and a used tile's first slot is a real query.

    Attributes:
      rows: int32 [G, S]: query row of each tile slot, Tp for an empty slot.
      chunk: int32 [G, M]: the chunk of each tile; unused tiles repeat the last used tile's
        chunk (a real chunk, and one a TPU kernel has already fetched).
      slot: int32 [G, Tp, n_pick]: tile slot of each (query, pick) pair, S for a missing pick.
      first_tile: int32 [G, nCand]: first tile of each chunk's run.
      tile_count: int32 [G, nCand]: tiles of each chunk's run.
      n_used: int32 [G]: tiles that hold pairs.
    """

    rows: jax.Array
    chunk: jax.Array
    slot: jax.Array
    first_tile: jax.Array
    tile_count: jax.Array
    n_used: jax.Array


def _pack_group(sel_g: jax.Array, pair_tile: int, n_tiles: int, n_candidates: int) -> PairTiles:
    """`pack_pair_tiles` for one group: sel_g int32 [Tp, n_pick] -> PairTiles without [G]."""
    tp, n_pick = sel_g.shape
    size, n_slots = pair_tile, n_tiles * pair_tile
    key = sel_g.reshape(-1)
    key = jnp.where(key >= 0, key, n_candidates)  # missing picks sort last
    order = jnp.argsort(key, stable=True)  # stable: queries stay in order inside a chunk
    sorted_key = key[order]

    counts = jnp.bincount(key, length=n_candidates + 1)[:n_candidates]
    tiles_per_chunk = -(-counts // size)
    tiles_end = jnp.cumsum(tiles_per_chunk)
    first_tile = tiles_end - tiles_per_chunk
    first_pair = jnp.cumsum(counts) - counts
    safe = jnp.minimum(sorted_key, n_candidates - 1)
    rank = jnp.arange(tp * n_pick) - first_pair[safe]
    sorted_slot = jnp.where(sorted_key < n_candidates, first_tile[safe] * size + rank, n_slots)
    sorted_slot = sorted_slot.astype(jnp.int32)
    rows = jnp.full((n_slots,), tp, jnp.int32).at[sorted_slot].set(order // n_pick, mode="drop")
    slot = jnp.full((tp * n_pick,), n_slots, jnp.int32).at[order].set(sorted_slot)

    n_used = tiles_end[-1]
    tile = jnp.arange(n_tiles, dtype=jnp.int32)
    last_used = jnp.minimum(tile, jnp.maximum(n_used - 1, 0))
    # Tile m belongs to the first chunk whose tiles end after m.
    owner = jnp.searchsorted(tiles_end, tile, side="right")
    chunk = jnp.minimum(owner[last_used], n_candidates - 1).astype(jnp.int32)
    return PairTiles(
        rows=rows,
        chunk=chunk,
        slot=slot.reshape(tp, n_pick),
        first_tile=first_tile.astype(jnp.int32),
        tile_count=tiles_per_chunk.astype(jnp.int32),
        n_used=n_used.astype(jnp.int32),
    )


def pack_pair_tiles(
    sel: jax.Array, *, pair_tile: int, n_tiles: int, n_candidates: int
) -> PairTiles:
    """Sorts each group's (query, chunk) pairs by chunk and packs them into single-chunk tiles.

    Args:
      sel: int32 [G, Tp, n_pick] selected chunk ids in [0, n_candidates), -1 for none. A query
        names a chunk at most once.
      pair_tile: pairs per tile.
      n_tiles: static tile bound (`max_pair_tiles`); pairs beyond it are dropped.
      n_candidates: chunks that can be selected.

    Returns:
      `PairTiles` with a leading [G] axis on every array.
    """
    pack = lambda s: _pack_group(s, pair_tile, n_tiles, n_candidates)
    return jax.vmap(pack)(sel)


# ----------------------------------------------------------------------------- gathers


def take_rows(x: jax.Array, rows: jax.Array) -> jax.Array:
    """Per-group row gather: x [G, N, ...] at rows int32 [G, *R] (in range) -> [G, *R, ...]."""
    return jax.vmap(lambda x_g, r: x_g[r])(x, rows)


def gather_rows(x: jax.Array, rows: jax.Array, fill) -> jax.Array:
    """`take_rows` where index N (one past the end) reads `fill`.

    Args:
      x: [G, N, ...].
      rows: int32 [G, *R] in [0, N].
      fill: the value read at index N.

    Returns:
      [G, *R, ...] in x's dtype.
    """
    pad = ((0, 0), (0, 1)) + ((0, 0),) * (x.ndim - 2)
    return take_rows(jnp.pad(x, pad, constant_values=fill), rows)


def sum_over_picks(x_slots: jax.Array, slot: jax.Array) -> jax.Array:
    """Sums each query's pair results back into query order, by a gather (no scatter-add).

    Args:
      x_slots: [G, S, ...] per tile slot.
      slot: int32 [G, Tp, n_pick] from `PairTiles.slot` (S for a missing pick, which adds 0).

    Returns:
      [G, Tp, ...].
    """
    return gather_rows(x_slots, slot, 0.0).sum(axis=2)


def tile_operands(tiles: PairTiles, q, do, lse, delta):
    """Backward operands in tile order; empty slots read zeros and an lse that zeroes them.

    Args:
      tiles: `PairTiles`.
      q, do: [G, Tp, D]; lse, delta: [G, Tp] fp32.

    Returns:
      q_t, do_t [G, S, D] and lse_t, delta_t [G, S].
    """
    rows = tiles.rows
    return (
        gather_rows(q, rows, 0.0),
        gather_rows(do, rows, 0.0),
        gather_rows(lse, rows, EMPTY_SLOT_LSE),
        gather_rows(delta, rows, 0.0),
    )


# ----------------------------------------------------------------------------- merge


def merge_own_and_picks(o_own, lse_own, o_slots, lse_slots, slot):
    """Log-sum-exp merge of each query's own-chunk attention with its selected chunks'.

    The parts attend disjoint keys and are each softmax-normalised, so the whole is their
    average weighted by exp(lse_part - lse_total).

    Args:
      o_own: [G, Tp, D] fp32 own-chunk output; lse_own: [G, Tp] fp32 (finite).
      o_slots: [G, S, D] fp32 per tile slot; lse_slots: [G, S] fp32. Slots that no pick points
        at are never read (they may hold anything, NaN included).
      slot: int32 [G, Tp, n_pick] from `PairTiles.slot`.

    Returns:
      o [G, Tp, D] fp32 and lse [G, Tp] fp32.
    """
    lse_picks = gather_rows(lse_slots, slot, MASKED_LOGIT)  # missing picks weigh exp(-1e30) = 0
    o_picks = gather_rows(o_slots, slot, 0.0)
    lse_all = jnp.concatenate([lse_own[..., None], lse_picks], axis=-1)
    m = lse_all.max(axis=-1, keepdims=True)
    w = jnp.exp(lse_all - m)
    total = w.sum(axis=-1)
    o = (w[..., 0, None] * o_own + (w[..., 1:, None] * o_picks).sum(axis=-2)) / total[..., None]
    return o, m[..., 0] + jnp.log(total)


# ----------------------------------------------------------------------------- layout


def to_groups(x: jax.Array, padded_len: int, fill=0) -> jax.Array:
    """[B, T, H, ...] -> [B*H, Tp, ...] (Tp = padded_len; the padding rows hold `fill`)."""
    b, t, h = x.shape[:3]
    x = jnp.swapaxes(x, 1, 2).reshape(b * h, t, *x.shape[3:])
    return jnp.pad(
        x, ((0, 0), (0, padded_len - t)) + ((0, 0),) * (x.ndim - 2), constant_values=fill
    )


def from_groups(x: jax.Array, batch: int, seq_len: int) -> jax.Array:
    """[B*H, Tp, ...] -> [B, T, H, ...], dropping the padding rows."""
    g = x.shape[0]
    return jnp.swapaxes(x[:, :seq_len].reshape(batch, g // batch, seq_len, *x.shape[2:]), 1, 2)
