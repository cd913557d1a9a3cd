"""The sparse-attention block (SPEC §4): top-k chunk attention plus an RWKV-7 channel mix."""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
from flax import linen as nn

from rwkvx_jax import ops
from rwkvx_jax.cached_attention import attend_piece, attend_token
from rwkvx_jax.layers import layer_norm, linear
from rwkvx_jax.official_attention import FlatKVCache, official_decode, official_prefill
from rwkvx_jax.rwkv7 import ChannelMix


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
    def __call__(self, x, state=None, lengths=None, n_valid=None, cache_policy="distinct"):
        """Args:
          x: [B, T, C]; state: optional dict with `ffn_x_prev` [B, C] and, when decoding,
            `cache` (a `ChunkKVCache`).
          lengths, n_valid, cache_policy: decoding only, see `TopKChunkAttention`.

        Returns:
          (x [B, T, C], state dict with `ffn_x_prev` [B, C] and either this call's `k`, `v`
          [B, T, H, N] or, when decoding, the updated `cache`).
        """
        state = state or {}
        cache = state.get("cache")
        norm = lambda name: layer_norm(name, self.dtype, self.param_dtype)
        att = TopKChunkAttention(
            self.n_embd, self.head_size, self.chunk_size, self.top_k, self.backend,
            self.dtype, self.param_dtype, name="att",
        )  # fmt: skip
        if cache is None:
            dx, k, v = att(norm("ln1")(x))
            new_state = {"k": k, "v": v}
        else:
            dx, cache = att(norm("ln1")(x), cache, lengths, n_valid, cache_policy)
            new_state = {"cache": cache}
        x = x + dx
        ffn = ChannelMix(
            self.channel_mix_layer_id, self.n_layer, self.n_embd, self.dtype, self.param_dtype,
            name="ffn",
        )  # fmt: skip
        dx, ffn_x_prev = ffn(norm("ln2")(x), state.get("ffn_x_prev"), n_valid)
        return x + dx, {"ffn_x_prev": ffn_x_prev, **new_state}
