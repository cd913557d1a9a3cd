"""Text in, text out: a model, its tokenizer and its compiled decoder (`TextGenerator`)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp

from rwkvx_jax.config import RWKVXConfig
from rwkvx_jax.decoding.decoder import DecodeConfig, Decoder
from rwkvx_jax.decoding.sampling import SamplingConfig, token_penalty_weights
from rwkvx_jax.model import DecodeState
from rwkvx_jax.tokenizer import Tokenizer, tokenizer_for_vocab


def _broadcast_rows(tree, batch: int):
    """A state or its [B, V] next-token logits, for `batch` sequences: as given, or one
    sequence's row copied to every row."""
    have = int(jax.tree.leaves(tree)[0].shape[0])
    if have == batch:
        return tree
    if have != 1:
        raise ValueError(
            f"the state holds {have} sequences but {batch} prompts were given (give one prompt "
            "per saved sequence, or a state of one sequence to share among all prompts)"
        )
    return jax.tree.map(lambda leaf: jnp.repeat(leaf, batch, axis=0), tree)


class TextGenerator:
    """A model, its tokenizer and its compiled decoder: text in, text out.

    Compiled code is kept per instance, so reuse one generator for many calls.

    Example:
      generator = TextGenerator(config, params)
      texts = generator.generate(["Hello"], SamplingConfig(temperature=0.0), 20)
    """

    def __init__(
        self,
        config: RWKVXConfig,
        params,
        decode_config: DecodeConfig | None = None,
        *,
        tokenizer: Tokenizer | None = None,
    ):
        """Builds the decoder (nothing is compiled until the first call).

        Args:
          config: the model config.
          params: its Flax parameter tree.
          decode_config: cache size, eviction, prefill piece, attention mode.
          tokenizer: None picks the one for the model's vocabulary (`tokenizer_for_vocab`).
        """
        self.config = config
        self.tokenizer = tokenizer or tokenizer_for_vocab(config.vocab_size)
        self.decoder = Decoder(config, params, decode_config)
        # The official penalty rule: whitespace and digit tokens add nothing to their count.
        self.token_weights = token_penalty_weights(self.tokenizer.decode, config.vocab_size)

    def encode_prompts(self, prompts: Sequence[str], allow_empty: bool = False) -> list[list[int]]:
        """Token ids of each prompt.

        Raises:
          ValueError: no prompts, or (unless allow_empty) a prompt with no tokens (names its
            index).
          TypeError: a prompt is not a str.
        """
        if isinstance(prompts, str):
            raise TypeError("prompts must be a list of str, got a single str")
        if not prompts:
            raise ValueError("no prompts given")
        ids = []
        for index, prompt in enumerate(prompts):
            if not isinstance(prompt, str):
                raise TypeError(f"prompt {index} must be a str, got {type(prompt).__name__}")
            tokens = self.tokenizer.encode(prompt)
            if not tokens and not allow_empty:
                raise ValueError(
                    f"prompt {index} is empty: the model needs at least one token to continue from"
                )
            ids.append(tokens)
        return ids

    def check_sampling(self, sampling: SamplingConfig) -> None:
        """Raises ValueError if a banned or stop token id is outside the vocabulary."""
        for name in ("banned_tokens", "stop_tokens"):
            bad = [t for t in getattr(sampling, name) if t >= self.config.vocab_size]
            if bad:
                raise ValueError(
                    f"{name} {bad} lie outside the model's vocabulary [0, {self.config.vocab_size})"
                )

    def generate(
        self,
        prompts: Sequence[str],
        sampling: SamplingConfig,
        max_new_tokens: int,
        *,
        state: DecodeState | None = None,
        logits=None,
        on_text: Callable[[int, str], None] | None = None,
        result: dict | None = None,
    ) -> list[str]:
        """Continues each prompt; see `generate_text`."""
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int):
            raise TypeError(f"max_new_tokens must be an int, got {max_new_tokens!r}")
        if max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
        self.check_sampling(sampling)
        ids = self.encode_prompts(prompts, allow_empty=logits is not None)
        if state is not None:
            state = _broadcast_rows(state, len(ids))
        if logits is not None:
            logits = _broadcast_rows(jnp.asarray(logits, jnp.float32), len(ids))
        streams = [self.tokenizer.streaming_decoder() for _ in ids]
        pieces: list[list[str]] = [[] for _ in ids]
        generated: list[list[int]] = [[] for _ in ids]

        def emit(row: int, text: str) -> None:
            if text:
                pieces[row].append(text)
                if on_text is not None:
                    on_text(row, text)

        decoded = {}
        steps = self.decoder.generate(
            ids,
            sampling,
            max_new_tokens,
            state=state,
            logits=logits,
            token_weights=self.token_weights,
            result=decoded,
        )
        for tokens in steps:
            for row, token in enumerate(tokens.tolist()):
                if token >= 0:
                    generated[row].append(token)
                    emit(row, streams[row].push(token))
        for row, stream in enumerate(streams):
            emit(row, stream.flush())
        if result is not None:
            result.update(decoded)
            result["tokens"] = generated
        return ["".join(p) for p in pieces]


def generate_text(
    config: RWKVXConfig,
    params,
    prompts: Sequence[str],
    sampling: SamplingConfig,
    max_new_tokens: int,
    *,
    decode_config: DecodeConfig | None = None,
    state: DecodeState | None = None,
    logits=None,
    on_text: Callable[[int, str], None] | None = None,
    result: dict | None = None,
) -> list[str]:
    """Generates a continuation of each prompt, all prompts decoded together as one batch.

    Builds (and compiles) a fresh `TextGenerator`; to generate repeatedly, keep one instead.
    Inputs are checked (prompts, token ids, state batch) before anything is compiled.

    Args:
      config: the model config.
      params: its Flax parameter tree.
      prompts: B strings; one may be empty only to continue a state with its `logits`.
      sampling: sampler settings (temperature 0 = greedy; stop tokens end a row, and are not
        part of its text).
      max_new_tokens: most tokens generated per prompt (0: only read the prompts).
      decode_config: cache size, eviction, prefill piece, attention mode.
      state: continue saved sequences (`state_files.load_state`): each prompt is appended to
        its row's context; a state of one sequence is shared by every prompt. Consumed.
      logits: float32 [B or 1, V], the state's next-token logits
        (`state_files.load_next_logits`): needed for empty prompts.
      on_text: called as on_text(row, text) whenever a row's text grows (never splits a
        UTF-8 character), for streaming.
      result: if given, filled with "state" (the final `DecodeState`, every generated token
        read, ready for `state_files.save_state`), "logits" (its next-token logits),
        "sampler", and "tokens" (each row's generated ids).

    Returns:
      B strings: each prompt's generated text (without the prompt).
    """
    generator = TextGenerator(config, params, decode_config)
    return generator.generate(
        prompts,
        sampling,
        max_new_tokens,
        state=state,
        logits=logits,
        on_text=on_text,
        result=result,
    )
