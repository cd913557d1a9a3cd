"""The many-facts eval (rwkvx_jax/evals/facts.py): scoring, attention diagnostics, the grid."""

from __future__ import annotations

import csv
import os

import jax
import numpy as np
import pytest

from rwkvx_jax.checkpoints.conversion import params_from_state_dict
from rwkvx_jax.checkpoints.random_weights import random_state_dict
from rwkvx_jax.cli import UsageError
from rwkvx_jax.config import preset
from rwkvx_jax.data.facts import FactsTask
from rwkvx_jax.evals import facts as facts_eval
from rwkvx_jax.evals.facts import FactsScorer, run_grid
from rwkvx_jax.model import RWKVX

# R S with chunks of 8 and top-k 2: at 96 tokens a query sees its own chunk and 1 of up to 11.
CONFIG = preset("tiny", n_embd=64, n_rwkv_layer=1, n_attn_layer=1, chunk_size=8, top_k=2)
TASK = FactsTask(n_questions=3, max_facts=8, value_tokens=2)


@pytest.fixture(scope="module")
def params():
    return params_from_state_dict(random_state_dict(CONFIG, seed=1), CONFIG)


@pytest.fixture(scope="module")
def documents():
    return [TASK.eval_document(6, 96, i) for i in range(2)]


def _logits(scorer, documents):
    tokens = np.array([d.tokens for d in documents], np.int32)
    chunks = np.full(tokens.shape, -1, np.int32)
    return scorer._forward(scorer.params, tokens, chunks)


def _model_logits(config, params, documents):
    tokens = np.array([d.tokens for d in documents], np.int32)
    return np.asarray(RWKVX(config).apply({"params": params}, tokens))


def _assert_close(got, want):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


def test_learned_mode_recomputes_the_models_own_attention(params, documents):
    logits, picks = _logits(FactsScorer(CONFIG, params, "learned"), documents)
    _assert_close(np.asarray(logits), _model_logits(CONFIG, params, documents))
    assert picks.shape == (1, 2, 96)


def test_dense_mode_is_the_model_with_every_chunk_selected(params, documents):
    logits, _ = _logits(FactsScorer(CONFIG, params, "dense"), documents)
    everything = CONFIG.replace(top_k=96 // CONFIG.chunk_size)
    _assert_close(np.asarray(logits), _model_logits(everything, params, documents))
    # and the sparse model differs, so the comparison can fail
    assert np.abs(np.asarray(logits) - _model_logits(CONFIG, params, documents)).max() > 1e-3


def test_zeroed_mode_is_the_model_with_attention_output_weights_zero(params, documents):
    logits, _ = _logits(FactsScorer(CONFIG, params, "zeroed"), documents)
    zeroed = jax.tree_util.tree_map(lambda x: x, params)
    zeroed["moba_0"]["att"]["output"]["kernel"] = np.zeros_like(
        params["moba_0"]["att"]["output"]["kernel"]
    )
    _assert_close(np.asarray(logits), _model_logits(CONFIG, zeroed, documents))


def test_oracle_mode_always_picks_the_answer_chunk(params, documents):
    _, learned = FactsScorer(CONFIG, params, "learned").score(documents)
    correct, oracle = FactsScorer(CONFIG, params, "oracle").score(documents)
    assert oracle.all() and len(oracle) == 6 and correct.dtype == bool
    assert not learned.all()  # random weights miss some: the measure can say no


def test_selected_measure_matches_the_selection_rule(params):
    """An answer whose fact lies in the question's own chunk counts as picked; one in an earlier
    chunk counts when the SPEC §4 top-1 candidate by q . mean(k) is that chunk."""
    document = TASK.eval_document(6, 96, 0)
    scorer = FactsScorer(CONFIG, params, "learned")
    _, selected = scorer.score([document])
    tokens = np.array([document.tokens], np.int32)
    captured = {}

    def capture(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        if type(context.module).__name__ == "TopKChunkAttention" and not kwargs:
            captured["x"] = args[0]
            captured["weights"] = context.module.variables["params"]
        return out

    import flax.linen as nn

    with nn.intercept_methods(capture):
        RWKVX(CONFIG).apply({"params": params}, tokens)
    x = np.asarray(captured["x"][0], np.float64)
    q = x @ np.asarray(captured["weights"]["receptance"]["kernel"])
    k = x @ np.asarray(captured["weights"]["key"]["kernel"])
    for question, got in zip(document.questions, selected, strict=True):
        expected = True
        for i in range(2):
            t = question.answer_start - 1 + i
            own, target = t // 8, (question.fact_value_start + i) // 8
            means = [k[j * 8 : (j + 1) * 8].mean(0) for j in range(own)]
            best = int(np.argmax([q[t] @ m for m in means])) if means else -1
            expected &= target in (own, best)
        assert got == expected


def test_exact_answer_scoring_needs_every_answer_token(documents, monkeypatch):
    scorer = FactsScorer(CONFIG, {}, "learned")
    tokens = np.array([d.tokens for d in documents], np.int32)
    # a perfect next-token predictor, then one that gets one answer's last digit wrong
    perfect = np.eye(256, dtype=np.float32)[np.roll(tokens, -1, axis=1)]
    wrong = perfect.copy()
    question = documents[1].questions[2]
    t = question.answer_start  # predicts the answer's second token
    wrong[1, t] = np.eye(256)[(tokens[1, t + 1] + 1) % 256]
    for logits, expected in ((perfect, [True] * 6), (wrong, [True] * 5 + [False])):
        picks = np.zeros((1, *tokens.shape), bool)
        monkeypatch.setattr(scorer, "_forward", lambda *_, lg=logits, p=picks: (lg, p))
        correct, _ = scorer.score(documents)
        assert correct.tolist() == expected


def test_modes_need_sparse_blocks_and_a_known_name(params):
    rwkv7 = preset("tiny-rwkv7", n_embd=64)
    with pytest.raises(UsageError, match="needs sparse-attention blocks"):
        FactsScorer(rwkv7, {}, "dense")
    with pytest.raises(UsageError, match="expected one of learned"):
        FactsScorer(CONFIG, params, "sparse")


def test_grid_writes_csv_heatmap_and_resumes(params, tmp_path):
    out = str(tmp_path / "eval")
    os.makedirs(out)
    logged = []
    rows = run_grid(
        CONFIG, params, out, facts=[2, 40], lengths=[64, 96], modes=["learned", "zeroed"],
        documents=2, batch=2, task=TASK, model_name="random", log=logged.append,
    )  # fmt: skip
    # 40 facts fit neither length: only the 2-fact cells exist.
    assert [(r.facts, r.length, r.mode) for r in rows] == [
        (2, 64, "learned"), (2, 96, "learned"), (2, 64, "zeroed"), (2, 96, "zeroed"),
    ]  # fmt: skip
    assert all(r.questions == 4 for r in rows)
    with open(os.path.join(out, "facts.csv")) as f:
        assert [row["mode"] for row in csv.DictReader(f)] == ["learned"] * 2 + ["zeroed"] * 2
    assert os.path.getsize(os.path.join(out, "heatmap_zeroed.png")) > 1000
    logged.clear()
    again = run_grid(
        CONFIG, params, out, facts=[2], lengths=[64, 96], modes=["learned", "zeroed"],
        documents=2, batch=2, task=TASK, model_name="random", log=logged.append,
    )  # fmt: skip
    assert again == rows and logged == []
    with pytest.raises(UsageError, match="other settings"):
        run_grid(CONFIG, params, out, facts=[2], lengths=[64], documents=3, task=TASK)


def test_command_line_on_the_demo_model(tmp_path, capsys):
    out = str(tmp_path / "cli")
    status = facts_eval.main(
        ["--demo", "--facts", "4", "--lengths", "64", "--documents", "1", "--questions", "2",
         "--attention", "learned,oracle", "--out", out]
    )  # fmt: skip
    assert status == 0
    assert "results:" in capsys.readouterr().out
    with open(os.path.join(out, "facts.csv")) as f:
        assert [row["mode"] for row in csv.DictReader(f)] == ["learned", "oracle"]
    assert facts_eval.main(["--demo", "--facts", "x", "--lengths", "64", "--out", out]) == 2
