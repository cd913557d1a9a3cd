"""Passkey evaluation: prompt layout, scoring, the resumable CSV, the heatmap and the CLI."""

import csv
import os
import re
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest

from rwkvx_jax import ByteTokenizer, DecodeConfig, WorldTokenizer, preset
from rwkvx_jax.checkpoints.official_layout import params_from_state_dict
from rwkvx_jax.checkpoints.random_weights import random_state_dict
from rwkvx_jax.cli import EXIT_USAGE, UsageError
from rwkvx_jax.data.passkey import (
    HAYSTACK,
    NEEDLE,
    QUESTION,
    TASK,
    PasskeyPromptBuilder,
    depth_grid,
    passkey_for,
)
from rwkvx_jax.evals import passkey
from rwkvx_jax.evals.common import format_tokens, parse_lengths
from rwkvx_jax.evals.passkey import PasskeyEvaluator, extract_answer, format_summary, is_correct

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _haystack_sentences_in(text: str) -> int:
    return sum(text.count(sentence) for sentence in HAYSTACK)


@pytest.fixture(scope="module")
def world():
    return WorldTokenizer()


@pytest.fixture(scope="module")
def evaluator():
    """A small random RWKV-X (2 RWKV-7 blocks, 1 sparse block, chunk 16), compiled once."""
    config = preset("tiny", n_rwkv_layer=2, n_attn_layer=1)
    params = params_from_state_dict(random_state_dict(config, 0), config)
    return PasskeyEvaluator(config, params, DecodeConfig(cache_size=1024, prefill_chunk=64))


# ---------------------------------------------------------------------------------------------
# Prompts


@pytest.mark.parametrize("tokenizer_name", ["byte", "world"])
@pytest.mark.parametrize("length", [300, 1000, 4096])
@pytest.mark.parametrize("depth", [0.0, 0.3, 0.5, 1.0])
def test_prompt_layout(tokenizer_name, length, depth, world):
    tokenizer = ByteTokenizer() if tokenizer_name == "byte" else world
    builder = PasskeyPromptBuilder(tokenizer)
    key = passkey_for(3, length, depth)
    prompt = builder.build(length, depth, key)
    # Within one haystack sentence of the target, never above it.
    longest_sentence = max(len(s) for s in builder.sentences)
    assert length - longest_sentence < len(prompt.tokens) <= length
    text = tokenizer.decode(prompt.tokens)
    # Tokenizing the whole text gives the same ids as the per-piece construction.
    assert tokenizer.encode(text) == prompt.tokens
    needle = NEEDLE.format(key=key)
    assert text.count(needle) == 1
    assert text.count(key) == 2  # only in the pass-key line ("N ... N is the pass key")
    assert text.startswith(TASK + " ")
    assert text.endswith(" " + QUESTION)
    before, after = text.split(needle)
    assert _haystack_sentences_in(text) == prompt.n_sentences
    assert abs(_haystack_sentences_in(before) - depth * prompt.n_sentences) <= 1
    assert _haystack_sentences_in(before) == prompt.sentences_before
    assert tokenizer.decode(prompt.tokens[prompt.needle_start : prompt.needle_end]) == " " + needle
    assert prompt.tokens[: prompt.needle_start] == builder.stream(prompt.needle_start)
    layout = builder.layout(length, depth, key)
    assert layout == (prompt.n_sentences, prompt.sentences_before, prompt.needle_start)


def test_prompt_tokens_count_the_model_tokenizer(world):
    byte_prompt = PasskeyPromptBuilder(ByteTokenizer()).build(2048, 0.5, "12345")
    world_prompt = PasskeyPromptBuilder(world).build(2048, 0.5, "12345")
    # The same token budget holds several times more text with the World vocabulary.
    assert world_prompt.n_sentences > 3 * byte_prompt.n_sentences


def test_prompt_shorter_than_fixed_parts_is_refused():
    builder = PasskeyPromptBuilder(ByteTokenizer())
    shortest = builder.fixed_tokens("12345")
    assert builder.build(shortest, 0.5, "12345").n_sentences == 0
    with pytest.raises(ValueError, match=f"shorter than the prompt without haystack .{shortest}"):
        builder.build(shortest - 1, 0.5, "12345")
    with pytest.raises(ValueError, match="depth must lie in"):
        builder.build(1000, 1.5, "12345")


def test_passkeys_are_reproducible_and_differ_between_cells():
    assert passkey_for(0, 1024, 0.5) == passkey_for(0, 1024, 0.5)
    keys = {passkey_for(s, n, d) for s in range(5) for n in (1024, 2048) for d in (0.0, 0.5)}
    assert len(keys) == 20
    assert all(len(k) == 5 and k[0] != "0" for k in keys)
    assert len(passkey_for(1, 1024, 0.5, digits=8)) == 8
    with pytest.raises(ValueError, match="seeds must be >= 0"):
        passkey_for(-1, 1024, 0.5)


def test_depth_grid():
    assert depth_grid(1) == [0.5]
    assert depth_grid(3) == [0.0, 0.5, 1.0]
    assert len(depth_grid(10)) == 10 and depth_grid(10)[-1] == 1.0
    for bad in (0, -2, 1.5):
        with pytest.raises(ValueError, match="number of depths"):
            depth_grid(bad)


def test_parse_lengths():
    assert parse_lengths("1024,2048,1024") == [1024, 2048]
    assert parse_lengths("2K:8K:2K") == [2048, 4096, 6144, 8192]
    assert parse_lengths("300, 2k") == [300, 2048]
    for bad, match in [("", "no context lengths"), ("0", ">= 1"), ("a", "token count"),
                       ("8:2:1", "START <= STOP"), ("1:2", "neither")]:  # fmt: skip
        with pytest.raises(UsageError, match=match):
            parse_lengths(bad)


# ---------------------------------------------------------------------------------------------
# Scoring


@pytest.mark.parametrize(
    "text, correct",
    [
        (" 12345. Remember it.", True),
        (" 12345", True),
        ("\n12345\n", True),
        (" 12345 is the pass key", True),
        (" 123456", False),  # one digit too many
        (" 1234", False),
        (" 12 345", False),  # the first digit run is "12"
        (" 54321", False),
        (" twelve", False),
        ("", False),
        (" ١٢٣٤٥", False),  # non-ASCII digits are not the key
    ],
)
def test_exact_match(text, correct):
    assert is_correct(text, "12345") is correct


def test_extract_answer():
    assert extract_answer(" the key: 0042, then 7") == "0042"
    assert extract_answer("none") is None


# ---------------------------------------------------------------------------------------------
# Running a grid


def _csv_rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_grid_resumes_and_extends(evaluator, tmp_path):
    out = str(tmp_path / "pk")
    first = evaluator.run(out, [300, 400], depth_grid(3), range(2), progress=False)
    assert first.computed == 12
    assert len(_csv_rows(first.csv_path)) == 12
    with open(first.heatmap_path, "rb") as f:
        assert f.read(8) == PNG_MAGIC
    # Same grid again: nothing to compute.
    again = evaluator.run(out, [300, 400], depth_grid(3), range(2), progress=False)
    assert again.computed == 0
    assert [r.cell for r in again.rows] == [r.cell for r in first.rows]
    # A larger grid: only the new cells are computed; earlier rows are kept as they were.
    more = evaluator.run(out, [300, 400, 460], depth_grid(3), range(2), progress=False)
    assert more.computed == 6
    rows = _csv_rows(more.csv_path)
    assert len(rows) == 18
    assert {int(r["length"]) for r in rows[12:]} == {460}
    assert rows[:12] == _csv_rows(first.csv_path)[:12]
    for row in more.rows:
        prompt = evaluator.prompt(row.length, row.depth, row.seed)
        assert (row.key, row.prompt_tokens, row.needle_token) == (
            prompt.key, len(prompt.tokens), prompt.needle_start,
        )  # fmt: skip
        assert row.correct == is_correct(row.answer, row.key)
    _assert_summary_matches_rows(format_summary(more.rows), more.rows)


def _parse_summary(summary: str):
    """format_summary's table as numbers: (depth headers, {length label: [cells..., mean]},
    bottom means, "per cell" text, (correct, total))."""
    lines = summary.splitlines()
    per_cell = re.search(r"; (\S+) prompt\(s\) per cell\)$", lines[0]).group(1)
    head = lines[1].split()
    assert head[0] == "length" and head[-1] == "mean"
    number = lambda cell: float("nan") if cell == "-" else float(cell)
    table = {}
    for line in lines[2:-2]:
        label, *cells = line.split()
        table[label] = [number(c) for c in cells]
    label, *bottom = lines[-2].split()
    assert label == "mean"
    correct, total = re.fullmatch(r"overall (\d+)/(\d+) correct", lines[-1]).groups()
    return head[1:-1], table, [number(c) for c in bottom], per_cell, (int(correct), int(total))


def _assert_summary_matches_rows(summary, rows):
    """Every number of the summary, recounted from the rows: each cell's accuracy over its
    seeds, each length's and each depth's accuracy over all their prompts, the overall count."""
    depths, table, bottom, per_cell, overall = _parse_summary(summary)
    by_cell = {}
    for r in rows:
        by_cell.setdefault((r.length, round(r.depth, 4)), []).append(r.correct)
    lengths = sorted({r.length for r in rows})
    depth_values = sorted({round(r.depth, 4) for r in rows})
    assert depths == [f"{d * 100:.0f}%" for d in depth_values]
    assert list(table) == [format_tokens(n) for n in lengths]

    def accuracy(results):
        return round(sum(results) / len(results), 2) if results else float("nan")

    for length, cells in zip(lengths, table.values(), strict=True):
        want = [accuracy(by_cell.get((length, d), [])) for d in depth_values]
        want.append(accuracy([r.correct for r in rows if r.length == length]))
        np.testing.assert_array_equal(cells, want, err_msg=f"length {length}")
    want = [accuracy([r.correct for r in rows if round(r.depth, 4) == d]) for d in depth_values]
    want.append(accuracy([r.correct for r in rows]))
    np.testing.assert_array_equal(bottom, want)
    counts = sorted({len(v) for v in by_cell.values()})
    assert per_cell == "/".join(map(str, counts))
    assert overall == (sum(r.correct for r in rows), len(rows))


def test_summary_numbers_are_the_rows_accuracies():
    """A grid with a different accuracy in every cell, an empty cell and uneven seeds."""
    rows, correct_seeds = [], {}
    for i, length in enumerate([300, 1000, 2048]):
        for j, depth in enumerate([0.0, 0.25, 1.0]):
            if (i, j) == (1, 2):
                continue  # an empty cell: "-"
            seeds = 3 if (i, j) == (2, 0) else 4
            correct_seeds[length, depth] = (i + 2 * j) % (seeds + 1)  # 0..4 correct
            for seed in range(seeds):
                rows.append(
                    passkey.PasskeyResult(
                        length=length, depth=depth, seed=seed, key="12345", prompt_tokens=length,
                        needle_token=0, answer=" 12345" if seed < correct_seeds[length, depth]
                        else " 9", correct=seed < correct_seeds[length, depth], seconds=0.1,
                    )
                )  # fmt: skip
    summary = format_summary(rows)
    _assert_summary_matches_rows(summary, rows)
    depths, table, bottom, per_cell, overall = _parse_summary(summary)
    # Spelled out for a few cells, so the recount above cannot share a mistake with it.
    assert depths == ["0%", "25%", "100%"] and list(table) == ["300", "1000", "2K"]
    assert table["300"] == [0.0, 0.5, 1.0, 0.5]  # 0/4, 2/4, 4/4; mean 6/12
    assert np.isnan(table["1000"][2]) and table["1000"][:2] == [0.25, 0.75]
    assert table["2K"][0] == round(2 / 3, 2) and per_cell == "3/4"
    assert overall == (sum(correct_seeds.values()), 4 * 7 + 3)


def test_unfinished_last_line_is_recomputed(evaluator, tmp_path):
    out = str(tmp_path / "pk")
    evaluator.run(out, [300], [0.5], range(2), progress=False, plot=False)
    path = os.path.join(out, passkey.CSV_NAME)
    with open(path, "rb") as f:
        data = f.read()
    with open(path, "wb") as f:
        f.write(data[:-5])  # a crash in the middle of writing the last row
    again = evaluator.run(out, [300], [0.5], range(2), progress=False, plot=False)
    assert again.computed == 1
    assert sorted(r.seed for r in again.rows) == [0, 1]
    assert len(_csv_rows(path)) == 2


class _Oracle:
    """A stand-in decoder that reads the key from the prompt's text and answers it.

    It checks the bookkeeping of shared prefixes: each prompt continues a state that has read
    exactly the tokens before it.
    """

    def __init__(self, tokenizer, piece):
        self.tokenizer = tokenizer
        self.decode_config = DecodeConfig(prefill_chunk=piece)
        self.lengths = []

    def prefill(self, tokens, state=None):
        read = 0 if state is None else int(state["read"][0])
        return None, {"read": jnp.full((len(tokens),), read + np.asarray(tokens).shape[1])}

    def generate(self, prompts, sampling, max_new_tokens, *, state=None):
        assert sampling == passkey.GREEDY
        read = 0 if state is None else int(state["read"][0])
        answers = []
        for prompt in prompts:
            self.lengths.append(read + len(prompt))
            key = extract_answer(self.tokenizer.decode(prompt).split("The pass key is")[1])
            answers.append(self.tokenizer.encode(f" {key}. Remember"))
        for step in range(max_new_tokens):
            yield np.array([a[step] for a in answers], np.int32)


@pytest.mark.parametrize("reuse_prefix", [True, False])
def test_answers_are_scored_per_prompt(tmp_path, reuse_prefix):
    config = preset("tiny")
    evaluator = PasskeyEvaluator(
        config, {}, DecodeConfig(cache_size=1024), batch_size=3, reuse_prefix=reuse_prefix
    )
    oracle = evaluator._decoders[1024] = _Oracle(evaluator.tokenizer, piece=64)
    run = evaluator.run(
        str(tmp_path / "pk"), [300, 700, 1000], depth_grid(4), range(4), progress=False
    )
    assert run.computed == 48 and all(r.correct for r in run.rows)
    assert sorted(set(oracle.lengths)) == sorted({r.prompt_tokens for r in run.rows})
    assert all(r.answer.startswith(f" {r.key}.") for r in run.rows)


def test_prefix_reuse_gives_the_same_answers(evaluator, tmp_path):
    fresh = PasskeyEvaluator(
        evaluator.config, evaluator.params, evaluator.decode_config, reuse_prefix=False
    )
    fresh._decoders = evaluator._decoders  # the same compiled functions
    grid = ([300, 460], [0.0, 0.7], range(2))
    shared = evaluator.run(str(tmp_path / "a"), *grid, progress=False, plot=False)
    alone = fresh.run(str(tmp_path / "b"), *grid, progress=False, plot=False)
    assert {r.cell: r.answer for r in shared.rows} == {r.cell: r.answer for r in alone.rows}


def test_other_results_are_never_mixed(evaluator, tmp_path):
    out = tmp_path / "pk"
    out.mkdir()
    (out / passkey.CSV_NAME).write_text("a,b\n1,2\n")
    with pytest.raises(UsageError, match="not a passkey results header"):
        evaluator.run(str(out), [300], [0.5], [0], progress=False)
    out2 = str(tmp_path / "pk2")
    # Two seeds: the batch size the module's evaluator is already compiled for.
    evaluator.run(out2, [300], [0.5], range(2), model_name="one", progress=False, plot=False)
    with pytest.raises(UsageError, match="other settings .model: 'one' there, 'two' now"):
        evaluator.run(out2, [300], [0.5], range(2), model_name="two", progress=False)


@pytest.mark.parametrize(
    "lengths, depths, seeds, match",
    [
        ([], [0.5], [0], "no lengths"),
        ([300], [], [0], "no depths"),
        ([300], [0.5], [], "no seeds"),
        ([300], [1.2], [0], r"depths must lie in \[0, 1\]"),
        ([300], [0.5], [-1], "seeds must be >= 0"),
        ([100, 300], [0.5], [0], r"lengths \[100\] are shorter .* at least 243 tokens"),
    ],
)
def test_bad_grids_are_refused(evaluator, tmp_path, lengths, depths, seeds, match):
    with pytest.raises(ValueError, match=match):
        evaluator.run(str(tmp_path / "pk"), lengths, depths, seeds, progress=False)
    assert not (tmp_path / "pk").exists()  # refused before anything was written


# ---------------------------------------------------------------------------------------------
# Command line


def test_cli_demo_smoke(tmp_path):
    out = tmp_path / "pk"
    command = [sys.executable, "-m", "rwkvx_jax.evals.passkey", "--demo", "--lengths", "260,300",
               "--depths", "2", "--seeds", "1", "--out", str(out), "--prefill-chunk", "64",
               "--no-progress"]  # fmt: skip
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    done = subprocess.run(command, capture_output=True, text=True, cwd=REPO, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "4 prompt(s) evaluated now" in done.stdout and "overall" in done.stdout
    assert len(_csv_rows(out / passkey.CSV_NAME)) == 4
    assert (out / passkey.HEATMAP_NAME).read_bytes()[:8] == PNG_MAGIC
    assert (out / passkey.SETTINGS_NAME).exists()


@pytest.mark.parametrize(
    "argv, message",
    [
        (
            ["--checkpoint", "/nonexistent/ckpt", "--lengths", "1024"],
            "no such checkpoint directory",
        ),
        (["--demo", "--lengths", ","], "no context lengths"),
        (["--demo", "--lengths", "100"], "shorter than the prompt without haystack"),
    ],
)
def test_cli_errors(tmp_path, capsys, argv, message):
    assert passkey.main(argv + ["--out", str(tmp_path / "pk")]) == EXIT_USAGE
    assert message in capsys.readouterr().err


def test_cli_rejects_zero_depths(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        passkey.main(["--demo", "--lengths", "300", "--depths", "0", "--out", str(tmp_path)])
    assert exit_info.value.code == 2
    assert "expected an int >= 1, got 0" in capsys.readouterr().err
