"""`train`: resume or start a run, step it with a NaN/inf guard, log, checkpoint, export."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import time
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh

from rwkvx_jax import sharding as shd
from rwkvx_jax.atomic_files import write_text_atomically
from rwkvx_jax.checkpoints.directory import RUN_CONFIG_FILE
from rwkvx_jax.checkpoints.train_state import CheckpointStore, TrainState
from rwkvx_jax.config import RWKVXConfig
from rwkvx_jax.data import make_train_iterator
from rwkvx_jax.training.aot import describe_memory
from rwkvx_jax.training.config import TrainConfig
from rwkvx_jax.training.corpus import load_corpus
from rwkvx_jax.training.export import export_params
from rwkvx_jax.training.finetune import FinetuneProgram, program_class
from rwkvx_jax.training.flops import measure_peak_flops, training_flops_per_token
from rwkvx_jax.training.initial_params import initial_params, resumed_model_config
from rwkvx_jax.training.metrics import MetricsLog
from rwkvx_jax.training.program import TrainProgram

Log = Callable[[str], None]


class NonFiniteError(RuntimeError):
    """The loss or gradient norm became NaN/inf; the state of that step was not saved."""


class StopRequested(KeyboardInterrupt):
    """`train` stopped early when asked (`stop_requested`), after saving a checkpoint."""


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
    program: TrainProgram | None = None

    def inference(self):
        """(params, starting decode state or None) to decode the trained model with."""
        if isinstance(self.program, FinetuneProgram):
            return self.program.inference(self.state)
        return self.state["params"], None


def _device_metrics(metrics) -> dict:
    return {k: (bool(v) if k == "finite" else float(v)) for k, v in jax.device_get(metrics).items()}


@dataclasses.dataclass
class _Run:
    """A run ready to step: what `_start` set up."""

    workdir: str
    model_config: RWKVXConfig
    program: TrainProgram
    store: CheckpointStore
    iterator: Any
    state: TrainState
    start_step: int
    resume_step: int | None
    flops_per_step: float
    peak: float


def _first_missing_folder(path: str) -> str | None:
    """The outermost folder of `path` (itself included) that does not exist yet, or None."""
    missing = None
    while not os.path.exists(path):
        missing, parent = path, os.path.dirname(path)
        if parent == path:
            break
        path = parent
    return missing


@contextlib.contextmanager
def _removed_if_start_fails(workdir: str):
    """Removes the folders a failed start created (a bad config, corpus or checkpoint, Ctrl-C
    while compiling), so a failed first start leaves no run skeleton behind."""
    created = _first_missing_folder(workdir)
    try:
        yield
    except BaseException:
        if created is not None:
            shutil.rmtree(created, ignore_errors=True)
        raise


def train(
    config: TrainConfig,
    *,
    mesh: Mesh | None = None,
    progress: bool = True,
    log: Log | None = None,
    stop_requested: Callable[[], bool] | None = None,
) -> TrainResult:
    """Trains `config` in `config.workdir`, resuming from its latest checkpoint if any.

    A start that fails (before the first step) removes the folders it created.

    Args:
      config: the run.
      mesh: the device mesh (default: `sharding.make_mesh(config.mesh)`).
      progress: show a progress bar.
      log: where progress lines go (default: tqdm.write on process 0).
      stop_requested: asked after every step; when it answers True the run saves a
        checkpoint at that step and raises `StopRequested` (train.py's Ctrl-C).

    Raises:
      StopRequested: `stop_requested` said so; re-running resumes from the saved step.
      NonFiniteError: a step's loss or gradient norm was NaN/inf. Nothing from that step on is
        saved; the checkpoints already written stay, and re-running resumes from the last one.
      TrainConfigError: inconsistent settings, missing corpus or checkpoint.
    """
    from tqdm.auto import tqdm

    primary = jax.process_index() == 0
    log = log or (lambda text: tqdm.write(text) if primary else None)
    workdir = os.path.abspath(config.workdir)
    with _removed_if_start_fails(workdir):
        run = _start(config, workdir, mesh or shd.make_mesh(config.mesh), log, primary)
    return _run_steps(config, run, progress, log, primary, stop_requested)


def _start(config: TrainConfig, workdir: str, mesh: Mesh, log: Log, primary: bool) -> _Run:
    """Resumes or initialises the run's state, data iterator and compiled step."""
    os.makedirs(workdir, exist_ok=True)
    store = CheckpointStore(
        os.path.join(workdir, "checkpoints"),
        config.checkpoint.every,
        config.checkpoint.keep,
        config.checkpoint.async_save,
    )
    try:
        return _prepare(config, workdir, mesh, log, primary, store)
    except BaseException:
        store.close()
        raise


def _prepare(
    config: TrainConfig, workdir: str, mesh: Mesh, log: Log, primary: bool, store: CheckpointStore
) -> _Run:
    """The rest of `_start`, once the run's checkpoint store is open."""
    resume_step = store.latest_step()
    model_config_path = os.path.join(workdir, "model_config.json")
    init_params = None
    if resume_step is not None and os.path.isfile(model_config_path):
        with open(model_config_path) as f:
            stored = RWKVXConfig.from_json(f.read())
        model_config = resumed_model_config(config, stored)
    elif resume_step is not None:
        model_config = config.model
    else:
        model_config, init_params = initial_params(config, log)
    if primary:
        write_text_atomically(os.path.join(workdir, RUN_CONFIG_FILE), config.to_json() + "\n")
        write_text_atomically(model_config_path, model_config.to_json() + "\n")
    _check_schedule(config, log)

    program = program_class(config).create(config, model_config, mesh)
    tokens = load_corpus(config.data, model_config.vocab_size)
    iterator = make_train_iterator(
        tokens,
        ctx=config.data.ctx,
        batch_size=program.host_batch_size,
        shard_index=program.host_shard[0],
        shard_count=program.host_shard[1],
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

    n_params, n_trainable = _parameter_counts(program)
    tokens_per_step = config.data.batch_size * config.data.ctx
    flops_per_step = tokens_per_step * training_flops_per_token(
        model_config, program.abstract_state["params"], config.data.ctx
    )
    peak = measure_peak_flops(mesh, model_config.dtype)
    log(
        f"{config.name}: {n_params / 1e6:.2f}M params ({n_trainable / 1e6:.2f}M trained, "
        f"{_what_trains(config, program)}), mesh {dict(mesh.shape)}, batch "
        f"{config.data.batch_size} x ctx {config.data.ctx}, {len(tokens):,} corpus tokens, peak "
        f"matmul {peak / 1e9:.1f} GFLOP/s ({model_config.dtype})"
    )
    if start_step < config.steps:
        compile_start = time.perf_counter()
        compiled = program.compile(config.data.ctx)
        log(f"compiled the train step in {time.perf_counter() - compile_start:.1f} s")
        log(describe_memory(compiled))
    else:
        log(f"the run already reached step {config.steps}; raise --steps to train further")
    return _Run(
        workdir, model_config, program, store, iterator, state, start_step, resume_step,
        flops_per_step, peak,
    )  # fmt: skip


def _run_steps(
    config: TrainConfig,
    run: _Run,
    progress: bool,
    log: Log,
    primary: bool,
    stop_requested: Callable[[], bool] | None,
) -> TrainResult:
    """Steps the run to `config.steps`, logging and checkpointing; then exports."""
    from tqdm.auto import tqdm

    workdir, program, store, iterator = run.workdir, run.program, run.store, run.iterator
    state, start_step = run.state, run.start_step
    flops_per_step, peak = run.flops_per_step, run.peak
    tokens_per_step = config.data.batch_size * config.data.ctx

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
    last_saved = run.resume_step

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
            stopping = stop_requested is not None and step < config.steps and stop_requested()
            if stopping or store.due(step, config.steps):
                flush()
                store.save(step, state, iterator)
                last_saved = step
            if stopping:
                raise StopRequested(f"saved a checkpoint at step {step} in {workdir}/checkpoints")
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
    if config.checkpoint.export and isinstance(program, FinetuneProgram):
        export_dir = program.export(workdir, state, log)
    elif config.checkpoint.export:
        export_dir = export_params(workdir, run.model_config, state["params"], config, log)
    return TrainResult(
        model_config=run.model_config,
        state=state,
        start_step=start_step,
        final_step=config.steps,
        losses=losses,
        export_dir=export_dir,
        workdir=workdir,
        program=program,
    )


def _parameter_counts(program: TrainProgram) -> tuple[int, int]:
    """(params of the model, params trained)."""
    if isinstance(program, FinetuneProgram):
        return program.parameter_counts()
    leaves = jax.tree.leaves(program.abstract_state["params"])
    trainable = jax.tree.leaves(program.trainable)
    n_params = sum(int(np.prod(x.shape)) for x in leaves)
    n_trainable = sum(int(np.prod(x.shape)) for x, t in zip(leaves, trainable, strict=True) if t)
    return n_params, n_trainable


def _what_trains(config: TrainConfig, program: TrainProgram) -> str:
    if not isinstance(program, FinetuneProgram):
        return f"stage {config.stage}"
    sizes = {k: v / 2**20 for k, v in program.state_bytes().items()}
    return (
        f"finetune {config.finetune}: frozen base {sizes['params']:.1f} MiB without optimiser "
        f"state, trained {sizes['trained']:.2f} MiB, optimiser state {sizes['opt_state']:.2f} MiB"
    )


def _check_schedule(config: TrainConfig, log: Log) -> None:
    opt = config.optimizer
    updates = config.steps // opt.grad_accum_steps
    if opt.schedule == "cosine" and opt.total_steps is not None and opt.total_steps != updates:
        log(
            f"note: optimizer.total_steps={opt.total_steps} but the run makes {updates} "
            "optimizer updates; the cosine ends at total_steps"
        )
