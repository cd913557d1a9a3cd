"""The shared frame of the package's command lines: user errors as one line, exit statuses."""

from __future__ import annotations

import sys
from collections.abc import Callable


def run_cli(prog: str, run: Callable[[], None]) -> int:
    """Runs a CLI body; returns its exit status: 0, 1 for a user error (one line on stderr,
    "prog: error: reason"), 130 on Ctrl-C.

    Every user-facing error of this package is a ValueError subclass with the reason in its
    message (ConfigError, CheckpointError, StateFileError, StateMismatchError, ...); OSErrors
    (missing or unreadable files) are reported the same way.
    """
    if hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(errors="replace")
    try:
        run()
    except (ValueError, OSError) as err:
        message = " ".join(str(err).split()) or type(err).__name__
        print(f"{prog}: error: {message}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    return 0
