"""Top-k chunk attention (SPEC §4) of a sequence cut into shards of whole chunks.

A query's own chunk lies on its shard: the local kernel with top_k = 1 gives that part and its
log-sum-exp. Choosing among the earlier chunks needs every earlier chunk's mean key: the
shards all-gather their chunk means ([B, T / chunk, H, D] fp32, small). The chosen chunks'
keys and values may lie on any earlier shard: the shards all-gather K and V, and each query
reads its choices from them (`selected_chunks`, exact cost: (top_k - 1) * chunk keys per
query). The two parts, each softmax-normalised over disjoint keys, merge by their
log-sum-exps. The backward pass is JAX's transpose: the gathered K / V cotangents are
reduce-scattered back to the shards that own them.

Why all-gather K and V and not fetch only the chosen chunks, or pass K / V around a ring
(docs/CONTEXT_PARALLEL.md has the numbers at 1M tokens): the chunks one shard's queries choose
differ per query and head, so their union is in general every earlier chunk, and XLA needs
static shapes: a fetch of "what is chosen" must be sized for that union, the whole prefix,
and moves as many bytes as the all-gather. A ring moves the same bytes too ((C - 1) / C of
the sequence's K / V per device) in C - 1 dependent steps, holding two shards at a time
instead of the whole sequence: it saves memory, not traffic, at the cost of a per-step merge
of partial softmaxes. The all-gather is one collective that XLA can overlap with the
projections, and with remat the gathered K / V live for one sparse block at a time.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax import lax

_HIGHEST = lax.Precision.HIGHEST

# own(q, k, v) -> (o [B, T, H, D], lse [B, T, H]): causal attention inside each chunk.
OwnChunks = Callable[..., tuple[jax.Array, jax.Array]]
# chosen(q, k_all, v_all, sel) -> (o, lse): attention over the chunks `sel` names, with the
# sequence's keys and values head-major [B, H, T, D].
ChosenChunks = Callable[..., tuple[jax.Array, jax.Array]]


def chunk_means(k: jax.Array, chunk_size: int) -> jax.Array:
    """Mean key of each chunk, fp32: [B, T, H, D] -> [B, T / chunk, H, D] (T whole chunks)."""
    b, t, h, d = k.shape
    return k.astype(jnp.float32).reshape(b, t // chunk_size, chunk_size, h, d).mean(axis=2)


def choose_chunks(q: jax.Array, means: jax.Array, first_chunk, chunk_size: int, n_pick: int):
    """The earlier chunks each query attends besides its own (SPEC §4), not differentiated.

    One query chunk at a time (`lax.map`), so the scores take [B, chunk, H, n_chunks], not
    [B, T, H, n_chunks] (5.4 GB per 1M-token sequence of the 3.6B shape in 16 shards).

    Args:
      q: [B, T, H, D] this shard's queries (T whole chunks), whose first token is in chunk
        `first_chunk` of the sequence.
      means: [B, n_chunks, H, D] fp32 mean key of every chunk of the sequence.
      first_chunk: int (traced) the sequence's chunk index of q's first chunk.
      chunk_size, n_pick: chunk length, and top_k - 1.

    Returns:
      int32 [B, T, H, n_pick]: chunk indices into the sequence, best first (ties to the lower
      index, as `lax.top_k` orders them), -1 where fewer candidates exist.
    """
    b, t, h, d = q.shape
    n_chunks = means.shape[1]
    q_chunks = jnp.moveaxis(
        lax.stop_gradient(q).astype(jnp.float32).reshape(b, t // chunk_size, chunk_size, h, d),
        1,
        0,
    )

    def one_chunk(args):  # queries [B, chunk, H, D] of sequence chunk `own`
        q_chunk, own = args
        scores = jnp.einsum("bthd,bjhd->bthj", q_chunk, means, precision=_HIGHEST)
        scores = jnp.where(jnp.arange(n_chunks) < own, scores, -jnp.inf)
        if n_chunks < n_pick:
            pad = ((0, 0), (0, 0), (0, 0), (0, n_pick - n_chunks))
            scores = jnp.pad(scores, pad, constant_values=-jnp.inf)
        _, picked = lax.top_k(scores, n_pick)
        # Masked columns have indices >= own; they come out only when candidates run out.
        return jnp.where(picked < own, picked, -1).astype(jnp.int32)

    owns = first_chunk + jnp.arange(t // chunk_size)
    picked = lax.map(one_chunk, (q_chunks, owns))  # [T / chunk, B, chunk, H, n_pick]
    return jnp.moveaxis(picked, 0, 1).reshape(b, t, h, n_pick)


def merge_parts(o_a, lse_a, o_b, lse_b):
    """One softmax from two softmax-normalised parts over disjoint keys (o [B, T, H, D], lse
    [B, T, H])."""
    lse = jnp.logaddexp(lse_a, lse_b)
    weight = lambda part: jnp.exp(part - lse)[..., None]
    return o_a * weight(lse_a) + o_b * weight(lse_b)


def topk_attention_across_shards(
    q, k, v, *, chunk_size: int, top_k: int, own: OwnChunks, chosen: ChosenChunks, axis: str
):
    """Top-k chunk attention of the whole sequence, run on one shard of it (inside shard_map).

    Args:
      q, k, v: [B, T_shard, H, D] this shard's projections; shard i holds tokens
        [i * T_shard, (i + 1) * T_shard), T_shard a multiple of chunk_size.
      chunk_size, top_k: the attention's settings.
      own: the local kernel's own-chunk part with its log-sum-exp.
      chosen: attention over chosen chunks of the gathered head-major keys and values.
      axis: the mesh axis the sequence is cut along.

    Returns:
      o [B, T_shard, H, D] in q's dtype.
    """
    o_own, lse_own = own(q, k, v)
    if top_k == 1:
        return o_own.astype(q.dtype)
    local_chunks = q.shape[1] // chunk_size
    means = lax.all_gather(chunk_means(k, chunk_size), axis, axis=1, tiled=True)
    first = lax.axis_index(axis) * local_chunks
    sel = choose_chunks(q, means, first, chunk_size, top_k - 1)
    # Gathered head-major ([B, H, T, D]): the chosen-chunk reads need no transposed copy.
    gather = lambda x: lax.all_gather(jnp.swapaxes(x, 1, 2), axis, axis=2, tiled=True)
    o_picks, lse_picks = chosen(q, gather(k), gather(v), sel)
    o = merge_parts(o_own.astype(jnp.float32), lse_own, o_picks, lse_picks)
    return o.astype(q.dtype)
