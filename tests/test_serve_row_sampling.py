"""Per-row sampling (`decoding/row_sampling.py`) against the batch sampler (`decoding/sampling.py`)
it generalises: the same cuts, the same greedy choices with penalties, rows independent."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rwkvx_jax.decoding.row_sampling import (
    init_row_sampler,
    row_key,
    row_settings,
    sample_rows,
)
from rwkvx_jax.decoding.sampling import (
    SamplingConfig,
    filtered_probs,
    init_sampler_state,
    sample,
)

V = 64
# Compiled once each: eager calls would compile every small op on its own.
SAMPLE = jax.jit(sample, static_argnames="config")
SAMPLE_ROWS = jax.jit(sample_rows)


def _logits(seed, batch=1):
    return jnp.asarray(np.random.default_rng(seed).normal(0, 2, (batch, V)), jnp.float32)


CONFIGS = [
    SamplingConfig(temperature=1.0, top_p=0.5),
    SamplingConfig(temperature=0.7, top_k=5),
    SamplingConfig(temperature=1.0, top_p=0.8, top_k=10),
    SamplingConfig(temperature=1.0, top_p=0.999, top_k=3),
    SamplingConfig(temperature=1.0, top_p=1.0, top_k=0),
]


def test_each_rows_support_is_the_batch_samplers_cut():
    """A batch of rows with different settings: each row can draw exactly the tokens
    `filtered_probs` gives non-zero probability under that row's config alone."""
    logits = _logits(0, len(CONFIGS))
    settings = row_settings(CONFIGS)
    state = init_row_sampler(len(CONFIGS), V)
    draws = jax.jit(jax.vmap(lambda rng: sample_rows(logits, state._replace(rng=rng), settings,
                                                     jnp.ones(len(CONFIGS), bool))[0]))  # fmt: skip
    keys = jnp.stack(
        [jnp.tile(jnp.asarray(row_key(s))[None], (len(CONFIGS), 1)) for s in range(400)]
    )
    seen = np.asarray(draws(keys))  # [400 seeds, rows]
    for row, config in enumerate(CONFIGS):
        probs = jax.jit(filtered_probs, static_argnames="config")(logits[row : row + 1], config)
        allowed = set(np.flatnonzero(np.asarray(probs)[0]))
        drawn = set(seen[:, row].tolist())
        assert drawn <= allowed, (row, drawn - allowed)
        if len(allowed) <= 10:
            assert drawn == allowed, (row, allowed - drawn)


@pytest.mark.parametrize("presence, frequency, decay", [(0.0, 0.0, 1.0), (0.7, 0.4, 0.9)])
def test_greedy_rows_follow_the_batch_sampler_with_penalties(presence, frequency, decay):
    config = SamplingConfig(
        temperature=0.0, presence_penalty=presence, frequency_penalty=frequency,
        penalty_decay=decay,
    )  # fmt: skip
    logits = _logits(1)
    want_state = init_sampler_state(1, V, 0)
    state = init_row_sampler(2, V)
    settings = row_settings([config, SamplingConfig(temperature=1.5, seed=3)])
    for _ in range(8):
        want, want_state = SAMPLE(logits, want_state, config)
        got, state = SAMPLE_ROWS(
            jnp.concatenate([logits, _logits(2)]), state, settings, jnp.ones(2, bool)
        )
        assert int(got[0]) == int(want[0])
    np.testing.assert_allclose(state.occurrence[0], want_state.occurrence[0], rtol=1e-6)
    assert np.array_equal(state.seen[0], want_state.seen[0])


def test_inactive_rows_keep_their_sampler_state():
    state = init_row_sampler(2, V)
    settings = row_settings([SamplingConfig(temperature=1.0)] * 2)
    _, after = SAMPLE_ROWS(_logits(3, 2), state, settings, jnp.array([True, False]))
    assert not np.array_equal(after.rng[0], state.rng[0])
    assert np.array_equal(after.rng[1], state.rng[1])
    assert float(after.occurrence[1].sum()) == 0.0 and float(after.occurrence[0].sum()) == 1.0
