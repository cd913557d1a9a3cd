"""What both experimental WKV-7 GPU schedules share: kernels over a grid of (batch x head,
chunk), their gradient kernel, token-major block specs and XLA's batched exact products.

The chunk-parallel (`chunk_parallel`) and factored (`factored`) schedules compute each chunk's
terms in parallel over chunks, with one program per (B*H, chunk) (`over_chunks`), and make the
input gradients the same way (`gradient_call`) from each chunk's start state and end cotangent.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels.wkv7.gpu_chunk import (
    chunk_gradients,
    chunk_terms,
    compiler_params,
    split_bf16_dot,
    sum_tiles,
)


def load_blocks(*refs):
    """Each ref's whole block, in fp32."""
    return tuple(ref[...].astype(jnp.float32) for ref in refs)


def token_major_spec(heads, rows, cols, index):
    """BlockSpec of a [rows, cols] block of one (batch x head) in a token-major [B, Tp, H, N]
    array; index(*grid ids) -> (batch x head, row block, column block)."""

    def block(*ids):
        bh, row, col = index(*ids)
        return bh // heads, row, lax.rem(bh, heads), col

    return pl.BlockSpec((None, rows, None, cols), block)


def over_chunks(cfg, kernel, name, args, out_kinds, out_dtypes=None, *, token_major=False):
    """pallas_call of kernel over the grid (BH, chunks).

    [BH, Tp, N] arguments come in as one chunk of tokens [C, N] (with token_major, the
    arguments are [B, Tp, H, N] inputs, read the same way), [BH, chunks, N, N] ones as one
    chunk's matrix [N, N]; the outputs are head-major, of out_kinds ("tokens" / "matrix" /
    "row", [BH, chunks, 1, N] as one chunk's [1, N]) and out_dtypes (None: all fp32).
    """
    if token_major:
        batch, seq, heads, n = args[0].shape
        bh = batch * heads
    else:
        bh, seq, n = args[0].shape
    n_chunks = seq // cfg.chunk
    specs = {
        "tokens": pl.BlockSpec((None, cfg.chunk, n), lambda i, j: (i, j, 0)),
        "matrix": pl.BlockSpec((None, None, n, n), lambda i, j: (i, j, 0, 0)),
        "row": pl.BlockSpec((None, None, 1, n), lambda i, j: (i, j, 0, 0)),
    }
    shapes = {"tokens": (bh, seq, n), "matrix": (bh, n_chunks, n, n), "row": (bh, n_chunks, 1, n)}
    if token_major:
        in_specs = [token_major_spec(heads, cfg.chunk, n, lambda i, j: (i, j, 0))] * len(args)
    else:
        in_specs = [specs["tokens" if x.ndim == 3 else "matrix"] for x in args]
    dtypes = out_dtypes or (jnp.float32,) * len(out_kinds)
    return pl.pallas_call(
        partial(kernel, dots=cfg.dots),
        grid=(bh, n_chunks),
        in_specs=in_specs,
        out_specs=[specs[k] for k in out_kinds],
        out_shape=[
            jax.ShapeDtypeStruct(shapes[k], dt) for k, dt in zip(out_kinds, dtypes, strict=True)
        ],
        compiler_params=compiler_params(cfg),
        interpret=cfg.interpret,
        name=name,
    )(*args)


def exact_matmul(x, y, precision):
    """Batched [..., R, N] x [..., N, N] products; they feed the carried state or cotangent, so
    they take the kernels' exact-dot precision: the same hi / lo split for "bf16x3" (bf16
    tensor-core GEMMs in XLA on a GPU), IEEE fp32 otherwise (also for "tf32x3", which XLA on
    a CPU cannot run)."""
    product = partial(jnp.einsum, "...ij,...jk->...ik", preferred_element_type=jnp.float32)
    if precision == "bf16x3":
        return split_bf16_dot(product, x, y)
    return product(x, y, precision=lax.Precision.HIGHEST)


# --------------------------------------------------------------------------------------------
# The gradients of every chunk and value tile.


def _gradient_kernel(r_ref, w_ref, k_ref, v_ref, a_ref, b_ref, dy_ref, start_ref, end_cot_ref,
                     dr_ref, dw_ref, dk_ref, dv_ref, da_ref, db_ref, *, dots):  # fmt: skip
    """One chunk and value tile: v, dy, dv [C, VT], start / end cotangent rows [VT, N]; the
    key-side gradients are this tile's partial sums."""
    r, w, k, v, a, b = load_blocks(r_ref, w_ref, k_ref, v_ref, a_ref, b_ref)
    t = chunk_terms(dots, r, w, k, a, b)
    grads, _ = chunk_gradients(
        dots, t, r, k, v, a, b, dy_ref[...], start_ref[...], end_cot_ref[...]
    )
    for ref, grad in zip((dr_ref, dw_ref, dk_ref, dv_ref, da_ref, db_ref), grads, strict=True):
        ref[...] = grad.astype(ref.dtype)


def gradient_call(cfg, xs, dy, starts, end_cots):
    """(dr, dw, dk, dv, da, db) over the grid (BH, chunks, value tiles): [BH, Tp, N] fp32 for
    head-major xs and dy; for token-major ones, [B, Tp, H, N] in the inputs' dtypes when the
    kernel writes them whole (dv always, the key-side ones with one tile), else fp32 sums.

    With full rows the kernel holds S and dS' [N, N] beside some twenty [C, N] terms; on an
    H100 the backward with full rows took 9x the forward at B*H = 64 (docs/BENCHMARKS.md),
    while its terms kernel and scan mirror the forward's, so this kernel is the suspect. A tile
    of cfg.gradient_value_tile rows halves S and dS' at the price of recomputing the chunk's
    key-side terms once per tile; key-side gradients are summed over tiles here.
    """
    c, vt, n = cfg.chunk, cfg.gradient_value_tile, xs[0].shape[-1]
    n_tiles = n // vt
    rows = pl.BlockSpec((None, None, vt, n), lambda i, j, m: (i, j, m, 0))
    if xs[0].ndim == 4:
        batch, seq, heads, _ = xs[0].shape
        bh = batch * heads
        keys = token_major_spec(heads, c, n, lambda i, j, m: (i, j, 0))
        values = token_major_spec(heads, c, vt, lambda i, j, m: (i, j, m))
        # [B, tiles, Tp, H, N]: tile m's partial sums.
        partial_keys = pl.BlockSpec(
            (None, None, c, None, n), lambda i, j, m: (i // heads, m, j, lax.rem(i, heads), 0)
        )
        # The final dtype where no XLA sum follows: that saves a pass of casts over them.
        out_shape = [
            jax.ShapeDtypeStruct(
                (batch, n_tiles, seq, heads, n), x.dtype if n_tiles == 1 else jnp.float32
            )
            for x in xs
        ]
        out_shape[3] = jax.ShapeDtypeStruct(xs[3].shape, xs[3].dtype)
    else:
        bh, seq, _ = xs[0].shape
        keys = pl.BlockSpec((None, c, n), lambda i, j, m: (i, j, 0))
        values = pl.BlockSpec((None, c, vt), lambda i, j, m: (i, j, m))
        partial_keys = pl.BlockSpec((None, None, c, n), lambda i, j, m: (i, m, j, 0))
        out_shape = [jax.ShapeDtypeStruct((bh, n_tiles, seq, n), jnp.float32)] * 6
        out_shape[3] = jax.ShapeDtypeStruct((bh, seq, n), jnp.float32)
    n_chunks = seq // c
    dr, dw, dk, dv, da, db = pl.pallas_call(
        partial(_gradient_kernel, dots=cfg.dots),
        # Tiles innermost: a chunk's tiles run together and share its key-side loads in L2.
        grid=(bh, n_chunks, n_tiles),
        in_specs=[keys, keys, keys, values, keys, keys, values, rows, rows],
        out_specs=[partial_keys] * 3 + [values] + [partial_keys] * 2,
        out_shape=out_shape,
        compiler_params=compiler_params(cfg),
        interpret=cfg.interpret,
        name="wkv7_gpu_gradients",
    )(*xs, dy, starts, end_cots)
    return sum_tiles(dr), sum_tiles(dw), sum_tiles(dk), dv, sum_tiles(da), sum_tiles(db)
