"""Context parallelism on CPU devices: step time, memory and collective bytes against the
sequence length, for context = 1, 2, 4, 8 (named so as not to shadow the package
`rwkvx_jax.context_parallel`, tests/test_bench_layout.py).

  python bench/context_scaling.py [--lengths 1024,2048,4096] [--contexts 1,2,4,8]
                                   [--steps 3] [--set model.n_embd=256 ...]

A sanity check of how the program scales, NOT of TPU speed: the "devices" are host-platform
CPU devices (`--xla_force_host_platform_device_count=8`) sharing this machine's cores, so a
step with context = 8 runs eight shards on the same cores and is never faster. What carries
over to a TPU slice is what the compiler says per device: the temporaries (XLA's memory
analysis) shrink with the context shards, and the collective bytes of the RWKV-7 part
(`training.collective_bytes` of the compiled step) stay the same whatever the length, while
the sparse-attention part's grow with it (the gathered keys and values).

Each row compiles the train step (`training.TrainProgram`, loss, gradients, AdamW) of two
models of the same shape: plain RWKV-7 (`n_attn_layer=0`) and RWKV-X (its sparse blocks
added). The bytes the shards exchange (every collective but the all-reduce) are split into
the RWKV-7 part and the attention part (RWKV-X minus RWKV-7); the parameter gradients'
all-reduce over the context axis is printed apart (parameter-sized, the same at every T).
Times are the median of `--steps` steps after a warm-up step; context = 1 in the same run is
the baseline of the ratio.
"""

from __future__ import annotations

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import argparse  # noqa: E402
import platform  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402
from timing import median_ms  # noqa: E402

from rwkvx_jax import sharding as shd  # noqa: E402
from rwkvx_jax import training  # noqa: E402
from rwkvx_jax.training.config import TrainConfig, apply_overrides  # noqa: E402

# A small RWKV-X: C 128 (2 heads), 2 RWKV blocks and 2 sparse blocks, chunks of 64, top 3.
MODEL = "model.n_rwkv_layer=2 model.n_attn_layer=2 model.chunk_size=64 data.batch_size=1".split()


def measure(length: int, context: int, attn_layers: int, steps: int, extra: list[str]) -> dict:
    """Compiles and times one step; returns ms, temporaries and collective bytes per device."""
    config = apply_overrides(
        TrainConfig(),
        [*MODEL, f"model.n_attn_layer={attn_layers}", f"data.ctx={length}",
         f"mesh=1,1,1,{context}", "sample.tokens=0", *extra],
    )  # fmt: skip
    mesh = shd.make_mesh(config.mesh, devices=jax.devices()[:context])
    program = training.TrainProgram.create(config, config.model, mesh)
    compiled = program.compile(length)
    tokens = np.random.default_rng(0).integers(0, config.model.vocab_size, (1, length + 1))
    batch = program.global_batch(tokens)
    state = program.init_state()

    def step():
        nonlocal state
        state, metrics = program.step(state, batch)
        return metrics["loss"]

    collectives = training.collective_bytes(compiled.as_text())
    return {
        "ms": median_ms(step, steps),
        "temp": compiled.memory_analysis().temp_size_in_bytes,
        # What the sequence's shards exchange, apart from the parameter gradients' all-reduce
        # over the context axis (parameters are replicated over it: parameter-sized).
        "sequence": sum(collectives.values()) - collectives["all-reduce"],
        "gradients": collectives["all-reduce"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", default="1024,2048,4096")
    parser.add_argument("--contexts", default="1,2,4,8")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--set", nargs="*", default=[], help="train-config overrides")
    args = parser.parse_args()
    lengths = [int(x) for x in args.lengths.split(",")]
    contexts = [int(x) for x in args.contexts.split(",")]
    print(f"{platform.node()}: {os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}, "
          f"jax {jax.__version__}, {len(jax.devices())} CPU devices")  # fmt: skip
    print(
        "T       ctx  step ms (x ctx=1)   temporaries MiB   RWKV-7 bytes   attention bytes"
        "   gradient all-reduce"
    )
    for length in lengths:
        base = None
        for context in contexts:
            rwkv = measure(length, context, 0, args.steps, args.set)
            rwkvx = measure(length, context, 2, args.steps, args.set)
            base = base or rwkvx["ms"]
            print(
                f"{length:<7d} {context:<4d} {rwkvx['ms']:8.0f} ({rwkvx['ms'] / base:4.2f})"
                f"   {rwkvx['temp'] / 2**20:12.1f}   {rwkv['sequence']:12,d}"
                f"   {rwkvx['sequence'] - rwkv['sequence']:14,d}   {rwkvx['gradients']:18,d}"
            )


if __name__ == "__main__":
    main()
