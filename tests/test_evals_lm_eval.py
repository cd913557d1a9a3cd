"""The lm-eval adapter (`rwkvx_jax.evals.lm_eval_adapter`) on a tiny random model, offline.

Every score is checked against log-softmax of `rwkvx_jax.forward` computed here in float64 on
exactly the scored tokens. All model inputs are 32 tokens long (= max_length, the adapter's
only bucket), so the whole file compiles the model a handful of times.
"""

import json

import numpy as np
import pytest
from lm_eval.api.instance import Instance

import rwkvx_jax
from rwkvx_jax.checkpoints.official_layout import params_from_state_dict
from rwkvx_jax.checkpoints.random_weights import random_state_dict
from rwkvx_jax.config import preset
from rwkvx_jax.decoding.sampling import SamplingConfig
from rwkvx_jax.evals import lm_eval_adapter
from rwkvx_jax.evals.lm_eval_adapter import RWKVXLM, bucket_lengths
from rwkvx_jax.tokenizer import ByteTokenizer

# Two RWKV blocks and one sparse block; chunks of 8 with top-2, so 32 tokens span four chunks
# and the chunk selection is exercised.
CONFIG = preset("tiny", n_embd=64, n_rwkv_layer=2, n_attn_layer=1, chunk_size=8, top_k=2)
MAX_LENGTH = 32
BATCH = 4
TEXT = "The quick brown fox jumps over the lazy dog; pack my box with five dozen liquor jugs."
PURE_GREEDY = SamplingConfig(
    temperature=0.0, top_p=1.0, presence_penalty=0.0, frequency_penalty=0.0, stop_tokens=(0,)
)


@pytest.fixture(scope="module")
def model():
    return CONFIG, params_from_state_dict(random_state_dict(CONFIG, 0), CONFIG)


@pytest.fixture(scope="module")
def lm(model):
    config, params = model
    return RWKVXLM(config=config, params=params, batch_size=BATCH, max_length=MAX_LENGTH)


def instance(kind: str, *args) -> Instance:
    return Instance(request_type=kind, doc={}, arguments=tuple(args), idx=0)


def byte_ids(text: str) -> list[int]:
    return list(text.encode("utf-8"))


def log_probs(model, inputs: list[int]) -> np.ndarray:
    """float64 log-softmax [T, V] of the model's logits on exactly `inputs`."""
    config, params = model
    logits = np.asarray(rwkvx_jax.forward(config, params, np.array([inputs])), np.float64)[0]
    shifted = logits - logits.max(-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))


def expected_score(model, inputs: list[int], scored: list[int]) -> tuple[float, bool]:
    """(sum of log p of `scored`, all greedy), `scored` being the last targets of `inputs`."""
    logprobs = log_probs(model, inputs)
    positions = range(len(inputs) - len(scored), len(inputs))
    total = sum(logprobs[p, t] for p, t in zip(positions, scored, strict=True))
    greedy = all(logprobs[p].argmax() == t for p, t in zip(positions, scored, strict=True))
    return float(total), bool(greedy)


def greedy_continuation(model, context: list[int], n: int) -> list[int]:
    """n argmax tokens after `context`, from forward over the sequence right-padded to 32
    (the model is causal, so padding after the last real token does not change its logits)."""
    tokens = list(context)
    for _ in range(n):
        padded = tokens + [0] * (MAX_LENGTH - len(tokens))
        tokens.append(int(log_probs(model, padded)[len(tokens) - 1].argmax()))
    return tokens[len(context) :]


def test_bucket_lengths():
    assert bucket_lengths(32) == (32,)
    assert bucket_lengths(64) == (32, 64)
    assert bucket_lengths(100) == (32, 64, 100)
    assert bucket_lengths(16) == (16,)


def test_loglikelihood_matches_forward(model, lm):
    text = TEXT[:33]
    cases = [(text[:split], text[split:]) for split in (1, 9, 20, 32)]
    cases.append(("", text[:32]))  # empty context: read from the end-of-document token
    cases.append((TEXT[:45], TEXT[45:50]))  # too long: the context loses its start
    cases.append(("The quick brown fox jumps over ", "the"))  # the space moves to "the"
    results = lm.loglikelihood([instance("loglikelihood", c, k) for c, k in cases])

    for (context, continuation), (logprob, is_greedy) in zip(cases, results, strict=True):
        tokens = ([0] if not context else []) + byte_ids(context + continuation)
        tokens = tokens[-(MAX_LENGTH + 1) :]
        # The context's trailing whitespace is scored as the continuation's first token.
        scored = byte_ids(context[len(context.rstrip()) :] + continuation)
        want, want_greedy = expected_score(model, tokens[:-1], scored)
        np.testing.assert_allclose(logprob, want, rtol=1e-5, atol=1e-5, err_msg=repr(context))
        assert is_greedy == want_greedy
    assert lm.encode_pair("a b ", "c") == (byte_ids("a b"), byte_ids(" c"))


def test_is_greedy(model, lm):
    # Find a context whose two greedy bytes are printable ASCII, so they can be written as text.
    rng = np.random.default_rng(0)
    for _ in range(100):
        context = "".join(chr(c) for c in rng.integers(97, 123, size=12))
        greedy = greedy_continuation(model, byte_ids(context), 2)
        if all(32 <= t < 127 for t in greedy) and greedy[0] != 32:
            break
    else:
        pytest.fail("no context with a printable greedy continuation among 100 tries")
    other = 33 if greedy[1] != 33 else 34
    requests = [
        instance("loglikelihood", context, bytes(greedy).decode()),
        instance("loglikelihood", context, bytes(greedy[:1] + [other]).decode()),
        instance("loglikelihood", context, bytes(greedy[:1]).decode()),
    ]
    assert [is_greedy for _, is_greedy in lm.loglikelihood(requests)] == [True, False, True]


def test_batching_and_padding_do_not_change_scores(lm):
    cases = [(TEXT[:n], TEXT[n : n + k]) for n, k in ((2, 1), (30, 3), (5, 20), (11, 7), (1, 31))]
    cases += [("", "x"), (TEXT[:60], TEXT[60:64])]
    together = lm.loglikelihood([instance("loglikelihood", c, k) for c, k in cases])
    alone = [lm.loglikelihood([instance("loglikelihood", c, k)])[0] for c, k in cases]
    np.testing.assert_allclose(
        [s for s, _ in together], [s for s, _ in alone], rtol=1e-5, atol=1e-5
    )
    assert [g for _, g in together] == [g for _, g in alone]


def test_loglikelihood_rolling(model, lm):
    short, long = TEXT[:32], TEXT[:80]
    got_short, got_long, got_empty = lm.loglikelihood_rolling(
        [instance("loglikelihood_rolling", t) for t in (short, long, "")]
    )
    # Up to max_length tokens: the whole text, read from the end-of-document token.
    want_short, _ = expected_score(model, [0] + byte_ids(short)[:-1], byte_ids(short))
    np.testing.assert_allclose(got_short, want_short, rtol=1e-5, atol=1e-5)
    # 80 tokens: each token scored once, from the longest context within 32 tokens that
    # lm-eval's disjoint windows allow: [0, 32) after the start, [32, 64), then [64, 80)
    # after 16 tokens of the previous window.
    t = byte_ids(long)
    windows = [([0] + t[:31], t[:32]), (t[31:63], t[32:64]), (t[47:79], t[64:80])]
    want_long = sum(expected_score(model, inputs, scored)[0] for inputs, scored in windows)
    np.testing.assert_allclose(got_long, want_long, rtol=1e-5, atol=1e-5)
    assert got_empty == 0.0


def test_generate_until(model, lm):
    contexts = ["Once upon a time", "abc", "The lazy dog said", "x" * 29]
    n_new = 6
    requests = [
        instance("generate_until", c, {"until": [], "max_gen_toks": n_new}) for c in contexts
    ]
    texts = lm.generate_until(requests)

    # The same continuations from the Decoder directly, and from argmax over forward.
    prompts = [byte_ids(c)[-(MAX_LENGTH - n_new) :] for c in contexts]
    steps = np.stack(list(lm.decoder.generate(prompts, PURE_GREEDY, n_new)), axis=1)
    tokenizer = ByteTokenizer()
    for row, (prompt, text) in enumerate(zip(prompts, texts, strict=True)):
        tokens = steps[row][steps[row] >= 0].tolist()
        assert text == tokenizer.decode(tokens)
        chain = greedy_continuation(model, prompt, n_new)
        assert tokens == (chain[: chain.index(0)] if 0 in chain else chain)

    # `until` strings: the text ends just before the first occurrence of any of them.
    stops = [[text[2:4] or "never"] for text in texts[:3]] + [["never", texts[3][4:] or "x"]]
    cut = lm.generate_until(
        [
            instance("generate_until", c, {"until": s, "max_gen_toks": n_new})
            for c, s in zip(contexts, stops, strict=True)
        ]
    )
    for text, stop, got in zip(texts, stops, cut, strict=True):
        found = [text.find(s) for s in stop if s in text]
        assert got == (text[: min(found)] if found else text)


def test_generation_settings(lm):
    settings = lm.generation_settings({"until": "\n\n", "max_gen_toks": 5})
    assert settings.until == ("\n\n",) and settings.max_gen_toks == 5
    assert settings.sampling == PURE_GREEDY
    sampled = lm.generation_settings({"do_sample": True, "temperature": 0.7, "top_p": 0.9})
    assert (sampled.sampling.temperature, sampled.sampling.top_p) == (0.7, 0.9)
    assert sampled.sampling.presence_penalty == 0.0
    assert lm.generation_settings({"temperature": 0.5}).sampling.temperature == 0.5
    assert lm.generation_settings({"do_sample": False, "temperature": 0.5}).sampling == PURE_GREEDY
    assert lm.generation_settings({})[:2] == ((), MAX_LENGTH // 2)
    with pytest.raises(ValueError, match="repetition_penalty"):
        lm.generation_settings({"repetition_penalty": 1.1})
    with pytest.raises(ValueError, match="max_gen_toks=32"):
        lm.generation_settings({"max_gen_toks": 32})
    with pytest.raises(ValueError, match="temperature > 0"):
        lm.generation_settings({"do_sample": True, "temperature": 0.0})


def test_model_arguments(tmp_path, model, lm):
    from lm_eval.api.registry import get_model

    from rwkvx_jax.checkpoints.directory import save_params

    assert get_model("rwkvx") is RWKVXLM
    config, params = model
    save_params(tmp_path / "ckpt", config, params)
    loaded = get_model("rwkvx").create_from_arg_string(
        f"checkpoint={tmp_path / 'ckpt'},max_length=32,dtype=float32",
        {"batch_size": "4", "max_batch_size": None, "device": "cpu"},
    )
    assert (loaded.config, loaded.batch_size, loaded.max_length) == (CONFIG, 4, 32)
    request = [instance("loglikelihood", "Hello", " world")]
    assert loaded.loglikelihood(request) == lm.loglikelihood(request)

    demo = RWKVXLM(demo="true", dtype="bfloat16", max_length="64")
    assert (demo.config, demo.max_length, demo.buckets) == (
        preset("tiny", dtype="bfloat16"),
        64,
        (32, 64),
    )

    with pytest.raises(ValueError, match="exactly one model"):
        RWKVXLM()
    with pytest.raises(ValueError, match="exactly one model"):
        RWKVXLM(checkpoint=str(tmp_path / "ckpt"), demo="true")
    with pytest.raises(ValueError, match="batch_size must be an int"):
        RWKVXLM(config=config, params=params, batch_size="auto")
    with pytest.raises(ValueError, match="max_length=32"):
        lm.loglikelihood([instance("loglikelihood", "a", "b" * 33)])


def test_main_delegates_to_lm_eval_cli(capsys):
    with pytest.raises(SystemExit) as exit_info:
        lm_eval_adapter.main(["run", "--help"])
    assert exit_info.value.code == 0
    assert "--model_args" in capsys.readouterr().out


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def test_simple_evaluate_end_to_end(tmp_path, lm):
    """lm-eval's own evaluator on three tasks defined here, read from local jsonl files."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    questions = _write_jsonl(
        tmp_path / "questions.jsonl",
        [
            {"question": "1 + 1 =", "choices": ["2", "3", "11"], "answer": 0},
            {"question": "The sky is", "choices": ["blue", "green"], "answer": 0},
            {"question": "Cats say", "choices": ["woof", "meow"], "answer": 1},
        ],
    )
    texts = _write_jsonl(tmp_path / "texts.jsonl", [{"text": TEXT[:50]}, {"text": TEXT[10:40]}])

    def task(name, data_file, **fields):
        data = {"data_files": {"test": data_file}, "cache_dir": str(tmp_path / "hf")}
        return dict(
            task=name, dataset_path="json", dataset_kwargs=data, test_split="test", **fields
        )

    tasks = [
        task(
            "tiny_choice", questions, output_type="multiple_choice", doc_to_text="{{question}}",
            doc_to_choice="{{choices}}", doc_to_target="{{answer}}",
            metric_list=[{"metric": "acc"}],
        ),
        task(
            "tiny_generate", questions, output_type="generate_until", doc_to_text="{{question}}",
            doc_to_target="{{choices[answer]}}", metric_list=[{"metric": "exact_match"}],
            generation_kwargs={"until": ["\n"], "max_gen_toks": 4},
        ),
        task(
            "tiny_perplexity", texts, output_type="loglikelihood_rolling", doc_to_text="",
            doc_to_target="{{text}}", metric_list=[{"metric": "word_perplexity"}],
        ),
    ]  # fmt: skip
    out = lm_eval.simple_evaluate(
        model=lm,
        tasks=tasks,
        task_manager=TaskManager(include_defaults=False),
        bootstrap_iters=0,
        log_samples=True,
    )
    samples, results = out["samples"], out["results"]

    # Each response is what the adapter returns for the same request.
    choice = samples["tiny_choice"]
    for sample in choice:
        scores = lm.loglikelihood([instance("loglikelihood", *a) for a in sample["arguments"]])
        responses = [response for (response,) in sample["resps"]]
        assert [s for s, _ in responses] == pytest.approx([s for s, _ in scores], abs=1e-5)
        assert [g for _, g in responses] == [g for _, g in scores]
    picked = [np.argmax([s for ((s, _),) in sample["resps"]]) for sample in choice]
    accuracy = np.mean([p == sample["target"] for p, sample in zip(picked, choice, strict=True)])
    assert results["tiny_choice"]["acc,none"] == pytest.approx(accuracy)

    generated = samples["tiny_generate"]
    for sample in generated:
        ((context, gen_kwargs),) = sample["arguments"]
        ((response,),) = sample["resps"]
        assert response == lm.generate_until([instance("generate_until", context, gen_kwargs)])[0]
        assert "\n" not in response
    matches = np.mean([s["resps"][0][0].strip() == s["target"] for s in generated])
    assert results["tiny_generate"]["exact_match,none"] == pytest.approx(matches)

    rolling = samples["tiny_perplexity"]
    texts = [instance("loglikelihood_rolling", s["target"]) for s in rolling]
    got = [response for s in rolling for (response,) in s["resps"]]
    assert got == pytest.approx(lm.loglikelihood_rolling(texts), abs=1e-5)
    assert np.isfinite(results["tiny_perplexity"]["word_perplexity,none"])
