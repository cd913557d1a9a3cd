"""Many-facts retrieval eval: exact answers over (number of facts x context length).

Reads `FactsTask` documents (rwkvx_jax.data.facts) in one parallel forward each and scores
every question by teacher forcing: a question is right when the argmax prediction of each of
its answer tokens is that token. For one answer this is exactly greedy decoding's exact match
(the first wrong token ends both); the earlier questions' answers stay in the context as
written, as in MQAR.

    rwkvx-facts --checkpoint runs/facts/rwkvx --facts 8,16,32,64,128 --lengths 512,1K \
        --documents 8 --attention learned,zeroed,dense,oracle --out runs/facts/eval

Diagnostics for an RWKV-X model (`--attention`), evaluation-time only (the model modules are
unchanged: the sparse blocks' attention is recomputed from their own weights through a flax
method interceptor):

* learned: the model as trained; also records whether the learned chunk selection picks each
  answer's chunk (the chunk holding the fact's value token that the query must read: the key
  of the token right after the fact's key, as in an induction head);
* zeroed: every sparse block's attention output is 0 (what is left is the RWKV blocks, the
  residual path and the sparse blocks' channel mixes);
* dense: every earlier chunk is attended (selection cannot miss);
* oracle: the learned selection, with the answer's chunk forced in (replacing the lowest-scored
  pick when it was not picked) at the query positions that predict an answer token.

Output in --out: facts.csv (one row per cell: facts, length, mode, questions, correct, accuracy,
answer-chunk selection rate), heatmap_<mode>.png, settings.json. A finished cell is kept when
the command is rerun with the same settings.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import io
import json
import math
import os
import sys
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from rwkvx_jax.atomic_files import write_atomically, write_text_atomically
from rwkvx_jax.cli import Parser, UsageError, add_model_arguments, int_at_least, load_model, run_cli
from rwkvx_jax.config import RWKVXConfig
from rwkvx_jax.data.facts import FactsDocument, FactsTask
from rwkvx_jax.evals.common import format_tokens, parse_lengths, prepare_out_dir
from rwkvx_jax.model import RWKVX
from rwkvx_jax.sparse.block import TopKChunkAttention

PROG = "rwkvx-facts"
MODES = ("learned", "zeroed", "dense", "oracle")
CSV_FIELDS = ("facts", "length", "mode", "questions", "correct", "accuracy", "selected")
_HIGHEST = jax.lax.Precision.HIGHEST


# ---------------------------------------------------------------------------------------------
# Attention recomputed at evaluation time


def _attention_with_selection(module, x, answer_chunk, mode: str):
    """A sparse block's attention (SPEC §4) with the chunk selection of `mode`.

    Args:
      module: the bound `TopKChunkAttention` (its weights are read, nothing else).
      x: [B, T, C] its input.
      answer_chunk: int32 [B, T]: the chunk query t must read to predict an answer token, -1
        where t predicts none.
      mode: one of MODES.

    Returns:
      ((out [B, T, C], k [B, T, H, N], v [B, T, H, N]), picked bool [B, T]): the module's own
      outputs, and whether the attended chunks include `answer_chunk` (own chunk included).
    """
    weights = module.variables["params"]
    B, T, C = x.shape
    H, N, size = C // module.head_size, module.head_size, module.chunk_size
    project = lambda name: jnp.einsum(
        "btc,cd->btd", x.astype(jnp.float32), weights[name]["kernel"], precision=_HIGHEST
    ).reshape(B, T, H, N)
    q, k, v = project("receptance"), project("key"), project("value")
    n_chunks = -(-T // size)
    chunk_of = jnp.arange(T) // size
    padded = jnp.pad(k, ((0, 0), (0, n_chunks * size - T), (0, 0), (0, 0)))
    means = padded.reshape(B, n_chunks, size, H, N).mean(axis=2)
    scores = jnp.einsum("bthd,bjhd->bhtj", q, means, precision=_HIGHEST)
    earlier = jnp.arange(n_chunks)[None, :] < chunk_of[:, None]  # [T, nC] candidates
    scores = jnp.where(earlier, scores, -jnp.inf)
    n_pick = min(module.top_k - 1, n_chunks)
    if mode == "dense":
        chosen = jnp.broadcast_to(earlier, (B, H, T, n_chunks))
    elif n_pick == 0:  # top_k 1: own chunk only
        chosen = jnp.zeros((B, H, T, n_chunks), bool)
    else:
        # lax.top_k puts the lower index first among equal scores: the SPEC §4 tie rule.
        top_scores, top = jax.lax.top_k(scores, n_pick)  # [B, H, T, n_pick]
        top = jnp.where(jnp.isfinite(top_scores), top, -1)
        if mode == "oracle":
            force = answer_chunk[:, None, :]  # [B, 1, T]
            missing = (force >= 0) & (force < chunk_of) & ~(top == force[..., None]).any(-1)
            top = top.at[..., -1].set(jnp.where(missing, force, top[..., -1]))
        chosen = (top[..., None] == jnp.arange(n_chunks)).any(axis=-2)  # [B, H, T, nC]
    own = chunk_of[:, None] == chunk_of[None, :]
    causal = jnp.arange(T)[None, :] <= jnp.arange(T)[:, None]
    key_chosen = jnp.take(chosen, chunk_of, axis=-1)  # [B, H, T, T(key)]
    mask = (own & causal) | key_chosen
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, precision=_HIGHEST) / math.sqrt(N)
    probs = jax.nn.softmax(jnp.where(mask, logits, -jnp.inf), axis=-1)
    o = jnp.einsum("bhqk,bkhd->bqhd", probs, v, precision=_HIGHEST).reshape(B, T, C)
    out = jnp.einsum("btc,cd->btd", o, weights["output"]["kernel"], precision=_HIGHEST)
    if mode == "zeroed":
        out = jnp.zeros_like(out)
    chosen_answer = jnp.take_along_axis(
        chosen, jnp.clip(answer_chunk, 0)[:, None, :, None], axis=-1
    )[..., 0]  # [B, H, T]
    picked = (answer_chunk == chunk_of) | chosen_answer.any(axis=1)
    return (out.astype(x.dtype), k, v), picked


class FactsScorer:
    """Scores `FactsDocument`s with a model under one attention mode.

    Args:
      config, params: the model.
      mode: one of MODES; anything but "learned" needs sparse blocks.

    Raises:
      UsageError: an unknown mode, or a diagnostic mode for a model without sparse blocks.
    """

    def __init__(self, config: RWKVXConfig, params: dict, mode: str = "learned"):
        if mode not in MODES:
            raise UsageError(f"attention mode {mode!r}: expected one of {', '.join(MODES)}")
        if mode != "learned" and config.n_attn_layer == 0:
            raise UsageError(
                f"attention mode {mode!r} needs sparse-attention blocks; the model has none"
            )
        self.config, self.params, self.mode = config, params, mode
        self._forward = jax.jit(self._logits_and_picks)

    def _logits_and_picks(self, params, tokens, answer_chunk):
        """logits [B, T, V] and, per sparse block, picked bool [B, T] (stacked [A, B, T])."""
        model = RWKVX(self.config)
        if self.config.n_attn_layer == 0:
            return model.apply({"params": params}, tokens), jnp.zeros((0, *tokens.shape), bool)
        picks = []

        def recompute_attention(next_fun, args, kwargs, context):
            if not isinstance(context.module, TopKChunkAttention) or kwargs or len(args) != 1:
                return next_fun(*args, **kwargs)  # not a parallel attention forward
            outputs, picked = _attention_with_selection(
                context.module, args[0], answer_chunk, self.mode
            )
            picks.append(picked)
            return outputs

        with nn.intercept_methods(recompute_attention):
            logits = model.apply({"params": params}, tokens)
        return logits, jnp.stack(picks)

    def score(self, documents: Sequence[FactsDocument]) -> tuple[np.ndarray, np.ndarray]:
        """Scores documents of one length together.

        Returns:
          (correct bool [Q], selected bool [Q]) over all questions in document order: the
          answer is exact; every answer token's chunk was picked by some sparse block (False
          for a model without sparse blocks).
        """
        lengths = {len(document.tokens) for document in documents}
        if len(lengths) != 1:
            raise ValueError(f"documents of one call must have one length, got {sorted(lengths)}")
        tokens = np.array([document.tokens for document in documents], np.int32)
        answer_chunk = np.full(tokens.shape, -1, np.int32)
        for row, document in enumerate(documents):
            for question in document.questions:
                for i in range(len(question.value)):
                    chunk = (question.fact_value_start + i) // self.config.chunk_size
                    answer_chunk[row, question.answer_start - 1 + i] = chunk
        logits, picks = self._forward(self.params, tokens, answer_chunk)
        predicted = np.asarray(jnp.argmax(logits, axis=-1))
        picks = np.asarray(picks).any(axis=0) if picks.shape[0] else None
        correct, selected = [], []
        for row, document in enumerate(documents):
            for question in document.questions:
                queries = np.arange(len(question.value)) + question.answer_start - 1
                targets = np.asarray(document.tokens)[queries + 1]
                correct.append(bool((predicted[row, queries] == targets).all()))
                selected.append(picks is not None and bool(picks[row, queries].all()))
        return np.array(correct), np.array(selected)


# ---------------------------------------------------------------------------------------------
# The grid, its CSV and heatmap


@dataclasses.dataclass(frozen=True)
class CellResult:
    """One (facts, length, mode) cell: questions asked, answered exactly, answer chunk picked."""

    facts: int
    length: int
    mode: str
    questions: int
    correct: int
    selected: int

    @property
    def accuracy(self) -> float:
        return self.correct / self.questions

    def to_csv(self) -> dict:
        row = dataclasses.asdict(self)
        row["accuracy"] = f"{self.accuracy:.4f}"
        row["selected"] = self.selected
        return row

    @classmethod
    def from_csv(cls, row: dict) -> CellResult:
        return cls(
            int(row["facts"]), int(row["length"]), row["mode"], int(row["questions"]),
            int(row["correct"]), int(row["selected"]),
        )  # fmt: skip


def evaluate_cell(
    scorer: FactsScorer, task: FactsTask, facts: int, length: int, documents: int, batch: int
) -> CellResult:
    """Scores `documents` evaluation documents of one cell, `batch` per forward."""
    correct = selected = questions = 0
    for start in range(0, documents, batch):
        stop = min(start + batch, documents)
        docs = [task.eval_document(facts, length, i) for i in range(start, stop)]
        hits, picks = scorer.score(docs)
        correct, selected = correct + int(hits.sum()), selected + int(picks.sum())
        questions += len(hits)
    return CellResult(facts, length, scorer.mode, questions, correct, selected)


def read_results(path: str) -> list[CellResult]:
    """The rows of a facts.csv ([] when it does not exist)."""
    if not os.path.exists(path):
        return []
    with open(path, newline="") as f:
        return [CellResult.from_csv(row) for row in csv.DictReader(f)]


def write_results(path: str, rows: Sequence[CellResult]) -> None:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, CSV_FIELDS)
    writer.writeheader()
    for row in rows:
        writer.writerow(row.to_csv())
    write_text_atomically(path, buffer.getvalue())


def plot_heatmap(rows: Sequence[CellResult], path: str, title: str) -> None:
    """Accuracy heatmap, rows: number of facts, columns: context length."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    facts = sorted({row.facts for row in rows})
    lengths = sorted({row.length for row in rows})
    grid = np.full((len(facts), len(lengths)), np.nan)
    for row in rows:
        grid[facts.index(row.facts), lengths.index(row.length)] = row.accuracy
    figure = Figure(figsize=(1.2 + 0.9 * len(lengths), 1.0 + 0.45 * len(facts)))
    FigureCanvasAgg(figure)
    ax = figure.add_subplot()
    image = ax.imshow(grid, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
    for (i, j), value in np.ndenumerate(grid):
        if np.isfinite(value):
            ax.text(j, i, f"{100 * value:.0f}", ha="center", va="center", fontsize=8)
    ax.set_xticks(range(len(lengths)), [format_tokens(n) for n in lengths])
    ax.set_yticks(range(len(facts)), [str(n) for n in facts])
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("facts")
    ax.set_title(title, fontsize=9)
    figure.colorbar(image, ax=ax, label="exact answers")
    figure.tight_layout()
    write_atomically(path, lambda staged: figure.savefig(staged, format="png", dpi=110))


def run_grid(
    config: RWKVXConfig,
    params: dict,
    out_dir: str,
    *,
    facts: Sequence[int],
    lengths: Sequence[int],
    modes: Sequence[str] = ("learned",),
    documents: int = 8,
    batch: int = 4,
    task: FactsTask | None = None,
    model_name: str = "",
    log=print,
) -> list[CellResult]:
    """Evaluates every (facts, length, mode) cell that fits (a cell whose facts and questions
    do not fit its length is skipped), resuming from out_dir/facts.csv.

    Returns:
      All rows of the grid, in (mode, facts, length) order.

    Raises:
      UsageError: out_dir holds results of other settings.
    """
    task = task or FactsTask()
    settings = {
        "model": model_name, "documents": documents, "seed": task.seed,
        "key_tokens": task.key_tokens, "value_tokens": task.value_tokens,
        "questions": task.n_questions,
    }  # fmt: skip
    settings_path = os.path.join(out_dir, "settings.json")
    if os.path.exists(settings_path):
        with open(settings_path) as f:
            stored = json.load(f)
        if stored != settings:
            raise UsageError(
                f"{out_dir} holds results of other settings ({stored}); use a new --out"
            )
    else:
        write_text_atomically(settings_path, json.dumps(settings, indent=2) + "\n")
    csv_path = os.path.join(out_dir, "facts.csv")
    done = {(r.facts, r.length, r.mode): r for r in read_results(csv_path)}
    for mode in modes:
        scorer = None
        for n_facts in facts:
            for length in lengths:
                if (n_facts, length, mode) in done or length < task.shortest(n_facts):
                    continue
                scorer = scorer or FactsScorer(config, params, mode)
                cell = evaluate_cell(scorer, task, n_facts, length, documents, batch)
                done[(n_facts, length, mode)] = cell
                write_results(csv_path, sorted(done.values(), key=_order))
                log(
                    f"{mode:8s} facts {n_facts:4d} length {format_tokens(length):>5s}: "
                    f"{cell.correct}/{cell.questions} exact ({100 * cell.accuracy:.0f}%), "
                    f"answer chunk picked {cell.selected}/{cell.questions}"
                )
    rows = sorted(done.values(), key=_order)
    for mode in modes:
        mode_rows = [r for r in rows if r.mode == mode]
        if mode_rows:
            title = f"{os.path.basename(model_name.rstrip('/')) or 'model'}: {mode} attention"
            plot_heatmap(mode_rows, os.path.join(out_dir, f"heatmap_{mode}.png"), title)
    return rows


def _order(row: CellResult):
    return MODES.index(row.mode), row.facts, row.length


# ---------------------------------------------------------------------------------------------
# Command line


def _int_list(text: str) -> list[int]:
    try:
        values = sorted({int(item) for item in text.split(",") if item.strip()})
    except ValueError:
        raise UsageError(f"--facts: expected comma-separated integers, got {text!r}") from None
    if not values or values[0] < 1:
        raise UsageError(f"--facts: expected positive counts, got {text!r}")
    return values


def _parser() -> Parser:
    parser = Parser(
        prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_model_arguments(parser)
    add = parser.add_argument
    add("--facts", required=True, help="numbers of facts, comma-separated: 8,16,32,64,128")
    add("--lengths", required=True, help="context lengths in tokens: 1K,2K or START:STOP:STEP")
    add(
        "--attention",
        default="learned",
        help=f"comma-separated attention modes among {', '.join(MODES)} (default learned)",
    )
    add("--documents", type=int_at_least(1), default=8, help="documents per cell (default 8)")
    add("--questions", type=int_at_least(1), default=16, help="questions per document (16)")
    add("--key-tokens", type=int_at_least(1), default=1, help="tokens per key (default 1)")
    add("--value-tokens", type=int_at_least(1), default=1, help="tokens per value (default 1)")
    add("--seed", type=int, default=0, help="the evaluation documents' seed (default 0)")
    add("--batch-size", type=int_at_least(1), default=4, help="documents per forward (4)")
    add("--out", required=True, metavar="DIR", help="results directory (resumed if it exists)")
    return parser


def _run(args) -> None:
    facts, lengths = _int_list(args.facts), parse_lengths(args.lengths)
    modes = [m.strip() for m in args.attention.split(",") if m.strip()]
    for mode in modes:
        if mode not in MODES:
            raise UsageError(f"--attention {mode!r}: expected one of {', '.join(MODES)}")
    config, params, model_name = load_model(args)
    task = FactsTask(
        key_tokens=args.key_tokens, value_tokens=args.value_tokens,
        n_questions=args.questions, ctx=max(lengths), min_facts=1,
        max_facts=min(max(facts), 128**args.key_tokens), seed=args.seed,
    )  # fmt: skip
    out_dir = prepare_out_dir(args.out)
    rows = run_grid(
        config, params, out_dir, facts=facts, lengths=lengths, modes=modes,
        documents=args.documents, batch=args.batch_size, task=task, model_name=model_name,
    )  # fmt: skip
    if not rows:
        raise UsageError("no cell fits: every length is too short for its number of facts")
    print(f"results: {os.path.join(out_dir, 'facts.csv')}")


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the command line; returns the exit status (errors: one line on stderr)."""
    args = _parser().parse_args(argv)
    return run_cli(PROG, lambda: _run(args))


if __name__ == "__main__":
    sys.exit(main())
