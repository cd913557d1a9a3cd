"""Passkey retrieval (SPEC §8): a grid of context lengths x needle depths x seeds, resumable.

python -m rwkvx_jax.evals.passkey --checkpoint DIR --lengths 2K:64K:2K --depths 10 --seeds 5 \\
    --out runs/passkey
python -m rwkvx_jax.evals.passkey --demo --lengths 512,1024 --depths 3 --seeds 2 --out /tmp/pk

The prompt is the task description, a haystack of the five sentences "The grass is green. The
sky is blue. The sun is yellow. Here we go. There and back again." repeated, the line "The pass
key is N. Remember it. N is the pass key." after a chosen fraction (depth) of the haystack
sentences, and the question "What is the pass key? The pass key is". The model continues it
greedily; a prompt counts as correct when the first run of digits it writes is exactly N.

Lengths are in tokens of the model's tokenizer: each prompt has the largest number of whole
haystack sentences that keeps it within the target, so it is at most one sentence shorter.
Results go row by row to OUT/passkey.csv (rerunning skips rows already there, so an
interrupted or extended grid only computes what is missing), then OUT/passkey_heatmap.png
(x = context length, y = depth, colour = accuracy over seeds) and a summary table.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import logging
import os
import re
import sys
import time
from collections.abc import Iterable, Sequence

import jax
import jax.numpy as jnp
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
    run_cli,
)
from rwkvx_jax.config import RWKVXConfig
from rwkvx_jax.data.passkey import (
    DEFAULT_KEY_DIGITS,
    HAYSTACK,
    NEEDLE,
    PROMPT_VERSION,
    QUESTION,
    TASK,
    PasskeyPrompt,
    PasskeyPromptBuilder,
    depth_grid,
    passkey_for,
)
from rwkvx_jax.decoding.decoder import DecodeConfig, Decoder
from rwkvx_jax.decoding.sampling import SamplingConfig
from rwkvx_jax.decoding.weights import prepare_decode_weights
from rwkvx_jax.evals.common import format_tokens, parse_lengths, prepare_out_dir
from rwkvx_jax.tokenizer import Tokenizer, tokenizer_for_vocab

PROG = "python -m rwkvx_jax.evals.passkey"
log = logging.getLogger(__name__)


# Tokens generated past the key's own: one to see that the digits stopped, one for a stray
# space or newline before them.
ANSWER_SLACK = 2

CSV_NAME = "passkey.csv"
HEATMAP_NAME = "passkey_heatmap.png"
SETTINGS_NAME = "passkey_settings.json"
FIELDS = (
    "length",
    "depth",
    "seed",
    "key",
    "prompt_tokens",
    "needle_token",
    "answer",
    "correct",
    "seconds",
)

# Pure greedy decoding: no penalties (SamplingConfig's defaults would penalise repeated digits).
GREEDY = SamplingConfig(
    temperature=0.0, top_k=0, top_p=1.0, presence_penalty=0.0, frequency_penalty=0.0
)


# ---------------------------------------------------------------------------------------------
# Scoring

_DIGIT_RUN = re.compile(r"[0-9]+")


def extract_answer(text: str) -> str | None:
    """The first run of ASCII digits in a generated continuation, or None."""
    match = _DIGIT_RUN.search(text)
    return match.group(0) if match else None


def is_correct(text: str, key: str) -> bool:
    """Exact match: the first digit run of `text` is the key, no more and no fewer digits."""
    return extract_answer(text) == key


# ---------------------------------------------------------------------------------------------
# Results file


@dataclasses.dataclass(frozen=True)
class PasskeyResult:
    """One row of the results CSV: one prompt and the model's answer."""

    length: int
    depth: float
    seed: int
    key: str
    prompt_tokens: int
    needle_token: int
    answer: str
    correct: bool
    seconds: float

    @property
    def cell(self) -> tuple[int, str, int]:
        """The identity of the row in the grid: (length, depth as written, seed)."""
        return self.length, depth_label(self.depth), self.seed

    def to_csv(self) -> list[str]:
        return [
            str(self.length),
            depth_label(self.depth),
            str(self.seed),
            self.key,
            str(self.prompt_tokens),
            str(self.needle_token),
            json.dumps(self.answer),  # escaped: a row never spans lines
            str(int(self.correct)),
            f"{self.seconds:.4f}",
        ]

    @classmethod
    def from_csv(cls, row: dict[str, str]) -> PasskeyResult:
        return cls(
            length=int(row["length"]),
            depth=float(row["depth"]),
            seed=int(row["seed"]),
            key=row["key"],
            prompt_tokens=int(row["prompt_tokens"]),
            needle_token=int(row["needle_token"]),
            answer=json.loads(row["answer"]),
            correct=row["correct"] == "1",
            seconds=float(row["seconds"]),
        )


def depth_label(depth: float) -> str:
    """How a depth is written in the CSV (and compared when resuming)."""
    return f"{depth:.4f}"


class ResultsFile:
    """The append-only results CSV.

    The header is written atomically when the file is created; rows are appended and flushed
    one batch at a time. A last line cut short by a crash is dropped on opening (its prompts
    are recomputed). A file whose header differs is refused, never appended to.
    """

    def __init__(self, path: str):
        self.path = path
        if not os.path.exists(path):
            write_atomically(path, self._write_header)
            return
        with open(path, "rb") as f:
            data = f.read()
        if data and not data.endswith(b"\n"):
            keep = data.rfind(b"\n") + 1
            log.warning("%s: dropping an unfinished last line (recomputed)", path)
            with open(path, "r+b") as f:
                f.truncate(keep)
        with open(path, newline="", encoding="utf-8") as f:
            header = next(csv.reader(f), None)
        if header is None:
            write_atomically(path, self._write_header)
        elif tuple(header) != FIELDS:
            raise UsageError(
                f"{path}: header {header} is not a passkey results header {list(FIELDS)}; "
                "choose another --out directory"
            )

    @staticmethod
    def _write_header(path: str) -> None:
        with open(path, "w", newline="", encoding="utf-8") as f:
            csv.writer(f).writerow(FIELDS)

    def rows(self) -> list[PasskeyResult]:
        """Every row in the file, in file order (later duplicates of a cell are dropped)."""
        rows, seen = [], set()
        with open(self.path, newline="", encoding="utf-8") as f:
            for line, record in enumerate(csv.DictReader(f), start=2):
                try:
                    row = PasskeyResult.from_csv(record)
                except (KeyError, TypeError, ValueError) as err:
                    raise UsageError(f"{self.path}:{line}: unreadable row ({err})") from None
                if row.cell not in seen:
                    seen.add(row.cell)
                    rows.append(row)
        return rows

    def append(self, rows: Iterable[PasskeyResult]) -> None:
        """Appends rows and flushes them to disk."""
        with open(self.path, "a", newline="", encoding="utf-8") as f:
            writer = csv.writer(f)
            for row in rows:
                writer.writerow(row.to_csv())
            f.flush()
            os.fsync(f.fileno())


def _check_settings(out_dir: str, settings: dict) -> None:
    """Writes OUT/passkey_settings.json, or checks that an existing one matches `settings`."""
    path = os.path.join(out_dir, SETTINGS_NAME)
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            try:
                saved = json.load(f)
            except json.JSONDecodeError as err:
                raise UsageError(f"{path}: not valid JSON ({err.msg})") from None
        differ = sorted(k for k in set(saved) | set(settings) if saved.get(k) != settings.get(k))
        if differ:
            detail = "; ".join(
                f"{k}: {saved.get(k)!r} there, {settings.get(k)!r} now" for k in differ
            )
            raise UsageError(
                f"{out_dir} holds results of other settings ({detail}); choose another --out "
                "directory so that results never mix"
            )
        return

    def write(staging: str) -> None:
        with open(staging, "w", encoding="utf-8") as f:
            json.dump(settings, f, indent=2, sort_keys=True)
            f.write("\n")

    write_atomically(path, write)


# ---------------------------------------------------------------------------------------------
# Summaries and the heatmap


def accuracy_table(
    rows: Sequence[PasskeyResult],
) -> tuple[list[int], list[float], np.ndarray, np.ndarray]:
    """(lengths, depths, accuracy [depths, lengths] (NaN where no row), rows per cell)."""
    lengths = sorted({r.length for r in rows})
    depths = sorted({float(depth_label(r.depth)) for r in rows})
    correct = np.zeros((len(depths), len(lengths)))
    count = np.zeros((len(depths), len(lengths)), np.int64)
    for row in rows:
        i = depths.index(float(depth_label(row.depth)))
        j = lengths.index(row.length)
        correct[i, j] += row.correct
        count[i, j] += 1
    with np.errstate(invalid="ignore"):
        accuracy = np.where(count > 0, correct / np.maximum(count, 1), np.nan)
    return lengths, depths, accuracy, count


def format_summary(rows: Sequence[PasskeyResult]) -> str:
    """A text table: one line per context length, one column per depth, plus the means."""
    if not rows:
        return "no passkey results"
    lengths, depths, accuracy, count = accuracy_table(rows)
    head = ["length"] + [f"{d * 100:.0f}%" for d in depths] + ["mean"]
    lines = []
    for j, length in enumerate(lengths):
        cells = [_cell(a) for a in accuracy[:, j]]
        lines.append([format_tokens(length)] + cells + [_cell(_mean(accuracy[:, j], count[:, j]))])
    lines.append(["mean"] + [_cell(_mean(accuracy[i], count[i])) for i in range(len(depths))])
    lines[-1].append(_cell(sum(r.correct for r in rows) / len(rows)))
    widths = [max(len(line[c]) for line in [head] + lines) for c in range(len(head))]
    text = [
        " ".join(cell.rjust(w) for cell, w in zip(line, widths, strict=True))
        for line in [head] + lines
    ]
    seeds = sorted({int(c) for c in count.flatten() if c})
    per_cell = "/".join(map(str, seeds))
    correct = sum(r.correct for r in rows)
    return (
        f"passkey accuracy (rows: context length in tokens, columns: depth; {per_cell} "
        f"prompt(s) per cell)\n" + "\n".join(text) + f"\noverall {correct}/{len(rows)} correct"
    )


def _mean(accuracy: np.ndarray, count: np.ndarray) -> float:
    """Accuracy over every prompt of these cells."""
    total = count.sum()
    return float(np.nansum(accuracy * count) / total) if total else float("nan")


def _cell(value: float) -> str:
    return "-" if np.isnan(value) else f"{value:.2f}"


def plot_heatmap(rows: Sequence[PasskeyResult], path: str, title: str | None = None) -> None:
    """Writes the accuracy heatmap PNG: x = context length, y = depth, red (0) to green (1).

    Cells with no rows are left blank. Written atomically.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.colors import LinearSegmentedColormap
    from matplotlib.figure import Figure

    lengths, depths, accuracy, count = accuracy_table(rows)
    cmap = LinearSegmentedColormap.from_list(
        "passkey", ["#d73027", "#fee08b", "#1a9850"]
    ).with_extremes(bad="#f0f0f0")
    width = min(max(6.0, 0.4 * len(lengths) + 2.5), 24.0)
    fig = Figure(figsize=(width, max(3.5, 0.35 * len(depths) + 1.8)))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    image = ax.imshow(
        np.ma.masked_invalid(accuracy),
        cmap=cmap,
        vmin=0.0,
        vmax=1.0,
        aspect="auto",
        interpolation="nearest",
    )
    ax.set_xticks(range(len(lengths)), [format_tokens(n) for n in lengths])
    if len(lengths) > 12:
        ax.tick_params(axis="x", labelrotation=60)
    ax.set_yticks(range(len(depths)), [f"{d * 100:.0f}%" for d in depths])
    ax.set_xticks(np.arange(len(lengths) + 1) - 0.5, minor=True)
    ax.set_yticks(np.arange(len(depths) + 1) - 0.5, minor=True)
    ax.grid(which="minor", color="white", linewidth=1)
    ax.tick_params(which="minor", length=0)
    ax.set_xlabel("Context length (tokens)")
    ax.set_ylabel("Pass-key depth")
    overall = sum(r.correct for r in rows) / len(rows)
    ax.set_title(title or f"Passkey retrieval: accuracy {overall:.1%} over {len(rows)} prompts")
    fig.colorbar(image, ax=ax, label="Accuracy", fraction=0.04, pad=0.02)
    fig.tight_layout()
    write_atomically(path, lambda staging: fig.savefig(staging, dpi=120, format="png"))


# ---------------------------------------------------------------------------------------------
# Running the grid


@dataclasses.dataclass(frozen=True)
class PasskeyRun:
    """What `PasskeyEvaluator.run` did.

    Attributes:
      rows: every row in the results file after the run (earlier runs' rows included).
      computed: prompts evaluated by this run (0 when everything was already there).
      csv_path: the results CSV.
      heatmap_path: the heatmap PNG (None when not plotted).
    """

    rows: list[PasskeyResult]
    computed: int
    csv_path: str
    heatmap_path: str | None


@dataclasses.dataclass(frozen=True)
class _Batch:
    length: int
    depth: float
    seeds: tuple[int, ...]
    needle_start: int


def _copy_state(state):
    """A copy with buffers of its own (decoding consumes the state it is given)."""
    return jax.tree.map(lambda leaf: jnp.array(leaf, copy=True), state)


class PasskeyEvaluator:
    """Runs passkey prompts through one model's decoding engine (greedy, SPEC §8).

    All prompts share their first tokens (task + haystack up to the pass-key line); with
    `reuse_prefix` one running state reads that common stream once, in whole prefill pieces,
    and each batch continues a copy of it, so a grid costs about half the prefill of reading
    every prompt from scratch. Results are identical either way (prefill is exact for any
    split, SPEC §6).

    The seeds of a grid cell are decoded together as one batch (padded to `batch_size` rows,
    so one compiled prefill and one compiled step serve the whole grid).

    Example:
      evaluator = PasskeyEvaluator(config, params)
      run = evaluator.run("runs/passkey", [1024, 2048], depth_grid(5), seeds=range(3))
      print(format_summary(run.rows))
    """

    def __init__(
        self,
        config: RWKVXConfig,
        params,
        decode_config: DecodeConfig | None = None,
        *,
        tokenizer: Tokenizer | None = None,
        key_digits: int = DEFAULT_KEY_DIGITS,
        batch_size: int | None = None,
        reuse_prefix: bool = True,
    ):
        """Builds the evaluator (nothing is compiled until the first grid runs).

        Args:
          config: the model config.
          params: its Flax parameter tree.
          decode_config: cache, eviction, prefill piece, attention mode. cache_size None (the
            default) sizes the cache for each grid so that nothing is evicted (exact).
          tokenizer: None picks the model vocabulary's (`tokenizer_for_vocab`).
          key_digits: digits of each pass key.
          batch_size: prompts decoded together; None: the number of seeds of the grid.
          reuse_prefix: share the common prompt prefix's state (off in official mode, whose
            prefill reads a prompt in one call).
        """
        if not 1 <= key_digits <= 18:
            raise ValueError(f"key_digits must be in [1, 18], got {key_digits}")
        if batch_size is not None and batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.config = config
        self.params = params
        self.decode_config = decode_config or DecodeConfig()
        self.tokenizer = tokenizer or tokenizer_for_vocab(config.vocab_size)
        self.builder = PasskeyPromptBuilder(self.tokenizer)
        self.key_digits = key_digits
        self.batch_size = batch_size
        self.reuse_prefix = reuse_prefix and self.decode_config.attention_mode == "train"
        self._decoders: dict[int | None, Decoder] = {}
        self._decode_weights = None

    def settings(self, model_name: str) -> dict:
        """What the results depend on; a results directory holds one such setting."""
        dc = self.decode_config
        return {
            "model": model_name,
            "vocab_size": self.config.vocab_size,
            "key_digits": self.key_digits,
            "prompt_version": PROMPT_VERSION,
            "prompt": {
                "task": TASK,
                "haystack": list(HAYSTACK),
                "needle": NEEDLE,
                "question": QUESTION,
            },
            "attention_mode": dc.attention_mode,
            "cache_size": dc.cache_size if dc.cache_size is not None else "exact",
            "eviction": dc.eviction,
        }

    def prompt(self, length: int, depth: float, seed: int) -> PasskeyPrompt:
        """The prompt of one grid cell and seed."""
        return self.builder.build(length, depth, passkey_for(seed, length, depth, self.key_digits))

    def _layout(self, length: int, depth: float, seed: int) -> tuple[int, int, int]:
        key = passkey_for(seed, length, depth, self.key_digits)
        return self.builder.layout(length, depth, key)

    def min_length(self) -> int:
        """The shortest context length any prompt fits in (longest key, empty haystack)."""
        return self.builder.fixed_tokens("9" * self.key_digits)

    def decoder(self, longest: int) -> Decoder:
        """The decoder for prompts of up to `longest` tokens (one per cache size, kept)."""
        cache = self.decode_config.cache_size
        if cache is None and self.config.n_attn_layer:
            chunk = self.config.chunk_size
            # Room for the prompt and every generated token: nothing is ever evicted.
            need = longest + self.key_digits + 1 + ANSWER_SLACK
            cache = max(-(-need // chunk) + 1, max(self.config.top_k - 1, 1) + 1) * chunk
        if cache not in self._decoders:
            dc = dataclasses.replace(self.decode_config, cache_size=cache)
            if self._decode_weights is None:  # one copy for every cache size's decoder
                self._decode_weights = prepare_decode_weights(self.params, dc.kernel_layout)
            self._decoders[cache] = Decoder(self.config, self._decode_weights, dc)
        return self._decoders[cache]

    def run(
        self,
        out_dir: str,
        lengths: Sequence[int],
        depths: Sequence[float],
        seeds: Sequence[int],
        *,
        model_name: str = "model",
        progress: bool = True,
        plot: bool = True,
    ) -> PasskeyRun:
        """Evaluates every (length, depth, seed) not yet in OUT/passkey.csv, row by row.

        Args:
          out_dir: results directory (created): passkey.csv, passkey_heatmap.png and
            passkey_settings.json (the settings the rows were computed with; a directory holding
            other settings' results is refused).
          lengths: context lengths in tokens.
          depths: needle depths in [0, 1] (see `depth_grid`).
          seeds: seeds (ints >= 0); each picks a different pass key.
          model_name: recorded in the settings (a checkpoint path, or "demo").
          progress: show a progress bar.
          plot: write the heatmap of all rows in the file.

        Returns:
          A `PasskeyRun`.

        Raises:
          ValueError: empty or invalid lengths/depths/seeds, or a length too short for the
            prompt (names it and the minimum).
        """
        lengths, depths, seeds = self._check_grid(lengths, depths, seeds)
        out_dir = prepare_out_dir(out_dir)
        _check_settings(out_dir, self.settings(model_name))
        results = ResultsFile(os.path.join(out_dir, CSV_NAME))
        done = {row.cell for row in results.rows()}
        batch_size = self.batch_size or len(seeds)
        batches = []
        for length in lengths:
            for depth in depths:
                missing = [s for s in seeds if (length, depth_label(depth), s) not in done]
                for i in range(0, len(missing), batch_size):
                    group = tuple(missing[i : i + batch_size])
                    start = min(self._layout(length, depth, s)[2] for s in group)
                    batches.append(_Batch(length, depth, group, start))
        computed = 0
        if batches:
            decoder = self.decoder(max(b.length for b in batches))
            # Ascending needle position: the shared running state only ever moves forward.
            batches.sort(key=lambda b: (b.needle_start, b.length, b.depth))
            computed = self._run_batches(decoder, batches, batch_size, results, progress)
        rows = results.rows()
        heatmap = None
        if plot and rows:
            heatmap = os.path.join(out_dir, HEATMAP_NAME)
            plot_heatmap(rows, heatmap)
        return PasskeyRun(rows, computed, results.path, heatmap)

    def _check_grid(self, lengths, depths, seeds):
        lengths = sorted(set(int(n) for n in lengths))
        depths = sorted(set(float(d) for d in depths))
        seeds = sorted(set(int(s) for s in seeds))
        for name, values in (("lengths", lengths), ("depths", depths), ("seeds", seeds)):
            if not values:
                raise ValueError(f"no {name} given: the grid needs at least one")
        bad = [d for d in depths if not 0.0 <= d <= 1.0]
        if bad:
            raise ValueError(f"depths must lie in [0, 1], got {bad}")
        if seeds[0] < 0:
            raise ValueError(f"seeds must be >= 0, got {seeds[0]}")
        if len({depth_label(d) for d in depths}) != len(depths):
            raise ValueError(f"depths {depths} are not distinct at 4 decimals")
        shortest = self.min_length()
        short = [n for n in lengths if n < shortest]
        if short:
            raise ValueError(
                f"context lengths {short} are shorter than the prompt without haystack: this "
                f"tokenizer needs at least {shortest} tokens (task, pass-key line, question)"
            )
        return lengths, depths, seeds

    def _run_batches(self, decoder, batches, batch_size, results, progress) -> int:
        from tqdm.auto import tqdm

        piece = decoder.decode_config.prefill_chunk
        bar = tqdm(
            total=sum(len(b.seeds) for b in batches),
            desc="passkey",
            unit="prompt",
            disable=not progress,
        )
        running, position = None, 0  # the shared prefix state and how many tokens it has read
        computed = correct = 0
        try:
            for batch in batches:
                start = 0
                if self.reuse_prefix:
                    target = batch.needle_start // piece * piece
                    if target < position:
                        running, position = None, 0
                    if target > position:
                        stream = self.builder.stream(target)[position:]
                        _, running = decoder.prefill(np.tile(stream, (batch_size, 1)), running)
                        position = target
                    start = position
                rows = self._evaluate(decoder, batch, batch_size, running, start)
                results.append(rows)
                computed += len(rows)
                correct += sum(r.correct for r in rows)
                bar.update(len(rows))
                bar.set_postfix(length=batch.length, accuracy=f"{correct / computed:.2f}")
        finally:
            bar.close()
        return computed

    def _evaluate(self, decoder, batch: _Batch, batch_size: int, running, start: int):
        """Decodes one batch of prompts (sharing their first `start` tokens with `running`)."""
        prompts = [self.prompt(batch.length, batch.depth, s) for s in batch.seeds]
        padded = prompts + [prompts[-1]] * (batch_size - len(prompts))
        state = _copy_state(running) if start else None
        n_new = max(len(self.tokenizer.encode(" " + p.key)) for p in prompts) + ANSWER_SLACK
        began = time.perf_counter()
        steps = list(
            decoder.generate([p.tokens[start:] for p in padded], GREEDY, n_new, state=state)
        )
        seconds = (time.perf_counter() - began) / len(padded)
        generated = np.stack(steps, axis=1)
        rows = []
        for seed, prompt, tokens in zip(batch.seeds, prompts, generated, strict=False):
            answer = self.tokenizer.decode([t for t in tokens.tolist() if t >= 0])
            rows.append(
                PasskeyResult(
                    length=batch.length,
                    depth=batch.depth,
                    seed=seed,
                    key=prompt.key,
                    prompt_tokens=len(prompt.tokens),
                    needle_token=prompt.needle_start,
                    answer=answer,
                    correct=is_correct(answer, prompt.key),
                    seconds=seconds,
                )
            )
        return rows


# ---------------------------------------------------------------------------------------------
# Command line


def _parser() -> Parser:
    parser = Parser(
        prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_model_arguments(parser)
    add = parser.add_argument
    add(
        "--lengths",
        required=True,
        help="context lengths in tokens: 1024,2048 and/or ranges START:STOP:STEP; K = 1024 "
        "(the paper: 2K:64K:2K)",
    )
    add(
        "--depths",
        type=int_at_least(1),
        default=10,
        metavar="N",
        help="needle depths spread over 0..100%% (default 10)",
    )
    add(
        "--seeds",
        type=int_at_least(1),
        default=5,
        metavar="N",
        help="prompts per cell, seeds 0..N-1 (default 5)",
    )
    add("--out", required=True, metavar="DIR", help="results directory (resumed if it exists)")
    add(
        "--key-digits",
        type=int_at_least(1),
        default=DEFAULT_KEY_DIGITS,
        metavar="N",
        help="digits per pass key (default 5)",
    )
    add(
        "--batch-size",
        type=int_at_least(1),
        default=None,
        metavar="N",
        help="prompts decoded together (default: --seeds)",
    )
    add_decode_arguments(parser, cache_default="the longest prompt, exact")
    add("--no-reuse-prefix", action="store_true", help="read every prompt from its start")
    add("--no-progress", action="store_true", help="no progress bar")
    return parser


def _run(args) -> None:
    lengths = parse_lengths(args.lengths)
    if args.key_digits > 18:
        raise UsageError(f"--key-digits must be at most 18, got {args.key_digits}")
    config, params, model_name = load_model(args)
    decode_config = decode_config_from_args(args)
    evaluator = PasskeyEvaluator(
        config,
        params,
        decode_config,
        key_digits=args.key_digits,
        batch_size=args.batch_size,
        reuse_prefix=not args.no_reuse_prefix,
    )
    run = evaluator.run(
        args.out,
        lengths,
        depth_grid(args.depths),
        range(args.seeds),
        model_name=model_name,
        progress=not args.no_progress,
    )
    print(format_summary(run.rows))
    print(f"{run.computed} prompt(s) evaluated now; results: {run.csv_path}")
    if run.heatmap_path:
        print(f"heatmap: {run.heatmap_path}")


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the command line; returns the exit status (errors: one line on stderr)."""
    args = _parser().parse_args(argv)
    return run_cli(PROG, lambda: _run(args))


if __name__ == "__main__":
    sys.exit(main())
