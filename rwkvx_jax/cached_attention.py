"""Top-k chunk attention of new tokens against a KV cache (SPEC §4 training semantics).

Used by prefill (a piece of P tokens at once) and decode (one token). Both reproduce the
parallel forward: a query at absolute position t in chunk c attends causally inside chunk c and
to every key of its top (k - 1) complete earlier chunks ranked by `q . mean(k)` (fp32, ties to
the lower chunk index). The earlier chunks come from the cache's slots and, for a piece, from
chunks completed inside the piece.

A piece is laid out in a chunk-aligned *window*: the cache's open chunk followed by the piece,
with the piece's first token at row `length % chunk`. The window's chunk j is the sequence's
chunk `length // chunk + j`, so the own-chunk part is plain chunk-local causal attention over
the window and the candidates are [cache slots..., earlier window chunks], already in chunk
order. Sequences of one batch may have different lengths: every step is per row.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels.topk_attention.xla_chunked import (
    selected_chunks_attention_sources,
    topk_chunk_attention,
)
from rwkvx_jax.kv_cache import ChunkKVCache, chunk_mean, chunk_order, push_chunks

_HIGHEST = lax.Precision.HIGHEST


def _place_rows(base: jax.Array, rows: jax.Array, start: jax.Array) -> jax.Array:
    """Per sequence b: base[b, start[b]:start[b]+P] = rows[b] (axis 1)."""
    put = lambda b, r, s: lax.dynamic_update_slice_in_dim(b, r, s, axis=0)
    return jax.vmap(put)(base, rows, start)


def _take_rows(x: jax.Array, start: jax.Array, size: int) -> jax.Array:
    """Per sequence b: x[b, start[b]:start[b]+size] (axis 1)."""
    return jax.vmap(lambda a, s: lax.dynamic_slice_in_dim(a, s, size, axis=0))(x, start)


def _merge(out_a, lse_a, out_b, lse_b):
    """Combines two softmax-normalised partial attentions over disjoint key sets."""
    lse = jnp.logaddexp(lse_a, lse_b)
    weight = lambda l: jnp.where(jnp.isfinite(l), jnp.exp(l - lse), 0.0)[..., None]
    return out_a * weight(lse_a) + out_b * weight(lse_b)


def _top_candidates(scores: jax.Array, n_pick: int) -> jax.Array:
    """Indices of the n_pick best candidates along the last axis (-1 for masked ones)."""
    n = scores.shape[-1]
    if n < n_pick:
        pad = [(0, 0)] * (scores.ndim - 1) + [(0, n_pick - n)]
        scores = jnp.pad(scores, pad, constant_values=-jnp.inf)
    # lax.top_k returns equal values lower index first: the tie rule of SPEC §4.
    best, picked = lax.top_k(scores, n_pick)
    return jnp.where(best > -jnp.inf, picked, -1).astype(jnp.int32)


def attend_piece(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    cache: ChunkKVCache,
    lengths: jax.Array,
    n_valid: jax.Array,
    *,
    top_k: int,
    eviction: str,
) -> tuple[jax.Array, ChunkKVCache]:
    """Attention of a piece of new tokens, then the piece's keys absorbed into the cache.

    Args:
      q, k, v: [B, P, H, N] the piece's projections (row i is position lengths[b] + i).
      cache: the block's cache before the piece.
      lengths: int32 [B] tokens each sequence has absorbed before the piece.
      n_valid: int32 [B] how many of the P rows are real (the rest is right padding, whose
        keys are never absorbed and whose outputs are meaningless).
      top_k: chunks attended per query, own chunk included.
      eviction: the cache's eviction policy.

    Returns:
      (out [B, P, H, N] fp32, updated cache).
    """
    batch, piece, heads, n = q.shape
    chunk = cache.open_keys.shape[2]
    n_slots = cache.keys.shape[2]
    n_window = -(-(chunk + piece) // chunk)
    width = n_window * chunk
    offset = lengths % chunk

    def window(open_rows, rows):  # [B, H, chunk, N], [B, P, H, N] -> [B, width, H, N]
        base = jnp.zeros((batch, width, heads, n), rows.dtype)
        if open_rows is not None:
            base = base.at[:, :chunk].set(jnp.swapaxes(open_rows, 1, 2).astype(rows.dtype))
        return _place_rows(base, rows, offset)

    wq, wk, wv = window(None, q), window(cache.open_keys, k), window(cache.open_values, v)
    out, lse = topk_chunk_attention(wq, wk, wv, chunk_size=chunk, top_k=1, return_lse=True)
    out = out.astype(jnp.float32)

    if top_k > 1:
        window_means = chunk_mean(jnp.swapaxes(wk.reshape(batch, n_window, chunk, heads, n), 2, 3))
        # [B, n_window, H, N] -> candidates [B, H, S + n_window, N] in chunk order.
        # Candidates in chunk order: the slots sorted by chunk index, then the window's chunks.
        order = chunk_order(cache)  # [B, S]
        slot_means = jnp.take_along_axis(cache.chunk_means, order[:, None, :, None], axis=2)
        means = jnp.concatenate([slot_means, jnp.swapaxes(window_means, 1, 2)], axis=2)
        scores = jnp.einsum(
            "bthn,bhjn->bthj", wq.astype(jnp.float32), means, precision=_HIGHEST
        )  # [B, width, H, S + n_window]
        query_chunk = jnp.arange(width) // chunk
        filled = jnp.take_along_axis(cache.chunk_ids, order, axis=1) >= 0
        slot_ok = jnp.broadcast_to(filled[:, None, :], (batch, width, n_slots))
        window_ok = jnp.arange(n_window)[None, :] < query_chunk[:, None]
        window_ok = jnp.broadcast_to(window_ok, (batch, width, n_window))
        ok = jnp.concatenate([slot_ok, window_ok], axis=-1)[:, :, None, :]
        picked = _top_candidates(jnp.where(ok, scores, -jnp.inf), top_k - 1)
        # Back from chunk-order positions to slot indices (window chunks follow the S slots).
        slot_of = jnp.take_along_axis(
            order[:, None, None, :], jnp.clip(picked, 0, n_slots - 1), axis=-1
        )
        sel = jnp.where((picked >= 0) & (picked < n_slots), slot_of, picked)
        # The slots are read in place (head-major [B, H, S * chunk, N], a free reshape) and the
        # window after them: no per-piece copy of the cache, whatever its size. The slots come
        # back through the read loop and the pushes below update those, in place.
        slot_rows = lambda x: x.reshape(batch, heads, n_slots * chunk, n)
        far_out, far_lse, (key_back, value_back) = selected_chunks_attention_sources(
            wq,
            [slot_rows(cache.keys), jnp.swapaxes(wk, 1, 2)],
            [slot_rows(cache.values), jnp.swapaxes(wv, 1, 2)],
            sel,
            chunk_size=chunk,
        )
        out = _merge(out, lse, far_out, far_lse)
        cache = cache._replace(
            keys=key_back[0].reshape(cache.keys.shape),
            values=value_back[0].reshape(cache.values.shape),
        )

    out = _take_rows(out, offset, piece)
    return out, _absorb_window(cache, wk, wv, lengths, offset + n_valid, eviction)


def _absorb_window(cache, wk, wv, lengths, filled, eviction):
    """Pushes the window's completed chunks into the slots; the partial one becomes open.

    Args:
      wk, wv: [B, width, H, N] the window (open chunk + piece).
      lengths: int32 [B] sequence lengths before the piece (the window starts at chunk
        lengths // chunk).
      filled: int32 [B] valid rows of the window.
    """
    chunk = cache.open_keys.shape[2]
    n_window = wk.shape[1] // chunk
    batch, _, heads, n = wk.shape
    # [n_window, B, H, chunk, N]: one scan step per window chunk, so the graph holds one push
    # however long the piece is (unrolled pushes made long pieces slow to compile).
    per_chunk = lambda x: jnp.moveaxis(
        x.reshape(batch, n_window, chunk, heads, n).transpose(0, 1, 3, 2, 4), 1, 0
    ).astype(cache.keys.dtype)
    first_chunk = lengths // chunk

    def push(cache, xs):
        keys, values, j = xs
        complete = (j + 1) * chunk <= filled
        new_cache = push_chunks(cache, keys, values, first_chunk + j, complete, eviction)
        return new_cache, None

    cache, _ = lax.scan(push, cache, (per_chunk(wk), per_chunk(wv), jnp.arange(n_window)))
    head_major = lambda x: jnp.swapaxes(x, 1, 2).astype(cache.keys.dtype)  # [B, H, rows, N]
    open_start = (filled // chunk) * chunk
    return cache._replace(
        open_keys=head_major(_take_rows(wk, open_start, chunk)),
        open_values=head_major(_take_rows(wv, open_start, chunk)),
    )


def attend_token(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    cache: ChunkKVCache,
    lengths: jax.Array,
    valid: jax.Array,
    *,
    top_k: int,
    eviction: str,
) -> tuple[jax.Array, ChunkKVCache]:
    """Attention of one new token per sequence (decode), then its key absorbed.

    Reads the open chunk and the keys of the top (k - 1) slots only: the work per token is
    O(top_k * chunk + slots) per head, whatever the sequence length.

    Args:
      q, k, v: [B, H, N] the token's projections (position lengths[b]).
      cache: the block's cache.
      lengths: int32 [B] tokens absorbed before this one.
      valid: bool [B]; False rows (finished or padding sequences) absorb nothing.
      top_k: chunks attended per query, own chunk included.
      eviction: the cache's eviction policy.

    Returns:
      (out [B, H, N] fp32, updated cache).
    """
    batch, heads, n = q.shape
    chunk = cache.open_keys.shape[2]
    scale = 1.0 / math.sqrt(n)
    offset = lengths % chunk

    def put(rows, new):  # one row written in place; invalid sequences rewrite the old row
        def one(r, x, o, ok):
            old = lax.dynamic_index_in_dim(r, o, axis=1, keepdims=False)
            return lax.dynamic_update_index_in_dim(r, jnp.where(ok, x.astype(r.dtype), old), o, 1)

        return jax.vmap(one)(rows, new, offset, valid)

    open_k, open_v = put(cache.open_keys, k), put(cache.open_values, v)
    q32 = q.astype(jnp.float32)
    # A token that completes its chunk pushes it first and reads the cache after the write:
    # the attention then depends on the write, so XLA updates the donated cache in place
    # (reads that could run after the write made it copy the whole cache every step). The
    # pushed chunk is the token's own, so it is excluded from the candidates below.
    own_chunk = lengths // chunk
    completes = valid & (offset == chunk - 1)
    cache = cache._replace(open_keys=open_k, open_values=open_v)
    cache = push_chunks(cache, open_k, open_v, own_chunk, completes, eviction)

    own = jnp.einsum("bhn,bhcn->bhc", q32, open_k.astype(jnp.float32), precision=_HIGHEST)
    own = jnp.where(jnp.arange(chunk) <= offset[:, None, None], own * scale, -jnp.inf)
    logits, vals = [own], [open_v]
    if top_k > 1:
        order = chunk_order(cache)  # slots by chunk index: ties go to the lower chunk
        means = jnp.take_along_axis(cache.chunk_means, order[:, None, :, None], axis=2)
        scores = jnp.einsum("bhn,bhsn->bhs", q32, means, precision=_HIGHEST)
        ids = jnp.take_along_axis(cache.chunk_ids, order, axis=1)
        filled = ((ids >= 0) & (ids < own_chunk[:, None]))[:, None, :]
        picked = _top_candidates(jnp.where(filled, scores, -jnp.inf), top_k - 1)  # [B, H, k-1]
        slot_of = jnp.take_along_axis(order[:, None, :], jnp.maximum(picked, 0), axis=-1)
        sel = jnp.where(picked >= 0, slot_of, -1)
        # mode="clip" (the indices are valid): the default fill mode masks the whole cache
        # with a select on every step, a cache-sized read and write per token.
        gather = lambda x: jnp.take_along_axis(
            x, jnp.maximum(sel, 0)[..., None, None], axis=2, mode="clip"
        )
        far_k, far_v = gather(cache.keys), gather(cache.values)  # [B, H, k-1, chunk, N]
        far = jnp.einsum("bhn,bhpcn->bhpc", q32, far_k.astype(jnp.float32), precision=_HIGHEST)
        far = jnp.where((sel >= 0)[..., None], far * scale, -jnp.inf)
        logits.append(far.reshape(batch, heads, -1))
        vals.append(far_v.reshape(batch, heads, -1, n))
    probs = jax.nn.softmax(jnp.concatenate(logits, axis=-1), axis=-1)
    # Weighted sums part by part: concatenating the values would copy every attended key row.
    out, start = 0.0, 0
    for part in vals:
        width = part.shape[2]
        weights = lax.slice_in_dim(probs, start, start + width, axis=2)
        out = out + jnp.einsum(
            "bhc,bhcn->bhn", weights, part.astype(jnp.float32), precision=_HIGHEST
        )
        start += width

    return out, cache
