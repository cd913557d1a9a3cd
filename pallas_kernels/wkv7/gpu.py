"""WKV-7 as Pallas-Triton GPU kernels: chunked forward and chunk-reverse backward, one custom VJP.

Default ("sequential") schedule: one program per (batch x head, value tile) walks the chunks of
its sequence in an in-kernel `fori_loop`, carrying its rows of the fp32 state in registers
(Triton lowering has neither scratch memory nor a sequential grid axis). The whole chunk maths
is then on each program's critical path, and few heads give few programs; the
"chunk_parallel" schedule (`gpu_chunk_parallel`, same chunk maths from this module) computes it
in parallel over chunks and keeps only an N x N affine map per chunk in order.

The maths is that of `xla_chunked` (chunk terms with exponents centred mid-chunk, the stable
block-recursive (I - A_ab)^{-1}, the hand-derived chunk backward), written as 2-D dots that
Triton can lower.

Value tiles: the state's rows (value dims) evolve independently,
    S_t = S_{t-1} (diag(e^{w_t}) + a_t b_t^T) + v_t k_t^T,
so a program holding rows [j*VT, (j+1)*VT) is exact on its own. The key-side gradients
(dr, dw, dk, da, db) sum over all value rows: each tile writes its partial sums and XLA adds
them up. Key-side chunk terms (the C x C matrices, the inverse) are recomputed per tile, so
tiles smaller than N trade duplicated work for more programs on a GPU with few heads.

Dot precision (see `_Dots`): every dot is a "sum" (the decay sums), "exact" (A_ab, the
inverse P and its products, and every dot that multiplies the carried state S or its cotangent
dS or makes their increments) or "fast" (the intra-chunk C x C matrices and the products that
only reach y or a per-token gradient). Rounding a fast dot's operands perturbs one chunk's
contribution once; an error in an exact dot perturbs the chunk-to-chunk transition and
compounds over T, so `exact_dot_precision` offers only near-fp32 choices: IEEE fp32 on the FMA
units, or split bf16 / TF32 operands on tensor cores. The decay sums stay fp32 (an error there
lands in an exponent), and the decay e^{gC} is applied to the state elementwise in fp32 in every
mode, never through a dot.
"""

from __future__ import annotations

import dataclasses
from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.wkv7.reference import check_wkv7_shapes

DOT_PRECISIONS = ("highest", "tf32x3", "bf16")
EXACT_DOT_PRECISIONS = ("highest", "tf32x3", "bf16x3")
# "sequential": one program per (batch x head, value tile) walks the chunks (this module);
# "chunk_parallel": the chunk work in parallel, an N x N scan in order (gpu_chunk_parallel);
# "factored": the chunk work in parallel, then a pass in order through each chunk's rank-C
# factors (gpu_factored).
SCHEDULES = ("sequential", "chunk_parallel", "factored")
# The schedules whose backward runs the chunk-parallel gradient kernel (gradient_value_tile).
CHUNK_GRADIENT_SCHEDULES = ("chunk_parallel", "factored")
MIN_CHUNK_SIZE = 16
MAX_CHUNK_SIZE = 64
DEFAULT_CHUNK_SIZE = 16
# What wkv7_gpu uses when schedule / chunk_size / num_warps / gradient_value_tile / scan_group
# are None. Measured on an H100 (docs/BENCHMARKS.md, 2026-11-27): the chunk-parallel schedule
# with chunk 16, 4 warps and full-row gradients was faster than the sequential one at B*H = 8
# (forward+backward 1.6x) but 2.2x slower at B*H = 64, its backward 9x its forward; so the
# sequential schedule stays the default. Its gradient kernel spilled ~11 KB per thread there
# (bench/triton_spills.py, compiled for sm_90 offline); with 32-row value tiles and 8 warps it
# spills ~200 B, and no other chunk-parallel kernel spills at 8 warps: hence these defaults, not
# yet timed on a GPU (bench/wkv7_gpu_session.sh).
DEFAULT_SCHEDULE = "sequential"
SCHEDULE_DEFAULTS = {
    "sequential": {"chunk_size": DEFAULT_CHUNK_SIZE, "num_warps": 4},
    "chunk_parallel": {
        "chunk_size": DEFAULT_CHUNK_SIZE,
        "num_warps": 8,
        "gradient_value_tile": 32,
        "scan_group": 1,
    },
    # Not yet timed on a GPU: the chunk-parallel schedule's settings (offline, its passes do
    # not spill at 8 warps; bench/triton_spills.py).
    "factored": {"chunk_size": DEFAULT_CHUNK_SIZE, "num_warps": 8, "gradient_value_tile": 32},
}
MAX_SCAN_GROUP = 16
MAX_SEGMENTS = 16
# segments=None never cuts a sequence into segments shorter than this many chunks.
MIN_SEGMENT_CHUNKS = 32
MIN_VALUE_TILE = 16
# No software pipelining of the chunk loop's loads: the loop body is dominated by dependent
# dots on register-resident state, and pipelining only adds register pressure.
NUM_STAGES = 1
# The programs that fill the GPU: its SM count (`target_programs`); an H100's 132 where the
# kernels are not compiled on a GPU (interpret mode, cross-lowering on a host without one).
TARGET_PROGRAMS = 132
_SUPPORTED_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
_HALF_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


def _bf16_parts(x):
    """x fp32 as hi + lo, both bf16: hi = bf16(x), lo = bf16(x - hi). hi + lo keeps ~16 of
    x's 24 significant bits (the rest, below 2^-17 |x|, is dropped)."""
    hi = x.astype(jnp.bfloat16)
    return hi, (x - hi.astype(jnp.float32)).astype(jnp.bfloat16)


def split_bf16_dot(dot, x, y):
    """x y for fp32 x, y as three products of bf16 parts, lo·hi + hi·lo + hi·hi (lo·lo, below
    2^-16 relative, dropped), the small ones first as XLA's BF16_BF16_F32_X3 orders them.
    `dot(a, b)` multiplies two bf16 operands with fp32 accumulation (in a kernel or in XLA)."""
    (x_hi, x_lo), (y_hi, y_lo) = _bf16_parts(x), _bf16_parts(y)
    return dot(x_lo, y_hi) + dot(x_hi, y_lo) + dot(x_hi, y_hi)


def _check_choice(name, value, choices):
    """A string option must be None or one of choices."""
    if value is not None and (not isinstance(value, str) or value not in choices):
        raise ValueError(f"wkv7_gpu: {name} must be None or one of {choices}, got {value!r}")


@dataclasses.dataclass(frozen=True)
class _Dots:
    """The three kinds of in-kernel 2-D dot (fp32 results) for one precision plan.

    "sum": the decay sums, ones-triangle products whose error lands in an exponent.
    "exact": A_ab, the inverse (I - A_ab)^{-1} and its products, and every dot that multiplies
        the carried state or its cotangent or makes their increments: errors that reach the
        chunk-to-chunk transition and compound over T.
    "fast": the intra-chunk C x C matrices and the products that reach only y or a per-token
        gradient.
    `mode` (wkv7_gpu's dot_precision) sets "sum" and "fast", and the default of "exact":
    "highest": all IEEE fp32 (Precision.HIGHEST: Triton's FMA path, no tensor cores).
    "tf32x3": all TF32_TF32_F32_X3 (three TF32 tensor-core passes, near-fp32); interpret
        mode maps it to HIGHEST, since the CPU cannot run that algorithm.
    "bf16": fast dots cast both operands to bf16 and accumulate in fp32 (tensor cores); the
        others IEEE fp32.
    `exact_mode` (exact_dot_precision) sets "exact": "highest" or "tf32x3" as above, or
    "bf16x3": each fp32 operand split into bf16 hi + lo parts and three tensor-core products,
    lo·hi + hi·lo + hi·hi (lo·lo, below 2^-16 relative, dropped), written out here so that
    interpret mode runs exactly the GPU's operand rounding.
    """

    mode: str
    exact_mode: str
    interpret: bool

    def _dot(self, x, y, precision, ta, tb):
        if precision == "bf16x3":
            return split_bf16_dot(partial(plgpu.dot, trans_a=ta, trans_b=tb), x, y)
        if precision == "tf32x3" and not self.interpret:
            algorithm = lax.DotAlgorithmPreset.TF32_TF32_F32_X3
            return plgpu.dot(x, y, trans_a=ta, trans_b=tb, precision=algorithm)
        return plgpu.dot(x, y, trans_a=ta, trans_b=tb, precision=lax.Precision.HIGHEST)

    @property
    def _full(self):
        """The near-fp32 precision of `mode`: what its sums (and non-bf16 fast dots) take."""
        return "tf32x3" if self.mode == "tf32x3" else "highest"

    def sum(self, x, y, *, ta=False, tb=False):
        """Dot for the decay sums (a ones triangle times log-decays)."""
        return self._dot(x, y, self._full, ta, tb)

    def exact(self, x, y, *, ta=False, tb=False):
        """Dot for A_ab, the inverse and its products, and the carried state's path."""
        return self._dot(x, y, self.exact_mode, ta, tb)

    def operand(self, x):
        """x as fast dots take it: bf16 in "bf16" mode, else unchanged. A value used only by
        fast dots is rounded once where it is made, so it holds half the registers (fast dots
        round their operands anyway, so the results do not change)."""
        return x.astype(jnp.bfloat16) if self.mode == "bf16" else x

    def fast(self, x, y, *, ta=False, tb=False):
        """Dot for intra-chunk matrices and products that reach only y or per-token grads."""
        if self.mode != "bf16":
            return self._dot(x, y, self._full, ta, tb)
        x, y = x.astype(jnp.bfloat16), y.astype(jnp.bfloat16)
        return plgpu.dot(x, y, trans_a=ta, trans_b=tb)


@dataclasses.dataclass(frozen=True)
class _Config:
    """Static kernel settings (hashable: a nondiff argument of the custom VJP)."""

    chunk: int
    value_tile: int
    interpret: bool
    dot_precision: str
    exact_dot_precision: str
    num_warps: int
    gradient_value_tile: int  # chunk-parallel gradient kernel's value rows per program
    scan_group: int  # chunk-parallel: chunks per step of the state scans
    segments: int  # factored: parts of the sequence whose passes run in parallel

    @property
    def dots(self):
        return _Dots(self.dot_precision, self.exact_dot_precision, self.interpret)


# --------------------------------------------------------------------------------------------
# In-kernel maths on [C, N] / [C, VT] / [VT, N] / [C, C] fp32 values.


def _iota(c, dim):
    return lax.broadcasted_iota(jnp.int32, (c, c), dim)


def _shift(x, bits):
    """x >> bits for non-negative int32 x (a power-of-two floor division Triton lowers)."""
    return lax.shift_right_logical(x, jnp.int32(bits))


def _masked(x, mask):
    """Zeroes x outside mask with `where`: the masked-out centred products may be inf."""
    return jnp.where(mask, x, 0.0)


def _pick_row(x, row_ids, row):
    """Row `row` of x [C, N] as [1, N] without a value slice (Triton cannot slice values)."""
    return jnp.sum(jnp.where(row_ids == row, x, 0.0), axis=0, keepdims=True)


def _unit_lower_inverse(dots, a_ab):
    """(I - A)^{-1} for strictly lower-triangular A [C, C] by the stable block recursion.

    P_2m = P_m + P_m L_m P_m, with P_m the inverse over m x m diagonal blocks and L_m the part
    of A just below them inside each 2m x 2m diagonal block (see xla_chunked for why the
    product form prod(I + A^{2^m}) is not used: it cancels catastrophically in fp32).
    """
    c = a_ab.shape[0]
    row, col = _iota(c, 0), _iota(c, 1)
    p = jnp.where(row == col, 1.0, 0.0) + _masked(a_ab, _shift(row, 1) == _shift(col, 1))
    bits = 1
    while (1 << bits) < c:
        same_pair = _shift(row, bits + 1) == _shift(col, bits + 1)
        below = same_pair & (_shift(row, bits) != _shift(col, bits))
        p = p + dots.exact(p, dots.exact(_masked(a_ab, below), p))
        bits += 1
    return p


class _Terms(NamedTuple):
    """A chunk's key-side, state-free terms; see xla_chunked._ChunkTerms. fp32, except that
    r_c, k_c, b_c, a_c, a_qk, a_qb and a_ak, which only fast dots use, are in the dtype those
    take (`_Dots.operand`)."""

    e_in: jax.Array  # e^{gi - off} [C, N]
    e_out: jax.Array  # e^{off - gi}
    e_ex: jax.Array  # e^{ge - off}
    e_gi: jax.Array  # e^{gi}
    e_ge: jax.Array  # e^{ge}
    e_tail: jax.Array  # e^{gC - gi}
    e_gc: jax.Array  # e^{gC} [1, N]
    r_c: jax.Array  # r e^{gi - off}
    k_c: jax.Array  # k e^{off - gi}
    b_c: jax.Array  # b e^{off - gi}
    a_c: jax.Array  # a e^{ge - off}
    kg: jax.Array  # k e^{gC - gi}
    bg: jax.Array  # b e^{gC - gi}
    a_qk: jax.Array  # tril_incl(r_c k_c^T) [C, C]
    a_qb: jax.Array  # tril_incl(r_c b_c^T)
    a_ak: jax.Array  # tril_strict(a_c k_c^T)
    p: jax.Array  # (I - tril_strict(a_c b_c^T))^{-1}
    wm: jax.Array  # P (a e^{ge}) [C, N]: U = U0 + W S^T
    q: jax.Array  # r e^{gi} + A_qb W [C, N]: Y = Y0 + Q S^T


def _chunk_terms(dots, r, w, k, a, b):
    """Key-side terms of one chunk from its fp32 inputs [C, N].

    A_qk, A_qb, A_ak and Q take fast dots; A_ab, P and W = P ag exact ones (W feeds the
    transition part of U, W S^T); the decay sum is a sum dot.
    """
    c = w.shape[0]
    row, col = _iota(c, 0), _iota(c, 1)
    # Inclusive cumulative log-decay as a ones-triangle dot: exact in fp32 at these sizes and
    # the same form the backward's reverse sum uses.
    gi = dots.sum(jnp.where(col <= row, 1.0, 0.0), w)
    ge = gi - w
    rows = lax.broadcasted_iota(jnp.int32, w.shape, 0)
    gc = _pick_row(gi, rows, c - 1)
    off = _pick_row(gi, rows, c // 2)
    e_in, e_out, e_ex = jnp.exp(gi - off), jnp.exp(off - gi), jnp.exp(ge - off)
    e_gi, e_ge, e_tail, e_gc = jnp.exp(gi), jnp.exp(ge), jnp.exp(gc - gi), jnp.exp(gc)
    r_c, k_c, b_c, a_c = r * e_in, k * e_out, b * e_out, a * e_ex
    incl, strict = col <= row, col < row
    a_qk = _masked(dots.fast(r_c, k_c, tb=True), incl)
    a_qb = _masked(dots.fast(r_c, b_c, tb=True), incl)
    a_ak = _masked(dots.fast(a_c, k_c, tb=True), strict)
    p = _unit_lower_inverse(dots, _masked(dots.exact(a_c, b_c, tb=True), strict))
    # From here on these feed fast dots only (the chunk's and the gradients').
    r_c, k_c, b_c, a_c, a_qk, a_qb, a_ak = map(dots.operand, (r_c, k_c, b_c, a_c, a_qk, a_qb, a_ak))
    wm = dots.exact(p, a * e_ge)
    q = r * e_gi + dots.fast(a_qb, wm)
    return _Terms(
        e_in, e_out, e_ex, e_gi, e_ge, e_tail, e_gc, r_c, k_c, b_c, a_c,
        k * e_tail, b * e_tail, a_qk, a_qb, a_ak, p, wm, q,
    )  # fmt: skip


def _value_terms(dots, t, v):
    """U0 = P A_ak V and Y0 = A_qk V + A_qb U0 for a value tile v [C, VT]."""
    u0 = dots.exact(t.p, dots.fast(t.a_ak, v))
    y0 = dots.fast(t.a_qk, v) + dots.fast(t.a_qb, u0)
    return u0, y0


def _chunk_gradients(dots, t, r, k, v, a, b, dy, s, ds_next):
    """One chunk's input gradients from its start state S and the cotangent dS' at its end.

    Shapes: r, k, a, b [C, N] (fp32); v, dy [C, VT]; s, ds_next [VT, N] (a value tile's
    rows; with VT < N the key-side gradients are this tile's partial sums). Returns
    ((dr, dw, dk, dv, da, db), dU) with dU = bg dS'^T [C, VT] (for the carried dS).

    Exact dots: U's state part and dU (they feed dS) and the P^T products; the reverse decay
    sum is a sum dot; every other product ends in a per-token gradient and takes a fast dot.
    """
    c = r.shape[0]
    row, col = _iota(c, 0), _iota(c, 1)
    incl, strict = col <= row, col < row
    suffix_ones = jnp.where(col >= row, 1.0, 0.0)  # suffix_ones @ x: reverse cumsum over time
    u0, _ = _value_terms(dots, t, v)
    # State path: U = U0 + W S^T; S' = S e^{gC} + V^T kg + U^T bg; Y = Y0 + Q S^T.
    u = u0 + dots.exact(t.wm, s, tb=True)
    du = dots.exact(t.bg, ds_next, tb=True)
    dbg = dots.fast(u, ds_next)
    dwm = dots.fast(du, s)
    dq = dots.fast(dy, s)
    dgc = t.e_gc * jnp.sum(ds_next * s, axis=0, keepdims=True)
    dv = dots.fast(t.kg, ds_next, tb=True)
    dkg = dots.fast(v, ds_next)
    # Y0 = A_qk V + A_qb U0 and Q = rg + A_qb W.
    da_qk = _masked(dots.fast(dy, v, tb=True), incl)
    dv = dv + dots.fast(t.a_qk, dy, ta=True)
    du0 = du + dots.fast(t.a_qb, dy, ta=True)
    da_qb = _masked(dots.fast(dy, u0, tb=True) + dots.fast(dq, t.wm, tb=True), incl)
    dwm = dwm + dots.fast(t.a_qb, dq, ta=True)
    # [U0 | W] = P [A_ak V | ag].
    dx0 = dots.exact(t.p, du0, ta=True)
    dag = dots.exact(t.p, dwm, ta=True)
    da_ab = _masked(dots.fast(dx0, u0, tb=True) + dots.fast(dag, t.wm, tb=True), strict)
    da_ak = _masked(dots.fast(dx0, v, tb=True), strict)
    dv = dv + dots.fast(t.a_ak, dx0, ta=True)
    # The centred factors of A_qk = R~K~^T, A_qb = R~B~^T, A_ak = A~K~^T, A_ab = A~B~^T.
    dr_c = dots.fast(da_qk, t.k_c) + dots.fast(da_qb, t.b_c)
    dk_c = dots.fast(da_qk, t.r_c, ta=True) + dots.fast(da_ak, t.a_c, ta=True)
    db_c = dots.fast(da_qb, t.r_c, ta=True) + dots.fast(da_ab, t.a_c, ta=True)
    da_c = dots.fast(da_ak, t.k_c) + dots.fast(da_ab, t.b_c)
    dr = dr_c * t.e_in + dq * t.e_gi
    dk = dk_c * t.e_out + dkg * t.e_tail
    db = db_c * t.e_out + dbg * t.e_tail
    da = da_c * t.e_ex + dag * t.e_ge
    # Log-decay: x * dx is the cotangent of x's exponent; r, k, b carry gi (k, b with a
    # minus sign), a carries ge = gi - w, kg / bg / S' carry gC = gi[C-1].
    dgc = dgc + jnp.sum(t.kg * dkg + t.bg * dbg, axis=0, keepdims=True)
    last = lax.broadcasted_iota(jnp.int32, r.shape, 0) == c - 1
    d_gi = r * dr - k * dk - b * db + jnp.where(last, dgc, 0.0)
    d_ge = a * da
    dw = dots.sum(suffix_ones, d_gi + d_ge) - d_ge
    return (dr, dw, dk, dv, da, db), du


def _state_step(dots, s, decay, wm, bg, kg, u0, v):
    """The state after a chunk from S before it: S e^{gC} + V^T kg + U^T bg, U = U0 + W S^T.

    s [VT, N] (a value tile's rows); decay e^{gC} [1, N]; wm, bg, kg [C, N]; u0, v [C, VT].
    Exact dots: every one of them feeds the carried state."""
    u = u0 + dots.exact(wm, s, tb=True)
    return s * decay + dots.exact(v, kg, ta=True) + dots.exact(u, bg, ta=True)


def _cotangent_step(dots, ds_next, decay, wm, q, du, dy):
    """The state's cotangent before a chunk from dS' after it: dS' e^{gC} + dU^T W + dY^T Q,
    with dU = bg dS'^T [C, VT] and dy [C, VT]; exact dots, it is carried to every earlier
    chunk."""
    return ds_next * decay + dots.exact(du, wm, ta=True) + dots.exact(dy, q, ta=True)


def _load_chunk(refs, rows):
    return tuple(ref[rows, :].astype(jnp.float32) for ref in refs)


# --------------------------------------------------------------------------------------------
# Kernels. Every ref is one (batch x head)'s block; v / y / dv / states hold one value tile.


def _forward_kernel(r_ref, w_ref, k_ref, v_ref, a_ref, b_ref, s0_ref, y_ref, s_out_ref,
                    *starts_ref, chunk, n_chunks, dots):  # fmt: skip
    """Walks the chunks in order; optionally stores each chunk's start state for the backward."""

    def step(i, s):
        rows = pl.ds(pl.multiple_of(i * chunk, chunk), chunk)
        r, w, k, a, b = _load_chunk((r_ref, w_ref, k_ref, a_ref, b_ref), rows)
        v = v_ref[rows, :].astype(jnp.float32)
        if starts_ref:
            starts_ref[0][i, :, :] = s
        t = _chunk_terms(dots, r, w, k, a, b)
        u0, y0 = _value_terms(dots, t, v)
        # Q S^T reaches only y (fast); the new state's dots are exact.
        y_ref[rows, :] = y0 + dots.fast(t.q, s, tb=True)
        return _state_step(dots, s, t.e_gc, t.wm, t.bg, t.kg, u0, v)

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
        t = _chunk_terms(dots, r, w, k, a, b)
        grads, du = _chunk_gradients(dots, t, r, k, v, a, b, dy, s, ds_next)
        for ref, grad in zip((dr_ref, dw_ref, dk_ref, dv_ref, da_ref, db_ref), grads, strict=True):
            ref[rows, :] = grad
        return _cotangent_step(dots, ds_next, t.e_gc, t.wm, t.q, du, dy)

    ds0_ref[...] = lax.fori_loop(0, n_chunks, step, ds_out_ref[...])


# --------------------------------------------------------------------------------------------
# pallas_call wrappers on head-major [BH, Tp, N] arrays, Tp a multiple of the chunk.


def _compiler_params(cfg, num_stages=NUM_STAGES):
    # Explicit Triton params: without them pallas_call on GPU is routed to Mosaic GPU.
    return plgpu.CompilerParams(num_warps=cfg.num_warps, num_stages=num_stages)


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
        compiler_params=_compiler_params(cfg),
        interpret=cfg.interpret,
        name="wkv7_gpu_forward",
    )(r, w, k, v, a, b, s0)


def sum_tiles(partials):
    """[BH, tiles, Tp, N] key-side gradient partials (one per value tile) -> [BH, Tp, N]."""
    return partials.sum(axis=1) if partials.shape[1] > 1 else partials[:, 0]


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
        compiler_params=_compiler_params(cfg),
        interpret=cfg.interpret,
        name="wkv7_gpu_backward",
    )(r, w, k, v, a, b, starts, dy, ds_final)
    dr, dw, dk, da, db = map(sum_tiles, outs[:5])
    return dr, dw, dk, outs[5], da, db, outs[6]


@partial(jax.custom_vjp, nondiff_argnums=(0,))
def _wkv7_heads(cfg, xs, s0):
    """(y [BH, Tp, N], final state [BH, N, N]) fp32 for head-major xs = (r, w, k, v, a, b)."""
    y, s_final = _forward_call(cfg, xs, s0, save_starts=False)
    return y, s_final


def _wkv7_heads_fwd(cfg, xs, s0):
    y, s_final, starts = _forward_call(cfg, xs, s0, save_starts=True)
    # Residuals: the inputs (alive anyway) and one fp32 state per chunk; the chunk
    # intermediates are recomputed in the backward kernel.
    return (y, s_final), (xs, starts)


def _wkv7_heads_bwd(cfg, res, cot):
    xs, starts = res
    dy, ds_final = cot
    dr, dw, dk, dv, da, db, ds0 = _backward_call(
        cfg, xs, starts, dy.astype(jnp.float32), ds_final.astype(jnp.float32)
    )
    grads = tuple(g.astype(x.dtype) for g, x in zip((dr, dw, dk, dv, da, db), xs, strict=True))
    return grads, ds0


_wkv7_heads.defvjp(_wkv7_heads_fwd, _wkv7_heads_bwd)


# --------------------------------------------------------------------------------------------
# Public entry.


def _is_power_of_two(x):
    return isinstance(x, int) and not isinstance(x, bool) and x > 0 and x & (x - 1) == 0


def target_programs(interpret=False):
    """How many programs fill the GPU: the SM count of JAX's first device when JAX's default
    backend is a GPU and the kernels are compiled (not interpreted), else TARGET_PROGRAMS
    (an H100's 132), so interpret-mode runs and cross-lowering pick the same tiles anywhere."""
    if interpret or jax.default_backend() != "gpu":
        return TARGET_PROGRAMS
    count = getattr(jax.devices()[0], "core_count", None)
    return count if isinstance(count, int) and count > 0 else TARGET_PROGRAMS


def _auto_value_tile(n, programs_per_tile, target=TARGET_PROGRAMS):
    """Largest value tile (>= 16) that gives at least `target` programs, else 16.

    Halving the tile doubles the programs but also the (duplicated) key-side chunk work, so
    full rows are kept whenever batch x heads alone fills the GPU.
    """
    vt = n
    while vt > MIN_VALUE_TILE and programs_per_tile * (n // vt) < target:
        vt //= 2
    return vt


def _auto_segments(programs, n_chunks, target=TARGET_PROGRAMS):
    """Segments for the factored schedule's passes: doubled while the passes' programs
    (B*H x value tiles x segments) stay below `target`, up to MAX_SEGMENTS and while
    segments keep >= MIN_SEGMENT_CHUNKS chunks (n_chunks None: no such bound).

    Below `target` (the SM count) most SMs idle while the passes walk T / C chunks in order, one
    latency-bound step each; segments shorten that walk at three times the pass work."""
    segments = 1
    while (
        programs * segments < target
        and segments < MAX_SEGMENTS
        and (n_chunks is None or n_chunks // (2 * segments) >= MIN_SEGMENT_CHUNKS)
    ):
        segments *= 2
    return segments


def _check_tile(name, tile, n):
    """A value tile (state rows per program) must be a power of two in [MIN_VALUE_TILE, N]."""
    if not (_is_power_of_two(tile) and MIN_VALUE_TILE <= tile <= n):
        raise ValueError(
            f"wkv7_gpu: {name} must be None or a power of two in [{MIN_VALUE_TILE}, N = {n}] "
            f"(it must divide N), got {tile!r}"
        )


def _check_count(name, value, limit):
    """A count option (scan_group, segments) must be None or a power of two in [1, limit]."""
    if value is not None and not (_is_power_of_two(value) and value <= limit):
        raise ValueError(
            f"wkv7_gpu: {name} must be None or a power of two in [1, {limit}], got {value!r}"
        )


def _schedule_settings(schedule, chunk_size, num_warps, n, gradient_value_tile, scan_group,
                       segments):  # fmt: skip
    """(schedule, chunk_size, num_warps, gradient_value_tile, scan_group) with None replaced by
    the schedule's defaults; gradient_value_tile applies to CHUNK_GRADIENT_SCHEDULES (N
    otherwise), scan_group to "chunk_parallel" (1 otherwise), segments (checked here, chosen
    by resolve_config) to "factored"."""
    _check_choice("schedule", schedule, SCHEDULES)
    schedule = DEFAULT_SCHEDULE if schedule is None else schedule
    defaults = SCHEDULE_DEFAULTS[schedule]
    chunk_size = defaults["chunk_size"] if chunk_size is None else chunk_size
    num_warps = defaults["num_warps"] if num_warps is None else num_warps
    options = (
        ("gradient_value_tile", gradient_value_tile, CHUNK_GRADIENT_SCHEDULES),
        ("scan_group", scan_group, ("chunk_parallel",)),
        ("segments", segments, ("factored",)),
    )
    for name, value, schedules in options:
        if value is not None and schedule not in schedules:
            only = " / ".join(repr(s) for s in schedules)
            raise ValueError(
                f"wkv7_gpu: {name} applies to schedule={only} only; got schedule={schedule!r}"
            )
    if schedule not in CHUNK_GRADIENT_SCHEDULES:
        return schedule, chunk_size, num_warps, n, 1
    if gradient_value_tile is None:
        gradient_value_tile = min(defaults["gradient_value_tile"], n)
    _check_tile("gradient_value_tile", gradient_value_tile, n)
    _check_count("scan_group", scan_group, MAX_SCAN_GROUP)
    _check_count("segments", segments, MAX_SEGMENTS)
    if scan_group is None:
        scan_group = defaults.get("scan_group", 1)
    return schedule, chunk_size, num_warps, gradient_value_tile, scan_group


def _check_arguments(n, chunk_size, value_tile, dot_precision, exact_dot_precision, num_warps,
                     dtypes):  # fmt: skip
    if not _is_power_of_two(chunk_size) or not MIN_CHUNK_SIZE <= chunk_size <= MAX_CHUNK_SIZE:
        raise ValueError(
            f"wkv7_gpu: chunk_size must be a power of two in [{MIN_CHUNK_SIZE}, "
            f"{MAX_CHUNK_SIZE}], got {chunk_size!r} (Triton dots need every dim >= 16; larger "
            "chunks exceed the register budget of one program)"
        )
    if not _is_power_of_two(n) or n < MIN_VALUE_TILE:
        raise ValueError(
            f"wkv7_gpu: head size N must be a power of two >= {MIN_VALUE_TILE} (Triton block "
            f"shapes), got N = {n}"
        )
    if value_tile is not None:
        _check_tile("value_tile", value_tile, n)
    _check_choice("dot_precision", dot_precision, DOT_PRECISIONS)
    _check_choice("exact_dot_precision", exact_dot_precision, EXACT_DOT_PRECISIONS)
    if not _is_power_of_two(num_warps) or num_warps > 16:
        raise ValueError(
            f"wkv7_gpu: num_warps must be a power of two in [1, 16], got {num_warps!r}"
        )
    for name, dtype in dtypes:
        if jnp.dtype(dtype) not in _SUPPORTED_DTYPES:
            raise ValueError(
                f"wkv7_gpu: {name} has dtype {jnp.dtype(dtype)}; expected float32, bfloat16 "
                "or float16"
            )


def wkv7_gpu(
    r, w, k, v, a, b, state=None, *, chunk_size=None, value_tile=None, dot_precision=None,
    exact_dot_precision=None, schedule=None, num_warps=None, gradient_value_tile=None,
    scan_group=None, segments=None, interpret=False,
):  # fmt: skip
    """WKV-7 on GPU (Pallas-Triton): same result as `wkv7_reference`, differentiable.

    Per batch and head, with S in R^{N x N} (rows index value dims, columns key dims):
        S_t = S_{t-1} diag(exp(w_t)) + (S_{t-1} a_t) b_t^T + v_t k_t^T,   y_t = S_t r_t.
    The sequence is cut into chunks; with the default schedule one program per (batch x head,
    value tile) loops over them with its state rows in registers. The custom VJP stores one
    fp32 state per chunk (N^2 * 4 / chunk_size bytes per token and head) and recomputes
    everything else in the backward. T need not be a multiple of the chunk: the tail is padded with
    r = k = v = a = b = 0, w = 0, which leaves the state untouched.

    Inputs are loaded in their own dtype and computed in fp32 (decay sums, exponents, state);
    `dot_precision` and `exact_dot_precision` pick the dots' operand precision (always fp32
    accumulation); gradients come back in the input dtypes. The chunk's centred
    exponents stay finite for |w| * chunk_size / 2 < ~40: RWKV-7's w >= -0.6065 is safe for
    every allowed chunk.

    Args:
        r, w, k, v, a, b: [B, T, H, N] float32 / bfloat16 / float16; `w` is the log-decay
            (w <= 0); in RWKV-7, a = -kk and b = kk * a_rate. N a power of two >= 16.
        state: optional initial state [B, H, N, N] (zeros if None), cast to fp32.
        chunk_size: static power of two in [16, 64], or None: the schedule's default
            (`SCHEDULE_DEFAULTS`; 16 for both). On an H100 the chunk-parallel schedule's
            gradient at chunk 64 had not compiled after ~2 minutes (docs/BENCHMARKS.md).
        value_tile: static power of two in [16, N], the state rows per program; None picks N
            when B * H fills the GPU's SMs (`target_programs`), smaller tiles otherwise.
        dot_precision: static; "highest" (IEEE fp32 dots, no tensor cores: exact, slow),
            "tf32x3" (three TF32 tensor-core passes, near-fp32; interpret mode runs it as
            "highest"), "bf16" (bf16 operands, fp32 accumulation, for the intra-chunk C x C
            matrices and the products that reach only y or a per-token gradient; the decay
            sums stay IEEE fp32, the other dots follow exact_dot_precision), or None: "bf16"
            when any of r, w, k, v, a, b is bfloat16 / float16, "highest" when all are
            float32.
        exact_dot_precision: static; the dots whose errors reach the chunk-to-chunk
            transition and compound over T: A_ab, the inverse (I - A_ab)^{-1} and its
            products, and every dot that multiplies the carried state or its cotangent or
            makes their increments. "highest" (IEEE fp32 on the FMA units), "tf32x3" (as
            above), "bf16x3" (each fp32 operand split into two bf16 parts, three tensor-core
            products: ~2^-16 relative per product), or None: "tf32x3" when dot_precision is
            "tf32x3", else "highest".
        schedule: static; "sequential" (one program per batch x head and value tile walks
            the chunks, the whole chunk maths on its critical path), "chunk_parallel" (the
            chunk maths in parallel over chunks, only an N x N affine map of the state per
            chunk in order; see `gpu_chunk_parallel`), "factored" (the chunk maths in
            parallel, stored as [C, N] factors per chunk, then one pass in order that applies
            them to the state and writes y; see `gpu_factored`), or None: `DEFAULT_SCHEDULE`
            ("sequential"). Same maths and dot precision plan; with "chunk_parallel" /
            "factored", value_tile applies to the state scans / passes.
        num_warps: static; Triton warps per program, every kernel of the call, or None: the
            schedule's default (4 sequential, 8 chunk-parallel and factored).
        gradient_value_tile: static, "chunk_parallel" / "factored" only; the state rows per
            program of the backward's gradient kernel (grid B*H x chunks x N / tile; key-side
            gradients are summed over the tiles), a power of two in [16, N], or None: 32 (at
            most N).
        scan_group: static, "chunk_parallel" only; chunks whose maps XLA composes into one
            step of the state scans (fewer sequential steps for ~N^3 parallel work per chunk
            each way), a power of two in [1, 16], or None: 1.
        segments: static, "factored" only; parts of the sequence (padded to a multiple of
            chunk_size x segments) whose in-order passes run in parallel: a first pass finds
            each part's map and the state it makes from zero, XLA chains them into the
            parts' start states, and the pass proper runs from those (two walks over
            T / segments chunks instead of one over T, for three times the pass work). A
            power of two in [1, 16], or None: doubled from 1 while the passes run fewer
            programs than the GPU has SMs (`target_programs`) and each part keeps >=
            MIN_SEGMENT_CHUNKS chunks.
        interpret: run the kernels in Pallas interpret mode (CPU testing).

    Returns:
        y: [B, T, H, N] float32; final_state: [B, H, N, N] float32.

    Raises:
        ValueError: on mismatched shapes, a bad chunk_size / value_tile / dot_precision /
            exact_dot_precision / schedule / num_warps / gradient_value_tile / scan_group /
            segments / head size or an unsupported dtype.
    """
    batch, seq, heads, n = check_wkv7_shapes(r, w, k, v, a, b, state)
    named = (("r", r), ("w", w), ("k", k), ("v", v), ("a", a), ("b", b))
    dtypes = [(name, x.dtype) for name, x in named]
    if state is not None:
        dtypes.append(("state", state.dtype))
    schedule, cfg = resolve_config(
        n, batch * heads, dtypes, chunk_size=chunk_size, value_tile=value_tile,
        dot_precision=dot_precision, exact_dot_precision=exact_dot_precision,
        schedule=schedule, num_warps=num_warps, gradient_value_tile=gradient_value_tile,
        scan_group=scan_group, segments=segments, seq_len=seq, interpret=interpret,
    )  # fmt: skip
    if state is None:
        state = jnp.zeros((batch, heads, n, n), jnp.float32)
    if seq == 0:
        return jnp.zeros(r.shape, jnp.float32), state.astype(jnp.float32)
    s0 = state.astype(jnp.float32).reshape(batch * heads, n, n)
    if schedule == "factored":
        from pallas_kernels.wkv7.gpu_factored import wkv7_tokens_factored

        # Its kernels read and write the token-major arrays as they are: no transposes.
        xs = tuple(pad_tokens(x, cfg.chunk * cfg.segments) for _, x in named)
        y, s_final = wkv7_tokens_factored(cfg, xs, s0)
        return y[:, :seq], s_final.reshape(batch, heads, n, n)
    xs = tuple(head_major(x, cfg.chunk) for _, x in named)
    if schedule == "chunk_parallel":
        from pallas_kernels.wkv7.gpu_chunk_parallel import wkv7_heads_chunk_parallel

        y, s_final = wkv7_heads_chunk_parallel(cfg, xs, s0)
    else:
        y, s_final = _wkv7_heads(cfg, xs, s0)
    y = y[:, :seq].reshape(batch, heads, seq, n).transpose(0, 2, 1, 3)
    return y, s_final.reshape(batch, heads, n, n)


def resolve_config(
    n, programs_per_tile, dtypes, *, chunk_size=None, value_tile=None, dot_precision=None,
    exact_dot_precision=None, schedule=None, num_warps=None, gradient_value_tile=None,
    scan_group=None, segments=None, seq_len=None, interpret=False,
):  # fmt: skip
    """(schedule, kernel config) for wkv7_gpu's options: validated, None filled in.

    n: head size; programs_per_tile: B * H; dtypes: [(name, dtype)] of the inputs (and the
    state, named "state"); seq_len: T (bounds the automatic segments; None: no bound). Also
    used by bench/wkv7.py to run single kernels as wkv7_gpu would.
    """
    schedule, chunk_size, num_warps, gradient_tile, scan_group = _schedule_settings(
        schedule, chunk_size, num_warps, n, gradient_value_tile, scan_group, segments
    )
    _check_arguments(
        n, chunk_size, value_tile, dot_precision, exact_dot_precision, num_warps, dtypes
    )
    if dot_precision is None:
        half = any(jnp.dtype(dt) in _HALF_DTYPES for name, dt in dtypes if name != "state")
        dot_precision = "bf16" if half else "highest"
    if exact_dot_precision is None:
        exact_dot_precision = "tf32x3" if dot_precision == "tf32x3" else "highest"
    target = target_programs(interpret)
    if value_tile is None:
        value_tile = _auto_value_tile(n, programs_per_tile, target)
    if segments is None:
        n_chunks = None if seq_len is None else -(-seq_len // chunk_size)
        programs = programs_per_tile * (n // value_tile)
        segments = _auto_segments(programs, n_chunks, target) if schedule == "factored" else 1
    cfg = _Config(
        chunk_size, value_tile, bool(interpret), dot_precision, exact_dot_precision, num_warps,
        gradient_tile, scan_group, segments,
    )  # fmt: skip
    return schedule, cfg


def pad_tokens(x, multiple):
    """[B, T, H, N] -> [B, Tp, H, N], the tail zero-padded to Tp, a multiple of `multiple`
    (zero inputs, w = 0 included, leave the state untouched)."""
    pad = -x.shape[1] % multiple
    return jnp.pad(x, ((0, 0), (0, pad), (0, 0), (0, 0))) if pad else x


def head_major(x, chunk):
    """[B, T, H, N] -> [B*H, Tp, N], the tail zero-padded to Tp, a multiple of chunk (zero
    inputs, w = 0 included, leave the state untouched)."""
    batch, seq, heads, n = x.shape
    x = x.transpose(0, 2, 1, 3).reshape(batch * heads, seq, n)
    pad = -seq % chunk
    return jnp.pad(x, ((0, 0), (0, pad), (0, 0))) if pad else x
