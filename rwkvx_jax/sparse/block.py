"""The sparse-attention block (SPEC §4): top-k chunk attention plus an RWKV-7 channel mix."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import linen as nn

from rwkvx_jax import ops
from rwkvx_jax.layers import fresh_zeros, layer_norm, linear
from rwkvx_jax.rwkv7 import ChannelMix
from rwkvx_jax.sparse.cached_attention import attend_piece, attend_token
from rwkvx_jax.sparse.kv_cache import ChunkKVCache, cache_slots, init_cache
from rwkvx_jax.sparse.official import (
    FlatKVCache,
    init_flat_cache,
    official_decode,
    official_prefill,
)


class SparseBlockState(NamedTuple):
    """What a sparse block carries from one token to the next when decoding (SPEC §6).

    Attributes:
      cache: its `ChunkKVCache` (or a `FlatKVCache` in attention_mode="official").
      ffn_x_prev: [B, C] the last input of the channel mix.
    """

    cache: ChunkKVCache | FlatKVCache
    ffn_x_prev: jax.Array

    @classmethod
    def empty(
        cls, batch: int, n_embd: int, head_size: int, chunk_size: int, top_k: int,
        cache_size: int, dtype, *, flat_cache: bool = False,
    ) -> SparseBlockState:  # fmt: skip
        """The state before any token.

        Args:
          batch: sequences decoded together.
          n_embd, head_size, chunk_size, top_k: the block's shape and attention settings.
          cache_size: tokens of keys/values kept per sequence, a multiple of chunk_size
            (`sparse.kv_cache.cache_slots` says why a size is unusable).
          dtype: the cache's and the shift's dtype.
          flat_cache: a `FlatKVCache` of cache_size tokens instead (attention_mode="official").
        """
        n_heads = n_embd // head_size
        if flat_cache:
            cache = init_flat_cache(batch, cache_size, n_heads, head_size, dtype)
        else:
            slots = cache_slots(cache_size, chunk_size, top_k)
            cache = init_cache(batch, slots, chunk_size, n_heads, head_size, dtype)
        return cls(cache, fresh_zeros((batch, n_embd), dtype))


class SparseBlockOutputs(NamedTuple):
    """What a sparse block returns from a parallel forward (no cache).

    Attributes:
      ffn_x_prev: [B, C] the last input of the channel mix.
      k, v: [B, T, H, N] the keys and values of the call's tokens.
    """

    ffn_x_prev: jax.Array
    k: jax.Array
    v: jax.Array


class TopKChunkAttention(nn.Module):
    """Multi-head attention (no bias, no positions, scale 1/sqrt(64)) over top-k chunks.

    Parameter names mirror the official `moba.{j}.att.{receptance,key,value,output}`.
    """

    n_embd: int
    head_size: int
    chunk_size: int
    top_k: int
    backend: str = "auto"
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, cache=None, lengths=None, n_valid=None, cache_policy="distinct"):
        """Args:
          x: [B, T, C].
          cache: optional `ChunkKVCache`: attend over it too (decoding), absorbing the new keys.
          lengths: int32 [B] tokens already absorbed by the cache (with cache).
          n_valid: int32 [B] real tokens of x per row, right padding after (with cache).
          cache_policy: static; the eviction policy name of a `ChunkKVCache`, or the
            `OfficialAttention` settings with a `FlatKVCache` (attention_mode="official").

        Returns:
          (out [B, T, C], k [B, T, H, N], v [B, T, H, N]); with a cache,
          (out [B, T, C], updated cache).
        """
        B, T, C = x.shape
        H, N = C // self.head_size, self.head_size
        dense = lambda name: linear(C, name, self.dtype, self.param_dtype)
        x = x.astype(self.dtype)
        q = dense("receptance")(x).reshape(B, T, H, N)
        k = dense("key")(x).reshape(B, T, H, N)
        v = dense("value")(x).reshape(B, T, H, N)
        if isinstance(cache, FlatKVCache):
            chunk = cache_policy.chunk_size or self.chunk_size
            if T == 1:
                o, cache = official_decode(
                    q[:, 0], k[:, 0], v[:, 0], cache, n_valid > 0, cache_policy, chunk
                )
                o = o[:, None]
            else:
                o, cache = official_prefill(x, q, k, v, cache, n_valid, cache_policy, chunk)
            return dense("output")(o.reshape(B, T, C).astype(self.dtype)), cache
        if cache is not None:
            if T == 1:
                o, cache = attend_token(
                    q[:, 0], k[:, 0], v[:, 0], cache, lengths, n_valid > 0,
                    top_k=self.top_k, eviction=cache_policy,
                )  # fmt: skip
                o = o[:, None]
            else:
                o, cache = attend_piece(
                    q, k, v, cache, lengths, n_valid, top_k=self.top_k, eviction=cache_policy
                )
            return dense("output")(o.reshape(B, T, C).astype(self.dtype)), cache
        o = ops.topk_chunk_attention(
            q, k, v, chunk_size=self.chunk_size, top_k=self.top_k, backend=self.backend
        )
        return dense("output")(o.reshape(B, T, C).astype(self.dtype)), k, v


class SparseBlock(nn.Module):
    """`x += Attn(LN1(x)); x += ChannelMix(LN2(x))` (official keys `moba.{j}.*`)."""

    n_embd: int
    head_size: int
    chunk_size: int
    top_k: int
    channel_mix_layer_id: int
    n_layer: int
    backend: str = "auto"
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(
        self,
        x,
        state: SparseBlockState | None = None,
        lengths=None,
        n_valid=None,
        cache_policy="distinct",
    ):
        """Args:
          x: [B, T, C].
          state: the state to continue from when decoding; None for a parallel forward.
          lengths, n_valid, cache_policy: decoding only, see `TopKChunkAttention`.

        Returns:
          (x [B, T, C], new `SparseBlockState`) when decoding, else
          (x [B, T, C], `SparseBlockOutputs`).
        """
        norm = lambda name: layer_norm(name, self.dtype, self.param_dtype)
        att = TopKChunkAttention(
            self.n_embd, self.head_size, self.chunk_size, self.top_k, self.backend,
            self.dtype, self.param_dtype, name="att",
        )  # fmt: skip
        ffn = ChannelMix(
            self.channel_mix_layer_id, self.n_layer, self.n_embd, self.dtype, self.param_dtype,
            name="ffn",
        )  # fmt: skip
        if state is None:
            dx, k, v = att(norm("ln1")(x))
            x = x + dx
            dx, ffn_x_prev = ffn(norm("ln2")(x), None, n_valid)
            return x + dx, SparseBlockOutputs(ffn_x_prev, k, v)
        dx, cache = att(norm("ln1")(x), state.cache, lengths, n_valid, cache_policy)
        x = x + dx
        dx, ffn_x_prev = ffn(norm("ln2")(x), state.ffn_x_prev, n_valid)
        return x + dx, SparseBlockState(cache, ffn_x_prev)
