"""The RWKV-X model on an accelerator: its Pallas kernels (backend "auto") against XLA, same run.

  python bench/model_accelerator.py [--seq-len 16384] [--layers 2,1] [--vocab 4096] [--repeats 3]

Builds a 0.22B-width RWKV-X slice (C = 768, head size 64, chunk 2048, top-k 3; by default 2
RWKV-7 blocks + 1 sparse block and a 4096-token vocabulary, so the kernels dominate) with
random weights, then:
  1. fp32 (matmul precision "highest"): logits and every parameter gradient of the mean
     cross-entropy with `wkv_backend = attention_backend = "auto"` (which must resolve to the
     Pallas kernels here) against "xla_chunked": max |difference| / max |reference|;
  2. bf16 compute: forward and forward+backward time of the loss for both, and the ratio.
This shows the model reaching the kernels through `rwkvx_jax.ops` on the device.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import optax

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from timing import median_ms  # noqa: E402

from rwkvx_jax import RWKVX, ops, preset  # noqa: E402


def loss_fns(config):
    model = RWKVX(config)

    def loss(params, tokens):
        logits = model.apply({"params": params}, tokens[:, :-1]).astype(jnp.float32)
        return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()

    return jax.jit(loss), jax.jit(jax.value_and_grad(loss))


def max_rel(got, want) -> float:
    leaves = zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True)
    return max(
        float(jnp.max(jnp.abs(g.astype(jnp.float32) - w.astype(jnp.float32))))
        / max(float(jnp.max(jnp.abs(w.astype(jnp.float32)))), 1e-30)
        for g, w in leaves
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seq-len", type=int, default=16384)
    parser.add_argument("--layers", default="2,1", help="RWKV-7 blocks, sparse blocks")
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    if jax.default_backend() not in ("gpu", "tpu"):
        sys.exit("bench/model_accelerator.py needs a GPU or TPU")
    n_rwkv, n_attn = map(int, args.layers.split(","))
    base = preset("rwkvx-0.22b", vocab_size=args.vocab, n_rwkv_layer=n_rwkv, n_attn_layer=n_attn)
    resolved = ops.resolve_backend("auto")
    print(f"# model slice on {jax.devices()[0].device_kind}, jax {jax.__version__}: "
          f"L={n_rwkv} A={n_attn} C={base.n_embd} V={args.vocab} T={args.seq_len}; "
          f"'auto' resolves to {resolved}")  # fmt: skip
    tokens = jax.random.randint(jax.random.key(0), (1, args.seq_len + 1), 0, args.vocab)
    params = jax.jit(RWKVX(base).init)(jax.random.key(1), tokens[:, :64])["params"]

    with jax.default_matmul_precision("highest"):
        results = {}
        for backend in ("auto", "xla_chunked"):
            config = base.replace(wkv_backend=backend, attention_backend=backend)
            results[backend] = loss_fns(config)[1](params, tokens)
    (loss_a, grads_a), (loss_x, grads_x) = results["auto"], results["xla_chunked"]
    print(f"fp32: loss {float(loss_a):.6f} (auto) vs {float(loss_x):.6f} (xla_chunked); "
          f"max rel diff of the parameter gradients {max_rel(grads_a, grads_x):.2e}")  # fmt: skip

    times = {}
    for backend in ("auto", "xla_chunked"):
        config = base.replace(wkv_backend=backend, attention_backend=backend, dtype="bfloat16")
        loss, both = loss_fns(config)
        times[backend] = (
            median_ms(lambda loss=loss: loss(params, tokens), args.repeats),
            median_ms(lambda both=both: both(params, tokens), args.repeats),
        )
        print(f"bf16 {backend}: loss {times[backend][0]:.1f} ms, "
              f"loss+grads {times[backend][1]:.1f} ms", flush=True)  # fmt: skip
    fwd_ratio = times["xla_chunked"][0] / times["auto"][0]
    both_ratio = times["xla_chunked"][1] / times["auto"][1]
    print(f"xla_chunked / auto ({resolved}): forward {fwd_ratio:.2f}x, "
          f"forward+backward {both_ratio:.2f}x")  # fmt: skip


if __name__ == "__main__":
    main()
