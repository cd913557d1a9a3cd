"""Train RWKV-X: the tiny default on CPU, or the stage-1 / stage-2 recipes on accelerators.

python train.py                                   # the `tiny` recipe in runs/tiny (resumes)
python train.py --config 0.22b-stage1 data.corpus=/data/minipile_text_document
python train.py --config my_run.json --workdir runs/exp1 --steps 2000 optimizer.lr=3e-4
python train.py --list                            # recipes and their settings
python train.py finetune=lora init_checkpoint=model.pth model=rwkv7-world-0.1b \
    data.corpus=chat.jsonl data.records=chat        # fine-tune (README: Fine-tuning)

(`rwkvx-train` and `python -m rwkvx_jax.train` are the same command.)

Overrides are `key=value` with dotted keys (`data.ctx=256`, `mesh=2,2,2`, `model=rwkvx-0.22b`,
`model.dtype=bfloat16`); values are checked against the field types in
rwkvx_jax/training/config.py. Running again with the same workdir resumes from its last
checkpoint. Multi-host: start one process per host with --distributed. On TPU pods, SLURM and
Open MPI JAX finds the coordinator itself; elsewhere add --coordinator HOST:PORT
--num-processes N --process-id I (I = 0 .. N-1). Every process reads its own rows of each
global batch.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import signal
import sys
import threading
import time
from collections.abc import Sequence

import jax

from rwkvx_jax import training
from rwkvx_jax.cli import Parser, RunFailed, UsageError, run_cli
from rwkvx_jax.training.config import RECIPES, apply_overrides, load_config, recipe
from rwkvx_jax.training.state_tuning import STATE_FILE

PROG = "train.py"


def parse_args(argv: Sequence[str] | None):
    parser = Parser(prog=PROG, description=__doc__)
    add = parser.add_argument
    add("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides")
    add("--config", default="tiny", help=f"a recipe ({', '.join(RECIPES)}) or a JSON file")
    add("--workdir", help="run directory (default: the recipe's, runs/<name>)")
    add("--steps", type=int, help="total training steps")
    add("--no-progress", action="store_true", help="no progress bar")
    add("--no-sample", action="store_true", help="skip the sample at the end")
    add("--distributed", action="store_true", help="call jax.distributed.initialize() first")
    add("--coordinator", help="HOST:PORT of process 0 (with --distributed)")
    add("--num-processes", type=int, help="processes in the job")
    add("--process-id", type=int, help="this process's index")
    add(
        "--aot-topology",
        metavar="TOPOLOGY",
        help="only compile the train step for a TPU slice, e.g. v5p:4x4x2 (= v5p-64), and "
        "print its memory analysis (needs libtpu, not the hardware)",
    )
    add("--list", action="store_true", help="print the recipes and exit")
    add("--print-config", action="store_true", help="print the config and exit")
    return parser.parse_args(argv)


def build_config(args):
    """The run's `TrainConfig`: --config, then the overrides, --workdir and --steps."""
    config = load_config(args.config)
    overrides = list(args.overrides)
    if args.workdir is not None:
        overrides.append(f"workdir={args.workdir}")
    if args.steps is not None:
        overrides.append(f"steps={args.steps}")
    return apply_overrides(config, overrides)


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the command line; returns the exit status (`rwkvx_jax.cli` conventions)."""
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.list:
        for name in RECIPES:
            print(f"--- {name}\n{recipe(name).to_json()}")
        return 0
    hint = "run the same command again to resume from the last checkpoint"  # after Ctrl-C
    return run_cli(PROG, lambda: _run(args), resume_hint=hint)


def _run(args) -> None:
    config = build_config(args)
    if args.print_config:
        print(config.to_json())
        return
    if args.distributed:
        jax.distributed.initialize(args.coordinator, args.num_processes, args.process_id)
    if args.aot_topology:
        _aot(config, args.aot_topology)
        return
    try:
        with _stop_on_ctrl_c() as stop_requested:
            result = training.train(
                config, progress=not args.no_progress, stop_requested=stop_requested
            )
    except training.NonFiniteError as err:
        raise RunFailed(str(err)) from None
    sample = config.sample
    if sample.tokens and not args.no_sample and jax.process_index() == 0:
        params, state = result.inference()
        text = training.sample_text(result.model_config, params, sample, state)
        print(
            f"\nsample after {result.final_step} steps (temperature {sample.temperature}, "
            f"top-p {sample.top_p}):\n{sample.prompt}{text}"
        )
    if result.export_dir and jax.process_index() == 0:
        model = f"--checkpoint {shlex.quote(result.workdir)}"
        if config.finetune == "state":
            state_file = os.path.join(result.export_dir, STATE_FILE)
            base = config.init_checkpoint
            base = shlex.quote(base) if os.path.isdir(base) else "BASE_CONVERTED_FOLDER"
            model = f"--checkpoint {base} --state-in {shlex.quote(state_file)}"
        print(
            f"\ngenerate more from this run: python -m rwkvx_jax.generate {model} --prompt "
            f"{shlex.quote(sample.prompt)}"
        )


@contextlib.contextmanager
def _stop_on_ctrl_c():
    """While training, the first Ctrl-C asks the loop to stop after the current step with a
    checkpoint (so nothing is lost and nothing is half-written); a second one stops at once.
    Yields the question the loop asks after each step. Multi-process runs keep Python's
    default: one process must not leave the others waiting in a collective."""
    requested = threading.Event()
    if jax.process_count() > 1 or threading.current_thread() is not threading.main_thread():
        yield requested.is_set
        return

    def on_ctrl_c(signum, frame):
        if requested.is_set():
            raise KeyboardInterrupt
        requested.set()
        from tqdm.auto import tqdm

        tqdm.write(
            f"{PROG}: stopping after this step, with a checkpoint (Ctrl-C again: at once)",
            file=sys.stderr,
        )

    previous = signal.signal(signal.SIGINT, on_ctrl_c)
    try:
        yield requested.is_set
    finally:
        signal.signal(signal.SIGINT, previous)


def _aot(config, topology: str) -> None:
    try:
        devices = training.tpu_topology_devices(topology)
    except RuntimeError as err:
        raise UsageError(str(err)) from None
    start = time.perf_counter()
    try:
        program, compiled = training.aot_compile(config, devices)
    except jax.errors.JaxRuntimeError as err:
        if "RESOURCE_EXHAUSTED" not in str(err):
            raise
        raise RunFailed(f"{config.name} does not fit {topology}: {err}") from None
    print(
        f"{config.name}: compiled the train step for {topology} ({len(devices)} chips, mesh "
        f"{dict(program.mesh.shape)}, batch {config.data.batch_size} x ctx {config.data.ctx}) "
        f"in {time.perf_counter() - start:.0f} s"
    )
    print(training.describe_memory(compiled))
    print(training.describe_collectives(compiled))


if __name__ == "__main__":
    sys.exit(main())
