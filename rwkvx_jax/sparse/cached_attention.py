"""Top-k chunk attention of new tokens against a KV cache (SPEC §4 training semantics).

Used by prefill (a piece of P tokens at once) and decode (one token). Both reproduce the
parallel forward: a query at absolute position t in chunk c attends causally inside chunk c and
to every key of its top (k - 1) complete earlier chunks ranked by `q . mean(k)` (fp32, ties to
the lower chunk index). The earlier chunks come from the cache's slots and, for a piece, from
chunks completed inside the piece.

A piece's keys are laid out in a chunk-aligned *window*: the cache's open chunk followed by the
piece, with the piece's first token at row `length % chunk`. The window's chunk j is the
sequence's chunk `length // chunk + j`, so the own-chunk part is causal attention of the
piece's rows inside their window chunk (the open chunk's rows are keys only) and the
candidates are [cache slots..., earlier window chunks], already in chunk order. Sequences of
one batch may have different lengths: every step is per row.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels.topk_attention.xla_chunked import online_softmax_update
from rwkvx_jax.sparse.chunk_sources import selected_chunks_attention_sources
from rwkvx_jax.sparse.kv_cache import ChunkKVCache, chunk_mean, chunk_order, push_chunks

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
        base = base.at[:, :chunk].set(jnp.swapaxes(open_rows, 1, 2).astype(rows.dtype))
        return _place_rows(base, rows, offset)

    wk, wv = window(cache.open_keys, k), window(cache.open_values, v)
    # Only the piece's rows are queries (the window's other rows are keys only).
    out, lse = _own_chunk_attention(q, wk, wv, offset, chunk)

    if top_k > 1:
        window_means = chunk_mean(jnp.swapaxes(wk.reshape(batch, n_window, chunk, heads, n), 2, 3))
        # [B, n_window, H, N] -> candidates [B, H, S + n_window, N] in chunk order.
        # Candidates in chunk order: the slots sorted by chunk index, then the window's chunks.
        order, slot_means, filled = _slots_in_chunk_order(cache)
        means = jnp.concatenate([slot_means, jnp.swapaxes(window_means, 1, 2)], axis=2)
        scores = jnp.einsum(
            "bthn,bhjn->bthj", q.astype(jnp.float32), means, precision=_HIGHEST
        )  # [B, P, H, S + n_window]
        query_chunk = (offset[:, None] + jnp.arange(piece)) // chunk  # window chunk of each row
        slot_ok = jnp.broadcast_to(filled[:, None, :], (batch, piece, n_slots))
        window_ok = jnp.arange(n_window)[None, None, :] < query_chunk[:, :, None]
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
            q,
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

    return out, _absorb_window(cache, wk, wv, lengths, offset + n_valid, eviction)


def _own_chunk_attention(q, wk, wv, offset, chunk: int, block: int = 128):
    """Causal attention of the piece's rows inside their own chunk of the window.

    Args:
      q: [B, P, H, N] the piece; row i sits at window row offset[b] + i.
      wk, wv: [B, width, H, N] the window (open chunk + piece, chunk-aligned).
      offset: int32 [B]; chunk: the chunk size; block: query rows per step.

    Returns:
      (out [B, P, H, N] fp32, lse [B, P, H] fp32). Each block of queries reads the keys from
      the start of its first row's chunk on (chunk + block rows), so the cost follows the
      piece, not the window (whose open-chunk rows are keys only).
    """
    batch, piece, heads, n = q.shape
    block = min(block, piece)
    n_blocks = -(-piece // block)
    span = chunk + block
    scale = 1.0 / math.sqrt(n)
    # Zero rows after the window, so every block's key slice lies inside (never clamped).
    pad = max(0, 2 * chunk + n_blocks * block - wk.shape[1])
    grow = lambda x: jnp.pad(x, ((0, 0), (0, pad), (0, 0), (0, 0)))
    wk, wv = grow(wk), grow(wv)
    q = jnp.pad(q, ((0, 0), (0, n_blocks * block - piece), (0, 0), (0, 0)))
    take = jax.vmap(lambda x, s: lax.dynamic_slice_in_dim(x, s, span, axis=0))

    def one_block(i):
        rows = offset[:, None] + i * block + jnp.arange(block)  # [B, block] window rows
        start = (rows[:, 0] // chunk) * chunk  # [B]
        keys_at = start[:, None] + jnp.arange(span)  # [B, span]
        ok = (keys_at[:, None, :] // chunk == rows[:, :, None] // chunk) & (
            keys_at[:, None, :] <= rows[:, :, None]
        )  # [B, block, span]: same chunk, causal (a row always sees itself)
        q_i = lax.dynamic_slice_in_dim(q, i * block, block, axis=1).astype(jnp.float32)
        head_major = lambda x: jnp.swapaxes(take(x, start), 1, 2).astype(jnp.float32)
        s = jnp.einsum("bqhn,bhkn->bhqk", q_i, head_major(wk), precision=_HIGHEST) * scale
        empty = (
            jnp.full((batch, heads, block), -jnp.inf),
            jnp.zeros((batch, heads, block)),
            jnp.zeros((batch, heads, block, n)),
        )
        m, l, acc = online_softmax_update(empty, s, ok[:, None], head_major(wv))
        lse = m + jnp.log(l)  # l >= 1: a row always sees itself
        return jnp.swapaxes(acc / l[..., None], 1, 2), jnp.swapaxes(lse, 1, 2)

    out, lse = lax.map(one_block, jnp.arange(n_blocks))  # [n_blocks, B, block, ...]
    join = lambda x: jnp.moveaxis(x, 0, 1).reshape(batch, n_blocks * block, *x.shape[3:])[:, :piece]
    return join(out), join(lse)


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
    chunk = cache.open_keys.shape[2]
    scale = 1.0 / math.sqrt(q.shape[-1])
    offset = lengths % chunk
    as_cached = lambda x: x.astype(cache.open_keys.dtype).astype(jnp.float32)
    q32, k32, v32 = q.astype(jnp.float32), as_cached(k), as_cached(v)

    # The own chunk: the token itself, then the open chunk's earlier rows, read where they lie.
    # Its row is written only after every read (below).
    itself = jnp.sum(q32 * k32, axis=-1) * scale  # [B, H]
    softmax = (itself, jnp.ones_like(itself), v32)  # one key so far: weight exp(0) = 1
    earlier = jnp.einsum(
        "bhn,bhcn->bhc", q32, cache.open_keys.astype(jnp.float32), precision=_HIGHEST
    )
    before = jnp.arange(chunk) < offset[:, None, None]
    softmax = _fold(softmax, earlier * scale, before, cache.open_values)
    keys, values = cache.keys, cache.values
    if top_k > 1:
        sel = _token_selection(q32, cache, top_k - 1)  # [B, H, k-1]
        softmax, (keys, values) = _attend_slots(q32, sel, softmax, (keys, values), scale)
    m, l, acc = softmax
    out = acc / l[..., None]

    # The write depends on the reads' result (l >= 1 always: the largest term is exp(0)), so
    # XLA orders it after them and writes the donated buffers in place; an independent write
    # made XLA copy the open chunk several times per token.
    write = valid & jnp.all(l > 0, axis=-1)

    def put(rows, new):  # [B, H, chunk, N] <- [B, H, N] at row offset[b] where write[b]
        def one(b, rows):
            start = (b, 0, offset[b], 0)
            old = lax.dynamic_slice(rows, start, (1, rows.shape[1], 1, rows.shape[3]))
            row = jnp.where(write[b], new[b].astype(rows.dtype)[None, :, None], old)
            return lax.dynamic_update_slice(rows, row, start)

        return lax.fori_loop(0, rows.shape[0], one, rows)

    cache = cache._replace(
        keys=keys,
        values=values,
        open_keys=put(cache.open_keys, k),
        open_values=put(cache.open_values, v),
    )
    # The token completes its chunk: move the chunk into the slots (once per chunk, so under
    # a cond). The slots come back from the read loop, which orders this write after it.
    completes = write & (offset == chunk - 1)
    push = lambda c: push_chunks(
        c, c.open_keys, c.open_values, lengths // chunk, completes, eviction
    )
    cache = lax.cond(completes.any(), push, lambda c: c, cache)
    return out, cache


def _fold(softmax, s, mask, rows):
    """`online_softmax_update` for one query per head: (m, l [B, H], acc [B, H, N]) with
    logits s [B, H, C] (mask broadcastable) over rows [B, H, C, N]."""
    m, l, acc = softmax
    one = lambda x: x[:, :, None]
    m, l, acc = online_softmax_update(
        (one(m), one(l), one(acc)), one(s), one(mask), rows.astype(jnp.float32)
    )
    return m[:, :, 0], l[:, :, 0], acc[:, :, 0]


def _slots_in_chunk_order(cache: ChunkKVCache):
    """(order int32 [B, S], means [B, H, S, N], filled bool [B, S]): the slots sorted by chunk
    index (empty slots first), their mean keys, and which hold a chunk.
    Every filled slot holds a complete chunk before the current one: chunks are pushed only
    after the token or piece that completes them has read the cache."""
    order = chunk_order(cache)
    means = jnp.take_along_axis(cache.chunk_means, order[:, None, :, None], axis=2)
    filled = jnp.take_along_axis(cache.chunk_ids, order, axis=1) >= 0
    return order, means, filled


def _token_selection(q32, cache: ChunkKVCache, n_pick: int) -> jax.Array:
    """int32 [B, H, n_pick]: the slots of each head's best complete chunks, best first, -1
    where there are fewer candidates (the -1s come last)."""
    order, means, filled = _slots_in_chunk_order(cache)
    scores = jnp.einsum("bhn,bhsn->bhs", q32, means, precision=_HIGHEST)
    picked = _top_candidates(jnp.where(filled[:, None, :], scores, -jnp.inf), n_pick)
    slot_of = jnp.take_along_axis(order[:, None, :], jnp.maximum(picked, 0), axis=-1)
    return jnp.where(picked >= 0, slot_of, -1)


def _attend_slots(q32, sel, softmax, slots, scale):
    """Adds the selected slots to a running softmax, one pick (all heads) at a time.

    Each step gathers one chunk per head ([B, H, chunk, N], a few MB that stay in cache) for
    the keys and for the values, so no per-token buffer grows with top_k (large temporaries
    cost a fresh, page-faulted allocation on every XLA:CPU call). Picks past the last one any
    head uses are skipped: early in a sequence the step reads the open chunk only.

    Args:
      q32: [B, H, N] fp32 queries; sel: int32 [B, H, n] slots, -1 for none (trailing).
      softmax: (max [B, H], sum [B, H], weighted values [B, H, N]) so far.
      slots: (keys, values) [B, H, S, chunk, N], passed through the loop and returned (update
        those, not the inputs, so XLA can write them in place).
    """

    def step(i, carry):
        state, (keys, values) = carry
        pick = lax.dynamic_index_in_dim(sel, i, axis=2, keepdims=False)  # [B, H]
        take = lambda x: jnp.take_along_axis(
            x, jnp.maximum(pick, 0)[..., None, None, None], axis=2, mode="clip"
        )[:, :, 0]
        s = jnp.einsum("bhn,bhcn->bhc", q32, take(keys).astype(jnp.float32), precision=_HIGHEST)
        state = _fold(state, s * scale, (pick >= 0)[..., None], take(values))
        # Opaque to the while-loop simplifier, which would hand back the loop's input (still
        # live after the loop, so XLA would copy the whole cache for the loop).
        return state, lax.optimization_barrier((keys, values))

    n_used = jnp.max(jnp.sum(sel >= 0, axis=-1))
    return lax.fori_loop(0, n_used, step, (softmax, slots))
