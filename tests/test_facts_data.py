"""The many-facts task generator (rwkvx_jax/data/facts.py)."""

from __future__ import annotations

import numpy as np
import pytest

from rwkvx_jax.data import BinIdxTokens, TokenWindows
from rwkvx_jax.data.facts import END_OF_DOCUMENT, FactsTask


def _text(tokens) -> str:
    return bytes(tokens).decode("ascii")


def test_document_layout_positions_and_answers():
    task = FactsTask(n_questions=5)
    document = task.document(12, 300, np.random.default_rng(3))
    tokens = document.tokens
    assert len(tokens) == 300 and tokens[-1] == END_OF_DOCUMENT
    assert END_OF_DOCUMENT not in tokens[:-1]
    text = _text(tokens[:-1])
    facts_region, *questions = text.split("?")
    facts = [f for f in facts_region.split(";") if f]
    # 12 facts "ab:42" each behind a run of uppercase filler; the keys are all different.
    pairs = [fact.lstrip("ABCDEFGHIJKLMNOPQRSTUVWXYZ") for fact in facts[:12]]
    keys = [pair.split(":")[0] for pair in pairs]
    assert len(set(keys)) == 12 and all(len(k) == 2 and k.islower() for k in keys)
    lookup = dict(pair.split(":") for pair in pairs)
    assert len(document.questions) == len(questions) == 5
    asked = [q.key for q in document.questions]
    assert len(set(asked)) == 5
    for question, written in zip(document.questions, questions, strict=True):
        assert written == f"{question.key}:{question.value};"
        assert question.value == lookup[question.key]
        answer = tokens[question.answer_start : question.answer_start + 2]
        in_fact = tokens[question.fact_value_start : question.fact_value_start + 2]
        assert _text(answer) == _text(in_fact) == question.value
        # The scored query (the question's colon) sits right before the answer; the fact's key
        # sits right before its value.
        assert _text(tokens[question.answer_start - 4 : question.answer_start]) == (
            f"?{question.key}:"
        )
        assert _text(tokens[question.fact_value_start - 3 : question.fact_value_start]) == (
            f"{question.key}:"
        )
    mask = document.answer_mask()
    assert mask.sum() == 10 and all(
        mask[q.answer_start] and mask[q.answer_start + 1] for q in document.questions
    )


def test_filler_is_uppercase_only_and_documents_without_filler_fit_exactly():
    task = FactsTask(n_questions=4)
    tight = task.document(10, task.shortest(10), np.random.default_rng(0))
    assert not any(chr(t).isupper() for t in tight.tokens)
    loose = task.document(10, 1000, np.random.default_rng(0))
    filler = [chr(t) for t in loose.tokens if chr(t).isupper()]
    assert len(filler) == 1000 - task.shortest(10)


def test_windows_are_deterministic_by_seed_and_index():
    task = FactsTask(ctx=256, max_facts=40, seed=1)
    again = FactsTask(ctx=256, max_facts=40, seed=1)
    other = FactsTask(ctx=256, max_facts=40, seed=2)
    assert task.window(7) == again.window(7)
    assert task.window(7).tokens != task.window(8).tokens
    assert task.window(7).tokens != other.window(7).tokens
    counts = {task.window(i).n_facts for i in range(40)}
    assert min(counts) >= 1 and max(counts) <= task.most_facts(256) <= 40 and len(counts) > 10
    assert task.eval_document(5, 256, 0) == again.eval_document(5, 256, 0)
    assert task.eval_document(5, 256, 0).tokens != task.eval_document(5, 256, 1).tokens


def test_most_facts_is_the_largest_count_that_fits():
    task = FactsTask(n_questions=16, max_facts=500)
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
        np.testing.assert_array_equal(windows.window(index)[:128], task.window(index).tokens)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"key_letters": 0}, "key_letters"),
        ({"min_facts": 5, "max_facts": 4}, "max_facts=4 is below"),
        ({"key_letters": 1, "max_facts": 27}, "exceeds the 26 distinct keys"),
        ({"ctx": 20, "min_facts": 3}, "ctx=20 cannot hold 3"),
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
