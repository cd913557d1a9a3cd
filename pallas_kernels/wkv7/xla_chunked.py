"""WKV-7 as chunked matmuls in XLA (the CPU default path), with a hand-derived chunk-reverse VJP."""

from __future__ import annotations

from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels.wkv7.reference import check_wkv7_shapes

_HIGHEST = lax.Precision.HIGHEST

MIN_CHUNK_SIZE = 16
MAX_CHUNK_SIZE = 128
# Fastest on a 2-core CPU at B=1, T=4096, H=12, N=64 (jitted fp32, best of 15 runs, ms):
#   forward / forward+backward: C = 16: 77 / 307; C = 32: 86 / 319; C = 64: 127 / 449;
#   C = 128: 334 / 943; the lax.scan reference: 61 / 4859.
# The state-facing work is ~4 N^2 MACs per token whatever C is, about what the scan does per
# token, so on a CPU the forward cannot beat the scan by much (here it is ~1.25x slower); the
# win is the backward (16x) and its memory: one N x N state per chunk instead of per token.
DEFAULT_CHUNK_SIZE = 16


def _mm(spec, x, y):
    """fp32 einsum; HIGHEST keeps TPU/GPU from dropping to bf16/TF32 passes (a no-op on CPU)."""
    return jnp.einsum(spec, x, y, precision=_HIGHEST)


def _lower(x, *, strict):
    """Keeps the lower triangle of x [..., C, C] (strict=True also drops the diagonal).

    `where`, not a multiply by a 0/1 mask: the dropped entries of the centred products can be
    huge or even inf, and inf * 0 would be NaN.
    """
    c = x.shape[-1]
    return jnp.where(jnp.tri(c, c, -1 if strict else 0, dtype=bool), x, 0.0)


def _cumsum_rows(x, *, reverse=False):
    """Cumulative sum over axis -2 (time within a chunk), inclusive; reverse sums from the end.

    A matmul with a triangle of ones: XLA:CPU runs `jnp.cumsum` as a windowed reduction that is
    slower, and an unrolled chain of adds compiles slowly at C = 128.
    """
    c = x.shape[-2]
    ones = jnp.tri(c, c, dtype=x.dtype)  # ones[t, s] = 1 for s <= t
    return _mm("ts,...sn->...tn", ones.T if reverse else ones, x)


def _sum_rows(x):
    """Sum over axis -2, kept as a length-1 axis, by pairwise halving.

    XLA:CPU runs a reduction over a non-minor axis some 50x slower than these adds.
    """
    while x.shape[-2] > 1:
        if x.shape[-2] % 2:
            x = jnp.concatenate([x, jnp.zeros_like(x[..., :1, :])], axis=-2)
        half = x.shape[-2] // 2
        x = x[..., :half, :] + x[..., half:, :]
    return x


def _unit_lower_inverse(a):
    """(I - A)^{-1} for strictly lower-triangular A [..., C, C], C a power of two.

    Block recursion on the diagonal blocks: with P_m the inverse of the block-diagonal part made
    of m x m blocks, and L_m the blocks of A just below those (inside each 2m x 2m diagonal
    block), P_2m = P_m + P_m L_m P_m. Every P_m is the inverse of a run of consecutive tokens'
    transitions, so it stays bounded and the recursion is as stable as forward substitution.

    KERNELS.md suggests prod_m (I + A^{2^m}) instead; that is exact in exact arithmetic but in
    fp32 it cancels catastrophically when A's entries are near -1 over long runs (the same kk
    repeated with a_rate near 1 and slow decay, as for a run of one repeated token): A^{2^m}
    then holds binomial coefficients up to C(C-2, C/2-1), ~1e17 at C = 64, and the output is
    garbage from C = 32 on. Both forms cost only matmuls (Mosaic-friendly).
    """
    c = a.shape[-1]
    row = jnp.arange(c)[:, None]
    col = jnp.arange(c)[None, :]
    p = jnp.eye(c, dtype=a.dtype) + jnp.where(row // 2 == col // 2, a, 0.0)
    m = 2
    while m < c:
        below = (row // (2 * m) == col // (2 * m)) & (row // m != col // m)
        l_m = jnp.where(below, a, 0.0)
        p = p + _mm("...ij,...jk->...ik", p, _mm("...ij,...jk->...ik", l_m, p))
        m *= 2
    return p


class _ChunkTerms(NamedTuple):
    """The state-free quantities of one chunk, fp32, per (batch, head): C tokens, N = head size.

    gi / ge are the inclusive / exclusive cumulative log-decays within the chunk, gC = gi[C-1],
    and off = gi[C/2] centres the exponents.
    """

    e_in: jax.Array  # e^{gi - off} [C, N]
    e_out: jax.Array  # e^{off - gi} [C, N]
    e_ex: jax.Array  # e^{ge - off} [C, N]
    e_gi: jax.Array  # e^{gi} [C, N]
    e_ge: jax.Array  # e^{ge} [C, N]
    e_tail: jax.Array  # e^{gC - gi} [C, N]
    e_gc: jax.Array  # e^{gC} [1, N]
    r_c: jax.Array  # r e^{gi - off} [C, N]
    k_c: jax.Array  # k e^{off - gi} [C, N]
    b_c: jax.Array  # b e^{off - gi} [C, N]
    a_c: jax.Array  # a e^{ge - off} [C, N]
    kg: jax.Array  # k e^{gC - gi} [C, N]
    bg: jax.Array  # b e^{gC - gi} [C, N]
    a_qk: jax.Array  # tril_incl(r_c k_c^T) [C, C]
    a_qb: jax.Array  # tril_incl(r_c b_c^T) [C, C]
    a_ak: jax.Array  # tril_strict(a_c k_c^T) [C, C]
    p: jax.Array  # (I - tril_strict(a_c b_c^T))^{-1} [C, C]
    u0: jax.Array  # P A_ak V [C, N]: state-free part of U (row i of U is (S_{i-1} a_i)^T)
    wm: jax.Array  # P (a e^{ge}) [C, N]: U = U0 + W S^T
    q: jax.Array  # r e^{gi} + A_qb W [C, N]: Y = Y0 + Q S^T
    y0: jax.Array  # A_qk V + A_qb U0 [C, N]
    delta0: jax.Array  # V^T kg [N, N]


def _chunk_terms(r, w, k, v, a, b):
    """Builds a chunk's state-free terms from inputs [..., C, N] (fp32).

    Within a chunk starting from state S (the maths, all exact rewrites of the recurrence):
        U = P (A_ak V + ag S^T),  Y = rg S^T + A_qk V + A_qb U,
        S' = S diag(e^{gC}) + V^T kg + U^T bg,
    with rg = r e^{gi}, ag = a e^{ge}. Folding P and A_qb into W = P ag and Q = rg + A_qb W
    leaves the state to enter only through U = U0 + W S^T and Y = Y0 + Q S^T.
    """
    c = w.shape[-2]
    gi = _cumsum_rows(w)
    gc = gi[..., -1:, :]
    # Any offset cancels in the products below; stop_gradient keeps autodiff (if ever run
    # through this function) from differentiating the choice.
    off = lax.stop_gradient(gi[..., c // 2 : c // 2 + 1, :])
    e_in, e_out = jnp.exp(gi - off), jnp.exp(off - gi)
    # The remaining factors from the two full-size exps above plus per-chunk [1, N] ones.
    e_ex = e_in * jnp.exp(-w)
    e_off = jnp.exp(off)
    e_gi, e_ge = e_in * e_off, e_ex * e_off
    e_tail, e_gc = e_out * jnp.exp(gc - off), jnp.exp(gc)
    r_c, k_c, b_c, a_c = r * e_in, k * e_out, b * e_out, a * e_ex
    rg, ag, kg, bg = r * e_gi, a * e_ge, k * e_tail, b * e_tail
    a_qk = _lower(_mm("...tn,...sn->...ts", r_c, k_c), strict=False)
    a_qb = _lower(_mm("...tn,...sn->...ts", r_c, b_c), strict=False)
    a_ak = _lower(_mm("...tn,...sn->...ts", a_c, k_c), strict=True)
    a_ab = _lower(_mm("...tn,...sn->...ts", a_c, b_c), strict=True)
    p = _unit_lower_inverse(a_ab)
    u0 = _mm("...ts,...sn->...tn", p, _mm("...ts,...sv->...tv", a_ak, v))
    wm = _mm("...ts,...sn->...tn", p, ag)
    q = rg + _mm("...ts,...sk->...tk", a_qb, wm)
    y0 = _mm("...ts,...sv->...tv", a_qk, v) + _mm("...ts,...sv->...tv", a_qb, u0)
    delta0 = _mm("...tv,...tk->...vk", v, kg)
    return _ChunkTerms(
        e_in, e_out, e_ex, e_gi, e_ge, e_tail, e_gc, r_c, k_c, b_c, a_c, kg, bg,
        a_qk, a_qb, a_ak, p, u0, wm, q, y0, delta0,
    )  # fmt: skip


def _chunk_forward(t, s):
    """Output Y [..., C, N] and end state S' [..., N, N] of a chunk entered with state S."""
    y = t.y0 + _mm("...tk,...vk->...tv", t.q, s)
    u = t.u0 + _mm("...tk,...vk->...tv", t.wm, s)
    s_next = s * t.e_gc + t.delta0 + _mm("...tv,...tk->...vk", u, t.bg)
    return y, s_next


def _chunk_backward(t, x, s, dy, ds_next):
    """Pulls dY [..., C, N] and dS' [..., N, N] back through one chunk.

    Args:
        t: the chunk's terms; x: its inputs (r, w, k, v, a, b) [..., C, N]; s: its start state.
        dy: cotangent of its outputs; ds_next: cotangent of its end state.

    Returns:
        ((dr, dw, dk, dv, da, db) [..., C, N], dS [..., N, N] for the start state).
    """
    r, _, k, v, a, b = x
    # State part: U = U0 + W S^T; S' = S e^{gC} + V^T kg + U^T bg; Y = Y0 + Q S^T.
    u = t.u0 + _mm("...tk,...vk->...tv", t.wm, s)
    du = _mm("...tk,...vk->...tv", t.bg, ds_next)
    ds = ds_next * t.e_gc + _mm("...tv,...tk->...vk", du, t.wm) + _mm("...tv,...tk->...vk", dy, t.q)
    dbg = _mm("...tv,...vk->...tk", u, ds_next)
    dwm = _mm("...tv,...vk->...tk", du, s)
    dq = _mm("...tv,...vk->...tk", dy, s)
    dgc = t.e_gc * _sum_rows(ds_next * s)
    dv = _mm("...tk,...vk->...tv", t.kg, ds_next)
    dkg = _mm("...tv,...vk->...tk", v, ds_next)
    # Y0 = A_qk V + A_qb U0 and Q = rg + A_qb W (so d(rg) = dQ).
    da_qk = _lower(_mm("...tv,...sv->...ts", dy, v), strict=False)
    dv = dv + _mm("...ts,...tv->...sv", t.a_qk, dy)
    du0 = du + _mm("...ts,...tv->...sv", t.a_qb, dy)
    da_qb = _mm("...tv,...sv->...ts", dy, t.u0) + _mm("...tk,...sk->...ts", dq, t.wm)
    da_qb = _lower(da_qb, strict=False)
    dwm = dwm + _mm("...ts,...tk->...sk", t.a_qb, dq)
    # [U0 | W] = P [A_ak V | ag]: d[X0 | ag] = P^T d[U0 | W], dA_ab = d[X0 | ag] [U0 | W]^T.
    dx0 = _mm("...ts,...tv->...sv", t.p, du0)
    dag = _mm("...ts,...tk->...sk", t.p, dwm)
    da_ab = _mm("...tv,...sv->...ts", dx0, t.u0) + _mm("...tk,...sk->...ts", dag, t.wm)
    da_ab = _lower(da_ab, strict=True)
    da_ak = _lower(_mm("...tv,...sv->...ts", dx0, v), strict=True)
    dv = dv + _mm("...ts,...tv->...sv", t.a_ak, dx0)
    # The centred factors of A_qk = R~K~^T, A_qb = R~B~^T, A_ak = A~K~^T, A_ab = A~B~^T.
    dr_c = _mm("...ts,...sn->...tn", da_qk, t.k_c) + _mm("...ts,...sn->...tn", da_qb, t.b_c)
    dk_c = _mm("...ts,...tn->...sn", da_qk, t.r_c) + _mm("...ts,...tn->...sn", da_ak, t.a_c)
    db_c = _mm("...ts,...tn->...sn", da_qb, t.r_c) + _mm("...ts,...tn->...sn", da_ab, t.a_c)
    da_c = _mm("...ts,...sn->...tn", da_ak, t.k_c) + _mm("...ts,...sn->...tn", da_ab, t.b_c)
    dr = dr_c * t.e_in + dq * t.e_gi
    dk = dk_c * t.e_out + dkg * t.e_tail
    db = db_c * t.e_out + dbg * t.e_tail
    da = da_c * t.e_ex + dag * t.e_ge
    # Log-decay: every factor is x e^{+-g}, so x * dx is the cotangent of its exponent. r, k, b
    # carry gi (k and b with a minus sign), a carries ge = gi - w, kg / bg / S' carry gC;
    # w_t enters gi_{t'} for t' >= t, ge_{t'} for t' > t and gC.
    dgc = dgc + _sum_rows(t.kg * dkg + t.bg * dbg)
    d_gi = (r * dr - k * dk - b * db).at[..., -1:, :].add(dgc)
    d_ge = a * da
    dw = _cumsum_rows(d_gi + d_ge, reverse=True) - d_ge
    return (dr, dw, dk, dv, da, db), ds


def _read_chunk(x, i, c):
    """Chunk i of a token-major [B, T, H, N] array, as head-major [B, H, C, N]."""
    return lax.dynamic_slice_in_dim(x, i * c, c, axis=1).transpose(0, 2, 1, 3)


def _write_chunk(buf, x, i):
    """Writes a head-major chunk [B, H, C, N] into chunk i of a token-major [B, T, H, N] buffer."""
    c = x.shape[2]
    return lax.dynamic_update_slice_in_dim(buf, x.transpose(0, 2, 1, 3), i * c, axis=1)


def _forward(c, xs, s0, *, keep_starts):
    """Walks the chunks in order; one chunk at a time keeps every intermediate in cache.

    Returns:
        ((y [B, T, H, N], final state [B, H, N, N]), chunk start states [T/C, B, H, N, N],
        or an empty array when keep_starts is False).
    """
    n_chunks = xs[0].shape[1] // c

    def step(i, carry):
        s, y, starts = carry
        t = _chunk_terms(*(_read_chunk(x, i, c) for x in xs))
        if keep_starts:
            starts = lax.dynamic_update_index_in_dim(starts, s, i, axis=0)
        y_c, s = _chunk_forward(t, s)
        return s, _write_chunk(y, y_c, i), starts

    starts = jnp.zeros((n_chunks if keep_starts else 0, *s0.shape), jnp.float32)
    s_final, y, starts = lax.fori_loop(0, n_chunks, step, (s0, jnp.zeros_like(xs[0]), starts))
    return (y, s_final), starts


@partial(jax.custom_vjp, nondiff_argnums=(0,))
def _wkv7_chunks(c, xs, s0):
    """(y, final state) for fp32 inputs xs = (r, w, k, v, a, b) [B, T, H, N], T % c == 0."""
    return _forward(c, xs, s0, keep_starts=False)[0]


def _wkv7_chunks_fwd(c, xs, s0):
    out, starts = _forward(c, xs, s0, keep_starts=True)
    # Residuals: the inputs (alive anyway) and one fp32 state per chunk; the C x C chunk
    # intermediates are recomputed in the backward pass.
    return out, (xs, starts)


def _wkv7_chunks_bwd(c, res, cot):
    xs, starts = res
    dy, ds_final = cot
    n_chunks = xs[0].shape[1] // c

    def step(j, carry):
        i = n_chunks - 1 - j
        ds, grads = carry
        x = tuple(_read_chunk(z, i, c) for z in xs)
        g, ds = _chunk_backward(_chunk_terms(*x), x, starts[i], _read_chunk(dy, i, c), ds)
        grads = tuple(_write_chunk(buf, gi, i) for buf, gi in zip(grads, g, strict=True))
        return ds, grads

    zeros = tuple(jnp.zeros_like(x) for x in xs)
    ds0, grads = lax.fori_loop(0, n_chunks, step, (ds_final, zeros))
    return grads, ds0


_wkv7_chunks.defvjp(_wkv7_chunks_fwd, _wkv7_chunks_bwd)


def check_chunk_size(chunk_size, *, caller="wkv7_chunked") -> None:
    """Raises ValueError unless chunk_size is a power of two in [16, 128].

    Shared by the XLA and TPU implementations (`caller` names the one in the message).
    """
    ok = (
        isinstance(chunk_size, int)
        and not isinstance(chunk_size, bool)
        and MIN_CHUNK_SIZE <= chunk_size <= MAX_CHUNK_SIZE
        and chunk_size & (chunk_size - 1) == 0
    )
    if not ok:
        raise ValueError(
            f"{caller}: chunk_size must be a power of two in [{MIN_CHUNK_SIZE}, "
            f"{MAX_CHUNK_SIZE}], got {chunk_size!r}. Within a chunk the keys and queries are "
            "scaled by e^(+-(cumulative log-decay - its mid-chunk value)); with RWKV-7's decay "
            "bound (w >= -0.6065 per token) that reaches e^38.8 at C = 128 and products of two "
            "such factors e^77.6, next to fp32's e^88.7 limit, so longer chunks overflow fp32 "
            "exponents; powers of two keep the in-chunk inverse's block recursion exact."
        )


def wkv7_chunked(r, w, k, v, a, b, state=None, *, chunk_size=DEFAULT_CHUNK_SIZE):
    """WKV-7 in chunked matmul form: same result as `wkv7_reference`, differentiable, fast on CPU.

    The sequence is cut into chunks of `chunk_size` tokens; each chunk's intra-chunk interactions
    are C x C matmuls with exponents centred on the chunk's middle token, and a loop over chunks
    carries the fp32 state. A custom VJP walks the chunks in reverse, saving only one fp32 state
    per chunk from the forward pass and recomputing the chunk intermediates. T need not be a
    multiple of the chunk: the tail is padded with k = v = a = b = r = 0, w = 0, which leaves the
    state untouched.

    Numerical range: the centred factors e^(+-(gi - off)) stay below e^(|w|max * C / 2), and
    products of two of them (the masked-out upper triangles) below its square, which must stay
    under fp32's e^88.7. RWKV-7's decay keeps w in (-0.6065, 0), so every allowed chunk
    (<= 128: e^38.8) is safe; with steeper decays keep |w|max * C / 2 under ~40 (w = -5 per
    token: C = 16) or use the reference. Accuracy against the fp32 scan is ~1e-6 relative for
    y, the final state and all seven gradients, a few 1e-6 at C = 128 where the centred
    factors span e^(+-38).

    Args:
        r, w, k, v, a, b: [B, T, H, N], any float dtype (computed in fp32). `w` is the log-decay
            (w <= 0); in RWKV-7, a = -kk and b = kk * a_rate.
        state: optional initial state [B, H, N, N] (rows index value dims, columns key dims);
            zeros if None.
        chunk_size: static power of two in [16, 128].

    Returns:
        y: [B, T, H, N] float32; final_state: [B, H, N, N] float32.

    Raises:
        ValueError: on mismatched shapes or a bad chunk_size.
    """
    check_chunk_size(chunk_size)
    batch, seq, heads, n = check_wkv7_shapes(r, w, k, v, a, b, state)
    pad = -seq % chunk_size

    def prepare(x):
        x = x.astype(jnp.float32)
        return jnp.pad(x, ((0, 0), (0, pad), (0, 0), (0, 0))) if pad else x

    if state is None:
        state = jnp.zeros((batch, heads, n, n), jnp.float32)
    if seq == 0:
        return jnp.zeros(r.shape, jnp.float32), state.astype(jnp.float32)
    xs = tuple(prepare(x) for x in (r, w, k, v, a, b))
    y, final_state = _wkv7_chunks(chunk_size, xs, state.astype(jnp.float32))
    return (y[:, :seq] if pad else y), final_state
