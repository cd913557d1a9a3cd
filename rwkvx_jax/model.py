"""The RWKV-X language model: embedding, interleaved RWKV-7 and sparse blocks, head (SPEC §5)."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import linen as nn

from rwkvx_jax.config import RWKVXConfig
from rwkvx_jax.layers import (
    fresh_zeros,
    last_valid,
    layer_norm,
    linear,
    scaled_orthogonal,
    uniform_symmetric,
)
from rwkvx_jax.rwkv7 import RWKVBlock, RWKVBlockState
from rwkvx_jax.sparse.block import SparseBlock, SparseBlockState


def block_name(kind: str, index: int) -> str:
    """Flax submodule name of a block: `blocks_{i}` (RWKV-7) or `moba_{j}` (sparse)."""
    return f"blocks_{index}" if kind == "rwkv" else f"moba_{index}"


def bare_params(params):
    """The parameter tree itself, from either it or Flax's {"params": tree} variables."""
    if "params" in params and len(params) == 1:
        return params["params"]
    return params


class DecodeState(NamedTuple):
    """Everything a batch of sequences has read: a fixed-shape pytree (SPEC §6).

    Shapes never change while decoding, so one compiled step serves every position and the
    state can be donated to it.

    Attributes:
      lengths: int32 [B] tokens each sequence has read.
      blocks: block name (`block_name`: `blocks_{i}` / `moba_{j}`) -> that block's own state,
        an `RWKVBlockState` or a `SparseBlockState`.
    """

    lengths: jax.Array
    blocks: dict


def init_decode_state(
    config: RWKVXConfig, batch: int, cache_size: int, *, flat_cache: bool = False
) -> DecodeState:
    """The state of `batch` empty sequences: each block's empty state under its name.

    Args:
      config: the model config.
      batch: sequences decoded together.
      cache_size: tokens of keys/values each sparse block keeps per sequence (a multiple of
        the chunk size); attention is exact until a sequence reaches it, then chunks are
        evicted (see `rwkvx_jax.sparse.kv_cache`).
      flat_cache: a `FlatKVCache` of cache_size tokens per sparse block instead, for
        attention_mode="official" (`rwkvx_jax.sparse.official`).
    """
    dtype = jnp.dtype(config.dtype)
    c, n = config.n_embd, config.head_size
    blocks = {}
    for kind, index in config.block_order():
        if kind == "rwkv":
            state = RWKVBlockState.zeros(batch, c, n, dtype)
        else:
            state = SparseBlockState.empty(
                batch, c, n, config.chunk_size, config.top_k, cache_size, dtype,
                flat_cache=flat_cache,
            )  # fmt: skip
        blocks[block_name(kind, index)] = state
    return DecodeState(fresh_zeros((batch,), jnp.int32), blocks)


class RWKVX(nn.Module):
    """RWKV-X (A = 0 gives plain RWKV-7). The only module that sees the whole config."""

    config: RWKVXConfig

    @nn.compact
    def __call__(
        self,
        tokens,
        return_state: bool = False,
        *,
        decode_state: DecodeState | None = None,
        n_valid=None,
        cache_policy="distinct",
        last_logits_only: bool = False,
        hidden_only: bool = False,
    ):
        """Args:
          tokens: int [B, T].
          return_state: also return each block's final recurrent state.
          decode_state: continue from this `DecodeState` (prefill pieces, decode steps); the
            call then returns (logits, new DecodeState).
          n_valid: int32 [B] real tokens per row when decoding (right padding after); padding
            never enters the state.
          cache_policy: static; the KV-cache eviction policy when decoding, or the
            `OfficialAttention` settings (attention_mode="official").
          last_logits_only: return logits of each row's last real token only, [B, V].
          hidden_only: return the last block's output [B, T, C] instead of logits (no state,
            no decoding); `output_logits` turns it into logits, e.g. a piece at a time.

        Returns:
          logits float32 [B, T, V] ([B, V] with last_logits_only); with return_state,
          (logits, states) where states maps a block name (`blocks_{i}` / `moba_{j}`) to that
          block's final `RWKVBlockState` or `SparseBlockOutputs`; with decode_state,
          (logits, DecodeState).
        """
        cfg = self.config
        dtype, param_dtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
        x = nn.Embed(
            cfg.vocab_size,
            cfg.n_embd,
            embedding_init=uniform_symmetric(1e-4),
            dtype=dtype,
            param_dtype=param_dtype,
            name="emb",
        )(tokens)
        v_first = None
        states = {}
        decoding = decode_state is not None
        if decoding and n_valid is None:
            n_valid = jnp.full((tokens.shape[0],), tokens.shape[1], jnp.int32)
        for kind, index in cfg.block_order():
            name = block_name(kind, index)
            if kind == "rwkv":
                block = RWKVBlock(
                    layer_id=index,
                    n_layer=cfg.n_rwkv_layer,
                    n_embd=cfg.n_embd,
                    head_size=cfg.head_size,
                    dim_w=cfg.dim_w,
                    dim_a=cfg.dim_a,
                    dim_v=cfg.dim_v,
                    dim_g=cfg.dim_g,
                    has_v_params=index > 0 or cfg.block0_v_params,
                    wkv_backend=cfg.wkv_backend,
                    wkv_chunk_size=cfg.wkv_chunk_size,
                    dtype=dtype,
                    param_dtype=param_dtype,
                    name=name,
                )
                if decoding:
                    x, v_first, states[name] = block(x, v_first, decode_state.blocks[name], n_valid)
                else:
                    x, v_first, states[name] = block(x, v_first)
            else:
                block = SparseBlock(
                    n_embd=cfg.n_embd,
                    head_size=cfg.head_size,
                    chunk_size=cfg.chunk_size,
                    top_k=cfg.top_k,
                    channel_mix_layer_id=_preceding_rwkv_layer(cfg, index),
                    n_layer=cfg.n_rwkv_layer,
                    backend=cfg.attention_backend,
                    dtype=dtype,
                    param_dtype=param_dtype,
                    name=name,
                )
                if decoding:
                    x, states[name] = block(
                        x, decode_state.blocks[name], decode_state.lengths, n_valid, cache_policy
                    )
                else:
                    x, states[name] = block(x)
        if hidden_only:
            if decoding or return_state or last_logits_only:
                raise ValueError(
                    "hidden_only excludes decode_state, return_state and last_logits_only"
                )
            return x
        ln_out, head = _output_layers(cfg)
        if last_logits_only:
            x = last_valid(x, n_valid)[:, None]
        logits = _map_over_tokens(lambda h: head(ln_out(h)).astype(jnp.float32), x)
        if last_logits_only:
            logits = logits[:, 0]
        if decoding:
            return logits, DecodeState(decode_state.lengths + n_valid, states)
        return (logits, states) if return_state else logits


def _output_layers(cfg: RWKVXConfig) -> tuple[nn.Module, nn.Module]:
    """The final LayerNorm and the head; inside `RWKVX.__call__` they become its children."""
    dtype, param_dtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
    ln_out = layer_norm("ln_out", dtype, param_dtype)
    scale = 0.5 * (cfg.vocab_size / cfg.n_embd) ** 0.5 if cfg.vocab_size > cfg.n_embd else 0.5
    head = linear(cfg.vocab_size, "head", dtype, param_dtype, scaled_orthogonal(scale))
    return ln_out, head


def output_logits(cfg: RWKVXConfig, params, hidden: jnp.ndarray) -> jnp.ndarray:
    """The model's logits from its `hidden_only` output: float32 [..., V] from [..., C].

    The same LayerNorm and head as `RWKVX.__call__` (params["ln_out"], params["head"]), as a
    plain function of the params, so a loss can apply it to pieces of the positions.
    """
    ln_out, head = _output_layers(cfg)
    normed = ln_out.apply({"params": params["ln_out"]}, hidden)
    return head.apply({"params": params["head"]}, normed).astype(jnp.float32)


# Rows per step of the head. XLA:CPU runs LayerNorm + the [C, V] head matmul ~1.6x faster in
# 512-row pieces than in one [B*T, C] x [C, V] dot (measured at T = 4096, V = 65536: 2.6 s vs
# 4.1 s); on accelerators the pieces are still large matmuls.
_HEAD_ROWS = 512


def _map_over_tokens(fn, x):
    """fn applied to x [B, T, C] in row blocks of `_HEAD_ROWS` tokens; returns [B, T, ...]."""
    B, T, C = x.shape
    rows = B * T
    if rows <= 2 * _HEAD_ROWS:
        return fn(x)
    flat = x.reshape(rows, C)
    padded = -rows % _HEAD_ROWS
    flat = jnp.pad(flat, ((0, padded), (0, 0)))
    out = jax.lax.map(fn, flat.reshape(-1, _HEAD_ROWS, C))
    out = out.reshape(rows + padded, *out.shape[2:])[:rows]
    return out.reshape(B, T, *out.shape[1:])


def _preceding_rwkv_layer(cfg: RWKVXConfig, attn_index: int) -> int:
    """Index of the RWKV block just before sparse block `attn_index` (for its init profile)."""
    if cfg.n_attn_layer == 1:
        return cfg.n_rwkv_layer - 1
    return (attn_index + 1) * (cfg.n_rwkv_layer // cfg.n_attn_layer) - 1
