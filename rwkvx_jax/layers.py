"""Small building blocks shared by the RWKV-7 and sparse-attention blocks."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn


def token_shift(x: jnp.ndarray, previous: jnp.ndarray | None = None) -> jnp.ndarray:
    """Returns x shifted one step later in time: out[:, t] = x[:, t-1].

    Args:
      x: [B, T, C].
      previous: [B, C], the token before x[:, 0] (decoding state); zeros when None.
    """
    if previous is None:
        previous = jnp.zeros_like(x[:, 0])
    return jnp.concatenate([previous[:, None, :].astype(x.dtype), x[:, :-1]], axis=1)


def linear(features: int, name: str, dtype, param_dtype, init=None) -> nn.Dense:
    """A bias-free linear layer; its `kernel` [in, out] is the official `weight` [out, in]^T."""
    return nn.Dense(
        features,
        use_bias=False,
        dtype=dtype,
        param_dtype=param_dtype,
        kernel_init=init or nn.initializers.lecun_normal(),
        name=name,
    )


class LayerNorm(nn.Module):
    """LayerNorm over the last axis (eps 1e-5, PyTorch's default the models were trained with).

    Statistics are fp32 and computed as matmuls with a ones vector: XLA:CPU fuses a reduction
    over the minor axis into the consuming matmul and slows it down (measured 56 ms vs 37 ms
    for LN + a [4096, 768] x [768, 768] matmul); the matmul form avoids that and costs the same
    elsewhere.
    """

    epsilon: float = 1e-5
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        features = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (features,), self.param_dtype)
        bias = self.param("bias", nn.initializers.zeros, (features,), self.param_dtype)
        x32 = x.astype(jnp.float32)
        mean_weights = jnp.full((features, 1), 1.0 / features, jnp.float32)
        mean = jnp.matmul(x32, mean_weights, precision=jax.lax.Precision.HIGHEST)
        centred = x32 - mean
        var = jnp.matmul(centred * centred, mean_weights, precision=jax.lax.Precision.HIGHEST)
        y = centred * jax.lax.rsqrt(var + self.epsilon)
        y = y * scale.astype(jnp.float32) + bias.astype(jnp.float32)
        return y.astype(self.dtype)


def per_head_sum(x: jnp.ndarray, n_head: int) -> jnp.ndarray:
    """Sums x [..., H*N] over each head's N channels -> [..., H] (fp32, as a matmul; see
    LayerNorm for why not a reduction)."""
    channels = x.shape[-1]
    head_of_channel = np.arange(channels) // (channels // n_head)
    indicator = jnp.asarray(head_of_channel[:, None] == np.arange(n_head)[None, :], jnp.float32)
    return jnp.matmul(x.astype(jnp.float32), indicator, precision=jax.lax.Precision.HIGHEST)


def per_head_broadcast(x: jnp.ndarray, head_size: int) -> jnp.ndarray:
    """[..., H] -> [..., H*N], each head's value repeated over its N channels."""
    return jnp.repeat(x, head_size, axis=-1)


class HeadGroupNorm(nn.Module):
    """GroupNorm with one group per head over the last axis, per token (RWKV-7's `ln_x`).

    Params `scale`, `bias` [C]; fp32 statistics. eps = 64e-5 in RWKV-7.
    """

    n_head: int
    epsilon: float
    param_dtype: Any = jnp.float32
    scale_init: Any = nn.initializers.ones

    @nn.compact
    def __call__(self, x):
        channels = x.shape[-1]
        head_size = channels // self.n_head
        scale = self.param("scale", self.scale_init, (channels,), self.param_dtype)
        bias = self.param("bias", nn.initializers.zeros, (channels,), self.param_dtype)
        x = x.astype(jnp.float32)
        mean = per_head_broadcast(per_head_sum(x, self.n_head) / head_size, head_size)
        centred = x - mean
        var = per_head_sum(centred * centred, self.n_head) / head_size
        inv = per_head_broadcast(jax.lax.rsqrt(var + self.epsilon), head_size)
        return centred * inv * scale.astype(jnp.float32) + bias.astype(jnp.float32)


def layer_norm(name: str, dtype, param_dtype) -> LayerNorm:
    return LayerNorm(dtype=dtype, param_dtype=param_dtype, name=name)


def constant_init(values: np.ndarray):
    """An initializer returning fixed values (checked against the requested shape)."""

    def init(key, shape, dtype=jnp.float32):
        del key
        if tuple(shape) != values.shape:
            raise ValueError(f"constant init of shape {values.shape} asked for shape {shape}")
        return jnp.asarray(values, dtype)

    return init


def scaled_orthogonal(scale: float):
    """Orthogonal init times `scale`; zero scale gives zeros."""
    if scale == 0:
        return nn.initializers.zeros
    return nn.initializers.orthogonal(scale=scale)


def uniform_symmetric(bound: float):
    """Uniform in [-bound, bound]."""

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, minval=-bound, maxval=bound)

    return init
