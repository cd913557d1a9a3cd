"""Loss by context position: exact piecewise losses, buckets, outputs, input errors, the CLI."""

import csv
import math
import os
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest

import rwkvx_jax
from rwkvx_jax import ByteTokenizer, DecodeConfig, preset
from rwkvx_jax.checkpoints.official_layout import params_from_state_dict
from rwkvx_jax.checkpoints.random_weights import random_state_dict
from rwkvx_jax.cli import EXIT_USAGE, UsageError
from rwkvx_jax.evals import long_loss
from rwkvx_jax.evals.long_loss import (
    ALL_FILES,
    PositionLoss,
    bucket_edges,
    bucket_losses,
    expand_files,
    file_windows,
    run_long_loss,
)
from rwkvx_jax.training.losses import token_cross_entropy

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEXT = (
    "It was the best of times, it was the worst of times, it was the age of wisdom, it was the "
    "age of foolishness, it was the epoch of belief, it was the epoch of incredulity. "
)


@pytest.fixture(scope="module")
def model():
    """A small random RWKV-X (chunk 16, top-k 3) read in pieces of 32 tokens, compiled once."""
    config = preset("tiny", n_rwkv_layer=2, n_attn_layer=1)
    params = params_from_state_dict(random_state_dict(config, 1), config)
    return PositionLoss(config, params, DecodeConfig(cache_size=256, prefill_chunk=32))


def _reference_losses(model, sequence):
    tokens = np.array([sequence])
    logits = rwkvx_jax.forward(model.config, model.params, tokens[:, :-1])
    return np.asarray(token_cross_entropy(logits, jnp.asarray(tokens[:, 1:])))[0]


def test_piecewise_losses_equal_one_forward(model):
    rng = np.random.default_rng(0)
    # 150 tokens: 9 chunks, so the sparse block selects top-k chunks, across 5 pieces; a
    # shorter row in the same batch checks that padding never leaks into a sequence.
    sequences = [rng.integers(0, 256, 150).tolist(), rng.integers(0, 256, 97).tolist()]
    got = model.losses(sequences)
    assert got.shape == (2, 149) and got.dtype == np.float32
    for row, sequence in zip(got, sequences, strict=True):
        want = _reference_losses(model, sequence)
        n = len(sequence) - 1
        np.testing.assert_allclose(row[:n], want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
        assert np.isnan(row[n:]).all()


def test_bucket_edges():
    np.testing.assert_array_equal(bucket_edges(64, 4), [0, 16, 32, 48, 64])
    np.testing.assert_array_equal(bucket_edges(10, 3), [0, 3, 7, 10])
    log = bucket_edges(65536, 16, "log")
    assert log[0] == 1 and log[-1] == 65536 and len(log) == 17
    assert (np.diff(log) > 0).all()
    assert len(bucket_edges(64, 16, "log")) < 17  # small positions merge
    bad = [
        ((1, 1), "context must be >= 2"),
        ((64, 0), r"buckets must be in \[1, 63\]"),
        ((64, 64), "buckets must be"),
        ((64, 4, "cubic"), "spacing must be"),
    ]
    for args, match in bad:
        with pytest.raises(ValueError, match=match):
            bucket_edges(*args)


def test_bucket_means_are_token_weighted():
    loss_sum = np.array([0.0, 2.0, 4.0, 9.0, 0.0, 0.0])
    count = np.array([0, 1, 2, 3, 0, 0])
    rows = bucket_losses(loss_sum, count, np.array([0, 2, 4, 6]), file="f")
    assert [(r.start, r.end, r.tokens) for r in rows] == [(0, 2, 1), (2, 4, 5), (4, 6, 0)]
    assert rows[0].mean_loss == 2.0
    assert rows[1].mean_loss == pytest.approx(13.0 / 5)  # not the mean of the two positions' means
    assert math.isnan(rows[2].mean_loss)
    assert rows[1].perplexity == pytest.approx(math.exp(13.0 / 5))


def _write_texts(tmp_path):
    (tmp_path / "a.txt").write_text(TEXT * 2)  # 326 bytes: several windows
    (tmp_path / "b.txt").write_text(TEXT[:90])  # shorter than one window
    return [str(tmp_path / "a.txt"), str(tmp_path / "b.txt")]


def test_run_writes_csv_plot_and_positions(model, tmp_path):
    files = _write_texts(tmp_path)
    out = tmp_path / "out"
    run = run_long_loss(
        model, ",".join(files), str(out), context=128, buckets=4,
        windows_per_file=2, batch_size=2, progress=False,
    )  # fmt: skip
    # Expected: each window's losses straight from the model, accumulated by position.
    tokenizer = ByteTokenizer()
    windows = [w for f in files for w in file_windows(f, tokenizer, 128, 2)]
    assert [len(w) for w in windows] == [128, 128, 90]
    loss_sum, count = np.zeros(128), np.zeros(128, np.int64)
    for window in windows:
        losses = _reference_losses(model, window)
        loss_sum[1 : len(window)] += losses
        count[1 : len(window)] += 1
    np.testing.assert_array_equal(run.count, count)
    np.testing.assert_allclose(run.loss_sum, loss_sum, rtol=1e-4)
    with open(run.csv_path, newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == list(long_loss.FIELDS)
    assert [r["file"] for r in rows] == [files[0]] * 4 + [files[1]] * 4 + [ALL_FILES] * 4
    overall = [r for r in rows if r["file"] == ALL_FILES]
    for row, (start, end) in zip(overall, [(0, 32), (32, 64), (64, 96), (96, 128)], strict=True):
        assert (int(row["start"]), int(row["end"])) == (start, end)
        assert int(row["tokens"]) == count[start:end].sum()
        want = loss_sum[start:end].sum() / count[start:end].sum()
        assert float(row["mean_loss"]) == pytest.approx(want, rel=1e-4)
    short = [r for r in rows if r["file"] == files[1]]
    assert int(short[-1]["tokens"]) == 0 and short[-1]["mean_loss"] == "nan"
    assert (out / long_loss.PLOT_NAME).read_bytes()[:8] == PNG_MAGIC
    saved = np.load(out / long_loss.POSITIONS_NAME)
    np.testing.assert_array_equal(saved["count"], count)
    np.testing.assert_array_equal(saved["edges"], [0, 32, 64, 96, 128])


def test_bad_inputs(model, tmp_path):
    files = _write_texts(tmp_path)
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    (tmp_path / "nodocs").mkdir()
    out = str(tmp_path / "out")
    cases = [
        (str(tmp_path / "missing.txt"), "missing.txt: no such file or directory"),
        (str(tmp_path / "empty.txt"), "empty.txt: 0 token"),
        (str(tmp_path / "latin1.txt"), "latin1.txt: not UTF-8"),
        (str(tmp_path / "nodocs"), "directory without"),
        ("", "no text files"),
    ]
    for spec, match in cases:
        with pytest.raises(UsageError, match=match):
            run_long_loss(model, spec, out, context=64, buckets=4, progress=False)
    with pytest.raises(ValueError, match="context must be >= 2"):
        run_long_loss(model, files, out, context=1, progress=False)
    with pytest.raises(ValueError, match="buckets must be"):
        run_long_loss(model, files, out, context=64, buckets=100, progress=False)
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        run_long_loss(model, files, out, context=64, batch_size=0, progress=False)
    with pytest.raises(ValueError, match="at least 2 tokens"):
        model.losses([[1, 2, 3], [4]])
    with pytest.raises(ValueError, match=r"token ids must lie in \[0, 256\)"):
        model.losses([[1, 2, 300]])
    with pytest.raises(ValueError, match="official"):
        PositionLoss(model.config, model.params, DecodeConfig(attention_mode="official"))
    assert not os.path.exists(out)
    assert expand_files(str(tmp_path)) == sorted(
        str(tmp_path / n) for n in ("a.txt", "b.txt", "empty.txt", "latin1.txt")
    )


def test_cli_demo_smoke(tmp_path):
    files = _write_texts(tmp_path)
    out = tmp_path / "out"
    command = [sys.executable, "-m", "rwkvx_jax.evals.long_loss", "--demo", "--files",
               ",".join(files), "--context", "128", "--buckets", "4", "--out", str(out),
               "--prefill-chunk", "32", "--no-progress"]  # fmt: skip
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    done = subprocess.run(command, capture_output=True, text=True, cwd=REPO, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "mean loss" in done.stdout and "96-127" in done.stdout
    for name in (long_loss.CSV_NAME, long_loss.PLOT_NAME, long_loss.POSITIONS_NAME):
        assert (out / name).exists()


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--checkpoint", "/nonexistent/ckpt", "--files", "{a}"], "no such checkpoint directory"),
        (["--demo", "--files", "{missing}"], "no such file or directory"),
        (["--demo", "--files", "{a}", "--context", "1"], "at least 2 tokens"),
        (["--demo", "--files", "{a}", "--context", "x"], "token count"),
        (["--demo", "--files", "{a}", "--buckets", "500"], "buckets must be in"),
    ],
)
def test_cli_errors(tmp_path, capsys, argv, message):
    files = _write_texts(tmp_path)
    argv = [a.format(a=files[0], missing=str(tmp_path / "missing.txt")) for a in argv]
    if "--context" not in argv:
        argv += ["--context", "256"]
    assert long_loss.main(argv + ["--out", str(tmp_path / "out")]) == EXIT_USAGE
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_long_window_memory_stays_bounded(model, tmp_path):
    """4K tokens through a 512-token cache: eviction keeps the state's size fixed."""
    bounded = PositionLoss(
        model.config, model.params, DecodeConfig(cache_size=512, prefill_chunk=256)
    )
    sequence = np.random.default_rng(1).integers(0, 256, 4096).tolist()
    losses = bounded.losses([sequence])
    assert losses.shape == (1, 4095) and np.isfinite(losses).all()
    exact = _reference_losses(model, sequence[:512])
    np.testing.assert_allclose(losses[0, :511], exact, rtol=1e-4, atol=1e-4 * np.abs(exact).max())
