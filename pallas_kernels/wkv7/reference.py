"""WKV-7 as a plain fp32 `lax.scan` over time: the oracle every faster form is tested against."""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax

_HIGHEST = lax.Precision.HIGHEST


def check_wkv7_shapes(r, w, k, v, a, b, state) -> tuple[int, int, int, int]:
    """Checks that the six token inputs share one [B, T, H, N] shape and the state is [B, H, N, N].

    Returns:
        (B, T, H, N).

    Raises:
        ValueError: naming the offending input and the expected shape.
    """
    if r.ndim != 4:
        raise ValueError(f"wkv7: r must be [B, T, H, N], got shape {tuple(r.shape)}")
    shape = tuple(r.shape)
    for name, x in (("w", w), ("k", k), ("v", v), ("a", a), ("b", b)):
        if tuple(x.shape) != shape:
            raise ValueError(
                f"wkv7: {name} has shape {tuple(x.shape)} but r has {shape}; "
                "r, w, k, v, a, b must all be [B, T, H, N]"
            )
    batch, _, heads, n = shape
    if state is not None and tuple(state.shape) != (batch, heads, n, n):
        raise ValueError(
            f"wkv7: state must be [B, H, N, N] = {(batch, heads, n, n)}, got {tuple(state.shape)}"
        )
    return shape


def wkv7_reference(r, w, k, v, a, b, state=None):
    """Runs the WKV-7 recurrence token by token in fp32.

    Per batch and head, with S in R^{N x N} (rows index value dims, columns key dims):
        S_t = S_{t-1} diag(exp(w_t)) + (S_{t-1} a_t) b_t^T + v_t k_t^T,   y_t = S_t r_t.
    In RWKV-7, a = -kk and b = kk * a_rate.

    Args:
        r, w, k, v, a, b: [B, T, H, N], any float dtype (computed in fp32). `w` is the
            log-decay (w <= 0).
        state: optional initial state [B, H, N, N] (zeros if None).

    Returns:
        y: [B, T, H, N] float32; final_state: [B, H, N, N] float32.
    """
    batch, _, heads, n = check_wkv7_shapes(r, w, k, v, a, b, state)
    if state is None:
        state = jnp.zeros((batch, heads, n, n), jnp.float32)
    # Time-major so that the scan walks the leading axis.
    xs = tuple(jnp.swapaxes(x.astype(jnp.float32), 0, 1) for x in (r, w, k, v, a, b))

    def step(s, x):
        r_t, w_t, k_t, v_t, a_t, b_t = x  # each [B, H, N]
        sa = jnp.einsum("bhvk,bhk->bhv", s, a_t, precision=_HIGHEST)
        s = (
            s * jnp.exp(w_t)[:, :, None, :]
            + sa[..., :, None] * b_t[..., None, :]
            + v_t[..., :, None] * k_t[..., None, :]
        )
        y_t = jnp.einsum("bhvk,bhk->bhv", s, r_t, precision=_HIGHEST)
        return s, y_t

    final_state, y = lax.scan(step, state.astype(jnp.float32), xs)
    return jnp.swapaxes(y, 0, 1), final_state
