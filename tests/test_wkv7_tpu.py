"""WKV-7 TPU (Mosaic) kernels: interpret-mode parity with the lax.scan oracle, and TPU lowering."""

import re
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tpu_races import race_params, run_planted_race

from pallas_kernels.wkv7 import tpu
from pallas_kernels.wkv7.ops import wkv7
from pallas_kernels.wkv7.reference import wkv7_reference
from pallas_kernels.wkv7.tpu import wkv7_tpu

# max|kernel - reference| / max|reference| for fp32 inputs, outputs and every gradient.
TOL = 1e-5
# bf16 inputs (bf16 operands in the intra-chunk matmuls, bf16 gradients) against the fp32 oracle
# run on the same bf16-rounded inputs. Measured at T = 100, C = 32: y 3.6e-3, final state 4e-4,
# gradients 3e-3 .. 6e-3 (of which rounding the fp32 gradients to bf16 alone is 2e-3 .. 3.5e-3).
BF16_TOL = 1e-2
W_MIN = -0.606531  # RWKV-7's log-decay is -0.606531 * sigmoid(.), so w lies in (W_MIN, 0)
NAMES = ("r", "w", "k", "v", "a", "b", "state")


def model_like_inputs(seed, batch, seq, heads, n, *, repeated_key=False):
    """(r, w, k, v, a, b, state) fp32, scaled like an RWKV-7 block's WKV inputs.

    w in [W_MIN, -1e-4], a = -kk, b = kk * a_rate with kk unit-normalised. repeated_key repeats
    one kk with a_rate ~ 1 and slow decay: the hardest case for the in-chunk inverse.
    """
    rng = np.random.default_rng(seed)
    shape = (batch, seq, heads, n)
    r, k, v, kk = (rng.standard_normal(shape) for _ in range(4))
    a_rate = 1.0 / (1.0 + np.exp(-rng.standard_normal(shape)))
    w = np.clip(W_MIN / (1.0 + np.exp(-2.0 * rng.standard_normal(shape))), W_MIN, -1e-4)
    if repeated_key:
        kk = np.broadcast_to(kk[:, :1], shape)
        a_rate = np.full(shape, 0.999)
        w = np.full(shape, -1e-4)
    kk = kk / np.linalg.norm(kk, axis=-1, keepdims=True)
    state = 0.5 * rng.standard_normal((batch, heads, n, n))
    return tuple(jnp.asarray(x, jnp.float32) for x in (r, w, k, v, -kk, kk * a_rate, state))


def relative_error(got, want):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.max(np.abs(got - want)) / np.max(np.abs(want)))


def random_cotangent(args, seed=1234):
    """Random cotangents for (y [B, T, H, N], final state [B, H, N, N])."""
    batch, _, heads, n = args[0].shape
    rng = np.random.default_rng(seed)
    return tuple(
        jnp.asarray(rng.standard_normal(shape), jnp.float32)
        for shape in (args[0].shape, (batch, heads, n, n))
    )


def outputs_and_pullback(fn, args, cot):
    """(y, final state, cotangents of every argument) of fn at args, in one jitted call."""

    def run(args, cot):
        out, pullback = jax.vjp(fn, *args)
        return out, pullback(cot)

    return jax.jit(run)(args, cot)


def assert_matches_reference(fn, args, tol, *, grad_dtypes=None):
    """Checks fn's outputs and all gradients against the fp32 oracle at the same inputs.

    Returns:
        ({name: relative error}, y, the oracle's y).
    """
    cot = random_cotangent(args)
    (y, s), grads = outputs_and_pullback(fn, args, cot)
    f32_args = tuple(x.astype(jnp.float32) for x in args)
    (y_ref, s_ref), grads_ref = outputs_and_pullback(wkv7_reference, f32_args, cot)
    assert y.dtype == s.dtype == jnp.float32
    errors = {"y": relative_error(y, y_ref), "final state": relative_error(s, s_ref)}
    for name, g, g_ref, x in zip(NAMES, grads, grads_ref, args, strict=False):
        assert g.shape == x.shape and g.dtype == x.dtype, name
        errors[f"d{name}"] = relative_error(g, g_ref)
    bad = {k: f"{e:.2e}" for k, e in errors.items() if not e <= tol}
    assert not bad, f"relative errors above {tol:.0e}: {bad}"
    return errors, y, y_ref


# ------------------------------------------------------------------------------------------
# Interpret mode (CPU) against the oracle
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "seed, batch, seq, heads, chunk_size, with_state",
    [
        (0, 1, 50, 2, 16, True),  # 4 chunks, the last padded
        (1, 2, 20, 1, 32, False),  # one padded chunk per head, no initial state
    ],
    ids=["chunk16-state", "chunk32-no-state"],
)
def test_matches_reference_fp32(seed, batch, seq, heads, chunk_size, with_state):
    *xs, state = model_like_inputs(seed, batch, seq, heads, 64)
    args = (*xs, state) if with_state else tuple(xs)
    assert_matches_reference(partial(wkv7_tpu, chunk_size=chunk_size, interpret=True), args, TOL)


@pytest.mark.parametrize(
    "seq, n, chunk_size",
    [
        (100, 48, None),  # the default chunk
        (130, 96, None),
        (50, 40, 16),
    ],
)
def test_head_sizes_that_are_not_powers_of_two(seq, n, chunk_size):
    """The kernels take any N (their blocks span the whole head): N that is not a power of two,
    not a multiple of the chunk, and T not a multiple of the chunk. Outputs and all gradients."""
    chunk = {} if chunk_size is None else {"chunk_size": chunk_size}
    args = model_like_inputs(10, 1, seq, 2, n)
    assert_matches_reference(partial(wkv7_tpu, interpret=True, **chunk), args, TOL)


def test_empty_sequence_returns_the_state():
    *xs, state = model_like_inputs(2, 1, 0, 2, 64)
    y, s = wkv7_tpu(*xs, state, chunk_size=16, interpret=True)
    assert y.shape == (1, 0, 2, 64)
    np.testing.assert_array_equal(s, state)


def test_bf16_inputs_within_bound_of_fp32_oracle():
    args = model_like_inputs(3, 1, 100, 2, 64)
    bf16_args = (*(x.astype(jnp.bfloat16) for x in args[:6]), args[6])
    errors, _, _ = assert_matches_reference(
        partial(wkv7_tpu, chunk_size=32, interpret=True), bf16_args, BF16_TOL
    )
    # The bf16 operands are really used: fp32 operands would land near 1e-6.
    assert errors["y"] > 1e-4, errors


# ------------------------------------------------------------------------------------------
# TPU interpret mode: simulated memory spaces, two cores, race detection
# ------------------------------------------------------------------------------------------


def test_race_detector_sees_a_planted_race(race_states):
    """Control: two cores writing one output block is reported, so a clean run means something."""
    run_planted_race()
    assert [state.races_found for state in race_states] == [True]


def test_tpu_interpret_mode_no_races(race_states):
    args = model_like_inputs(4, 1, 40, 2, 64)  # 3 chunks of 16, the last padded
    fn = partial(wkv7_tpu, chunk_size=16, interpret=race_params())
    # The plain forward kernel (no chunk states kept) ...
    y, s = jax.jit(fn)(*args)
    y_ref, s_ref = jax.jit(wkv7_reference)(*args)
    assert relative_error(y, y_ref) <= TOL and relative_error(s, s_ref) <= TOL
    # ... then the forward keeping chunk states and the backward kernel.
    assert_matches_reference(fn, args, TOL)
    assert len(race_states) == 3
    assert not any(state.races_found for state in race_states)


# ------------------------------------------------------------------------------------------
# Lowering for TPU at production block sizes (no TPU needed)
# ------------------------------------------------------------------------------------------


def production_shapes(dtype, n=64):
    token = jax.ShapeDtypeStruct((1, 4096, 4, n), dtype)
    return (token,) * 6 + (jax.ShapeDtypeStruct((1, 4, n, n), jnp.float32),)


def forward_and_grad(chunk_size):
    fn = partial(wkv7_tpu, chunk_size=chunk_size)

    def loss(*args):
        y, s = fn(*args)
        return jnp.sum(y) + jnp.sum(s * s)

    return fn, jax.grad(loss, argnums=tuple(range(7)))


@pytest.mark.parametrize(
    "dtype, n",
    [(jnp.float32, 64), (jnp.bfloat16, 64), (jnp.float32, 48)],
    ids=["fp32", "bf16", "fp32-n48"],
)
def test_lowers_for_tpu(dtype, n):
    """The forward lowers to one Mosaic kernel, the gradient to two (the forward keeping the
    chunk start states, and the backward): a WKV that fell back to XLA would lower without them."""
    kernels = (["wkv7_tpu_forward"], ["wkv7_tpu_forward", "wkv7_tpu_backward"])
    for fn, names in zip(forward_and_grad(tpu.DEFAULT_CHUNK_SIZE), kernels, strict=True):
        lowered = jax.jit(fn).trace(*production_shapes(dtype, n))
        text = lowered.lower(lowering_platforms=("tpu",)).as_text()
        assert text.count("stablehlo.custom_call @tpu_custom_call(") == len(names)
        assert re.findall(r'kernel_name = "(\w+)"', text) == names


@pytest.mark.aot
@pytest.mark.parametrize("chunk_size", [64, 128])
@pytest.mark.parametrize("topology", ["v4:2x2x1", "v5e:2x2x1", "v5p:2x2x1", "v6e:2x2x1"])
def test_compiles_for_tpu(topology, chunk_size):
    """Runs the Mosaic compiler (libtpu, no TPU): catches unsupported layouts and VMEM overflow.

    Needs the TPU compiler: `pip install -e '.[aot]'`, then `pytest -m aot`.
    """
    from jax.experimental import topologies
    from jax.sharding import SingleDeviceSharding

    device = topologies.get_topology_desc(
        platform="tpu",
        topology_name=topology,
        chip_config_name="default",
        chips_per_host_bounds=(2, 2, 1),
        num_slices=1,
    ).devices[0]
    sharding = SingleDeviceSharding(device)
    for dtype in (jnp.float32, jnp.bfloat16):
        shapes = tuple(
            jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)
            for x in production_shapes(dtype)
        )
        for fn in forward_and_grad(chunk_size):
            assert jax.jit(fn).trace(*shapes).lower().compile() is not None


# ------------------------------------------------------------------------------------------
# Arguments
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("chunk_size", [8, 48, 256, 64.0, True])
def test_bad_chunk_size_raises(chunk_size):
    args = model_like_inputs(5, 1, 8, 1, 64)
    with pytest.raises(ValueError, match="chunk_size"):
        wkv7_tpu(*args, chunk_size=chunk_size, interpret=True)


def test_bad_arguments_raise():
    r, w, k, v, a, b, state = model_like_inputs(6, 1, 8, 2, 64)
    with pytest.raises(ValueError, match="interpret"):
        wkv7_tpu(r, w, k, v, a, b, interpret="yes")
    with pytest.raises(ValueError, match="k has shape"):
        wkv7_tpu(r, w, k[:, :4], v, a, b, interpret=True)
    with pytest.raises(ValueError, match="state must be"):
        wkv7_tpu(r, w, k, v, a, b, state[:, :1], interpret=True)
    with pytest.raises(ValueError, match="v must be float32 or bfloat16"):
        wkv7_tpu(r, w, k, v.astype(jnp.float16), a, b, interpret=True)


# ------------------------------------------------------------------------------------------
# Production chunks and longer sequences (each a few seconds in interpret mode)
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("chunk_size", [None, 128], ids=["default", "chunk128"])
@pytest.mark.parametrize("repeated_key", [False, True], ids=["random", "repeated-key"])
def test_matches_reference_production_chunks(chunk_size, repeated_key):
    """The default chunk (64) through the public entry, and 128: five and three chunks, the last
    padded. Repeated keys with a_rate ~ 1 and slow decay are the hardest case for the in-chunk
    inverse, hardest at the longest chunks."""
    seq = 300
    assert seq > 4 * tpu.DEFAULT_CHUNK_SIZE
    args = model_like_inputs(7, 1, seq, 2, 64, repeated_key=repeated_key)
    fn = partial(wkv7, backend="pallas_tpu", interpret=True, chunk_size=chunk_size)
    assert_matches_reference(fn, args, TOL)


def test_bf16_error_does_not_grow_with_length():
    """bf16 inputs, 1024 tokens at the default chunk (16 chunks of 64): every output and gradient
    within BF16_TOL, and y's error in the last 128 tokens under twice that in the first 128
    (the state path stays fp32, so rounding errors do not compound along the sequence)."""
    seq, window = 1024, 128
    args = model_like_inputs(8, 1, seq, 2, 64)
    bf16_args = (*(x.astype(jnp.bfloat16) for x in args[:6]), args[6])
    _, y, y_ref = assert_matches_reference(partial(wkv7_tpu, interpret=True), bf16_args, BF16_TOL)
    err = np.abs(np.asarray(y) - np.asarray(y_ref))
    first = err[:, :window].max() / np.abs(np.asarray(y_ref[:, :window])).max()
    last = err[:, -window:].max() / np.abs(np.asarray(y_ref[:, -window:])).max()
    # Measured 3.0e-3 (first) and 3.2e-3 (last); every 128-token window 2.5e-3 .. 3.7e-3.
    assert last < 2 * first, (first, last)
