"""`TrainProgram`: model, optimiser, shardings and the compiled train step for one mesh."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding

from rwkvx_jax import sharding as shd
from rwkvx_jax.config import RWKVXConfig
from rwkvx_jax.model import RWKVX, output_logits
from rwkvx_jax.training.config import TrainConfig, TrainConfigError
from rwkvx_jax.training.losses import chunked_token_cross_entropy, longce_loss
from rwkvx_jax.training.optimizer import (
    learning_rate_schedule,
    make_optimizer,
    sparse_blocks_only,
    trainable_mask,
)
from rwkvx_jax.training.remat import block_transforms

TrainState = dict  # {"step": int32 [], "params": tree, "opt_state": tree}


def _to_int32(tokens) -> np.ndarray:
    return np.asarray(tokens).astype(np.int32, copy=False)


@dataclasses.dataclass
class TrainProgram:
    """Model, optimiser, shardings and the compiled train step for one config on one mesh.

    Build with `TrainProgram.create(config, model_config, mesh)`. The state is a dict
    {"step", "params", "opt_state"} sharded by `sharding.tree_shardings`.
    """

    config: TrainConfig
    model_config: RWKVXConfig
    mesh: Mesh
    model: RWKVX
    optimizer: optax.GradientTransformation
    trainable: Any  # tree of bools shaped like params
    abstract_state: Any
    state_shardings: Any
    batch_sharding: NamedSharding
    activation_sharding: NamedSharding
    _compiled: Any = None

    @classmethod
    def create(cls, config: TrainConfig, model_config: RWKVXConfig, mesh: Mesh) -> TrainProgram:
        model = RWKVX(model_config)
        abstract_params = jax.eval_shape(init_params_fn(model), jax.random.key(0))
        predicate = sparse_blocks_only if config.stage == "stage1" else (lambda path: True)
        trainable = trainable_mask(abstract_params, predicate)
        optimizer = make_optimizer(
            config.optimizer, abstract_params, predicate if config.stage == "stage1" else None
        )
        abstract_state = jax.eval_shape(lambda p: _new_state(p, optimizer), abstract_params)
        shards = shd.batch_shards(mesh)
        if config.data.batch_size % shards:
            raise TrainConfigError(
                f"data.batch_size={config.data.batch_size} is not divisible by the mesh's "
                f"data x fsdp = {shards} (mesh {dict(mesh.shape)})"
            )
        _check_context_split(config, model_config, mesh)
        batch_sharding = shd.batch_sharding(mesh)
        # The rows this process reads (`host_rows`) are checked when batches are made: an
        # ahead-of-time compile for a slice (aot.py) has no process of its own there.
        return cls(
            config=config,
            model_config=model_config,
            mesh=mesh,
            model=model,
            optimizer=optimizer,
            trainable=trainable,
            abstract_state=abstract_state,
            state_shardings=shd.tree_shardings(abstract_state, mesh),
            batch_sharding=batch_sharding,
            activation_sharding=shd.activation_sharding(mesh),
        )

    # -- state

    def init_state(self, params: Mapping | None = None) -> TrainState:
        """A fresh sharded state: random params (init straight into their shardings), or the
        given host params (placed shard by shard)."""
        optimizer = self.optimizer
        if params is None:
            init_params = init_params_fn(self.model)
            init = jax.jit(
                lambda key: _new_state(init_params(key), optimizer),
                out_shardings=self.state_shardings,
            )
            return init(jax.random.key(self.config.seed))
        expected = jax.tree.structure(self.abstract_state["params"])
        if jax.tree.structure(params) != expected:
            raise ValueError(
                "init params do not match the model's parameter tree: "
                f"{_tree_difference(params, self.abstract_state['params'])}"
            )
        param_shardings = self.state_shardings["params"]
        placed = jax.tree.map(_place, params, self.abstract_state["params"], param_shardings)
        build = jax.jit(
            lambda p: _new_state(p, optimizer),
            in_shardings=(param_shardings,),
            out_shardings=self.state_shardings,
            donate_argnums=0,
        )
        return build(placed)

    def abstract_state_with_shardings(self):
        return shd.abstract_with_shardings(self.abstract_state, self.state_shardings)

    # -- batches

    @property
    def host_batch_size(self) -> int:
        """Rows of each global batch this process reads (`host_rows`)."""
        return host_rows(self.batch_sharding, self.config.data.batch_size)[0]

    @property
    def host_shard(self) -> tuple[int, int]:
        """(index, count) of this process's rows among the global batch's row groups: the
        data pipeline's shard_index and shard_count."""
        rows, first = host_rows(self.batch_sharding, self.config.data.batch_size)
        return first // rows, self.config.data.batch_size // rows

    def global_batch(self, host_tokens) -> jax.Array:
        """This host's rows [`host_batch_size`, T + 1] as the global, batch-sharded array."""
        host_tokens = _to_int32(host_tokens)
        shape = (self.config.data.batch_size, host_tokens.shape[1])
        return jax.make_array_from_process_local_data(self.batch_sharding, host_tokens, shape)

    # -- the step

    def loss_fn(self, params, tokens):
        """Scalar training loss of int32 tokens [B, T + 1] (inputs [:, :-1], targets [:, 1:]).

        The logits are made `loss.chunk_tokens` positions at a time and never held whole
        (0: whole, in one head forward)."""
        loss_cfg = self.config.loss
        inputs, targets = tokens[:, :-1], tokens[:, 1:]

        def per_token(tok, tgt):
            hidden = self.model.apply({"params": params}, tok, hidden_only=True)
            hidden, tgt_rows = (
                self._rows_per_context_shard(hidden),
                self._rows_per_context_shard(tgt),
            )
            losses = chunked_token_cross_entropy(
                hidden, tgt_rows, functools.partial(output_logits, self.model_config, params),
                chunk_tokens=loss_cfg.chunk_tokens, l2wrap_logits=loss_cfg.l2wrap,
            )  # fmt: skip
            return self._positions_back(losses, *tgt.shape)

        if loss_cfg.longce:
            return longce_loss(
                per_token, inputs, targets, window=loss_cfg.longce_window,
                stride=loss_cfg.longce_stride, start=loss_cfg.longce_start, cap=loss_cfg.longce_cap,
            )  # fmt: skip
        return jnp.mean(per_token(inputs, targets))

    def _rows_per_context_shard(self, x):
        """[B, T, ...] -> [shards * B, T / shards, ...] when the mesh cuts sequences into context
        shards: each shard's positions become rows of their own (shard-major, so every device
        keeps its rows), the loss's pieces along T are cut from local positions, and no device
        gathers another shard's hidden states. Per-position losses are unchanged (L2Wrap still
        divides by the same B * T); `_positions_back` undoes it."""
        shards = shd.context_shards(self.mesh)
        batch, length = x.shape[:2]
        if shards == 1 or length % shards:
            return x
        pieces = x.reshape(batch, shards, length // shards, *x.shape[2:])
        rows = jnp.swapaxes(pieces, 0, 1).reshape(shards * batch, length // shards, *x.shape[2:])
        return jax.lax.with_sharding_constraint(
            rows, shd.context_rows_sharding(self.mesh, rows.ndim)
        )

    def _positions_back(self, rows, batch: int, length: int):
        """[shards * B, T / shards] -> [B, T], the inverse of `_rows_per_context_shard`."""
        if rows.shape[0] == batch:
            return rows
        pieces = rows.reshape(-1, batch, length // (rows.shape[0] // batch))
        return jnp.swapaxes(pieces, 0, 1).reshape(batch, length)

    def step_fn(self, state: TrainState, tokens) -> tuple[TrainState, dict]:
        """One training step (not jitted): loss, gradients of the trainable params, update."""
        trainable = self.trainable
        params = state["params"]
        # Frozen params get no gradient at all, so XLA drops their backward matmuls.
        visible = jax.tree.map(lambda p, t: p if t else jax.lax.stop_gradient(p), params, trainable)
        with block_transforms(self.config.remat, self.activation_sharding):
            loss, grads = jax.value_and_grad(self.loss_fn)(visible, tokens)
        updates, opt_state = self.optimizer.update(grads, state["opt_state"], params)
        new_params = jax.tree.map(
            lambda p, u, t: (p + u).astype(p.dtype) if t else p, params, updates, trainable
        )
        trained_grads = [
            g for g, t in zip(jax.tree.leaves(grads), jax.tree.leaves(trainable), strict=True) if t
        ]
        grad_norm = optax.tree.norm(trained_grads)
        accum = self.config.optimizer.grad_accum_steps
        lr = learning_rate_schedule(self.config.optimizer)(state["step"] // accum)
        metrics = {
            "loss": loss,
            "grad_norm": grad_norm,
            "lr": lr,
            "finite": jnp.isfinite(loss) & jnp.isfinite(grad_norm),
        }
        new_state = {"step": state["step"] + 1, "params": new_params, "opt_state": opt_state}
        return new_state, metrics

    def compile(self, ctx: int):
        """AOT-compiles the step for batches of [batch_size, ctx + 1]; returns the compiled."""
        batch = jax.ShapeDtypeStruct(
            (self.config.data.batch_size, ctx + 1), jnp.int32, sharding=self.batch_sharding
        )
        jitted = jax.jit(
            self.step_fn,
            in_shardings=(self.state_shardings, self.batch_sharding),
            out_shardings=(self.state_shardings, None),
            donate_argnums=0,
        )
        self._compiled = jitted.lower(self.abstract_state_with_shardings(), batch).compile()
        return self._compiled

    def step(self, state: TrainState, tokens: jax.Array) -> tuple[TrainState, dict]:
        """Runs the compiled step (`compile` first); `state` is donated."""
        if self._compiled is None:
            self.compile(tokens.shape[1] - 1)
        return self._compiled(state, tokens)


def _check_context_split(config: TrainConfig, model_config: RWKVXConfig, mesh: Mesh) -> None:
    """Context parallelism cuts each sequence into equal shards of whole attention chunks."""
    shards = shd.context_shards(mesh)
    if shards == 1:
        return
    unit = shards * (model_config.chunk_size if model_config.n_attn_layer else 1)
    if config.data.ctx % unit:
        whole = f" of whole {model_config.chunk_size}-token chunks" if unit > shards else ""
        raise TrainConfigError(
            f"data.ctx={config.data.ctx} cannot be cut into {shards} context shards{whole} (the "
            f"mesh's context axis): use a multiple of {unit}"
        )


def host_rows(batch_sharding: NamedSharding, batch_size: int) -> tuple[int, int]:
    """(rows, first row) of the global batch that this process's devices hold.

    The batch is split over ("data", "fsdp") and repeated over the other axes: processes whose
    devices differ only in "tensor" or "context" (a sequence cut over processes) read the
    same rows, and no process reads rows it does not hold.

    Raises:
      TrainConfigError: the rows do not split evenly over the processes.
    """
    index_map = batch_sharding.addressable_devices_indices_map((batch_size, 1))
    spans = [index[0].indices(batch_size)[:2] for index in index_map.values()]
    first, stop = min(a for a, _ in spans), max(b for _, b in spans)
    rows = stop - first
    if batch_size % rows or first % rows:
        raise TrainConfigError(
            f"data.batch_size={batch_size} does not split evenly over the {jax.process_count()} "
            f"processes (this one holds rows [{first}, {stop}) of the mesh's batch split)"
        )
    return rows, first


def init_params_fn(model: RWKVX):
    # The forward pass of init is dead code for the outputs (params only) and XLA removes it.
    tokens = jnp.zeros((1, 8), jnp.int32)
    return lambda key: model.init(key, tokens)["params"]


def _new_state(params, optimizer) -> TrainState:
    return {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": optimizer.init(params)}


def _place(value, abstract, sharding) -> jax.Array:
    value = np.asarray(value)
    if value.shape != abstract.shape:
        raise ValueError(f"init param has shape {value.shape}, the model needs {abstract.shape}")
    value = value.astype(abstract.dtype, copy=False)
    return jax.make_array_from_callback(value.shape, sharding, lambda index: value[index])


def _tree_difference(tree, expected) -> str:
    have = {shd.path_string(p) for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]}
    want = {shd.path_string(p) for p, _ in jax.tree_util.tree_flatten_with_path(expected)[0]}
    return f"missing {sorted(want - have)[:5]}, unexpected {sorted(have - want)[:5]}"
