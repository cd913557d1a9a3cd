"""Files written whole or not at all: a temporary file beside the target, then a rename."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable


def write_atomically(path: str | os.PathLike, write: Callable[[str], None]) -> None:
    """Calls write(temporary path), then renames that file to `path`.

    Readers never see half a file, and a failed or interrupted write leaves nothing behind. The
    temporary file has the target's own name inside a temporary folder beside it (`torch.save`
    names the archive inside its zip after the file) and is created by `write`, so it gets the
    usual permissions (umask), not mkstemp's owner-only ones.

    Raises:
      FileNotFoundError: the folder `path` is to be written in does not exist (it is never
        created here: a mistyped output path should fail, not grow a tree of folders).
    """
    path = os.path.abspath(os.fspath(path))
    directory, name = os.path.split(path)
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"{path}: the folder {directory} does not exist")
    staging = tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=directory)
    try:
        staged = os.path.join(staging, name)
        write(staged)
        descriptor = os.open(staged, os.O_RDONLY)
        try:
            os.fsync(descriptor)
        finally:
            os.close(descriptor)
        os.replace(staged, path)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def write_text_atomically(path: str | os.PathLike, text: str) -> None:
    """Writes `text` (UTF-8) to `path` with `write_atomically`."""

    def write(staged: str) -> None:
        with open(staged, "w", encoding="utf-8") as f:
            f.write(text)

    write_atomically(path, write)
