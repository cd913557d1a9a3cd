"""Fixed-capacity, chunk-granular KV cache of one sparse-attention block, with eviction.

The cache mirrors what top-k chunk attention (SPEC §4) reads: whole complete chunks, each with
its fp32 mean key (the gate's chunk summary), plus the chunk being filled. Complete chunks sit in
`n_slots` slots (filled as a prefix); each slot records its chunk index, which orders the slots
for the gate's tie rule (lower chunk index first). A newcomer is written into one slot in
place, so a decode step never copies the cache.

Until the slots are full nothing is ever dropped, so cached attention equals the parallel
forward exactly. When a chunk completes and the slots are full, one chunk of the n_slots + 1
(the slots plus the newcomer) is dropped by the eviction policy:

* "distinct" (default): drop the most redundant chunk, the one whose mean key (all heads
  together) has the highest cosine similarity to some other chunk; on a tie the older one goes.
  Chunk means are exactly what the gate scores, so two chunks with near-identical means compete
  for the same queries and one of them suffices for retrieval; a chunk unlike the rest (a needle
  in a haystack of repeated text) has a low similarity to everything and is kept however old it
  is. Measured against "oldest" in `bench/needle_eviction.py` (a needle in a haystack past the
  cap).
* "oldest": a sliding window of chunks (drop the oldest); loses anything older than the window.

Either way the memory is fixed and the per-token work is bounded by the slot count.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from rwkvx_jax.layers import fresh_zeros

EVICTION_POLICIES = ("distinct", "oldest")


def cache_slots(cache_size: int, chunk_size: int, top_k: int) -> int:
    """Complete-chunk slots for a cache of `cache_size` tokens (one more chunk is the open one).

    Raises:
      ValueError: if cache_size is not a multiple of the chunk or leaves fewer than top_k - 1
        slots (then even a short sequence could not attend its top-k chunks).
    """
    if cache_size % chunk_size:
        raise ValueError(f"cache_size {cache_size} must be a multiple of chunk_size {chunk_size}")
    slots = cache_size // chunk_size - 1
    needed = max(top_k - 1, 1)
    if slots < needed:
        raise ValueError(
            f"cache_size {cache_size} holds {slots} complete chunks besides the open one; "
            f"top_k = {top_k} needs at least {needed} (cache_size >= {(needed + 1) * chunk_size})"
        )
    return slots


class ChunkKVCache(NamedTuple):
    """One sparse block's cache (head-major so per-head chunk gathers read contiguous rows).

    Attributes:
      keys, values: [B, H, S, chunk, N] complete chunks (slots >= n_filled unused).
      chunk_means: [B, H, S, N] fp32 mean key of each slot's chunk.
      chunk_ids: int32 [B, S] the chunk index held by each slot, -1 when empty.
      n_filled: int32 [B] slots in use (always a prefix).
      open_keys, open_values: [B, H, chunk, N] the chunk being filled (rows below
        `length % chunk` are valid, with `length` the sequence's token count).
    """

    keys: jax.Array
    values: jax.Array
    chunk_means: jax.Array
    chunk_ids: jax.Array
    n_filled: jax.Array
    open_keys: jax.Array
    open_values: jax.Array


def init_cache(
    batch: int, n_slots: int, chunk_size: int, n_heads: int, head_size: int, dtype
) -> ChunkKVCache:
    """An empty cache with `n_slots` complete-chunk slots plus the open chunk."""
    if n_slots < 1:
        raise ValueError(f"a KV cache needs at least one complete-chunk slot, got {n_slots}")
    # Separate buffers for every field: a donated state must not alias one buffer twice.
    kv = lambda: fresh_zeros((batch, n_heads, n_slots, chunk_size, head_size), dtype)
    open_kv = lambda: fresh_zeros((batch, n_heads, chunk_size, head_size), dtype)
    return ChunkKVCache(
        keys=kv(),
        values=kv(),
        chunk_means=fresh_zeros((batch, n_heads, n_slots, head_size), jnp.float32),
        chunk_ids=fresh_zeros((batch, n_slots), jnp.int32) - 1,
        n_filled=fresh_zeros((batch,), jnp.int32),
        open_keys=open_kv(),
        open_values=open_kv(),
    )


def chunk_mean(keys: jax.Array) -> jax.Array:
    """fp32 mean over a chunk's tokens: [..., chunk, N] -> [..., N] (as the gate computes it)."""
    return keys.astype(jnp.float32).mean(axis=-2)


def _victim(means: jax.Array, ids: jax.Array, policy: str) -> jax.Array:
    """Index (in 0..S) of the chunk to drop among S slots + the newcomer (index S).

    Args:
      means: [H, S + 1, N] fp32 chunk means of one sequence (slots, then the newcomer).
      ids: int32 [S + 1] their chunk indices (the newcomer's is the largest).
    """
    if policy == "oldest":
        return jnp.argmin(ids).astype(jnp.int32)
    flat = jnp.swapaxes(means, 0, 1).reshape(means.shape[1], -1)
    unit = flat / jnp.maximum(jnp.linalg.norm(flat, axis=-1, keepdims=True), 1e-30)
    similarity = jnp.matmul(unit, unit.T, precision=lax.Precision.HIGHEST)
    n = similarity.shape[0]
    redundancy = jnp.where(jnp.eye(n, dtype=bool), -jnp.inf, similarity).max(axis=-1)
    # Among the most redundant, the oldest chunk goes.
    most = redundancy == redundancy.max()
    return jnp.argmin(jnp.where(most, ids, jnp.iinfo(jnp.int32).max)).astype(jnp.int32)


def _target_slots(cache: ChunkKVCache, new_means, new_ids, policy: str) -> jax.Array:
    """Slot each sequence's newcomer goes to: the next free one, else the victim's (S = drop).

    The victim search (O(S^2) similarities) runs only when some sequence is full.
    """
    n_slots = cache.chunk_ids.shape[1]
    full = cache.n_filled >= n_slots

    def victims(_):
        means = jnp.concatenate([cache.chunk_means, new_means[:, :, None]], axis=2)
        ids = jnp.concatenate([cache.chunk_ids, new_ids[:, None]], axis=1)
        return jax.vmap(lambda m, i: _victim(m, i, policy))(means, ids)

    victim = lax.cond(full.any(), victims, lambda _: cache.n_filled, None)
    return jnp.where(full, victim, cache.n_filled)


def _write_slot(buffer: jax.Array, rows: jax.Array, slot: jax.Array, write: jax.Array):
    """buffer[b, :, slot[b]] = rows[b] where write[b], in place (a slot-sized update).

    Args:
      buffer: [B, H, S, ...]; rows: [B, H, ...]; slot: int32 [B] (clipped); write: bool [B].
    """

    def one(buf, row, s, w):
        old = lax.dynamic_index_in_dim(buf, s, axis=1, keepdims=False)
        row = jnp.where(w, row.astype(buf.dtype), old)
        return lax.dynamic_update_index_in_dim(buf, row, s, axis=1)

    return jax.vmap(one)(buffer, rows, slot, write)


def push_chunks(
    cache: ChunkKVCache, new_keys, new_values, new_ids, do_push, policy: str
) -> ChunkKVCache:
    """Moves one completed chunk per sequence into the slots where `do_push` is set.

    Writes one slot in place (O(chunk) memory traffic), so it can run on every decode step
    without copying the cache. Slots are not kept in chunk order; `chunk_ids` gives the order
    (the tie rule of the gate goes by chunk index, see `chunk_order`).

    Args:
      cache: the cache.
      new_keys, new_values: [B, H, chunk, N] the completed chunk of each sequence.
      new_ids: int32 [B] its chunk index.
      do_push: bool [B]; rows with False are left untouched.
      policy: eviction policy, see the module docstring.

    Returns:
      The updated cache (open chunk untouched).
    """
    if policy not in EVICTION_POLICIES:
        raise ValueError(f"eviction policy must be one of {EVICTION_POLICIES}, got {policy!r}")
    n_slots = cache.chunk_ids.shape[1]
    new_means = chunk_mean(new_keys)
    target = _target_slots(cache, new_means, new_ids, policy)
    write = do_push & (target < n_slots)
    slot = jnp.minimum(target, n_slots - 1)
    ids = jax.vmap(lambda i, new, s, w: i.at[s].set(jnp.where(w, new, i[s])))(
        cache.chunk_ids, new_ids, slot, write
    )
    return cache._replace(
        keys=_write_slot(cache.keys, new_keys, slot, write),
        values=_write_slot(cache.values, new_values, slot, write),
        chunk_means=_write_slot(cache.chunk_means, new_means, slot, write),
        chunk_ids=ids,
        n_filled=jnp.where(do_push, jnp.minimum(cache.n_filled + 1, n_slots), cache.n_filled),
    )


def chunk_order(cache: ChunkKVCache) -> jax.Array:
    """int32 [B, S]: slot indices sorted by chunk index (empty slots, id -1, first)."""
    return jnp.argsort(cache.chunk_ids, axis=1, stable=True).astype(jnp.int32)


def cached_tokens(cache: ChunkKVCache) -> int:
    """Keys the cache can hold: its slots plus the open chunk (static)."""
    _, _, n_slots, chunk, _ = cache.keys.shape
    return (n_slots + 1) * chunk
