"""Next-token loss by position in a long context (PG19-style), in bounded memory.

python -m rwkvx_jax.evals.long_loss --checkpoint DIR --files pg19/test --context 65536 \\
    --buckets 16 --out runs/long_loss
python -m rwkvx_jax.evals.long_loss --demo --files README.md --context 2048 --out /tmp/ll

Each text file (a directory stands for the *.txt files in it) is tokenized and read from its
start in windows of `--context` tokens. The model reads a window in prefill pieces through the
decoding engine (SPEC §6: exactly the logits of one parallel forward while the KV cache holds
the window, which it does by default), so memory is the recurrent state, the KV cache and one
piece's logits, whatever the context. The loss at position p is -log P(token p | tokens 0..p-1)
(p >= 1). Positions are grouped in buckets; OUT/long_loss.csv holds each bucket's mean loss per
file and over all files (token-weighted), OUT/long_loss.png plots it, and
OUT/long_loss_positions.npz keeps the per-position sums and counts (to re-bucket without
recomputing).
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import glob
import math
import os
import sys
from collections.abc import Sequence

import jax
import numpy as np

from rwkvx_jax.atomic_files import write_atomically
from rwkvx_jax.cli import (
    Parser,
    UsageError,
    add_decode_arguments,
    add_model_arguments,
    decode_config_from_args,
    int_at_least,
    load_model,
    parse_token_count,
    run_cli,
)
from rwkvx_jax.config import RWKVXConfig
from rwkvx_jax.decoding.decoder import DecodeConfig, Decoder
from rwkvx_jax.evals.common import finite_or_nan, format_tokens, prepare_out_dir
from rwkvx_jax.model import RWKVX, bare_params
from rwkvx_jax.tokenizer import Tokenizer, tokenizer_for_vocab
from rwkvx_jax.training.losses import token_cross_entropy

PROG = "python -m rwkvx_jax.evals.long_loss"
CSV_NAME = "long_loss.csv"
PLOT_NAME = "long_loss.png"
POSITIONS_NAME = "long_loss_positions.npz"
FIELDS = ("file", "bucket", "start", "end", "tokens", "mean_loss", "perplexity")
ALL_FILES = "ALL"
SPACINGS = ("linear", "log")
# Per-file lines are drawn only up to this many files (beyond it they are noise).
MAX_FILE_LINES = 20


class PositionLoss:
    """Per-position next-token losses of long sequences, computed piece by piece.

    Each piece goes through the model's decoding mode (`decode_state`), which continues the
    recurrent state and KV cache of the previous piece and returns logits for every token of
    the piece; the loss is taken inside the compiled function, so only [B, piece] floats come
    back. Exact (same losses as one parallel `forward`) while a sequence fits the KV cache.

    Example:
      losses = PositionLoss(config, params).losses([tokens])  # [1, len(tokens) - 1]
    """

    def __init__(self, config: RWKVXConfig, params, decode_config: DecodeConfig | None = None):
        """Builds the compiled piece function (compiled on first use).

        Args:
          config: the model config.
          params: its Flax parameter tree.
          decode_config: cache size (None: sized per call to hold the longest sequence, so the
            result is exact), eviction, prefill piece. Only attention_mode "train".
        """
        decode_config = decode_config or DecodeConfig()
        if decode_config.attention_mode != "train":
            raise ValueError(
                "long-context loss runs the training semantics (attention_mode='train'); the "
                "official mode reads a sequence in one call, so its memory is not bounded"
            )
        params = bare_params(params)
        self.config = config
        self.params = params
        self.decode_config = decode_config
        model = RWKVX(config)
        policy = decode_config.eviction

        def piece_losses(params, state, inputs, targets, n_valid):
            logits, state = model.apply(
                {"params": params}, inputs, decode_state=state, n_valid=n_valid,
                cache_policy=policy,
            )  # fmt: skip
            return token_cross_entropy(logits, targets), state

        self._piece = jax.jit(piece_losses, donate_argnums=(1,))
        self._decoders: dict[int | None, Decoder] = {}

    def decoder(self, longest: int) -> Decoder:
        """The resolved decode settings and state factory for sequences up to `longest` (its
        weights are not used: the pieces run `self.params`, so it keeps them as trained rather
        than a transposed copy)."""
        cache = self.decode_config.cache_size
        if cache is None and self.config.n_attn_layer:
            chunk = self.config.chunk_size
            cache = max(-(-longest // chunk) + 1, max(self.config.top_k - 1, 1) + 1) * chunk
        if cache not in self._decoders:
            dc = dataclasses.replace(self.decode_config, cache_size=cache, kernel_layout="in_out")
            self._decoders[cache] = Decoder(self.config, self.params, dc)
        return self._decoders[cache]

    def losses(
        self, sequences: Sequence[Sequence[int]], *, capacity: int | None = None, progress=None
    ) -> np.ndarray:
        """Loss of every token after the first, for a batch of sequences.

        Args:
          sequences: B token lists (any lengths >= 2).
          capacity: with the default cache, size it for sequences of up to this many tokens
            (one compiled shape for many calls); None: the longest sequence given.
          progress: a tqdm bar to advance by the tokens read, or None.

        Returns:
          float32 [B, T - 1] with T the longest sequence: entry [b, t] is -log P(token t + 1 |
          tokens 0..t) of sequence b; NaN past a sequence's end.
        """
        lengths = np.array([len(s) for s in sequences], np.int64)
        if not len(lengths) or lengths.min() < 2:
            raise ValueError(
                f"every sequence needs at least 2 tokens (one to predict from), got lengths "
                f"{lengths.tolist()}"
            )
        decoder = self.decoder(max(int(lengths.max()), capacity or 0))
        piece = decoder.decode_config.prefill_chunk
        batch, width = len(sequences), int(lengths.max()) - 1
        n_pieces = -(-width // piece)
        tokens = np.zeros((batch, n_pieces * piece + 1), np.int32)
        for row, sequence in enumerate(sequences):
            tokens[row, : len(sequence)] = sequence
        if tokens.min() < 0 or tokens.max() >= self.config.vocab_size:
            raise ValueError(
                f"token ids must lie in [0, {self.config.vocab_size}); got values in "
                f"[{tokens.min()}, {tokens.max()}]"
            )
        inputs_valid = lengths - 1
        out = np.full((batch, n_pieces * piece), np.nan, np.float32)
        state = decoder.init_state(batch)
        for start in range(0, n_pieces * piece, piece):
            n_valid = np.clip(inputs_valid - start, 0, piece).astype(np.int32)
            losses, state = self._piece(
                self.params,
                state,
                tokens[:, start : start + piece],
                tokens[:, start + 1 : start + piece + 1],
                n_valid,
            )
            losses = np.asarray(losses)
            real = np.arange(piece)[None] < n_valid[:, None]
            out[:, start : start + piece] = np.where(real, losses, np.nan)
            if progress is not None:
                progress.update(int(n_valid.sum()))
        return out[:, :width]


# ---------------------------------------------------------------------------------------------
# Inputs


def expand_files(spec: str | Sequence[str]) -> list[str]:
    """Text files from 'a.txt,b.txt' (or a list); a directory stands for its *.txt files.

    Raises:
      UsageError: nothing given, a path that does not exist, a directory without *.txt.
    """
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    items = [item.strip() for item in items if item.strip()]
    if not items:
        raise UsageError("no text files given")
    files = []
    for item in items:
        if os.path.isdir(item):
            found = sorted(glob.glob(os.path.join(item, "*.txt")))
            if not found:
                raise UsageError(f"{item}: directory without *.txt files")
            files.extend(found)
        elif os.path.isfile(item):
            files.append(item)
        else:
            raise UsageError(f"{item}: no such file or directory")
    return files


def file_windows(
    path: str, tokenizer: Tokenizer, context: int, windows_per_file: int = 1
) -> list[list[int]]:
    """The first `windows_per_file` consecutive windows of `context` tokens of a text file.

    The last window may be shorter (down to 2 tokens); a file shorter than `context` gives one
    short window and contributes to the early positions only.

    Raises:
      UsageError: unreadable or non-UTF-8 file, or fewer than 2 tokens.
    """
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except UnicodeDecodeError as err:
        raise UsageError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start})") from None
    tokens = tokenizer.encode(text)
    if len(tokens) < 2:
        raise UsageError(f"{path}: {len(tokens)} token(s); at least 2 are needed for a loss")
    windows = []
    for start in range(0, min(len(tokens), windows_per_file * context), context):
        window = tokens[start : start + context]
        if len(window) >= 2:
            windows.append(window)
    return windows


# ---------------------------------------------------------------------------------------------
# Buckets


def bucket_edges(context: int, buckets: int, spacing: str = "linear") -> np.ndarray:
    """Bucket boundaries over positions [0, context): int [n + 1], increasing.

    "linear": `buckets` equal widths from 0 (position 0 has no loss, so the first bucket has
    one position fewer). "log": geometric widths from position 1, for a view of the first
    tokens; duplicate boundaries at small positions are merged, so there may be fewer buckets.
    """
    if context < 2:
        raise ValueError(f"context must be >= 2 tokens, got {context}")
    if spacing not in SPACINGS:
        raise ValueError(f"spacing must be one of {SPACINGS}, got {spacing!r}")
    if not 1 <= buckets <= context - 1:
        raise ValueError(
            f"buckets must be in [1, {context - 1}] for context {context}, got {buckets}"
        )
    if spacing == "linear":
        return np.round(np.linspace(0, context, buckets + 1)).astype(np.int64)
    edges = np.round(np.geomspace(1, context, buckets + 1)).astype(np.int64)
    return np.unique(edges)


@dataclasses.dataclass(frozen=True)
class BucketLoss:
    """Mean loss of one bucket of positions [start, end) for one file (or ALL)."""

    file: str
    bucket: int
    start: int
    end: int
    tokens: int
    mean_loss: float

    @property
    def perplexity(self) -> float:
        return math.exp(self.mean_loss) if self.tokens and self.mean_loss < 700 else math.inf


def bucket_losses(
    loss_sum: np.ndarray, count: np.ndarray, edges: np.ndarray, file: str = ALL_FILES
) -> list[BucketLoss]:
    """Token-weighted mean loss per bucket from per-position sums and counts ([context] each).

    Buckets without tokens get NaN.
    """
    rows = []
    for index, (start, end) in enumerate(zip(edges[:-1], edges[1:], strict=True)):
        tokens = int(count[start:end].sum())
        total = float(loss_sum[start:end].sum())
        mean = total / tokens if tokens else math.nan
        rows.append(BucketLoss(file, index, int(start), int(end), tokens, mean))
    return rows


# ---------------------------------------------------------------------------------------------
# Outputs


def write_csv(rows: Sequence[BucketLoss], path: str) -> None:
    """Writes the bucket table, atomically."""

    def write(staging: str) -> None:
        with open(staging, "w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f)
            writer.writerow(FIELDS)
            for r in rows:
                writer.writerow(
                    [r.file, r.bucket, r.start, r.end, r.tokens]
                    + [finite_or_nan(r.mean_loss), finite_or_nan(r.perplexity)]
                )

    write_atomically(path, write)


def plot_losses(rows: Sequence[BucketLoss], path: str, *, log_x: bool = False, title=None) -> None:
    """Line plot of mean loss against position (bucket centres): ALL bold, files thin."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7.5, 4.5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    by_file: dict[str, list[BucketLoss]] = {}
    for r in rows:
        by_file.setdefault(r.file, []).append(r)
    files = [f for f in by_file if f != ALL_FILES]

    def centres_and_losses(series):
        kept = [r for r in series if r.tokens]
        return [(r.start + r.end - 1) / 2 for r in kept], [r.mean_loss for r in kept]

    if 1 < len(files) <= MAX_FILE_LINES:
        for name in files:
            x, y = centres_and_losses(by_file[name])
            ax.plot(x, y, linewidth=0.8, alpha=0.45, label=os.path.basename(name))
    if ALL_FILES in by_file:
        x, y = centres_and_losses(by_file[ALL_FILES])
        label = (
            f"all {len(files)} files"
            if len(files) > 1
            else os.path.basename(files[0])
            if files
            else "all"
        )
        ax.plot(x, y, color="black", linewidth=2.0, marker="o", markersize=3, label=label)
    if log_x:
        ax.set_xscale("log")
    else:
        ax.xaxis.set_major_formatter(
            lambda value, _: format_tokens(int(value)) if value >= 0 else ""
        )
    ax.set_xlabel("Position in context (tokens)")
    ax.set_ylabel("Mean next-token loss (nats)")
    ax.set_title(title or "Loss by context position")
    ax.grid(alpha=0.3)
    if len(files) <= MAX_FILE_LINES:
        ax.legend(fontsize="small")
    fig.tight_layout()
    write_atomically(path, lambda staging: fig.savefig(staging, dpi=120, format="png"))


def format_table(rows: Sequence[BucketLoss]) -> str:
    """The ALL rows as a text table."""
    lines = ["positions          tokens  mean loss  perplexity"]
    for r in rows:
        if r.file == ALL_FILES:
            span = f"{r.start}-{r.end - 1}"
            lines.append(
                f"{span:>15} {r.tokens:>9} {finite_or_nan(r.mean_loss):>10} "
                f"{finite_or_nan(r.perplexity):>11}"
            )
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# The whole evaluation


@dataclasses.dataclass(frozen=True)
class LongLossRun:
    """What `run_long_loss` computed and wrote.

    Attributes:
      rows: per-file bucket rows, then the ALL rows.
      loss_sum: float64 [context], summed loss at each position over all windows.
      count: int64 [context], windows with a loss at each position.
      csv_path, plot_path, positions_path: the files written.
    """

    rows: list[BucketLoss]
    loss_sum: np.ndarray
    count: np.ndarray
    csv_path: str
    plot_path: str
    positions_path: str


def run_long_loss(
    model: PositionLoss,
    files: str | Sequence[str],
    out_dir: str,
    *,
    context: int,
    buckets: int = 16,
    spacing: str = "linear",
    windows_per_file: int = 1,
    batch_size: int = 1,
    tokenizer: Tokenizer | None = None,
    progress: bool = True,
) -> LongLossRun:
    """Mean next-token loss per position bucket over text files; writes CSV, PNG and NPZ.

    Example:
      run = run_long_loss(PositionLoss(config, params), "pg19/test", "out", context=65536)

    Args:
      model: the model and its decode settings (keep one to reuse its compiled code).
      files: text files ('a.txt,b.txt' or a list; directories give their *.txt).
      out_dir: output directory (created).
      context: tokens per window (the longest context measured).
      buckets: position buckets over [0, context).
      spacing: "linear" or "log" bucket widths (`bucket_edges`).
      windows_per_file: consecutive windows read from each file's start.
      batch_size: windows read together.
      tokenizer: None picks the model vocabulary's.
      progress: show a progress bar over tokens.

    Raises:
      ValueError: bad sizes, missing or unreadable files (names them).
    """
    if context < 2:
        raise ValueError(f"context must be >= 2 tokens, got {context}")
    for name, value in (("windows_per_file", windows_per_file), ("batch_size", batch_size)):
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    edges = bucket_edges(context, buckets, spacing)
    model.decoder(context)  # a cache size that does not fit the model fails here, before any work
    paths = expand_files(files)
    tokenizer = tokenizer or tokenizer_for_vocab(model.config.vocab_size)
    windows = []  # (file index, tokens)
    for index, path in enumerate(paths):
        windows.extend((index, w) for w in file_windows(path, tokenizer, context, windows_per_file))
    out_dir = prepare_out_dir(out_dir)
    sums = np.zeros((len(paths), context), np.float64)
    counts = np.zeros((len(paths), context), np.int64)
    from tqdm.auto import tqdm

    # Longest first: windows of a batch have similar lengths, so little padding is read.
    windows.sort(key=lambda item: -len(item[1]))
    bar = tqdm(
        total=sum(len(w) - 1 for _, w in windows),
        desc="long loss",
        unit="tok",
        unit_scale=True,
        disable=not progress,
    )
    try:
        for begin in range(0, len(windows), batch_size):
            group = windows[begin : begin + batch_size]
            # A short last batch is padded with copies (results dropped): one compiled shape.
            padded = [w for _, w in group] + [group[-1][1]] * (batch_size - len(group))
            losses = model.losses(padded, capacity=context, progress=bar)
            for (index, window), row in zip(group, losses, strict=False):
                n = len(window) - 1
                sums[index, 1 : n + 1] += row[:n]
                counts[index, 1 : n + 1] += 1
    finally:
        bar.close()
    rows = []
    for index, path in enumerate(paths):
        rows.extend(bucket_losses(sums[index], counts[index], edges, file=path))
    loss_sum, count = sums.sum(axis=0), counts.sum(axis=0)
    rows.extend(bucket_losses(loss_sum, count, edges))
    csv_path = os.path.join(out_dir, CSV_NAME)
    plot_path = os.path.join(out_dir, PLOT_NAME)
    positions_path = os.path.join(out_dir, POSITIONS_NAME)
    write_csv(rows, csv_path)
    plot_losses(rows, plot_path, log_x=spacing == "log")

    def write_positions(staging: str) -> None:
        with open(staging, "wb") as f:
            np.savez(f, loss_sum=loss_sum, count=count, edges=edges)

    write_atomically(positions_path, write_positions)
    return LongLossRun(rows, loss_sum, count, csv_path, plot_path, positions_path)


# ---------------------------------------------------------------------------------------------
# Command line


def _parser() -> Parser:
    parser = Parser(
        prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_model_arguments(parser)
    add = parser.add_argument
    add("--files", required=True, help="text files, comma-separated; a directory = its *.txt files")
    add("--context", required=True, metavar="TOKENS", help="tokens per window, e.g. 65536 or 64K")
    add(
        "--buckets",
        type=int_at_least(1),
        default=16,
        metavar="N",
        help="position buckets (default 16)",
    )
    add("--spacing", choices=SPACINGS, default="linear", help="bucket widths (default linear)")
    add(
        "--windows-per-file",
        type=int_at_least(1),
        default=1,
        metavar="N",
        help="windows read from each file's start (default 1)",
    )
    add(
        "--batch-size",
        type=int_at_least(1),
        default=1,
        metavar="N",
        help="windows read together (default 1)",
    )
    add("--out", required=True, metavar="DIR", help="output directory")
    add_decode_arguments(
        parser,
        cache_default="the whole window, exact; smaller evicts chunks: constant memory, "
        "approximate",
        attention_mode=False,
    )
    add("--no-progress", action="store_true", help="no progress bar")
    return parser


def _run(args) -> None:
    context = parse_token_count(args.context)
    if context < 2:
        raise UsageError(f"--context must be at least 2 tokens, got {context}")
    bucket_edges(context, args.buckets, args.spacing)  # size errors before loading the model
    files = expand_files(args.files)
    config, params, model_name = load_model(args)
    decode_config = decode_config_from_args(args)
    run = run_long_loss(
        PositionLoss(config, params, decode_config),
        files,
        args.out,
        context=context,
        buckets=args.buckets,
        spacing=args.spacing,
        windows_per_file=args.windows_per_file,
        batch_size=args.batch_size,
        progress=not args.no_progress,
    )
    print(f"model {model_name}, {len(files)} file(s), context {context} tokens")
    print(format_table(run.rows))
    print(f"results: {run.csv_path}\nplot: {run.plot_path}\npositions: {run.positions_path}")


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the command line; returns the exit status (errors: one line on stderr)."""
    args = _parser().parse_args(argv)
    return run_cli(PROG, lambda: _run(args))


if __name__ == "__main__":
    sys.exit(main())
