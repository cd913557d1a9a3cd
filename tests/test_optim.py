"""Tests for rwkvx_jax.training.optimizer: schedule, decay mask, AdamW, freezing, accumulation."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from rwkvx_jax.training import optimizer as optim

LR = 1e-2


def _params():
    rng = np.random.default_rng(0)

    def array(*shape):
        return jnp.asarray(rng.standard_normal(shape), jnp.float32)

    return {
        "emb": {"embedding": array(7, 3)},
        "blocks_0": {"att": {"key": {"kernel": array(3, 4)}, "x_r": array(1, 1, 3)}},
        "moba_0": {
            "att": {"key": {"kernel": array(3, 2)}, "ln": {"scale": array(3)}},
            "ffn": {"x_k": array(1, 1, 3)},
        },
    }


def _grads(seed, scale):
    rng = np.random.default_rng(seed)
    return jax.tree.map(
        lambda p: jnp.asarray(scale * rng.standard_normal(p.shape), jnp.float32), _params()
    )


def _config(**overrides):
    base = dict(lr=LR, warmup_steps=10, weight_decay=0.1, eps=1e-8, grad_clip=1.0)
    return optim.OptimizerConfig(**{**base, **overrides})


def _reference_adamw(cfg, params, grads_per_step):
    """AdamW written out in numpy: clip by global norm, Adam, decoupled masked decay."""
    params = jax.tree.map(lambda p: np.asarray(p, np.float64), params)
    decay = optim.weight_decay_mask(params)
    mu = jax.tree.map(np.zeros_like, params)
    nu = jax.tree.map(np.zeros_like, params)
    schedule = optim.learning_rate_schedule(cfg)
    for step, grads in enumerate(grads_per_step):
        grads = jax.tree.map(lambda g: np.asarray(g, np.float64), grads)
        norm = np.sqrt(sum(np.sum(g**2) for g in jax.tree.leaves(grads)))
        scale = min(1.0, cfg.grad_clip / norm) if cfg.grad_clip is not None else 1.0
        grads = jax.tree.map(lambda g, scale=scale: g * scale, grads)
        mu = jax.tree.map(lambda m, g: cfg.b1 * m + (1 - cfg.b1) * g, mu, grads)
        nu = jax.tree.map(lambda v, g: cfg.b2 * v + (1 - cfg.b2) * g**2, nu, grads)
        lr = float(schedule(step))
        m_scale, v_scale = 1 / (1 - cfg.b1 ** (step + 1)), 1 / (1 - cfg.b2 ** (step + 1))

        def update(p, m, v, d, lr=lr, m_scale=m_scale, v_scale=v_scale):
            adam = m * m_scale / (np.sqrt(v * v_scale) + cfg.eps)
            return p - lr * (adam + (cfg.weight_decay * p if d else 0.0))

        params = jax.tree.map(update, params, mu, nu, decay)
    return params


def _run(optimizer, params, grads_per_step):
    state = optimizer.init(params)
    step = jax.jit(optimizer.update)
    for grads in grads_per_step:
        updates, state = step(grads, state, params)
        params = optax.apply_updates(params, updates)
    return params, state


def _assert_trees_close(actual, expected, **tol):
    jax.tree.map(lambda a, e: np.testing.assert_allclose(a, e, **tol), actual, expected)


def test_learning_rate_schedule_warmup_constant_and_cosine():
    constant = optim.learning_rate_schedule(_config())
    np.testing.assert_allclose(constant(0), LR * 0.01, rtol=1e-6)
    np.testing.assert_allclose(constant(5), LR * (0.01 + 0.99 * 0.5), rtol=1e-6)
    np.testing.assert_allclose(constant(10), LR, rtol=1e-6)
    np.testing.assert_allclose(constant(10_000), LR, rtol=1e-6)

    cosine = optim.learning_rate_schedule(
        _config(schedule="cosine", lr_final=1e-3, total_steps=110)
    )
    np.testing.assert_allclose(cosine(0), LR * 0.01, rtol=1e-6)
    np.testing.assert_allclose(cosine(10), LR, rtol=1e-6)
    np.testing.assert_allclose(cosine(60), (LR + 1e-3) / 2, rtol=1e-6)
    np.testing.assert_allclose(cosine(110), 1e-3, rtol=1e-6)
    np.testing.assert_allclose(cosine(500), 1e-3, rtol=1e-6)

    no_warmup = optim.learning_rate_schedule(_config(warmup_steps=0))
    np.testing.assert_allclose(no_warmup(0), LR, rtol=1e-6)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(schedule="linear"), "schedule must be one of"),
        (dict(schedule="cosine", lr_final=0.0), "total_steps"),
        (dict(schedule="cosine", total_steps=100), "lr_final"),
        (dict(lr_final=1e-3), "use schedule='cosine'"),
        (dict(lr=0.0), "lr must be > 0"),
        (dict(warmup_init_fraction=1.5), "warmup_init_fraction"),
        (dict(grad_accum_steps=0), "grad_accum_steps"),
        (dict(b2=1.0), "b1 and b2"),
        (dict(grad_clip=0.0), "grad_clip"),
    ],
)
def test_config_validation_names_the_bad_field(overrides, message):
    with pytest.raises(ValueError, match=message):
        _config(**overrides)


def test_default_config_is_the_paper_recipe():
    cfg = optim.OptimizerConfig()
    assert (cfg.lr, cfg.warmup_steps, cfg.warmup_init_fraction, cfg.schedule) == (
        1e-5,
        10,
        0.01,
        "constant",
    )
    assert (cfg.weight_decay, cfg.b1, cfg.b2, cfg.eps, cfg.grad_clip) == (
        1e-3,
        0.9,
        0.99,
        1e-18,
        1.0,
    )
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.lr = 1.0


def test_weight_decay_mask_counts_non_unit_dims():
    shapes = {"a": (3, 4), "b": (4,), "c": (1, 4), "d": (1, 3, 4), "e": (), "f": (2, 1, 1, 2)}
    params = {k: jax.ShapeDtypeStruct(s, jnp.float32) for k, s in shapes.items()}
    mask = optim.weight_decay_mask(params)
    assert mask == {"a": True, "b": False, "c": False, "d": True, "e": False, "f": True}


def test_trainable_mask_and_sparse_blocks_only():
    mask = optim.trainable_mask(_params(), optim.sparse_blocks_only)
    assert mask["moba_0"]["att"]["key"]["kernel"] is True
    assert mask["moba_0"]["ffn"]["x_k"] is True
    assert mask["emb"]["embedding"] is False
    assert mask["blocks_0"]["att"]["key"]["kernel"] is False
    seen = []
    optim.trainable_mask(_params(), lambda path: seen.append(path) or True)
    assert "moba_0/att/key/kernel" in seen and "blocks_0/att/x_r" in seen


def test_three_steps_equal_hand_written_adamw_with_masked_decay_and_clipping():
    cfg = _config()
    # Norms ~ 5 (clipped to 1), ~ 0.05 and ~ 2 (clipped): Adam's scale invariance would hide
    # clipping on a single step, not across steps of different norms.
    grads = [_grads(1, 1.0), _grads(2, 0.01), _grads(3, 0.4)]
    params, _ = _run(optim.make_optimizer(cfg, _params()), _params(), grads)
    _assert_trees_close(params, _reference_adamw(cfg, _params(), grads), rtol=2e-5, atol=1e-7)


def test_first_step_moments_hold_the_clipped_gradient_and_lr_is_the_warmup_value():
    cfg = _config()
    grads = _grads(1, 1.0)
    norm = optax.tree.norm(grads)
    assert norm > 1.0
    optimizer = optim.make_optimizer(cfg, _params())
    state = optimizer.init(_params())
    updates, state = jax.jit(optimizer.update)(grads, state, _params())
    adam_state = state[1][0]
    _assert_trees_close(adam_state.mu, jax.tree.map(lambda g: 0.1 * g / norm, grads), rtol=1e-5)
    # Step 0 of Adam is sign(g) (up to eps), plus decay on the masked leaves, times lr * 0.01.
    lr0 = LR * 0.01
    np.testing.assert_allclose(
        updates["moba_0"]["att"]["ln"]["scale"],
        -lr0 * np.sign(grads["moba_0"]["att"]["ln"]["scale"]),
        rtol=1e-5,
    )
    kernel, kernel_grad = _params()["emb"]["embedding"], grads["emb"]["embedding"]
    np.testing.assert_allclose(
        updates["emb"]["embedding"], -lr0 * (np.sign(kernel_grad) + 0.1 * kernel), rtol=1e-5
    )


def _array_leaves(tree):
    return [x for x in jax.tree.leaves(tree) if hasattr(x, "shape") and x.ndim > 0]


@pytest.mark.parametrize("accum", [1, 2])
def test_frozen_leaves_are_unchanged_and_carry_no_state(accum):
    cfg = _config(grad_accum_steps=accum)
    params = _params()
    optimizer = optim.make_optimizer(cfg, params, trainable=optim.sparse_blocks_only)
    grads = [_grads(s, 1.0) for s in range(2 * accum)]
    new_params, state = _run(optimizer, params, grads)

    trainable = optim.trainable_mask(params, optim.sparse_blocks_only)
    for p, q, train in zip(
        jax.tree.leaves(params),
        jax.tree.leaves(new_params),
        jax.tree.leaves(trainable),
        strict=True,
    ):
        assert np.any(np.asarray(p) != np.asarray(q)) == train

    # Adam holds mu and nu per trainable leaf; MultiSteps adds the accumulated gradient.
    per_leaf = 2 if accum == 1 else 3
    trainable_sizes = sorted(
        p.size
        for p, t in zip(jax.tree.leaves(params), jax.tree.leaves(trainable), strict=True)
        if t
    )
    state_sizes = sorted(x.size for x in _array_leaves(state))
    assert state_sizes == sorted(trainable_sizes * per_leaf)

    # The trainable leaves alone follow the reference (clip norm over trainable grads only).
    def sparse(tree):
        return {"moba_0": tree["moba_0"]}

    if accum == 1:
        expected = _reference_adamw(cfg, sparse(params), [sparse(g) for g in grads])
        _assert_trees_close(sparse(new_params), expected, rtol=2e-5, atol=1e-7)


def test_trainable_as_a_tree_of_bools_and_structure_check():
    params = _params()
    tree = optim.trainable_mask(params, optim.sparse_blocks_only)
    optimizer = optim.make_optimizer(_config(), params, trainable=tree)
    new_params, _ = _run(optimizer, params, [_grads(1, 1.0)])
    np.testing.assert_array_equal(new_params["emb"]["embedding"], params["emb"]["embedding"])
    with pytest.raises(ValueError, match="tree of bools"):
        optim.make_optimizer(_config(), params, trainable={"emb": True})
    with pytest.raises(ValueError, match="freezes every parameter"):
        optim.make_optimizer(_config(), {"params": params}, trainable=optim.sparse_blocks_only)


def test_two_accumulated_micro_steps_equal_one_step_on_the_mean_gradient():
    params = _params()
    g1, g2 = _grads(1, 0.3), _grads(2, 0.5)
    mean = jax.tree.map(lambda a, b: (a + b) / 2, g1, g2)

    accumulating = optim.make_optimizer(_config(grad_accum_steps=2), params)
    state = accumulating.init(params)
    accumulate = jax.jit(accumulating.update)
    first, state = accumulate(g1, state, params)
    for leaf in jax.tree.leaves(first):
        np.testing.assert_array_equal(leaf, 0.0)
    second, state = accumulate(g2, state, params)

    single = optim.make_optimizer(_config(), params)
    expected, _ = jax.jit(single.update)(mean, single.init(params), params)
    _assert_trees_close(second, expected, rtol=1e-5, atol=1e-9)
