"""Memory and step time of LoRA and state tuning against full fine-tuning, one CPU run.

  python bench/finetune_cost.py [--model rwkv7-world-0.1b] [--seq-len 512] [--batch 1]
                                [--steps 3] [--rank 8]

Three programs on one CPU device, fp32, built from the `tiny` recipe with the model, context and
batch overridden, from the same random base params and random tokens (no data pipeline, no
checkpoints):
  full   `TrainProgram`, every param trained (AdamW moments for all of them);
  lora   `FinetuneProgram`, finetune=lora, rank `--rank` on every default target;
  state  `FinetuneProgram`, finetune=state (the WKV states).
For each: trained params, optimiser state bytes, XLA's memory analysis of the compiled step
(arguments, temporaries) and the step time (best and median of `--steps` after one warm-up
step), and each figure's ratio to full fine-tuning. On a machine shared with other jobs the step
times depend on their load: compare within one run.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics

import jax
import jax.numpy as jnp
import numpy as np
from timing import call_seconds

from rwkvx_jax import sharding as shd
from rwkvx_jax.model import RWKVX
from rwkvx_jax.training.config import apply_overrides, recipe
from rwkvx_jax.training.finetune import FinetuneProgram, tree_bytes
from rwkvx_jax.training.program import TrainProgram, init_params_fn

METHODS = {
    "full": [],
    "lora": ["finetune=lora"],
    "state": ["finetune=state"],
}


def _mib(n: float) -> str:
    return f"{n / 2**20:,.1f} MiB"


def bench_method(name: str, args, params, tokens, mesh) -> dict:
    overrides = [
        f"model={args.model}", "model.dtype=float32", "model.param_dtype=float32",
        f"data.ctx={args.seq_len}", f"data.batch_size={args.batch}", "mesh=1,1,1",
        "init_checkpoint=random-base", f"lora.rank={args.rank}", *METHODS[name],
    ]  # fmt: skip
    config = apply_overrides(recipe("tiny"), overrides)
    program_type = FinetuneProgram if name != "full" else TrainProgram
    program = program_type.create(config, config.model, mesh)
    compiled = program.compile(args.seq_len)
    memory = compiled.memory_analysis()
    state = {"now": program.init_state(params)}
    batch = program.global_batch(tokens)

    def step():
        state["now"], metrics = program.step(state["now"], batch)
        return metrics["loss"]

    times = call_seconds(step, args.steps)
    abstract = program.abstract_state
    if name == "full":
        trained = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(abstract["params"]))
    else:
        trained = program.parameter_counts()[1]
    result = {
        "trained params": trained,
        "optimiser state": tree_bytes(abstract["opt_state"]),
        "arguments": memory.argument_size_in_bytes,
        "temporaries": memory.temp_size_in_bytes,
        "step best s": min(times),
        "step median s": statistics.median(times),
    }
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="rwkv7-world-0.1b")
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--rank", type=int, default=8)
    args = parser.parse_args()
    mesh = shd.make_mesh((1, 1, 1), devices=jax.devices()[:1])
    config = apply_overrides(recipe("tiny"), [f"model={args.model}"])
    model = RWKVX(config.model)
    params = jax.tree.map(np.asarray, jax.jit(init_params_fn(model))(jax.random.key(0)))
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, config.model.vocab_size, (args.batch, args.seq_len + 1))
    print(f"# finetune_cost: {args.model}, T={args.seq_len}, batch {args.batch}, fp32, "
          f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"load {os.getloadavg()[0]:.1f}, jax {jax.__version__}")  # fmt: skip
    results = {}
    for name in METHODS:
        results[name] = bench_method(name, args, params, jnp.asarray(tokens), mesh)
        jax.clear_caches()
        print(f"  {name}: done ({results[name]['step best s']:.2f} s/step best)", flush=True)
    full = results["full"]
    print("\n| method | trained params | optimiser state | arguments | temporaries | step (best) "
          "| step (median) |")  # fmt: skip
    print("|---|---|---|---|---|---|---|")
    for name, r in results.items():

        def ratio(key, r=r, name=name):
            return f" ({r[key] / full[key]:.3f}x)" if name != "full" else ""

        print(
            f"| {name} | {r['trained params']:,}{ratio('trained params')} | "
            f"{_mib(r['optimiser state'])}{ratio('optimiser state')} | "
            f"{_mib(r['arguments'])}{ratio('arguments')} | "
            f"{_mib(r['temporaries'])}{ratio('temporaries')} | "
            f"{r['step best s']:.2f} s{ratio('step best s')} | "
            f"{r['step median s']:.2f} s{ratio('step median s')} |"
        )


if __name__ == "__main__":
    main()
