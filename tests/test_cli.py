"""Every command line behaves alike (rwkvx_jax.cli): exit codes, one-line errors, Ctrl-C."""

from __future__ import annotations

import errno
import os
import sys

import pytest
from tqdm import tqdm

from rwkvx_jax import cli
from rwkvx_jax.cli import EXIT_FAILED, EXIT_INTERRUPTED, EXIT_OK, EXIT_USAGE, RunFailed, run_cli

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _raises(error: BaseException):
    def body():
        raise error

    return body


@pytest.mark.parametrize(
    ("body", "status", "line"),
    [
        (lambda: None, EXIT_OK, None),
        (lambda: 7, 7, None),
        (_raises(ValueError("bad\n  value")), EXIT_USAGE, "tool: error: bad value"),
        (
            _raises(FileNotFoundError(errno.ENOENT, "No such file or directory", "/x/y.pth")),
            EXIT_USAGE,
            "tool: error: /x/y.pth: No such file or directory",
        ),
        (_raises(ImportError("needs torch: pip install")), EXIT_USAGE, "tool: error: needs torch"),
        (_raises(RunFailed("loss is nan")), EXIT_FAILED, "tool: failed: loss is nan"),
        (_raises(KeyboardInterrupt()), EXIT_INTERRUPTED, "tool: interrupted; rerun to resume"),
    ],
    ids=["ok", "status", "user-error", "os-error", "import-error", "failed", "ctrl-c"],
)
def test_run_cli_statuses_and_one_line(capsys, body, status, line):
    assert run_cli("tool", body, resume_hint="rerun to resume") == status
    captured = capsys.readouterr()
    if line is None:
        assert captured.err == ""
    else:
        assert captured.err.count("\n") == 1 and captured.err.startswith(line), captured.err


def test_a_bug_is_not_dressed_as_a_user_error():
    """Only user errors become one line: a programming error keeps its traceback."""
    with pytest.raises(TypeError):
        run_cli("tool", _raises(TypeError("a bug")))


def test_an_error_never_lands_inside_a_progress_bar(capsys):
    """A loop that dies with its bar open: the error still starts a line of its own."""

    def body():
        bar = tqdm(total=10, desc="working", file=sys.stderr)
        bar.update(3)
        raise ValueError("the corpus ran out")

    assert run_cli("tool", body) == EXIT_USAGE
    err = capsys.readouterr().err
    assert "working" in err  # the bar was drawn
    assert err.endswith("\ntool: error: the corpus ran out\n"), repr(err)


def test_output_path_needs_an_existing_folder(tmp_path):
    assert cli.output_path(str(tmp_path / "out.npz"), "--out") == str(tmp_path / "out.npz")
    with pytest.raises(cli.UsageError, match="does not exist"):
        cli.output_path(str(tmp_path / "missing" / "out.npz"), "--out")
    with pytest.raises(cli.UsageError, match="is a directory"):
        cli.output_path(str(tmp_path), "--out")
    assert not (tmp_path / "missing").exists()


@pytest.mark.parametrize(
    ("kind", "text", "value"),
    [(int, "3", 3), (float, "0.5", 0.5)],
)
def test_number_parses_within_bounds(kind, text, value):
    assert cli.number(kind, low=0, high=4)(text) == value


@pytest.mark.parametrize(
    ("parse", "text", "message"),
    [
        (cli.number(int, low=1), "0", "an int >= 1"),
        (cli.number(float, low=0.0, high=1.0, low_open=True), "0", "a number in (0.0, 1.0]"),
        (cli.number(float), "nan", "a finite number"),
        (cli.number(int), "x", "an int"),
    ],
)
def test_number_rejects_with_what_was_expected(parse, text, message):
    import argparse

    with pytest.raises(argparse.ArgumentTypeError, match=message.replace("(", r"\(")):
        parse(text)


def _tool_mains():
    from rwkvx_jax import convert, generate, train
    from rwkvx_jax.evals import long_loss, passkey

    return {
        "train.py": train.main,
        "convert_torch.py": convert.main,
        "python -m rwkvx_jax.generate": generate.main,
        "python -m rwkvx_jax.evals.passkey": passkey.main,
        "python -m rwkvx_jax.evals.long_loss": long_loss.main,
    }


@pytest.mark.parametrize(
    ("prog", "argv"),
    [
        ("train.py", ["data.corpus={missing}/corpus.jsonl", "workdir={tmp}/run", "steps=1"]),
        ("convert_torch.py", ["{missing}/model.pth", "{tmp}/out"]),
        ("python -m rwkvx_jax.generate", ["--checkpoint", "{missing}", "--prompt", "x"]),
        (
            "python -m rwkvx_jax.evals.passkey",
            ["--checkpoint", "{missing}", "--lengths", "512", "--out", "{tmp}/pk"],
        ),
        (
            "python -m rwkvx_jax.evals.long_loss",
            ["--demo", "--files", "{missing}/a.txt", "--context", "64", "--out", "{tmp}/ll"],
        ),
    ],
)
def test_every_tool_reports_a_missing_input_alike(capsys, tmp_path, prog, argv):
    """One convention for all tools: exit 2, one line `prog: error: ...` naming the path, no
    traceback, and no output folder left behind."""
    missing = tmp_path / "missing"
    argv = [a.format(missing=missing, tmp=tmp_path) for a in argv]
    assert _tool_mains()[prog](argv) == EXIT_USAGE
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"{prog}: error: "), err
    assert str(missing) in err and "Traceback" not in err
    assert sorted(os.listdir(tmp_path)) == []
