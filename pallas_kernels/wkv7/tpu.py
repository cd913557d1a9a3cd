"""WKV-7 as Pallas TPU (Mosaic) kernels: chunked forward, chunk-reverse backward, one custom_vjp.

Layout: the six token inputs go head-major, [B*H, T, N], and each kernel walks a grid
(B*H, T/C) with semantics ("parallel", "arbitrary"): heads in parallel (both TensorCores of a
v4/v5p chip), chunks in order with the fp32 state (forward) or its cotangent (backward) carried
in an N x N VMEM scratch. Blocks are (C, N) slices of the [T, N] plane of one head; N = 64 is the
full last dimension, which is what makes a 64-lane block legal.

Maths (the same as `xla_chunked`, which derives it; all exact rewrites of the recurrence), for a
chunk of C tokens entered with state S [V, K]:
    gi = cumsum(w), ge = gi - w, gC = gi[C-1], off = gi[C/2] (centres the exponents);
    R~ = r e^{gi-off}, K~ = k e^{off-gi}, B~ = b e^{off-gi}, A~ = a e^{ge-off};
    A_qk = incl(R~ K~^T), A_qb = incl(R~ B~^T), A_ak = strict(A~ K~^T), A_ab = strict(A~ B~^T);
    rg = r e^{gi}, ag = a e^{ge}, kg = k e^{gC-gi}, bg = b e^{gC-gi};
    X = A_ak V + ag S^T,  U = (I - A_ab)^{-1} X  (row i of U is (S_{i-1} a_i)^T),
    Y = rg S^T + A_qk V + A_qb U,  S' = S e^{gC} + V^T kg + U^T bg.
Mosaic has no cumsum and no triangular solve, so the cumulative sums are matmuls with triangles
of ones and (I - A_ab)^{-1} is the block recursion of `xla_chunked._unit_lower_inverse`
(P_2m = P_m + P_m L_m P_m, stable; the product form prod(I + A^{2^m}) is not, in fp32).

Residuals: the forward kernel, when differentiated, also writes the state at the start of every
chunk (N^2 * 4 / C bytes per token per head: 256 B at C = 64, a sixth of the fp32 inputs), so the
backward kernel needs no forward recomputation across chunks; only the chunk-local C x C terms
are recomputed in the backward.

bf16 inputs: the intra-chunk and output matmuls (the A_* products and their products with V,
U, dY and their cotangents) take bf16 operands with fp32 accumulation; the decay sums, the
inverse (I - A_ab)^{-1}, every product with the state or its cotangent, and the cumulative sums
stay fp32 at precision HIGHEST. Gradients come back in each input's dtype.
"""

from __future__ import annotations

from functools import partial
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.wkv7.reference import check_wkv7_shapes
from pallas_kernels.wkv7.xla_chunked import check_chunk_size

_HIGHEST = lax.Precision.HIGHEST
_F32 = jnp.float32

DEFAULT_CHUNK_SIZE = 64


# ---------------------------------------------------------------------------------------------
# In-kernel helpers (traced inside the Pallas kernels; also plain JAX, so they run anywhere).
# ---------------------------------------------------------------------------------------------

# Contraction patterns for lax.dot_general on 2-D operands: Mosaic's matmul takes any of them,
# which spares explicit transposes of (C, N) / (C, C) values.
_NN = (((1,), (0,)), ((), ()))  # x @ y
_NT = (((1,), (1,)), ((), ()))  # x @ y^T
_TN = (((0,), (0,)), ((), ()))  # x^T @ y


def _dot(x, y, dims, *, low=False):
    """fp32-accumulated 2-D matmul: fp32 operands at HIGHEST, or bf16 operands when `low`.

    HIGHEST matters on the MXU: DEFAULT runs fp32 operands as a single bf16 pass.
    """
    if low:
        x, y = x.astype(jnp.bfloat16), y.astype(jnp.bfloat16)
        return lax.dot_general(x, y, dims, preferred_element_type=_F32)
    return lax.dot_general(x, y, dims, precision=_HIGHEST, preferred_element_type=_F32)


def _iota(c, axis):
    return lax.broadcasted_iota(jnp.int32, (c, c), axis)


def _lower(x, *, strict):
    """Keeps the lower triangle of a (C, C) value (strict also drops the diagonal).

    `where`, not a multiply by a 0/1 mask: the dropped entries of the centred products can be
    inf (e^{+77} times the inputs), and inf * 0 would be NaN.
    """
    c = x.shape[0]
    row, col = _iota(c, 0), _iota(c, 1)
    keep = row > col if strict else row >= col
    return jnp.where(keep, x, 0.0)


def _ones_lower(c):
    """(C, C) fp32 triangle of ones, ones[t, s] = 1 for s <= t: its matmul is a cumulative sum."""
    return jnp.where(_iota(c, 0) >= _iota(c, 1), 1.0, 0.0).astype(_F32)


def _sum_rows(x):
    """Sum over the first (time / value) axis of a 2-D value, kept as a length-1 axis."""
    return jnp.sum(x, axis=0, keepdims=True)


def _block_id(idx, size):
    """idx // size for a non-negative int32 iota and a static power of two (`lax.div`, not `//`:
    floor division of traced ints lowers to extra sign fix-ups)."""
    return lax.div(idx, jnp.full_like(idx, size))


def _unit_lower_inverse(a_ab):
    """(I - A)^{-1} for a strictly lower-triangular (C, C) fp32 value, C a power of two.

    Block recursion on diagonal blocks, P_2m = P_m + P_m L_m P_m (see
    `xla_chunked._unit_lower_inverse` for why not the product form): 2 log2(C) - 2 matmuls,
    masks from iotas.
    """
    c = a_ab.shape[0]
    row, col = _iota(c, 0), _iota(c, 1)
    eye = jnp.where(row == col, 1.0, 0.0).astype(_F32)
    p = eye + jnp.where(_block_id(row, 2) == _block_id(col, 2), a_ab, 0.0)
    m = 2
    while m < c:
        below = (_block_id(row, 2 * m) == _block_id(col, 2 * m)) & (
            _block_id(row, m) != _block_id(col, m)
        )
        l_m = jnp.where(below, a_ab, 0.0)
        p = p + _dot(p, _dot(l_m, p, _NN), _NN)
        m *= 2
    return p


class _Chunk(NamedTuple):
    """A chunk's state-free terms, fp32 (C tokens, N = head size)."""

    e_in: jax.Array  # e^{gi - off} [C, N]
    e_out: jax.Array  # e^{off - gi} [C, N]
    e_ex: jax.Array  # e^{ge - off} [C, N]
    e_gi: jax.Array  # e^{gi} [C, N]
    e_ge: jax.Array  # e^{ge} [C, N]
    e_tail: jax.Array  # e^{gC - gi} [C, N]
    e_gc: jax.Array  # e^{gC} [1, N]
    r_c: jax.Array  # R~ [C, N]
    k_c: jax.Array  # K~ [C, N]
    b_c: jax.Array  # B~ [C, N]
    a_c: jax.Array  # A~ [C, N]
    rg: jax.Array  # r e^{gi} [C, N]
    ag: jax.Array  # a e^{ge} [C, N]
    kg: jax.Array  # k e^{gC - gi} [C, N]
    bg: jax.Array  # b e^{gC - gi} [C, N]
    a_qk: jax.Array  # incl(R~ K~^T) [C, C]
    a_qb: jax.Array  # incl(R~ B~^T) [C, C]
    a_ak: jax.Array  # strict(A~ K~^T) [C, C]
    p: jax.Array  # (I - strict(A~ B~^T))^{-1} [C, C]


def _chunk_terms(r, w, k, a, b, *, low):
    """Builds the state-free terms of a chunk from fp32 (C, N) values."""
    c = w.shape[0]
    row = lax.broadcasted_iota(jnp.int32, w.shape, 0)
    gi = _dot(_ones_lower(c), w, _NN)
    # gC and the centre gi[C/2] as masked column sums rather than row slices of a value.
    gc = _sum_rows(w)
    off = _sum_rows(jnp.where(row <= c // 2, w, 0.0))
    e_in, e_out = jnp.exp(gi - off), jnp.exp(off - gi)
    e_ex = e_in * jnp.exp(-w)
    e_off = jnp.exp(off)
    e_gi, e_ge = e_in * e_off, e_ex * e_off
    e_tail, e_gc = e_out * jnp.exp(gc - off), jnp.exp(gc)
    r_c, k_c, b_c, a_c = r * e_in, k * e_out, b * e_out, a * e_ex
    a_qk = _lower(_dot(r_c, k_c, _NT, low=low), strict=False)
    a_qb = _lower(_dot(r_c, b_c, _NT, low=low), strict=False)
    a_ak = _lower(_dot(a_c, k_c, _NT, low=low), strict=True)
    a_ab = _lower(_dot(a_c, b_c, _NT), strict=True)
    return _Chunk(
        e_in, e_out, e_ex, e_gi, e_ge, e_tail, e_gc, r_c, k_c, b_c, a_c,
        r * e_gi, a * e_ge, k * e_tail, b * e_tail, a_qk, a_qb, a_ak, _unit_lower_inverse(a_ab),
    )  # fmt: skip


def _chunk_u(t, v, s, *, low):
    """U = P (A_ak V + ag S^T) [C, V]: row i is (S_{i-1} a_i)^T."""
    x = _dot(t.a_ak, v, _NN, low=low) + _dot(t.ag, s, _NT)
    return x, _dot(t.p, x, _NN)


# ---------------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------------


def _forward_kernel(*refs, n_chunks, low, keep_starts):
    """One (head, chunk) step: y for the chunk, state carried in VMEM scratch.

    refs: r, w, k, v, a, b (C, N) blocks; s0 (N, N); outputs y (C, N) fp32, final state (N, N),
    [chunk start state (N, N)]; scratch state (N, N) fp32.
    """
    r_ref, w_ref, k_ref, v_ref, a_ref, b_ref, s0_ref, y_ref, s_out_ref = refs[:9]
    starts_ref = refs[9] if keep_starts else None
    s_scr = refs[-1]
    t = pl.program_id(1)

    @pl.when(t == 0)
    def _():
        s_scr[...] = s0_ref[...]

    r, w, k, v, a, b = (ref[...].astype(_F32) for ref in (r_ref, w_ref, k_ref, v_ref, a_ref, b_ref))
    s = s_scr[...]
    if keep_starts:
        starts_ref[...] = s
    terms = _chunk_terms(r, w, k, a, b, low=low)
    _, u = _chunk_u(terms, v, s, low=low)
    y = (
        _dot(terms.rg, s, _NT)
        + _dot(terms.a_qk, v, _NN, low=low)
        + _dot(terms.a_qb, u, _NN, low=low)
    )
    y_ref[...] = y
    s_new = s * terms.e_gc + _dot(v, terms.kg, _TN) + _dot(u, terms.bg, _TN)
    s_scr[...] = s_new

    @pl.when(t == n_chunks - 1)
    def _():
        s_out_ref[...] = s_new


def _backward_kernel(
    r_ref, w_ref, k_ref, v_ref, a_ref, b_ref, s_ref, dy_ref, ds_final_ref,
    dr_ref, dw_ref, dk_ref, dv_ref, da_ref, db_ref, ds0_ref, ds_scr,
    *, n_chunks, low,
):  # fmt: skip
    """One (head, chunk) step in reverse chunk order: input cotangents, dS carried in VMEM.

    With dY and dS' (the cotangent of the chunk's end state) in hand:
        dU = A_qb^T dY + bg dS'^T,  dX = P^T dU,
        dV = A_qk^T dY + A_ak^T dX + kg dS'^T,
        dA_qk = incl(dY V^T), dA_qb = incl(dY U^T), dA_ak = strict(dX V^T), dA_ab = strict(dX U^T),
        d(rg) = dY S, d(ag) = dX S, d(kg) = V dS', d(bg) = U dS',
        dS = dY^T rg + dX^T ag + dS' e^{gC},
    then through the centred factors to dr, dk, da, db, and through every exponent to dw.
    """
    i = pl.program_id(1)

    @pl.when(i == 0)
    def _():
        ds_scr[...] = ds_final_ref[...]

    r, w, k, v, a, b = (ref[...].astype(_F32) for ref in (r_ref, w_ref, k_ref, v_ref, a_ref, b_ref))
    s = s_ref[...]
    dy = dy_ref[...]
    ds_next = ds_scr[...]
    t = _chunk_terms(r, w, k, a, b, low=low)
    _, u = _chunk_u(t, v, s, low=low)

    du = _dot(t.a_qb, dy, _TN, low=low) + _dot(t.bg, ds_next, _NT)
    dx = _dot(t.p, du, _TN)
    dv = _dot(t.a_qk, dy, _TN, low=low) + _dot(t.a_ak, dx, _TN, low=low) + _dot(t.kg, ds_next, _NT)
    da_qk = _lower(_dot(dy, v, _NT, low=low), strict=False)
    da_qb = _lower(_dot(dy, u, _NT, low=low), strict=False)
    da_ak = _lower(_dot(dx, v, _NT, low=low), strict=True)
    da_ab = _lower(_dot(dx, u, _NT), strict=True)
    drg = _dot(dy, s, _NN)
    dag = _dot(dx, s, _NN)
    dkg = _dot(v, ds_next, _NN)
    dbg = _dot(u, ds_next, _NN)
    ds = _dot(dy, t.rg, _TN) + _dot(dx, t.ag, _TN) + ds_next * t.e_gc
    ds_scr[...] = ds

    # The centred factors of A_qk = R~K~^T, A_qb = R~B~^T, A_ak = A~K~^T, A_ab = A~B~^T.
    dr_c = _dot(da_qk, t.k_c, _NN, low=low) + _dot(da_qb, t.b_c, _NN, low=low)
    dk_c = _dot(da_qk, t.r_c, _TN, low=low) + _dot(da_ak, t.a_c, _TN, low=low)
    db_c = _dot(da_qb, t.r_c, _TN, low=low) + _dot(da_ab, t.a_c, _TN)
    da_c = _dot(da_ak, t.k_c, _NN, low=low) + _dot(da_ab, t.b_c, _NN)
    dr = dr_c * t.e_in + drg * t.e_gi
    dk = dk_c * t.e_out + dkg * t.e_tail
    db = db_c * t.e_out + dbg * t.e_tail
    da = da_c * t.e_ex + dag * t.e_ge
    # Log-decay: each factor is x e^{+-exponent}, so x * dx is the cotangent of its exponent.
    # r, k, b carry gi (k and b negated), a carries ge = gi - w, kg / bg / S' carry gC; w_t
    # enters gi_{t'} for t' >= t, ge_{t'} for t' > t, and gC.
    c = w.shape[0]
    row = lax.broadcasted_iota(jnp.int32, w.shape, 0)
    dgc = t.e_gc * _sum_rows(ds_next * s) + _sum_rows(t.kg * dkg + t.bg * dbg)
    d_gi = r * dr - k * dk - b * db
    d_gi = jnp.where(row == c - 1, d_gi + dgc, d_gi)
    d_ge = a * da
    # Reverse inclusive cumulative sum over time: ones_lower^T @ x.
    dw = _dot(_ones_lower(c), d_gi + d_ge, _TN) - d_ge

    for ref, g in ((dr_ref, dr), (dw_ref, dw), (dk_ref, dk), (dv_ref, dv), (da_ref, da)):
        ref[...] = g.astype(ref.dtype)
    db_ref[...] = db.astype(db_ref.dtype)

    @pl.when(i == n_chunks - 1)
    def _():
        ds0_ref[...] = ds


# ---------------------------------------------------------------------------------------------
# pallas_call wrappers on head-major inputs [G, T, N] (G = B * H, T a multiple of C)
# ---------------------------------------------------------------------------------------------


class _Config(NamedTuple):
    """Static settings of one call."""

    chunk_size: int
    low: bool  # bf16 operands for the intra-chunk matmuls
    interpret: Any  # False, True or pltpu.InterpretParams


def _compiler_params():
    return pltpu.CompilerParams(dimension_semantics=("parallel", "arbitrary"))


def _forward_call(cfg, xs, s0, *, keep_starts):
    """Runs the forward kernel.

    Args:
        xs: (r, w, k, v, a, b) [G, T, N] in their own dtypes; s0: [G, N, N] fp32.

    Returns:
        y [G, T, N] fp32, final state [G, N, N] fp32, and (keep_starts) the chunk start states
        [G, T/C, N, N] fp32.
    """
    g, seq, n = xs[0].shape
    c = cfg.chunk_size
    n_chunks = seq // c
    token_spec = pl.BlockSpec((None, c, n), lambda h, i: (h, i, 0))
    state_spec = pl.BlockSpec((None, n, n), lambda h, i: (h, 0, 0))
    out_specs = [token_spec, state_spec]
    out_shape = [
        jax.ShapeDtypeStruct((g, seq, n), _F32),
        jax.ShapeDtypeStruct((g, n, n), _F32),
    ]
    if keep_starts:
        out_specs.append(pl.BlockSpec((None, None, n, n), lambda h, i: (h, i, 0, 0)))
        out_shape.append(jax.ShapeDtypeStruct((g, n_chunks, n, n), _F32))
    kernel = partial(_forward_kernel, n_chunks=n_chunks, low=cfg.low, keep_starts=keep_starts)
    return pl.pallas_call(
        kernel,
        grid=(g, n_chunks),
        in_specs=[token_spec] * 6 + [state_spec],
        out_specs=out_specs,
        out_shape=out_shape,
        scratch_shapes=[pltpu.VMEM((n, n), _F32)],
        compiler_params=_compiler_params(),
        interpret=cfg.interpret,
        name="wkv7_tpu_forward",
    )(*xs, s0)


def _backward_call(cfg, xs, starts, dy, ds_final):
    """Runs the backward kernel over the chunks in reverse order.

    Args:
        xs: (r, w, k, v, a, b) [G, T, N]; starts: chunk start states [G, T/C, N, N] fp32;
        dy: [G, T, N] fp32; ds_final: [G, N, N] fp32.

    Returns:
        (dr, dw, dk, dv, da, db) [G, T, N] in the dtypes of xs, and d(initial state) [G, N, N].
    """
    g, seq, n = xs[0].shape
    c = cfg.chunk_size
    n_chunks = seq // c
    token_spec = pl.BlockSpec((None, c, n), lambda h, i: (h, n_chunks - 1 - i, 0))
    start_spec = pl.BlockSpec((None, None, n, n), lambda h, i: (h, n_chunks - 1 - i, 0, 0))
    state_spec = pl.BlockSpec((None, n, n), lambda h, i: (h, 0, 0))
    out_shape = [jax.ShapeDtypeStruct(x.shape, x.dtype) for x in xs]
    out_shape.append(jax.ShapeDtypeStruct((g, n, n), _F32))
    kernel = partial(_backward_kernel, n_chunks=n_chunks, low=cfg.low)
    *grads, ds0 = pl.pallas_call(
        kernel,
        grid=(g, n_chunks),
        in_specs=[token_spec] * 6 + [start_spec, token_spec, state_spec],
        out_specs=[token_spec] * 6 + [state_spec],
        out_shape=out_shape,
        scratch_shapes=[pltpu.VMEM((n, n), _F32)],
        compiler_params=_compiler_params(),
        interpret=cfg.interpret,
        name="wkv7_tpu_backward",
    )(*xs, starts, dy, ds_final)
    return tuple(grads), ds0


@partial(jax.custom_vjp, nondiff_argnums=(0,))
def _wkv7_heads(cfg, xs, s0):
    """(y [G, T, N], final state [G, N, N]) for head-major inputs, T % chunk_size == 0."""
    y, s_final = _forward_call(cfg, xs, s0, keep_starts=False)
    return y, s_final


def _wkv7_heads_fwd(cfg, xs, s0):
    y, s_final, starts = _forward_call(cfg, xs, s0, keep_starts=True)
    return (y, s_final), (xs, starts)


def _wkv7_heads_bwd(cfg, res, cot):
    xs, starts = res
    dy, ds_final = cot
    grads, ds0 = _backward_call(cfg, xs, starts, dy.astype(_F32), ds_final.astype(_F32))
    return grads, ds0


_wkv7_heads.defvjp(_wkv7_heads_fwd, _wkv7_heads_bwd)


# ---------------------------------------------------------------------------------------------
# Public entry
# ---------------------------------------------------------------------------------------------


def _check_dtypes(xs, state) -> None:
    allowed = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16))
    for name, x in zip(("r", "w", "k", "v", "a", "b"), xs, strict=True):
        if jnp.dtype(x.dtype) not in allowed:
            raise ValueError(f"wkv7_tpu: {name} must be float32 or bfloat16, got {x.dtype}")
    if state is not None and not jnp.issubdtype(state.dtype, jnp.floating):
        raise ValueError(f"wkv7_tpu: state must be a float array, got {state.dtype}")


def _check_interpret(interpret) -> None:
    if not (isinstance(interpret, bool) or isinstance(interpret, pltpu.InterpretParams)):
        raise ValueError(
            f"wkv7_tpu: interpret must be False, True or a pltpu.InterpretParams, got {interpret!r}"
        )


def wkv7_tpu(r, w, k, v, a, b, state=None, *, chunk_size=DEFAULT_CHUNK_SIZE, interpret=False):
    """WKV-7 on TPU: chunked Pallas (Mosaic) kernels, differentiable through one custom VJP.

    Same result as `wkv7_reference` (fp32 inputs: ~1e-6 relative). Per batch and head, with S
    [N, N] (rows index value dims, columns key dims):
        S_t = S_{t-1} diag(exp(w_t)) + (S_{t-1} a_t) b_t^T + v_t k_t^T,   y_t = S_t r_t.
    T need not be a multiple of the chunk: the tail is padded with r = k = v = a = b = 0, w = 0,
    which leaves the state untouched. The backward keeps one fp32 state per chunk from the
    forward and recomputes the chunk-local terms.

    Args:
        r, w, k, v, a, b: [B, T, H, N], float32 or bfloat16. `w` is the log-decay (w <= 0;
            RWKV-7 keeps it above -0.6065 per token, which keeps every allowed chunk within
            fp32's exponent range). When r, k, v, a and b are all bfloat16, the intra-chunk and
            output matmuls take bf16 operands (fp32 accumulation).
        state: optional initial state [B, H, N, N] (zeros if None); used in fp32.
        chunk_size: static power of two in [16, 128].
        interpret: False (compile for TPU), True (Pallas interpreter, any backend) or a
            `pltpu.InterpretParams` (TPU interpret mode: simulated memory spaces, race
            detection).

    Returns:
        y: [B, T, H, N] float32; final_state: [B, H, N, N] float32. Gradients with respect to
        the inputs come back in the inputs' dtypes.

    Raises:
        ValueError: on mismatched shapes, unsupported dtypes, a bad chunk_size or interpret.
    """
    check_chunk_size(chunk_size, caller="wkv7_tpu")
    _check_interpret(interpret)
    xs = (r, w, k, v, a, b)
    batch, seq, heads, n = check_wkv7_shapes(*xs, state)
    _check_dtypes(xs, state)
    if state is None:
        state = jnp.zeros((batch, heads, n, n), _F32)
    state = state.astype(_F32)
    if seq == 0:
        return jnp.zeros(r.shape, _F32), state
    low = all(jnp.dtype(x.dtype) == jnp.bfloat16 for x in (r, k, v, a, b))
    cfg = _Config(chunk_size, low, interpret)
    pad = -seq % chunk_size
    padded = seq + pad

    def to_heads(x):
        if pad:
            x = jnp.pad(x, ((0, 0), (0, pad), (0, 0), (0, 0)))
        return x.transpose(0, 2, 1, 3).reshape(batch * heads, padded, n)

    y, s_final = _wkv7_heads(
        cfg, tuple(to_heads(x) for x in xs), state.reshape(batch * heads, n, n)
    )
    y = y.reshape(batch, heads, padded, n).transpose(0, 2, 1, 3)
    return y[:, :seq], s_final.reshape(batch, heads, n, n)
