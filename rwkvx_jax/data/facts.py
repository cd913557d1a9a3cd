"""Many-facts retrieval (MQAR-style): key-value facts scattered in filler, then questions.

A document is byte text in three parts:

1. the facts region: `n_facts` facts "ab:42;" (a key of lowercase letters, a colon, a value of
   digits, a semicolon), keys all different, at random places among filler runs of random
   uppercase letters ("QZKW..."), which never repeat and never look like a key or a value;
2. the questions: "?ab:42;" for `n_questions` of the facts, drawn without repeats, in random
   order. The value after each question's colon is the answer;
3. the end-of-document token.

Only an answer is predictable from the context, so it is what the task measures: the tokens of
an answer can be predicted exactly when the model can find its key's fact among all the others.
A recurrent state of fixed size holds a bounded number of such facts; attention can look them
up. Every document is a function of its settings and `(seed, index)` alone.

For training, `FactsTask` cuts windows of exactly `ctx` tokens, one document each, whose fact
count is drawn uniformly from [min_facts, max_facts] (capped by what fits); `write_binidx`
stores them for `train.py data.corpus=PREFIX data.order=sequential`, as `RetrievalMix` does.
"""

from __future__ import annotations

import dataclasses
import os
import string
from collections.abc import Iterator

import numpy as np

from rwkvx_jax.data.binidx import write_binidx

KEY_ALPHABET = string.ascii_lowercase
VALUE_ALPHABET = string.digits
FILLER_ALPHABET = string.ascii_uppercase
SEPARATOR, END_OF_FACT, QUESTION_MARK = ":", ";", "?"
END_OF_DOCUMENT = 0  # the byte tokenizer's end-of-document id


@dataclasses.dataclass(frozen=True)
class Question:
    """One question of a document, as token positions.

    Attributes:
      key, value: the asked key and its answer (text).
      answer_start: position of the answer's first token in the document; the answer occupies
        [answer_start, answer_start + len(value)), and the token at answer_start - 1 (the
        question's colon) is the first one whose prediction is scored.
      fact_value_start: position of the same value's first token in the fact.
    """

    key: str
    value: str
    answer_start: int
    fact_value_start: int


@dataclasses.dataclass(frozen=True)
class FactsDocument:
    """One many-facts document.

    Attributes:
      tokens: byte tokens, the end-of-document token last.
      n_facts: facts in it.
      questions: its questions in order.
    """

    tokens: list[int]
    n_facts: int
    questions: tuple[Question, ...]

    def answer_mask(self) -> np.ndarray:
        """bool [len(tokens)]: True at the answer tokens (the scored targets)."""
        mask = np.zeros(len(self.tokens), bool)
        for question in self.questions:
            mask[question.answer_start : question.answer_start + len(question.value)] = True
        return mask


class FactsTask:
    """Deterministic many-facts documents and training windows.

    Args:
      key_letters: letters per key (26**key_letters distinct keys).
      value_digits: digits per value.
      n_questions: questions per document (fewer when a document has fewer facts).
      ctx: training window length (only `window`, `tokens` and `write_binidx` need it).
      min_facts, max_facts: range of facts per training window.
      seed: training windows are a function of (seed, window index).

    Raises:
      ValueError: a setting out of range, or ctx too short for min_facts facts.
    """

    def __init__(
        self,
        *,
        key_letters: int = 2,
        value_digits: int = 2,
        n_questions: int = 16,
        ctx: int = 1024,
        min_facts: int = 1,
        max_facts: int = 128,
        seed: int = 0,
    ):
        for name, value in (
            ("key_letters", key_letters),
            ("value_digits", value_digits),
            ("n_questions", n_questions),
            ("min_facts", min_facts),
        ):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        if max_facts < min_facts:
            raise ValueError(f"max_facts={max_facts} is below min_facts={min_facts}")
        if max_facts > len(KEY_ALPHABET) ** key_letters:
            raise ValueError(
                f"max_facts={max_facts} exceeds the {len(KEY_ALPHABET) ** key_letters} distinct "
                f"keys of {key_letters} letter(s)"
            )
        self.key_letters = key_letters
        self.value_digits = value_digits
        self.n_questions = n_questions
        self.ctx = ctx
        self.min_facts = min_facts
        self.max_facts = max_facts
        self.seed = seed
        if self.shortest(min_facts) > ctx:
            raise ValueError(
                f"ctx={ctx} cannot hold {min_facts} fact(s) and their questions "
                f"({self.shortest(min_facts)} tokens); raise ctx or lower min_facts"
            )

    @property
    def fact_tokens(self) -> int:
        """Tokens of one fact "ab:42;"."""
        return self.key_letters + self.value_digits + 2

    def shortest(self, n_facts: int) -> int:
        """Tokens of a document with `n_facts` facts and no filler."""
        questions = min(self.n_questions, n_facts)
        return n_facts * self.fact_tokens + questions * (self.fact_tokens + 1) + 1

    def most_facts(self, length: int) -> int:
        """The most facts a document of `length` tokens holds (0 when not even one fits)."""
        n = 0
        while n < self.max_facts and self.shortest(n + 1) <= length:
            n += 1
        return n

    def document(self, n_facts: int, length: int, rng: np.random.Generator) -> FactsDocument:
        """A document of exactly `length` tokens with `n_facts` facts, drawn from `rng`.

        Raises:
          ValueError: n_facts out of [1, 26**key_letters], or length below `shortest(n_facts)`.
        """
        if not 1 <= n_facts <= len(KEY_ALPHABET) ** self.key_letters:
            raise ValueError(
                f"n_facts must be in [1, {len(KEY_ALPHABET) ** self.key_letters}], got {n_facts}"
            )
        if length < self.shortest(n_facts):
            raise ValueError(
                f"length={length} cannot hold {n_facts} facts and their questions "
                f"(at least {self.shortest(n_facts)} tokens)"
            )
        n_keys = len(KEY_ALPHABET) ** self.key_letters
        key_ids = rng.choice(n_keys, size=n_facts, replace=False)
        keys = [_spell(int(i), KEY_ALPHABET, self.key_letters) for i in key_ids]
        values = [_random_text(rng, VALUE_ALPHABET, self.value_digits) for _ in keys]
        n_questions = min(self.n_questions, n_facts)
        asked = rng.choice(n_facts, size=n_questions, replace=False)
        filler = length - self.shortest(n_facts)
        # Filler split into n_facts + 1 runs (before, between and after the facts): uniform
        # over compositions, from sorted cut points.
        cuts = np.sort(rng.integers(0, filler + 1, size=n_facts))
        runs = np.diff(np.concatenate([[0], cuts, [filler]]))
        text: list[str] = []
        value_starts = []
        position = 0
        for key, value, run in zip(keys, values, runs[:-1], strict=True):
            text.append(_random_text(rng, FILLER_ALPHABET, int(run)))
            position += int(run)
            text.append(f"{key}{SEPARATOR}{value}{END_OF_FACT}")
            value_starts.append(position + len(key) + 1)
            position += self.fact_tokens
        text.append(_random_text(rng, FILLER_ALPHABET, int(runs[-1])))
        position += int(runs[-1])
        questions = []
        for fact in asked:
            key, value = keys[fact], values[fact]
            text.append(f"{QUESTION_MARK}{key}{SEPARATOR}{value}{END_OF_FACT}")
            answer_start = position + len(key) + 2
            questions.append(Question(key, value, answer_start, value_starts[fact]))
            position += self.fact_tokens + 1
        tokens = [*"".join(text).encode("ascii"), END_OF_DOCUMENT]
        return FactsDocument(tokens, n_facts, tuple(questions))

    def eval_document(self, n_facts: int, length: int, index: int) -> FactsDocument:
        """Evaluation document `index` of a (n_facts, length) cell: its own random stream
        (seed, n_facts, length, index), disjoint from every training window's."""
        rng = np.random.default_rng([self.seed, 1, n_facts, length, index])
        return self.document(n_facts, length, rng)

    def window(self, index: int) -> FactsDocument:
        """Training window `index`: one document of exactly `ctx` tokens."""
        if index < 0:
            raise IndexError(f"window index must be >= 0, got {index}")
        rng = np.random.default_rng([self.seed, 0, index])
        most = self.most_facts(self.ctx)
        n_facts = int(rng.integers(self.min_facts, most + 1))
        return self.document(n_facts, self.ctx, rng)

    def windows(self, count: int) -> Iterator[list[int]]:
        """The tokens of windows 0 .. count - 1."""
        for index in range(count):
            yield self.window(index).tokens

    def tokens(self, count: int) -> np.ndarray:
        """The flat stream of `count` windows plus a closing end-of-document token.

        Returns:
          int32 [count * ctx + 1]; `TokenWindows(stream, ctx)` reads exactly these windows.
        """
        stream = np.empty(count * self.ctx + 1, np.int32)
        for index, window in enumerate(self.windows(count)):
            stream[index * self.ctx : (index + 1) * self.ctx] = window
        stream[-1] = END_OF_DOCUMENT
        return stream

    def write_binidx(self, prefix: str | os.PathLike, count: int) -> int:
        """Writes `tokens(count)` as a binidx pair of bytes (one item per window, the closing
        token appended to the last), for `train.py data.corpus=PREFIX data.order=sequential`.

        Returns:
          Tokens written: count * ctx + 1.
        """
        if count < 1:
            raise ValueError(f"count must be >= 1, got {count}")

        def documents() -> Iterator[list[int]]:
            for index, window in enumerate(self.windows(count)):
                yield window + [END_OF_DOCUMENT] if index == count - 1 else window

        return write_binidx(prefix, documents(), dtype=np.uint8)


def _spell(number: int, alphabet: str, width: int) -> str:
    """`number` written in base len(alphabet) with `width` symbols."""
    symbols = []
    for _ in range(width):
        number, digit = divmod(number, len(alphabet))
        symbols.append(alphabet[digit])
    return "".join(reversed(symbols))


def _random_text(rng: np.random.Generator, alphabet: str, n: int) -> str:
    return "".join(alphabet[i] for i in rng.integers(0, len(alphabet), size=n))
