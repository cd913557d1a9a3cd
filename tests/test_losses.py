"""Tests for rwkvx_jax.training.losses: cross-entropy, L2Wrap and LongCE."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rwkvx_jax.training import losses

B, T, V = 2, 5, 11


def _logits_and_targets(seed=0, scale=3.0):
    rng = np.random.default_rng(seed)
    logits = jnp.asarray(scale * rng.standard_normal((B, T, V)), jnp.float32)
    targets = jnp.asarray(rng.integers(0, V, (B, T)), jnp.int32)
    return logits, targets


def _naive_token_ce(logits, targets):
    log_probs = jax.nn.log_softmax(logits, axis=-1)
    return -jnp.sum(log_probs * jax.nn.one_hot(targets, logits.shape[-1]), axis=-1)


def test_token_cross_entropy_matches_naive_log_softmax_and_its_gradient():
    logits, targets = _logits_and_targets()
    got = losses.token_cross_entropy(logits, targets)
    assert got.shape == (B, T) and got.dtype == jnp.float32
    np.testing.assert_allclose(got, _naive_token_ce(logits, targets), rtol=1e-6, atol=1e-6)

    grad = jax.jit(jax.grad(lambda x: losses.mean_cross_entropy(x, targets)))(logits)
    naive_grad = jax.jit(jax.grad(lambda x: jnp.mean(_naive_token_ce(x, targets))))(logits)
    np.testing.assert_allclose(grad, naive_grad, rtol=1e-6, atol=1e-8)


def test_token_cross_entropy_is_stable_for_huge_logits_and_upcasts_bf16():
    logits, targets = _logits_and_targets()
    shifted = losses.token_cross_entropy(logits + 1e4, targets)
    assert np.all(np.isfinite(shifted))
    np.testing.assert_allclose(shifted, losses.token_cross_entropy(logits, targets), atol=2e-3)
    bf16 = losses.token_cross_entropy(logits.astype(jnp.bfloat16), targets)
    assert bf16.dtype == jnp.float32


def test_token_cross_entropy_rejects_mismatched_shapes():
    logits, targets = _logits_and_targets()
    with pytest.raises(ValueError, match="targets"):
        losses.token_cross_entropy(logits, targets[:, :-1])


def test_mean_cross_entropy_with_mask():
    logits, targets = _logits_and_targets()
    per_token = np.asarray(losses.token_cross_entropy(logits, targets))
    mask = np.zeros((B, T), bool)
    mask[0, 1:4] = True
    mask[1, 0] = True
    got = losses.mean_cross_entropy(logits, targets, jnp.asarray(mask))
    np.testing.assert_allclose(got, per_token[mask].mean(), rtol=1e-6)
    np.testing.assert_allclose(losses.mean_cross_entropy(logits, targets), per_token.mean(), 1e-6)
    assert losses.mean_cross_entropy(logits, targets, jnp.zeros((B, T))) == 0.0


def _l2wrap_term(logits):
    """The added logits gradient, written out: 1e-4 / (B*T) * max at the first arg-max."""
    logits = np.asarray(logits, np.float64)
    term = np.zeros_like(logits)
    factor = 1e-4 / (logits.shape[0] * logits.shape[1])
    for b in range(logits.shape[0]):
        for t in range(logits.shape[1]):
            i = int(np.argmax(logits[b, t]))
            term[b, t, i] = factor * logits[b, t, i]
    return term


def test_l2wrap_keeps_the_value_and_adds_the_direct_formula_to_the_gradient():
    logits, targets = _logits_and_targets(seed=1, scale=50.0)

    def wrapped(x):
        return losses.l2wrap(losses.mean_cross_entropy(x, targets), x)

    def plain(x):
        return losses.mean_cross_entropy(x, targets)

    assert wrapped(logits) == plain(logits)
    added = jax.grad(wrapped)(logits) - jax.grad(plain)(logits)
    # atol: fp32 rounding of the ~0.1-sized CE gradient in the subtraction; the term is ~1e-4.
    np.testing.assert_allclose(added, _l2wrap_term(logits), rtol=1e-5, atol=1e-7)
    assert np.count_nonzero(np.asarray(added)) == B * T


def test_l2wrap_term_ignores_the_loss_cotangent_like_the_official_code():
    logits, targets = _logits_and_targets(seed=2, scale=50.0)
    grad = jax.grad(lambda x: 3.0 * losses.l2wrap(losses.mean_cross_entropy(x, targets), x))
    plain = jax.grad(lambda x: 3.0 * losses.mean_cross_entropy(x, targets))
    np.testing.assert_allclose(
        grad(logits) - plain(logits), _l2wrap_term(logits), rtol=1e-5, atol=1e-7
    )
    # The loss's own cotangent passes through: d l2wrap(loss, x) / d loss = 1.
    assert jax.grad(losses.l2wrap)(jnp.float32(2.0), logits) == 1.0


def test_l2wrap_puts_ties_on_the_first_maximum_and_keeps_the_logits_dtype():
    logits = jnp.zeros((1, 2, 4), jnp.bfloat16).at[:, :, 1].set(8.0).at[:, :, 3].set(8.0)
    grad = jax.grad(lambda x: losses.l2wrap(jnp.float32(0.0), x))(logits)
    assert grad.dtype == jnp.bfloat16
    expected = np.zeros((1, 2, 4), np.float32)
    expected[:, :, 1] = jnp.asarray(8.0 * 1e-4 / 2, jnp.bfloat16)
    np.testing.assert_array_equal(np.asarray(grad, np.float32), expected)


def test_longce_weights_cap_start_and_formula():
    loss_full = jnp.asarray([[1.0, 1.0, 1.0, 2.0, 0.5, 0.1]])
    loss_short = jnp.asarray([[9.0, 9.0, 9.0, 2.5, 9.0, 0.1]])
    weights = losses.longce_weights(loss_full, loss_short, start=3, cap=10.0)
    np.testing.assert_allclose(weights, [[1.0, 1.0, 1.0, np.exp(0.5), 10.0, 1.0]], rtol=1e-6)


def test_longce_weights_carry_no_gradient():
    loss_full = jnp.asarray([[1.0, 2.0, 3.0]])
    loss_short = jnp.asarray([[1.5, 2.5, 3.1]])

    def total(full, short):
        return jnp.sum(losses.longce_weights(full, short, start=0))

    grads = jax.grad(total, argnums=(0, 1))(loss_full, loss_short)
    for grad in grads:
        np.testing.assert_array_equal(grad, 0.0)


def _context_length_fn(tokens, targets):
    """Toy per-token loss: how many earlier tokens this call let each position read.

    With tokens = positions, tokens - tokens[:, :1] is that count. The targets term is zero only
    if targets arrive sliced exactly like tokens (targets = tokens + 1 in the tests).
    """
    context = (tokens - tokens[:, :1]).astype(jnp.float32)
    return context + 1000.0 * (targets - tokens - 1).astype(jnp.float32)


@pytest.mark.parametrize(
    "window, stride, start, length",
    [(4, 4, 8, 23), (4, 4, 8, 24), (3, 5, 6, 20), (4, 4, 8, 8), (4, 4, 8, 5)],
)
def test_short_context_loss_scores_each_position_with_the_documented_context(
    window, stride, start, length
):
    positions = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (2, length))
    got = losses.short_context_loss(
        _context_length_fn, positions, positions + 1, window=window, stride=stride, start=start
    )
    expected = np.zeros(length)
    for t in range(start, length):
        expected[t] = window + (t - start) % stride
    np.testing.assert_array_equal(got, np.broadcast_to(expected, (2, length)))
    assert got.shape == (2, length) and got.dtype == jnp.float32


def test_short_context_loss_with_paper_defaults_sees_4000_to_7999_tokens():
    length = 16001
    positions = jnp.arange(length, dtype=jnp.int32)[None]
    got = np.asarray(losses.short_context_loss(_context_length_fn, positions, positions + 1))[0]
    assert np.all(got[:8000] == 0)
    assert got[8000] == 4000 and got[11999] == 7999 and got[12000] == 4000
    assert got[15999] == 7999 and got[16000] == 4000
    assert got[8000:].min() == 4000 and got[8000:].max() == 7999


def test_short_context_loss_rejects_a_start_before_the_window():
    positions = jnp.arange(10)[None]
    with pytest.raises(ValueError, match="start >= window"):
        losses.short_context_loss(_context_length_fn, positions, positions, window=4, start=3)


def _toy_model_loss(theta):
    """A causal toy 'model': the running mean of the context predicts the target."""

    def per_token_loss(tokens, targets):
        x = tokens.astype(jnp.float32)
        running_mean = jnp.cumsum(x, axis=1) / jnp.arange(1, x.shape[1] + 1)
        return (theta * running_mean - targets.astype(jnp.float32)) ** 2 / 100.0

    return per_token_loss


def test_longce_loss_is_weighted_mean_with_gradient_only_through_the_full_loss():
    rng = np.random.default_rng(0)
    tokens = jnp.asarray(rng.integers(0, 20, (2, 19)), jnp.int32)
    targets = jnp.asarray(rng.integers(0, 20, (2, 19)), jnp.int32)
    geometry = dict(window=3, stride=3, start=6)
    theta = jnp.float32(0.7)

    def loss(theta):
        return losses.longce_loss(_toy_model_loss(theta), tokens, targets, cap=2.0, **geometry)

    full = _toy_model_loss(theta)(tokens, targets)
    short = losses.short_context_loss(_toy_model_loss(theta), tokens, targets, **geometry)
    weights = losses.longce_weights(full, short, start=6, cap=2.0)
    assert np.any(np.asarray(weights) != 1.0)
    np.testing.assert_allclose(loss(theta), jnp.mean(weights * full), rtol=1e-6)

    def weighted_with_constant_weights(theta):
        return jnp.mean(weights * _toy_model_loss(theta)(tokens, targets))

    np.testing.assert_allclose(
        jax.grad(loss)(theta), jax.grad(weighted_with_constant_weights)(theta), rtol=1e-5
    )
    np.testing.assert_allclose(jax.jit(loss)(theta), loss(theta), rtol=1e-6)


# ----------------------------------------------------------------------------- chunked loss


def _hidden_head_problem(batch=2, length=13, channels=6, vocab=17, seed=3):
    rng = np.random.default_rng(seed)
    hidden = jnp.asarray(rng.standard_normal((batch, length, channels)), jnp.float32)
    weight = jnp.asarray(4.0 * rng.standard_normal((channels, vocab)), jnp.float32)
    targets = jnp.asarray(rng.integers(0, vocab, (batch, length)), jnp.int32)
    return hidden, weight, targets


@pytest.mark.parametrize("l2wrap", [False, True])
@pytest.mark.parametrize("chunk_tokens", [1, 4, 13, 64, 0])  # a tail of 1, none, one, whole
def test_chunked_cross_entropy_matches_whole_logits_in_value_and_gradients(l2wrap, chunk_tokens):
    hidden, weight, targets = _hidden_head_problem()

    def whole(hidden, weight):
        logits = jnp.tanh(hidden) @ weight
        loss = losses.mean_cross_entropy(logits, targets)
        return losses.l2wrap(loss, logits) if l2wrap else loss

    def chunked(hidden, weight):
        per_token = losses.chunked_token_cross_entropy(
            hidden, targets, lambda h: jnp.tanh(h) @ weight,
            chunk_tokens=chunk_tokens, l2wrap_logits=l2wrap,
        )  # fmt: skip
        assert per_token.shape == targets.shape and per_token.dtype == jnp.float32
        return jnp.mean(per_token)

    value, grads = jax.jit(jax.value_and_grad(chunked, argnums=(0, 1)))(hidden, weight)
    expected_value, expected_grads = jax.value_and_grad(whole, argnums=(0, 1))(hidden, weight)
    np.testing.assert_allclose(value, expected_value, rtol=1e-5)
    for got, want in zip(grads, expected_grads, strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)
    if l2wrap:  # the term is there: without it the gradients differ
        plain = jax.grad(lambda w: losses.mean_cross_entropy(jnp.tanh(hidden) @ w, targets))
        assert np.abs(np.asarray(plain(weight) - grads[1])).max() > 1e-4


def test_chunked_cross_entropy_never_holds_the_whole_logits():
    """Compiled on CPU, the chunked loss's gradient needs a fraction of one [B, T, V] fp32 array
    of temporaries (a piece's logits are 1/16 of it; ~2.3 pieces are live); the whole-logits
    loss needs more than the array."""
    batch, length, channels, vocab = 1, 4096, 32, 4096
    hidden = jax.ShapeDtypeStruct((batch, length, channels), jnp.float32)
    weight = jax.ShapeDtypeStruct((channels, vocab), jnp.float32)
    targets = jnp.zeros((batch, length), jnp.int32)
    logits_bytes = batch * length * vocab * 4  # 64 MiB

    def whole(hidden, weight):
        logits = hidden @ weight
        return losses.l2wrap(losses.mean_cross_entropy(logits, targets), logits)

    def chunked(hidden, weight):
        return jnp.mean(
            losses.chunked_token_cross_entropy(
                hidden, targets, lambda h: h @ weight, chunk_tokens=256, l2wrap_logits=True
            )
        )

    def temporaries(loss):
        compiled = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(hidden, weight).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    assert temporaries(whole) > logits_bytes
    assert temporaries(chunked) < logits_bytes / 4


def test_chunked_cross_entropy_rejects_bad_shapes_and_chunks():
    hidden, weight, targets = _hidden_head_problem()
    logits_fn = lambda h: h @ weight
    with pytest.raises(ValueError, match=r"hidden \(2, 13, 6\) must be targets \(2, 12\)"):
        losses.chunked_token_cross_entropy(hidden, targets[:, 1:], logits_fn)
    with pytest.raises(ValueError, match=r"chunk_tokens must be >= 0 \(0: whole logits\), got -1"):
        losses.chunked_token_cross_entropy(hidden, targets, logits_fn, chunk_tokens=-1)


# ----------------------------------------------------------------------------- LongCE in training


@pytest.fixture
def quick_compiles():
    """XLA's optimisation passes are most of a CPU compile, and no result here depends on them."""
    before = jax.config.read("jax_disable_most_optimizations")
    jax.config.update("jax_disable_most_optimizations", True)
    yield
    jax.config.update("jax_disable_most_optimizations", before)


def test_train_program_longce_loss_and_gradient_match_a_direct_computation(quick_compiles):
    """`TrainProgram.loss_fn` with loss.longce=true (a model, not a toy): its value and its
    gradient equal mean(weight * CE) written out directly, where a position t >= start weighs
    min(exp(CE read from s(t) - CE read from 0), cap), s(t) = the start of t's stride-long
    segment minus the window, earlier positions weigh 1, and the weights carry no gradient.
    ctx 36, window 8, stride 6, start 16: three whole segments and a tail of two."""
    from rwkvx_jax import sharding
    from rwkvx_jax.checkpoints.official_layout import params_from_state_dict
    from rwkvx_jax.checkpoints.random_weights import random_state_dict
    from rwkvx_jax.model import RWKVX
    from rwkvx_jax.training.config import TrainConfig, apply_overrides
    from rwkvx_jax.training.program import TrainProgram

    ctx, window, stride, start, cap = 36, 8, 6, 16, 1.5
    config = apply_overrides(
        TrainConfig(),
        [
            "model.n_rwkv_layer=1", "model.n_attn_layer=1", "model.wkv_backend=reference",
            "model.attention_backend=reference", f"data.ctx={ctx}", "data.batch_size=2",
            "loss.longce=true", f"loss.longce_window={window}", f"loss.longce_stride={stride}",
            f"loss.longce_start={start}", f"loss.longce_cap={cap}", "loss.l2wrap=false",
            "loss.chunk_tokens=16",
        ],
    )  # fmt: skip
    mesh = sharding.make_mesh((1, 1, 1), devices=jax.devices()[:1])
    program = TrainProgram.create(config, config.model, mesh)
    # Official-layout random weights: predictions that depend on the context.
    params = params_from_state_dict(random_state_dict(config.model, seed=5), config.model)
    tokens = np.random.default_rng(0).integers(0, config.model.vocab_size, (2, ctx + 1))
    value, grads = jax.jit(jax.value_and_grad(program.loss_fn))(params, jnp.asarray(tokens))

    model = RWKVX(config.model)
    inputs, targets = tokens[:, :-1], tokens[:, 1:]

    @jax.jit
    def token_ce(params, x, y):  # [B, L] -> [B, L], log-softmax written out
        log_probs = jax.nn.log_softmax(model.apply({"params": params}, x), axis=-1)
        return -jnp.take_along_axis(log_probs, y[..., None], axis=-1)[..., 0]

    # The short-context loss of t: the model run from s(t). One row per distinct s(t), all in
    # one batch, right-padded to window + stride tokens (causal: padding is never read).
    first = {t: start + (t - start) // stride * stride - window for t in range(start, ctx)}
    assert {t - s for t, s in first.items()} == set(range(window, window + stride))
    segments, width = sorted(set(first.values())), window + stride
    seg_x, seg_y = (np.zeros((len(segments), 2, width), int) for _ in range(2))
    for i, s in enumerate(segments):
        n = min(width, ctx - s)
        seg_x[i, :, :n], seg_y[i, :, :n] = inputs[:, s : s + n], targets[:, s : s + n]
    rows = token_ce(params, seg_x.reshape(-1, width), seg_y.reshape(-1, width))
    rows = np.asarray(rows).reshape(len(segments), 2, width)
    short = np.zeros((2, ctx), np.float32)
    for t, s in first.items():
        short[:, t] = rows[segments.index(s), :, t - s]

    def direct(params):
        full = token_ce(params, inputs, targets)
        weight = jnp.minimum(jnp.exp(short - jax.lax.stop_gradient(full)), cap)
        weight = jnp.where(jnp.arange(ctx) >= start, weight, 1.0)
        return jnp.mean(weight * full), (full, weight)

    (expected, (full, weight)), expected_grads = jax.jit(jax.value_and_grad(direct, has_aux=True))(
        params
    )
    # The weights matter here: some are capped, and the plain mean differs 100x the tolerance.
    assert np.any(np.asarray(weight) == cap) and np.any(np.asarray(weight) < 0.9)
    assert abs(float(jnp.mean(full)) - float(expected)) > 1e-3 * float(expected)
    np.testing.assert_allclose(value, expected, rtol=1e-5)

    def close(path, got, want):
        scale = float(np.abs(np.asarray(want)).max())
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * scale, err_msg=str(path))

    jax.tree_util.tree_map_with_path(close, grads, expected_grads)
