"""The token shift of a sequence cut into shards: the first token of a shard takes the last
token of the shard before it."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax


def shift_across_shards(x: jax.Array, first: jax.Array | None = None, *, axis: str) -> jax.Array:
    """out[:, t] = x[:, t-1] over the whole sequence, run on one shard (inside shard_map).

    Args:
      x: [B, T_shard, C] this shard's tokens; shard i holds tokens [i*T_shard, (i+1)*T_shard).
      first: [B, C] the token before the sequence (a carried state), zeros when None.
      axis: the mesh axis the sequence is cut along.

    Returns:
      [B, T_shard, C]: this shard's part of the shifted sequence. One [B, C] message per
      shard boundary (`lax.ppermute` to the next shard).
    """
    shards = lax.axis_size(axis)
    previous = lax.ppermute(x[:, -1], axis, [(i, i + 1) for i in range(shards - 1)])
    if first is not None:  # the first shard gets nothing from ppermute (zeros): the state
        previous = jnp.where(lax.axis_index(axis) == 0, first.astype(x.dtype), previous)
    return jnp.concatenate([previous[:, None, :], x[:, :-1]], axis=1)
