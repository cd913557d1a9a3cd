"""Top-k chunk attention on an accelerator: our Pallas kernel against dense causal flash attention.

  python bench/topk_kernels.py [--seq-lens 16384,65536,131072] [--heads 8] [--dtype bfloat16]
                               [--chunk 2048] [--topk 3] [--repeats 5] [--json FILE] [--quick]

For each T (B = 1, D = 64) it times forward and forward+backward (q, k, v gradients, random
output cotangent) of
  * ours: `pallas_kernels.topk_chunk_attention(backend="pallas_gpu" | "pallas_tpu")`, selection
    included;
  * dense causal flash attention: JAX's Pallas GPU attention (`jax.experimental.pallas.ops.gpu
    .attention.mha`, causal=True) on GPU, splash attention on TPU (not wired up yet: TPU runs
    print ours only);
and prints the ratios dense / ours (> 1: ours is faster) and the fraction of the dense-causal
query-key products our kernels compute (`work_fraction`, padding and whole visited blocks
counted). At the smallest T it also checks ours against the pure-JAX exact-cost version
(`backend="xla_chunked"`, itself tested against the dense oracle) in fp32: output and gradients.
Timings: median of --repeats after a warm-up call, device-synchronised.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import jax
import jax.numpy as jnp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from timing import median_ms, rel_err  # noqa: E402

import pallas_kernels  # noqa: E402
from pallas_kernels.backends import platform_backend  # noqa: E402

D = 64


def inputs(T: int, heads: int, dtype):
    keys = jax.random.split(jax.random.key(T), 4)
    q, k, v, do = (jax.random.normal(key, (1, T, heads, D), jnp.float32) for key in keys)
    return [x.astype(dtype) for x in (q, k, v)], do.astype(dtype)


def ours_fns(backend: str, chunk: int, topk: int):
    def forward(q, k, v):
        return pallas_kernels.topk_chunk_attention(
            q, k, v, chunk_size=chunk, topk=topk, backend=backend
        )

    def loss(q, k, v, do):
        return jnp.vdot(forward(q, k, v).astype(jnp.float32), do.astype(jnp.float32))

    return jax.jit(forward), jax.jit(jax.grad(loss, argnums=(0, 1, 2)))


def dense_fns(backend: str, T: int, heads: int):
    """Dense causal flash attention: Pallas GPU `mha`, or splash attention on TPU."""
    if backend == "pallas_tpu":
        return splash_fns(T, heads)
    from jax.experimental.pallas.ops.gpu import attention

    blocks = attention.BlockSizes(
        block_q=128, block_k=64, block_q_dkv=64, block_kv_dkv=64, block_q_dq=64, block_kv_dq=64
    )

    def forward(q, k, v):
        return attention.mha(q, k, v, None, sm_scale=D**-0.5, causal=True, block_sizes=blocks)

    def loss(q, k, v, do):
        return jnp.vdot(forward(q, k, v).astype(jnp.float32), do.astype(jnp.float32))

    return jax.jit(forward), jax.jit(jax.grad(loss, argnums=(0, 1, 2)))


def splash_fns(T: int, heads: int):
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm

    mask = sm.MultiHeadMask([sm.CausalMask((T, T)) for _ in range(heads)])
    kernel = sk.make_splash_mha(mask, head_shards=1, q_seq_shards=1)

    def forward(q, k, v):  # [1, T, H, D] -> splash's [H, T, D] per batch row
        head_major = lambda x: jnp.swapaxes(x[0], 0, 1)
        out = kernel(head_major(q) * D**-0.5, head_major(k), head_major(v))
        return jnp.swapaxes(out, 0, 1)[None]

    def loss(q, k, v, do):
        return jnp.vdot(forward(q, k, v).astype(jnp.float32), do.astype(jnp.float32))

    return jax.jit(forward), jax.jit(jax.grad(loss, argnums=(0, 1, 2)))


def work_fraction(q, k, chunk: int, topk: int, backend: str) -> float:
    """Fraction of the dense-causal products our kernels compute (forward; backward alike).

    GPU: counted from this input's actual selection (tiles that hold pairs); TPU: the static
    bound of the launched grid, whatever the inputs.
    """
    T = q.shape[1]
    if backend == "pallas_gpu":
        from pallas_kernels.topk_attention import select_chunks
        from pallas_kernels.topk_attention.gpu import gpu_work_fraction

        sel = select_chunks(q, k, chunk, topk)
        return float(gpu_work_fraction(T, chunk_size=chunk, top_k=topk, sel=sel))
    from pallas_kernels.topk_attention.tpu import tpu_work_fraction

    return float(tpu_work_fraction(T, chunk_size=chunk, top_k=topk))


def check_against_xla(T, heads, chunk, topk, backend) -> dict:
    (q, k, v), do = inputs(T, heads, jnp.float32)
    results = {}
    for name in (backend, "xla_chunked"):
        forward, grads = ours_fns(name, chunk, topk)
        results[name] = (forward(q, k, v), *grads(q, k, v, do))
    labels = ("o", "dq", "dk", "dv")
    return {
        label: rel_err(a, b)
        for label, a, b in zip(labels, results[backend], results["xla_chunked"], strict=True)
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seq-lens", default="16384,65536,131072")
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--chunk", type=int, default=2048)
    parser.add_argument("--topk", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--check-seq-len", type=int, default=16384)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--quick", action="store_true", help="T=8192, 2 heads, 2 repeats")
    args = parser.parse_args()
    if args.quick:
        args.seq_lens, args.heads, args.repeats, args.check_seq_len = "8192", 2, 2, 8192
    platform = jax.default_backend()
    if platform not in ("gpu", "tpu"):
        sys.exit("bench/topk_kernels.py times accelerator kernels; this JAX sees no GPU or TPU")
    backend = platform_backend(platform)
    dtype = jnp.dtype(args.dtype)
    device = jax.devices()[0].device_kind
    print(f"# top-k chunk attention: {device}, jax {jax.__version__}, chunk {args.chunk}, "
          f"top-k {args.topk}, H {args.heads}, D {D}, {args.dtype}")  # fmt: skip
    results = []
    check = check_against_xla(args.check_seq_len, args.heads, args.chunk, args.topk, backend)
    print(f"fp32 check at T={args.check_seq_len}, ours vs xla exact-cost version (max rel "
          "diff): " + ", ".join(f"{k} {v:.1e}" for k, v in check.items()))  # fmt: skip
    results.append({"check_T": args.check_seq_len, **check})
    print("\n| T | work fraction | ours fwd ms | ours f+b ms | dense fwd ms | dense f+b ms "
          "| dense/ours fwd | dense/ours f+b |")  # fmt: skip
    print("|---" * 8 + "|")
    for T in map(int, args.seq_lens.split(",")):
        (q, k, v), do = inputs(T, args.heads, dtype)
        row = {"T": T, "work_fraction": work_fraction(q, k, args.chunk, args.topk, backend)}
        impls = {"ours": ours_fns(backend, args.chunk, args.topk),
                 "dense": dense_fns(backend, T, args.heads)}  # fmt: skip
        for name, (forward, grads) in impls.items():
            row.update(time_impl(name, forward, grads, (q, k, v), do, args.repeats))
        print(table_row(row), flush=True)
        results.append(row)
        if args.json:
            args.json.write_text(json.dumps(results, indent=1))


def time_impl(name, forward, grads, qkv, do, repeats) -> dict:
    """{name_fwd_ms, name_fwd_bwd_ms}, or {name_error} if the implementation fails."""
    try:
        return {
            f"{name}_fwd_ms": median_ms(lambda: forward(*qkv), repeats),
            f"{name}_fwd_bwd_ms": median_ms(lambda: grads(*qkv, do), repeats),
        }
    except Exception as error:  # keep the other measurements
        message = f"{type(error).__name__}: {error}"[:2000]
        print(f"{name} failed: {message[:300]}")
        return {f"{name}_error": message}


def table_row(row: dict) -> str:
    cell = lambda key: f"{row[key]:.2f}" if key in row else "-"
    ratio = lambda a, b: f"{row[a] / row[b]:.2f}x" if a in row and b in row else "-"
    cells = [
        str(row["T"]), f"{row['work_fraction']:.1%}", cell("ours_fwd_ms"),
        cell("ours_fwd_bwd_ms"), cell("dense_fwd_ms"), cell("dense_fwd_bwd_ms"),
        ratio("dense_fwd_ms", "ours_fwd_ms"), ratio("dense_fwd_bwd_ms", "ours_fwd_bwd_ms"),
    ]  # fmt: skip
    return "| " + " | ".join(cells) + " |"


if __name__ == "__main__":
    main()
