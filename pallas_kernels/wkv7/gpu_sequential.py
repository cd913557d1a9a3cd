"""WKV-7 on GPU, sequential schedule: one program per (batch x head, value tile) walks the chunks
of its sequence in order.

Each program runs an in-kernel `fori_loop` over its chunks, carrying its rows of the fp32 state
in registers (Triton lowering has neither scratch memory nor a sequential grid axis), with the
whole chunk maths (`gpu_chunk`) on its critical path; few heads give few programs. The
"chunk_parallel" and "factored" schedules compute the chunk maths in parallel over chunks and
keep only the state's recurrence in order.
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
    cotangent_step,
    state_step,
    sum_tiles,
    value_terms,
)

# --------------------------------------------------------------------------------------------
# Kernels. Every ref is one (batch x head)'s block; v / y / dv / states hold one value tile.


def _load_chunk(refs, rows):
    """The chunk `rows` of each ref, in fp32."""
    return tuple(ref[rows, :].astype(jnp.float32) for ref in refs)


def _forward_kernel(r_ref, w_ref, k_ref, v_ref, a_ref, b_ref, s0_ref, y_ref, s_out_ref,
                    *starts_ref, chunk, n_chunks, dots):  # fmt: skip
    """Walks the chunks in order; optionally stores each chunk's start state for the backward."""

    def step(i, s):
        rows = pl.ds(pl.multiple_of(i * chunk, chunk), chunk)
        r, w, k, a, b = _load_chunk((r_ref, w_ref, k_ref, a_ref, b_ref), rows)
        v = v_ref[rows, :].astype(jnp.float32)
        if starts_ref:
            starts_ref[0][i, :, :] = s
        t = chunk_terms(dots, r, w, k, a, b)
        u0, y0 = value_terms(dots, t, v)
        # Q S^T reaches only y (fast); the new state's dots are exact.
        y_ref[rows, :] = y0 + dots.fast(t.q, s, tb=True)
        return state_step(dots, s, t.e_gc, t.wm, t.bg, t.kg, u0, v)

    s_out_ref[...] = lax.fori_loop(0, n_chunks, step, s0_ref[...])


def _backward_kernel(r_ref, w_ref, k_ref, v_ref, a_ref, b_ref, starts_ref, dy_ref, ds_out_ref,
                     dr_ref, dw_ref, dk_ref, da_ref, db_ref, dv_ref, ds0_ref,
                     *, chunk, n_chunks, dots):  # fmt: skip
    """Walks the chunks in reverse carrying dS; key-side gradients are this tile's partials."""

    def step(j, ds_next):
        i = n_chunks - 1 - j
        rows = pl.ds(pl.multiple_of(i * chunk, chunk), chunk)
        r, w, k, a, b = _load_chunk((r_ref, w_ref, k_ref, a_ref, b_ref), rows)
        v = v_ref[rows, :].astype(jnp.float32)
        dy = dy_ref[rows, :]
        s = starts_ref[i, :, :]
        t = chunk_terms(dots, r, w, k, a, b)
        grads, du = chunk_gradients(dots, t, r, k, v, a, b, dy, s, ds_next)
        for ref, grad in zip((dr_ref, dw_ref, dk_ref, dv_ref, da_ref, db_ref), grads, strict=True):
            ref[rows, :] = grad
        return cotangent_step(dots, ds_next, t.e_gc, t.wm, t.q, du, dy)

    ds0_ref[...] = lax.fori_loop(0, n_chunks, step, ds_out_ref[...])


# --------------------------------------------------------------------------------------------
# pallas_call wrappers on head-major [BH, Tp, N] arrays, Tp a multiple of the chunk.


def _specs(bh, seq, n, vt, n_chunks):
    """BlockSpecs over the grid (BH, N // VT): key-side, value-tile, state and starts blocks."""
    del bh
    keys = pl.BlockSpec((None, seq, n), lambda i, j: (i, 0, 0))
    values = pl.BlockSpec((None, seq, vt), lambda i, j: (i, 0, j))
    state = pl.BlockSpec((None, vt, n), lambda i, j: (i, j, 0))
    starts = pl.BlockSpec((None, n_chunks, vt, n), lambda i, j: (i, 0, j, 0))
    partial_keys = pl.BlockSpec((None, None, seq, n), lambda i, j: (i, j, 0, 0))
    return keys, values, state, starts, partial_keys


def _forward_call(cfg, xs, s0, *, save_starts):
    r, w, k, v, a, b = xs
    bh, seq, n = r.shape
    vt, c = cfg.value_tile, cfg.chunk
    n_chunks = seq // c
    keys, values, state, starts, _ = _specs(bh, seq, n, vt, n_chunks)
    out_shape = [
        jax.ShapeDtypeStruct((bh, seq, n), jnp.float32),
        jax.ShapeDtypeStruct((bh, n, n), jnp.float32),
    ]
    out_specs = [values, state]
    if save_starts:
        out_shape.append(jax.ShapeDtypeStruct((bh, n_chunks, n, n), jnp.float32))
        out_specs.append(starts)
    return pl.pallas_call(
        partial(_forward_kernel, chunk=c, n_chunks=n_chunks, dots=cfg.dots),
        grid=(bh, n // vt),
        in_specs=[keys, keys, keys, values, keys, keys, state],
        out_specs=out_specs,
        out_shape=out_shape,
        compiler_params=compiler_params(cfg),
        interpret=cfg.interpret,
        name="wkv7_gpu_forward",
    )(r, w, k, v, a, b, s0)


def _backward_call(cfg, xs, starts, dy, ds_final):
    r, w, k, v, a, b = xs
    bh, seq, n = r.shape
    vt, c = cfg.value_tile, cfg.chunk
    n_tiles, n_chunks = n // vt, seq // c
    keys, values, state, starts_spec, partial_keys = _specs(bh, seq, n, vt, n_chunks)
    partial_shape = jax.ShapeDtypeStruct((bh, n_tiles, seq, n), jnp.float32)
    outs = pl.pallas_call(
        partial(_backward_kernel, chunk=c, n_chunks=n_chunks, dots=cfg.dots),
        grid=(bh, n_tiles),
        in_specs=[keys, keys, keys, values, keys, keys, starts_spec, values, state],
        out_specs=[partial_keys] * 5 + [values, state],
        out_shape=[partial_shape] * 5
        + [
            jax.ShapeDtypeStruct((bh, seq, n), jnp.float32),
            jax.ShapeDtypeStruct((bh, n, n), jnp.float32),
        ],
        compiler_params=compiler_params(cfg),
        interpret=cfg.interpret,
        name="wkv7_gpu_backward",
    )(r, w, k, v, a, b, starts, dy, ds_final)
    dr, dw, dk, da, db = map(sum_tiles, outs[:5])
    return dr, dw, dk, outs[5], da, db, outs[6]


@partial(jax.custom_vjp, nondiff_argnums=(0,))
def wkv7_heads_sequential(cfg, xs, s0):
    """(y [BH, Tp, N], final state [BH, N, N]) fp32 for head-major xs = (r, w, k, v, a, b)."""
    y, s_final = _forward_call(cfg, xs, s0, save_starts=False)
    return y, s_final


def _vjp_forward(cfg, xs, s0):
    y, s_final, starts = _forward_call(cfg, xs, s0, save_starts=True)
    # Residuals: the inputs (alive anyway) and one fp32 state per chunk; the chunk
    # intermediates are recomputed in the backward kernel.
    return (y, s_final), (xs, starts)


def _vjp_backward(cfg, res, cot):
    xs, starts = res
    dy, ds_final = cot
    dr, dw, dk, dv, da, db, ds0 = _backward_call(
        cfg, xs, starts, dy.astype(jnp.float32), ds_final.astype(jnp.float32)
    )
    grads = tuple(g.astype(x.dtype) for g, x in zip((dr, dw, dk, dv, da, db), xs, strict=True))
    return grads, ds0


wkv7_heads_sequential.defvjp(_vjp_forward, _vjp_backward)
