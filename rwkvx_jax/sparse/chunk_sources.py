"""Attention over whole key chunks each query chose, read straight from where they lie.

The KV cache holds its chunks head-major in slots; a prefill piece's own window holds more. A
query's chosen chunks may lie in either, so the attention reads each chunk from its source
array, never concatenating a large cache with the new tokens. Built on the top-k kernel
family's pair tiles (`pallas_kernels.topk_attention.plan`) and its pure-JAX fold over them.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from pallas_kernels.topk_attention.plan import (
    MASKED_LOGIT,
    from_groups,
    max_pair_tiles,
    pack_pair_tiles,
    to_groups,
)
from pallas_kernels.topk_attention.xla_chunked import chunk_reader, fold_pair_tiles


def selected_chunks_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    sel: jax.Array,
    *,
    chunk_size: int,
    pair_tile: int = 256,
):
    """Attention of each query over whole key chunks it selected (forward only, exact cost).

    The building block of cached (prefill) attention: the keys may come from anywhere (a KV
    cache followed by new tokens), and `sel` names, per query and head, which chunks of `k` it
    attends. Uses the same sorted (query, chunk) pair tiles as the "pairs" method.

    Args:
      q: [B, Tq, H, D] queries.
      k, v: [B, Tk, H, D] keys and values, Tk a multiple of chunk_size.
      sel: int32 [B, Tq, H, n] chunk indices into k (chunk j is rows [j*chunk, (j+1)*chunk)),
        -1 for none. A query must not name one chunk twice.
      chunk_size: chunk length.
      pair_tile: (query, chunk) pairs per tile.

    Returns:
      (out [B, Tq, H, D] fp32, lse [B, Tq, H] fp32): the softmax-normalised output over the
      union of the selected chunks and its log-sum-exp; rows that selected nothing get out = 0
      and lse = -inf.
    """
    if k.shape != v.shape or k.ndim != 4 or k.shape[0] != q.shape[0] or k.shape[2:] != q.shape[2:]:
        raise ValueError(
            f"k, v must be [B, Tk, H, D] matching q {q.shape}; got {k.shape}, {v.shape}"
        )
    head_major = lambda x: jnp.swapaxes(x, 1, 2)
    out, lse, _ = selected_chunks_attention_sources(
        q, [head_major(k)], [head_major(v)], sel, chunk_size=chunk_size, pair_tile=pair_tile
    )
    return out, lse


def selected_chunks_attention_sources(
    q: jax.Array,
    key_sources,
    value_sources,
    sel: jax.Array,
    *,
    chunk_size: int,
    pair_tile: int = 256,
):
    """`selected_chunks_attention` over keys held in several arrays, never concatenated.

    The keys are the concatenation along time of the sources, in order (chunk j of the whole
    is a chunk of one source); each tile reads its chunk straight from its source, so a large
    KV cache is neither copied nor converted, and only the tiles that hold pairs are computed:
    the cost follows the pairs, not the number of candidate chunks.

    Args:
      q: [B, Tq, H, D] queries.
      key_sources, value_sources: sequences of head-major [B, H, Tk_i, D] arrays (the KV
        cache's native layout), any float dtype, each Tk_i a multiple of chunk_size; key and
        value sources pair up and match in shape.
      sel: int32 [B, Tq, H, n] chunk indices into the concatenated keys, -1 for none.
      chunk_size, pair_tile: as in `selected_chunks_attention`.

    Returns:
      (out [B, Tq, H, D] fp32, lse [B, Tq, H] fp32) as `selected_chunks_attention`, and
      (key_sources, value_sources) passed through unchanged: update these, not the inputs, so
      that XLA can do it in place (the inputs' buffers went through the read loop).
    """
    b, tq, h, d = q.shape
    if len(key_sources) != len(value_sources) or not key_sources:
        raise ValueError("key_sources and value_sources must be non-empty and pair up")
    for i, (ks, vs) in enumerate(zip(key_sources, value_sources, strict=True)):
        if ks.shape != vs.shape or ks.ndim != 4 or ks.shape[:2] != (b, h) or ks.shape[3] != d:
            raise ValueError(
                f"source {i}: keys and values must be head-major [B, H, Tk, D] = [{b}, {h}, Tk, "
                f"{d}]; got {ks.shape} and {vs.shape}"
            )
        if ks.shape[2] % chunk_size:
            raise ValueError(
                f"source {i}: key length {ks.shape[2]} is not a multiple of chunk_size {chunk_size}"
            )
    if sel.shape[:3] != (b, tq, h):
        raise ValueError(f"sel must be [B, Tq, H, n] = [{b}, {tq}, {h}, n], got {sel.shape}")
    n_pick = sel.shape[-1]
    n_chunks = [ks.shape[2] // chunk_size for ks in key_sources]
    n_candidates = sum(n_chunks)
    tiles = pack_pair_tiles(
        to_groups(sel.astype(jnp.int32), tq),
        pair_tile=pair_tile,
        n_tiles=max_pair_tiles(tq * n_pick, n_candidates, pair_tile),
        n_candidates=n_candidates,
    )
    state = (
        jnp.full((b * h, tq), MASKED_LOGIT, jnp.float32),
        jnp.zeros((b * h, tq), jnp.float32),
        jnp.zeros((b * h, tq, d), jnp.float32),
    )
    head_groups = lambda x: x.reshape(b * h, *x.shape[2:])  # [B, H, Tk, D] -> [B*H, Tk, D]
    grouped = ([head_groups(x) for x in key_sources], [head_groups(x) for x in value_sources])
    read = _sources_reader(n_chunks, chunk_size)
    q_g = to_groups(q.astype(jnp.float32), tq)
    (m, l, acc), grouped = fold_pair_tiles(q_g, tiles, state, read, grouped, scale=1 / math.sqrt(d))
    some = l > 0
    out = jnp.where(some[..., None], acc / jnp.where(some, l, 1.0)[..., None], 0.0)
    lse = jnp.where(some, m + jnp.log(jnp.where(some, l, 1.0)), -jnp.inf)
    sources_back = tuple(
        [g.reshape(x.shape) for g, x in zip(group, original, strict=True)]
        for group, original in zip(grouped, (key_sources, value_sources), strict=True)
    )
    return from_groups(out, b, tq), from_groups(lse, b, tq), sources_back


def _sources_reader(n_chunks, chunk_size: int):
    """read((key_sources, value_sources), chunk [G]) -> fp32 (k_c, v_c) [G, chunk_size, D].

    The sources are lists of [G, Tk_i, D] arrays holding n_chunks[i] chunks each, in order.

    Each source is sliced at the chunk's clamped local index and the one that owns the chunk
    is kept: one chunk read per source per tile instead of a concatenated copy of them all.
    """
    starts = [sum(n_chunks[:i]) for i in range(len(n_chunks))]

    def read(sources, chunk):
        key_sources, value_sources = sources
        k_c = v_c = None
        for ks, vs, start, count in zip(key_sources, value_sources, starts, n_chunks, strict=True):
            local = jnp.clip(chunk - start, 0, count - 1)
            k_i, v_i = (c.astype(jnp.float32) for c in chunk_reader(ks, vs, chunk_size)(local))
            if k_c is None:
                k_c, v_c = k_i, v_i
                continue
            mine = ((chunk >= start) & (chunk < start + count))[:, None, None]
            k_c, v_c = jnp.where(mine, k_i, k_c), jnp.where(mine, v_i, v_c)
        return k_c, v_c

    return read
