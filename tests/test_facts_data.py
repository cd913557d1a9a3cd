"""The many-facts task generator (rwkvx_jax/data/facts.py)."""

from __future__ import annotations

import numpy as np
import pytest

from rwkvx_jax.data import BinIdxTokens, TokenWindows
from rwkvx_jax.data.facts import (
    END_OF_DOCUMENT,
    FILLER_ALPHABET,
    KEY_ALPHABET,
    QUESTION_MARK,
    VALUE_ALPHABET,
    FactsTask,
)


def _split_questions(tokens):
    """(facts region, [question tokens]) of a document, split at its "?" marks."""
    marks = [i for i, t in enumerate(tokens) if t == QUESTION_MARK]
    bounds = [*marks, len(tokens) - 1]
    return tokens[: marks[0]], [tokens[a + 1 : b] for a, b in zip(bounds, bounds[1:], strict=False)]


@pytest.mark.parametrize(("key_tokens", "value_tokens"), [(1, 1), (2, 3)])
def test_document_layout_positions_and_answers(key_tokens, value_tokens):
    task = FactsTask(key_tokens=key_tokens, value_tokens=value_tokens, n_questions=5)
    document = task.document(12, 300, np.random.default_rng(3))
    tokens = document.tokens
    assert len(tokens) == 300 and tokens[-1] == END_OF_DOCUMENT
    assert END_OF_DOCUMENT not in tokens[:-1]
    facts_region, questions = _split_questions(tokens)
    # Facts: a key of key bytes then a value of lowercase letters, behind uppercase filler.
    facts = [t for t in facts_region if t not in FILLER_ALPHABET]
    assert len(facts) == 12 * (key_tokens + value_tokens)
    pairs = [facts[i : i + task.fact_tokens] for i in range(0, len(facts), task.fact_tokens)]
    lookup = {tuple(p[:key_tokens]): tuple(p[key_tokens:]) for p in pairs}
    assert len(lookup) == 12  # keys all different
    assert all(t in KEY_ALPHABET for key in lookup for t in key)
    assert all(t in VALUE_ALPHABET for value in lookup.values() for t in value)
    assert len(document.questions) == len(questions) == 5
    assert len({q.key for q in document.questions}) == 5
    for question, written in zip(document.questions, questions, strict=True):
        assert tuple(written) == question.key + question.value
        assert question.value == lookup[question.key]
        answer = tokens[question.answer_start : question.answer_start + value_tokens]
        in_fact = tokens[question.fact_value_start : question.fact_value_start + value_tokens]
        assert tuple(answer) == tuple(in_fact) == question.value
        # The answer follows "?" + key; the fact's value follows its key at once.
        start = question.answer_start - key_tokens - 1
        assert tokens[start] == QUESTION_MARK
        assert tuple(tokens[start + 1 : question.answer_start]) == question.key
        key_start = question.fact_value_start - key_tokens
        assert tuple(tokens[key_start : question.fact_value_start]) == question.key
    mask = document.answer_mask()
    assert mask.sum() == 5 * value_tokens and all(mask[q.answer_start] for q in document.questions)


def test_filler_is_uppercase_only_and_documents_without_filler_fit_exactly():
    task = FactsTask(n_questions=4)
    tight = task.document(10, task.shortest(10), np.random.default_rng(0))
    assert not any(t in FILLER_ALPHABET for t in tight.tokens)
    loose = task.document(10, 1000, np.random.default_rng(0))
    filler = [t for t in loose.tokens if t in FILLER_ALPHABET]
    assert len(filler) == 1000 - task.shortest(10)


def test_windows_are_deterministic_by_seed_and_index():
    task = FactsTask(ctx=128, max_facts=40, seed=1)
    again = FactsTask(ctx=128, max_facts=40, seed=1)
    other = FactsTask(ctx=128, max_facts=40, seed=2)
    assert task.window(7) == again.window(7)
    assert task.window(7) != task.window(8)
    assert task.window(7) != other.window(7)
    assert len(task.window(7)) == 1 and len(task.window(7)[0].tokens) == 128
    counts = {task.window(i)[0].n_facts for i in range(40)}
    assert min(counts) >= 1 and max(counts) <= task.most_facts(128) <= 40 and len(counts) > 10
    assert task.eval_document(5, 128, 0) == again.eval_document(5, 128, 0)
    assert task.eval_document(5, 128, 0).tokens != task.eval_document(5, 256, 1).tokens


def test_windows_of_several_documents():
    task = FactsTask(ctx=130, documents_per_window=4, n_questions=16, max_facts=30, seed=0)
    documents = task.window(3)
    assert [len(d.tokens) for d in documents] == [32, 32, 32, 34]
    assert all(1 <= d.n_facts <= task.most_facts(32) for d in documents)
    assert next(task.windows(4)) == [t for d in task.window(0) for t in d.tokens]
    with pytest.raises(ValueError, match="4 document.s. of 2 tokens cannot hold 1"):
        FactsTask(ctx=8, documents_per_window=4)


def test_most_facts_is_the_largest_count_that_fits():
    task = FactsTask(n_questions=16, key_tokens=2, max_facts=500)
    for length in (40, 100, 1024):
        n = task.most_facts(length)
        assert task.shortest(n) <= length < task.shortest(n + 1)


def test_binidx_stream_reads_back_window_by_window(tmp_path):
    task = FactsTask(ctx=128, max_facts=10, seed=4)
    written = task.write_binidx(tmp_path / "facts", 5)
    assert written == 5 * 128 + 1
    stream = np.asarray(BinIdxTokens(str(tmp_path / "facts"))[:])
    np.testing.assert_array_equal(stream, task.tokens(5))
    windows = TokenWindows(stream, 128)
    for index in range(5):
        np.testing.assert_array_equal(windows.window(index)[:128], task.window(index)[0].tokens)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"key_tokens": 0}, "key_tokens"),
        ({"min_facts": 5, "max_facts": 4}, "max_facts=4 is below"),
        ({"key_tokens": 1, "max_facts": 129}, "exceeds the 128 distinct keys"),
        ({"ctx": 10, "min_facts": 3}, "ctx=10 in 1 document.s. of 10 tokens cannot hold 3"),
    ],
)
def test_bad_settings_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        FactsTask(**kwargs)


def test_document_that_cannot_fit_is_refused():
    task = FactsTask()
    with pytest.raises(ValueError, match="cannot hold 8 facts"):
        task.document(8, task.shortest(8) - 1, np.random.default_rng(0))
    with pytest.raises(IndexError):
        task.window(-1)
