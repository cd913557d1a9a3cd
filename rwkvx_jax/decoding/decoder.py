"""Decoding: parallel chunked prefill, a jit-compiled one-token step, and streaming generation.

Semantics (SPEC §6): prefill of T tokens followed by n steps gives the logits of one parallel
forward over T + n tokens, as long as no sequence outgrows the KV cache (`cache_size`); past
it, chunks are evicted (see `rwkvx_jax.sparse.kv_cache`) and time and memory per token stay fixed.

Batches hold sequences of different lengths: prompts are right-padded and each row says how
many tokens are real; padding never enters any state, so it never changes any output.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from rwkvx_jax.config import ConfigError, RWKVXConfig
from rwkvx_jax.decoding.sampling import (
    SamplerState,
    SamplingConfig,
    init_sampler_state,
    is_stop,
    sample,
)
from rwkvx_jax.decoding.weights import (
    DecodeWeights,
    check_kernel_layout,
    dense_layout,
    prepare_decode_weights,
)
from rwkvx_jax.model import RWKVX, DecodeState, init_decode_state
from rwkvx_jax.sparse.kv_cache import EVICTION_POLICIES, cache_slots
from rwkvx_jax.sparse.official import FlatKVCache, OfficialAttention

# "train": the training semantics (SPEC §4/§6); "official": the official runtime's inference.
ATTENTION_MODES = ("train", "official")
# Default cache: this many chunks per sparse block and sequence (32K tokens at chunk 2048).
DEFAULT_CACHE_CHUNKS = 16
# Default prefill piece: about this many tokens, a whole number of chunks (at least one).
DEFAULT_PREFILL_TOKENS = 512


@dataclasses.dataclass(frozen=True)
class DecodeConfig:
    """How a model is decoded.

    Attributes:
      cache_size: tokens of keys/values kept per sparse block and sequence (a multiple of the
        chunk size, >= top_k chunks). None: 16 chunks.
      eviction: "distinct" (default) or "oldest"; see `rwkvx_jax.sparse.kv_cache`.
      prefill_chunk: tokens per prefill piece (bounds prefill memory). None: the largest whole
        number of attention chunks not above 512 tokens (one chunk if the chunk is larger).
      attention_mode: "train" (default: the training semantics, SPEC §4/§6) or "official"
        (reproduces `rwkv_x.model_old` inference, see `rwkvx_jax.sparse.official`; then
        `cache_size` is a hard capacity, each prefill is one call, and `official` holds the
        official runtime's settings).
      official: settings of the official mode.
      kernel_layout: how the decoder stores the dense kernels it reads every token:
        "auto" (default: "out_in" on CPU, "in_out" elsewhere), "in_out" (as trained) or
        "out_in" (a transposed copy, faster matrix-vector products on CPU; see
        `rwkvx_jax.decoding.weights`).
    """

    cache_size: int | None = None
    eviction: str = "distinct"
    prefill_chunk: int | None = None
    attention_mode: str = "train"
    official: OfficialAttention = OfficialAttention()
    kernel_layout: str = "auto"

    def __post_init__(self):
        if self.attention_mode not in ATTENTION_MODES:
            raise ConfigError(
                f"attention_mode must be 'train' or 'official', got {self.attention_mode!r}"
            )
        if self.eviction not in EVICTION_POLICIES:
            raise ConfigError(f"eviction must be one of {EVICTION_POLICIES}, got {self.eviction!r}")
        check_kernel_layout(self.kernel_layout)
        for name in ("cache_size", "prefill_chunk"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ConfigError(f"{name} must be a positive int or None, got {value!r}")

    def resolve(self, config: RWKVXConfig) -> DecodeConfig:
        """Fills the defaults for a model and checks the sizes against it."""
        chunk = config.chunk_size
        cache = self.cache_size or DEFAULT_CACHE_CHUNKS * chunk
        if config.n_attn_layer and self.attention_mode == "train":
            cache_slots(cache, chunk, config.top_k)  # raises with the reason if unusable
        piece = self.prefill_chunk or max(1, DEFAULT_PREFILL_TOKENS // chunk) * chunk
        return dataclasses.replace(self, cache_size=cache, prefill_chunk=piece)


def _as_batch(tokens, lengths, vocab_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Token lists or a [B, T] array (+ optional lengths) -> padded int32 [B, T], lengths [B]."""
    if isinstance(tokens, np.ndarray | jax.Array):
        array = np.asarray(tokens)
        if array.ndim != 2:
            raise ValueError(f"tokens must be [batch, time], got shape {array.shape}")
        if not np.issubdtype(array.dtype, np.integer):
            raise TypeError(f"tokens must be integers, got dtype {array.dtype}")
        if lengths is None:
            lengths = np.full((array.shape[0],), array.shape[1])
    else:
        rows = [list(map(int, row)) for row in tokens]
        if not rows:
            raise ValueError("no sequences given")
        given = np.array([len(r) for r in rows])
        width = max(int(given.max()), 1)
        array = np.zeros((len(rows), width), np.int64)
        for i, row in enumerate(rows):
            array[i, : len(row)] = row
        lengths = given if lengths is None else lengths
    lengths = np.asarray(lengths, np.int32)
    width = array.shape[1]
    if lengths.shape != (array.shape[0],) or (lengths < 0).any() or (lengths > width).any():
        raise ValueError(
            f"lengths must be [batch] = [{array.shape[0]}] with values in [0, {array.shape[1]}], "
            f"got {lengths.tolist()}"
        )
    real = np.arange(array.shape[1])[None] < lengths[:, None]
    used = array[real]
    if used.size and (used.min() < 0 or used.max() >= vocab_size):
        raise ValueError(
            f"token ids must lie in [0, {vocab_size}); got values in [{used.min()}, {used.max()}]"
        )
    return np.where(real, array, 0).astype(np.int32), lengths


class Decoder:
    """Prefill and decode one model; compiled functions are built once per shape.

    Example:
      decoder = Decoder(config, params)
      logits, state = decoder.prefill([[1, 2, 3], [4, 5]])   # logits of each row's last token
      logits, state = decoder.step(jnp.array([6, 7]), state)
    """

    def __init__(
        self,
        config: RWKVXConfig,
        params: Any | DecodeWeights,
        decode_config: DecodeConfig | None = None,
    ):
        """Args:
        config: the model.
        params: its Flax parameters ({"params": tree} or the tree), or `DecodeWeights` from
          `prepare_decode_weights`, used as prepared (`decode_config.kernel_layout` does not
          apply to them): share one between decoders of one model, since with kernel_layout
          "out_in" each decoder built from plain params holds its own transposed copy.
        decode_config: decoding settings (defaults: `DecodeConfig()`).
        """
        self.config = config
        self.decode_config = (decode_config or DecodeConfig()).resolve(config)
        dc = self.decode_config
        # The weights the compiled functions take: see `rwkvx_jax.decoding.weights`.
        self.weights = prepare_decode_weights(params, dc.kernel_layout)
        self.official = dc.attention_mode == "official"
        policy = dc.official if self.official else dc.eviction
        piece_model = RWKVX(config)
        # One token: the WKV scan is one step; the chunked form would pad it to a whole chunk.
        step_model = RWKVX(dataclasses.replace(config, wkv_backend="reference"))

        def run_piece(weights, state, tokens, n_valid):
            with dense_layout(weights.transposed):
                return piece_model.apply(
                    {"params": weights.rest}, tokens, decode_state=state, n_valid=n_valid,
                    cache_policy=policy, last_logits_only=True,
                )  # fmt: skip

        def run_step(weights, state, tokens, valid):
            with dense_layout(weights.transposed):
                return step_model.apply(
                    {"params": weights.rest}, tokens[:, None], decode_state=state,
                    n_valid=valid.astype(jnp.int32), cache_policy=policy, last_logits_only=True,
                )  # fmt: skip

        self._run_step = run_step
        self.step_function = run_step
        self._piece = jax.jit(run_piece, donate_argnums=(1,))
        self._step = jax.jit(run_step, donate_argnums=(1,))
        self._advance_fns = {}

    # `step_function(weights, state, tokens [B], valid bool [B]) -> (logits [B, V], state)`:
    # the pure one-token step `step` compiles, for callers that compile it inside a larger
    # function of their own (a serving engine's sample-then-step); pass it `self.weights`.
    step_function: Any

    def init_state(self, batch: int) -> DecodeState:
        """Empty state for `batch` sequences."""
        return init_decode_state(
            self.config, batch, self.decode_config.cache_size, flat_cache=self.official
        )

    def _check_capacity(self, state: DecodeState, adding: np.ndarray) -> None:
        """Official mode only: a flat cache that would overflow is an error, never a wrap."""
        if not self.official or not self.config.n_attn_layer:
            return
        cache = next(b.cache for b in state.blocks.values() if hasattr(b, "cache"))
        assert isinstance(cache, FlatKVCache)
        need = np.asarray(cache.size) + adding
        capacity = cache.keys.shape[2]
        if (need > capacity).any():
            raise ValueError(
                f"attention_mode='official' keeps every token (up to KV compression): "
                f"{int(need.max())} tokens exceed cache_size {capacity}; raise cache_size"
            )

    def prefill(
        self, tokens, state: DecodeState | None = None, *, lengths=None, progress: bool = False
    ) -> tuple[jax.Array, DecodeState]:
        """Reads prompts in parallel, one piece of `prefill_chunk` tokens at a time.

        Args:
          tokens: a list of token lists (any lengths), or int [B, T] with optional `lengths`.
          state: continue these sequences (consumed: do not reuse it); None starts empty ones.
          lengths: int [B] real tokens per row of a [B, T] array (right padding after).
          progress: show a progress bar over the pieces.

        Returns:
          (logits float32 [B, V] of each row's last real token, new state). Rows with no
          tokens keep their state; their logits are meaningless.
        """
        array, lengths = _as_batch(tokens, lengths, self.config.vocab_size)
        batch, total = array.shape
        if state is None:
            state = self.init_state(batch)
        elif state.lengths.shape != (batch,):
            raise ValueError(f"state holds {state.lengths.shape[0]} sequences, tokens {batch}")
        piece = self.decode_config.prefill_chunk
        if self.official:
            # The official runtime reads a prompt in one call (its chunks align to the call).
            chunk = self.decode_config.official.chunk_size or self.config.chunk_size
            piece = max(-(-total // chunk), 1) * chunk
            self._check_capacity(state, lengths)
        n_pieces = -(-total // piece)
        padded = np.zeros((batch, n_pieces * piece), np.int32)
        padded[:, :total] = array
        starts = range(0, n_pieces * piece, piece)
        if progress:
            from tqdm.auto import tqdm

            starts = tqdm(starts, desc="prefill", unit="piece")
        logits = None
        for start in starts:
            n_valid = np.clip(lengths - start, 0, piece).astype(np.int32)
            piece_logits, state = self._piece(
                self.weights, state, jnp.asarray(padded[:, start : start + piece]), n_valid
            )
            # A row's last token lies in the last piece where it still had tokens.
            has = jnp.asarray(n_valid > 0)[:, None]
            logits = piece_logits if logits is None else jnp.where(has, piece_logits, logits)
        return logits, state

    def step(self, tokens, state: DecodeState, valid=None) -> tuple[jax.Array, DecodeState]:
        """Reads one token per sequence (jit-compiled; `state` is donated, do not reuse it).

        Args:
          tokens: int [B].
          state: the sequences' state.
          valid: bool [B]; False rows absorb nothing (finished sequences). None: all True.

        Returns:
          (logits float32 [B, V] for the next token, new state).
        """
        tokens = jnp.asarray(tokens, jnp.int32)
        if valid is None:
            valid = jnp.ones(tokens.shape, bool)
        self._check_capacity(state, np.asarray(valid, np.int32))
        return self._step(self.weights, state, tokens, jnp.asarray(valid, bool))

    def _advance(self, sampling: SamplingConfig):
        """Jitted sample-then-step for one sampling config: one dispatch per generated token.

        The seed only starts the sampler state (`init_sampler_state`), so configs that differ
        in it alone share one compiled function (a new `--seed` used to recompile the step).
        """
        key = dataclasses.replace(sampling, seed=0)
        if key not in self._advance_fns:

            def advance(weights, state, sampler, logits, active, token_weights):
                tokens, sampler = sample(logits, sampler, key, token_weights)
                active = active & ~is_stop(tokens, key)
                logits, state = self._run_step(weights, state, tokens, active)
                return tokens, active, logits, state, sampler

            self._advance_fns[key] = jax.jit(advance, donate_argnums=(1, 2))
        return self._advance_fns[key]

    def generate(
        self,
        prompts,
        sampling: SamplingConfig,
        max_new_tokens: int,
        *,
        state: DecodeState | None = None,
        logits=None,
        token_weights=None,
        result: dict | None = None,
    ) -> Iterator[np.ndarray]:
        """Streams generated tokens, one array per step.

        Args:
          prompts: token lists, one per sequence (they may differ in length). A prompt may be
            empty only when `state` and `logits` are given: that row continues straight from
            its state.
          sampling: the sampler settings (greedy when temperature is 0).
          max_new_tokens: most tokens generated per sequence.
          state: continue these sequences (after their previous context); consumed.
          logits: float32 [B, V], the next-token logits of `state`'s sequences (what
            `result["logits"]` or `state_files.load_next_logits` give); used for the rows whose
            prompt is empty.
          token_weights: [V] penalty weights per id (`sampling.token_penalty_weights`).
          result: if given, filled when the generator is exhausted with "state" (the final
            DecodeState: every generated token read, a stop token not), "logits" (float32
            [B, V], the next-token logits of that state) and "sampler".

        Yields:
          int32 [B]: each sequence's new token, or -1 once it has stopped (stop token or done).
        """
        if max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
        empty = np.array([len(p) == 0 for p in prompts])
        if empty.any() and (state is None or logits is None):
            raise ValueError(
                "every prompt needs at least one token to predict from, unless it continues a "
                "given state whose next-token logits are given too (state=, logits=)"
            )
        given_logits = logits
        logits, state = self.prefill(prompts, state)
        if empty.any():
            given_logits = jnp.asarray(given_logits, jnp.float32)
            if given_logits.shape != logits.shape:
                raise ValueError(
                    f"logits must be [batch, vocab_size] = {list(logits.shape)}, got "
                    f"{list(given_logits.shape)}"
                )
            logits = jnp.where(jnp.asarray(empty)[:, None], given_logits, logits)
        batch = logits.shape[0]
        self._check_capacity(state, np.full((batch,), max_new_tokens))
        sampler: SamplerState = init_sampler_state(batch, self.config.vocab_size, sampling.seed)
        if token_weights is not None:
            token_weights = jnp.asarray(token_weights, jnp.float32)
        active = jnp.ones((batch,), bool)
        advance = self._advance(sampling)
        # A row that stops does not read its stop token: its next-token logits stay the ones
        # the stop token was drawn from.
        stopped_logits = logits
        for _ in range(max_new_tokens):
            previous = logits
            tokens, now_active, logits, state, sampler = advance(
                self.weights, state, sampler, logits, active, token_weights
            )
            was, now = np.asarray(active), np.asarray(now_active)
            stopped_now = was & ~now
            if stopped_now.any():
                stopped_logits = jnp.where(stopped_now[:, None], previous, stopped_logits)
            out = np.where(was & now, np.asarray(tokens), -1)
            active = now_active
            yield out.astype(np.int32)
            if not bool(now.any()):
                break
        if result is not None:
            result["state"], result["sampler"] = state, sampler
            result["logits"] = jnp.where(active[:, None], logits, stopped_logits)


def greedy_tokens(decoder: Decoder, prompts: Sequence[Sequence[int]], n: int) -> np.ndarray:
    """The greedy (argmax) continuation of each prompt, [B, n] (-1 after a sequence stops).

    Plain argmax: the repetition penalties that `SamplingConfig` applies by default (as the
    official sampler does, also at temperature 0) are switched off.
    """
    argmax = SamplingConfig(temperature=0.0, presence_penalty=0.0, frequency_penalty=0.0)
    steps = list(decoder.generate(prompts, argmax, n))
    return np.stack(steps, axis=1) if steps else np.zeros((len(prompts), 0), np.int32)
