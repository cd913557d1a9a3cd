"""`attention_mode="official"`: the sparse-attention inference of `rwkv_x.model_old` (SPEC §6).

A compatibility mode, for reproducing and explaining the official runtime's outputs; it is not
the training semantics and does not equal the parallel forward past the dense threshold.
What it reproduces, per sparse block (`T` new tokens, `CT` tokens in the cache):

* prefill (one call per prompt): if `CT + T <= short_threshold` or `prefill_attn == "full"`,
  dense attention over the whole cache plus causal over the new tokens; otherwise causal
  attention inside chunks aligned at the call's first token, ignoring the cache;
* decode: if `CT <= short_threshold` or `decode_attn == "full"` (the official default), dense
  over cache + self; otherwise the `top_k` complete cache chunks scored by `q . mean(k)` over
  all C dims at once (one choice shared by every head), plus the incomplete tail and self;
* optional KV-cache compression before either, when the cache exceeds `max_kv`: keep the last
  `window` tokens plus, per head, the `min_kv - window` older tokens with the largest summed
  attention probability from the current queries (the official prefill votes with the block's
  normalised input x instead of q; reproduced), ordered by vote as the official does.

The cache is a flat fixed-capacity buffer; a sequence that would overflow it is an error.
"""

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from rwkvx_jax.config import ConfigError
from rwkvx_jax.layers import fresh_zeros

_HIGHEST = lax.Precision.HIGHEST


@dataclasses.dataclass(frozen=True)
class OfficialAttention:
    """Settings of `rwkv_x.model_old.RWKV_X_Config` that shape inference (defaults as there,
    except the chunk, which follows the model config unless set).

    Attributes:
      short_threshold: `short_sequence_criteria`.
      top_k: `attn_topk`, chunks attended in the top-k decode branch (own tail not counted).
      chunk_size: `attn_chunk_size`; None = the model's chunk_size.
      prefill_attn: "chunk" or "full" (`prefill_attn_mode`).
      decode_attn: "full" or "topk" (`decoding_attn_mode`; the official treats any value but
        "full" as top-k).
      kv_management: `enable_kv_cache_management`.
      max_kv, window, min_kv: `max_kv_cache_size`, `kv_cache_window_size`, `min_kv_cache_size`.
    """

    short_threshold: int = 8000
    top_k: int = 3
    chunk_size: int | None = None
    prefill_attn: str = "chunk"
    decode_attn: str = "full"
    kv_management: bool = False
    max_kv: int = 20000
    window: int = 2000
    min_kv: int = 16000

    def __post_init__(self):
        if self.prefill_attn not in ("chunk", "full"):
            raise ConfigError(f"prefill_attn must be 'chunk' or 'full', got {self.prefill_attn!r}")
        if self.decode_attn not in ("full", "topk"):
            raise ConfigError(f"decode_attn must be 'full' or 'topk', got {self.decode_attn!r}")
        if self.kv_management and not (0 < self.window < self.min_kv < self.max_kv):
            raise ConfigError(
                "KV management needs 0 < window < min_kv < max_kv, got "
                f"window={self.window}, min_kv={self.min_kv}, max_kv={self.max_kv}"
            )
        if self.top_k < 1 or self.short_threshold < 0:
            raise ConfigError(f"bad top_k {self.top_k} or short_threshold {self.short_threshold}")


class FlatKVCache(NamedTuple):
    """Attributes: keys, values [B, H, capacity, N]; size int32 [B] tokens held."""

    keys: jax.Array
    values: jax.Array
    size: jax.Array


def _attend(q, keys, values, mask):
    """Softmax attention. q [B, H, Q, N]; keys, values [B, H, K, N]; mask bool [B, H|1, Q, K]."""
    scale = 1.0 / math.sqrt(q.shape[-1])
    logits = jnp.einsum(
        "bhqn,bhkn->bhqk", q.astype(jnp.float32), keys.astype(jnp.float32), precision=_HIGHEST
    )
    probs = jax.nn.softmax(jnp.where(mask, logits * scale, -jnp.inf), axis=-1)
    return jnp.einsum("bhqk,bhkn->bhqn", probs, values.astype(jnp.float32), precision=_HIGHEST)


def _compress(cache: FlatKVCache, voters, settings: OfficialAttention, voter_valid):
    """The official KV-cache compression where a row's cache exceeds max_kv (else unchanged).

    A row with no valid voter reads nothing in this call and is left unchanged: the official
    runtime compresses at the start of the next call that reads a token, with its queries.

    Args:
      voters: [B, H, Q, N] queries that vote; voter_valid bool [B, Q].
    """
    capacity = cache.keys.shape[2]
    keep = settings.min_kv - settings.window
    past = cache.size - settings.window  # [B]
    pos = jnp.arange(capacity)
    scale = 1.0 / math.sqrt(voters.shape[-1])
    logits = jnp.einsum(
        "bhqn,bhkn->bhqk", voters.astype(jnp.float32), cache.keys.astype(jnp.float32),
        precision=_HIGHEST,
    )  # fmt: skip
    in_past = (pos[None, :] < past[:, None])[:, None, None, :]
    probs = jax.nn.softmax(jnp.where(in_past, logits * scale, -jnp.inf), axis=-1)
    votes = jnp.where(voter_valid[:, None, :, None], probs, 0.0).sum(axis=2)  # [B, H, cap]
    votes = jnp.where(in_past[:, :, 0], votes, -jnp.inf)
    _, kept = lax.top_k(votes, keep)  # [B, H, keep], highest vote first (official order)
    recent = past[:, None] + jnp.arange(settings.window)[None, :]  # [B, window]
    order = jnp.concatenate(
        [kept, jnp.broadcast_to(recent[:, None], kept.shape[:2] + recent.shape[1:])], axis=-1
    )
    order = jnp.pad(order, ((0, 0), (0, 0), (0, capacity - order.shape[-1])))
    gather = lambda x: jnp.take_along_axis(x, order[..., None], axis=2)
    squeeze = (cache.size > settings.max_kv) & voter_valid.any(axis=-1)
    pick = lambda new, old: jnp.where(squeeze[:, None, None, None], new, old)
    return FlatKVCache(
        pick(gather(cache.keys), cache.keys),
        pick(gather(cache.values), cache.values),
        jnp.where(squeeze, settings.min_kv, cache.size),
    )


def _append(cache: FlatKVCache, k, v, n_valid):
    """Writes new keys [B, T, H, N] at each row's end; size grows by n_valid.

    Rows with nothing to add are left untouched (a write at a full row's end would be clamped
    onto its last entries).
    """
    put = jax.vmap(lambda c, x, s: lax.dynamic_update_slice_in_dim(c, x, s, axis=1))
    heads_first = lambda x: jnp.swapaxes(x, 1, 2).astype(cache.keys.dtype)
    some = (n_valid > 0)[:, None, None, None]
    return FlatKVCache(
        jnp.where(some, put(cache.keys, heads_first(k), cache.size), cache.keys),
        jnp.where(some, put(cache.values, heads_first(v), cache.size), cache.values),
        cache.size + n_valid,
    )


def init_flat_cache(batch, capacity, n_heads, head_size, dtype) -> FlatKVCache:
    """An empty flat cache of `capacity` tokens."""
    kv = lambda: fresh_zeros((batch, n_heads, capacity, head_size), dtype)
    return FlatKVCache(kv(), kv(), fresh_zeros((batch,), jnp.int32))


def official_prefill(x, q, k, v, cache: FlatKVCache, n_valid, settings: OfficialAttention, chunk):
    """One official `forward_seq` call for the block: T new tokens per row.

    Args:
      x: [B, T, C] the block's normalised input (the official compression votes with it).
      q, k, v: [B, T, H, N]; n_valid int32 [B] real tokens (right padding after).
      cache: the flat cache; chunk: the attention chunk length (T must be a multiple).

    Returns:
      (out [B, T, H, N] fp32, updated cache).
    """
    b, t, h, n = q.shape
    if settings.kv_management:
        voters = jnp.swapaxes(x.reshape(b, t, h, n), 1, 2)
        cache = _compress(cache, voters, settings, jnp.arange(t)[None] < n_valid[:, None])
    capacity = cache.keys.shape[2]
    qh, kh, vh = (jnp.swapaxes(a, 1, 2) for a in (q, k, v))  # [B, H, T, N]
    causal = jnp.tril(jnp.ones((t, t), bool))
    # Dense branch: the whole cache, then causal over the new tokens.
    cached = jnp.arange(capacity)[None, :] < cache.size[:, None]  # [B, cap]
    mask = jnp.concatenate([jnp.broadcast_to(cached[:, None, :], (b, t, capacity)),
                            jnp.broadcast_to(causal, (b, t, t))], axis=-1)  # fmt: skip
    keys = jnp.concatenate([cache.keys, kh.astype(cache.keys.dtype)], axis=2)
    values = jnp.concatenate([cache.values, vh.astype(cache.values.dtype)], axis=2)
    dense = _attend(qh, keys, values, mask[:, None])
    # Chunk branch: causal within chunks aligned at this call's first token.
    n_chunks = t // chunk
    fold = lambda a: a.reshape(b, h, n_chunks, chunk, n)
    local = jax.vmap(_attend, in_axes=(2, 2, 2, None), out_axes=2)(
        fold(qh), fold(kh), fold(vh), jnp.tril(jnp.ones((chunk, chunk), bool))[None, None]
    ).reshape(b, h, t, n)
    use_dense = (cache.size + n_valid <= settings.short_threshold) | (
        settings.prefill_attn == "full"
    )
    out = jnp.where(use_dense[:, None, None, None], dense, local)
    return jnp.swapaxes(out, 1, 2), _append(cache, k, v, n_valid)


def official_decode(q, k, v, cache: FlatKVCache, valid, settings: OfficialAttention, chunk):
    """One official `forward_one` call for the block.

    Args:
      q, k, v: [B, H, N] the new token; valid bool [B] (False rows absorb nothing).

    Returns:
      (out [B, H, N] fp32, updated cache).
    """
    b, h, n = q.shape
    if settings.kv_management:
        cache = _compress(cache, q[:, :, None], settings, valid[:, None])
    capacity = cache.keys.shape[2]
    pos = jnp.arange(capacity)
    self_k, self_v = k[:, :, None].astype(cache.keys.dtype), v[:, :, None].astype(cache.keys.dtype)
    keys = jnp.concatenate([cache.keys, self_k], axis=2)
    values = jnp.concatenate([cache.values, self_v], axis=2)
    with_self = lambda m: jnp.concatenate([m, jnp.ones(m.shape[:-1] + (1,), bool)], axis=-1)
    dense_mask = with_self(pos[None, :] < cache.size[:, None])  # [B, cap + 1]

    n_complete = cache.size // chunk
    n_slots = capacity // chunk
    folded = cache.keys[:, :, : n_slots * chunk].reshape(b, h, n_slots, chunk, n)
    means = folded.astype(jnp.float32).mean(axis=3)  # [B, H, slots, N]
    # One score per chunk over all C dims: the heads' dot products summed.
    scores = jnp.einsum("bhn,bhjn->bj", q.astype(jnp.float32), means, precision=_HIGHEST)
    scores = jnp.where(jnp.arange(n_slots)[None, :] < n_complete[:, None], scores, -jnp.inf)
    _, top = lax.top_k(scores, settings.top_k)  # [B, top_k]
    chunk_of = jnp.minimum(pos // chunk, n_slots)
    picked = (chunk_of[None, :, None] == top[:, None, :]).any(-1) & (
        chunk_of[None, :] < n_complete[:, None]
    )
    tail = (pos[None, :] >= (n_complete * chunk)[:, None]) & (pos[None, :] < cache.size[:, None])
    topk_mask = with_self(picked | tail)
    use_dense = (cache.size <= settings.short_threshold) | (settings.decode_attn == "full")
    mask = jnp.where(use_dense[:, None], dense_mask, topk_mask)
    out = _attend(q[:, :, None], keys, values, mask[:, None, None])[:, :, 0]
    new = _append(cache, k[:, None], v[:, None], valid.astype(jnp.int32))
    return out, new
