"""Training library of `train.py`: sharded state and step, checkpoint/resume, metrics, export.

The pieces, in the order `train()` uses them:
  `TrainProgram`    model + optimiser + shardings for one config and mesh: abstract state,
                    sharded init (random, or from given params), the jitted train step.
  `load_corpus`     the token stream of `DataConfig.corpus`.
  `CheckpointStore` one orbax CheckpointManager holding the train state and the grain iterator.
  `MetricsLog`      JSONL + TensorBoard + loss-curve PNG in the workdir.
  `train`           the loop: resume or init, compile (printing `memory_analysis()`), step with
                    a NaN/inf guard, log, checkpoint, export.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
import json
import math
import os
import time
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import linen as nn
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from rwkvx_jax import ops
from rwkvx_jax import sharding as shd
from rwkvx_jax.config import RWKVXConfig
from rwkvx_jax.expand import expand_params, load_checkpoint_params
from rwkvx_jax.losses import chunked_token_cross_entropy, longce_loss
from rwkvx_jax.model import RWKVX, output_logits
from rwkvx_jax.optim import (
    learning_rate_schedule,
    make_optimizer,
    sparse_blocks_only,
    trainable_mask,
)
from rwkvx_jax.rwkv7 import RWKVBlock
from rwkvx_jax.sparse_attention import SparseBlock
from rwkvx_jax.train_config import REMAT_POLICIES, DataConfig, TrainConfig, TrainConfigError

TrainState = dict  # {"step": int32 [], "params": tree, "opt_state": tree}
Log = Callable[[str], None]

# ----------------------------------------------------------------------------- blocks

# The jax.checkpoint policies of the remat settings that use it ("ordered" does not).
_REMAT_POLICIES = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}
_inside_block = contextvars.ContextVar("inside_block", default=False)


@contextlib.contextmanager
def block_transforms(remat: str = "none", activation_sharding: NamedSharding | None = None):
    """While active, every RWKV / sparse block call is rematerialised and/or sharding-pinned.

    The model builds its blocks itself, so this works through a Flax method interceptor around
    each block's `__call__`:
      remat: "full" / "dots" runs the block inside `nn.checkpoint` (jax.checkpoint) with that
        policy; "ordered" saves nothing inside a block either and also makes the backward
        pass finish one block before it starts the next (`_ordered_remat_call`). The module
        is the same, so parameter paths do not change. "none": no remat.
      activation_sharding: the sharding of [B, T, C] activations at block boundaries (the
        residual stream in and out, and `v_first`), batch over ("data", "fsdp"); it keeps
        GSPMD from resharding activations along the model width between blocks. Its mesh also
        becomes the kernel mesh (`ops.kernel_mesh`): the Pallas kernels run per device.
    """
    if remat not in REMAT_POLICIES:
        raise ValueError(f"remat policy must be one of {REMAT_POLICIES}, got {remat!r}")
    if remat == "none" and activation_sharding is None:
        yield
        return

    def pin(x):
        if activation_sharding is None or getattr(x, "ndim", None) != 3:
            return x  # None (v_first of block 0) or not an activation
        return jax.lax.with_sharding_constraint(x, activation_sharding)

    def call(module, x, *args, **kwargs):
        token = _inside_block.set(True)
        try:
            if isinstance(module, RWKVBlock):
                v_first, *rest = args
                x, v_first, state = type(module).__call__(
                    module, pin(x), pin(v_first), *rest, **kwargs
                )
                return pin(x), pin(v_first), state
            x, state = type(module).__call__(module, pin(x), *args, **kwargs)
            return pin(x), state
        finally:
            _inside_block.reset(token)

    if remat == "none":
        wrapped = call
    elif remat == "ordered":
        wrapped = functools.partial(_ordered_remat_call, call)
    else:
        wrapped = nn.checkpoint(call, policy=_REMAT_POLICIES[remat])

    def interceptor(next_fun, args, kwargs, context):
        is_block = isinstance(context.module, RWKVBlock | SparseBlock)
        if context.method_name == "__call__" and is_block and not _inside_block.get():
            return wrapped(context.module, *args, **kwargs)
        return next_fun(*args, **kwargs)

    # Pallas kernels cannot be partitioned by XLA: they run per device on the same mesh.
    mesh = None if activation_sharding is None else activation_sharding.mesh
    with nn.intercept_methods(interceptor), ops.kernel_mesh(mesh):
        yield


def _ordered_remat_call(call, module, x, *args, **kwargs):
    """`call(module, x, *args)` rematerialised, with a backward pass that goes block by block.

    Under jax.checkpoint, XLA may put off a block's weight gradients (and, with FSDP, their
    reduce-scatters) while it recomputes the blocks below, so the recomputed activations of
    several blocks are live at once: 7 in the 3.6b stage-2 step on a v5p (docs/BENCHMARKS.md).
    Here the block is a `jax.custom_vjp` whose backward recomputes the block from its saved
    inputs and returns the input cotangents and all the parameter gradients through one
    `optimization_barrier`: the next block down cannot start before this one is done. The
    values are those of no remat (the same operations; only the schedule changes).
    """
    if kwargs:
        raise ValueError(f"remat='ordered' takes blocks called positionally, got {sorted(kwargs)}")
    params = module.variables["params"]
    unbound = module.clone(parent=None)

    def pure(params, x, args):
        return unbound.apply({"params": params}, x, *args, method=call)

    @jax.custom_vjp
    def run(params, x, args):
        return pure(params, x, args)

    def run_fwd(params, x, args):
        return pure(params, x, args), (params, x, args)

    def run_bwd(residuals, cotangent):
        # As jax.checkpoint does: the barrier keeps XLA from merging the recomputation with the
        # forward pass (CSE) and from starting it before the output cotangent exists.
        residuals, cotangent = jax.lax.optimization_barrier((residuals, cotangent))
        _, vjp = jax.vjp(pure, *residuals)
        return jax.lax.optimization_barrier(vjp(cotangent))

    run.defvjp(run_fwd, run_bwd)
    return run(params, x, args)


# ----------------------------------------------------------------------------- FLOPs


def matmul_param_count(params) -> int:
    """Parameters used in a matmul once per token: every array of rank >= 2 except `emb`
    (a lookup) and the tiny per-head `r_k`."""
    count = 0
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        name = shd.path_string(path)
        if len(np.shape(leaf)) >= 2 and not name.startswith("emb/") and not name.endswith("r_k"):
            count += int(np.prod(np.shape(leaf)))
    return count


def mean_attended_keys(ctx: int, chunk_size: int, top_k: int) -> float:
    """Keys per query of top-k chunk attention: its own chunk causally + top_k - 1 full chunks."""
    t = np.arange(ctx)
    keys = t % chunk_size + 1 + np.minimum(t // chunk_size, top_k - 1) * chunk_size
    return float(keys.mean())


def training_flops_per_token(config: RWKVXConfig, params, ctx: int) -> float:
    """Model FLOPs of one training token (forward + backward), the MFU numerator.

    6 x matmul parameters, plus per RWKV block the WKV-7 recurrence (forward ~9 N^2 per head:
    decay, S a, the two rank-1 updates, S r; backward twice that), plus per sparse block the
    attention scores and values over the mean attended keys (4 C per key forward, x3).
    """
    dense = 6.0 * matmul_param_count(params)
    wkv = 27.0 * config.head_size * config.n_embd * config.n_rwkv_layer
    keys = mean_attended_keys(ctx, config.chunk_size, config.top_k) if config.n_attn_layer else 0
    attention = 12.0 * config.n_embd * keys * config.n_attn_layer
    return dense + wkv + attention


def measure_peak_flops(mesh: Mesh, dtype="float32", size: int | None = None) -> float:
    """Best-of-3 matmul FLOP/s of all the mesh's devices together (the MFU denominator).

    Each device multiplies its own [size, size] pair (one batched matmul sharded over every
    mesh axis), so the figure is what these devices reach on dense matmuls in this process.
    """
    devices = mesh.devices.size
    platform = mesh.devices.flat[0].platform
    size = size or (1024 if platform == "cpu" else 8192)
    sharding = NamedSharding(mesh, PartitionSpec(mesh.axis_names))
    make = jax.jit(
        lambda key: jax.random.normal(key, (devices, size, size), jnp.dtype(dtype)),
        out_shardings=sharding,
    )
    a = make(jax.random.key(1))
    b = make(jax.random.key(2))
    matmul = jax.jit(lambda a, b: jnp.einsum("bij,bjk->bik", a, b), out_shardings=sharding)
    matmul(a, b).block_until_ready()
    best = math.inf
    for _ in range(3):
        start = time.perf_counter()
        matmul(a, b).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return 2.0 * devices * size**3 / best


# ----------------------------------------------------------------------------- data


def load_corpus(data: DataConfig, vocab_size: int):
    """The flat token stream of `data.corpus` (see `DataConfig`)."""
    from rwkvx_jax.data import BinIdxTokens, jsonl_documents, pack_documents, stdlib_corpus_tokens

    corpus = data.corpus
    if corpus == "stdlib":
        if vocab_size < 256:
            raise TrainConfigError(
                f"data.corpus='stdlib' is bytes, but model.vocab_size={vocab_size}"
            )
        return stdlib_corpus_tokens(data.max_tokens)
    if corpus.endswith(".jsonl"):
        if not os.path.isfile(corpus):
            raise TrainConfigError(f"data.corpus={corpus!r}: no such jsonl file")
        tokenizer = _tokenizer(data.tokenizer, vocab_size)
        documents = jsonl_documents(corpus, tokenizer, data.jsonl_field)
        tokens = pack_documents(documents, np.int32)
        return tokens[: data.max_tokens] if data.max_tokens else tokens
    if not (os.path.isfile(corpus + ".bin") and os.path.isfile(corpus + ".idx")):
        raise TrainConfigError(
            f"data.corpus={corpus!r}: expected 'stdlib', a .jsonl file, or a binidx prefix with "
            f"{corpus}.bin and {corpus}.idx (RWKV-LM make_data output); not found"
        )
    return BinIdxTokens(corpus)


class _ByteTokenizer:
    end_of_document = 0

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))


def _tokenizer(name: str, vocab_size: int):
    if name == "bytes" or (name == "auto" and vocab_size == 256):
        return _ByteTokenizer()
    from rwkvx_jax.tokenizer import tokenizer_for_vocab

    return tokenizer_for_vocab(65536 if name == "world" else vocab_size)


# ----------------------------------------------------------------------------- the program


class NonFiniteError(RuntimeError):
    """The loss or gradient norm became NaN/inf; the state of that step was not saved."""


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
        abstract_params = jax.eval_shape(_init_params_fn(model), jax.random.key(0))
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
        if config.data.batch_size % jax.process_count():
            raise TrainConfigError(
                f"data.batch_size={config.data.batch_size} is not divisible by the "
                f"{jax.process_count()} processes"
            )
        return cls(
            config=config,
            model_config=model_config,
            mesh=mesh,
            model=model,
            optimizer=optimizer,
            trainable=trainable,
            abstract_state=abstract_state,
            state_shardings=shd.tree_shardings(abstract_state, mesh),
            batch_sharding=shd.batch_sharding(mesh),
            activation_sharding=shd.batch_sharding(mesh, rank=3),
        )

    # -- state

    def init_state(self, params: Mapping | None = None) -> TrainState:
        """A fresh sharded state: random params (init straight into their shardings), or the
        given host params (placed shard by shard)."""
        optimizer = self.optimizer
        if params is None:
            init_params = _init_params_fn(self.model)
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
        return self.config.data.batch_size // jax.process_count()

    def global_batch(self, host_tokens) -> jax.Array:
        """This host's rows [B / processes, T + 1] as the global, batch-sharded array."""
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
            return chunked_token_cross_entropy(
                hidden, tgt, functools.partial(output_logits, self.model_config, params),
                chunk_tokens=loss_cfg.chunk_tokens, l2wrap_logits=loss_cfg.l2wrap,
            )  # fmt: skip

        if loss_cfg.longce:
            return longce_loss(
                per_token, inputs, targets, window=loss_cfg.longce_window,
                stride=loss_cfg.longce_stride, start=loss_cfg.longce_start, cap=loss_cfg.longce_cap,
            )  # fmt: skip
        return jnp.mean(per_token(inputs, targets))

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


def _init_params_fn(model: RWKVX):
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


def describe_memory(compiled) -> str:
    """`compiled.memory_analysis()` as one line of per-device sizes."""
    stats = compiled.memory_analysis()
    if stats is None:
        return "memory analysis: not available on this backend"
    fields = (
        ("arguments", "argument_size_in_bytes"),
        ("outputs", "output_size_in_bytes"),
        ("aliased", "alias_size_in_bytes"),
        ("temporaries", "temp_size_in_bytes"),
        ("code", "generated_code_size_in_bytes"),
    )
    parts = [
        f"{label} {_bytes(getattr(stats, attr))}" for label, attr in fields if hasattr(stats, attr)
    ]
    return "memory analysis of the train step (per device): " + ", ".join(parts)


def _bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n} B"
        n /= 1024
    return str(n)


# ----------------------------------------------------------------------------- checkpoints


class CheckpointStore:
    """One orbax CheckpointManager: item "state" (train state) + item "data" (grain iterator)."""

    def __init__(self, directory: str, every: int, keep: int, async_save: bool):
        import orbax.checkpoint as ocp

        self._ocp = ocp
        self.every = every
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, enable_async_checkpointing=async_save, create=True
        )
        self.manager = ocp.CheckpointManager(os.path.abspath(directory), options=options)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def due(self, step: int, last_step: int) -> bool:
        return step == last_step or (self.every > 0 and step % self.every == 0)

    def save(self, step: int, state: TrainState, iterator) -> None:
        import grain

        ocp = self._ocp
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(state), data=grain.checkpoint.CheckpointSave(iterator)
        )
        self.manager.save(step, args=args, force=True)

    def restore(self, step: int, abstract_state, iterator) -> TrainState:
        import grain

        ocp = self._ocp
        args = ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state),
            data=grain.checkpoint.CheckpointRestore(iterator),
        )
        return self.manager.restore(step, args=args)["state"]

    def restore_state(self, step: int, abstract_state) -> TrainState:
        """The train state alone (no iterator), e.g. to inspect a checkpoint."""
        ocp = self._ocp
        args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state))
        return self.manager.restore(step, args=args)["state"]

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


# ----------------------------------------------------------------------------- metrics


class MetricsLog:
    """metrics.jsonl + TensorBoard events + loss.png in the workdir (process 0 only).

    On resume from step s, records after s (written by the interrupted run) are dropped, so the
    file always reads as one uninterrupted run.
    """

    def __init__(self, workdir: str, start_step: int, enabled: bool = True):
        self.enabled = enabled
        self.path = os.path.join(workdir, "metrics.jsonl")
        self.plot_path = os.path.join(workdir, "loss.png")
        self.records: list[dict] = []
        self._writer = None
        if not enabled:
            return
        self.records = [r for r in read_metrics(self.path) if r["step"] <= start_step]
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in self.records)
        os.replace(tmp, self.path)
        self._file = open(self.path, "a")
        try:
            from tensorboardX import SummaryWriter

            self._writer = SummaryWriter(
                os.path.join(workdir, "tensorboard"), purge_step=start_step + 1
            )
        except ImportError:  # reported by `train` through `has_tensorboard`
            self._writer = None

    @property
    def has_tensorboard(self) -> bool:
        return self._writer is not None

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        self.records.append(record)
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._writer is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, int | float):
                    self._writer.add_scalar(f"train/{key}", value, record["step"])

    def plot(self) -> str | None:
        """Writes loss.png (loss per step and a moving average); returns its path."""
        if not self.enabled or not self.records:
            return None
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            return None

        steps = np.array([r["step"] for r in self.records])
        losses = np.array([r["loss"] for r in self.records], dtype=np.float64)
        fig, ax = plt.subplots(figsize=(7, 4))
        ax.plot(steps, losses, lw=0.8, alpha=0.5, label="loss")
        window = max(1, len(losses) // 20)
        if window > 1:
            smooth = np.convolve(losses, np.ones(window) / window, mode="valid")
            ax.plot(steps[window - 1 :], smooth, lw=1.8, label=f"mean of {window}")
        ax.set_xlabel("step")
        ax.set_ylabel("training loss (nats/token)")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(self.plot_path, dpi=100)
        plt.close(fig)
        return self.plot_path

    def close(self) -> None:
        if not self.enabled:
            return
        self._file.close()
        if self._writer is not None:
            self._writer.close()


def read_metrics(path: str) -> list[dict]:
    """The records of a metrics.jsonl (empty if missing)."""
    if not os.path.isfile(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


# ----------------------------------------------------------------------------- model config


_SHAPE_FIELDS = ("vocab_size", "n_embd", "n_rwkv_layer", "head_size", "dim_w", "dim_a")
_SHAPE_FIELDS += ("dim_v", "dim_g")


def _initial_params(config: TrainConfig, log: Log) -> tuple[RWKVXConfig, dict | None]:
    """The model config to train and host params to start from (None: random init)."""
    target = config.model
    if config.init_checkpoint is None:
        if config.stage != "stage1":
            return target, None
        log("stage1 without init_checkpoint: expanding a randomly initialised RWKV-7")
        rwkv7 = target.replace(n_attn_layer=0)
        params = jax.jit(_init_params_fn(RWKVX(rwkv7)))(jax.random.key(config.seed))
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


def _resumed_model_config(config: TrainConfig, stored: RWKVXConfig) -> RWKVXConfig:
    """The stored model config of a run being resumed, with this run's compute settings."""
    for f in _SHAPE_FIELDS + ("n_attn_layer",):
        if getattr(stored, f) != getattr(config.model, f):
            raise TrainConfigError(
                f"the workdir's run has model.{f}={getattr(stored, f)}, this config "
                f"{getattr(config.model, f)}; use a new workdir or the same model"
            )
    compute = ("dtype", "wkv_backend", "attention_backend", "wkv_chunk_size", "chunk_size", "top_k")
    return stored.replace(**{f: getattr(config.model, f) for f in compute})


# ----------------------------------------------------------------------------- the loop


@dataclasses.dataclass
class TrainResult:
    """What `train` returns: the final state and the loss of every step it ran."""

    model_config: RWKVXConfig
    state: TrainState
    start_step: int
    final_step: int
    losses: dict[int, float]
    export_dir: str | None
    workdir: str


def _device_metrics(metrics) -> dict:
    return {k: (bool(v) if k == "finite" else float(v)) for k, v in jax.device_get(metrics).items()}


def train(
    config: TrainConfig,
    *,
    mesh: Mesh | None = None,
    progress: bool = True,
    log: Log | None = None,
) -> TrainResult:
    """Trains `config` in `config.workdir`, resuming from its latest checkpoint if any.

    Raises:
      NonFiniteError: a step's loss or gradient norm was NaN/inf. Nothing from that step on is
        saved; the checkpoints already written stay, and re-running resumes from the last one.
      TrainConfigError: inconsistent settings, missing corpus or checkpoint.
    """
    from tqdm.auto import tqdm

    primary = jax.process_index() == 0
    log = log or (lambda text: tqdm.write(text) if primary else None)
    workdir = os.path.abspath(config.workdir)
    os.makedirs(workdir, exist_ok=True)
    mesh = mesh or shd.make_mesh(config.mesh)
    store = CheckpointStore(
        os.path.join(workdir, "checkpoints"),
        config.checkpoint.every,
        config.checkpoint.keep,
        config.checkpoint.async_save,
    )
    resume_step = store.latest_step()
    model_config_path = os.path.join(workdir, "model_config.json")
    init_params = None
    if resume_step is not None and os.path.isfile(model_config_path):
        with open(model_config_path) as f:
            stored = RWKVXConfig.from_json(f.read())
        model_config = _resumed_model_config(config, stored)
    elif resume_step is not None:
        model_config = config.model
    else:
        model_config, init_params = _initial_params(config, log)
    if primary:
        _write_json(os.path.join(workdir, "train_config.json"), config.to_json())
        _write_json(model_config_path, model_config.to_json())
    _check_schedule(config, log)

    program = TrainProgram.create(config, model_config, mesh)
    tokens = load_corpus(config.data, model_config.vocab_size)
    from rwkvx_jax.data import make_train_iterator

    iterator = make_train_iterator(
        tokens,
        ctx=config.data.ctx,
        batch_size=program.host_batch_size,
        seed=config.seed,
        order=config.data.order,
        prefetch=config.data.prefetch,
    )
    if resume_step is not None:
        state = store.restore(resume_step, program.abstract_state_with_shardings(), iterator)
        start_step = int(jax.device_get(state["step"]))
        log(f"resumed from {workdir}/checkpoints step {start_step}")
    else:
        state = program.init_state(init_params)
        start_step = 0
    del init_params

    n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(program.abstract_state["params"]))
    n_trainable = sum(
        int(np.prod(x.shape))
        for x, t in zip(
            jax.tree.leaves(program.abstract_state["params"]),
            jax.tree.leaves(program.trainable),
            strict=True,
        )
        if t
    )
    tokens_per_step = config.data.batch_size * config.data.ctx
    flops_per_step = tokens_per_step * training_flops_per_token(
        model_config, program.abstract_state["params"], config.data.ctx
    )
    peak = measure_peak_flops(mesh, model_config.dtype)
    log(
        f"{config.name}: {n_params / 1e6:.2f}M params ({n_trainable / 1e6:.2f}M trained, "
        f"stage {config.stage}), mesh {dict(mesh.shape)}, batch {config.data.batch_size} x ctx "
        f"{config.data.ctx}, {len(tokens):,} corpus tokens, peak matmul "
        f"{peak / 1e9:.1f} GFLOP/s ({model_config.dtype})"
    )
    if start_step < config.steps:
        compile_start = time.perf_counter()
        compiled = program.compile(config.data.ctx)
        log(f"compiled the train step in {time.perf_counter() - compile_start:.1f} s")
        log(describe_memory(compiled))
    else:
        log(f"the run already reached step {config.steps}; raise --steps to train further")

    metrics_log = MetricsLog(workdir, start_step, enabled=primary)
    if primary and not metrics_log.has_tensorboard:
        log("tensorboardX is not installed: metrics go to metrics.jsonl only")
    losses: dict[int, float] = {}
    bar = tqdm(
        total=config.steps, initial=start_step, desc=config.name, unit="step",
        disable=not (progress and primary), dynamic_ncols=True,
    )  # fmt: skip
    pending: list[tuple[int, Any]] = []
    last_done = {"time": time.perf_counter()}
    last_saved = resume_step

    def resolve(step: int, device_metrics) -> None:
        values = _device_metrics(device_metrics)
        now = time.perf_counter()
        seconds, last_done["time"] = now - last_done["time"], now
        if not values["finite"]:
            saved = "none" if last_saved is None else f"step {last_saved}"
            raise NonFiniteError(
                f"step {step}: loss {values['loss']}, grad norm {values['grad_norm']} is not "
                f"finite; stopped without saving this state. Last good checkpoint: {saved} in "
                f"{workdir}/checkpoints (re-running resumes from it; lower optimizer.lr or "
                "check the data first)."
            )
        losses[step] = values["loss"]
        tokens_per_s = tokens_per_step / seconds
        mfu = flops_per_step / seconds / peak
        bar.update(1)
        if step % config.log_every == 0 or step == config.steps:
            record = {
                "step": step, "loss": values["loss"], "grad_norm": values["grad_norm"],
                "lr": values["lr"], "tokens_per_s": tokens_per_s, "mfu": mfu,
                "step_s": seconds,
            }  # fmt: skip
            metrics_log.write(record)
            bar.set_postfix(
                loss=f"{values['loss']:.4f}", tok_s=f"{tokens_per_s:,.0f}", mfu=f"{mfu:.1%}"
            )

    def flush() -> None:
        while pending:
            resolve(*pending.pop(0))

    try:
        for step in range(start_step + 1, config.steps + 1):
            batch = program.global_batch(next(iterator)["tokens"])
            state, metrics = program.step(state, batch)
            pending.append((step, metrics))
            # Read step s-1's metrics while step s runs: one step stays in flight.
            while len(pending) > 1:
                resolve(*pending.pop(0))
            if store.due(step, config.steps):
                flush()
                store.save(step, state, iterator)
                last_saved = step
        flush()
    except BaseException:
        bar.close()
        store.close()
        metrics_log.plot()
        metrics_log.close()
        raise
    bar.close()
    store.close()
    plot = metrics_log.plot()
    metrics_log.close()
    if primary:
        drawn = f"loss curve: {plot}" if plot else "no loss curve (pip install matplotlib)"
        log(f"{drawn}; metrics: {metrics_log.path}")
    export_dir = None
    if config.checkpoint.export:
        export_dir = export_params(workdir, model_config, state["params"], config, log)
    return TrainResult(
        model_config=model_config,
        state=state,
        start_step=start_step,
        final_step=config.steps,
        losses=losses,
        export_dir=export_dir,
        workdir=workdir,
    )


def _check_schedule(config: TrainConfig, log: Log) -> None:
    opt = config.optimizer
    updates = config.steps // opt.grad_accum_steps
    if opt.schedule == "cosine" and opt.total_steps is not None and opt.total_steps != updates:
        log(
            f"note: optimizer.total_steps={opt.total_steps} but the run makes {updates} "
            "optimizer updates; the cosine ends at total_steps"
        )


def _write_json(path: str, text: str) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text + "\n")
    os.replace(tmp, path)


# ----------------------------------------------------------------------------- AOT


def tpu_topology_devices(topology: str, chips_per_host_bounds=(2, 2, 1)) -> list:
    """The devices of a TPU slice described by name (e.g. "v5p:4x4x2" = v5p-64), no hardware.

    Needs libtpu installed (it compiles for the chips); raises RuntimeError otherwise.
    """
    from jax.experimental import topologies

    try:
        description = topologies.get_topology_desc(
            platform="tpu",
            topology_name=topology,
            chip_config_name="default",
            chips_per_host_bounds=tuple(chips_per_host_bounds),
            num_slices=1,
        )
    except Exception as err:  # libtpu missing or an unknown topology: say which
        raise RuntimeError(
            f"cannot describe TPU topology {topology!r} on this machine ({err}); ahead-of-time "
            "TPU compilation needs libtpu (pip install -e '.[aot]')"
        ) from err
    return list(description.devices)


def aot_compile(config: TrainConfig, devices, model_config: RWKVXConfig | None = None):
    """Compiles the train step of `config` for `devices` without running (or owning) them.

    Checks that the config shards onto that slice and reports the per-device memory the step
    needs. The params are abstract (`jax.eval_shape`): nothing is allocated. Kernel backends
    "auto" become the kernels of the devices' platform (the Pallas TPU ones for a TPU slice),
    not of this host's.

    Returns:
      (TrainProgram, compiled step).
    """
    mesh = shd.make_mesh(config.mesh, devices=devices)
    model_config = model_config or config.model
    platform_backend = ops.platform_backend(devices[0].platform)
    model_config = model_config.replace(
        **{
            name: platform_backend
            for name in ("wkv_backend", "attention_backend")
            if getattr(model_config, name) == "auto"
        }
    )
    program = TrainProgram.create(config, model_config, mesh)
    return program, program.compile(config.data.ctx)


# ----------------------------------------------------------------------------- export, sample


def host_params(params) -> dict:
    """Params as host numpy arrays (gathered across processes when sharded over hosts)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        params = multihost_utils.process_allgather(params, tiled=True)
    return jax.tree.map(np.asarray, jax.device_get(params))


def export_params(workdir: str, model_config: RWKVXConfig, params, config: TrainConfig, log: Log):
    """Writes `export/params` (inference format) and `export/model.pth` (if torch is present)."""
    from rwkvx_jax.checkpoint import save_params

    params = host_params(params)
    export_dir = os.path.join(workdir, "export")
    if jax.process_index() != 0:
        return export_dir
    params_dir = os.path.join(export_dir, "params")
    metadata = {
        "source": f"train.py recipe {config.name}, step {config.steps}",
        "source_dtype": model_config.param_dtype,
    }
    save_params(params_dir, model_config, params, metadata, overwrite=True)
    log(f"exported params to {params_dir}")
    try:
        import torch  # noqa: F401
    except ImportError:
        log("torch is not installed: skipped the official .pth export (pip install torch)")
        return export_dir
    from rwkvx_jax.convert_files import export_pth

    pth = os.path.join(export_dir, "model.pth")
    export_pth(params_dir, pth)
    log(f"exported the official .pth to {pth}")
    return export_dir


def sample_text(model_config: RWKVXConfig, params, prompt: str, n_tokens: int) -> str:
    """Greedy continuation of `prompt` (byte-level for vocab 256, else the World tokenizer)."""
    from rwkvx_jax.decode import DecodeConfig, Decoder, greedy_tokens

    if model_config.vocab_size == 256:
        encode = lambda text: list(text.encode("utf-8"))
        decode = lambda ids: bytes(ids).decode("utf-8", "replace")
    else:
        from rwkvx_jax.tokenizer import tokenizer_for_vocab

        tokenizer = tokenizer_for_vocab(model_config.vocab_size)
        encode, decode = tokenizer.encode, tokenizer.decode
    prompt_ids = encode(prompt)
    # One prefill piece just covering the prompt: the decoder's default piece (512 tokens)
    # compiles for minutes on CPU for a handful of prompt tokens.
    chunk = model_config.chunk_size
    piece = DecodeConfig(prefill_chunk=chunk * max(1, -(-len(prompt_ids) // chunk)))
    decoder = Decoder(model_config, host_params(params), piece)
    ids = greedy_tokens(decoder, [prompt_ids], n_tokens)[0]
    return decode([int(i) for i in ids if i >= 0])
