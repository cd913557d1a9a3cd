"""RWKV-7 -> RWKV-X: insert sparse-attention blocks into a trained RWKV-7 model (SPEC §7).

Two ways to start a new block `moba_{j}`:
  "copy" (default, the official code): its attention receptance / key / value / output and its
    channel-mix key / value are copies of the RWKV block just before it in the block order
    (`blocks_{(j+1)*interval - 1}`); LayerNorms start at 1 / 0 and the channel-mix `x_k` from
    the RWKV-7 init rule for that layer.
  "zero" (the paper's wording): as "copy", but the attention output and channel-mix value
    projections are zero, so the block starts as the identity and the expanded model computes
    exactly what the RWKV-7 model did.
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from rwkvx_jax.config import ConfigError, RWKVXConfig
from rwkvx_jax.model import block_name
from rwkvx_jax.sparse.block import SparseBlock

EXPAND_INITS = ("copy", "zero")
# Tensors a new sparse block takes from its source RWKV block under "copy".
COPIED = (
    ("att", "receptance", "kernel"),
    ("att", "key", "kernel"),
    ("att", "value", "kernel"),
    ("att", "output", "kernel"),
    ("ffn", "key", "kernel"),
    ("ffn", "value", "kernel"),
)
# Tensors zeroed under "zero": both residual branches of the block then add exactly 0.
ZEROED = (("att", "output", "kernel"), ("ffn", "value", "kernel"))


def source_block(config: RWKVXConfig, attn_index: int) -> int:
    """Index i of the RWKV block `blocks_{i}` that runs just before sparse block `attn_index`."""
    order = config.block_order()
    position = order.index(("attn", attn_index))
    for kind, index in reversed(order[:position]):
        if kind == "rwkv":
            return index
    raise ConfigError(f"sparse block {attn_index} has no RWKV block before it")


def _get(tree: Mapping, path: tuple[str, ...]):
    for key in path:
        tree = tree[key]
    return tree


def _set(tree: dict, path: tuple[str, ...], value) -> None:
    for key in path[:-1]:
        tree = tree[key]
    tree[path[-1]] = value


def fresh_sparse_block(config: RWKVXConfig, attn_index: int, seed: int = 0) -> dict:
    """The params a newly initialised `moba_{attn_index}` would get from the model's init."""
    block = SparseBlock(
        n_embd=config.n_embd,
        head_size=config.head_size,
        chunk_size=config.chunk_size,
        top_k=config.top_k,
        channel_mix_layer_id=source_block(config, attn_index),
        n_layer=config.n_rwkv_layer,
        backend="reference",
        dtype=jnp.float32,
        param_dtype=jnp.dtype(config.param_dtype),
    )
    x = jnp.zeros((1, 1, config.n_embd), jnp.float32)
    variables = jax.jit(block.init)(jax.random.key(seed), x)
    return jax.tree.map(np.asarray, variables["params"])


def expand_params(
    rwkv7_params: Mapping,
    config: RWKVXConfig,
    init: str = "copy",
    seed: int = 0,
) -> dict:
    """Adds `moba_{j}` blocks to RWKV-7 params, for the RWKV-X model `config`.

    Args:
      rwkv7_params: params of the RWKV-7 model `config.replace(n_attn_layer=0)` (keys `emb`,
        `blocks_{i}`, `ln_out`, `head`; no `moba_*`). Not modified.
      config: the target RWKV-X config (n_attn_layer >= 1).
      init: "copy" or "zero" (module docstring).
      seed: seed for the template init of the attention tensors that are not copied (none are
        left random by either init; it only feeds the template).

    Returns:
      A new params dict with every RWKV-7 array (the same objects) plus the sparse blocks, in
      the dtype of the source block's arrays.
    """
    if init not in EXPAND_INITS:
        raise ValueError(f"expand init must be one of {EXPAND_INITS}, got {init!r}")
    if config.n_attn_layer < 1:
        raise ConfigError("expand_params: the target config has n_attn_layer=0, nothing to add")
    if "params" in rwkv7_params and len(rwkv7_params) == 1:
        raise ValueError("expand_params: pass the params dict, not Flax's {'params': ...}")
    present = sorted(k for k in rwkv7_params if k.startswith("moba_"))
    if present:
        raise ValueError(f"expand_params: params already have sparse blocks {present}")
    blocks = sorted(k for k in rwkv7_params if k.startswith("blocks_"))
    if len(blocks) != config.n_rwkv_layer:
        raise ConfigError(
            f"expand_params: params have {len(blocks)} RWKV blocks, config.n_rwkv_layer is "
            f"{config.n_rwkv_layer}"
        )
    expanded = dict(rwkv7_params)
    for j in range(config.n_attn_layer):
        source = rwkv7_params[block_name("rwkv", source_block(config, j))]
        new = fresh_sparse_block(config, j, seed)
        for path in COPIED:
            value = np.asarray(_get(source, path))
            expected = _get(new, path).shape
            if value.shape != expected:
                raise ConfigError(
                    f"expand_params: blocks_{source_block(config, j)}/{'/'.join(path)} has "
                    f"shape {value.shape}, a sparse block needs {expected}"
                )
            _set(new, path, value.copy())
        if init == "zero":
            for path in ZEROED:
                _set(new, path, np.zeros_like(_get(new, path)))
        dtype = np.asarray(_get(source, COPIED[0])).dtype
        expanded[block_name("attn", j)] = jax.tree.map(lambda a, d=dtype: a.astype(d), new)
    return expanded
