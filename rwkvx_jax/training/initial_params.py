"""Where a run's parameters start: random, an expanded RWKV-7, or a checkpoint."""

from __future__ import annotations

from collections.abc import Callable

import jax
import numpy as np

from rwkvx_jax.checkpoints.conversion import load_checkpoint_params
from rwkvx_jax.config import RWKVXConfig
from rwkvx_jax.model import RWKVX
from rwkvx_jax.training.config import TrainConfig, TrainConfigError
from rwkvx_jax.training.expand import expand_params
from rwkvx_jax.training.program import init_params_fn

Log = Callable[[str], None]


_SHAPE_FIELDS = ("vocab_size", "n_embd", "n_rwkv_layer", "head_size", "dim_w", "dim_a")


_SHAPE_FIELDS += ("dim_v", "dim_g")


def initial_params(config: TrainConfig, log: Log) -> tuple[RWKVXConfig, dict | None]:
    """The model config to train and host params to start from (None: random init)."""
    target = config.model
    if config.init_checkpoint is None:
        if config.stage != "stage1":
            return target, None
        log("stage1 without init_checkpoint: expanding a randomly initialised RWKV-7")
        rwkv7 = target.replace(n_attn_layer=0)
        params = jax.jit(init_params_fn(RWKVX(rwkv7)))(jax.random.key(config.seed))
        params = jax.tree.map(np.asarray, params)
        return target, expand_params(params, target, config.expand_init, config.seed)
    source, params = load_checkpoint_params(config.init_checkpoint)
    fields = _SHAPE_FIELDS
    if source.n_rwkv_layer == 1 and not source.block0_v_params:
        # No block carries the value-residual LoRA, so the checkpoint cannot say its width.
        fields = tuple(f for f in fields if f != "dim_v")
        source = source.replace(dim_v=target.dim_v)
    mismatched = [
        f"{f}: checkpoint {getattr(source, f)}, config {getattr(target, f)}"
        for f in fields
        if getattr(source, f) != getattr(target, f)
    ]
    if mismatched:
        raise TrainConfigError(
            f"init_checkpoint {config.init_checkpoint} does not fit the model config: "
            + "; ".join(mismatched)
            + " (pick the matching model preset, e.g. model=rwkvx-0.22b)"
        )
    model_config = target.replace(block0_v_params=source.block0_v_params)
    if source.n_attn_layer == target.n_attn_layer:
        return model_config, params
    if source.n_attn_layer == 0:
        log(
            f"expanding RWKV-7 {config.init_checkpoint} with {target.n_attn_layer} sparse "
            f"blocks ({config.expand_init} init)"
        )
        return model_config, expand_params(params, model_config, config.expand_init, config.seed)
    raise TrainConfigError(
        f"init_checkpoint has {source.n_attn_layer} sparse blocks, the model {target.n_attn_layer}"
    )


def resumed_model_config(config: TrainConfig, stored: RWKVXConfig) -> RWKVXConfig:
    """The stored model config of a run being resumed, with this run's compute settings."""
    for f in _SHAPE_FIELDS + ("n_attn_layer",):
        if getattr(stored, f) != getattr(config.model, f):
            raise TrainConfigError(
                f"the workdir's run has model.{f}={getattr(stored, f)}, this config "
                f"{getattr(config.model, f)}; use a new workdir or the same model"
            )
    compute = ("dtype", "wkv_backend", "attention_backend", "wkv_chunk_size", "chunk_size", "top_k")
    return stored.replace(**{f: getattr(config.model, f) for f in compute})
