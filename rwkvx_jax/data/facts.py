"""Many-facts retrieval (MQAR-style): key-value facts scattered in filler, then questions.

A document is a byte-token sequence in three parts:

1. the facts region: `n_facts` facts, each a key (`key_tokens` bytes from 0x80-0xFF, which no
   other part uses) followed at once by its value (`value_tokens` lowercase letters), keys all
   different, at random places among runs of random uppercase filler letters, which never
   repeat and never look like a key or a value;
2. the questions: "?", a key, its value, for `n_questions` of the facts, drawn without repeats
   in random order. The value after a question's key is the answer;
3. the end-of-document token.

With one-token keys and values this is the multi-query associative recall (MQAR) of the Zoology
line of work, with filler: a value follows its key immediately, so finding it is one
induction step. Only an answer is predictable from the context, so that is what the task
measures. A recurrent state of fixed size holds a bounded number of such facts; attention can
look them up. Every document is a function of its settings and `(seed, index)` alone.

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

from rwkvx_jax.data.windows import windows_stream, write_windows_binidx

KEY_ALPHABET = tuple(range(0x80, 0x100))  # bytes no ASCII text uses
VALUE_ALPHABET = tuple(string.ascii_lowercase.encode())
FILLER_ALPHABET = tuple(string.ascii_uppercase.encode())
QUESTION_MARK = ord("?")
END_OF_DOCUMENT = 0  # the byte tokenizer's end-of-document id


@dataclasses.dataclass(frozen=True)
class Question:
    """One question of a document, as token positions.

    Attributes:
      key, value: the asked key and its answer (tokens).
      answer_start: position of the answer's first token in the document; the answer occupies
        [answer_start, answer_start + len(value)), and the token at answer_start - 1 (the
        question's last key token) is the first one whose prediction is scored.
      fact_value_start: position of the same value's first token in the fact.
    """

    key: tuple[int, ...]
    value: tuple[int, ...]
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
      key_tokens: tokens per key (128**key_tokens distinct keys).
      value_tokens: tokens per value (26**value_tokens distinct values).
      n_questions: questions per document (fewer when a document has fewer facts).
      ctx: training window length (only `window`, `tokens` and `write_binidx` need it).
      min_facts, max_facts: range of facts per training document.
      documents_per_window: training windows hold this many documents back to back, of
        ctx // documents_per_window tokens each (the last takes the remainder): short documents
        with few facts are the easy start of a curriculum, with more questions per token.
      seed: training windows are a function of (seed, window index).

    Raises:
      ValueError: a setting out of range, or ctx too short for min_facts facts.
    """

    def __init__(
        self,
        *,
        key_tokens: int = 1,
        value_tokens: int = 1,
        n_questions: int = 16,
        ctx: int = 1024,
        min_facts: int = 1,
        max_facts: int = 128,
        documents_per_window: int = 1,
        seed: int = 0,
    ):
        for name, value in (
            ("key_tokens", key_tokens),
            ("value_tokens", value_tokens),
            ("n_questions", n_questions),
            ("min_facts", min_facts),
            ("documents_per_window", documents_per_window),
        ):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        if max_facts < min_facts:
            raise ValueError(f"max_facts={max_facts} is below min_facts={min_facts}")
        self.key_tokens = key_tokens
        self.value_tokens = value_tokens
        if max_facts > self.n_keys:
            raise ValueError(
                f"max_facts={max_facts} exceeds the {self.n_keys} distinct keys of "
                f"{key_tokens} token(s)"
            )
        self.n_questions = n_questions
        self.ctx = ctx
        self.min_facts = min_facts
        self.max_facts = max_facts
        self.documents_per_window = documents_per_window
        self.seed = seed
        self.document_length = ctx // documents_per_window
        if self.shortest(min_facts) > self.document_length:
            raise ValueError(
                f"ctx={ctx} in {documents_per_window} document(s) of {self.document_length} "
                f"tokens cannot hold {min_facts} fact(s) and their questions "
                f"({self.shortest(min_facts)} tokens); raise ctx or lower min_facts"
            )

    @property
    def n_keys(self) -> int:
        return len(KEY_ALPHABET) ** self.key_tokens

    @property
    def fact_tokens(self) -> int:
        """Tokens of one fact: its key, then its value."""
        return self.key_tokens + self.value_tokens

    def shortest(self, n_facts: int) -> int:
        """Tokens of a document with `n_facts` facts and no filler."""
        questions = min(self.n_questions, n_facts)
        return n_facts * self.fact_tokens + questions * (self.fact_tokens + 1) + 1

    def most_facts(self, length: int) -> int:
        """The most facts (at most max_facts) a document of `length` tokens holds (0: none)."""
        n = 0
        while n < self.max_facts and self.shortest(n + 1) <= length:
            n += 1
        return n

    def document(self, n_facts: int, length: int, rng: np.random.Generator) -> FactsDocument:
        """A document of exactly `length` tokens with `n_facts` facts, drawn from `rng`.

        Raises:
          ValueError: n_facts out of [1, n_keys], or length below `shortest(n_facts)`.
        """
        if not 1 <= n_facts <= self.n_keys:
            raise ValueError(f"n_facts must be in [1, {self.n_keys}], got {n_facts}")
        if length < self.shortest(n_facts):
            raise ValueError(
                f"length={length} cannot hold {n_facts} facts and their questions "
                f"(at least {self.shortest(n_facts)} tokens)"
            )
        key_ids = rng.choice(self.n_keys, size=n_facts, replace=False)
        keys = [_spell(int(i), KEY_ALPHABET, self.key_tokens) for i in key_ids]
        values = [_draw(rng, VALUE_ALPHABET, self.value_tokens) for _ in keys]
        n_questions = min(self.n_questions, n_facts)
        asked = rng.choice(n_facts, size=n_questions, replace=False)
        filler = length - self.shortest(n_facts)
        # Filler split into n_facts + 1 runs (before, between and after the facts): uniform
        # over compositions, from sorted cut points.
        cuts = np.sort(rng.integers(0, filler + 1, size=n_facts))
        runs = np.diff(np.concatenate([[0], cuts, [filler]]))
        tokens: list[int] = []
        value_starts = []
        for key, value, run in zip(keys, values, runs[:-1], strict=True):
            tokens += _draw(rng, FILLER_ALPHABET, int(run))
            value_starts.append(len(tokens) + len(key))
            tokens += key + value
        tokens += _draw(rng, FILLER_ALPHABET, int(runs[-1]))
        questions = []
        for fact in asked:
            key, value = keys[fact], values[fact]
            answer_start = len(tokens) + 1 + len(key)
            questions.append(Question(tuple(key), tuple(value), answer_start, value_starts[fact]))
            tokens += [QUESTION_MARK, *key, *value]
        tokens.append(END_OF_DOCUMENT)
        return FactsDocument(tokens, n_facts, tuple(questions))

    def eval_document(self, n_facts: int, length: int, index: int) -> FactsDocument:
        """Evaluation document `index` of a (n_facts, length) cell: its own random stream
        (seed, n_facts, length, index), disjoint from every training window's."""
        rng = np.random.default_rng([self.seed, 1, n_facts, length, index])
        return self.document(n_facts, length, rng)

    def window(self, index: int) -> list[FactsDocument]:
        """Training window `index`: its documents, `ctx` tokens together."""
        if index < 0:
            raise IndexError(f"window index must be >= 0, got {index}")
        rng = np.random.default_rng([self.seed, 0, index])
        documents = []
        for i in range(self.documents_per_window):
            last = i == self.documents_per_window - 1
            length = self.ctx - i * self.document_length if last else self.document_length
            n_facts = int(rng.integers(self.min_facts, self.most_facts(length) + 1))
            documents.append(self.document(n_facts, length, rng))
        return documents

    def windows(self, count: int) -> Iterator[list[int]]:
        """The tokens of windows 0 .. count - 1."""
        for index in range(count):
            yield [t for document in self.window(index) for t in document.tokens]

    def tokens(self, count: int) -> np.ndarray:
        """The flat stream of `count` windows plus a closing end-of-document token.

        Returns:
          int32 [count * ctx + 1]; `TokenWindows(stream, ctx)` reads exactly these windows.
        """
        return windows_stream(self.windows(count), count, self.ctx, END_OF_DOCUMENT)

    def write_binidx(self, prefix: str | os.PathLike, count: int) -> int:
        """Writes `tokens(count)` as a binidx pair of bytes (one item per window, the closing
        token appended to the last), for `train.py data.corpus=PREFIX data.order=sequential`.

        Returns:
          Tokens written: count * ctx + 1.
        """
        windows = self.windows(count)
        return write_windows_binidx(prefix, windows, count, END_OF_DOCUMENT, np.uint8)


def _spell(number: int, alphabet: tuple[int, ...], width: int) -> list[int]:
    """`number` written in base len(alphabet) with `width` symbols."""
    symbols = []
    for _ in range(width):
        number, digit = divmod(number, len(alphabet))
        symbols.append(alphabet[digit])
    return symbols[::-1]


def _draw(rng: np.random.Generator, alphabet: tuple[int, ...], n: int) -> list[int]:
    """`n` tokens drawn uniformly from `alphabet`."""
    return [alphabet[i] for i in rng.integers(0, len(alphabet), size=n)]
