"""Train RWKV-X: the tiny default on CPU, or the stage-1 / stage-2 recipes on accelerators.

python train.py                                   # the `tiny` recipe in runs/tiny (resumes)
python train.py --config 0.22b-stage1 data.corpus=/data/minipile_text_document
python train.py --config my_run.json --workdir runs/exp1 --steps 2000 optimizer.lr=3e-4
python train.py --list                            # recipes and their settings

Overrides are `key=value` with dotted keys (`data.ctx=256`, `mesh=2,2,2`, `model=rwkvx-0.22b`,
`model.dtype=bfloat16`); values are checked against the field types in
rwkvx_jax/train_config.py. Running again with the same workdir resumes from its last checkpoint.
Multi-host: start one process per host with --distributed. On TPU pods, SLURM and Open MPI
JAX finds the coordinator itself; elsewhere add --coordinator HOST:PORT --num-processes N
--process-id I (I = 0 .. N-1). Every process reads its own rows of each global batch.
"""

from __future__ import annotations

import argparse
import sys

from rwkvx_jax.config import ConfigError
from rwkvx_jax.train_config import (
    RECIPES,
    TrainConfigError,
    apply_overrides,
    load_config,
    recipe,
)


def parse_args(argv):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides")
    parser.add_argument(
        "--config", default="tiny", help=f"a recipe ({', '.join(RECIPES)}) or a JSON file"
    )
    parser.add_argument("--workdir", help="run directory (default: the recipe's, runs/<name>)")
    parser.add_argument("--steps", type=int, help="total training steps")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--no-sample", action="store_true", help="skip the sample at the end")
    parser.add_argument(
        "--distributed", action="store_true", help="call jax.distributed.initialize() first"
    )
    parser.add_argument("--coordinator", help="HOST:PORT of process 0 (with --distributed)")
    parser.add_argument("--num-processes", type=int, help="processes in the job")
    parser.add_argument("--process-id", type=int, help="this process's index")
    parser.add_argument(
        "--aot-topology",
        metavar="TOPOLOGY",
        help="only compile the train step for a TPU slice, e.g. v5p:4x4x2 (= v5p-64), and "
        "print its memory analysis (needs libtpu, not the hardware)",
    )
    parser.add_argument("--list", action="store_true", help="print the recipes and exit")
    parser.add_argument("--print-config", action="store_true", help="print the config and exit")
    return parser.parse_args(argv)


def build_config(args):
    config = load_config(args.config)
    overrides = list(args.overrides)
    if args.workdir is not None:
        overrides.append(f"workdir={args.workdir}")
    if args.steps is not None:
        overrides.append(f"steps={args.steps}")
    return apply_overrides(config, overrides)


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.list:
        for name in RECIPES:
            print(f"--- {name}\n{recipe(name).to_json()}")
        return 0
    try:
        config = build_config(args)
    except (TrainConfigError, ConfigError) as err:
        print(f"train.py: config error: {err}", file=sys.stderr)
        return 2
    if args.print_config:
        print(config.to_json())
        return 0

    import jax

    if args.distributed:
        jax.distributed.initialize(args.coordinator, args.num_processes, args.process_id)
    from rwkvx_jax import train_lib

    if args.aot_topology:
        return aot(config, args.aot_topology)
    try:
        result = train_lib.train(config, progress=not args.no_progress)
    except train_lib.NonFiniteError as err:
        print(f"train.py: stopped: {err}", file=sys.stderr)
        return 3
    except (TrainConfigError, ConfigError, FileNotFoundError) as err:
        print(f"train.py: {err}", file=sys.stderr)
        return 2
    if config.sample.tokens and not args.no_sample and jax.process_index() == 0:
        text = train_lib.sample_text(
            result.model_config, result.state["params"], config.sample.prompt, config.sample.tokens
        )
        print(f"\ngreedy sample after {result.final_step} steps:\n{config.sample.prompt}{text}")
    return 0


def aot(config, topology: str) -> int:
    import time

    import jax

    from rwkvx_jax import train_lib

    try:
        devices = train_lib.tpu_topology_devices(topology)
    except RuntimeError as err:
        print(f"train.py: {err}", file=sys.stderr)
        return 2
    start = time.perf_counter()
    try:
        program, compiled = train_lib.aot_compile(config, devices)
    except jax.errors.JaxRuntimeError as err:
        if "RESOURCE_EXHAUSTED" not in str(err):
            raise
        print(f"train.py: {config.name} does not fit {topology}: {err}", file=sys.stderr)
        return 1
    print(
        f"{config.name}: compiled the train step for {topology} ({len(devices)} chips, mesh "
        f"{dict(program.mesh.shape)}, batch {config.data.batch_size} x ctx {config.data.ctx}) "
        f"in {time.perf_counter() - start:.0f} s"
    )
    print(train_lib.describe_memory(compiled))
    return 0


if __name__ == "__main__":
    sys.exit(main())
