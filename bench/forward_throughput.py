"""CPU forward (prefill) throughput: rwkvx-jax vs the official runtime on the same weights.

  python bench/forward_throughput.py [--preset rwkvx-0.22b] [--seq-len 4096] [--repeats 3]

Random weights in the official layout are written once to a .pth, loaded by both sides. The
official runtime (`rwkv-x==0.2.7`, "cpu fp32") is timed in the same run, and so is this machine's
fp32 matmul rate, giving the model's matmul-bound ceiling. Prints tokens/s and the ratios.
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile

os.environ.setdefault("RWKV_CUDA_ON", "0")

import jax
import jax.numpy as jnp
import numpy as np
from timing import best_seconds, seconds

from rwkvx_jax import forward, preset
from rwkvx_jax.checkpoints.official_layout import params_from_state_dict
from rwkvx_jax.checkpoints.random_weights import random_state_dict
from rwkvx_jax.checkpoints.tensor_files import write_pth


def matmul_flops_per_token(config) -> float:
    """2 x (matmul weights touched per token): the linear layers and the head, no attention."""
    C, L, A = config.n_embd, config.n_rwkv_layer, config.n_attn_layer
    lora = config.dim_w + config.dim_a + config.dim_v + config.dim_g
    rwkv = 4 * C * C + 8 * C * C + 2 * C * lora
    sparse = 4 * C * C + 8 * C * C
    return 2.0 * (L * rwkv + A * sparse + config.vocab_size * C)


def measure_matmul_rate(n: int = 2048, repeats: int = 7) -> float:
    """Best-of-`repeats` fp32 FLOP/s of a large square matmul on this machine, now.

    The best, not the mean: one slow repeat (another job taking a core) must not lower the
    ceiling, which would flatter the ratios against it.
    """
    a = jnp.ones((n, n), jnp.float32)
    f = jax.jit(lambda x: x @ x)
    return 2.0 * n**3 / best_seconds(lambda: f(a), repeats)


def time_ours(config, params, tokens, repeats: int) -> tuple[float, float]:
    """(compile + first call seconds, best steady-state seconds)."""
    first = seconds(forward, config, params, tokens)
    return first, best_seconds(lambda: forward(config, params, tokens), repeats, warmup=0)


def time_official(path: str, tokens: np.ndarray, repeats: int) -> float:
    """Best-of-`repeats` seconds of the official runtime's full-sequence forward."""
    import torch
    from rwkv_x import model_old

    model = model_old.RWKV_X(path, "cpu fp32")
    with torch.no_grad():
        return best_seconds(
            lambda: model.forward(tokens.tolist(), None, full_output=True),
            repeats,
            sync=None,
            warmup=0,
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--preset", default="rwkvx-0.22b")
    parser.add_argument("--seq-len", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of ours (best)")
    parser.add_argument(
        "--official-repeats", type=int, default=2, help="timed runs of the official (best)"
    )
    parser.add_argument("--skip-official", action="store_true")
    args = parser.parse_args()

    config = preset(args.preset)
    state_dict = random_state_dict(config, seed=0)
    tokens = np.random.default_rng(0).integers(0, config.vocab_size, size=(1, args.seq_len))
    T = args.seq_len
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"jax {jax.__version__} on {jax.default_backend()}")  # fmt: skip
    print(f"model: {args.preset} (L={config.n_rwkv_layer}, A={config.n_attn_layer}, "
          f"C={config.n_embd}), T={T}, batch 1, random weights")  # fmt: skip

    rate = measure_matmul_rate()
    ceiling = rate / matmul_flops_per_token(config)
    print(f"fp32 matmul rate {rate / 1e9:.1f} GFLOP/s -> matmul-bound ceiling "
          f"{ceiling:.0f} tok/s")  # fmt: skip

    rows = []
    for dtype in ("float32", "bfloat16"):
        cfg = config.replace(dtype=dtype, param_dtype=dtype)
        params = jax.tree.map(jnp.asarray, params_from_state_dict(state_dict, cfg))
        first, best = time_ours(cfg, params, tokens, args.repeats)
        rows.append((f"rwkvx-jax {dtype}", T / best, first))
        print(f"  rwkvx-jax {dtype}: {T / best:.0f} tok/s (first call {first:.1f}s)")
        del params

    official_tps = None
    if not args.skip_official:
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "bench.pth")
            write_pth(path, state_dict)
            seconds = time_official(path, tokens[0], args.official_repeats)
        official_tps = T / seconds
        rows.append(("official rwkv-x 0.2.7 fp32", official_tps, None))
        print(f"  official fp32: {official_tps:.0f} tok/s")

    print("\n| implementation | tok/s | vs official | vs matmul ceiling |")
    print("|---|---|---|---|")
    for name, tps, _ in rows:
        vs_official = f"{tps / official_tps:.2f}x" if official_tps else "n/a"
        print(f"| {name} | {tps:.0f} | {vs_official} | {tps / ceiling:.0%} |")


if __name__ == "__main__":
    main()
