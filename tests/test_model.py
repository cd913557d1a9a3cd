"""The Flax model and the public `forward`: shapes, backends agreeing, dtypes, bad input."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import rwkvx_jax
from rwkvx_jax.checkpoints.official_layout import params_from_state_dict
from rwkvx_jax.checkpoints.random_weights import random_state_dict
from rwkvx_jax.config import preset
from rwkvx_jax.model import RWKVX

TINY = preset("tiny")  # chunk 16, top-k 3: T > 48 is in the sparse regime


@pytest.fixture(scope="module")
def tiny_params():
    return params_from_state_dict(random_state_dict(TINY, seed=4), TINY)


def _relative_error(a, b):
    return float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b)))


def test_forward_shapes_and_dtype(tiny_params):
    tokens = np.random.default_rng(0).integers(0, TINY.vocab_size, size=(2, 21))
    logits = rwkvx_jax.forward(TINY, tiny_params, tokens)
    assert logits.shape == (2, 21, TINY.vocab_size)
    assert logits.dtype == jnp.float32
    assert bool(jnp.isfinite(logits).all())


def test_batch_rows_are_independent(tiny_params):
    tokens = np.random.default_rng(1).integers(0, TINY.vocab_size, size=(3, 70))
    together = rwkvx_jax.forward(TINY, tiny_params, tokens)
    alone = rwkvx_jax.forward(TINY, tiny_params, tokens[1:2])
    assert _relative_error(together[1:2], alone) <= 1e-5


def test_causal(tiny_params):
    """Changing token t changes no logit before t, in the sparse regime too."""
    tokens = np.random.default_rng(2).integers(0, TINY.vocab_size, size=(1, 100))
    changed = tokens.copy()
    changed[0, 80] = (changed[0, 80] + 1) % TINY.vocab_size
    a = rwkvx_jax.forward(TINY, tiny_params, tokens)
    b = rwkvx_jax.forward(TINY, tiny_params, changed)
    # Not bit-equal: the chunked WKV centres its exponents on a decay sum that includes later
    # tokens of the same chunk, which changes rounding (not values) at earlier positions.
    assert _relative_error(a[:, :80], b[:, :80]) <= 1e-5
    assert _relative_error(a[:, 80:], b[:, 80:]) > 1e-2


def test_chunked_backends_match_references_in_sparse_regime(tiny_params):
    """Whole model, T = 150 > chunk * top_k = 48: the default kernels against the oracles."""
    tokens = np.random.default_rng(3).integers(0, TINY.vocab_size, size=(2, 150))
    fast = rwkvx_jax.forward(TINY, tiny_params, tokens)
    oracle_config = TINY.replace(wkv_backend="reference", attention_backend="reference")
    oracle = rwkvx_jax.forward(oracle_config, tiny_params, tokens)
    assert _relative_error(fast, oracle) <= 1e-4


def test_gradients_match_reference_backends(tiny_params):
    tokens = jnp.asarray(np.random.default_rng(4).integers(0, TINY.vocab_size, size=(1, 60)))

    def loss(params, config):
        logits = RWKVX(config).apply({"params": params}, tokens[:, :-1])
        logp = jax.nn.log_softmax(logits)
        return -jnp.mean(jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1))

    oracle = TINY.replace(wkv_backend="reference", attention_backend="reference")
    grad = jax.jit(jax.grad(loss), static_argnums=1)
    fast_grads = grad(tiny_params, TINY)
    ref_grads = grad(tiny_params, oracle)
    for (path, g), r in zip(
        jax.tree_util.tree_leaves_with_path(fast_grads), jax.tree.leaves(ref_grads), strict=True
    ):
        scale = float(jnp.max(jnp.abs(r)))
        if scale > 0:
            assert float(jnp.max(jnp.abs(g - r))) / scale <= 1e-4, jax.tree_util.keystr(path)


def test_bf16_compute_tracks_fp32(tiny_params):
    tokens = np.random.default_rng(5).integers(0, TINY.vocab_size, size=(1, 64))
    fp32 = rwkvx_jax.forward(TINY, tiny_params, tokens)
    bf16 = rwkvx_jax.forward(TINY.replace(dtype="bfloat16"), tiny_params, tokens)
    assert bf16.dtype == jnp.float32
    # bf16 has 8 mantissa bits (~4e-3 per rounding); across 6 blocks a few percent is expected.
    assert _relative_error(bf16, fp32) <= 5e-2


def test_init_produces_a_trainable_model():
    init = jax.jit(lambda key: RWKVX(TINY).init(key, jnp.zeros((1, 8), jnp.int32)))
    params = init(jax.random.PRNGKey(0))["params"]
    tokens = np.random.default_rng(6).integers(0, TINY.vocab_size, size=(1, 40))
    logits = rwkvx_jax.forward(TINY, params, tokens)
    assert bool(jnp.isfinite(logits).all())


@pytest.mark.parametrize(
    "tokens, error, match",
    [
        (np.full((1, 4), 256), ValueError, r"token ids must lie in \[0, 256\)"),
        (np.full((1, 4), -1), ValueError, "token ids must lie"),
        (np.zeros((4,), np.int32), ValueError, r"shape \[batch, time\]"),
        (np.zeros((1, 4), np.float32), TypeError, "must be integers"),
        (np.zeros((1, 0), np.int32), ValueError, "no time steps"),
    ],
)
def test_bad_tokens_are_rejected_clearly(tiny_params, tokens, error, match):
    with pytest.raises(error, match=match):
        rwkvx_jax.forward(TINY, tiny_params, tokens)
