"""The plan every WKV-7 GPU schedule runs: its dot precision plan, static settings and chunk maths.

Every schedule (`gpu_sequential`, the default; `experimental.chunk_parallel` and
`experimental.factored`) runs these per-chunk functions inside its kernels, under the dot
precision plan `DotPlan` and the settings `KernelConfig` that `gpu_options.GpuOptions.resolve`
makes.

The maths is that of `xla_chunked` (chunk terms with exponents centred mid-chunk, the stable
block-recursive (I - A_ab)^{-1}, the hand-derived chunk backward), written as 2-D dots that
Triton can lower.

Value tiles: the state's rows (value dims) evolve independently,
    S_t = S_{t-1} (diag(e^{w_t}) + a_t b_t^T) + v_t k_t^T,
so a program holding rows [j*VT, (j+1)*VT) is exact on its own. The key-side gradients
(dr, dw, dk, da, db) sum over all value rows: each tile writes its partial sums and XLA adds
them up. Key-side chunk terms (the C x C matrices, the inverse) are recomputed per tile, so
tiles smaller than N trade duplicated work for more programs on a GPU with few heads.

Dot precision (see `DotPlan`): every dot is a "sum" (the decay sums), "exact" (A_ab, the
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
from jax.experimental.pallas import triton as plgpu

# Triton's num_stages unless a kernel asks for more: no software pipelining. The sequential
# kernels' chunk loop is dominated by dependent dots on register-resident state, where
# pipelining only adds register pressure; the per-chunk parallel kernels have no loop.
NUM_STAGES = 1


def bf16_parts(x):
    """x fp32 as hi + lo, both bf16: hi = bf16(x), lo = bf16(x - hi). hi + lo keeps ~16 of
    x's 24 significant bits (the rest, below 2^-17 |x|, is dropped)."""
    hi = x.astype(jnp.bfloat16)
    return hi, (x - hi.astype(jnp.float32)).astype(jnp.bfloat16)


def split_bf16_dot(dot, x, y):
    """x y for fp32 x, y as three products of bf16 parts, lo·hi + hi·lo + hi·hi (lo·lo, below
    2^-16 relative, dropped), the small ones first as XLA's BF16_BF16_F32_X3 orders them.
    `dot(a, b)` multiplies two bf16 operands with fp32 accumulation (in a kernel or in XLA)."""
    (x_hi, x_lo), (y_hi, y_lo) = bf16_parts(x), bf16_parts(y)
    return dot(x_lo, y_hi) + dot(x_hi, y_lo) + dot(x_hi, y_hi)


@dataclasses.dataclass(frozen=True)
class DotPlan:
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
class KernelConfig:
    """One call's static kernel settings, every option resolved (`GpuOptions.resolve`);
    hashable, since the schedules' custom VJPs take it as a nondiff argument."""

    schedule: str  # which schedule's kernels run: gpu_options.SCHEDULES
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
        """The dot precision plan of these settings."""
        return DotPlan(self.dot_precision, self.exact_dot_precision, self.interpret)


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


class ChunkTerms(NamedTuple):
    """A chunk's key-side, state-free terms; as in `xla_chunked`. fp32, except that
    r_c, k_c, b_c, a_c, a_qk, a_qb and a_ak, which only fast dots use, are in the dtype those
    take (`DotPlan.operand`)."""

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


def chunk_terms(dots, r, w, k, a, b):
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
    return ChunkTerms(
        e_in, e_out, e_ex, e_gi, e_ge, e_tail, e_gc, r_c, k_c, b_c, a_c,
        k * e_tail, b * e_tail, a_qk, a_qb, a_ak, p, wm, q,
    )  # fmt: skip


def value_terms(dots, t, v):
    """U0 = P A_ak V and Y0 = A_qk V + A_qb U0 for a value tile v [C, VT]."""
    u0 = dots.exact(t.p, dots.fast(t.a_ak, v))
    y0 = dots.fast(t.a_qk, v) + dots.fast(t.a_qb, u0)
    return u0, y0


def chunk_gradients(dots, t, r, k, v, a, b, dy, s, ds_next):
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
    u0, _ = value_terms(dots, t, v)
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


def state_step(dots, s, decay, wm, bg, kg, u0, v):
    """The state after a chunk from S before it: S e^{gC} + V^T kg + U^T bg, U = U0 + W S^T.

    s [VT, N] (a value tile's rows); decay e^{gC} [1, N]; wm, bg, kg [C, N]; u0, v [C, VT].
    Exact dots: every one of them feeds the carried state."""
    u = u0 + dots.exact(wm, s, tb=True)
    return s * decay + dots.exact(v, kg, ta=True) + dots.exact(u, bg, ta=True)


def cotangent_step(dots, ds_next, decay, wm, q, du, dy):
    """The state's cotangent before a chunk from dS' after it: dS' e^{gC} + dU^T W + dY^T Q,
    with dU = bg dS'^T [C, VT] and dy [C, VT]; exact dots, it is carried to every earlier
    chunk."""
    return ds_next * decay + dots.exact(du, wm, ta=True) + dots.exact(dy, q, ta=True)


# --------------------------------------------------------------------------------------------
# Shared by the schedules' pallas_call wrappers.


def compiler_params(cfg, num_stages=NUM_STAGES):
    """Triton launch settings of a schedule's pallas_call: cfg.num_warps and num_stages."""
    # Explicit Triton params: without them pallas_call on GPU is routed to Mosaic GPU.
    return plgpu.CompilerParams(num_warps=cfg.num_warps, num_stages=num_stages)


def sum_tiles(partials):
    """[BH, tiles, Tp, N] key-side gradient partials (one per value tile) -> [BH, Tp, N]."""
    return partials.sum(axis=1) if partials.shape[1] > 1 else partials[:, 0]
