"""Text corpora as token documents: jsonl through a tokenizer, and the local stdlib as bytes."""

from __future__ import annotations

import itertools
import json
import logging
import os
import sysconfig
from collections.abc import Iterable, Iterator, Sequence
from typing import Protocol

import numpy as np

logger = logging.getLogger(__name__)

# Directories under the stdlib path that hold installed third-party packages, not the stdlib.
_NOT_STDLIB = frozenset({"site-packages", "dist-packages", "__pycache__"})


class DocumentTokenizer(Protocol):
    """What `jsonl_documents` needs from a tokenizer."""

    end_of_document: int

    def encode(self, text: str) -> Sequence[int]: ...


def jsonl_documents(
    path: str | os.PathLike, tokenizer: DocumentTokenizer, field: str = "text"
) -> Iterator[list[int]]:
    """Yields each line's `field` tokenized, followed by `tokenizer.end_of_document`.

    One JSON object per line, as make_data.py reads; blank lines are skipped. The documents can be
    packed in memory (`pack_documents`) or streamed into a binidx pair (`write_binidx`).

    Args:
      path: the .jsonl file (UTF-8).
      tokenizer: anything with `encode(str) -> list[int]` and an `end_of_document` id.
      field: the key holding each document's text.

    Raises:
      ValueError: a line is not valid JSON, not an object, or lacks a string `field`; the message
        gives `path:line`.
    """
    path = os.fspath(path)
    with open(path, encoding="utf-8") as lines:
        for line_number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{line_number}: invalid JSON ({e.msg})") from e
            if not isinstance(record, dict):
                raise ValueError(
                    f"{path}:{line_number}: expected a JSON object, got {type(record).__name__}"
                )
            text = record.get(field)
            if not isinstance(text, str):
                found = "no such key" if field not in record else type(text).__name__
                raise ValueError(
                    f"{path}:{line_number}: expected a string field {field!r}, found {found}"
                )
            yield [*tokenizer.encode(text), tokenizer.end_of_document]


def pack_documents(documents: Iterable[Sequence[int]], dtype=np.int32) -> np.ndarray:
    """Concatenates documents (each already ending with its separator) into one flat stream."""
    return np.fromiter(itertools.chain.from_iterable(documents), dtype=dtype)


def stdlib_source_paths() -> list[str]:
    """The local standard library's `*.py` files, relative to its root, sorted (POSIX form).

    Third-party packages that some installs keep under the stdlib directory (site-packages,
    dist-packages) are left out, so the list depends only on the Python build.
    """
    root = sysconfig.get_paths()["stdlib"]
    paths = []
    for directory, subdirectories, files in os.walk(root):
        subdirectories[:] = [d for d in subdirectories if d not in _NOT_STDLIB]
        relative = os.path.relpath(directory, root)
        for name in files:
            if name.endswith(".py"):
                path = name if relative == "." else os.path.join(relative, name)
                paths.append(path.replace(os.sep, "/"))
    return sorted(paths)


def stdlib_documents(max_bytes: int | None = None) -> Iterator[bytes]:
    """Yields the stdlib source files' bytes, each followed by a NUL byte, in path order.

    Stops once `max_bytes` bytes (terminators included) have been yielded; the last document
    may then be cut short. A file containing NUL (never valid Python source) is skipped with a
    warning, so NUL always means end of document.
    """
    root = sysconfig.get_paths()["stdlib"]
    total = 0
    for path in stdlib_source_paths():
        if max_bytes is not None and total >= max_bytes:
            return
        with open(os.path.join(root, path), "rb") as f:
            source = f.read()
        if b"\0" in source:
            logger.warning("stdlib corpus: skipping %s, it contains NUL bytes", path)
            continue
        document = source + b"\0"
        if max_bytes is not None:
            document = document[: max_bytes - total]
        total += len(document)
        yield document


def stdlib_corpus_tokens(max_bytes: int | None = None) -> np.ndarray:
    """The `tiny` model's built-in corpus: local stdlib Python source as byte tokens.

    Token id = byte value (vocabulary 256); 0 ends each document (one document per file, files
    sorted by relative path). Deterministic for a given Python installation; needs no download.
    The whole stdlib is roughly 30 MB; pass `max_bytes` to read only a prefix.

    Returns:
      uint8 [n] tokens, n <= max_bytes.
    """
    return np.frombuffer(b"".join(stdlib_documents(max_bytes)), dtype=np.uint8)
