"""WKV-7: the chunked form (forward and custom VJP) against the lax.scan oracle, in fp32 on CPU."""

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.wkv7 import wkv7_chunked, wkv7_reference

# max|chunked - reference| / max|reference|, for outputs and for every gradient.
TOL = 1e-5
# RWKV-7's log-decay is -0.606531 * sigmoid(.), so w lies in (-0.6065, 0).
W_MIN = -0.606531


def model_like_inputs(seed, batch, seq, heads, n, *, decay="random", repeated_key=False):
    """(r, w, k, v, a, b, state) fp32, shaped and scaled like an RWKV-7 block's WKV inputs.

    decay: "random" spreads w over (W_MIN, 0); "slow" sets w = -1e-4 and "fast" w = W_MIN
    everywhere. repeated_key repeats one kk over the whole sequence with a_rate ~ 1: the
    hardest case for the in-chunk inverse (I - A_ab)^{-1}. numpy's generator, not jax.random,
    keeps the suite free of per-shape compiles.
    """
    rng = np.random.default_rng(seed)
    shape = (batch, seq, heads, n)
    r, k, v, kk = (rng.standard_normal(shape) for _ in range(4))
    a_rate = 1.0 / (1.0 + np.exp(-rng.standard_normal(shape)))
    if repeated_key:
        kk = np.broadcast_to(kk[:, :1], shape)
        a_rate = np.full(shape, 0.999)
    kk = kk / np.linalg.norm(kk, axis=-1, keepdims=True)
    if decay == "random":
        w = W_MIN / (1.0 + np.exp(-2.0 * rng.standard_normal(shape)))
    elif decay == "slow":
        w = np.full(shape, -1e-4)
    else:
        w = np.full(shape, W_MIN)
    state = 0.5 * rng.standard_normal((batch, heads, n, n))
    return tuple(jnp.asarray(x, jnp.float32) for x in (r, w, k, v, -kk, kk * a_rate, state))


def relative_error(got, want):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.max(np.abs(got - want)) / np.max(np.abs(want)))


def assert_close(got, want, what):
    assert got.shape == want.shape, what
    err = relative_error(got, want)
    assert err <= TOL, f"{what}: relative error {err:.2e} > {TOL:.0e}"


def assert_forward_matches(args, chunk_size):
    y_ref, s_ref = jax.jit(wkv7_reference)(*args)
    y, s = jax.jit(partial(wkv7_chunked, chunk_size=chunk_size))(*args)
    assert y.dtype == s.dtype == jnp.float32
    assert_close(y, y_ref, "y")
    assert_close(s, s_ref, "final state")


def assert_vjp_matches(args, chunk_size):
    """Pulls one random cotangent (for y and final state) back through both implementations;
    checks the outputs of the same call too."""

    def pullback(fn):
        def run(args, cot):
            out, vjp = jax.vjp(fn, *args)
            return out, vjp(cot)

        return jax.jit(run)

    batch, _, heads, n = args[0].shape
    rng = np.random.default_rng(1234)
    cot = tuple(
        jnp.asarray(rng.standard_normal(shape), jnp.float32)
        for shape in (args[0].shape, (batch, heads, n, n))
    )
    (y_ref, s_ref), want = pullback(wkv7_reference)(args, cot)
    (y, s), got = pullback(partial(wkv7_chunked, chunk_size=chunk_size))(args, cot)
    assert_close(y, y_ref, "y")
    assert_close(s, s_ref, "final state")
    for name, g, g_ref in zip(("r", "w", "k", "v", "a", "b", "state"), got, want, strict=True):
        assert_close(g, g_ref, f"d{name}")


def test_reference_matches_numpy_loop():
    """The oracle itself, against a float64 transcription of the recurrence (layout [V, K])."""
    r, w, k, v, a, b, s0 = (np.asarray(x, np.float64) for x in model_like_inputs(0, 1, 7, 2, 4))
    s = s0.copy()
    ys = []
    for t in range(r.shape[1]):
        for h in range(r.shape[2]):
            sa = s[0, h] @ a[0, t, h]
            s[0, h] = (
                s[0, h] * np.exp(w[0, t, h])[None, :]
                + np.outer(sa, b[0, t, h])
                + np.outer(v[0, t, h], k[0, t, h])
            )
        ys.append(np.einsum("hvk,hk->hv", s[0], r[0, t]))
    y, final = wkv7_reference(*(jnp.asarray(x, jnp.float32) for x in (r, w, k, v, a, b, s0)))
    np.testing.assert_allclose(y[0], np.stack(ys), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(final, s, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "chunk_size, seq, heads, n, decay",
    [
        (16, 256, 2, 64, "random"),
        (32, 100, 3, 64, "random"),  # T not a multiple of the chunk
        (64, 256, 2, 64, "slow"),
        (128, 256, 2, 64, "fast"),
        (128, 200, 2, 64, "random"),
        (64, 40, 2, 64, "random"),  # T shorter than one chunk
        (32, 1, 3, 64, "random"),
        (16, 48, 2, 16, "fast"),  # another head size
    ],
)
def test_forward_matches_reference(chunk_size, seq, heads, n, decay):
    args = model_like_inputs(1, 2, seq, heads, n, decay=decay)
    assert_forward_matches(args, chunk_size)


@pytest.mark.parametrize(
    "chunk_size, seq, heads, decay",
    [
        (16, 100, 2, "fast"),
        (32, 256, 3, "random"),
        (64, 100, 2, "slow"),
        (128, 256, 2, "fast"),
        (128, 160, 2, "random"),
    ],
)
def test_gradients_match_reference(chunk_size, seq, heads, decay):
    args = model_like_inputs(2, 2, seq, heads, 64, decay=decay)
    assert_vjp_matches(args, chunk_size)


@pytest.mark.parametrize(
    "chunk_size, seq, n",
    [
        (16, 100, 48),  # the model's default chunk
        (64, 150, 96),  # N above the chunk, not a multiple of it
        (32, 72, 40),  # halving meets 5 and then 3: two odd lengths
        (64, 70, 24),  # N below the chunk
        (16, 37, 5),  # odd from the start
    ],
)
def test_head_sizes_that_are_not_powers_of_two(chunk_size, seq, n):
    """Any N is accepted, but the other cases use 16 and 64, where `_sum_rows` (the pairwise
    halving of the N x N products behind the log-decay gradient) never meets an odd length:
    48 -> 24 -> 12 -> 6 -> 3 pads one row with zeros. Outputs, the final state and all seven
    gradients; T is never a multiple of the chunk (the padded tail)."""
    args = model_like_inputs(10, 1, seq, 2, n)
    assert_vjp_matches(args, chunk_size)


@pytest.mark.parametrize("chunk_size", [32, 128])
def test_repeated_key_run_is_stable(chunk_size):
    """One kk repeated with a_rate ~ 1 and slow decay: where prod(I + A^(2^m)) loses all digits."""
    args = model_like_inputs(3, 2, 256, 2, 64, decay="slow", repeated_key=True)
    assert_forward_matches(args, chunk_size)
    assert_vjp_matches(args, chunk_size)


def test_missing_state_means_zeros():
    r, w, k, v, a, b, state = model_like_inputs(4, 2, 40, 1, 16)
    chunked = jax.jit(partial(wkv7_chunked, chunk_size=16))
    y, s = chunked(r, w, k, v, a, b)
    y0, s0 = chunked(r, w, k, v, a, b, jnp.zeros_like(state))
    np.testing.assert_array_equal(y, y0)
    np.testing.assert_array_equal(s, s0)


def test_jit_matches_eager():
    args = model_like_inputs(5, 2, 40, 1, 16)
    eager = wkv7_chunked(*args)
    jitted = jax.jit(wkv7_chunked)(*args)
    for e, j in zip(eager, jitted, strict=True):
        np.testing.assert_allclose(j, e, rtol=1e-6, atol=1e-6)


def test_empty_sequence_returns_the_state():
    r, w, k, v, a, b, state = model_like_inputs(9, 2, 0, 2, 16)
    y, s = wkv7_chunked(r, w, k, v, a, b, state)
    assert y.shape == (2, 0, 2, 16)
    np.testing.assert_array_equal(s, state)


def test_low_precision_inputs_compute_in_fp32():
    args = tuple(x.astype(jnp.bfloat16) for x in model_like_inputs(6, 1, 40, 2, 16))
    chunked = partial(wkv7_chunked, chunk_size=16)
    y, s = jax.jit(chunked)(*args)
    y_ref, s_ref = jax.jit(wkv7_reference)(*args)
    assert y.dtype == s.dtype == jnp.float32
    assert_close(y, y_ref, "y")
    assert_close(s, s_ref, "final state")
    grad_r = jax.jit(jax.grad(lambda r: jnp.sum(chunked(r, *args[1:])[0])))(args[0])
    assert grad_r.dtype == jnp.bfloat16


@pytest.mark.parametrize("chunk_size", [8, 256, 48, 0, -16, 32.0, True])
def test_bad_chunk_size_is_rejected(chunk_size):
    args = model_like_inputs(7, 1, 8, 1, 16)
    with pytest.raises(ValueError, match=r"power of two in \[16, 128\].*overflow fp32"):
        wkv7_chunked(*args, chunk_size=chunk_size)


def test_mismatched_shapes_are_rejected():
    r, w, k, v, a, b, state = model_like_inputs(8, 1, 8, 2, 16)
    with pytest.raises(ValueError, match=r"k has shape \(1, 7, 2, 16\) but r has \(1, 8, 2, 16\)"):
        wkv7_chunked(r, w, k[:, :7], v, a, b, state)
    with pytest.raises(ValueError, match=r"state must be \[B, H, N, N\]"):
        wkv7_chunked(r, w, k, v, a, b, state[:, :1])
    with pytest.raises(ValueError, match=r"r must be \[B, T, H, N\]"):
        wkv7_reference(r[0], w[0], k[0], v[0], a[0], b[0])
