"""Small building blocks shared by the RWKV-7 and sparse-attention blocks."""

from __future__ import annotations

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


def layer_norm(name: str, dtype, param_dtype) -> nn.LayerNorm:
    # eps 1e-5 as PyTorch's default, which the official models were trained with.
    return nn.LayerNorm(epsilon=1e-5, dtype=dtype, param_dtype=param_dtype, name=name)


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
