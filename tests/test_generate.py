"""Decode-state files (`state_io`) and text generation (`generate_text`, the generate CLI)."""

import dataclasses
import json
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import rwkvx_jax
import rwkvx_jax.decoding.text as text_module
import rwkvx_jax.generate as generate_cli
from rwkvx_jax.checkpoints.directory import save_params
from rwkvx_jax.checkpoints.random_weights import demo_model
from rwkvx_jax.cli import EXIT_USAGE
from rwkvx_jax.config import preset
from rwkvx_jax.decoding.decoder import DecodeConfig
from rwkvx_jax.decoding.sampling import SamplingConfig
from rwkvx_jax.decoding.state_files import (
    StateFileError,
    StateMismatchError,
    load_next_logits,
    load_state,
    read_state_metadata,
    save_state,
)
from rwkvx_jax.decoding.text import TextGenerator
from rwkvx_jax.generate import main
from rwkvx_jax.model import init_decode_state

TINY = preset("tiny")  # byte vocabulary, chunk 16, two sparse blocks
# Greedy without penalties; bytes >= 128 banned so that every output is ASCII and re-encodes to
# the same tokens; stop at end-of-document (0). The CLI flags below give the same config, so
# in-process CLI runs reuse the compiled step.
GREEDY = SamplingConfig(
    temperature=0.0,
    presence_penalty=0.0,
    frequency_penalty=0.0,
    banned_tokens=tuple(range(128, 256)),
    stop_tokens=(0,),
)
CLI_FLAGS = [
    "--temperature", "0", "--presence-penalty", "0", "--frequency-penalty", "0",
    "--prefill-chunk", "16", "--ban", *map(str, range(128, 256)),
]  # fmt: skip
PROMPTS = ["The quick brown fox jumps over", "Once upon a time, in a"]
QUESTIONS = [" the lazy dog. Then", " land far away"]
WHOLE = [p + q for p, q in zip(PROMPTS, QUESTIONS, strict=True)]
N_NEW = 8
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module", autouse=True)
def quick_compiles():
    """XLA's optimisation passes are most of a CPU compile, and no result here depends on them."""
    before = jax.config.read("jax_disable_most_optimizations")
    jax.config.update("jax_disable_most_optimizations", True)
    yield
    jax.config.update("jax_disable_most_optimizations", before)


@pytest.fixture(scope="module")
def tiny_params():
    config, params = demo_model()
    assert config == TINY
    return params


@pytest.fixture(scope="module")
def generator(tiny_params):
    return TextGenerator(TINY, tiny_params, DecodeConfig(prefill_chunk=TINY.chunk_size))


def _random_state(config, batch=2, cache_size=64, flat_cache=False, seed=0):
    """A state of the right shapes filled with random bits (NaNs and infs included)."""
    rng = np.random.default_rng(seed)
    template = init_decode_state(config, batch, cache_size, flat_cache=flat_cache)

    def fill(leaf):
        raw = rng.integers(0, 256, size=leaf.size * leaf.dtype.itemsize, dtype=np.uint8)
        return jnp.asarray(raw.view(leaf.dtype).reshape(leaf.shape))

    return jax.tree.map(fill, template)


def _bits(leaf):
    host = np.asarray(leaf)
    return host.dtype, host.shape, host.view(np.dtype(f"uint{8 * host.dtype.itemsize}"))


@pytest.mark.parametrize(
    "config, flat_cache",
    [
        (TINY, False),
        (TINY.replace(dtype="bfloat16"), False),
        (TINY, True),
        (preset("tiny-rwkv7"), False),
    ],
    ids=["float32", "bfloat16", "official-flat-cache", "rwkv7-no-cache"],
)
def test_state_round_trip_is_bit_exact(tmp_path, config, flat_cache):
    state = _random_state(config, flat_cache=flat_cache)
    path = tmp_path / "state.npz"
    save_state(path, config, state, extra={"note": "hi"})
    loaded = load_state(path, config)
    assert jax.tree.structure(loaded) == jax.tree.structure(state)
    for got, want in zip(jax.tree.leaves(loaded), jax.tree.leaves(state), strict=True):
        got_dtype, got_shape, got_bits = _bits(got)
        want_dtype, want_shape, want_bits = _bits(want)
        assert (got_dtype, got_shape) == (want_dtype, want_shape)
        np.testing.assert_array_equal(got_bits, want_bits)
    metadata = read_state_metadata(path)
    assert metadata["shape_hash"] == config.shape_hash()
    assert metadata["batch"] == 2 and metadata["extra"] == {"note": "hi"}
    assert metadata["cache_size"] == (None if config.n_attn_layer == 0 else 64)
    assert metadata["config"] == config.to_dict()
    assert os.listdir(tmp_path) == ["state.npz"]  # no temporary left behind


def test_failed_save_keeps_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "state.npz"
    save_state(path, TINY, _random_state(TINY, seed=1))
    before = path.read_bytes()

    def disk_full(file, **arrays):
        file.write(b"PK\x03\x04 partial")
        raise OSError(28, "No space left on device")

    with monkeypatch.context() as patch:
        patch.setattr(np, "savez", disk_full)
        with pytest.raises(OSError, match="No space"):
            save_state(path, TINY, _random_state(TINY, seed=2))
    with pytest.raises(TypeError, match="JSON"):
        save_state(path, TINY, _random_state(TINY, seed=2), extra={"bad": object()})
    with pytest.raises(StateMismatchError, match="leaf"):
        save_state(path, preset("tiny", n_embd=192), _random_state(TINY))
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["state.npz"]


def test_state_of_another_model_is_refused(tmp_path):
    path = tmp_path / "state.npz"
    save_state(path, TINY, _random_state(TINY))
    wider = preset("tiny", n_embd=192)
    with pytest.raises(StateMismatchError) as err:
        load_state(path, wider)
    message = str(err.value)
    assert TINY.shape_hash() in message and wider.shape_hash() in message
    assert "n_embd: 128 (state) vs 192 (model)" in message and str(path) in message
    with pytest.raises(StateMismatchError, match="float32.*bfloat16"):
        load_state(path, TINY.replace(dtype="bfloat16"))


def test_damaged_or_foreign_files_are_refused(tmp_path):
    good = tmp_path / "state.npz"
    save_state(good, TINY, _random_state(TINY))
    truncated = tmp_path / "truncated.npz"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    text = tmp_path / "notes.txt"
    text.write_text("hello\n")
    foreign = tmp_path / "foreign.npz"
    np.savez(foreign, weights=np.zeros(3))
    other_format = tmp_path / "other.npz"
    blob = json.dumps({"format": "something-else", "version": 1}).encode()
    np.savez(other_format, __metadata__=np.frombuffer(blob, np.uint8))
    cases = {
        truncated: "not a readable",
        text: "not a decode-state file",
        foreign: "no __metadata__",
        other_format: "format 'something-else'",
        tmp_path / "missing.npz": "no such state file",
    }
    for path, reason in cases.items():
        with pytest.raises(StateFileError, match=reason) as err:
            load_state(path, TINY)
        assert str(path) in str(err.value)
    with pytest.raises(StateFileError, match="not a readable"):
        read_state_metadata(truncated)


@pytest.fixture(scope="module")
def uninterrupted(generator):
    """Greedy continuations of PROMPTS + QUESTIONS read in one go: (texts, result)."""
    result = {}
    texts = generator.generate(WHOLE, GREEDY, N_NEW, result=result)
    return texts, result


def test_decoding_continues_identically_after_restore(tmp_path, generator, uninterrupted):
    _, state = generator.decoder.prefill([generator.tokenizer.encode(p) for p in PROMPTS])
    path = tmp_path / "context.npz"
    save_state(path, TINY, state)
    restored = {}
    texts = generator.generate(
        QUESTIONS, GREEDY, N_NEW, state=load_state(path, TINY), result=restored
    )
    assert restored["tokens"] == uninterrupted[1]["tokens"] and texts == uninterrupted[0]
    n_read = [len(w) + len(t) for w, t in zip(WHOLE, restored["tokens"], strict=True)]
    assert np.asarray(restored["state"].lengths).tolist() == n_read


def test_one_saved_sequence_is_shared_by_a_batch(tmp_path, generator):
    context = [generator.tokenizer.encode(PROMPTS[0])] * 2
    _, pair = generator.decoder.prefill(context)
    path = tmp_path / "one.npz"
    save_state(path, TINY, jax.tree.map(lambda leaf: leaf[:1], pair))
    shared = generator.generate(QUESTIONS, GREEDY, 4, state=load_state(path, TINY))
    assert shared == generator.generate(QUESTIONS, GREEDY, 4, state=pair)
    with pytest.raises(ValueError, match="holds 3 sequences but 2 prompts"):
        generator.generate(QUESTIONS, GREEDY, 4, state=_random_state(TINY, batch=3))


def test_greedy_generation_is_argmax_of_forward(generator, tiny_params, uninterrupted):
    prompts = [generator.tokenizer.encode(w) for w in WHOLE]
    generated = uninterrupted[1]["tokens"]
    assert all(generated) and uninterrupted[0] == [bytes(t).decode() for t in generated]
    rows = [p + t for p, t in zip(prompts, generated, strict=True)]
    width = max(map(len, rows))
    tokens = np.array([row + [0] * (width - len(row)) for row in rows])  # right padding
    logits = np.asarray(rwkvx_jax.forward(TINY, tiny_params, tokens))
    for row, (prompt, new) in enumerate(zip(prompts, generated, strict=True)):
        steps = logits[row, len(prompt) - 1 : len(prompt) + len(new) - 1]
        assert steps[:, :128].argmax(-1).tolist() == new  # bytes >= 128 are banned
        if len(new) < N_NEW:  # stopped early: the next token was end-of-document
            assert logits[row, len(prompt) + len(new) - 1, :128].argmax() == 0


# --- the command line ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cli(tmp_path_factory):
    """Runs `python -m rwkvx_jax.generate`; its runs share one compilation cache."""
    cache = tmp_path_factory.mktemp("jax-cache")
    env = dict(os.environ)
    env.update(
        JAX_PLATFORMS="cpu",
        JAX_COMPILATION_CACHE_DIR=str(cache),
        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
        JAX_DISABLE_MOST_OPTIMIZATIONS="1",
        PYTHONIOENCODING="utf-8",
    )
    env.pop("XLA_FLAGS", None)  # one CPU device is all generation uses

    def run(*args):
        return subprocess.run(
            [sys.executable, "-m", "rwkvx_jax.generate", *map(str, args)],
            capture_output=True,
            cwd=REPO,
            env=env,
            timeout=300,
        )

    return run


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, tiny_params):
    """The demo model (`tiny`, seed 0) saved as a checkpoint directory."""
    path = tmp_path_factory.mktemp("ckpt") / "tiny"
    save_params(path, TINY, tiny_params)
    return path


def _completion(proc) -> str:
    assert proc.returncode == 0, proc.stderr.decode()
    out = proc.stdout.decode("utf-8")
    assert out.endswith("\n")
    return out[:-1]


@pytest.fixture(scope="module")
def demo_run(cli, tmp_path_factory):
    """`--demo --prompt "Hello, world"` for 6 tokens, saving the final state: (text, state)."""
    state = tmp_path_factory.mktemp("state") / "hello.npz"
    proc = cli(
        "--demo", "--prompt", "Hello, world", "--max-new-tokens", 6, "--state-out", state,
        *CLI_FLAGS,
    )  # fmt: skip
    assert b"Traceback" not in proc.stderr
    return _completion(proc), state


def test_cli_demo_prints_text(demo_run):
    text, state = demo_run
    assert 0 < len(text) <= 6 and text.isascii()
    metadata = read_state_metadata(state)
    assert metadata["extra"] == {"eviction": "distinct", "model": "demo"}
    assert metadata["shape_hash"] == TINY.shape_hash()


def test_cli_state_out_then_in_continues(cli, checkpoint, demo_run, generator):
    first, state = demo_run
    later = cli(
        "--checkpoint", checkpoint, "--state-in", state, "--prompt", " again",
        "--max-new-tokens", 6, *CLI_FLAGS,
    )  # fmt: skip
    # The same flags in one longer run (in-process, beside a second row: rows never interact).
    at_once = generator.generate(["Hello, world" + first + " again", "x"], GREEDY, 6)[0]
    assert _completion(later) == at_once


def test_cli_empty_prompt_continues_a_saved_state(cli, checkpoint, demo_run, generator):
    """`--state-out` keeps the next-token logits, so `--prompt ""` continues the saved text
    exactly as if it had been given whole."""
    first, state = demo_run
    assert load_next_logits(state, TINY).shape == (1, TINY.vocab_size)
    later = cli(
        "--checkpoint", checkpoint, "--state-in", state, "--prompt", "", "--max-new-tokens", 6,
        *CLI_FLAGS,
    )  # fmt: skip
    at_once = generator.generate(["Hello, world" + first, "x"], GREEDY, 6)[0]
    assert _completion(later) == at_once


def _until_stop(steps, row) -> list[int]:
    """A row's generated tokens, up to its first -1 (stopped)."""
    tokens = [int(step[row]) for step in steps]
    return tokens[: tokens.index(-1)] if -1 in tokens else tokens


def test_empty_prompts_continue_from_state_and_logits(generator):
    """Decoder.generate: result["logits"] are the next-token logits of result["state"], so rows
    with empty prompts continue from them exactly as one uninterrupted run. A row that stopped
    did not read its stop token: its logits are the ones the stop token came from, and it
    stops again at once."""
    free = SamplingConfig(temperature=0.0, presence_penalty=0.0, frequency_penalty=0.0)
    prompts = [generator.tokenizer.encode(p) for p in WHOLE]
    whole = list(generator.decoder.generate(prompts, free, 2 * N_NEW))
    # Row 0 stops on its third token (within the first half); row 1 may or may not.
    stopping = dataclasses.replace(free, stop_tokens=(int(whole[2][0]),))
    for sampling in (free, stopping):
        whole = list(generator.decoder.generate(prompts, sampling, 2 * N_NEW))
        first = {}
        head = list(generator.decoder.generate(prompts, sampling, N_NEW, result=first))
        state, logits = first["state"], first["logits"]
        tail = list(
            generator.decoder.generate([[], []], sampling, N_NEW, state=state, logits=logits)
        )
        for row in range(2):
            joined = _until_stop(head, row) + _until_stop(tail, row)
            assert joined == _until_stop(whole, row), (sampling.stop_tokens, row)
    assert len(_until_stop(head, 0)) < 3 and tail[0][0] == -1  # the stop path ran
    with pytest.raises(ValueError, match="unless it continues a given state"):
        list(generator.decoder.generate([[], [1]], free, 1))


def test_cli_checkpoint_may_be_a_training_run(monkeypatch, capsys, tmp_path, tiny_params):
    """`--checkpoint runs/NAME` reads the run's exported params (RUN/export/params); a run
    without them is named in the error."""
    run = tmp_path / "runs" / "tiny"
    (run / "export").mkdir(parents=True)
    (run / "train_config.json").write_text("{}")
    save_params(run / "export" / "params", TINY, tiny_params)
    loaded = []

    class Recorder:
        def __init__(self, config, params, decode_config, tokenizer=None):
            loaded.append((config, params))

        def generate(self, prompts, *args, **kwargs):
            return [""] * len(prompts)

    monkeypatch.setattr(text_module, "TextGenerator", Recorder)
    assert main(["--checkpoint", str(run), "--prompt", "x", "--max-new-tokens", "1"]) == 0
    config, params = loaded[0]
    assert config == TINY
    jax.tree.map(np.testing.assert_array_equal, params, tiny_params)
    empty = tmp_path / "runs" / "unfinished"
    empty.mkdir()
    (empty / "train_config.json").write_text("{}")
    capsys.readouterr()
    assert main(["--checkpoint", str(empty), "--prompt", "x"]) == EXIT_USAGE
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "export/params" in err and "training run" in err


def test_cli_batch_file(monkeypatch, capsys, tmp_path, generator, uninterrupted):
    """In-process: `generate_text` builds a generator equal to the shared one; reuse its code."""

    def same_generator(config, params, decode_config, tokenizer=None):
        # A batch keeps the kernels as trained (same outputs: test_kernel_layouts_decode_alike).
        expected = dataclasses.replace(generator.decoder.decode_config, kernel_layout="in_out")
        assert config == TINY and decode_config == expected
        return generator

    monkeypatch.setattr(text_module, "TextGenerator", same_generator)
    jsonl, plain = tmp_path / "prompts.jsonl", tmp_path / "prompts.txt"
    jsonl.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in WHOLE))
    plain.write_text("\n".join(WHOLE) + "\n\n")
    args = ["--demo", "--max-new-tokens", str(N_NEW), *CLI_FLAGS, "--batch-file"]
    assert main([*args, str(jsonl)]) == 0
    out = capsys.readouterr().out
    labels = re.findall(r"^=== \[(\d)/2\] (.*) ===$", out, flags=re.MULTILINE)
    assert labels == [(str(i + 1), json.dumps(p)) for i, p in enumerate(WHOLE)]
    texts = re.split(r"^=== \[\d/2\] .* ===\n", out, flags=re.MULTILINE)[1:]
    assert texts == [t + "\n" for t in uninterrupted[0]]
    assert main([*args, str(plain)]) == 0
    assert capsys.readouterr().out == out


@pytest.mark.parametrize(
    "args, message",
    [
        (["--demo", "--prompt", "x", "--temperature", "-1"], "--temperature"),
        (["--demo", "--prompt", "x", "--top-p", "0"], "--top-p"),
        (["--demo", "--prompt", "x", "--max-new-tokens", "lots"], "--max-new-tokens"),
        (["--demo", "--prompt", "x", "--eviction", "random"], "--eviction"),
        (["--demo", "--checkpoint", "d", "--prompt", "x"], "not allowed with"),
        (["--demo"], "--prompt --batch-file is required"),
    ],
)
def test_cli_bad_flags(capsys, args, message):
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err


def test_cli_bad_inputs(capsys, tmp_path):
    other = tmp_path / "other.npz"
    rwkv7 = preset("tiny-rwkv7")
    save_state(other, rwkv7, _random_state(rwkv7))
    bad_json = tmp_path / "bad.jsonl"
    bad_json.write_text('{"prompt": "ok"}\n{"prompt": \n')
    no_logits = tmp_path / "no-logits.npz"  # as rwkvx-jax wrote states before version 2
    save_state(no_logits, TINY, _random_state(TINY, batch=1))
    cases = [
        (["--demo", "--prompt", ""], "--prompt is empty"),
        (["--demo", "--prompt", ""], "continues a --state-in state"),
        (["--demo", "--prompt", "x", "--state-in", other], rwkv7.shape_hash()),
        (["--demo", "--prompt", "x", "--ban", "256"], "vocabulary"),
        (["--demo", "--prompt", "x", "--cache-size", "40"], "multiple of chunk_size"),
        (["--demo", "--batch-file", bad_json], f"{bad_json}:2"),
        (["--demo", "--batch-file", tmp_path / "none.txt"], "no such batch file"),
        (["--checkpoint", tmp_path / "nowhere", "--prompt", "x"], "nowhere"),
        (["--demo", "--prompt", "x", "--state-out", tmp_path / "no" / "s.npz"], "does not exist"),
        (["--demo", "--prompt", "", "--state-in", no_logits], "holds no next-token logits"),
    ]
    for args, message in cases:
        assert main([str(a) for a in args]) == EXIT_USAGE
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and message in err, err


def test_cli_kernel_layout_follows_the_batch():
    """One prompt: the layout fastest at batch 1 ("auto"); a batch file: kernels as trained,
    which XLA:CPU multiplies faster at batch 2-32 (measured in docs/BENCHMARKS.md)."""
    config = preset("tiny")
    args = generate_cli._parser().parse_args(["--demo", "--prompt", "hi"])
    layouts = [generate_cli._decode_config(args, config, None, n).kernel_layout for n in (1, 3)]
    assert layouts == ["auto", "in_out"]


# --- sampled generation: Decoder.generate and the CLI ----------------------------------------

BANNED = tuple(range(128, 256))
# Temperature, both cuts, penalties with decay; no stop token, so every row runs to N_NEW.
SAMPLED = SamplingConfig(
    temperature=0.9, top_p=0.2, top_k=6, presence_penalty=0.4, frequency_penalty=0.6,
    penalty_decay=0.8, banned_tokens=BANNED, stop_tokens=(), seed=13,
)  # fmt: skip
SAMPLED_FLAGS = [
    "--temperature", "0.9", "--top-p", "0.2", "--top-k", "6", "--presence-penalty", "0.4",
    "--frequency-penalty", "0.6", "--penalty-decay", "0.8", "--prefill-chunk", "16", "--stop",
    "--ban", *map(str, BANNED),
]  # fmt: skip


@pytest.fixture(scope="module")
def sampled(generator):
    """WHOLE continued by the SAMPLED config (seed 13): (texts, result)."""
    result = {}
    texts = generator.generate(WHOLE, SAMPLED, N_NEW, result=result)
    return texts, result


def _logits_after(tiny_params, prompts, generated):
    """Per row, the forward's logits at each generated token's place and after the last one:
    [len(new) + 1, V]."""
    rows = [p + t for p, t in zip(prompts, generated, strict=True)]
    width = max(map(len, rows))
    tokens = np.array([row + [0] * (width - len(row)) for row in rows])  # right padding
    logits = np.asarray(rwkvx_jax.forward(TINY, tiny_params, tokens))
    return [
        logits[row, len(prompt) - 1 : len(prompt) + len(new)]
        for row, (prompt, new) in enumerate(zip(prompts, generated, strict=True))
    ]


class _ScriptedModel:
    """Stands in for an official RWKV model: `forward` returns the next scripted logits row."""

    def __init__(self, rows):
        self.rows, self.calls = rows, 0

    def forward(self, tokens, state):
        import torch

        self.calls += 1
        return torch.tensor(np.asarray(self.rows[self.calls - 1], np.float32)), state


def _official_replay(monkeypatch, logit_rows, picks, args, decode):
    """Runs the official `PIPELINE.generate` on scripted logits with its draws forced to
    `picks`; returns, per step, the penalised logits it sampled from and the distribution
    (np.random.choice's p) it drew from."""
    from rwkv.utils import PIPELINE

    pipeline = PIPELINE.__new__(PIPELINE)
    pipeline.model = _ScriptedModel(logit_rows)
    pipeline.encode = lambda text: [0]  # the scripted model ignores what it reads
    pipeline.decode = decode
    penalised, drawn_from, forced = [], [], iter(picks)
    official_sampler = pipeline.sample_logits

    def sample_logits(logits, **cut):
        penalised.append(logits.numpy().copy())
        return official_sampler(logits, **cut)

    def choice(a, p):
        drawn_from.append(np.asarray(p, np.float64))
        return next(forced)

    pipeline.sample_logits = sample_logits
    monkeypatch.setattr(np.random, "choice", choice)
    pipeline.generate("", token_count=len(picks), args=args)
    return penalised, drawn_from


def test_sampled_generation_follows_the_official_pipeline(
    monkeypatch, generator, tiny_params, sampled
):
    """Decoder.generate at temperature > 0 with top-p, top-k, penalties and decay, replayed
    through the official `PIPELINE.generate` on the same logits (its draws forced to ours):
    every token we drew lies in the set the official could draw from at that step, and the
    penalties our sampler carries at the end (decayed counts, zero-weight digits and spaces,
    presence) are the official's to float32 rounding."""
    from rwkv.utils import PIPELINE_ARGS

    texts, result = sampled
    generated = result["tokens"]
    assert [len(t) for t in generated] == [N_NEW, N_NEW]
    assert texts == [bytes(t).decode() for t in generated]
    prompts = [generator.tokenizer.encode(w) for w in WHOLE]
    args = PIPELINE_ARGS(
        temperature=SAMPLED.temperature, top_p=SAMPLED.top_p, top_k=SAMPLED.top_k,
        alpha_frequency=SAMPLED.frequency_penalty, alpha_presence=SAMPLED.presence_penalty,
        alpha_decay=SAMPLED.penalty_decay, token_ban=list(BANNED), token_stop=[],
    )  # fmt: skip
    sampler = result["sampler"]
    assert int(sampler.step) == N_NEW
    # The run exercises a zero-weight id (a digit or space) and a repeated id that counts.
    uncounted = lambda token: chr(token) in " \t0123456789"
    assert any(uncounted(t) for t in sum(generated, []))
    assert any(row.count(t) > 1 and not uncounted(t) for row in generated for t in row)
    allowed_sizes = []
    for row, logits in enumerate(_logits_after(tiny_params, prompts, generated)):
        # A last row of zeros: what the official subtracts there is exactly its penalty.
        script = [*logits[:-1], np.zeros(TINY.vocab_size, np.float32)]
        penalised, drawn_from = _official_replay(
            monkeypatch, script, [*generated[row], 0], args, generator.tokenizer.decode
        )
        for step, token in enumerate(generated[row]):
            assert drawn_from[step][token] > 0, (row, step, token)
            allowed_sizes.append(np.count_nonzero(drawn_from[step]))
        official_penalty = -penalised[-1][:128]
        seen = np.asarray(sampler.seen[row])
        ours = np.where(
            seen,
            SAMPLED.presence_penalty
            + SAMPLED.frequency_penalty * np.asarray(sampler.occurrence[row]),
            0.0,
        )[:128]
        np.testing.assert_allclose(ours, official_penalty, rtol=1e-6, atol=1e-6)
        assert np.flatnonzero(seen).tolist() == sorted(set(generated[row]))
    # Both cuts bound: top-k at every step, top-p below k at some.
    assert max(allowed_sizes) == SAMPLED.top_k and min(allowed_sizes) < SAMPLED.top_k


def test_presence_penalty_changes_greedy_output_where_it_must(generator, uninterrupted):
    """Greedy repeats a token; a presence penalty far above any logit gap forbids exactly
    that: the run is the same up to the first repeat, then differs, and never repeats."""
    greedy = uninterrupted[1]["tokens"]
    repeats = [
        (row, next(j for j in range(len(t)) if t[j] in t[:j]))
        for row, t in enumerate(greedy)
        if len(set(t)) < len(t)
    ]
    assert repeats, greedy  # the precondition: greedy repeats somewhere
    penalised = {}
    generator.generate(
        WHOLE, dataclasses.replace(GREEDY, presence_penalty=1000.0), N_NEW, result=penalised
    )
    for tokens in penalised["tokens"]:
        assert len(set(tokens)) == len(tokens) == N_NEW, tokens
    for row, first in repeats:
        got = penalised["tokens"][row]
        assert got[:first] == greedy[row][:first] and got[first] != greedy[row][first]


@pytest.fixture
def cli_on_shared_generator(monkeypatch, capsys, generator, tmp_path):
    """Runs the CLI in-process on WHOLE as a batch file, with the module's compiled generator
    (a batch keeps the generator's kernel layout); returns each prompt's printed text."""

    def shared(config, params, decode_config, tokenizer=None):
        assert config == TINY
        return generator

    monkeypatch.setattr(text_module, "TextGenerator", shared)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(WHOLE) + "\n")

    def run(*flags):
        capsys.readouterr()
        args = ["--demo", "--max-new-tokens", str(N_NEW), *flags, "--batch-file", str(prompts)]
        assert main(args) == 0
        out = capsys.readouterr().out
        texts = re.split(r"^=== \[\d/2\] .* ===\n", out, flags=re.MULTILINE)[1:]
        assert len(texts) == 2 and all(t.endswith("\n") for t in texts)
        return [t[:-1] for t in texts]

    return run


def test_cli_seeded_sampling_is_reproducible(cli_on_shared_generator, generator, sampled):
    """`--seed` with every sampling flag: the same seed gives the same text (the CLI's run is
    Decoder.generate's with the SAMPLED config), another seed other text, without compiling
    the decode step again."""
    texts, _ = sampled
    assert cli_on_shared_generator(*SAMPLED_FLAGS, "--seed", "13") == texts
    assert cli_on_shared_generator(*SAMPLED_FLAGS, "--seed", "13") == texts
    compiled = len(generator.decoder._advance_fns)
    other = cli_on_shared_generator(*SAMPLED_FLAGS, "--seed", "2")
    assert other[0] != texts[0] and other[1] != texts[1]
    assert len(generator.decoder._advance_fns) == compiled  # the seed is not compiled in
    # In-process, again: the same draws (a fresh sampler state from the seed every call).
    assert generator.generate(WHOLE, SAMPLED, N_NEW) == texts


def test_cli_top_k_1_is_greedy_and_stop_ids_end_rows_unprinted(
    cli_on_shared_generator, uninterrupted
):
    """`--top-k 1` at temperature 1.7 draws the argmax, so it writes the greedy text;
    `--stop ID` ends a row at the first ID, which is not printed, and leaves the other row,
    which never writes ID, whole."""
    texts, result = uninterrupted
    greedy = result["tokens"]
    assert [len(t) for t in greedy] == [N_NEW, N_NEW]  # no end-of-document: --stop replaces it
    # A stop id row 0 writes first at place >= 1 and row 1 never writes.
    place, stop = next(
        (j, t) for j, t in enumerate(greedy[0]) if j and t not in greedy[0][:j] + greedy[1]
    )
    got = cli_on_shared_generator(
        "--temperature", "1.7", "--top-k", "1", "--presence-penalty", "0",
        "--frequency-penalty", "0", "--prefill-chunk", "16", "--ban", *map(str, BANNED),
        "--stop", str(stop),
    )  # fmt: skip
    assert got == [texts[0][:place], texts[1]]
