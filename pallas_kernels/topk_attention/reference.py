"""Top-k chunk attention (SPEC §4 train semantics): chunk selection and the dense O(T²) oracle."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax import lax

from .plan import is_int

_HIGHEST = lax.Precision.HIGHEST


def validate_args(q, k, v, chunk_size: int, top_k: int) -> None:
    """Raises ValueError naming the problem when the arguments cannot describe an attention call.

    Args:
      q, k, v: [B, T, H, D] arrays of one shape.
      chunk_size: positive chunk length.
      top_k: number of chunks attended per query (own chunk included), at least 1.
    """
    if not is_int(chunk_size) or chunk_size <= 0:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    if not is_int(top_k) or top_k < 1:
        raise ValueError(f"top_k must be an int >= 1 (own chunk included), got {top_k!r}")
    for name, x in (("q", q), ("k", k), ("v", v)):
        if x.ndim != 4:
            raise ValueError(f"{name} must be [B, T, H, D], got shape {tuple(x.shape)}")
    if not (q.shape == k.shape == v.shape):
        raise ValueError(
            "q, k, v shape mismatch: "
            f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} (all must be [B, T, H, D])"
        )
    if q.shape[1] == 0:
        raise ValueError("sequence length T must be at least 1")


def _chunk_means(k: jax.Array, chunk_size: int) -> jax.Array:
    """Mean key of every chunk, fp32: [B, T, H, D] -> [B, nC, H, D].

    The last chunk may be partial; its mean is never used (it is nobody's candidate), so
    zero-padding it is harmless.
    """
    b, t, h, d = k.shape
    n_chunks = -(-t // chunk_size)
    k32 = jnp.pad(k.astype(jnp.float32), ((0, 0), (0, n_chunks * chunk_size - t), (0, 0), (0, 0)))
    return k32.reshape(b, n_chunks, chunk_size, h, d).mean(axis=2)


def _select_for_query_chunk(q_chunk, means, chunk_id, n_pick: int):
    """Top candidates for the queries of one chunk.

    Args:
      q_chunk: [B, chunk, H, D] queries of chunk `chunk_id` (fp32).
      means: [B, nC, H, D] fp32 chunk means.
      chunk_id: scalar int, the queries' own chunk.
      n_pick: how many candidates to return (top_k - 1).

    Returns:
      int32 [B, chunk, H, n_pick], -1 where fewer than n_pick candidates exist.
    """
    n_chunks = means.shape[1]
    scores = jnp.einsum("bthd,bjhd->bthj", q_chunk, means, precision=_HIGHEST)
    is_candidate = jnp.arange(n_chunks) < chunk_id  # only complete, strictly earlier chunks
    scores = jnp.where(is_candidate, scores, -jnp.inf)
    if n_chunks < n_pick:  # lax.top_k needs at least n_pick columns
        scores = jnp.pad(
            scores, ((0, 0), (0, 0), (0, 0), (0, n_pick - n_chunks)), constant_values=-jnp.inf
        )
    # lax.top_k documents that equal values come out lower index first: that is the tie rule.
    _, picked = lax.top_k(scores, n_pick)
    # Masked columns all have index >= chunk_id; they are only reached when candidates run out
    # (a genuine -inf score ties with them and, by the tie rule, still comes first).
    return jnp.where(picked < chunk_id, picked, -1).astype(jnp.int32)


def select_chunks(q: jax.Array, k: jax.Array, chunk_size: int, top_k: int) -> jax.Array:
    """Chunks each query attends besides its own (SPEC §4), not differentiated.

    Scores are `q_t . mean(k over chunk j)` in fp32, unscaled, over complete chunks j strictly
    before the query's chunk; ties go to the lower chunk index. Computed one query chunk at a
    time so memory is O(T + chunk_size * nC).

    Args:
      q: [B, T, H, D] queries.
      k: [B, T, H, D] keys.
      chunk_size: chunk length (chunks aligned at position 0).
      top_k: chunks attended per query including its own; top_k - 1 are selected here.

    Returns:
      int32 [B, T, H, top_k - 1]: selected chunk ids, best first, -1 for missing picks.
    """
    validate_args(q, k, k, chunk_size, top_k)
    b, t, h, d = q.shape
    n_pick = top_k - 1
    n_chunks = -(-t // chunk_size)
    if n_pick == 0:
        return jnp.zeros((b, t, h, 0), jnp.int32)
    q = lax.stop_gradient(q).astype(jnp.float32)
    means = _chunk_means(lax.stop_gradient(k), chunk_size)
    q_chunks = jnp.pad(q, ((0, 0), (0, n_chunks * chunk_size - t), (0, 0), (0, 0)))
    q_chunks = jnp.moveaxis(q_chunks.reshape(b, n_chunks, chunk_size, h, d), 1, 0)

    def one_chunk(args):
        q_chunk, chunk_id = args
        return _select_for_query_chunk(q_chunk, means, chunk_id, n_pick)

    picked = lax.map(one_chunk, (q_chunks, jnp.arange(n_chunks)))  # [nC, B, chunk, H, n_pick]
    picked = jnp.moveaxis(picked, 0, 1).reshape(b, n_chunks * chunk_size, h, n_pick)
    return picked[:, :t]


def attended_mask(q: jax.Array, k: jax.Array, chunk_size: int, top_k: int) -> jax.Array:
    """Dense boolean mask of the keys each query attends, [B, H, T, T] (O(T²): tests only).

    Args:
      q, k: [B, T, H, D].
      chunk_size, top_k: as in `select_chunks`.

    Returns:
      bool [B, H, T(query), T(key)].
    """
    t = q.shape[1]
    pos = jnp.arange(t)
    chunk_of = pos // chunk_size
    causal_own = (chunk_of[:, None] == chunk_of[None, :]) & (pos[None, :] <= pos[:, None])
    picked = jnp.moveaxis(select_chunks(q, k, chunk_size, top_k), 2, 1)  # [B, H, T, top_k-1]
    # key s is selected for query t when s's chunk is among t's picks (-1 never matches).
    selected = (picked[..., None, :] == chunk_of[:, None]).any(axis=-1)  # [B, H, T, T]
    return causal_own[None, None] | selected


def topk_chunk_attention_reference(
    q: jax.Array, k: jax.Array, v: jax.Array, *, chunk_size: int, top_k: int
) -> jax.Array:
    """Dense masked top-k chunk attention, fp32 softmax; O(T²) memory, for tests only.

    Args:
      q, k, v: [B, T, H, D].
      chunk_size: chunk length (chunks aligned at position 0).
      top_k: chunks attended per query including its own (>= 1).

    Returns:
      [B, T, H, D] in q.dtype.
    """
    validate_args(q, k, v, chunk_size, top_k)
    mask = attended_mask(q, k, chunk_size, top_k)
    scale = 1.0 / math.sqrt(q.shape[-1])
    logits = jnp.einsum(
        "bqhd,bkhd->bhqk", q.astype(jnp.float32), k.astype(jnp.float32), precision=_HIGHEST
    )
    logits = jnp.where(mask, logits * scale, -jnp.inf)  # every row keeps its own position
    probs = jax.nn.softmax(logits, axis=-1)
    out = jnp.einsum("bhqk,bkhd->bqhd", probs, v.astype(jnp.float32), precision=_HIGHEST)
    return out.astype(q.dtype)
