"""WKV-7 on GPU, factored schedule: chunk terms in parallel, then one pass over the chunks in
order that carries the state through each chunk's rank-C factors.

The chunk-parallel schedule (`chunk_parallel`) hands its scan each chunk's transition as
N x N matrices (L_c = W^T bg, D_c), 2 x N^2 fp32 per chunk written and read again (~2 KB per
token and head at chunk 16 and N = 64), and needs a third kernel for the outputs. Here the
parallel kernel stores the chunk's terms as they come out of `gpu_chunk.chunk_terms`, [C, N] per
chunk (N floats per token each), and the in-order pass applies them to the state rows it
holds, exactly the sequential schedule's step without its chunk maths:

    Y = Y0 + Q S^T,   U = U0 + W S^T,   S' = S e^{gC} + V^T kg + U^T bg.

Per chunk that is two dependent exact dots on the state's path ([C, N] x [N, VT], then
[VT, C] x [C, N]), one independent exact dot (V^T kg) and a fast one for y, with loads that do
not depend on the state (so they can be fetched a chunk ahead). The backward mirrors it: a
parallel kernel recomputes e^{gC}, W, bg and Q, a reverse pass carries the cotangent,

    dU = bg dS'^T,   dS = dS' e^{gC} + dU^T W + dY^T Q,

storing each chunk's end cotangent, and the chunk-parallel schedule's gradient kernel makes
the input gradients from S_c and dS_{c+1} (grid B*H x chunks x value tiles).

The passes run B*H x N / VT programs (32 at B*H = 8 with 16-row tiles, a quarter of an H100's
SMs), each walking T / C chunks in order. `segments` = G > 1 cuts the sequence into G parts
walked in parallel: a carry pass over rows [zeros; identity] gives each part's map M_g and the
state L_g it makes from zero (x_end = x_start M_g + L_g), XLA chains those into every part's
start state, and the pass proper runs from them; the reverse pass likewise. Two walks of T / G
chunks instead of one of T, for three times the pass work (`gpu_options.auto_segments` picks G).

Layout: the kernels read the inputs and dy and write y and the gradients token-major,
[B, Tp, H, N], as `wkv7_gpu` takes and returns them, so no XLA transposes surround them (in
the other schedules they cost ~2 KB per token and head forward and ~3 KB backward with bf16
inputs), and the residuals are the inputs themselves. The chunk terms, written and read once
each, are head-major [BH, Tp, N].

Memory, per token and head: the forward's terms are 6 x N fp32 (Q in bf16 with "bf16" dots,
since only a fast dot reads it there), the backward's 3 x N, both transient; the residual is
the start state of every chunk (N^2 fp32 / C), as in the other schedules. The dot precision
plan is the sequential schedule's, dot for dot.
"""

from __future__ import annotations

from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels.wkv7.experimental.chunk_grid import (
    exact_matmul,
    gradient_call,
    load_blocks,
    over_chunks,
    token_major_spec,
)
from pallas_kernels.wkv7.gpu_chunk import (
    chunk_terms,
    compiler_params,
    cotangent_step,
    state_step,
    value_terms,
)

# The passes' loads (the chunk's terms) do not depend on the carried state: two stages let
# Triton fetch the next chunk's while the current dots run.
PASS_NUM_STAGES = 2


# --------------------------------------------------------------------------------------------
# Kernels. Terms kernels: one chunk [C, N] of one (batch x head). Passes: one (batch x head)'s
# whole sequence, key-side terms [Tp, N], value-side ones and y / dy [Tp, VT], states [VT, N].


def _forward_terms_kernel(r_ref, w_ref, k_ref, v_ref, a_ref, b_ref, decay_ref, wm_ref, bg_ref,
                          kg_ref, q_ref, u0_ref, y0_ref, *, dots):  # fmt: skip
    r, w, k, v, a, b = load_blocks(r_ref, w_ref, k_ref, v_ref, a_ref, b_ref)
    t = chunk_terms(dots, r, w, k, a, b)
    u0, y0 = value_terms(dots, t, v)
    decay_ref[...] = t.e_gc
    wm_ref[...] = t.wm
    bg_ref[...] = t.bg
    kg_ref[...] = t.kg
    q_ref[...] = dots.operand(t.q)  # only Q S^T, a fast dot, reads it
    u0_ref[...] = u0
    y0_ref[...] = y0


def _backward_terms_kernel(r_ref, w_ref, k_ref, a_ref, b_ref, decay_ref, wm_ref, bg_ref, q_ref,
                           *, dots):  # fmt: skip
    r, w, k, a, b = load_blocks(r_ref, w_ref, k_ref, a_ref, b_ref)
    t = chunk_terms(dots, r, w, k, a, b)
    decay_ref[...] = t.e_gc
    wm_ref[...] = t.wm
    bg_ref[...] = t.bg
    q_ref[...] = t.q  # dY^T Q feeds the carried cotangent: kept in fp32


def _forward_pass_kernel(decay_ref, wm_ref, bg_ref, kg_ref, q_ref, u0_ref, y0_ref, v_ref, s0_ref,
                         y_ref, s_out_ref, *starts_ref, chunk, n_chunks, dots):  # fmt: skip
    """S <- S e^{gC} + V^T kg + U^T bg over the chunks in order, writing y; optionally stores
    each chunk's start state for the backward."""

    def step(i, s):
        rows = pl.ds(pl.multiple_of(i * chunk, chunk), chunk)
        if starts_ref:
            starts_ref[0][i, :, :] = s
        # Q S^T reaches only y (fast); the new state's dots are exact.
        y_ref[rows, :] = y0_ref[rows, :] + dots.fast(q_ref[rows, :], s, tb=True)
        wm, bg, kg, u0 = (ref[rows, :] for ref in (wm_ref, bg_ref, kg_ref, u0_ref))
        v = v_ref[rows, :].astype(jnp.float32)
        return state_step(dots, s, decay_ref[i, :, :], wm, bg, kg, u0, v)

    s_out_ref[...] = lax.fori_loop(0, n_chunks, step, s0_ref[...])


def _reverse_pass_kernel(decay_ref, wm_ref, bg_ref, q_ref, dy_ref, ds_final_ref, ds0_ref,
                         end_cot_ref, *, chunk, n_chunks, dots):  # fmt: skip
    """dS <- dS' e^{gC} + dU^T W + dY^T Q over the chunks, last first; end_cot_ref[c] receives
    the cotangent dS_{c+1} at chunk c's end."""

    def step(j, ds_next):
        i = n_chunks - 1 - j
        rows = pl.ds(pl.multiple_of(i * chunk, chunk), chunk)
        end_cot_ref[i, :, :] = ds_next
        du = dots.exact(bg_ref[rows, :], ds_next, tb=True)
        wm, q, dy = (ref[rows, :] for ref in (wm_ref, q_ref, dy_ref))
        return cotangent_step(dots, ds_next, decay_ref[i, :, :], wm, q, du, dy)

    ds0_ref[...] = lax.fori_loop(0, n_chunks, step, ds_final_ref[...])


def _carry_kernel(decay_ref, wm_ref, bg_ref, kg_ref, u0_ref, v_ref, x0_ref, x_out_ref, *, chunk,
                  n_chunks, n_tiles, dots):  # fmt: skip
    """The forward pass's state step over one segment without outputs, from x0_ref's rows;
    grid rows j >= n_tiles carry no drive (V and U0 zeroed), so from identity rows they make
    the segment's map."""
    driven = pl.program_id(1) < n_tiles

    def step(i, x):
        rows = pl.ds(pl.multiple_of(i * chunk, chunk), chunk)
        wm, bg, kg = (ref[rows, :] for ref in (wm_ref, bg_ref, kg_ref))
        u0 = jnp.where(driven, u0_ref[rows, :], 0.0)
        v = jnp.where(driven, v_ref[rows, :].astype(jnp.float32), 0.0)
        return state_step(dots, x, decay_ref[i, :, :], wm, bg, kg, u0, v)

    x_out_ref[...] = lax.fori_loop(0, n_chunks, step, x0_ref[...])


def _reverse_carry_kernel(decay_ref, wm_ref, bg_ref, q_ref, dy_ref, x0_ref, x_out_ref, *, chunk,
                          n_chunks, n_tiles, dots):  # fmt: skip
    """The reverse pass's step over one segment, last chunk first, without outputs; grid rows
    j >= n_tiles carry no drive (dY zeroed)."""
    driven = pl.program_id(1) < n_tiles

    def step(j, x):
        i = n_chunks - 1 - j
        rows = pl.ds(pl.multiple_of(i * chunk, chunk), chunk)
        du = dots.exact(bg_ref[rows, :], x, tb=True)
        wm, q = wm_ref[rows, :], q_ref[rows, :]
        dy = jnp.where(driven, dy_ref[rows, :], 0.0)
        return cotangent_step(dots, x, decay_ref[i, :, :], wm, q, du, dy)

    x_out_ref[...] = lax.fori_loop(0, n_chunks, step, x0_ref[...])


# --------------------------------------------------------------------------------------------
# pallas_call wrappers. The inputs, y, dy and the gradients stay token-major [B, Tp, H, N]
# (as wkv7_gpu gets and returns them: no transposes around the kernels); the chunk terms are
# head-major [BH, Tp, N]; Tp is a multiple of the chunk x segments.


def forward_terms_call(cfg, xs):
    """The forward's chunk terms of token-major xs = (r, w, k, v, a, b), [B, Tp, H, N] each:
    (decay [BH, chunks, 1, N]; W, bg, kg, Q, U0, Y0 [BH, Tp, N]), head-major."""
    kinds = ("row",) + ("tokens",) * 6
    q_dtype = cfg.dots.operand(jnp.zeros((), jnp.float32)).dtype
    dtypes = (jnp.float32,) * 4 + (q_dtype, jnp.float32, jnp.float32)
    name = "wkv7_gpu_factored_forward_terms"
    return over_chunks(cfg, _forward_terms_kernel, name, xs, kinds, dtypes, token_major=True)


def backward_terms_call(cfg, xs):
    """The backward's chunk terms of token-major xs: (decay [BH, chunks, 1, N]; W, bg,
    Q [BH, Tp, N]), head-major fp32."""
    r, w, k, _, a, b = xs
    kinds = ("row",) + ("tokens",) * 3
    name = "wkv7_gpu_factored_backward_terms"
    args = (r, w, k, a, b)
    return over_chunks(cfg, _backward_terms_kernel, name, args, kinds, token_major=True)


class _Segments(NamedTuple):
    """The passes' grid (BH, N // VT, segments) and BlockSpecs over it: each program walks one
    segment of `chunks` chunks (`tokens` tokens) for one value tile of the state."""

    grid: tuple
    chunks: int
    decays: pl.BlockSpec  # the segment's e^{gC} [chunks, 1, N]
    keys: pl.BlockSpec  # key-side terms [tokens, N]
    values: pl.BlockSpec  # value-side terms [tokens, VT]
    token_values: pl.BlockSpec  # the same block of a token-major [B, Tp, H, N] array (v, y, dy)
    state: pl.BlockSpec  # a state's rows [VT, N] in a [BH, segments, rows, N] array
    chunk_states: pl.BlockSpec  # every chunk's state rows [chunks, VT, N] of [BH, chunks, N, N]


def _segments(cfg, heads, bh, seq, n, value_tile_of=None):
    """_Segments for cfg.segments segments of [BH, seq, N] terms (H = heads); value_tile_of(j)
    picks the value tile that grid row j reads (default j)."""
    vt, segments = cfg.value_tile, cfg.segments
    chunks = seq // cfg.chunk // segments
    tokens = chunks * cfg.chunk
    tile = value_tile_of or (lambda j: j)
    return _Segments(
        grid=(bh, n // vt, segments),
        chunks=chunks,
        decays=pl.BlockSpec((None, chunks, 1, n), lambda i, j, s: (i, s, 0, 0)),
        keys=pl.BlockSpec((None, tokens, n), lambda i, j, s: (i, s, 0)),
        values=pl.BlockSpec((None, tokens, vt), lambda i, j, s: (i, s, tile(j))),
        token_values=token_major_spec(heads, tokens, vt, lambda i, j, s: (i, s, tile(j))),
        state=pl.BlockSpec((None, None, vt, n), lambda i, j, s: (i, s, j, 0)),
        chunk_states=pl.BlockSpec((None, chunks, vt, n), lambda i, j, s: (i, s, j, 0)),
    )


def _carry_call(cfg, kernel, name, terms, value_side, value_kinds, heads):
    """Each segment's end rows of [zeros; identity] [2N, N] carried through its chunks: rows
    [0, N) with the chunks' drive (the state, or cotangent, the segment makes from zero), rows
    [N, 2N) without (the segment's map). [BH, segments, 2N, N] fp32.

    value_kinds: per value_side array, "values" (head-major terms) or "token_values"
    (token-major, H = heads)."""
    bh, seq, n = terms[1].shape
    n_tiles = n // cfg.value_tile
    seg = _segments(cfg, heads, bh, seq, n, value_tile_of=lambda j: lax.rem(j, n_tiles))
    grid = (bh, 2 * n_tiles, cfg.segments)
    rows0 = jnp.concatenate([jnp.zeros((n, n), jnp.float32), jnp.eye(n, dtype=jnp.float32)])
    start = pl.BlockSpec((cfg.value_tile, n), lambda i, j, s: (j, 0))
    n_keys = len(terms) - 1
    return pl.pallas_call(
        partial(kernel, chunk=cfg.chunk, n_chunks=seg.chunks, n_tiles=n_tiles, dots=cfg.dots),
        grid=grid,
        in_specs=[seg.decays]
        + [seg.keys] * n_keys
        + [getattr(seg, kind) for kind in value_kinds]
        + [start],
        out_specs=seg.state,
        out_shape=jax.ShapeDtypeStruct((bh, cfg.segments, 2 * n, n), jnp.float32),
        compiler_params=compiler_params(cfg, PASS_NUM_STAGES),
        interpret=cfg.interpret,
        name=name,
    )(*terms, *value_side, rows0)


def _chain(x, ends, n, order):
    """x carried over whole segments in `order` by x <- x M_s + local_s, where ends[:, s] =
    [local_s; M_s] (_carry_call); the x before each step, stacked in segment order.

    IEEE fp32 whatever the exact-dot precision: a few [N, N] products per head, and the
    segment maps' diagonals (products of decays) would lose bits to a split."""
    befores = {}
    for s in order:
        befores[s] = x
        x = exact_matmul(x, ends[:, s, n:], "highest") + ends[:, s, :n]
    return jnp.stack([befores[s] for s in sorted(befores)], axis=1)


def _segment_starts(cfg, x, carry, heads, *, reverse):
    """Each segment's starting x [BH, segments, N, N]: x itself with one segment; else chained
    (_chain) from the segments' maps and local ends, carry = (kernel, name, terms, value_side,
    value_kinds) of _carry_call, first segment first (last first when reverse)."""
    if cfg.segments == 1:
        return x[:, None]
    ends = _carry_call(cfg, *carry, heads)
    order = range(cfg.segments - 1, -1, -1) if reverse else range(cfg.segments)
    return _chain(x, ends, x.shape[-1], order)


def forward_pass_call(cfg, terms, v, s0, *, save_starts):
    """The forward pass over forward_terms_call's terms: (y [B, Tp, H, N], final state
    [BH, N, N]) and, with save_starts, every chunk's start state [BH, chunks, N, N]; all fp32.
    v is token-major [B, Tp, H, N], s0 [BH, N, N].

    With cfg.segments = G > 1 the chunks are cut into G segments walked in parallel: a first
    pass (`_carry_kernel`) gives each segment's map and the state it makes from zero, XLA
    chains those into each segment's start state, and the pass proper runs from them. That is
    two passes over T / G chunks in order instead of one over T, for three times the work.
    """
    decay, wm, bg, kg, q, u0, y0 = terms
    bh, seq, n = wm.shape
    heads = v.shape[2]
    seg = _segments(cfg, heads, bh, seq, n)
    carry = (
        _carry_kernel, "wkv7_gpu_factored_forward_carry", (decay, wm, bg, kg), (u0, v),
        ("values", "token_values"),
    )  # fmt: skip
    starts = _segment_starts(cfg, s0, carry, heads, reverse=False)
    n_chunks = seq // cfg.chunk
    out_specs = [seg.token_values, seg.state]
    out_shape = [
        jax.ShapeDtypeStruct(v.shape, jnp.float32),
        jax.ShapeDtypeStruct((bh, cfg.segments, n, n), jnp.float32),
    ]
    if save_starts:
        out_specs.append(seg.chunk_states)
        out_shape.append(jax.ShapeDtypeStruct((bh, n_chunks, n, n), jnp.float32))
    keys, values = seg.keys, seg.values
    y, ends, *chunk_starts = pl.pallas_call(
        partial(_forward_pass_kernel, chunk=cfg.chunk, n_chunks=seg.chunks, dots=cfg.dots),
        grid=seg.grid,
        in_specs=[seg.decays, keys, keys, keys, keys, values, values, seg.token_values, seg.state],
        out_specs=out_specs,
        out_shape=out_shape,
        compiler_params=compiler_params(cfg, PASS_NUM_STAGES),
        interpret=cfg.interpret,
        name="wkv7_gpu_factored_forward_pass",
    )(decay, wm, bg, kg, q, u0, y0, v, starts)
    return (y, ends[:, -1], *chunk_starts)


def reverse_pass_call(cfg, terms, dy, ds_final):
    """The reverse pass over backward_terms_call's terms from the final state's cotangent
    ds_final [BH, N, N]: (dS_0 [BH, N, N], every chunk's end cotangent [BH, chunks, N, N]);
    fp32. dy is token-major [B, Tp, H, N]. Segments as in forward_pass_call, last first."""
    decay, wm, bg, q = terms
    bh, seq, n = wm.shape
    heads = dy.shape[2]
    seg = _segments(cfg, heads, bh, seq, n)
    carry = (
        _reverse_carry_kernel, "wkv7_gpu_factored_reverse_carry", (decay, wm, bg, q), (dy,),
        ("token_values",),
    )  # fmt: skip
    end_cots = _segment_starts(cfg, ds_final, carry, heads, reverse=True)
    n_chunks = seq // cfg.chunk
    starts, chunk_end_cots = pl.pallas_call(
        partial(_reverse_pass_kernel, chunk=cfg.chunk, n_chunks=seg.chunks, dots=cfg.dots),
        grid=seg.grid,
        in_specs=[seg.decays, seg.keys, seg.keys, seg.keys, seg.token_values, seg.state],
        out_specs=[seg.state, seg.chunk_states],
        out_shape=[
            jax.ShapeDtypeStruct((bh, cfg.segments, n, n), jnp.float32),
            jax.ShapeDtypeStruct((bh, n_chunks, n, n), jnp.float32),
        ],
        compiler_params=compiler_params(cfg, PASS_NUM_STAGES),
        interpret=cfg.interpret,
        name="wkv7_gpu_factored_reverse_pass",
    )(decay, wm, bg, q, dy, end_cots)
    return starts[:, 0], chunk_end_cots


@partial(jax.custom_vjp, nondiff_argnums=(0,))
def wkv7_tokens_factored(cfg, xs, s0):
    """(y [B, Tp, H, N], final state [BH, N, N]) fp32 for token-major xs = (r, w, k, v, a, b),
    [B, Tp, H, N] each (wkv7_gpu's layout, padded).

    cfg is `gpu_chunk.KernelConfig`; Tp is a multiple of cfg.chunk x cfg.segments; s0 [BH, N, N]
    fp32.
    """
    terms = forward_terms_call(cfg, xs)
    return forward_pass_call(cfg, terms, xs[3], s0, save_starts=False)


def _vjp_forward(cfg, xs, s0):
    terms = forward_terms_call(cfg, xs)
    y, s_final, starts = forward_pass_call(cfg, terms, xs[3], s0, save_starts=True)
    # Residuals: the inputs (alive anyway) and each chunk's start state; the chunk terms are
    # recomputed in the backward's parallel kernels.
    return (y, s_final), (xs, starts)


def _vjp_backward(cfg, res, cot):
    xs, starts = res
    dy, ds_final = (x.astype(jnp.float32) for x in cot)
    terms = backward_terms_call(cfg, xs)
    ds0, end_cots = reverse_pass_call(cfg, terms, dy, ds_final)
    grads = gradient_call(cfg, xs, dy, starts, end_cots)
    grads = tuple(g.astype(x.dtype) for g, x in zip(grads, xs, strict=True))
    return grads, ds0


wkv7_tokens_factored.defvjp(_vjp_forward, _vjp_backward)
