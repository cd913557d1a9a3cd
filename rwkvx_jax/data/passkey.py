"""Passkey prompts (SPEC §8): the task, a haystack of repeated sentences, the pass-key line
hidden at a chosen depth, and the question, built to an exact token budget.

Used by the passkey evaluation (`rwkvx_jax.evals.passkey`) and by the synthetic training mix
(`rwkvx_jax.data.synthetic`).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from rwkvx_jax.tokenizer import Tokenizer

TASK = (
    "There is an important info hidden inside a lot of irrelevant text. Find it and memorize "
    "it. I will quiz you about the important information there."
)


HAYSTACK = (
    "The grass is green.",
    "The sky is blue.",
    "The sun is yellow.",
    "Here we go.",
    "There and back again.",
)


NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key."


QUESTION = "What is the pass key? The pass key is"


# Bumped whenever the prompt text or layout changes: results of two versions do not mix.
PROMPT_VERSION = 1


DEFAULT_KEY_DIGITS = 5


def depth_grid(count: int) -> list[float]:
    """`count` needle depths evenly spread over [0, 1] (both ends included); one is 0.5."""
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise ValueError(f"the number of depths must be an int >= 1, got {count!r}")
    if count == 1:
        return [0.5]
    return [i / (count - 1) for i in range(count)]


def passkey_for(seed: int, length: int, depth: float, digits: int = DEFAULT_KEY_DIGITS) -> str:
    """The pass key of one grid cell: `digits` decimal digits, no leading zero.

    Drawn from (seed, length, depth), so every cell and seed hides a different number and a
    rerun hides the same one.
    """
    if not 1 <= digits <= 18:
        raise ValueError(f"key digits must be in [1, 18], got {digits}")
    if seed < 0:
        raise ValueError(f"seeds must be >= 0, got {seed}")
    rng = np.random.default_rng([seed, length, round(depth * 1_000_000)])
    return str(int(rng.integers(10 ** (digits - 1), 10**digits)))


@dataclasses.dataclass(frozen=True)
class PasskeyPrompt:
    """One passkey prompt.

    Attributes:
      tokens: the prompt's token ids.
      key: the pass key (decimal digits).
      needle_start: index of the pass-key line's first token; every token before it is the
        task and haystack, identical for all prompts (so their state can be shared).
      needle_end: index just past the pass-key line.
      n_sentences: haystack sentences in the prompt.
      sentences_before: haystack sentences before the pass-key line, round(depth * n_sentences).
    """

    tokens: list[int]
    key: str
    needle_start: int
    needle_end: int
    n_sentences: int
    sentences_before: int


class PasskeyPromptBuilder:
    """Builds passkey prompts of an exact token budget for one tokenizer.

    The text is the task, the haystack sentences, the pass-key line and the question joined by
    single spaces. Each piece is tokenized on its own with its leading space; for the RWKV World
    and byte tokenizers that equals tokenizing the whole text (tests check it), and it makes
    every prompt's token count a sum of known parts.
    """

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.task = tokenizer.encode(TASK)
        self.sentences = [tokenizer.encode(" " + s) for s in HAYSTACK]
        self.question = tokenizer.encode(" " + QUESTION)
        # offsets[i]: tokens in the first i sentences of one cycle of the haystack.
        self.offsets = np.cumsum([0] + [len(s) for s in self.sentences]).tolist()
        self.cycle = self.offsets[-1]
        self._stream: list[int] = list(self.task)

    def needle(self, key: str) -> list[int]:
        """Tokens of the pass-key line (with its leading space)."""
        return self.tokenizer.encode(" " + NEEDLE.format(key=key))

    def haystack_tokens(self, n_sentences: int) -> int:
        """Tokens in the first `n_sentences` haystack sentences."""
        full, rest = divmod(n_sentences, len(HAYSTACK))
        return full * self.cycle + self.offsets[rest]

    def fixed_tokens(self, key: str) -> int:
        """Tokens of a prompt with an empty haystack: task, pass-key line and question."""
        return len(self.task) + len(self.needle(key)) + len(self.question)

    def stream(self, stop: int) -> list[int]:
        """The first `stop` tokens of task + endless haystack, which every prompt starts with."""
        while len(self._stream) < stop:
            for sentence in self.sentences:
                self._stream.extend(sentence)
        return self._stream[:stop]

    def layout(self, length: int, depth: float, key: str) -> tuple[int, int, int]:
        """(haystack sentences, sentences before the pass-key line, its first token index).

        Raises:
          ValueError: depth outside [0, 1], or length below the task + line + question.
        """
        if not 0.0 <= depth <= 1.0:
            raise ValueError(f"depth must lie in [0, 1], got {depth}")
        budget = length - self.fixed_tokens(key)
        if budget < 0:
            raise ValueError(
                f"context length {length} is shorter than the prompt without haystack "
                f"({self.fixed_tokens(key)} tokens: task, pass-key line, question)"
            )
        n = (budget // self.cycle) * len(HAYSTACK)
        while self.haystack_tokens(n + 1) <= budget:
            n += 1
        before = int(np.floor(depth * n + 0.5))
        return n, before, len(self.task) + self.haystack_tokens(before)

    def build(self, length: int, depth: float, key: str) -> PasskeyPrompt:
        """The prompt of at most `length` tokens with the pass-key line at `depth`.

        Args:
          length: target token count; the prompt has the most whole haystack sentences that
            fit, so it is shorter by less than one sentence.
          depth: in [0, 1]; the line follows round(depth * n_sentences) haystack sentences.
          key: the pass key.

        Raises:
          ValueError: depth outside [0, 1], or length below the task + line + question.
        """
        n, before, start = self.layout(length, depth, key)
        needle = self.needle(key)
        end = len(self.task) + self.haystack_tokens(n)
        stream = self.stream(end)
        tokens = stream[:start] + needle + stream[start:end] + self.question
        return PasskeyPrompt(tokens, key, start, start + len(needle), n, before)
