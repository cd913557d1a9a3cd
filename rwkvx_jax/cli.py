"""What every command line of the package shares: parser, user errors, numbers, common flags.

Every tool (`train.py` / `rwkvx-train`, `convert_torch.py` / `rwkvx-convert`,
`rwkvx-generate`, the evals) behaves alike through `run_cli`:

* exit status 0 when done, `EXIT_USAGE` (2) for a user error (bad flags, a missing, corrupt or
  mismatched file, an unusable config), `EXIT_FAILED` (1) when the run itself failed (a model
  that does not fit, a non-finite loss), `EXIT_INTERRUPTED` (130) on Ctrl-C;
* a user error is one line on stderr, `prog: error: reason`, on a line of its own (never inside
  a progress bar) and with no traceback;
* Ctrl-C stops with one line saying so and, where the tool can resume, how.

Library code raises; only this module decides what the user sees.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from collections.abc import Callable

from rwkvx_jax.config import RWKVXConfig
from rwkvx_jax.decoding.decoder import ATTENTION_MODES, DecodeConfig
from rwkvx_jax.sparse.kv_cache import EVICTION_POLICIES

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


class UsageError(ValueError):
    """A command-line input is unusable; the message says which and why."""


class RunFailed(RuntimeError):
    """The run was started properly and failed; the message says why (exit `EXIT_FAILED`)."""


class Parser(argparse.ArgumentParser):
    """argparse that exits with `EXIT_USAGE` and points at --help on errors."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message):
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see --help)\n")


def _one_line(err: BaseException) -> str:
    """An exception's message as one line (chained causes are not the user's business)."""
    if isinstance(err, OSError) and err.filename and err.strerror:
        text = f"{err.filename}: {err.strerror}"
    else:
        text = str(err)
    return " ".join(text.split()) or type(err).__name__


def run_cli(prog: str, run: Callable[[], int | None], *, resume_hint: str | None = None) -> int:
    """Runs a command-line body and returns its exit status (see the module docstring).

    Args:
      prog: the tool's name, the first word of its error lines.
      run: the body; returns None or an exit status. It raises a ValueError subclass (every
        user-facing error of this package is one: ConfigError, CheckpointError,
        StateFileError, ...), an OSError (missing or unreadable files) or an ImportError (an
        optional dependency is missing) for user errors, `RunFailed` when the run failed.
      resume_hint: said after an interruption, e.g. "run the same command again to resume".
    """
    if hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(errors="replace")
    try:
        status = run()
    except (ValueError, OSError, ImportError) as err:
        _say(f"{prog}: error: {_one_line(err)}")
        return EXIT_USAGE
    except RunFailed as err:
        _say(f"{prog}: failed: {_one_line(err)}")
        return EXIT_FAILED
    except KeyboardInterrupt as err:
        detail = f" ({_one_line(err)})" if str(err) else ""
        hint = f"; {resume_hint}" if resume_hint else ""
        _say(f"{prog}: interrupted{detail}{hint}")
        return EXIT_INTERRUPTED
    return EXIT_OK if status is None else status


def _say(line: str) -> None:
    """A line on stderr, on a line of its own: progress bars still open (the error stopped the
    loop that drew them) are closed first, so the line never lands inside one."""
    from tqdm.std import tqdm

    for bar in list(getattr(tqdm, "_instances", ())):
        bar.close()
    sys.stdout.flush()
    print(line, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# Argument types


def number(kind: type, low=None, high=None, *, low_open: bool = False, text: str = ""):
    """An argparse type: a finite `kind` (int or float) in [low, high] ((low, high] with
    low_open); `text` says what was expected in the error."""
    text = text or _expected(kind, low, high, low_open)

    def parse(value: str):
        try:
            parsed = kind(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {text}, got {value!r}") from None
        too_low = low is not None and (parsed <= low if low_open else parsed < low)
        too_high = high is not None and parsed > high
        if not math.isfinite(parsed) or too_low or too_high:
            raise argparse.ArgumentTypeError(f"expected {text}, got {value}")
        return parsed

    return parse


def _expected(kind, low, high, low_open) -> str:
    name = "an int" if kind is int else "a number"
    if low is not None and high is not None:
        return f"{name} in {'(' if low_open else '['}{low}, {high}]"
    if low is not None:
        return f"{name} {'>' if low_open else '>='} {low}"
    if high is not None:
        return f"{name} <= {high}"
    return f"{name}" if kind is int else "a finite number"


def int_at_least(low: int) -> Callable[[str], int]:
    """An argparse type: an int >= low."""
    return number(int, low=low)


def parse_token_count(text: str) -> int:
    """'4096', '4K' or '4k' (K = 1024 tokens) -> int.

    Raises:
      UsageError: not a whole number of tokens.
    """
    text = text.strip()
    scale = 1
    if text[-1:] in ("k", "K"):
        text, scale = text[:-1], 1024
    try:
        value = int(text)
    except ValueError:
        raise UsageError(f"expected a token count like 4096 or 4K, got {text!r}") from None
    return value * scale


def output_path(path: str, flag: str) -> str:
    """An output file's absolute path, checked before any work: its folder must exist.

    Raises:
      UsageError: the folder does not exist (it is not created: a mistyped path fails here),
        or the path is a directory.
    """
    absolute = os.path.abspath(path)
    folder = os.path.dirname(absolute)
    if not os.path.isdir(folder):
        raise UsageError(f"{flag} {path}: the folder {folder} does not exist")
    if os.path.isdir(absolute):
        raise UsageError(f"{flag} {path} is a directory; expected a file path")
    return absolute


# ---------------------------------------------------------------------------------------------
# Flags shared by several tools


def add_model_arguments(parser: argparse.ArgumentParser, demo_help: str | None = None) -> None:
    """--checkpoint DIR | --demo (exactly one)."""
    model = parser.add_mutually_exclusive_group(required=True)
    model.add_argument(
        "--checkpoint",
        metavar="DIR",
        help="a converted checkpoint directory, or a train.py run directory (its exported params)",
    )
    model.add_argument(
        "--demo",
        action="store_true",
        help=demo_help
        or "a random tiny model instead (byte vocabulary; no checkpoint needed, output is noise)",
    )


def load_model(args) -> tuple[RWKVXConfig, dict, str]:
    """(config, params, model name) for the --checkpoint / --demo flags."""
    if args.demo:
        from rwkvx_jax.checkpoints.random_weights import demo_model

        config, params = demo_model()
        return config, params, "demo"
    from rwkvx_jax.api import load
    from rwkvx_jax.checkpoints.directory import find_checkpoint

    path = find_checkpoint(args.checkpoint)
    config, params = load(path)
    return config, params, path


def add_decode_arguments(
    parser: argparse.ArgumentParser,
    *,
    cache_default: str,
    prefill_default: str = "512",
    attention_mode: bool = True,
) -> None:
    """--cache-size, --eviction, --prefill-chunk and (attention_mode) --attention-mode.

    Each defaults to None, meaning `DecodeConfig`'s default or the tool's own; the help texts
    say what that is (`cache_default`, `prefill_default`). `decode_config_from_args` turns them
    into a `DecodeConfig`.
    """
    add = parser.add_argument
    add(
        "--cache-size",
        type=int_at_least(1),
        default=None,
        metavar="TOKENS",
        help=f"KV cache per sparse block and sequence (default {cache_default})",
    )
    add(
        "--eviction",
        choices=EVICTION_POLICIES,
        default=None,
        help="what leaves a full KV cache (default distinct)",
    )
    add(
        "--prefill-chunk",
        type=int_at_least(1),
        default=None,
        metavar="TOKENS",
        help=f"tokens per prefill piece (default {prefill_default})",
    )
    if attention_mode:
        add(
            "--attention-mode",
            choices=ATTENTION_MODES,
            default=None,
            help="sparse attention of training (default) or of the official runtime",
        )


def decode_config_from_args(args, **overrides) -> DecodeConfig:
    """The `DecodeConfig` of the flags `add_decode_arguments` added (None: the default);
    `overrides` set fields the tool decides itself."""
    fields = {
        "cache_size": args.cache_size,
        "eviction": args.eviction or "distinct",
        "prefill_chunk": args.prefill_chunk,
        "attention_mode": getattr(args, "attention_mode", None) or "train",
    }
    fields.update(overrides)
    return DecodeConfig(**fields)
