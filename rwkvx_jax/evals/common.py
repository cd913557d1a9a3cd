"""Pieces shared by the evaluation tools: context-length lists, labels, output folders, cells."""

from __future__ import annotations

import math
import os

from rwkvx_jax.cli import UsageError, parse_token_count


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


def prepare_out_dir(out_dir: str) -> str:
    """Creates the output directory (not its parents: a mistyped path should fail); returns
    its absolute path."""
    out_dir = os.path.abspath(out_dir)
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise UsageError(f"--out {out_dir} exists and is not a directory")
    parent = os.path.dirname(out_dir)
    if not os.path.isdir(parent):
        raise UsageError(f"--out {out_dir}: the folder {parent} does not exist")
    os.makedirs(out_dir, exist_ok=True)
    return out_dir


def finite_or_nan(value: float) -> str:
    """A float for a CSV cell: 6 significant digits, 'nan' when undefined."""
    return "nan" if not math.isfinite(value) else f"{value:.6g}"
