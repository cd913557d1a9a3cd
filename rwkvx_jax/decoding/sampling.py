"""Token sampling inside jit: penalties, bans, temperature, top-k, top-p and stop tokens."""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from rwkvx_jax.config import ConfigError

# A sampled token whose decoded text is a substring of this string (one space, one tab, the ten
# digits, in this order) adds nothing to its occurrence count: the rule of the official
# `rwkv.utils.PIPELINE.generate`. It is a substring test, so ' \t', '01', '12', ..., '89' and the
# empty string count 0, while '00', '10' or two spaces count 1.
_UNCOUNTED_TEXT = " \t0123456789"


def _check_finite(name: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(f"SamplingConfig.{name} must be a finite number, got {value!r}")
    return float(value)


def _check_token_ids(name: str, values: Sequence[int]) -> tuple[int, ...]:
    try:
        ids = tuple(values)
    except TypeError:
        raise ConfigError(
            f"SamplingConfig.{name} must be a tuple of token ids, got {values!r}"
        ) from None
    for token in ids:
        if isinstance(token, bool) or not isinstance(token, (int, np.integer)) or token < 0:
            raise ConfigError(
                f"SamplingConfig.{name} must hold non-negative int token ids, got {token!r} "
                f"in {values!r}"
            )
    return tuple(int(token) for token in ids)


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """Sampling settings for one batch; hashable, so `sample` can take it as a static argument.

    Defaults are those of the official `PIPELINE_ARGS`, except that `top_p == 1.0` here means "no
    nucleus cut" (the official float32 cumsum often never reaches 1.0 over a 65536 vocab and then
    keeps only the most likely token).

    Attributes:
      temperature: 0 means greedy (argmax after penalties and bans, ties to the lower id); > 0
        sharpens (< 1) or flattens (> 1) the distribution left after the top-k/top-p cut.
      top_k: keep the k most likely tokens; 0 turns it off.
      top_p: nucleus mass in (0, 1]; 1.0 turns it off.
      presence_penalty: subtracted from the logit of every token sampled so far (official
        `alpha_presence`).
      frequency_penalty: times the token's decayed occurrence count, also subtracted (official
        `alpha_frequency`).
      penalty_decay: every occurrence count is multiplied by this after each sampled token
        (official `alpha_decay`), in [0, 1].
      banned_tokens: token ids whose logit is set to -inf (official `token_ban`).
      stop_tokens: token ids that end a row's generation (official `token_stop`).
      seed: default seed for `init_sampler_state`.
    """

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 0.85
    presence_penalty: float = 0.2
    frequency_penalty: float = 0.2
    penalty_decay: float = 0.996
    banned_tokens: tuple[int, ...] = ()
    stop_tokens: tuple[int, ...] = ()
    seed: int = 0

    def __post_init__(self):
        temperature = _check_finite("temperature", self.temperature)
        if temperature < 0:
            raise ConfigError(
                f"SamplingConfig.temperature must be >= 0 (0 = greedy), got {self.temperature}"
            )
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, (int, np.integer)):
            raise ConfigError(f"SamplingConfig.top_k must be an int, got {self.top_k!r}")
        if self.top_k < 0:
            raise ConfigError(f"SamplingConfig.top_k must be >= 0 (0 = off), got {self.top_k}")
        top_p = _check_finite("top_p", self.top_p)
        if not 0.0 < top_p <= 1.0:
            raise ConfigError(
                f"SamplingConfig.top_p must lie in (0, 1] (1.0 = off), got {self.top_p}"
            )
        decay = _check_finite("penalty_decay", self.penalty_decay)
        if not 0.0 <= decay <= 1.0:
            raise ConfigError(
                f"SamplingConfig.penalty_decay must lie in [0, 1], got {self.penalty_decay}"
            )
        if isinstance(self.seed, bool) or not isinstance(self.seed, (int, np.integer)):
            raise ConfigError(f"SamplingConfig.seed must be an int, got {self.seed!r}")
        normalised = {
            "temperature": temperature,
            "top_k": int(self.top_k),
            "top_p": top_p,
            "presence_penalty": _check_finite("presence_penalty", self.presence_penalty),
            "frequency_penalty": _check_finite("frequency_penalty", self.frequency_penalty),
            "penalty_decay": decay,
            "banned_tokens": _check_token_ids("banned_tokens", self.banned_tokens),
            "stop_tokens": _check_token_ids("stop_tokens", self.stop_tokens),
            "seed": int(self.seed),
        }
        for name, value in normalised.items():
            object.__setattr__(self, name, value)


class SamplerState(NamedTuple):
    """Per-batch sampler state carried between decoding steps (fixed shapes, donatable).

    Attributes:
      occurrence: [B, V] float32, decayed occurrence count of each generated token.
      seen: [B, V] bool, whether the token was ever generated in the row. The presence penalty
        follows `seen`, not `occurrence > 0`: a whitespace or digit token counts 0 but, once
        sampled, is still penalised by `presence_penalty`, as in the official sampler.
      rng: [2] uint32, raw PRNG key data (`jax.random.key_data`), split once per step.
      step: [] int32, number of `sample` calls so far.
    """

    occurrence: jax.Array
    seen: jax.Array
    rng: jax.Array
    step: jax.Array


def init_sampler_state(batch: int, vocab_size: int, seed: int) -> SamplerState:
    """Fresh state: nothing generated yet (prompt tokens are not counted, as in the official).

    Args:
      batch: B, rows sampled together.
      vocab_size: V, width of the logits.
      seed: PRNG seed; equal seeds give equal draws for equal logits.

    Returns:
      A `SamplerState` with zero occurrence counts.
    """
    if batch <= 0 or vocab_size <= 0:
        raise ValueError(
            f"init_sampler_state needs batch > 0 and vocab_size > 0, got {batch}, {vocab_size}"
        )
    return SamplerState(
        occurrence=jnp.zeros((batch, vocab_size), jnp.float32),
        seen=jnp.zeros((batch, vocab_size), jnp.bool_),
        rng=jax.random.key_data(jax.random.key(seed)),
        step=jnp.zeros((), jnp.int32),
    )


@functools.lru_cache(maxsize=8)
def _cached_token_penalty_weights(
    decode_fn: Callable[[list[int]], str], vocab_size: int
) -> np.ndarray:
    weights = np.ones((vocab_size,), np.float32)
    for token in range(vocab_size):
        try:
            text = decode_fn([token])
        except (KeyError, IndexError, ValueError):
            # Ids the tokenizer cannot decode alone (padding rows past its vocabulary, partial
            # UTF-8) are not whitespace or digits; the World tokenizer itself returns '\ufffd'.
            continue
        if text in _UNCOUNTED_TEXT:
            weights[token] = 0.0
    weights.flags.writeable = False
    return weights


def token_penalty_weights(decode_fn: Callable[[list[int]], str], vocab_size: int) -> np.ndarray:
    """How much each token adds to its occurrence count when sampled, by the official rule.

    A token whose text `decode_fn([id])` is a substring of " \\t0123456789" (a space, a tab, a
    digit, or a run of those in that order such as "12" or " \\t", or the empty string) counts 0;
    every other token counts 1. Ids that `decode_fn` rejects with KeyError, IndexError or
    ValueError (e.g. padding ids past the tokenizer's vocabulary) count 1. The result is cached
    per (decode_fn, vocab_size), so calling this once per step costs nothing after the first.

    Args:
      decode_fn: the tokenizer's decode, list of ids -> str (e.g. the World tokenizer's
        `decode`).
      vocab_size: V, the model's vocabulary size (may exceed the tokenizer's).

    Returns:
      [V] float32, read-only, values in {0, 1}.
    """
    return _cached_token_penalty_weights(decode_fn, int(vocab_size))


def penalized_logits(logits: jax.Array, state: SamplerState, config: SamplingConfig) -> jax.Array:
    """Logits after bans and presence/frequency penalties, before any temperature or cut.

    Args:
      logits: [B, V] float32 model output for the next token.
      state: the sampler state of these rows.
      config: sampling settings (static).

    Returns:
      [B, V] float32: banned ids at -inf; each seen id lowered by
      `presence_penalty + occurrence * frequency_penalty`.
    """
    logits = logits.astype(jnp.float32)
    vocab_size = logits.shape[-1]
    if config.banned_tokens:
        if max(config.banned_tokens) >= vocab_size:
            raise ValueError(
                f"SamplingConfig.banned_tokens {config.banned_tokens} holds ids >= vocab size "
                f"{vocab_size}"
            )
        logits = logits.at[:, np.asarray(config.banned_tokens)].set(-jnp.inf)
    if config.presence_penalty != 0.0 or config.frequency_penalty != 0.0:
        penalty = config.presence_penalty + state.occurrence * config.frequency_penalty
        logits = logits - jnp.where(state.seen, penalty, 0.0)
    return logits


def _nucleus_keep_mask(logits: jax.Array, config: SamplingConfig) -> jax.Array | None:
    """[B, V] bool of the tokens that survive top-p then top-k, or None when both are off.

    Both cuts look at softmax(logits) at temperature 1, as the official does. Top-p keeps every
    token whose probability is >= the probability at the first sorted position where the
    descending cumulative sum reaches top_p (so ties with that token survive too). Top-k then
    keeps exactly k tokens, ties at the k-th place going to the lower id (the official's choice
    there follows numpy's unstable argsort).
    """
    vocab_size = logits.shape[-1]
    use_top_k = 0 < config.top_k < vocab_size
    use_top_p = config.top_p < 1.0
    if not use_top_k and not use_top_p:
        return None
    probs = jax.nn.softmax(logits, axis=-1)
    if not use_top_k:
        sorted_probs = jnp.flip(jnp.sort(probs, axis=-1), axis=-1)
        # No position reaching top_p (float32 rounding) gives argmax 0, as in the official.
        first = jnp.argmax(jnp.cumsum(sorted_probs, axis=-1) >= config.top_p, axis=-1)
        cutoff = jnp.take_along_axis(sorted_probs, first[:, None], axis=-1)
        return probs >= cutoff
    sorted_probs, sorted_ids = jax.lax.top_k(probs, config.top_k)
    keep_sorted = jnp.ones(sorted_probs.shape, jnp.bool_)
    if use_top_p:
        # The first k cumulative sums equal the official's full-vocabulary ones; a cut past the
        # k-th token leaves all k.
        reached = jnp.cumsum(sorted_probs, axis=-1) >= config.top_p
        first = jnp.argmax(reached, axis=-1)
        cutoff = jnp.take_along_axis(sorted_probs, first[:, None], axis=-1)
        cutoff = jnp.where(jnp.any(reached, axis=-1, keepdims=True), cutoff, 0.0)
        keep_sorted = sorted_probs >= cutoff
    rows = jnp.arange(logits.shape[0])[:, None]
    return jnp.zeros(logits.shape, jnp.bool_).at[rows, sorted_ids].set(keep_sorted)


def _tempered_logits(logits: jax.Array, config: SamplingConfig) -> jax.Array:
    """[B, V] logits of the final (temperature > 0) distribution; -inf outside the cut.

    The official applies temperature after the cuts, as `probs ** (1 / temperature)` then
    renormalises; that is exactly softmax(logits / temperature) over the surviving tokens, which
    is what this computes, in log space so small temperatures cannot underflow every token.
    """
    keep = _nucleus_keep_mask(logits, config)
    tempered = logits / config.temperature if config.temperature != 1.0 else logits
    return tempered if keep is None else jnp.where(keep, tempered, -jnp.inf)


def filtered_probs(logits: jax.Array, config: SamplingConfig) -> jax.Array:
    """The distribution `sample` draws from, given already-penalised logits.

    Args:
      logits: [B, V] float32, e.g. from `penalized_logits`.
      config: sampling settings (static).

    Returns:
      [B, V] float32 probabilities: zero outside the top-p/top-k cut, tempered inside; one-hot
      at the argmax (lower id on ties) when temperature is 0.
    """
    logits = logits.astype(jnp.float32)
    if config.temperature == 0.0:
        return jax.nn.one_hot(jnp.argmax(logits, axis=-1), logits.shape[-1], dtype=jnp.float32)
    return jax.nn.softmax(_tempered_logits(logits, config), axis=-1)


def is_stop(tokens: jax.Array, config: SamplingConfig) -> jax.Array:
    """Which rows just sampled a stop token.

    Args:
      tokens: [B] int32 sampled ids.
      config: sampling settings (static).

    Returns:
      [B] bool.
    """
    if not config.stop_tokens:
        return jnp.zeros(tokens.shape, jnp.bool_)
    return jnp.isin(tokens, jnp.asarray(config.stop_tokens, tokens.dtype))


def _count_occurrences(
    state: SamplerState,
    tokens: jax.Array,
    config: SamplingConfig,
    token_weights: jax.Array | None,
) -> tuple[jax.Array, jax.Array]:
    """New (occurrence [B, V], seen [B, V]) after the rows sampled `tokens` [B]."""
    # The official order: decay every count, then add the sampled token's weight. A stop token
    # ends the official loop before any bookkeeping, so it leaves the counts unchanged.
    rows = jnp.arange(tokens.shape[0])
    weight = 1.0 if token_weights is None else jnp.asarray(token_weights, jnp.float32)[tokens]
    occurrence = (state.occurrence * config.penalty_decay).at[rows, tokens].add(weight)
    seen = state.seen.at[rows, tokens].set(True)
    if config.stop_tokens:
        stopped = is_stop(tokens, config)[:, None]
        occurrence = jnp.where(stopped, state.occurrence, occurrence)
        seen = jnp.where(stopped, state.seen, seen)
    return occurrence, seen


def sample(
    logits: jax.Array,
    state: SamplerState,
    config: SamplingConfig,
    token_weights: jax.Array | np.ndarray | None = None,
) -> tuple[jax.Array, SamplerState]:
    """Draw one token per row and update the sampler state; pure and jittable.

    Order, as in the official `PIPELINE.generate` / `sample_logits`: bans (-inf), then
    presence/frequency penalties on the logits; softmax; top-p cut; top-k cut; temperature on
    the survivors; one categorical draw per row (independent rows, one key split per step).
    Temperature 0 takes the argmax of the penalised logits instead (ties to the lower id; the
    official picks uniformly among exact ties). Then every occurrence count decays by
    `penalty_decay` and the sampled token's count grows by its weight, unless it is a stop token.

    Jit with `config` static, e.g.
    `jax.jit(sample, static_argnames="config", donate_argnames="state")`.

    Args:
      logits: [B, V] model output for the next token (cast to float32).
      state: `SamplerState` for these B rows and V ids.
      config: `SamplingConfig` (static, hashable).
      token_weights: [V] float32 occurrence increment per id (`token_penalty_weights`); None
        counts every token 1.

    Returns:
      tokens: [B] int32 sampled ids.
      new_state: the updated `SamplerState`.
    """
    if logits.ndim != 2 or logits.shape != state.occurrence.shape:
        raise ValueError(
            f"sample: logits shape {logits.shape} must be [B, V] and match the sampler state's "
            f"occurrence shape {state.occurrence.shape}"
        )
    if token_weights is not None and token_weights.shape != (logits.shape[-1],):
        raise ValueError(
            f"sample: token_weights shape {token_weights.shape} must be [V] = ({logits.shape[-1]},)"
        )
    logits = penalized_logits(logits, state, config)
    next_key, draw_key = jax.random.split(jax.random.wrap_key_data(state.rng))
    if config.temperature == 0.0:
        tokens = jnp.argmax(logits, axis=-1)
    else:
        tokens = jax.random.categorical(draw_key, _tempered_logits(logits, config), axis=-1)
    tokens = tokens.astype(jnp.int32)
    occurrence, seen = _count_occurrences(state, tokens, config, token_weights)
    new_state = SamplerState(
        occurrence=occurrence,
        seen=seen,
        rng=jax.random.key_data(next_key),
        step=state.step + 1,
    )
    return tokens, new_state
