"""WKV-7 over a sequence cut into shards, exchanging only state-sized summaries.

Per head, the recurrence (`pallas_kernels.wkv7.wkv7`, the official layout: rows index value
dims, columns key dims) is

    S_t = S_{t-1} A_t + v_t k_t^T,   A_t = diag(exp(w_t)) + a_t b_t^T,   y_t = S_t r_t,

affine in the state. So a shard of tokens t = 1..T maps the state it enters with to

    S_out = S_in M + N,   M = A_1 A_2 ... A_T,   N = the shard's end state from S_in = 0,

and its outputs are y_t = y0_t + S_in u_t, with y0 the outputs from S_in = 0 and
u_t = A_1 ... A_t r_t. M and u are themselves a WKV-7 run: from S = I with v = 0 the state is
A_1 ... A_t and the output A_1 ... A_t r_t. One local kernel call on the batch doubled gives
all four (rows [y0 | u], end states [N | M]); the shards all-gather (M, N), each folds its
predecessors' maps into its entry state S_in, and adds S_in u_t. The exchange is
2 x [B, H, N, N] fp32 per shard, whatever T is. The backward pass is JAX's transpose of the
same program: the all-gather becomes a reduce-scatter of the maps' cotangents, again
state-sized.

Cost against one device running the whole sequence: each shard runs the local WKV on twice
its batch (2x the WKV FLOPs of its tokens), one [T, N] x [N, N] matmul per head for the
correction, and C state products for the fold (C = shards). Running the shards' WKV again
from their true entry states instead would cost 3x (the maps still need the I / 0 runs).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax import lax

_HIGHEST = lax.Precision.HIGHEST

LocalWKV = Callable[..., tuple[jax.Array, jax.Array]]


def shard_state_map(local_wkv: LocalWKV, r, w, k, v, a, b):
    """This shard's outputs from a zero state and its affine state map.

    Args:
      local_wkv: (r, w, k, v, a, b, state) -> (y [B, T, H, N], end state [B, H, N, N]), the
        single-device WKV-7 of any backend.
      r, w, k, v, a, b: [B, T, H, N] this shard's inputs (w: log-decay).

    Returns:
      (y0 [B, T, H, N], u [B, T, H, N], M [B, H, N, N], N [B, H, N, N]), fp32: the outputs
      from a zero entry state, the per-token read-out of the entry state
      (y_t = y0_t + S_in u_t), and the map S_in -> S_in M + N.
    """
    batch, _, heads, n = r.shape
    twice = lambda x, y: jnp.concatenate([x, y], axis=0)
    identity = jnp.broadcast_to(jnp.eye(n, dtype=jnp.float32), (batch, heads, n, n))
    zeros = jnp.zeros((batch, heads, n, n), jnp.float32)
    y, end = local_wkv(
        twice(r, r), twice(w, w), twice(k, k), twice(v, jnp.zeros_like(v)), twice(a, a),
        twice(b, b), twice(zeros, identity),
    )  # fmt: skip
    return y[:batch], y[batch:], end[batch:], end[:batch]


def fold_entry_state(m, n, start=None, *, axis: str):
    """All-gathers the shards' maps and folds them in order (inside shard_map).

    Args:
      m, n: [B, H, N, N] this shard's map S -> S m + n.
      start: [B, H, N, N] the state before the sequence (zeros when None).
      axis: the mesh axis the sequence is cut along.

    Returns:
      (entry [B, H, N, N]: the state this shard starts from, final [B, H, N, N]: the state
      after the last shard, the same on every shard).
    """
    maps_m, maps_n = lax.all_gather(m, axis), lax.all_gather(n, axis)  # [C, B, H, N, N]
    me = lax.axis_index(axis)
    state = jnp.zeros_like(n) if start is None else start.astype(jnp.float32)
    entry = state
    for shard in range(maps_m.shape[0]):  # C small products: the fold costs C * N^3 per head
        entry = jnp.where(me == shard, state, entry)
        state = jnp.matmul(state, maps_m[shard], precision=_HIGHEST) + maps_n[shard]
    return entry, state


def wkv7_across_shards(local_wkv: LocalWKV, r, w, k, v, a, b, state=None, *, axis: str):
    """WKV-7 of a whole sequence, run on one contiguous shard of it (inside shard_map).

    Args:
      local_wkv: the single-device WKV-7, (r, w, k, v, a, b, state) -> (y, end state).
      r, w, k, v, a, b: [B, T_shard, H, N] this shard's inputs; shard i holds the tokens
        [i * T_shard, (i + 1) * T_shard) of the sequence.
      state: optional [B, H, N, N] state before the sequence (the same on every shard).
      axis: the mesh axis the sequence is cut along.

    Returns:
      (y [B, T_shard, H, N] fp32: this shard's outputs, final_state [B, H, N, N] fp32: the
      state after the whole sequence, the same on every shard).
    """
    y0, u, m, n = shard_state_map(local_wkv, r, w, k, v, a, b)
    entry, final = fold_entry_state(m, n, state, axis=axis)
    y = y0 + jnp.einsum("bhij,bthj->bthi", entry, u, precision=_HIGHEST)
    return y, final
