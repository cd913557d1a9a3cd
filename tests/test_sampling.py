"""Sampler tests: greedy, bans, stops, penalties and cuts against the official `rwkv.utils`."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from rwkvx_jax.config import ConfigError
from rwkvx_jax.decoding.sampling import (
    SamplingConfig,
    filtered_probs,
    init_sampler_state,
    is_stop,
    penalized_logits,
    sample,
    token_penalty_weights,
)

WORLD_VOCAB = 65536  # the World models' head width; the tokenizer stops at id 65529

sample_jit = jax.jit(sample, static_argnames="config", donate_argnames="state")


class _ScriptedModel:
    """Stands in for an official RWKV model: `forward` returns the next scripted logits row."""

    def __init__(self, logits_rows):
        self.logits_rows = logits_rows
        self.calls = 0

    def forward(self, tokens, state):
        out = torch.tensor(self.logits_rows[self.calls])
        self.calls += 1
        return out, state


@pytest.fixture(scope="module")
def world_pipeline():
    """The official PIPELINE with the World tokenizer, its sampler instrumented to record."""
    from rwkv.utils import PIPELINE

    class RecordingPipeline(PIPELINE):
        def sample_logits(self, logits, **kwargs):
            self.seen_logits.append(logits.numpy().copy())
            token = super().sample_logits(logits, **kwargs)
            self.picked.append(token)
            return token

    return RecordingPipeline(None, "rwkv_vocab_v20230424")


@pytest.fixture(scope="module")
def world_weights(world_pipeline):
    return token_penalty_weights(world_pipeline.decode, WORLD_VOCAB)


def test_config_validation_and_hashing():
    config = SamplingConfig(banned_tokens=[3, 1], stop_tokens=np.array([0]))
    assert config.banned_tokens == (3, 1) and config.stop_tokens == (0,)
    assert hash(config) == hash(SamplingConfig(banned_tokens=(3, 1), stop_tokens=(0,)))
    bad = [
        ({"temperature": -0.1}, "temperature"),
        ({"temperature": float("nan")}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_k": -1}, "top_k"),
        ({"top_k": 2.5}, "top_k"),
        ({"penalty_decay": 1.2}, "penalty_decay"),
        ({"presence_penalty": float("inf")}, "presence_penalty"),
        ({"banned_tokens": (1, -2)}, "banned_tokens"),
        ({"stop_tokens": 5}, "stop_tokens"),
    ]
    for kwargs, field in bad:
        with pytest.raises(ConfigError, match=field):
            SamplingConfig(**kwargs)


def test_greedy_is_argmax_after_bans_with_lower_id_ties():
    logits = np.random.default_rng(0).normal(size=(4, 50)).astype(np.float32)
    logits[:, 2] = 20.0  # banned, so never the pick
    logits[1, [7, 30]] = 9.0  # a tie: the lower id wins
    config = SamplingConfig(temperature=0.0, banned_tokens=(2,))
    tokens, _ = sample_jit(jnp.asarray(logits), init_sampler_state(4, 50, 0), config)
    masked = logits.copy()
    masked[:, 2] = -np.inf
    np.testing.assert_array_equal(tokens, np.argmax(masked, axis=-1))
    assert tokens[1] == 7


def test_stop_detection_leaves_counts_unchanged():
    config = SamplingConfig(temperature=0.0, stop_tokens=(4, 9))
    np.testing.assert_array_equal(
        is_stop(jnp.array([4, 5, 9, 0], jnp.int32), config), [True, False, True, False]
    )
    assert not is_stop(jnp.array([4], jnp.int32), SamplingConfig()).any()

    logits = jnp.zeros((2, 12), jnp.float32).at[0, 4].set(5.0).at[1, 6].set(5.0)
    state = init_sampler_state(2, 12, 0)
    state = state._replace(occurrence=state.occurrence.at[:, 3].set(2.0))
    before = np.asarray(state.occurrence)
    tokens, new_state = sample_jit(logits, state, config)
    np.testing.assert_array_equal(tokens, [4, 6])
    np.testing.assert_array_equal(new_state.occurrence[0], before[0])  # stopped: untouched
    np.testing.assert_allclose(new_state.occurrence[1, 3], 2.0 * config.penalty_decay)
    assert new_state.occurrence[1, 6] == 1.0 and bool(new_state.seen[1, 6])


def test_token_penalty_weights_follow_the_official_rule(world_pipeline, world_weights):
    decode = world_pipeline.decode
    zero_ids = np.flatnonzero(world_weights == 0)
    # The official test is a substring test against " \t0123456789".
    assert {decode([int(i)]) for i in zero_ids} == (
        {" ", "\t", " \t"}
        | set("0123456789")
        | {"01", "12", "23", "34", "45", "56", "67"}
        | {"78", "89"}
    )
    for text in ("00", "10", "  ", "\n", "a"):
        (token,) = world_pipeline.encode(text)
        assert world_weights[token] == 1.0, text
    assert world_weights.shape == (WORLD_VOCAB,) and world_weights.dtype == np.float32
    assert world_weights[WORLD_VOCAB - 1] == 1.0  # past the tokenizer's vocabulary
    assert token_penalty_weights(decode, WORLD_VOCAB) is world_weights  # cached
    assert not world_weights.flags.writeable


def test_penalties_and_picks_match_official_generate(world_pipeline, world_weights):
    """Drive the official `PIPELINE.generate` with scripted logits; compare every step."""
    from rwkv.utils import PIPELINE_ARGS

    rng = np.random.default_rng(3)
    steps, stop_step = 40, 32
    candidates = [33, 49, 621, 264, 100, 200, 300, 400]  # ' ', '0', '01', ' \t', then words
    rows = rng.normal(scale=0.05, size=(steps, WORLD_VOCAB)).astype(np.float32)
    rows[:, candidates] += 5.0 + rng.normal(scale=0.2, size=(steps, len(candidates)))
    rows[:, 7] = 50.0  # banned, would otherwise win every step
    rows[stop_step, 0] = 60.0  # the stop token wins here
    args = PIPELINE_ARGS(
        temperature=0.0,
        top_p=0.85,
        alpha_presence=0.4,
        alpha_frequency=0.3,
        alpha_decay=0.9,
        token_ban=[7],
        token_stop=[0],
    )
    world_pipeline.model = _ScriptedModel(rows)
    world_pipeline.seen_logits, world_pipeline.picked = [], []
    world_pipeline.generate("\n", token_count=steps, args=args)
    official_picks = world_pipeline.picked
    assert len(official_picks) == stop_step + 1 and official_picks[-1] == 0
    # The script must exercise zero-weight repeats and frequency counts.
    assert official_picks.count(33) > 1 and official_picks.count(100) > 1

    config = SamplingConfig(
        temperature=0.0,
        presence_penalty=0.4,
        frequency_penalty=0.3,
        penalty_decay=0.9,
        banned_tokens=(7,),
        stop_tokens=(0,),
    )
    state = init_sampler_state(1, WORLD_VOCAB, 0)
    weights = jnp.asarray(world_weights)
    penalize = jax.jit(penalized_logits, static_argnames="config")
    for step, official_logits in enumerate(world_pipeline.seen_logits):
        ours = penalize(jnp.asarray(rows[step : step + 1]), state, config)
        np.testing.assert_allclose(ours[0], official_logits, rtol=0, atol=1e-5)
        tokens, state = sample_jit(jnp.asarray(rows[step : step + 1]), state, config, weights)
        assert int(tokens[0]) == official_picks[step], step
    assert bool(is_stop(tokens, config)[0])


CUT_CONFIGS = [
    dict(temperature=1.0, top_p=0.85, top_k=0),
    dict(temperature=0.6, top_p=0.5, top_k=0),
    dict(temperature=1.5, top_p=0.95, top_k=10),
    dict(temperature=1.0, top_p=0.3, top_k=50),
    dict(temperature=0.8, top_p=0.999, top_k=7),
    dict(temperature=2.0, top_p=0.05, top_k=0),
]


@pytest.mark.parametrize("cut", CUT_CONFIGS, ids=lambda c: "-".join(map(str, c.values())))
def test_filtered_probs_match_official_sample_logits(cut, monkeypatch):
    """The official CPU path ends in np.random.choice(p=...); capture p and compare."""
    from rwkv.utils import PIPELINE

    captured = []

    def capture_choice(a, p):
        captured.append(np.asarray(p, np.float64))
        return 0

    monkeypatch.setattr(np.random, "choice", capture_choice)
    official = PIPELINE.__new__(PIPELINE)  # sample_logits needs no model or tokenizer
    rng = np.random.default_rng(11)
    vectors = [rng.normal(scale=s, size=1000).astype(np.float32) for s in (0.5, 2.0, 4.0)]
    # Ties at the nucleus cutoff all survive; none sits at the k-th place, where the official's
    # pick follows numpy's unstable argsort.
    tied = (-3.0 - 1e-3 * np.arange(1000)).astype(np.float32)
    tied[[5, 9, 400]] = 2.0
    tied[[1, 2]] = 1.0
    vectors.append(tied)
    config = SamplingConfig(**cut)
    ours = np.asarray(filtered_probs(jnp.asarray(np.stack(vectors)), config))
    for row, vector in enumerate(vectors):
        official.sample_logits(torch.tensor(vector), **cut)
        theirs = captured[-1]
        np.testing.assert_array_equal(ours[row] > 0, theirs > 0)
        np.testing.assert_allclose(ours[row], theirs, rtol=1e-4, atol=1e-7)


def test_draw_frequencies_follow_the_filtered_distribution():
    # At temperature 1 the nucleus holds four tokens; temperature applied before the cut would
    # keep three, and no temperature (or one applied twice) would shift the mass.
    # The last id is banned and must never be drawn.
    logits = np.array([2.0, 1.5, 1.0, 0.5, 0.0, -1.0, 9.0], np.float32)
    config = SamplingConfig(temperature=0.5, top_p=0.9, top_k=5, banned_tokens=(6,))
    batch = 20000
    state = init_sampler_state(batch, 7, 5)
    expected = filtered_probs(penalized_logits(jnp.asarray(logits[None]), state, config), config)
    expected = np.asarray(expected)[0]
    assert np.count_nonzero(expected) == 4
    tokens, _ = sample_jit(jnp.tile(jnp.asarray(logits), (batch, 1)), state, config)
    counts = np.bincount(np.asarray(tokens), minlength=7) / batch
    np.testing.assert_allclose(counts, expected, atol=0.015)  # > 4 sigma at this batch


def test_seeded_determinism_under_jit_with_donated_state():
    logits = jnp.asarray(np.random.default_rng(1).normal(size=(8, 1000)), jnp.float32)
    config = SamplingConfig(top_p=1.0)

    def run(seed, steps=4):
        state, picked = init_sampler_state(8, 1000, seed), []
        for _ in range(steps):
            old = state
            tokens, state = sample_jit(logits, state, config)
            assert old.occurrence.is_deleted()  # the state buffers were donated
            picked.append(np.asarray(tokens))
        assert int(state.step) == steps
        return np.stack(picked)

    first, again, other = run(0), run(0), run(1)
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first, other)
    assert len(set(first[:, 0].tolist())) > 1  # a fresh key each step
    same_rows = jnp.tile(logits[:1], (8, 1))
    tokens, _ = sample_jit(same_rows, init_sampler_state(8, 1000, 2), config)
    assert len(set(np.asarray(tokens).tolist())) > 1  # rows draw independently


def _official_probs(vector, monkeypatch, **cut):
    """The distribution the official CPU `sample_logits` draws from (its np.random.choice p)."""
    from rwkv.utils import PIPELINE

    captured = []

    def capture_choice(a, p):
        captured.append(np.asarray(p, np.float64))
        return 0

    monkeypatch.setattr(np.random, "choice", capture_choice)
    PIPELINE.__new__(PIPELINE).sample_logits(torch.tensor(vector), **cut)
    return captured[-1]


def _tied_logits(vocab):
    """Two rows with ties at the k-th place for k = 2, 3, 4 (see TIED_KEEPS)."""
    logits = np.full((2, vocab), -8.0, np.float32)
    logits[0, 7] = 4.0
    logits[0, [2, 5, 9, vocab - 1]] = 2.0  # a four-way tie for places 2-5
    logits[1, [1, 3]] = 3.0  # a tie at the top ...
    logits[1, [0, 4, 8]] = 1.0  # ... and a three-way tie for places 3-5
    return logits


# top_k -> the ids kept in row 0 and row 1 of _tied_logits: ties go to the lower ids.
TIED_KEEPS = {2: ([7, 2], [1, 3]), 3: ([7, 2, 5], [0, 1, 3]), 4: ([7, 2, 5, 9], [0, 1, 3, 4])}


@pytest.mark.parametrize("vocab", [12, 65536])
def test_top_k_ties_at_the_kth_place_go_to_the_lower_id(vocab, monkeypatch):
    """The docstring's rule: top-k keeps exactly k tokens, ties at the k-th place going to the
    lower id, with top-p off and with a top-p cut that leaves all k."""
    logits = _tied_logits(vocab)
    for k, rows in TIED_KEEPS.items():
        for top_p in (1.0, 0.999):  # 0.999 is reached past the k-th token: it cuts nothing
            config = SamplingConfig(temperature=0.7, top_k=k, top_p=top_p)
            probs = np.asarray(filtered_probs(jnp.asarray(logits), config))
            for row, ids in enumerate(rows):
                assert np.flatnonzero(probs[row]).tolist() == sorted(ids), (k, top_p, row)
                if top_p == 1.0:  # the official has no "off" (its float32 sum never reaches 1)
                    continue
                # The official keeps as many tokens, of the same probabilities; only which of
                # the tied ids it keeps differs (numpy's argsort order).
                theirs = _official_probs(
                    logits[row], monkeypatch, temperature=0.7, top_p=top_p, top_k=k
                )
                np.testing.assert_allclose(
                    np.sort(probs[row][probs[row] > 0]), np.sort(theirs[theirs > 0]), rtol=1e-5
                )


def test_sampling_never_draws_a_tied_id_top_k_left_out():
    """`sample` draws from exactly the top-k set: the higher tied ids never come up."""
    logits = _tied_logits(12)
    config = SamplingConfig(temperature=2.0, top_k=3, top_p=1.0)
    batch = 2000
    tokens, _ = sample_jit(
        jnp.asarray(np.repeat(logits, batch, axis=0)), init_sampler_state(2 * batch, 12, 4),
        config,
    )  # fmt: skip
    drawn = np.asarray(tokens).reshape(2, batch)
    assert [set(d.tolist()) for d in drawn] == [set(ids) for ids in TIED_KEEPS[3]]


def test_top_p_ties_at_the_cutoff_all_survive(monkeypatch):
    """The docstring's rule: top-p keeps every token whose probability is >= the one at the
    first sorted place where the cumulative sum reaches top_p, so ties with it survive; the
    official does the same. With top-k on as well, top-k then keeps exactly k."""
    vocab = 40
    probs = np.full(vocab, 1e-9)
    probs[[11, 3, 30, 6, 25]] = [0.4, 0.2, 0.2, 0.1, 0.1]  # sorted sums 0.4 0.6 0.8 0.9 1.0
    vector = np.log(probs / probs.sum()).astype(np.float32)
    cases = [
        # (top_p, top_k, kept ids)
        (0.5, 0, [11, 3, 30]),  # reached at the first 0.2: both 0.2s stay
        (0.7, 0, [11, 3, 30]),  # reached at the second 0.2
        (0.85, 0, [11, 3, 30, 6, 25]),  # reached at the first 0.1: both 0.1s stay
        (0.5, 5, [11, 3, 30]),
        (0.85, 4, [11, 3, 30, 6]),  # both 0.1s pass top-p; top-k keeps the lower id
        (0.5, 2, [11, 3]),  # both 0.2s pass top-p; top-k keeps the lower id
    ]
    for top_p, top_k, kept in cases:
        config = SamplingConfig(temperature=1.3, top_p=top_p, top_k=top_k)
        ours = np.asarray(filtered_probs(jnp.asarray(vector[None]), config))[0]
        assert np.flatnonzero(ours).tolist() == sorted(kept), (top_p, top_k)
        if top_k == 0 or top_k > len(kept):  # no tie across the k-th place: the same ids
            cut = dict(temperature=1.3, top_p=top_p, top_k=top_k)
            theirs = _official_probs(vector, monkeypatch, **cut)
            np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-9)
