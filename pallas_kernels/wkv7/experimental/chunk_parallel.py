"""WKV-7 on GPU, chunk-parallel schedule: all chunk work in parallel, only an N x N scan in order.

The sequential schedule (`gpu_sequential`) walks each head's chunks in one program, so every chunk's
full key-side work (decay sums, the inverse (I - A_ab)^{-1}, ~20 dependent dots) lies on the
critical path, and a GPU runs only B*H x (N / value tile) programs. Here that work runs with one
program per (batch x head, chunk), and what is left in sequence is the chunk-to-chunk affine map
of the state. From `gpu_chunk.chunk_terms` (U = U0 + W S^T, S' = S e^{gC} + V^T kg + U^T bg):

    S_{c+1} = S_c A_c + D_c,   A_c = diag(e^{gC}) + L_c,   L_c = W^T bg,
    D_c = V^T kg + U0^T bg,

L_c, D_c in R^{N x N} (A_c acts on the key side, so value tiles of S stay independent). The
backward's carried cotangent follows the transposed map, from dS' = dS_{c+1} (the cotangent of
chunk c's end state):

    dS_c = dS_{c+1} A_c^T + E_c,   E_c = dY^T Q    (dU^T W = dS' bg^T W = dS' L_c^T).

A map is kept as its two parts (`ChunkMaps`): the scans apply the decay elementwise in fp32 and
only L_c through an exact dot, so the decay is never rounded to a dot's operand precision (with
exact_dot_precision="bf16x3" a decay near 1 would otherwise be off by ~2^-17 in every chunk,
the same way each time for a slowly varying w, and compound over the channel's memory).

Forward, three kernels: chunk terms (e^{gC}, L_c, D_c, Q, Y0; grid B*H x chunks), the state
scan (grid B*H x value tiles, storing every chunk's start state) and the outputs
Y = Y0 + Q S_c^T (grid B*H x chunks). Backward, three: chunk terms (e^{gC}, L_c, E_c), the
reverse scan (storing every chunk's end cotangent), and the gradients of each chunk from its
S_c and dS_{c+1} (`gpu_chunk.chunk_gradients`; grid B*H x chunks x value tiles of
`gradient_value_tile` rows, key-side partial sums added after). The dot precision plan is the
sequential schedule's: L_c, D_c, E_c and the scan feed the carried state or its cotangent and
take exact dots. With scan_group = g > 1, XLA composes the maps of g consecutive chunks before
each scan (products at the exact dots' precision; "tf32x3" runs as IEEE fp32 there) and
recovers the inner chunks' states after it (`scan_maps`), so the scans take g times fewer
sequential steps.

Memory: L_c and D_c (or E_c) are N^2 fp32 each per chunk and head (2 x N^2 * 4 / C bytes per
token and head, transient), and the start states, as in the sequential schedule, are the
residual the backward keeps. With more than one gradient tile, the five key-side gradients
are first written per tile (5 x tiles x N * 4 bytes per token and head, transient), as the
sequential schedule's backward does with its value tiles. Scan groups add the composed maps
(1 / g of L_c and D_c) and, while the inner states are recovered, up to one more copy of them.
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
)
from pallas_kernels.wkv7.gpu_chunk import chunk_terms, compiler_params, value_terms

# The scan's loads (L_c, D_c) do not depend on the carried state: two stages let Triton fetch
# the next chunk's while the current dot runs.
SCAN_NUM_STAGES = 2


class ChunkMaps(NamedTuple):
    """Each chunk's transition A_c = diag(decay) + low, the map x -> x A_c of the state's rows
    (x A_c^T for the cotangent's)."""

    decay: jax.Array  # e^{gC} [BH, chunks, 1, N]
    low: jax.Array  # L_c = W^T bg [BH, chunks, N, N]


# --------------------------------------------------------------------------------------------
# Kernels. Token refs are one chunk [C, N] of one (batch x head); chunk-matrix refs [N, N].


def _store_map(dots, t, decay_ref, low_ref):
    """The chunk's transition as ChunkMaps stores it: e^{gC} [1, N] and L_c = W^T bg [N, N]."""
    decay_ref[...] = t.e_gc
    low_ref[...] = dots.exact(t.wm, t.bg, ta=True)


def _forward_terms_kernel(r_ref, w_ref, k_ref, v_ref, a_ref, b_ref,
                          decay_ref, low_ref, drive_ref, q_ref, y0_ref, *, dots):  # fmt: skip
    r, w, k, v, a, b = load_blocks(r_ref, w_ref, k_ref, v_ref, a_ref, b_ref)
    t = chunk_terms(dots, r, w, k, a, b)
    u0, y0 = value_terms(dots, t, v)
    _store_map(dots, t, decay_ref, low_ref)
    drive_ref[...] = dots.exact(v, t.kg, ta=True) + dots.exact(u0, t.bg, ta=True)
    q_ref[...] = t.q
    y0_ref[...] = y0


def _backward_terms_kernel(r_ref, w_ref, k_ref, a_ref, b_ref, dy_ref, decay_ref, low_ref,
                           drive_ref, *, dots):  # fmt: skip
    r, w, k, a, b = load_blocks(r_ref, w_ref, k_ref, a_ref, b_ref)
    t = chunk_terms(dots, r, w, k, a, b)
    _store_map(dots, t, decay_ref, low_ref)
    drive_ref[...] = dots.exact(dy_ref[...], t.q, ta=True)


def _scan_kernel(decay_ref, low_ref, drive_ref, x0_ref, x_out_ref, before_ref, *, n_chunks,
                 reverse, dots):  # fmt: skip
    """x <- x A_c + D_c over the chunks (x A_c^T + E_c, last chunk first, when reverse), with
    x A_c = x diag(decay) + x L_c: the decay elementwise in fp32, L_c an exact dot.

    before_ref[c] receives the x that chunk c's map is applied to: the start state S_c forward,
    the end cotangent dS_{c+1} in reverse.
    """

    def step(j, x):
        i = n_chunks - 1 - j if reverse else j
        before_ref[i, :, :] = x
        low = dots.exact(x, low_ref[i, :, :], tb=reverse)
        return x * decay_ref[i, :, :] + low + drive_ref[i, :, :]

    x_out_ref[...] = lax.fori_loop(0, n_chunks, step, x0_ref[...])


def _output_kernel(y0_ref, q_ref, start_ref, y_ref, *, dots):
    # Q S^T reaches only y: a fast dot, as in the sequential schedule.
    y_ref[...] = y0_ref[...] + dots.fast(q_ref[...], start_ref[...], tb=True)


# --------------------------------------------------------------------------------------------
# pallas_call wrappers on head-major [BH, Tp, N] arrays, Tp a multiple of the chunk.


def forward_terms_call(cfg, xs):
    """The forward's chunk terms of head-major xs = (r, w, k, v, a, b), [BH, Tp, N] each:
    (ChunkMaps, D_c [BH, chunks, N, N], Q, Y0 [BH, Tp, N]), fp32."""
    kinds = ("row", "matrix", "matrix", "tokens", "tokens")
    decay, low, drive, q, y0 = over_chunks(
        cfg, _forward_terms_kernel, "wkv7_gpu_forward_terms", xs, kinds
    )
    return ChunkMaps(decay, low), drive, q, y0


def backward_terms_call(cfg, xs, dy):
    """The backward's chunk terms of head-major xs and dy [BH, Tp, N]: (ChunkMaps,
    E_c [BH, chunks, N, N]), fp32."""
    r, w, k, _, a, b = xs
    args = (r, w, k, a, b, dy)
    decay, low, drive = over_chunks(
        cfg, _backward_terms_kernel, "wkv7_gpu_backward_terms", args, ("row", "matrix", "matrix")
    )
    return ChunkMaps(decay, low), drive


def _scan_call(cfg, maps, drive, x0, *, reverse):
    """(final x [BH, N, N], x before each chunk's map [BH, chunks, N, N]); see _scan_kernel."""
    bh, n_chunks, n, _ = maps.low.shape
    vt = cfg.value_tile
    decays = pl.BlockSpec((None, n_chunks, 1, n), lambda i, j: (i, 0, 0, 0))
    full = pl.BlockSpec((None, n_chunks, n, n), lambda i, j: (i, 0, 0, 0))
    rows = pl.BlockSpec((None, n_chunks, vt, n), lambda i, j: (i, 0, j, 0))
    state = pl.BlockSpec((None, vt, n), lambda i, j: (i, j, 0))
    return pl.pallas_call(
        partial(_scan_kernel, n_chunks=n_chunks, reverse=reverse, dots=cfg.dots),
        grid=(bh, n // vt),
        in_specs=[decays, full, rows, state],
        out_specs=[state, rows],
        out_shape=[
            jax.ShapeDtypeStruct((bh, n, n), jnp.float32),
            jax.ShapeDtypeStruct((bh, n_chunks, n, n), jnp.float32),
        ],
        compiler_params=compiler_params(cfg, SCAN_NUM_STAGES),
        interpret=cfg.interpret,
        name="wkv7_gpu_reverse_scan" if reverse else "wkv7_gpu_scan",
    )(maps.decay, maps.low, drive, x0)


# --------------------------------------------------------------------------------------------
# The scan over groups of chunks (scan_group > 1), composed and expanded by XLA.


def _apply(x, maps, precision, *, reverse):
    """x A (x A^T when reverse) for x [..., R, N] and maps of matching batch dims."""
    low = jnp.swapaxes(maps.low, -1, -2) if reverse else maps.low
    return x * maps.decay + exact_matmul(x, low, precision)


def _product(first, second, precision):
    """A_first A_second, still as diag(decay) + low: the decays multiply elementwise and
    (D1 + L1)(D2 + L2) = D1 D2 + (L1 D2 + D1 L2 + L1 L2)."""
    low = first.low * second.decay + jnp.swapaxes(first.decay, -1, -2) * second.low
    return ChunkMaps(
        first.decay * second.decay, low + exact_matmul(first.low, second.low, precision)
    )


def _chunk(maps, j):
    return ChunkMaps(maps.decay[:, :, j], maps.low[:, :, j])


def _compose(maps, d, precision, *, reverse):
    """The maps of each group of chunks as one: fields [BH, G, group, ...] -> [BH, G, ...].

    Both directions compose the transition as A_first ... A_last (the reverse scan applies its
    transpose). Forward, x -> x A + D over the group gives D_grp = (D_first A_2 + D_2) A_3 ...;
    in reverse, x -> x A^T + E from the last chunk down gives E_grp = (E_last A^T_{-2} + E_{-2}) ...
    """
    group = d.shape[2]
    maps_grp = _chunk(maps, 0)
    for j in range(1, group):
        maps_grp = _product(maps_grp, _chunk(maps, j), precision)
    order = range(group - 2, -1, -1) if reverse else range(1, group)
    d_grp = d[:, :, group - 1] if reverse else d[:, :, 0]
    for j in order:
        d_grp = _apply(d_grp, _chunk(maps, j), precision, reverse=reverse) + d[:, :, j]
    return maps_grp, d_grp


def _expand(maps, d, group_before, precision, *, reverse):
    """Every chunk's `before` x from each group's: [BH, G, N, N] -> [BH, G, group, N, N].

    Forward, group_before holds each group's start state and the inner starts follow by
    x_{c+1} = x_c A_c + D_c; in reverse it holds the cotangent at each group's end, and the
    inner chunks' end cotangents follow by x_c = x_{c+1} A_c^T + E_c, last chunk first.
    """
    group = d.shape[2]
    befores = [group_before]
    for step in range(group - 1):
        j = group - 1 - step if reverse else step
        x = _apply(befores[-1], _chunk(maps, j), precision, reverse=reverse)
        befores.append(x + d[:, :, j])
    if reverse:
        befores.reverse()
    return jnp.stack(befores, axis=2)


def scan_maps(cfg, maps, drive, x0, *, reverse):
    """The state scan x <- x A_c + D_c over the chunks from x0 [BH, N, N] (reverse: the
    cotangent's, x <- x A_c^T + E_c, last chunk first): (final x [BH, N, N], the x before each
    chunk's map [BH, chunks, N, N]), fp32; over groups of cfg.scan_group chunks when that is > 1.

    The scan kernel's steps are sequential and each costs one N x N map whatever the chunk
    size, so composing `group` chunks' maps (parallel, N^3 per chunk each way) cuts its steps
    by that factor. A chunk count not divisible by the group is padded with identity maps.
    """
    group = cfg.scan_group
    if group == 1:
        return _scan_call(cfg, maps, drive, x0, reverse=reverse)
    bh, n_chunks, n, _ = drive.shape
    pad = -n_chunks % group
    if pad:
        maps = ChunkMaps(
            jnp.concatenate([maps.decay, jnp.ones((bh, pad, 1, n), maps.decay.dtype)], axis=1),
            jnp.concatenate([maps.low, jnp.zeros((bh, pad, n, n), maps.low.dtype)], axis=1),
        )
        drive = jnp.concatenate([drive, jnp.zeros((bh, pad, n, n), drive.dtype)], axis=1)
    n_groups = drive.shape[1] // group
    grouped = lambda x: x.reshape(bh, n_groups, group, *x.shape[2:])
    maps, d = ChunkMaps(*map(grouped, maps)), grouped(drive)
    precision = cfg.exact_dot_precision
    maps_grp, d_grp = _compose(maps, d, precision, reverse=reverse)
    x_out, group_before = _scan_call(cfg, maps_grp, d_grp, x0, reverse=reverse)
    before = _expand(maps, d, group_before, precision, reverse=reverse).reshape(bh, -1, n, n)
    return x_out, before[:, :n_chunks]


def output_call(cfg, y0, q, starts):
    """Y = Y0 + Q S_c^T [BH, Tp, N] fp32 from Y0, Q [BH, Tp, N] and the chunks' start states
    S_c [BH, chunks, N, N]."""
    return over_chunks(cfg, _output_kernel, "wkv7_gpu_outputs", (y0, q, starts), ("tokens",))[0]


def _forward(cfg, xs, s0):
    maps, drive, q, y0 = forward_terms_call(cfg, xs)
    s_final, starts = scan_maps(cfg, maps, drive, s0, reverse=False)
    return output_call(cfg, y0, q, starts), s_final, starts


@partial(jax.custom_vjp, nondiff_argnums=(0,))
def wkv7_heads_chunk_parallel(cfg, xs, s0):
    """(y [BH, Tp, N], final state [BH, N, N]) fp32 for head-major xs = (r, w, k, v, a, b).

    cfg is `gpu_chunk.KernelConfig`; Tp is a multiple of cfg.chunk; s0 [BH, N, N] fp32.
    """
    y, s_final, _ = _forward(cfg, xs, s0)
    return y, s_final


def _vjp_forward(cfg, xs, s0):
    y, s_final, starts = _forward(cfg, xs, s0)
    # Residuals: the inputs (alive anyway) and each chunk's start state; the chunk terms are
    # recomputed in the backward's parallel kernels.
    return (y, s_final), (xs, starts)


def _vjp_backward(cfg, res, cot):
    xs, starts = res
    dy, ds_final = (x.astype(jnp.float32) for x in cot)
    maps, e = backward_terms_call(cfg, xs, dy)
    ds0, end_cots = scan_maps(cfg, maps, e, ds_final, reverse=True)
    grads = gradient_call(cfg, xs, dy, starts, end_cots)
    grads = tuple(g.astype(x.dtype) for g, x in zip(grads, xs, strict=True))
    return grads, ds0


wkv7_heads_chunk_parallel.defvjp(_vjp_forward, _vjp_backward)
