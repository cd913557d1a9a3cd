"""`FinetuneProgram`: the train step of a fine-tuning method on a frozen base (`finetune=`).

The state is {"step", "params", "trained", "opt_state"}: "params" is the base checkpoint's
tree, passed through every step bit for bit; "trained" is what the method learns (LoRA
adapters, `training.lora`; starting states, `training.state_tuning`); the optimiser is built
for "trained" alone, so the base holds no optimiser state at all. The loss is the mean
cross-entropy over the scored tokens (chat records score the answers only; plain text scores
every token, `rwkvx_jax.data.chat`).

It is a `TrainProgram` (the same batches, compilation and stepping), so runs, checkpoints,
resume and sharding work the same; the step and the state differ.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh

from rwkvx_jax import sharding as shd
from rwkvx_jax.config import RWKVXConfig
from rwkvx_jax.data.chat import split_scored
from rwkvx_jax.model import RWKVX, output_logits
from rwkvx_jax.training.config import TrainConfig, TrainConfigError
from rwkvx_jax.training.lora import LoraMethod
from rwkvx_jax.training.losses import chunked_token_cross_entropy, masked_mean
from rwkvx_jax.training.optimizer import learning_rate_schedule, make_optimizer
from rwkvx_jax.training.program import TrainProgram, init_params_fn
from rwkvx_jax.training.remat import block_transforms
from rwkvx_jax.training.state_tuning import StateMethod

Log = Callable[[str], None]


def finetune_method(config: TrainConfig, model_config: RWKVXConfig):
    """The method object of `config.finetune` ("lora" or "state")."""
    if config.finetune == "lora":
        return LoraMethod(config.lora)
    if config.finetune == "state":
        return StateMethod(model_config, config.state_tuning)
    raise TrainConfigError(f"finetune={config.finetune!r} is not a fine-tuning method")


def program_class(config: TrainConfig) -> type[TrainProgram]:
    """The program that runs `config`: `FinetuneProgram` for a `finetune=` method."""
    return TrainProgram if config.finetune == "none" else FinetuneProgram


def tree_bytes(tree) -> int:
    """Bytes of every array leaf of a tree (arrays or shape structs)."""
    return sum(int(np.prod(x.shape)) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


@dataclasses.dataclass
class FinetuneProgram(TrainProgram):
    """Base, method, optimiser, shardings and the compiled step for one config on one mesh.

    Build with `FinetuneProgram.create(config, model_config, mesh)`. A `TrainProgram` whose
    `trainable` is False for every param (the base never changes); the method's "trained"
    part is what the step updates. Batches, compilation and stepping are the parent's.
    """

    method: Any = None  # LoraMethod | StateMethod

    @classmethod
    def create(cls, config: TrainConfig, model_config: RWKVXConfig, mesh: Mesh) -> FinetuneProgram:
        model = RWKVX(model_config)
        method = finetune_method(config, model_config)
        abstract_params = jax.eval_shape(init_params_fn(model), jax.random.key(0))
        abstract_trained = jax.eval_shape(method.init, abstract_params, jax.random.key(0))
        optimizer = make_optimizer(config.optimizer, abstract_trained)
        abstract_state = {
            "step": jax.ShapeDtypeStruct((), jnp.int32),
            "params": abstract_params,
            "trained": abstract_trained,
            "opt_state": jax.eval_shape(optimizer.init, abstract_trained),
        }
        shards = shd.batch_shards(mesh)
        for divisor, what in (
            (shards, "the mesh's data x fsdp"),
            (jax.process_count(), "processes"),
        ):
            if config.data.batch_size % divisor:
                raise TrainConfigError(
                    f"data.batch_size={config.data.batch_size} is not divisible by {what} = "
                    f"{divisor}"
                )
        return cls(
            config=config,
            model_config=model_config,
            mesh=mesh,
            model=model,
            method=method,
            optimizer=optimizer,
            trainable=jax.tree.map(lambda _: False, abstract_params),
            abstract_state=abstract_state,
            state_shardings=shd.tree_shardings(abstract_state, mesh),
            batch_sharding=shd.batch_sharding(mesh),
            activation_sharding=shd.batch_sharding(mesh, rank=3),
        )

    # -- state

    def init_state(self, params: Mapping | None = None):
        """The sharded state from the base's host params; the trained part starts fresh."""
        if params is None:
            raise TrainConfigError(f"finetune={self.config.finetune} needs the base's params")
        abstract = self.abstract_state["params"]
        if jax.tree.structure(params) != jax.tree.structure(abstract):
            raise ValueError("the base params do not match the model's parameter tree")

        def place(value, want, sharding):
            value = np.asarray(value)
            if value.shape != want.shape:
                raise ValueError(f"base param has shape {value.shape}, the model {want.shape}")
            value = value.astype(want.dtype, copy=False)
            return jax.make_array_from_callback(value.shape, sharding, lambda i: value[i])

        shardings = self.state_shardings
        placed = jax.tree.map(place, params, abstract, shardings["params"])
        method, optimizer, seed = self.method, self.optimizer, self.config.seed

        def fresh(base):
            trained = method.init(base, jax.random.key(seed))
            return {
                "step": jnp.zeros((), jnp.int32),
                "params": base,
                "trained": trained,
                "opt_state": optimizer.init(trained),
            }

        build = jax.jit(
            fresh, in_shardings=(shardings["params"],), out_shardings=shardings, donate_argnums=0
        )
        return build(placed)

    def parameter_counts(self) -> tuple[int, int]:
        """(params of the base, params trained)."""
        count = lambda tree: sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))
        return count(self.abstract_state["params"]), count(self.abstract_state["trained"])

    def state_bytes(self) -> dict[str, int]:
        """Bytes of each part of the state: "params" (frozen base), "trained", "opt_state"."""
        return {k: tree_bytes(self.abstract_state[k]) for k in ("params", "trained", "opt_state")}

    # -- the step

    @contextlib.contextmanager
    def forward_context(self):
        """The method's interceptor, then the blocks' remat and sharding (`block_transforms`):
        trace `finetune_loss` and its gradient inside it."""
        with self.method.forward_context():
            with block_transforms(self.config.remat, self.activation_sharding):
                yield

    def finetune_loss(self, trained, params, tokens):
        """Mean cross-entropy over the scored targets of signed tokens [B, T + 1], for the
        base `params` adapted by `trained` (traced inside `forward_context`)."""
        ids, scored = split_scored(tokens)
        inputs, targets = ids[:, :-1], ids[:, 1:]
        adapted = self.method.model_params(params, trained)
        loss_cfg = self.config.loss
        hidden = self.model.apply({"params": adapted}, inputs, hidden_only=True)
        per_token = chunked_token_cross_entropy(
            hidden, targets, functools.partial(output_logits, self.model_config, adapted),
            chunk_tokens=loss_cfg.chunk_tokens, l2wrap_logits=loss_cfg.l2wrap,
        )  # fmt: skip
        return masked_mean(per_token, scored[:, 1:])

    def step_fn(self, state, tokens):
        """One step (not jitted): the gradient of the trained part only, its update."""
        params, trained = state["params"], state["trained"]
        # As in TrainProgram.step_fn, the interceptors stay active over the backward pass too
        # (rematerialised blocks run again there); the method's is entered first.
        with self.forward_context():
            loss, grads = jax.value_and_grad(self.finetune_loss)(trained, params, tokens)
        updates, opt_state = self.optimizer.update(grads, state["opt_state"], trained)
        grad_norm = optax.tree.norm(grads)
        accum = self.config.optimizer.grad_accum_steps
        metrics = {
            "loss": loss,
            "grad_norm": grad_norm,
            "lr": learning_rate_schedule(self.config.optimizer)(state["step"] // accum),
            "finite": jnp.isfinite(loss) & jnp.isfinite(grad_norm),
        }
        new_state = {
            "step": state["step"] + 1,
            "params": params,
            "trained": optax.apply_updates(trained, updates),
            "opt_state": opt_state,
        }
        return new_state, metrics

    # -- after training

    def export(self, workdir: str, state, log: Log) -> str:
        """The method's export (adapter + merged model, or the tuned state file)."""
        return self.method.export(
            workdir, self.model_config, state["params"], state["trained"], self.config, log
        )

    def inference(self, state):
        """(params, starting decode state or None) that decode as the fine-tuned model: LoRA
        merged into the base; or the base and the tuned state of one sequence."""
        return self.method.inference(state["params"], state["trained"])
