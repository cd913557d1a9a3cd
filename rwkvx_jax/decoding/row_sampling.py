"""Sampling with settings per row: one compiled sampler for a batch of unrelated requests.

`sampling.sample` takes one static `SamplingConfig` for the whole batch, so a batch whose rows
want different temperatures would need one compiled function per mix. Here every setting is an
array with one entry per row (`RowSettings`) and every row carries its own PRNG key, so a
serving engine compiles its step once and each row's draws depend on its own seed and logits
only, never on its neighbours (a seeded request samples the same text alone and in a batch).

The maths is `sampling.sample`'s, per row: presence/frequency penalties on the logits, softmax,
top-p cut, top-k cut (ties to the lower id), temperature on the survivors, one categorical draw;
temperature 0 takes the argmax of the penalised logits. Stop tokens are the caller's business
(a serving engine checks them on the host, where each request's own list lives).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from rwkvx_jax.decoding.sampling import SamplingConfig


class RowSettings(NamedTuple):
    """Sampling settings of B rows, one entry per row (host or device arrays).

    Attributes:
      temperature: float32 [B], 0 = greedy.
      top_k: int32 [B], 0 = off.
      top_p: float32 [B] in (0, 1], 1 = off.
      presence_penalty: float32 [B].
      frequency_penalty: float32 [B].
      penalty_decay: float32 [B] in [0, 1].
    """

    temperature: jax.Array | np.ndarray
    top_k: jax.Array | np.ndarray
    top_p: jax.Array | np.ndarray
    presence_penalty: jax.Array | np.ndarray
    frequency_penalty: jax.Array | np.ndarray
    penalty_decay: jax.Array | np.ndarray


def row_settings(configs: Sequence[SamplingConfig]) -> RowSettings:
    """The `RowSettings` of one `SamplingConfig` per row (their bans, stops and seeds aside)."""

    def column(name, dtype):
        return np.array([getattr(c, name) for c in configs], dtype)

    return RowSettings(
        temperature=column("temperature", np.float32),
        top_k=column("top_k", np.int32),
        top_p=column("top_p", np.float32),
        presence_penalty=column("presence_penalty", np.float32),
        frequency_penalty=column("frequency_penalty", np.float32),
        penalty_decay=column("penalty_decay", np.float32),
    )


class RowSamplerState(NamedTuple):
    """What each row's sampler carries between steps (fixed shapes, donatable).

    Attributes:
      occurrence: float32 [B, V], decayed count of each token the row generated.
      seen: bool [B, V], whether the row ever generated the token (the presence penalty).
      rng: uint32 [B, 2], each row's raw PRNG key data, split once per draw of that row.
    """

    occurrence: jax.Array
    seen: jax.Array
    rng: jax.Array


def row_key(seed: int) -> np.ndarray:
    """uint32 [2]: the key data a row with this seed starts from."""
    return np.asarray(jax.random.key_data(jax.random.key(seed)))


def init_row_sampler(batch: int, vocab_size: int) -> RowSamplerState:
    """B rows that generated nothing yet, every key from seed 0 (set a row's with `row_key`)."""
    return RowSamplerState(
        occurrence=jnp.zeros((batch, vocab_size), jnp.float32),
        seen=jnp.zeros((batch, vocab_size), jnp.bool_),
        rng=jnp.tile(jnp.asarray(row_key(0))[None], (batch, 1)),
    )


def _cut_logits(logits: jax.Array, top_k: jax.Array, top_p: jax.Array) -> jax.Array:
    """[B, V] logits with every token outside each row's top-p-then-top-k cut at -inf."""
    vocab_size = logits.shape[-1]
    probs = jax.nn.softmax(logits, axis=-1)
    # Stable descending order: equal probabilities keep the lower id first.
    order = jnp.argsort(-probs, axis=-1, stable=True)
    sorted_probs = jnp.take_along_axis(probs, order, axis=-1)
    reached = jnp.cumsum(sorted_probs, axis=-1) >= top_p[:, None]
    first = jnp.argmax(reached, axis=-1)
    cutoff = jnp.take_along_axis(sorted_probs, first[:, None], axis=-1)
    # Top-p off keeps everything; a sum that never reaches top_p (float32 rounding) keeps the
    # most likely token alone without top-k and all k with it, as `sampling` does.
    use_top_k = (top_k > 0) & (top_k < vocab_size)
    unreached_with_k = ~jnp.any(reached, axis=-1) & use_top_k
    cutoff = jnp.where((top_p[:, None] >= 1.0) | unreached_with_k[:, None], 0.0, cutoff)
    k = jnp.where(use_top_k, top_k, vocab_size)
    keep_sorted = (sorted_probs >= cutoff) & (jnp.arange(vocab_size)[None] < k[:, None])
    rows = jnp.arange(logits.shape[0])[:, None]
    keep = jnp.zeros(logits.shape, jnp.bool_).at[rows, order].set(keep_sorted)
    return jnp.where(keep, logits, -jnp.inf)


def sample_rows(
    logits: jax.Array, state: RowSamplerState, settings: RowSettings, active: jax.Array
) -> tuple[jax.Array, RowSamplerState]:
    """One token per row, each by its own settings and key; pure and jittable.

    Args:
      logits: float32 [B, V], each row's next-token logits.
      state: the rows' `RowSamplerState`.
      settings: the rows' `RowSettings`.
      active: bool [B]; inactive rows draw a token nobody reads and keep their state.

    Returns:
      (int32 [B] tokens, the new state).
    """
    logits = logits.astype(jnp.float32)
    penalty = (
        settings.presence_penalty[:, None]
        + state.occurrence * (settings.frequency_penalty[:, None])
    )
    logits = logits - jnp.where(state.seen, penalty, 0.0)
    keys = jax.vmap(lambda data: jax.random.split(jax.random.wrap_key_data(data)))(state.rng)
    next_keys, draw_keys = keys[:, 0], keys[:, 1]
    temperature = settings.temperature
    sampled = temperature > 0
    needs_cut = sampled & ((settings.top_p < 1.0) | (settings.top_k > 0))
    # The full-vocabulary sort only runs when some sampled row asks for a cut.
    cut = jax.lax.cond(
        jnp.any(needs_cut),
        lambda: _cut_logits(logits, settings.top_k, settings.top_p),
        lambda: logits,
    )
    tempered = cut / jnp.where(sampled, temperature, 1.0)[:, None]
    drawn = jax.vmap(jax.random.categorical)(draw_keys, tempered)
    tokens = jnp.where(sampled, drawn, jnp.argmax(logits, axis=-1)).astype(jnp.int32)
    rows = jnp.arange(tokens.shape[0])
    occurrence = (state.occurrence * settings.penalty_decay[:, None]).at[rows, tokens].add(1.0)
    seen = state.seen.at[rows, tokens].set(True)
    keep = active[:, None]
    new_state = RowSamplerState(
        occurrence=jnp.where(keep, occurrence, state.occurrence),
        seen=jnp.where(keep, seen, state.seen),
        rng=jnp.where(keep, jax.random.key_data(next_keys), state.rng),
    )
    return tokens, new_state
