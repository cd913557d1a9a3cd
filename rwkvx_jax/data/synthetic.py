"""Synthetic retrieval mix: passkey documents (the SPEC §8 prompt and its answer) and plain text.

Each training window of `ctx` tokens is built on its own from `(seed, window index)`:

* with probability `plain_fraction` it is plain text only (slices of a given corpus, e.g. the
  stdlib bytes), which keeps the model a language model rather than a passkey machine;
* otherwise it holds one passkey document, the evaluation's prompt (`PasskeyPromptBuilder`:
  task, haystack, the pass-key line at a uniformly drawn depth, the question) followed by the
  answer " N." and the end-of-document token, then plain text filling the rest of the window.
  The document comes first (as in evaluation, read from a fresh state) with probability
  `document_first`, after the plain text otherwise. With `task_probability` < 1 some
  documents leave out the opening task description (the rest of the prompt is unchanged):
  that is what lets windows shorter than the task (e.g. a short first phase of training) still
  hold whole documents.

The document's target length is drawn uniformly from [min_length, longest], where `longest`
grows linearly from `min_length` to `ctx` over the first `curriculum_windows` windows: read in
order (`order="sequential"`), the stream is a curriculum from short to full-length documents.
A key's digits never occur in the plain text of its window, so the key is written only where
the protocol puts it: twice on the pass-key line ("The pass key is N. Remember it. N is the pass
key.") and once as the answer.

The flat stream (`RetrievalMix.tokens`) is the windows back to back plus one closing token, so
`TokenWindows(stream, ctx)` window i is exactly window i here plus the first token of the next;
`write_binidx` stores it for `train.py` (`data.corpus=PREFIX data.order=sequential`).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator

import numpy as np

from rwkvx_jax.data.passkey import DEFAULT_KEY_DIGITS, PasskeyPromptBuilder
from rwkvx_jax.data.windows import windows_stream, write_windows_binidx
from rwkvx_jax.tokenizer import Tokenizer

ANSWER = " {key}."
# Plain-text slices tried before giving up on one that avoids the key's digits.
_MAX_REDRAWS = 100


@dataclasses.dataclass(frozen=True)
class PasskeyDocument:
    """One passkey training document: the evaluation prompt, its answer, end of document.

    Attributes:
      tokens: prompt + answer + end-of-document token.
      key: the pass key (decimal digits).
      needle_start: index of the pass-key line's first token.
      needle_end: index just past the pass-key line.
      answer_start: index of the answer's first token (the prompt's length).
    """

    tokens: list[int]
    key: str
    needle_start: int
    needle_end: int
    answer_start: int


@dataclasses.dataclass(frozen=True)
class Segment:
    """Where a piece of a window lies: tokens [start, stop), a passkey document or plain text."""

    kind: str  # "passkey" or "plain"
    start: int
    stop: int
    document: PasskeyDocument | None = None


class RetrievalMix:
    """Deterministic, random-access windows of the synthetic retrieval mix.

    Args:
      tokenizer: the model's tokenizer (`ByteTokenizer` for the tiny byte-level models).
      plain_tokens: 1-D token stream the plain-text slices are cut from (e.g.
        `stdlib_corpus_tokens(...)`); at least `ctx` tokens.
      ctx: window length in tokens (the training context).
      seed: everything is a function of (seed, window index).
      key_digits: digits of each pass key (no leading zero), as in evaluation.
      min_length: shortest passkey document in tokens; None: the shortest possible one (the
        prompt without haystack, the answer and the end-of-document token; without the task
        when task_probability < 1).
      curriculum_windows: windows over which the longest document grows from min_length to
        ctx; 0 draws every length from [min_length, ctx].
      plain_fraction: share of windows that are plain text only.
      document_first: probability that the passkey document opens its window.
      task_probability: probability that a document opens with the task description (only
        drawn for documents long enough to hold it with an empty haystack).

    Raises:
      ValueError: a setting out of range, or ctx too short for the shortest document.
    """

    def __init__(
        self,
        tokenizer: Tokenizer,
        plain_tokens,
        ctx: int,
        *,
        seed: int = 0,
        key_digits: int = DEFAULT_KEY_DIGITS,
        min_length: int | None = None,
        curriculum_windows: int = 0,
        plain_fraction: float = 0.1,
        document_first: float = 0.75,
        task_probability: float = 1.0,
    ):
        self.tokenizer = tokenizer
        self.builder = PasskeyPromptBuilder(tokenizer)
        self.end_of_document = tokenizer.end_of_document
        self.ctx = ctx
        self.seed = seed
        self.key_digits = key_digits
        self.curriculum_windows = curriculum_windows
        self.plain_fraction = plain_fraction
        self.document_first = document_first
        self.task_probability = task_probability
        self.plain = np.asarray(plain_tokens)
        if self.plain.ndim != 1 or self.plain.dtype.kind not in "iu":
            raise ValueError(
                f"plain_tokens: expected a 1-D integer array, got shape {self.plain.shape} "
                f"dtype {self.plain.dtype}"
            )
        if len(self.plain) < ctx:
            raise ValueError(f"plain_tokens holds {len(self.plain)} tokens, fewer than ctx={ctx}")
        if not 1 <= key_digits <= 18:
            raise ValueError(f"key_digits must be in [1, 18], got {key_digits}")
        for name in ("plain_fraction", "document_first", "task_probability"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must lie in [0, 1], got {getattr(self, name)}")
        if curriculum_windows < 0:
            raise ValueError(f"curriculum_windows must be >= 0, got {curriculum_windows}")
        shortest = self.shortest_document(with_task=task_probability == 1.0)
        self.min_length = shortest if min_length is None else min_length
        if self.min_length < shortest:
            raise ValueError(
                f"min_length={self.min_length} is below the shortest passkey document "
                f"({shortest} tokens: prompt without haystack, answer, end of document)"
            )
        if self.min_length > ctx:
            raise ValueError(
                f"ctx={ctx} is shorter than the shortest passkey document ({self.min_length} "
                "tokens); raise ctx or lower min_length"
            )

    def shortest_document(self, with_task: bool = True) -> int:
        """Tokens of a passkey document with the longest key and an empty haystack."""
        key = "9" * self.key_digits
        fixed = self.builder.fixed_tokens(key) + len(self._answer(key)) + 1
        return fixed if with_task else fixed - len(self.builder.task)

    def _answer(self, key: str) -> list[int]:
        return self.tokenizer.encode(ANSWER.format(key=key))

    def longest_document(self, index: int) -> int:
        """The longest passkey document window `index` may hold (the curriculum)."""
        if self.curriculum_windows == 0 or index >= self.curriculum_windows:
            return self.ctx
        grown = (self.ctx - self.min_length) * (index + 1) / self.curriculum_windows
        return self.min_length + int(grown)

    def document(
        self, length: int, depth: float, key: str, with_task: bool = True
    ) -> PasskeyDocument:
        """The passkey document of at most `length` tokens (shorter by less than a sentence).

        Args:
          length: target tokens, answer and end of document included.
          depth: in [0, 1]; the pass-key line follows round(depth * n) of the n haystack
            sentences.
          key: the pass key.
          with_task: open with the task description (as evaluation prompts do).

        Raises:
          ValueError: length below the prompt without haystack plus answer, or depth outside
            [0, 1].
        """
        answer = self._answer(key)
        skip = 0 if with_task else len(self.builder.task)
        prompt = self.builder.build(length - len(answer) - 1 + skip, depth, key)
        tokens = prompt.tokens[skip:] + answer + [self.end_of_document]
        return PasskeyDocument(
            tokens, key, prompt.needle_start - skip, prompt.needle_end - skip,
            len(prompt.tokens) - skip,
        )  # fmt: skip

    def _plain_slice(self, rng: np.random.Generator, n: int, avoid: bytes | None) -> list[int]:
        """`n` tokens: n - 1 plain-text tokens from a random offset, then end of document."""
        if n <= 1:
            return [self.end_of_document] * n
        for _ in range(_MAX_REDRAWS):
            start = int(rng.integers(0, len(self.plain) - (n - 1) + 1))
            piece = self.plain[start : start + n - 1]
            if avoid is None or avoid not in self.tokenizer.decode_bytes(piece.tolist()):
                return [*piece.tolist(), self.end_of_document]
        raise ValueError(f"no plain-text slice of {n - 1} tokens avoids {avoid!r}")

    def window(self, index: int) -> tuple[list[int], list[Segment]]:
        """Window `index`: exactly `ctx` tokens and the segments they are made of."""
        if index < 0:
            raise IndexError(f"window index must be >= 0, got {index}")
        rng = np.random.default_rng([self.seed, index])
        if rng.random() < self.plain_fraction:
            return self._plain_slice(rng, self.ctx, None), [Segment("plain", 0, self.ctx)]
        key = str(int(rng.integers(10 ** (self.key_digits - 1), 10**self.key_digits)))
        length = int(rng.integers(self.min_length, self.longest_document(index) + 1))
        depth = float(rng.random())
        with_task = rng.random() < self.task_probability
        with_task = with_task and length >= self.shortest_document(with_task=True)
        document = self.document(length, depth, key, with_task)
        plain = self._plain_slice(rng, self.ctx - len(document.tokens), key.encode())
        n_doc, n_plain = len(document.tokens), len(plain)
        if rng.random() < self.document_first:
            segments = [Segment("passkey", 0, n_doc, document)]
            segments += [Segment("plain", n_doc, self.ctx)] if n_plain else []
            return document.tokens + plain, segments
        segments = [Segment("plain", 0, n_plain)] if n_plain else []
        segments += [Segment("passkey", n_plain, self.ctx, document)]
        return plain + document.tokens, segments

    def windows(self, count: int) -> Iterator[list[int]]:
        """The tokens of windows 0 .. count - 1."""
        for index in range(count):
            yield self.window(index)[0]

    def tokens(self, count: int) -> np.ndarray:
        """The flat stream of `count` windows plus a closing end-of-document token.

        Returns:
          int32 [count * ctx + 1]; `TokenWindows(stream, ctx)` reads exactly these windows.
        """
        return windows_stream(self.windows(count), count, self.ctx, self.end_of_document)

    def write_binidx(self, prefix: str | os.PathLike, count: int) -> int:
        """Writes `tokens(count)` as a binidx pair (one item per window, the closing token
        appended to the last), for `train.py data.corpus=PREFIX data.order=sequential`.

        Returns:
          Tokens written: count * ctx + 1.
        """
        dtype = np.uint8 if self.tokenizer.vocab_size <= 256 else np.uint16
        windows = self.windows(count)
        return write_windows_binidx(prefix, windows, count, self.end_of_document, dtype)
