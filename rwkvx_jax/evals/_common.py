"""Pieces shared by the evaluation CLIs: model choice, argument types, atomic writes, labels."""

from __future__ import annotations

import argparse
import math
import os
import uuid
from collections.abc import Callable

from rwkvx_jax.config import RWKVXConfig


class UsageError(ValueError):
    """A command-line input is unusable; the message says which and why."""


class Parser(argparse.ArgumentParser):
    """argparse that points at --help on errors."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """--checkpoint DIR | --demo (exactly one)."""
    model = parser.add_mutually_exclusive_group(required=True)
    model.add_argument("--checkpoint", metavar="DIR", help="a converted checkpoint directory")
    model.add_argument(
        "--demo",
        action="store_true",
        help="a random tiny model instead (byte vocabulary; for smoke tests, scores are chance)",
    )


def load_model(args) -> tuple[RWKVXConfig, dict, str]:
    """(config, params, model name) for --checkpoint DIR or --demo."""
    if args.demo:
        from rwkvx_jax.generate import demo_model

        config, params = demo_model()
        return config, params, "demo"
    from rwkvx_jax.api import load

    path = os.path.abspath(args.checkpoint)
    if not os.path.isdir(path):
        raise UsageError(f"--checkpoint {args.checkpoint}: no such checkpoint directory")
    config, params = load(path)
    return config, params, path


def int_at_least(low: int) -> Callable[[str], int]:
    """An argparse type: an int >= low."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an int >= {low}, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"expected an int >= {low}, got {value}")
        return value

    return parse


def parse_token_count(text: str) -> int:
    """'4096', '4K' or '4k' (K = 1024 tokens) -> int."""
    text = text.strip()
    scale = 1
    if text[-1:] in ("k", "K"):
        text, scale = text[:-1], 1024
    try:
        value = int(text)
    except ValueError:
        raise UsageError(f"expected a token count like 4096 or 4K, got {text!r}") from None
    return value * scale


def parse_lengths(text: str) -> list[int]:
    """A list of context lengths: 'A,B,C' and/or inclusive ranges 'START:STOP:STEP'.

    Counts may end in K (x1024): '2K:64K:2K' is 2048, 4096, ..., 65536. The result is sorted
    and without repeats.

    Raises:
      UsageError: empty list, a non-positive length, or a malformed item (names it).
    """
    items = [item.strip() for item in text.split(",") if item.strip()]
    if not items:
        raise UsageError(f"no context lengths in {text!r}")
    lengths: set[int] = set()
    for item in items:
        parts = item.split(":")
        if len(parts) == 1:
            values = [parse_token_count(parts[0])]
        elif len(parts) == 3:
            start, stop, step = map(parse_token_count, parts)
            if step < 1 or stop < start:
                raise UsageError(f"range {item!r} needs START <= STOP and STEP >= 1")
            values = list(range(start, stop + 1, step))
        else:
            raise UsageError(f"{item!r} is neither a length nor a START:STOP:STEP range")
        for value in values:
            if value < 1:
                raise UsageError(f"context lengths must be >= 1 token, got {value} in {item!r}")
        lengths.update(values)
    return sorted(lengths)


def format_tokens(count: int) -> str:
    """4096 -> '4K', 1536 -> '1.5K', 1000 -> '1000'."""
    if count >= 1024 and count % 512 == 0:
        return f"{count / 1024:g}K"
    return str(count)


def write_atomically(path: str, write: Callable[[str], None]) -> None:
    """Calls write(temporary path) then renames it to `path`, so readers never see half a file.

    The temporary file sits beside `path` and is created by `write` itself, so it gets the
    usual permissions (umask), not mkstemp's owner-only ones.
    """
    directory, name = os.path.split(os.path.abspath(path))
    staging = os.path.join(directory, f".{name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        write(staging)
        os.replace(staging, path)
    except BaseException:
        if os.path.exists(staging):
            os.remove(staging)
        raise


def prepare_out_dir(out_dir: str) -> str:
    """Creates the output directory (and parents); returns its absolute path."""
    out_dir = os.path.abspath(out_dir)
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise UsageError(f"--out {out_dir} exists and is not a directory")
    os.makedirs(out_dir, exist_ok=True)
    return out_dir


def finite_or_nan(value: float) -> str:
    """A float for a CSV cell: 6 significant digits, 'nan' when undefined."""
    return "nan" if not math.isfinite(value) else f"{value:.6g}"
