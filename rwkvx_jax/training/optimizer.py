"""The optimiser of SPEC §7: clipped AdamW with masked decay, warmup schedule and freezing."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

Params = Any
PathPredicate = Callable[[str], bool]

_SCHEDULES = ("constant", "cosine")
_TRAIN, _FREEZE = "train", "freeze"


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """Optimiser settings; defaults are the paper's (SPEC §7).

    Attributes:
      lr: peak learning rate, reached at the end of warmup.
      lr_final: cosine end value (required for "cosine"); "constant" takes None or `lr`.
      warmup_steps: optimiser steps of linear warmup; 0 disables warmup.
      warmup_init_fraction: warmup starts at lr * warmup_init_fraction, in [0, 1].
      schedule: "constant" (lr after warmup) or "cosine" (lr -> lr_final by total_steps).
      total_steps: optimiser step at which the cosine reaches lr_final (warmup included).
      weight_decay: decoupled decay, applied to params with >= 2 non-unit dims only.
      b1, b2, eps: Adam constants; update = m_hat / (sqrt(v_hat) + eps).
      grad_clip: global-norm clip of the (accumulated) gradient; None disables it.
      grad_accum_steps: micro-batches averaged per optimiser step (optax.MultiSteps).
    """

    lr: float = 1e-5
    lr_final: float | None = None
    warmup_steps: int = 10
    warmup_init_fraction: float = 0.01
    schedule: str = "constant"
    total_steps: int | None = None
    weight_decay: float = 1e-3
    b1: float = 0.9
    b2: float = 0.99
    eps: float = 1e-18
    grad_clip: float | None = 1.0
    grad_accum_steps: int = 1

    def __post_init__(self):
        errors = []
        if not self.lr > 0:
            errors.append(f"lr must be > 0, got {self.lr}")
        if self.schedule not in _SCHEDULES:
            errors.append(f"schedule must be one of {_SCHEDULES}, got {self.schedule!r}")
        if self.warmup_steps < 0:
            errors.append(f"warmup_steps must be >= 0, got {self.warmup_steps}")
        if not 0.0 <= self.warmup_init_fraction <= 1.0:
            errors.append(
                f"warmup_init_fraction must be in [0, 1], got {self.warmup_init_fraction}"
            )
        if self.schedule == "constant":
            if self.lr_final is not None and self.lr_final != self.lr:
                errors.append(
                    f"lr_final={self.lr_final} differs from lr={self.lr} but schedule is "
                    "'constant'; use schedule='cosine' to decay"
                )
        elif self.schedule == "cosine":
            if self.lr_final is None or self.lr_final < 0:
                errors.append(f"schedule 'cosine' needs lr_final >= 0, got {self.lr_final}")
            if self.total_steps is None or self.total_steps <= self.warmup_steps:
                errors.append(
                    f"schedule 'cosine' needs total_steps > warmup_steps={self.warmup_steps}, "
                    f"got {self.total_steps}"
                )
        if self.weight_decay < 0:
            errors.append(f"weight_decay must be >= 0, got {self.weight_decay}")
        if not (0.0 <= self.b1 < 1.0 and 0.0 <= self.b2 < 1.0):
            errors.append(f"b1 and b2 must be in [0, 1), got b1={self.b1}, b2={self.b2}")
        if self.eps < 0:
            errors.append(f"eps must be >= 0, got {self.eps}")
        if self.grad_clip is not None and not self.grad_clip > 0:
            errors.append(f"grad_clip must be > 0 or None, got {self.grad_clip}")
        if not isinstance(self.grad_accum_steps, int) or self.grad_accum_steps < 1:
            errors.append(f"grad_accum_steps must be an int >= 1, got {self.grad_accum_steps}")
        if errors:
            raise ValueError("OptimizerConfig: " + "; ".join(errors))


def learning_rate_schedule(cfg: OptimizerConfig) -> optax.Schedule:
    """Learning rate as a function of the optimiser step (0 for the first update).

    Steps [0, warmup_steps) ramp linearly from lr * warmup_init_fraction towards lr (step
    `warmup_steps` is the first at lr). Then "constant" stays at lr; "cosine" follows a half
    cosine from lr at `warmup_steps` to lr_final at `total_steps` and stays at lr_final after.
    """
    lr, warmup = cfg.lr, cfg.warmup_steps
    init = lr * cfg.warmup_init_fraction

    def schedule(step):
        step = jnp.asarray(step, jnp.float32)
        if cfg.schedule == "cosine":
            progress = jnp.clip((step - warmup) / (cfg.total_steps - warmup), 0.0, 1.0)
            after = cfg.lr_final + (lr - cfg.lr_final) * 0.5 * (1.0 + jnp.cos(math.pi * progress))
        else:
            after = jnp.full_like(step, lr)
        if warmup == 0:
            return after
        during = init + (lr - init) * step / warmup
        return jnp.where(step < warmup, during, after)

    return schedule


def _has_two_non_unit_dims(leaf) -> bool:
    shape = leaf.shape if hasattr(leaf, "shape") else jnp.shape(leaf)
    return sum(dim > 1 for dim in shape) >= 2


def weight_decay_mask(params: Params) -> Params:
    """True for parameters with >= 2 dims of size > 1 (matrices, embeddings), else False.

    Args:
      params: a pytree of arrays (or anything with a shape, e.g. jax.ShapeDtypeStruct).

    Returns:
      The same tree structure with Python bools.
    """
    return jax.tree.map(_has_two_non_unit_dims, params)


def _path_string(path) -> str:
    parts = []
    for key in path:
        if isinstance(key, jax.tree_util.DictKey):
            parts.append(str(key.key))
        elif isinstance(key, jax.tree_util.GetAttrKey):
            parts.append(key.name)
        elif isinstance(key, jax.tree_util.SequenceKey):
            parts.append(str(key.idx))
        else:
            parts.append(str(key))
    return "/".join(parts)


def trainable_mask(params: Params, predicate: PathPredicate) -> Params:
    """Applies `predicate` to each parameter's path string, e.g. "moba_0/att/key/kernel".

    Paths are relative to the params dict (no leading "params" collection name).

    Returns:
      The params tree structure with Python bools.
    """
    return jax.tree_util.tree_map_with_path(
        lambda path, _: bool(predicate(_path_string(path))), params
    )


def sparse_blocks_only(path: str) -> bool:
    """Stage-1 predicate (SPEC §7): train only the sparse blocks, top-level keys `moba_*`."""
    return path.split("/", 1)[0].startswith("moba_")


def _adamw(cfg: OptimizerConfig) -> optax.GradientTransformation:
    # The decay mask is a function so it also works on the MaskedNode-pruned trees that
    # optax.multi_transform hands to the trainable branch.
    adamw = optax.adamw(
        learning_rate=learning_rate_schedule(cfg),
        b1=cfg.b1,
        b2=cfg.b2,
        eps=cfg.eps,
        weight_decay=cfg.weight_decay,
        mask=weight_decay_mask,
    )
    steps = [adamw] if cfg.grad_clip is None else [optax.clip_by_global_norm(cfg.grad_clip), adamw]
    optimizer = optax.chain(*steps)
    if cfg.grad_accum_steps > 1:
        optimizer = optax.MultiSteps(optimizer, cfg.grad_accum_steps).gradient_transformation()
    return optimizer


def _trainable_tree(params: Params, trainable: Params | PathPredicate) -> Params:
    if callable(trainable):
        return trainable_mask(params, trainable)
    params_def = jax.tree.structure(params)
    trainable_def = jax.tree.structure(trainable)
    if params_def != trainable_def:
        raise ValueError(
            "make_optimizer: `trainable` must be a predicate on path strings or a tree of bools "
            f"shaped like params; got structure {trainable_def}, params have {params_def}"
        )
    return jax.tree.map(bool, trainable)


def make_optimizer(
    cfg: OptimizerConfig,
    params: Params,
    trainable: Params | PathPredicate | None = None,
) -> optax.GradientTransformation:
    """Builds the optimiser: global-norm clip, then AdamW with masked decay and the schedule.

    With grad_accum_steps = k > 1, optax.MultiSteps averages k micro-batch gradients and the
    clipped AdamW step runs on every k-th call (other calls return zero updates); schedule steps
    count optimiser steps, not micro-batches. Frozen parameters (`trainable` False) get zero
    updates, take no part in the clip norm, and hold no optimiser state (no moments, no
    accumulated gradient): optax.multi_transform routes them to optax.set_to_zero.

    Parameters are fp32 master weights, and the state (Adam moments, accumulated gradient)
    takes their dtype. The bf16 compute dtype is the model's business (`RWKVXConfig.dtype`):
    gradients arrive in the parameters' dtype and nothing here casts.

    Args:
      cfg: the settings.
      params: the fp32 parameter tree (arrays or shape structs); used for its structure, shapes
        and paths.
      trainable: None (train everything), a predicate on path strings (see `trainable_mask`,
        `sparse_blocks_only`), or a tree of bools shaped like params.

    Returns:
      An optax.GradientTransformation; apply its updates with optax.apply_updates.
    """
    optimizer = _adamw(cfg)
    if trainable is None:
        return optimizer
    trainable = _trainable_tree(params, trainable)
    if not any(jax.tree.leaves(trainable)):
        example = _path_string(jax.tree_util.tree_flatten_with_path(params)[0][0][0])
        raise ValueError(
            "make_optimizer: `trainable` freezes every parameter (paths look like "
            f"{example!r}; pass the params dict itself, not Flax's {{'params': ...}} variables)"
        )
    labels = jax.tree.map(lambda train: _TRAIN if train else _FREEZE, trainable)
    return optax.multi_transform({_TRAIN: optimizer, _FREEZE: optax.set_to_zero()}, labels)
