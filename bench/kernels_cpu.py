"""CPU timings of the pure-JAX kernels against their baselines, measured in the same run.

  python bench/kernels_cpu.py [--seq-len 4096] [--long-seq-len 16384]

WKV-7: the chunked custom-VJP form vs the lax.scan reference, forward and forward+backward.
Top-k chunk attention: the default ("pairs") vs a naive dense softmax at T = seq-len (dense
regime), and vs the dense-by-block variant ("blocks") at T = long-seq-len (sparse regime).
Prints best-of-N milliseconds and ratios.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
from timing import best_seconds

from pallas_kernels.topk_attention.xla_chunked import topk_chunk_attention
from pallas_kernels.wkv7 import wkv7_chunked, wkv7_reference


def best_ms(fn, *args, repeats: int = 3) -> float:
    return 1e3 * best_seconds(lambda: fn(*args), repeats)


def wkv_inputs(key, T: int, H: int = 12, N: int = 64):
    keys = jax.random.split(key, 5)
    shape = (1, T, H, N)
    r, k, v = (jax.random.normal(keys[i], shape) for i in range(3))
    w = -0.6065 * jax.nn.sigmoid(jax.random.normal(keys[3], shape))
    kk = jax.random.normal(keys[4], shape)
    kk = kk / jnp.linalg.norm(kk, axis=-1, keepdims=True)
    return r, w, k, v, -kk, 0.5 * kk


def forward_and_backward(fn):
    def loss(*args):
        y, state = fn(*args)
        return jnp.sum(y * y) + jnp.sum(state)

    return jax.jit(jax.grad(loss, argnums=tuple(range(6))))


def attention_inputs(T: int, H: int = 12, D: int = 64):
    return tuple(jax.random.normal(jax.random.PRNGKey(i), (1, T, H, D)) for i in range(3))


def naive_dense_causal(q, k, v):
    scale = q.shape[-1] ** -0.5
    s = jnp.einsum("bqhd,bkhd->bhqk", q, k) * scale
    T = q.shape[1]
    s = jnp.where(jnp.tri(T, dtype=bool), s, -jnp.inf)
    return jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(s, axis=-1), v)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seq-len", type=int, default=4096)
    parser.add_argument("--long-seq-len", type=int, default=16384)
    args = parser.parse_args()
    print(f"jax {jax.__version__} on {jax.default_backend()}; B=1, H=12, head 64, fp32")

    inputs = wkv_inputs(jax.random.PRNGKey(0), args.seq_len)
    ref, chunked = jax.jit(wkv7_reference), jax.jit(wkv7_chunked)
    rows = [
        ("wkv7 forward", best_ms(ref, *inputs), best_ms(chunked, *inputs), "scan"),
        (
            "wkv7 forward+backward",
            best_ms(forward_and_backward(wkv7_reference), *inputs, repeats=1),
            best_ms(forward_and_backward(wkv7_chunked), *inputs),
            "scan",
        ),
    ]

    q, k, v = attention_inputs(args.seq_len)
    attend = jax.jit(lambda q, k, v: topk_chunk_attention(q, k, v, chunk_size=2048, top_k=3))
    rows.append(
        (
            f"attention T={args.seq_len} forward",
            best_ms(jax.jit(naive_dense_causal), q, k, v),
            best_ms(attend, q, k, v),
            "naive dense",
        )
    )
    T = args.long_seq_len
    q, k, v = attention_inputs(T)
    blocks = jax.jit(
        lambda q, k, v: topk_chunk_attention(q, k, v, chunk_size=2048, top_k=3, method="blocks")
    )
    rows.append(
        (
            f"attention T={T} forward",
            best_ms(blocks, q, k, v, repeats=1),
            best_ms(attend, q, k, v, repeats=1),
            '"blocks"',
        )
    )

    print("\n| kernel | baseline | baseline ms | ours ms | speed-up |")
    print("|---|---|---|---|---|")
    for name, base, ours, base_name in rows:
        print(f"| {name} | {base_name} | {base:.0f} | {ours:.0f} | {base / ours:.2f}x |")


if __name__ == "__main__":
    main()
