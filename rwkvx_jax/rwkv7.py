"""RWKV-7 blocks (SPEC §3): TimeMix with the WKV-7 recurrence, ChannelMix, and the block."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from rwkvx_jax import ops
from rwkvx_jax.config import DEFAULT_WKV_CHUNK_SIZE
from rwkvx_jax.layers import (
    GroupedNorm,
    constant_init,
    fresh_zeros,
    last_valid,
    layer_norm,
    linear,
    per_group_broadcast,
    per_group_sum,
    scaled_orthogonal,
    uniform_symmetric,
    valid_mask,
)

# decay = exp(-e^{-1/2} * sigmoid(z)) lies in (0.545, 1): the log-decay is -0.606531 * sigmoid(z).
_DECAY_SCALE = 0.606531
_GROUPNORM_EPS = 64e-5


def _mix_profile(n_embd: int, power: float) -> np.ndarray:
    """1 - (c / C)^power over channels c: the RWKV-7 token-shift mixing initialisation."""
    ratio = np.arange(n_embd, dtype=np.float64) / n_embd
    return (1.0 - ratio**power).astype(np.float32)


class TimeMix(nn.Module):
    """RWKV-7 time mixing with the WKV-7 state (per-head [N, N], fp32).

    Leaf layer: takes scalars, never the whole config. Parameter names mirror the official
    `blocks.{i}.att.*` keys.
    """

    layer_id: int
    n_layer: int
    n_embd: int
    head_size: int
    dim_w: int
    dim_a: int
    dim_v: int
    dim_g: int
    has_v_params: bool
    wkv_backend: str = "auto"
    wkv_chunk_size: int = DEFAULT_WKV_CHUNK_SIZE
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, v_first, shift_state=None, wkv_state=None, n_valid=None):
        """Args:
          x: [B, T, C] (after ln1).
          v_first: [B, T, C] value of block 0, or None in block 0.
          shift_state: [B, C] token before x[:, 0]; wkv_state: [B, H, N, N] fp32.
          n_valid: int [B] real tokens per row (the rest is right padding that must not enter
            the returned states), or None when every token is real.

        Returns:
          (out [B, T, C], v_first [B, T, C], last x [B, C], final wkv state [B, H, N, N]).
        """
        C, N = self.n_embd, self.head_size
        H = C // N
        B, T, _ = x.shape
        r0 = self.layer_id / max(self.n_layer - 1, 1)
        r1 = 1.0 - self.layer_id / self.n_layer
        p = lambda name, shape, init: self.param(name, init, shape, self.param_dtype)
        cast = lambda a: jnp.asarray(a, self.dtype)

        mix = {
            "x_r": 0.2 * r1, "x_w": 0.9 * r1, "x_k": 0.7 * r1,
            "x_v": 0.7 * r1, "x_a": 0.9 * r1, "x_g": 0.2 * r1,
        }  # fmt: skip
        coeff = {n: cast(p(n, (C,), constant_init(_mix_profile(C, e)))) for n, e in mix.items()}
        n = np.arange(C) / max(C - 1, 1)
        decay_speed = -7.0 + 5.0 * n ** (0.85 + 1.0 * r0**0.5)
        w0 = p("w0", (C,), constant_init((decay_speed + 0.5).astype(np.float32)))
        w1 = p("w1", (C, self.dim_w), nn.initializers.zeros)
        w2 = p("w2", (self.dim_w, C), scaled_orthogonal(0.1))
        a0 = p("a0", (C,), nn.initializers.zeros)
        a1 = p("a1", (C, self.dim_a), nn.initializers.zeros)
        a2 = p("a2", (self.dim_a, C), scaled_orthogonal(0.1))
        if self.has_v_params:
            v0 = p("v0", (C,), nn.initializers.ones)
            v1 = p("v1", (C, self.dim_v), nn.initializers.zeros)
            v2 = p("v2", (self.dim_v, C), scaled_orthogonal(0.1))
        g1 = p("g1", (C, self.dim_g), nn.initializers.zeros)
        g2 = p("g2", (self.dim_g, C), scaled_orthogonal(0.1))
        k_k = p("k_k", (C,), nn.initializers.constant(0.85))
        k_a = p("k_a", (C,), nn.initializers.ones)
        r_k = p("r_k", (H, N), nn.initializers.constant(-0.04))

        dense = lambda name, init: linear(C, name, self.dtype, self.param_dtype, init)
        bound = C**-0.5
        receptance = dense("receptance", uniform_symmetric(0.5 * bound))
        key = dense("key", uniform_symmetric(0.05 * bound))
        value = dense("value", uniform_symmetric(0.5 * bound))
        output = dense("output", nn.initializers.zeros)
        ln_x_scale = ((1 + self.layer_id) / self.n_layer) ** 0.7
        ln_x = GroupedNorm(
            n_groups=H,
            epsilon=_GROUPNORM_EPS,
            param_dtype=self.param_dtype,
            scale_init=nn.initializers.constant(ln_x_scale),
            name="ln_x",
        )

        x = x.astype(self.dtype)
        delta = ops.token_shift(x, shift_state) - x
        xr, xw, xk, xv, xa, xg = (x + delta * coeff[n] for n in mix)

        r = receptance(xr)
        k = key(xk)
        v = value(xv)
        # The decay and the rates are computed in fp32: they feed exponentials and the state.
        f32 = lambda t: t.astype(jnp.float32)
        z = f32(w0) + jnp.tanh(f32(xw) @ f32(w1)) @ f32(w2)
        log_decay = -_DECAY_SCALE * jax.nn.sigmoid(z)
        a = jax.nn.sigmoid(f32(a0) + (f32(xa) @ f32(a1)) @ f32(a2))
        g = cast(jax.nn.sigmoid(xg @ cast(g1)) @ cast(g2))

        heads = lambda t: t.reshape(B, T, H, N)
        kk = f32(k) * f32(k_k)
        kk_norm = jnp.sqrt(per_group_sum(kk * kk, H))
        kk = heads(kk / per_group_broadcast(jnp.maximum(kk_norm, 1e-12), N))
        k = f32(k) * (1.0 + (a - 1.0) * f32(k_a))
        if v_first is None:
            v_first = v
        else:
            gate = jax.nn.sigmoid(f32(v0) + (f32(xv) @ f32(v1)) @ f32(v2))
            v = f32(v) + (f32(v_first) - f32(v)) * gate

        a_h = heads(a)
        wkv_in = [heads(log_decay), heads(k), heads(f32(v)), -kk, kk * a_h]
        valid = valid_mask(n_valid, T)
        if valid is not None:
            # w = k = v = a = b = 0 leaves the state untouched: padding is never absorbed.
            wkv_in = [jnp.where(valid[:, :, None, None], t, 0.0) for t in wkv_in]
        y, wkv_state = ops.wkv7(
            heads(f32(r)),
            *wkv_in,
            wkv_state,
            backend=self.wkv_backend,
            chunk_size=self.wkv_chunk_size,
        )
        o = ln_x(y.reshape(B, T, C))
        bonus = per_group_sum(f32(r) * k * f32(r_k).reshape(C), H)
        o = o + per_group_broadcast(bonus, N) * f32(v)
        out = output(cast(o) * g)
        return out, v_first, last_valid(x, n_valid, shift_state), wkv_state


class ChannelMix(nn.Module):
    """RWKV-7 channel mixing: relu(h Wk^T)^2 Wv^T with a token-shifted input."""

    layer_id: int
    n_layer: int
    n_embd: int
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, shift_state=None, n_valid=None):
        """Args: x [B, T, C]; shift_state [B, C]; n_valid int [B] or None (see TimeMix).

        Returns (out [B, T, C], last real x [B, C]).
        """
        C = self.n_embd
        r1 = 1.0 - self.layer_id / self.n_layer
        x_k = self.param("x_k", constant_init(_mix_profile(C, r1**4)), (C,), self.param_dtype)
        key = linear(4 * C, "key", self.dtype, self.param_dtype, uniform_symmetric(0.5 * C**-0.5))
        value = linear(C, "value", self.dtype, self.param_dtype, nn.initializers.zeros)
        x = x.astype(self.dtype)
        h = x + (ops.token_shift(x, shift_state) - x) * jnp.asarray(x_k, self.dtype)
        out = value(jnp.square(jax.nn.relu(key(h))))
        return out, last_valid(x, n_valid, shift_state)


class RWKVBlockState(NamedTuple):
    """What an RWKV-7 block carries from one token to the next (SPEC §6).

    Attributes:
      att_x_prev: [B, C] the last input of the time mix (its token shift).
      wkv: [B, H, N, N] fp32 WKV state (rows: value dims, columns: key dims).
      ffn_x_prev: [B, C] the last input of the channel mix.
    """

    att_x_prev: jax.Array
    wkv: jax.Array
    ffn_x_prev: jax.Array

    @classmethod
    def zeros(cls, batch: int, n_embd: int, head_size: int, dtype) -> RWKVBlockState:
        """The state before any token: all zeros, each field in a buffer of its own."""
        shift = lambda: fresh_zeros((batch, n_embd), dtype)
        wkv = fresh_zeros((batch, n_embd // head_size, head_size, head_size), jnp.float32)
        return cls(shift(), wkv, shift())


class RWKVBlock(nn.Module):
    """`x += TimeMix(LN1(x)); x += ChannelMix(LN2(x))`; block 0 first applies LN0."""

    layer_id: int
    n_layer: int
    n_embd: int
    head_size: int
    dim_w: int
    dim_a: int
    dim_v: int
    dim_g: int
    has_v_params: bool
    wkv_backend: str = "auto"
    wkv_chunk_size: int = DEFAULT_WKV_CHUNK_SIZE
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, v_first, state: RWKVBlockState | None = None, n_valid=None):
        """Args:
          x: [B, T, C] residual stream; v_first: [B, T, C] or None (block 0).
          state: the state to continue from (decoding), or None to start from zeros.
          n_valid: int [B] real tokens per row (right padding after), or None for all.

        Returns:
          (x [B, T, C], v_first [B, T, C], final `RWKVBlockState`).
        """
        norm = lambda name: layer_norm(name, self.dtype, self.param_dtype)
        if self.layer_id == 0:
            x = norm("ln0")(x)
        att = TimeMix(
            self.layer_id, self.n_layer, self.n_embd, self.head_size,
            self.dim_w, self.dim_a, self.dim_v, self.dim_g, self.has_v_params,
            self.wkv_backend, self.wkv_chunk_size, self.dtype, self.param_dtype, name="att",
        )  # fmt: skip
        ffn = ChannelMix(self.layer_id, self.n_layer, self.n_embd, self.dtype, self.param_dtype,
                         name="ffn")  # fmt: skip
        att_x_prev, wkv, ffn_x_prev = (None, None, None) if state is None else state
        dx, v_first, att_x_prev, wkv = att(norm("ln1")(x), v_first, att_x_prev, wkv, n_valid)
        x = x + dx
        dx, ffn_x_prev = ffn(norm("ln2")(x), ffn_x_prev, n_valid)
        x = x + dx
        return x, v_first, RWKVBlockState(att_x_prev, wkv, ffn_x_prev)
