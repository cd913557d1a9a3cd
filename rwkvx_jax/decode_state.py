"""The decode state: a typed, fixed-shape pytree holding everything a sequence has read.

Per RWKV-7 block the two token-shift vectors and the fp32 WKV state (SPEC §6); per sparse block
its `ChunkKVCache` and the channel-mix shift. Shapes never change while decoding, so one
compiled step serves every position, and the state can be donated to it.
"""

from __future__ import annotations

import hashlib
import json
from typing import NamedTuple

import jax
import jax.numpy as jnp

from rwkvx_jax.config import RWKVXConfig
from rwkvx_jax.kv_cache import ChunkKVCache, fresh_zeros, init_cache
from rwkvx_jax.official_attention import FlatKVCache, init_flat_cache


class RWKVBlockState(NamedTuple):
    """Attributes: att_x_prev [B, C], wkv [B, H, N, N] fp32, ffn_x_prev [B, C]."""

    att_x_prev: jax.Array
    wkv: jax.Array
    ffn_x_prev: jax.Array


class SparseBlockState(NamedTuple):
    """Attributes: cache (`ChunkKVCache`, or `FlatKVCache` in official mode), ffn_x_prev [B, C]."""

    cache: ChunkKVCache | FlatKVCache
    ffn_x_prev: jax.Array


class DecodeState(NamedTuple):
    """Attributes:
    lengths: int32 [B] tokens each sequence has read.
    blocks: block name (`blocks_{i}` / `moba_{j}`) -> its `RWKVBlockState` / `SparseBlockState`.
    """

    lengths: jax.Array
    blocks: dict


def cache_slots(config: RWKVXConfig, cache_size: int) -> int:
    """Complete-chunk slots for a cache of `cache_size` tokens (one more chunk is the open one).

    Raises:
      ValueError: if cache_size is not a multiple of the chunk or leaves fewer than top_k - 1
        slots (then even a short sequence could not attend its top-k chunks).
    """
    chunk = config.chunk_size
    if cache_size % chunk:
        raise ValueError(f"cache_size {cache_size} must be a multiple of chunk_size {chunk}")
    slots = cache_size // chunk - 1
    if slots < max(config.top_k - 1, 1):
        raise ValueError(
            f"cache_size {cache_size} holds {slots} complete chunks besides the open one; "
            f"top_k = {config.top_k} needs at least {max(config.top_k - 1, 1)} "
            f"(cache_size >= {(max(config.top_k - 1, 1) + 1) * chunk})"
        )
    return slots


def init_decode_state(
    config: RWKVXConfig, batch: int, cache_size: int, *, flat_cache: bool = False
) -> DecodeState:
    """The state of `batch` empty sequences.

    Args:
      config: the model config.
      batch: sequences decoded together.
      cache_size: tokens of keys/values each sparse block keeps per sequence (a multiple of
        the chunk size); attention is exact until a sequence reaches it, then chunks are
        evicted (see `rwkvx_jax.kv_cache`).
      flat_cache: a `FlatKVCache` of cache_size tokens per sparse block instead, for
        attention_mode="official" (`rwkvx_jax.official_attention`).
    """
    c, n = config.n_embd, config.head_size
    h = c // n
    dtype = jnp.dtype(config.dtype)
    blocks = {}
    shift = lambda: fresh_zeros((batch, c), dtype)
    for kind, index in config.block_order():
        if kind == "rwkv":
            wkv = fresh_zeros((batch, h, n, n), jnp.float32)
            blocks[f"blocks_{index}"] = RWKVBlockState(shift(), wkv, shift())
        else:
            if flat_cache:
                cache = init_flat_cache(batch, cache_size, h, n, dtype)
            else:
                slots = cache_slots(config, cache_size)
                cache = init_cache(batch, slots, config.chunk_size, h, n, dtype)
            blocks[f"moba_{index}"] = SparseBlockState(cache, shift())
    return DecodeState(fresh_zeros((batch,), jnp.int32), blocks)


def state_signature(config: RWKVXConfig, state: DecodeState) -> str:
    """Hash of everything a state must agree with to be reused: the model's shapes and
    numerics settings and the state's own shapes and dtypes."""
    leaves = jax.tree_util.tree_leaves_with_path(state)
    shapes = [(jax.tree_util.keystr(p), x.shape, str(x.dtype)) for p, x in leaves]
    blob = json.dumps([config.shape_hash(), config.chunk_size, config.top_k, shapes], default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]
