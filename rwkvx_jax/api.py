"""The user-facing entry points: `load` a converted checkpoint and run `forward`."""

from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np

from rwkvx_jax.checkpoints.directory import load_params
from rwkvx_jax.config import RWKVXConfig
from rwkvx_jax.model import RWKVX, bare_params


def load(ckpt_dir: str | os.PathLike) -> tuple[RWKVXConfig, dict]:
    """Loads a directory written by `convert_torch.py` (or `save_params`).

    Returns:
      (config, params): params is the Flax tree, placed on the default device.
    """
    config, params = load_params(ckpt_dir)
    return config, jax.tree.map(jnp.asarray, params)


@functools.lru_cache(maxsize=32)
def _jitted_forward(config: RWKVXConfig):
    model = RWKVX(config)
    return jax.jit(lambda params, tokens: model.apply({"params": params}, tokens))


def _check_tokens(config: RWKVXConfig, tokens) -> jnp.ndarray:
    if not jnp.issubdtype(jnp.asarray(tokens).dtype, jnp.integer):
        raise TypeError(f"tokens must be integers, got dtype {jnp.asarray(tokens).dtype}")
    if jnp.ndim(tokens) != 2:
        raise ValueError(f"tokens must have shape [batch, time], got {jnp.shape(tokens)}")
    if jnp.shape(tokens)[1] == 0:
        raise ValueError("tokens has no time steps (shape [B, 0])")
    if isinstance(tokens, np.ndarray | list | tuple):
        array = np.asarray(tokens)
        low, high = int(array.min()), int(array.max())
        if low < 0 or high >= config.vocab_size:
            raise ValueError(
                f"token ids must lie in [0, {config.vocab_size}); got values in [{low}, {high}]"
            )
    return jnp.asarray(tokens, jnp.int32)


def forward(config: RWKVXConfig, params, tokens) -> jnp.ndarray:
    """Logits of a whole sequence batch (jit-compiled once per config and shape).

    Args:
      config: the model config.
      params: the Flax parameter tree (from `load` or `RWKVX(config).init`).
      tokens: int [B, T].

    Returns:
      float32 [B, T, V] logits.
    """
    params = bare_params(params)
    return _jitted_forward(config)(params, _check_tokens(config, tokens))
