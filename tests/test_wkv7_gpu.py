"""The Pallas-Triton WKV-7 kernels: interpret mode vs the scan oracle, and CUDA cross-lowering."""

import dataclasses
import re
from functools import partial
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax
from jax.extend import core as jex_core

from pallas_kernels.wkv7 import gpu_chunk, gpu_options
from pallas_kernels.wkv7.experimental.chunk_grid import exact_matmul
from pallas_kernels.wkv7.gpu import wkv7_gpu
from pallas_kernels.wkv7.gpu_options import (
    CHUNK_GRADIENT_SCHEDULES,
    SCHEDULES,
    GpuOptions,
    auto_segments,
    auto_value_tile,
)
from pallas_kernels.wkv7.ops import wkv7
from pallas_kernels.wkv7.reference import wkv7_reference

# RWKV-7's per-token log-decay range: w = -exp(x) with w in (-0.6065, -1e-4).
W_MIN, W_MAX = -0.6065, -1e-4
TOL = 1e-5  # relative to max |oracle|; measured ~3e-7 for y, the state and every gradient
# dot_precision="bf16" on fp32 inputs: measured 1e-3 .. 6e-3 for y, the state and every gradient
# at T = 40 .. 1024 (the bf16 operand rounding, 2^-9, of the fast dots).
BF16_TOL = 1e-2
# exact_dot_precision="bf16x3" (fp32 operands split into bf16 hi + lo): measured 2e-6 .. 1.2e-5
# for y, the state and every gradient at T = 256 .. 4096, not growing along the sequence.
SPLIT_TOL = 5e-5


def _inputs(seed, batch, seq, heads, n, *, w_const=None):
    """Realistic RWKV-7 inputs: a = -kk, b = kk * a_rate with kk unit-normalised per head."""
    keys = jax.random.split(jax.random.PRNGKey(seed), 7)
    shape = (batch, seq, heads, n)
    r = jax.random.normal(keys[0], shape)
    k = jax.random.normal(keys[1], shape)
    v = jax.random.normal(keys[2], shape)
    # Log-uniform |w| over the whole decay range, so both slow and fast channels appear.
    u = jax.random.uniform(keys[3], shape)
    w = -jnp.exp(np.log(-W_MAX) + u * (np.log(-W_MIN) - np.log(-W_MAX)))
    if w_const is not None:
        w = jnp.full(shape, w_const, jnp.float32)
    kk = jax.random.normal(keys[4], shape)
    kk = kk / jnp.linalg.norm(kk, axis=-1, keepdims=True)
    a_rate = jax.random.uniform(keys[5], shape)
    state = 0.3 * jax.random.normal(keys[6], (batch, heads, n, n))
    return (r, w, k, v, -kk, kk * a_rate), state


def _rel(x, ref):
    x, ref = np.asarray(x, np.float32), np.asarray(ref, np.float32)
    return float(np.max(np.abs(x - ref)) / np.max(np.abs(ref)))


def _interpreted(**options):
    """wkv7_gpu in interpret mode with GpuOptions(**options)."""
    return partial(wkv7_gpu, options=GpuOptions(**options), interpret=True)


def _kernel(**options):
    return jax.jit(_interpreted(**options))


@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize(
    "seq, n, chunk_size, with_state, w_const, dot_precision",
    [
        (40, 32, 16, False, None, None),  # T not a chunk multiple (padded tail)
        # Interpret mode runs "tf32x3" as "highest" (the CPU has no TF32 algorithm).
        (40, 32, 32, True, None, "tf32x3"),
        (64, 16, 64, True, W_MIN, "highest"),  # the steepest decay over the longest chunk
    ],
)
def test_forward_matches_reference(
    seq, n, chunk_size, with_state, w_const, dot_precision, schedule
):
    xs, state = _inputs(0, 1, seq, 2, n, w_const=w_const)
    state = state if with_state else None
    kernel = _kernel(chunk_size=chunk_size, dot_precision=dot_precision, schedule=schedule)
    y, s = kernel(*xs, state)
    y_ref, s_ref = wkv7_reference(*xs, state)
    assert y.shape == y_ref.shape and y.dtype == jnp.float32
    assert s.shape == s_ref.shape and s.dtype == jnp.float32
    assert _rel(y, y_ref) < TOL
    assert _rel(s, s_ref) < TOL


def _weighted_loss(fn):
    """A scalar loss using both outputs with non-uniform cotangents."""

    def loss(*args):
        y, s = fn(*args)
        wy = jnp.sin(jnp.arange(y.size, dtype=jnp.float32)).reshape(y.shape)
        ws = jnp.cos(jnp.arange(s.size, dtype=jnp.float32)).reshape(s.shape)
        return jnp.sum(y * wy) + jnp.sum(s * ws)

    return loss


@pytest.mark.parametrize(
    "seq, value_tile, with_state, schedule, n",
    [
        # Two value tiles: sequential, key-side gradients summed over tiles; chunk-parallel and
        # factored, two tiles in each scan / pass and in the gradient kernel (key-side
        # partials summed).
        *((40, 16, True, schedule, 32) for schedule in SCHEDULES),
        # Four value tiles (N = 64): a sum over tiles that stops early (two of four) fails here.
        (40, 16, True, "sequential", 64),
        # Full rows, no initial state (the factored schedule's full rows: its segments test).
        (16, 32, False, "sequential", 32),
        (16, 32, False, "chunk_parallel", 32),
    ],
)
def test_gradients_match_reference(seq, value_tile, with_state, schedule, n):
    xs, state = _inputs(1, 1, seq, 2, n)
    args = (*xs, state) if with_state else xs
    argnums = tuple(range(len(args)))
    tiles = {"gradient_value_tile": value_tile} if schedule in CHUNK_GRADIENT_SCHEDULES else {}
    kernel = _interpreted(value_tile=value_tile, schedule=schedule, **tiles)
    grads = jax.jit(jax.grad(_weighted_loss(kernel), argnums=argnums))(*args)
    grads_ref = jax.grad(_weighted_loss(wkv7_reference), argnums=argnums)(*args)
    names = "r w k v a b state".split()[: len(args)]
    for name, g, g_ref in zip(names, grads, grads_ref, strict=True):
        assert g.shape == g_ref.shape and g.dtype == jnp.float32, name
        assert _rel(g, g_ref) < TOL, (name, _rel(g, g_ref))


def test_value_tiles_match_full_rows():
    """N = 64, two full chunks: full rows vs the oracle, and 16-row tiles vs full rows."""
    xs, state = _inputs(3, 1, 32, 2, 64)
    y_full, s_full = _kernel(value_tile=64)(*xs, state)
    y_ref, s_ref = wkv7_reference(*xs, state)
    assert _rel(y_full, y_ref) < TOL and _rel(s_full, s_ref) < TOL
    y, s = _kernel(value_tile=16)(*xs, state)
    assert _rel(y, y_full) < 1e-6
    assert _rel(s, s_full) < 1e-6


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_bf16_inputs(schedule):
    """bf16 inputs with "highest" dots are computed in fp32: exact w.r.t. the rounded inputs,
    ~3e-3 w.r.t. fp32 ones; the default for bf16 inputs is "bf16" dots."""
    xs, state = _inputs(4, 1, 40, 2, 32)
    xs_bf16 = tuple(x.astype(jnp.bfloat16) for x in xs)
    xs_rounded = tuple(x.astype(jnp.float32) for x in xs_bf16)
    y, s = _kernel(dot_precision="highest", schedule=schedule)(*xs_bf16, state)
    y_rounded, s_rounded = wkv7_reference(*xs_rounded, state)
    y_ref, s_ref = wkv7_reference(*xs, state)
    assert y.dtype == jnp.float32 and s.dtype == jnp.float32
    assert _rel(y, y_rounded) < TOL and _rel(s, s_rounded) < TOL
    # Measured 3.1e-3 / 3.5e-3: the inputs' own bf16 rounding, not the kernel.
    assert _rel(y, y_ref) < 1e-2 and _rel(s, s_ref) < 1e-2
    # The default for bf16 inputs: bf16 dots (interpret mode emulates their rounding);
    # measured 3.0e-3 (y) / 0.9e-3 (state) w.r.t. the rounded inputs.
    y_default, s_default = _kernel(schedule=schedule)(*xs_bf16, state)
    assert TOL < _rel(y_default, y_rounded) < BF16_TOL
    assert _rel(s_default, s_rounded) < BF16_TOL

    argnums = tuple(range(7))
    kernel = _interpreted(dot_precision="highest", schedule=schedule)
    grads = jax.jit(jax.grad(_weighted_loss(kernel), argnums=argnums))(*xs_bf16, state)
    grads_ref = jax.grad(_weighted_loss(wkv7_reference), argnums=argnums)(*xs_rounded, state)
    for name, g, g_ref in zip("r w k v a b state".split(), grads, grads_ref, strict=True):
        assert g.dtype == (jnp.float32 if name == "state" else jnp.bfloat16), name
        # bf16 gradients carry their own output rounding (2^-9 = 2e-3 relative).
        tol = TOL if name == "state" else 1e-2
        assert _rel(g, g_ref) < tol, (name, _rel(g, g_ref))


# The factored schedule's bf16 dots are those of the chunk-parallel terms and gradient kernels
# and the sequential step's (its passes): test_bf16_inputs covers its bf16 path.
@pytest.mark.parametrize("schedule", ["sequential", "chunk_parallel"])
def test_bf16_dots_match_reference(schedule):
    """dot_precision="bf16" on fp32 inputs: forward and every gradient within BF16_TOL."""
    xs, state = _inputs(8, 1, 40, 2, 32)
    kernel = _interpreted(dot_precision="bf16", value_tile=16, schedule=schedule)
    y, s = jax.jit(kernel)(*xs, state)
    y_ref, s_ref = wkv7_reference(*xs, state)
    # Measured y 3.1e-3, state 1.3e-3; above TOL, so the bf16 dots are really used.
    assert TOL < _rel(y, y_ref) < BF16_TOL
    assert _rel(s, s_ref) < BF16_TOL
    argnums = tuple(range(7))
    grads = jax.jit(jax.grad(_weighted_loss(kernel), argnums=argnums))(*xs, state)
    grads_ref = jax.grad(_weighted_loss(wkv7_reference), argnums=argnums)(*xs, state)
    for name, g, g_ref in zip("r w k v a b state".split(), grads, grads_ref, strict=True):
        # Measured 0.8e-3 (state) .. 5.7e-3 (a).
        assert _rel(g, g_ref) < BF16_TOL, (name, _rel(g, g_ref))


def test_bf16_parts_keep_sixteen_bits():
    """hi + lo, both bf16, rebuild x to within 2^-16 |x| (the bf16x3 exact dots' operands)."""
    x = jax.random.normal(jax.random.PRNGKey(13), (4096,)) * jnp.exp(jnp.arange(4096) % 40 - 20.0)
    hi, lo = gpu_chunk.bf16_parts(x)
    assert hi.dtype == lo.dtype == jnp.bfloat16
    rebuilt = np.asarray(hi).astype(np.float64) + np.asarray(lo).astype(np.float64)
    err = np.abs(rebuilt - np.asarray(x, np.float64)) / np.abs(np.asarray(x))
    assert 2.0**-20 < err.max() <= 2.0**-16  # hi alone would be off by up to 2^-9


@pytest.mark.parametrize(
    "schedule, options",
    [
        ("sequential", {}),
        ("chunk_parallel", {}),
        ("chunk_parallel", {"scan_group": 4}),
        ("factored", {"segments": 4}),
    ],
)
def test_split_bf16_exact_dots_do_not_drift(schedule, options):
    """exact_dot_precision="bf16x3" on fp32 inputs with almost no decay (w = W_MAX, the most
    room for a state error to compound), T = 512: y, the state and every gradient within
    SPLIT_TOL, and y's error no larger at the end than at the start (with scan groups, XLA's
    map products take the same split; segment maps are made by split dots and chained in
    IEEE fp32)."""
    seq, window = 512, 128
    xs, state = _inputs(9, 1, seq, 1, 16, w_const=W_MAX)
    kernel = _interpreted(schedule=schedule, exact_dot_precision="bf16x3", **options)
    results = _outputs_and_gradients(kernel, xs, state)
    refs = _outputs_and_gradients(wkv7_reference, xs, state)
    errors = {name: _rel(results[name], ref) for name, ref in refs.items()}
    # Measured 3e-6 .. 1.2e-5; "highest" exact dots give <= 5e-7, so the split is really used.
    assert 1e-6 < max(errors.values()) and all(e < SPLIT_TOL for e in errors.values()), errors
    err = np.abs(np.asarray(results["y"] - refs["y"]))
    first = err[:, :window].max() / np.abs(np.asarray(refs["y"][:, :window])).max()
    last = err[:, -window:].max() / np.abs(np.asarray(refs["y"][:, -window:])).max()
    assert last < 2 * first, (first, last)  # measured 7.8e-6 / 6.4e-6, 6.5e-6 / 6.5e-6


@pytest.mark.parametrize(
    "w_const, schedule",
    [
        # Almost no decay: the least damping, so the most room to drift.
        (W_MAX, "sequential"),
        (W_MAX, "chunk_parallel"),
        (W_MAX, "factored"),  # two segments of 16 chunks: the chained start too
        (None, "sequential"),  # w spread over RWKV-7's whole range
    ],
)
def test_bf16_dots_do_not_drift(w_const, schedule):
    """T = 512 (32 chunks) with "bf16" dots: the error stays at the bf16 level along the
    sequence (the state path is fp32), in y, the final state and every gradient."""
    seq, window = 512, 128
    xs, state = _inputs(9, 1, seq, 1, 16, w_const=w_const)
    options = {"segments": 2} if schedule == "factored" else {}
    kernel = _interpreted(dot_precision="bf16", schedule=schedule, **options)
    y, s = jax.jit(kernel)(*xs, state)
    y_ref, s_ref = jax.jit(wkv7_reference)(*xs, state)
    err = np.abs(np.asarray(y - y_ref))
    first = err[:, :window].max() / np.abs(np.asarray(y_ref[:, :window])).max()
    last = err[:, -window:].max() / np.abs(np.asarray(y_ref[:, -window:])).max()
    # Measured first / last window: 2.5e-3 / 2.5e-3 (w random), 4.1e-3 / 3.1e-3 (w = W_MAX);
    # at T = 2048 the last window is 3.9e-3 / 3.4e-3. Factored with two segments, w = W_MAX:
    # 4.0e-3 / 3.0e-3, state 1.2e-3, gradients <= 4.1e-3 (as the sequential schedule).
    assert first < BF16_TOL and last < BF16_TOL and last < 2 * first, (first, last)
    assert _rel(s, s_ref) < BF16_TOL
    argnums = tuple(range(7))
    grads = jax.jit(jax.grad(_weighted_loss(kernel), argnums=argnums))(*xs, state)
    grads_ref = jax.jit(jax.grad(_weighted_loss(wkv7_reference), argnums=argnums))(*xs, state)
    for name, g, g_ref in zip("r w k v a b state".split(), grads, grads_ref, strict=True):
        # dS is carried back over all 32 chunks into the early tokens' and the state's grads.
        assert _rel(g, g_ref) < BF16_TOL, (name, _rel(g, g_ref))


def _kernel_dots(closed_jaxpr):
    """(lhs dtype, rhs dtype, precision) of every dot_general inside the pallas_call kernels."""
    found = []

    def walk(jaxpr, in_kernel):
        for eqn in jaxpr.eqns:
            if in_kernel and eqn.primitive is lax.dot_general_p:
                lhs, rhs = (x.aval.dtype for x in eqn.invars)
                found.append((lhs, rhs, eqn.params["precision"]))
            inner = in_kernel or eqn.primitive.name == "pallas_call"
            for param in eqn.params.values():
                for sub in param if isinstance(param, (tuple, list)) else (param,):
                    if isinstance(sub, jex_core.ClosedJaxpr):
                        walk(sub.jaxpr, inner)
                    elif isinstance(sub, jex_core.Jaxpr):
                        walk(sub, inner)

    walk(closed_jaxpr.jaxpr, False)
    return found


def _highest(precision):
    return precision in (lax.Precision.HIGHEST, (lax.Precision.HIGHEST,) * 2)


@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize(
    "dot_precision, exact_dot_precision",
    [("highest", None), ("tf32x3", None), ("bf16", None), ("bf16", "bf16x3")],
)
def test_dot_precision_plan(dot_precision, exact_dot_precision, schedule):
    """Which kernel dots get which operands / precision (traced for the GPU, not interpret)."""
    xs, state = _inputs(10, 1, 32, 1, 16)
    options = GpuOptions(
        dot_precision=dot_precision, exact_dot_precision=exact_dot_precision, schedule=schedule
    )
    kernel = partial(wkv7_gpu, options=options)
    loss = _weighted_loss(kernel)
    fwd = _kernel_dots(jax.make_jaxpr(kernel)(*xs, state))
    both = _kernel_dots(jax.make_jaxpr(jax.grad(loss, argnums=(0, 6)))(*xs, state))
    assert len(both) > len(fwd) > 0  # the gradient adds the backward kernel's dots
    f32 = jnp.dtype(jnp.float32)
    if dot_precision == "highest":
        assert all(lhs == rhs == f32 and _highest(p) for lhs, rhs, p in both)
    elif dot_precision == "tf32x3":
        preset = lax.DotAlgorithmPreset.TF32_TF32_F32_X3
        assert all(lhs == rhs == f32 and p == preset for lhs, rhs, p in both)
    else:
        exact = [d for d in both if d[0] == d[1] == f32 and _highest(d[2])]
        fast = [d for d in both if d[0] == d[1] == jnp.dtype(jnp.bfloat16)]
        assert len(exact) + len(fast) == len(both)
        # Forward with C = 16: IEEE fp32 = the decay sum (1) and the exact dots: A_ab, 3 x 2
        # inverse steps, W, P X0 and the state path, sequential W S^T, V^T kg, U^T bg (12),
        # chunk-parallel L_c = W^T bg, V^T kg, U0^T bg and the scan's S L_c (13); factored as
        # sequential, its pass taking W S^T, V^T kg and U^T bg (12). Fast: A_qk,
        # A_qb, A_ak, A_qb W, A_ak V, A_qk V, A_qb U0, Q S^T (8). With
        # exact_dot_precision="bf16x3" each exact dot is three bf16 dots (hi / lo parts).
        n_exact = 13 if schedule == "chunk_parallel" else 12
        n_bf16 = sum(d[0] != f32 for d in fwd)
        if exact_dot_precision is None:
            assert (len(fwd) - n_bf16, n_bf16) == (1 + n_exact, 8)
        else:
            assert (len(fwd) - n_bf16, n_bf16) == (1, 8 + 3 * n_exact)
        assert len(fast) > 2 * n_bf16  # the backward's gradient products are bf16 too


def test_empty_sequence():
    xs, state = _inputs(5, 1, 0, 2, 32)
    y, s = wkv7_gpu(*xs, state, interpret=True)
    assert y.shape == (1, 0, 2, 32)
    np.testing.assert_array_equal(s, state)


def test_auto_segments():
    """Segments double while the factored passes run fewer than TARGET_PROGRAMS programs and
    each segment keeps MIN_SEGMENT_CHUNKS chunks."""
    assert auto_segments(32, 1024) == 8  # B*H = 8, 16-row tiles, T = 16K: 256 programs
    assert auto_segments(32, None) == 8
    assert auto_segments(256, 1024) == 1  # enough programs already
    assert auto_segments(1, None) == 16  # MAX_SEGMENTS
    assert auto_segments(32, 64) == 2  # 64 chunks: two segments of 32
    assert auto_segments(32, 63) == 1
    assert auto_segments(32, 1024, target=108) == 4  # an A100's SMs


def test_segments_match_reference():
    """Factored passes over 4 segments (T = 100: 7 chunks padded to 8, so the last segment's
    second chunk is padding), two value tiles, B = 2 and H = 3 (its kernels index the
    token-major [B, T, H, N] inputs, y, dy and gradients as they are): forward and every
    gradient within TOL of the oracle."""
    segments = 4
    xs, state = _inputs(15, 2, 100, 3, 32)
    kernel = _interpreted(schedule="factored", segments=segments, value_tile=16)
    results = _outputs_and_gradients(kernel, xs, state)
    refs = _outputs_and_gradients(wkv7_reference, xs, state)
    for name, ref in refs.items():
        # Measured 1.8e-7 .. 4.2e-7, as with one segment.
        assert _rel(results[name], ref) < TOL, (segments, name, _rel(results[name], ref))


def test_auto_value_tile():
    assert auto_value_tile(64, 4) == 16  # B * H = 4: split to the smallest tile
    assert auto_value_tile(64, 66) == 32
    assert auto_value_tile(64, 132) == 64  # enough programs with full rows
    assert auto_value_tile(64, 64, target=108) == 32  # an A100's SMs: 128 programs
    assert auto_value_tile(64, 64, target=64) == 64


def test_tiles_and_segments_follow_the_gpus_sm_count(monkeypatch):
    """Compiled on a GPU, the automatic value tile and segments fill its SMs (JAX's
    Device.core_count); interpreted or lowered without one, they fill an H100's 132."""

    def settings(**kw):  # (value tile, segments) at B*H = 8, T = 16K
        dtypes = [("r", jnp.bfloat16)]
        cfg = GpuOptions(schedule="factored").resolve(64, 8, dtypes, seq_len=16384, **kw)
        return cfg.value_tile, cfg.segments

    assert settings() == (16, 8) and settings(interpret=True) == (16, 8)  # 32 programs x 8
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    monkeypatch.setattr(jax, "devices", lambda *a: [SimpleNamespace(core_count=40)])
    assert gpu_options.target_programs() == 40
    assert settings() == (16, 2)  # 32 programs x 2 segments >= 40 SMs
    assert settings(interpret=True) == (16, 8)
    monkeypatch.setattr(jax, "devices", lambda *a: [SimpleNamespace()])  # count not reported
    assert gpu_options.target_programs() == gpu_options.TARGET_PROGRAMS


@pytest.mark.parametrize(
    "dtype, value_tile, dot_precision, schedule, chunk_size",
    [
        (jnp.float32, None, "highest", "sequential", 16),
        (jnp.float32, 64, "tf32x3", "sequential", 16),
        (jnp.float32, None, "bf16", "sequential", 16),
        (jnp.bfloat16, None, None, "sequential", 16),  # the default: "bf16" dots
        (jnp.bfloat16, None, "exact bf16x3", "sequential", 16),
        (jnp.bfloat16, 64, "tf32x3", "sequential", 16),
        (jnp.float32, None, "highest", "chunk_parallel", 16),
        (jnp.float32, 32, "tf32x3", "chunk_parallel", 32),
        (jnp.bfloat16, None, None, "chunk_parallel", 16),
        (jnp.bfloat16, None, "exact bf16x3", "chunk_parallel", 16),
        (jnp.bfloat16, 64, None, "chunk_parallel", 64),
        (jnp.float32, None, "highest", "factored", 16),
        (jnp.bfloat16, None, "exact bf16x3", "factored", 16),
        (jnp.bfloat16, 32, None, "factored", 64),
    ],
)
def test_cross_lowers_for_cuda(dtype, value_tile, dot_precision, schedule, chunk_size):
    """Forward and gradient lower through Pallas-Triton at production sizes on a CPU host."""
    batch, seq, heads, n = 1, 4096, 4, 64
    token = jax.ShapeDtypeStruct((batch, seq, heads, n), dtype)
    args = (token,) * 6 + (jax.ShapeDtypeStruct((batch, heads, n, n), jnp.float32),)
    # "exact P": the default dot_precision with exact_dot_precision P.
    precisions = {"dot_precision": dot_precision}
    if dot_precision and dot_precision.startswith("exact "):
        precisions = {"exact_dot_precision": dot_precision.removeprefix("exact ")}
    options = GpuOptions(
        value_tile=value_tile, schedule=schedule, chunk_size=chunk_size, **precisions
    )
    kernel = partial(wkv7_gpu, options=options)

    def loss(*args):
        y, s = kernel(*args)
        return jnp.sum(y) + jnp.sum(s)

    # Sequential: the forward (saving chunk starts) and the backward kernel. Chunk-parallel:
    # chunk terms, scan and outputs forward; chunk terms, reverse scan and gradients backward.
    # Factored: chunk terms, carry and pass forward; chunk terms, reverse carry, reverse pass
    # and gradients (B*H = 4 with 16-row value tiles: 16 programs, so 8 segments and carries).
    n_forward = {"sequential": 1, "chunk_parallel": 3, "factored": 3}[schedule]
    n_backward = {"sequential": 1, "chunk_parallel": 3, "factored": 4}[schedule]
    for fn, n_kernels in (
        (kernel, n_forward),
        (jax.grad(loss, argnums=tuple(range(7))), n_forward + n_backward),
    ):
        lowered = jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",))
        assert lowered.as_text().count("__gpu$xla.gpu.triton") == n_kernels


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_launch_parameters_reach_triton(schedule):
    """num_warps reaches every kernel; only the in-order scans / passes whose loads do not
    depend on the state (chunk-parallel, factored) pipeline them."""
    token = jax.ShapeDtypeStruct((1, 256, 2, 64), jnp.bfloat16)
    for num_warps in (4, 8):
        kernel = partial(wkv7_gpu, options=GpuOptions(schedule=schedule, num_warps=num_warps))
        text = jax.jit(kernel).trace(*(token,) * 6).lower(lowering_platforms=("cuda",)).as_text()
        assert set(re.findall(r"num_warps = (\d+)", text)) == {str(num_warps)}
        stages = sorted(re.findall(r"num_stages = (\d+)", text))
        expected = {"sequential": ["1"], "chunk_parallel": ["1", "1", "2"], "factored": ["1", "2"]}
        assert stages == expected[schedule]


def test_defaults_follow_the_schedule_table(monkeypatch):
    """schedule / chunk_size / num_warps / gradient_value_tile / scan_group = None take
    DEFAULT_SCHEDULE and SCHEDULE_DEFAULTS, so a GPU run that crowns another schedule or setting
    changes only those two names."""
    token = jax.ShapeDtypeStruct((1, 256, 2, 64), jnp.bfloat16)

    def lowered_text(grad=False):
        # A fresh function each time: jit would otherwise reuse the first trace.
        fn = lambda *xs: wkv7_gpu(*xs)
        if grad:
            fn = jax.grad(lambda *xs: jnp.sum(wkv7_gpu(*xs)[0]), argnums=tuple(range(6)))
        return jax.jit(fn).trace(*(token,) * 6).lower(lowering_platforms=("cuda",)).as_text()

    text = lowered_text()
    assert text.count("__gpu$xla.gpu.triton") == 1  # sequential: one forward kernel
    assert set(re.findall(r"num_warps = (\d+)", text)) == {"4"}
    monkeypatch.setattr(gpu_options, "DEFAULT_SCHEDULE", "chunk_parallel")
    assert "stablehlo.dot_general" not in text
    table = {"chunk_size": 32, "num_warps": 8, "gradient_value_tile": 16, "scan_group": 2}
    monkeypatch.setitem(gpu_options.SCHEDULE_DEFAULTS, "chunk_parallel", table)
    text = lowered_text()
    assert text.count("__gpu$xla.gpu.triton") == 3  # chunk terms, scan, outputs
    assert "stablehlo.dot_general" in text  # XLA composes pairs of chunk maps for the scan
    assert set(re.findall(r"num_warps = (\d+)", text)) == {"8"}
    # The chunk-grid kernels run B*H x T / 32 programs.
    assert re.findall(r"grid_y = (\d+)", text).count(str(256 // 32)) == 2
    # The gradient kernel alone has a third grid axis: N / 16 value tiles.
    assert re.findall(r"grid_z = (\d+)", lowered_text(grad=True)).count(str(64 // 16)) == 1


@pytest.mark.parametrize(
    "kwargs, n, match",
    [
        ({"chunk_size": 8}, 32, "chunk_size"),
        ({"chunk_size": 24}, 32, "chunk_size"),
        ({"chunk_size": 128}, 32, "chunk_size"),
        ({"chunk_size": 16.0}, 32, "chunk_size"),
        ({"value_tile": 8}, 32, "value_tile"),
        ({"value_tile": 24}, 32, "value_tile"),
        ({"value_tile": 64}, 32, "value_tile"),
        ({"dot_precision": "fp32"}, 32, "dot_precision"),
        ({"dot_precision": "HIGHEST"}, 32, "dot_precision"),
        ({"dot_precision": lax.Precision.HIGHEST}, 32, "dot_precision"),
        ({"exact_dot_precision": "bf16"}, 32, "exact_dot_precision"),
        ({"exact_dot_precision": "BF16X3"}, 32, "exact_dot_precision"),
        ({"exact_dot_precision": lax.DotAlgorithmPreset.BF16_BF16_F32_X3}, 32, "exact_dot"),
        ({"schedule": "parallel"}, 32, "schedule"),
        ({"num_warps": 3}, 32, "num_warps"),
        ({"num_warps": 32}, 32, "num_warps"),
        ({"schedule": "Sequential"}, 32, "schedule"),
        ({"schedule": "chunk_parallel", "gradient_value_tile": 8}, 32, "gradient_value_tile"),
        ({"schedule": "chunk_parallel", "gradient_value_tile": 24}, 32, "gradient_value_tile"),
        ({"schedule": "chunk_parallel", "gradient_value_tile": 64}, 32, "gradient_value_tile"),
        ({"schedule": "factored", "gradient_value_tile": 24}, 32, "gradient_value_tile"),
        ({"gradient_value_tile": 16}, 32, "'chunk_parallel' / 'factored' only"),
        ({"schedule": "factored", "scan_group": 2}, 32, "'chunk_parallel' only"),
        ({"schedule": "factored", "segments": 3}, 32, "segments"),
        ({"schedule": "factored", "segments": 32}, 32, "segments"),
        ({"schedule": "factored", "segments": 0}, 32, "segments"),
        ({"segments": 2}, 32, "'factored' only"),
        ({"schedule": "chunk_parallel", "scan_group": 3}, 32, "scan_group"),
        ({"schedule": "chunk_parallel", "scan_group": 0}, 32, "scan_group"),
        ({"schedule": "chunk_parallel", "scan_group": 32}, 32, "scan_group"),
        ({"scan_group": 2}, 32, "chunk_parallel' only"),
        ({}, 48, "head size N"),
        ({}, 8, "head size N"),
    ],
)
def test_bad_arguments(kwargs, n, match):
    xs, _ = _inputs(6, 1, 16, 1, n)
    with pytest.raises(ValueError, match=match):
        wkv7_gpu(*xs, options=GpuOptions(**kwargs), interpret=True)


@pytest.mark.parametrize("n", [24, 40, 48, 96])
def test_head_sizes_that_are_not_powers_of_two_are_refused(n):
    """Triton blocks need power-of-two shapes: N = 48 etc. is refused up front, by every
    schedule and through the public entry, with a message naming N (the TPU and XLA forms
    take any N)."""
    xs = (jnp.zeros((1, 16, 1, n), jnp.float32),) * 6
    match = rf"head size N must be a power of two >= 16 .*got N = {n}$"
    for schedule in SCHEDULES:
        with pytest.raises(ValueError, match=match):
            wkv7_gpu(*xs, options=GpuOptions(schedule=schedule), interpret=True)
    with pytest.raises(ValueError, match=match):
        wkv7(*xs, backend="pallas_gpu", interpret=True)


def test_bad_dtype_and_shapes():
    xs, state = _inputs(7, 1, 16, 1, 32)
    with pytest.raises(ValueError, match="v has dtype int32"):
        wkv7_gpu(*xs[:3], xs[3].astype(jnp.int32), *xs[4:], interpret=True)
    with pytest.raises(ValueError, match="k has shape"):
        wkv7_gpu(*xs[:2], xs[2][:, :8], *xs[3:], interpret=True)
    with pytest.raises(ValueError, match="state must be"):
        wkv7_gpu(*xs, state[:, :, :16], interpret=True)


def test_options_are_frozen_defaults_and_resolve():
    """GpuOptions: immutable; get_default() is the default schedule's table, which resolves as
    every setting left automatic does; resolve fills in the shape-dependent settings."""
    default = GpuOptions.get_default()
    assert default.schedule == gpu_options.DEFAULT_SCHEDULE
    assert default.chunk_size == gpu_options.SCHEDULE_DEFAULTS[default.schedule]["chunk_size"]
    with pytest.raises(dataclasses.FrozenInstanceError):
        default.chunk_size = 32
    dtypes = [(name, jnp.float32) for name in "rwkvab"]
    assert default.resolve(64, 8, dtypes) == GpuOptions().resolve(64, 8, dtypes)
    cfg = GpuOptions(schedule="chunk_parallel").resolve(32, 2, [("r", jnp.bfloat16)])
    assert (cfg.schedule, cfg.chunk, cfg.num_warps) == ("chunk_parallel", 16, 8)
    # At most N; bf16 inputs take bf16 fast dots; B*H = 2 leaves most SMs idle: 16-row tiles.
    assert (cfg.gradient_value_tile, cfg.scan_group, cfg.segments) == (32, 1, 1)
    assert (cfg.dot_precision, cfg.exact_dot_precision, cfg.value_tile) == ("bf16", "highest", 16)
    xs, _ = _inputs(7, 1, 16, 1, 32)
    with pytest.raises(TypeError, match="GpuOptions"):
        wkv7_gpu(*xs, options={"schedule": "factored"}, interpret=True)


_RESULT_NAMES = "y state dr dw dk dv da db dstate".split()


def _outputs_and_gradients(kernel, xs, state):
    """{name: array} of kernel's (y, final state) and the 7 gradients of _weighted_loss."""
    out = jax.jit(kernel)(*xs, state)
    grads = jax.jit(jax.grad(_weighted_loss(kernel), argnums=tuple(range(7))))(*xs, state)
    return dict(zip(_RESULT_NAMES, (*out, *grads), strict=True))


def test_schedules_agree():
    """N = 64, chunk 16, value tiles of 16: the chunk-parallel and factored schedules vs the
    sequential one (same maths, other associations of the state products), forward and
    gradients."""
    xs, state = _inputs(11, 1, 48, 2, 64)
    results = {
        schedule: _outputs_and_gradients(_interpreted(value_tile=16, schedule=schedule), xs, state)
        for schedule in SCHEDULES
    }
    for schedule in SCHEDULES[1:]:
        for name, ref in results["sequential"].items():
            # Measured 1.4e-7 .. 4.1e-7 (chunk-parallel), 6.9e-8 .. 3.4e-7 (factored): fp32
            # rounding of the associations.
            got = results[schedule][name]
            assert _rel(got, ref) < 2e-6, (schedule, name, _rel(got, ref))


def test_scan_group_products_follow_the_exact_dot_precision():
    """XLA's map products for scan groups: IEEE fp32, or the kernels' hi / lo bf16 split with
    exact_dot_precision="bf16x3" (so grouping does not change the precision plan)."""
    keys = jax.random.split(jax.random.PRNGKey(14), 2)
    x, y = jax.random.normal(keys[0], (3, 16, 64)), jax.random.normal(keys[1], (3, 64, 64))
    exact = np.einsum("bij,bjk->bik", np.asarray(x, np.float64), np.asarray(y, np.float64))
    errors = {p: _rel(exact_matmul(x, y, p), exact) for p in ("highest", "bf16x3")}
    # Measured 2.5e-7 (fp32) and 5.4e-6 (split; a single bf16 pass gives 2.6e-3).
    assert errors["highest"] < 1e-6 < errors["bf16x3"] < 5e-5, errors


def test_scan_groups_match_single_chunk_steps():
    """Chunk-parallel, 3 chunks: groups of 2 (two scan steps) and of 4 (one), each padded with
    an identity map. Composing chunk maps for the forward and reverse scans changes only the
    fp32 association."""
    xs, state = _inputs(12, 1, 40, 2, 32)
    results = {
        group: _outputs_and_gradients(
            _interpreted(schedule="chunk_parallel", scan_group=group),
            xs,
            state,
        )
        for group in (1, 2, 4)
    }
    for group in (2, 4):
        for name, ref in results[1].items():
            got = results[group][name]
            assert _rel(got, ref) < 2e-6, (group, name, _rel(got, ref))
