"""Fixed-capacity, chunk-granular KV cache of one sparse-attention block, with eviction.

The cache mirrors what top-k chunk attention (SPEC §4) reads: whole complete chunks, each with
its fp32 mean key (the gate's chunk summary), plus the chunk being filled. Complete chunks sit in
`n_slots` slots kept in chunk order, so "lower slot" means "lower chunk index" and the tie rule
of the training semantics carries over unchanged.

Until the slots are full nothing is ever dropped, so cached attention equals the parallel
forward exactly. When a chunk completes and the slots are full, one chunk of the n_slots + 1
(the slots plus the newcomer) is dropped by the eviction policy:

* "distinct" (default): drop the most redundant chunk, the one whose mean key (all heads
  together) has the highest cosine similarity to some other chunk; on a tie the older one goes.
  Chunk means are exactly what the gate scores, so two chunks with near-identical means compete
  for the same queries and one of them suffices for retrieval; a chunk unlike the rest (a needle
  in a haystack of repeated text) has a low similarity to everything and is kept however old it
  is. Measured against "oldest" in `bench/decode.py` (needle-in-haystack run over the cap).
* "oldest": a sliding window of chunks (drop the oldest); loses anything older than the window.

Either way the memory is fixed and the per-token work is bounded by the slot count.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

EVICTION_POLICIES = ("distinct", "oldest")


def fresh_zeros(shape, dtype) -> jax.Array:
    """Zeros in a buffer of their own (jnp.zeros may hand out one cached buffer for equal
    shapes, and a donated state must not name one buffer twice)."""
    return jax.device_put(np.zeros(shape, jnp.dtype(dtype)))


class ChunkKVCache(NamedTuple):
    """One sparse block's cache (head-major so per-head chunk gathers read contiguous rows).

    Attributes:
      keys, values: [B, H, S, chunk, N] complete chunks, oldest first (slots >= n_filled unused).
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


def _victim(means: jax.Array, policy: str) -> jax.Array:
    """Index (in 0..S) of the chunk to drop among S slots + the newcomer (index S).

    Args:
      means: [H, S + 1, N] fp32 chunk means of one sequence.
    """
    if policy == "oldest":
        return jnp.int32(0)
    flat = jnp.swapaxes(means, 0, 1).reshape(means.shape[1], -1)
    unit = flat / jnp.maximum(jnp.linalg.norm(flat, axis=-1, keepdims=True), 1e-30)
    similarity = jnp.matmul(unit, unit.T, precision=lax.Precision.HIGHEST)
    n = similarity.shape[0]
    similarity = jnp.where(jnp.eye(n, dtype=bool), -jnp.inf, similarity)
    return jnp.argmax(similarity.max(axis=-1)).astype(jnp.int32)  # first max: the older one


def _push_one(keys, values, means, ids, n_filled, new_k, new_v, new_mean, new_id, policy):
    """Inserts one complete chunk into one sequence's slots (evicting when full)."""
    n_slots = ids.shape[0]
    slot = jnp.arange(n_slots)
    if policy not in EVICTION_POLICIES:
        raise ValueError(f"eviction policy must be one of {EVICTION_POLICIES}, got {policy!r}")
    ext_means = jnp.concatenate([means, new_mean[:, None]], axis=1)
    victim = _victim(ext_means, policy)
    # Source index into [slots..., newcomer] for every slot after the insertion.
    evicting = jnp.arange(n_slots) + (slot >= victim)
    appending = jnp.where(slot == n_filled, n_slots, slot)
    source = jnp.where(n_filled < n_slots, appending, evicting)

    def take(old, new, axis):
        ext = jnp.concatenate([old, jnp.expand_dims(new, axis)], axis=axis)
        return jnp.take(ext, source, axis=axis)

    return (
        take(keys, new_k, 1),
        take(values, new_v, 1),
        take(means, new_mean, 1),
        take(ids, new_id, 0),
        jnp.minimum(n_filled + 1, n_slots),
    )


def push_chunks(
    cache: ChunkKVCache, new_keys, new_values, new_ids, do_push, policy: str
) -> ChunkKVCache:
    """Moves one completed chunk per sequence into the slots where `do_push` is set.

    Args:
      cache: the cache.
      new_keys, new_values: [B, H, chunk, N] the completed chunk of each sequence.
      new_ids: int32 [B] its chunk index.
      do_push: bool [B]; rows with False are left untouched.
      policy: eviction policy, see the module docstring.

    Returns:
      The updated cache (open chunk untouched).
    """
    pushed = jax.vmap(lambda *a: _push_one(*a, policy))(
        cache.keys,
        cache.values,
        cache.chunk_means,
        cache.chunk_ids,
        cache.n_filled,
        new_keys,
        new_values,
        chunk_mean(new_keys),
        new_ids,
    )
    old = (cache.keys, cache.values, cache.chunk_means, cache.chunk_ids, cache.n_filled)

    def choose(new, prev):
        return jnp.where(do_push.reshape((-1,) + (1,) * (new.ndim - 1)), new, prev)

    keys, values, means, ids, n_filled = (choose(n, o) for n, o in zip(pushed, old, strict=True))
    return cache._replace(
        keys=keys, values=values, chunk_means=means, chunk_ids=ids, n_filled=n_filled
    )


def cached_tokens(cache: ChunkKVCache) -> int:
    """Keys the cache can hold: its slots plus the open chunk (static)."""
    _, _, n_slots, chunk, _ = cache.keys.shape
    return (n_slots + 1) * chunk
