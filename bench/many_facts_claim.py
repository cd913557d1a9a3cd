"""The paper's point at small scale: many-facts retrieval that a recurrent state cannot hold,
inside the training length (MQAR-style; issue 26, docs/PAPER_CLAIM.md).

A tiny RWKV-X and a tiny RWKV-7 of the same parameter budget (within 5%) learn the many-facts
task (`rwkvx_jax.data.facts`): up to `max_facts` key-value facts (a one-byte key from
0x80-0xFF, then a lowercase-letter value) scattered among uppercase filler, then questions "?" +
key whose answers are the values. Each model is trained
with several seeds, the same recipe and budget, in two phases (short windows first, then the
training length), through `training.train` on the `tiny` recipe plus overrides: the same path
as `train.py`, whose commands are printed. Then every trained model answers evaluation
documents over (number of facts x context length), all lengths within the training length, and
the RWKV-X models are re-read with the diagnostics of `rwkvx_jax.evals.facts` (attention output
zeroed; dense attention; oracle chunk selection; how often the learned selection picks the
answer's chunk).

The pass criterion is fixed in `Settings` before any run: at some number of facts, the RWKV-X
mean accuracy at the training length is >= `pass_rwkvx` while RWKV-7's is <= `pass_rwkv7`.

python bench/paper_claim.py --experiment facts            # the real run
python bench/paper_claim.py --experiment facts --quick    # smoke test of every step
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import sys

import numpy as np
from paper_claim import (
    log,
    parameter_count,
    read_json,
    read_losses,
    timed_training,
    write_json,
)
from timing import Stopwatch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from rwkvx_jax.training.config import TrainConfig, apply_overrides, recipe


@dataclasses.dataclass(frozen=True)
class Settings:
    """Everything the experiment depends on (the pass criterion included)."""

    short_ctx: int = 256
    short_batch_size: int = 16
    short_steps: int = 300
    short_documents: int = 4
    ctx: int = 256
    batch_size: int = 16
    steps: int = 200
    lr: float = 3e-3
    lr_final: float = 3e-4
    warmup_steps: int = 20
    max_facts: int = 128
    questions: int = 16
    key_tokens: int = 1
    value_tokens: int = 1
    n_embd: int = 64
    chunk_size: int = 32
    top_k: int = 4
    seeds: tuple[int, ...] = (0, 1, 2)
    eval_facts: tuple[int, ...] = (4, 8, 16, 32, 64, 96)
    eval_lengths: tuple[int, ...] = (128, 256)
    eval_documents: int = 8
    pass_rwkvx: float = 0.9
    pass_rwkv7: float = 0.5


QUICK = Settings(
    short_ctx=128, short_batch_size=2, short_steps=2, short_documents=2, ctx=192, batch_size=2,
    steps=2, warmup_steps=1, max_facts=16, questions=4, seeds=(0,), eval_facts=(2, 100),
    eval_lengths=(192,), eval_documents=2,
)  # fmt: skip


@dataclasses.dataclass(frozen=True)
class Phase:
    """One training run of the curriculum: windows of `documents` documents each."""

    name: str
    ctx: int
    batch_size: int
    steps: int
    documents: int


def phases(s: Settings) -> list[Phase]:
    """short: several short documents per window (few facts each: the easy start); long: one
    document per window at the training length."""
    short = Phase("short", s.short_ctx, s.short_batch_size, s.short_steps, s.short_documents)
    long = Phase("long", s.ctx, s.batch_size, s.steps, 1)
    return [short, long] if s.short_steps else [long]


# RWKV-X: R R R S (3 RWKV-7 blocks, then one sparse block); RWKV-7: 4 RWKV-7 blocks (a sparse
# block costs a little less than an RWKV block: +4% parameters).
MODELS = {
    "rwkvx": lambda s: ["model=tiny", f"model.n_embd={s.n_embd}", "model.n_rwkv_layer=3",
                        "model.n_attn_layer=1", f"model.chunk_size={s.chunk_size}",
                        f"model.top_k={s.top_k}"],
    "rwkv7": lambda s: ["model=tiny-rwkv7", f"model.n_embd={s.n_embd}", "model.n_rwkv_layer=4"],
}  # fmt: skip
LABELS = {"rwkvx": "RWKV-X (3 RWKV + 1 sparse)", "rwkv7": "RWKV-7 (4 RWKV)"}
# Evaluations: (model, attention mode of rwkvx_jax.evals.facts).
EVALS = {
    "rwkvx": ("rwkvx", "learned"),
    "rwkv7": ("rwkv7", "learned"),
    "rwkvx-zeroed": ("rwkvx", "zeroed"),
    "rwkvx-dense": ("rwkvx", "dense"),
    "rwkvx-oracle": ("rwkvx", "oracle"),
}
EVAL_LABELS = {
    **LABELS,
    "rwkvx-zeroed": "RWKV-X, attention output zeroed",
    "rwkvx-dense": "RWKV-X, dense attention at eval",
    "rwkvx-oracle": "RWKV-X, answer chunk forced in",
}
COLORS = {"rwkvx": "#1f77b4", "rwkv7": "#d62728", "rwkvx-zeroed": "#7f7f7f",
          "rwkvx-dense": "#17becf", "rwkvx-oracle": "#2ca02c"}  # fmt: skip


def workdir(out: str, name: str, seed: int, phase: Phase) -> str:
    return os.path.join(out, name, f"seed{seed}", phase.name)


def data_prefix(out: str, seed: int, phase: Phase) -> str:
    return os.path.join(out, "data", f"facts_{phase.name}_seed{seed}")


def train_overrides(name: str, s: Settings, out: str, seed: int, phase: Phase) -> list[str]:
    """The `train.py` overrides of one run (on top of the `tiny` recipe)."""
    overrides = MODELS[name](s) + [
        f"name=facts-{name}-{phase.name}",
        f"workdir={workdir(out, name, seed, phase)}",
        f"data.corpus={data_prefix(out, seed, phase)}",
        "data.order=sequential",
        f"data.ctx={phase.ctx}",
        f"data.batch_size={phase.batch_size}",
        f"steps={phase.steps}",
        f"seed={seed}",
        f"optimizer.lr={s.lr}",
        f"optimizer.lr_final={s.lr_final}",
        f"optimizer.warmup_steps={s.warmup_steps}",
        f"optimizer.total_steps={phase.steps}",
        f"checkpoint.every={max(1, phase.steps // 2)}",
        "checkpoint.keep=1",
        "sample.tokens=0",
    ]
    index = phases(s).index(phase)
    if index:
        start = workdir(out, name, seed, phases(s)[index - 1])
        overrides.append(f"init_checkpoint={os.path.join(start, 'export', 'params')}")
    return overrides


def train_config(name: str, s: Settings, out: str, seed: int, phase: Phase) -> TrainConfig:
    return apply_overrides(recipe("tiny"), train_overrides(name, s, out, seed, phase))


def task(s: Settings, seed: int, ctx: int, documents: int = 1):
    from rwkvx_jax.data.facts import FactsTask

    return FactsTask(
        key_tokens=s.key_tokens, value_tokens=s.value_tokens, n_questions=s.questions,
        ctx=ctx, max_facts=s.max_facts, documents_per_window=documents, seed=seed,
    )  # fmt: skip


def check_budget(s: Settings, out: str) -> dict[str, int]:
    last = phases(s)[-1]
    counts = {n: parameter_count(train_config(n, s, out, 0, last).model) for n in MODELS}
    ratio = counts["rwkv7"] / counts["rwkvx"]
    log(f"parameters: rwkvx {counts['rwkvx']:,}, rwkv7 {counts['rwkv7']:,} (ratio {ratio:.3f})")
    if abs(ratio - 1) > 0.05:
        raise SystemExit(f"parameter budgets differ by more than 5% ({ratio:.3f})")
    return counts


def make_data(s: Settings, out: str, seed: int, phase: Phase) -> None:
    prefix = data_prefix(out, seed, phase)
    if os.path.exists(prefix + ".idx"):
        return
    os.makedirs(os.path.dirname(prefix), exist_ok=True)
    # One window more than the run reads: TokenWindows needs ctx + 1 tokens for the last.
    # The phases draw from different streams (seed * 2 + phase index).
    stream = task(s, 2 * seed + phases(s).index(phase), phase.ctx, phase.documents)
    n = stream.write_binidx(prefix, phase.steps * phase.batch_size + 1)
    log(f"data {phase.name} seed {seed}: {n:,} tokens in {prefix}")


def train_phase(name: str, s: Settings, out: str, seed: int, phase: Phase, progress) -> float:
    """Trains (or resumes) one run; returns its wall seconds (all attempts)."""
    command = " ".join(["python train.py"] + train_overrides(name, s, out, seed, phase))
    config = train_config(name, s, out, seed, phase)
    return timed_training(config, command, f"{name} seed {seed} {phase.name}", progress)


def evaluate(name: str, s: Settings, out: str, seed: int) -> list:
    import rwkvx_jax
    from rwkvx_jax.evals.facts import run_grid

    model, mode = EVALS[name]
    params_dir = os.path.join(workdir(out, model, seed, phases(s)[-1]), "export", "params")
    config, params = rwkvx_jax.load(params_dir)
    eval_dir = os.path.join(out, model, f"seed{seed}", f"facts_{mode}")
    os.makedirs(eval_dir, exist_ok=True)
    clock = Stopwatch()
    rows = run_grid(
        config, params, eval_dir, facts=s.eval_facts, lengths=s.eval_lengths, modes=[mode],
        documents=s.eval_documents, task=task(s, 1000, max(s.eval_lengths)),
        model_name=f"facts-{name}", log=lambda line: log(f"  {name} seed {seed}: {line}"),
    )  # fmt: skip
    log(f"eval {name} seed {seed}: {clock.seconds():.0f} s")
    return rows


# ----------------------------------------------------------------------------- report


def mean_and_error(values) -> tuple[float, float]:
    """Mean over seeds and its standard error (0 for one seed)."""
    values = np.asarray(values, float)
    error = values.std(ddof=1) / np.sqrt(len(values)) if len(values) > 1 else 0.0
    return float(values.mean()), float(error)


def summarize(rows_by_eval: dict, s: Settings) -> dict:
    """{eval: {length: {facts: (mean, standard error, answer-chunk selection rate)}}}."""
    table: dict = {}
    for name, per_seed in rows_by_eval.items():
        for length in s.eval_lengths:
            for facts in s.eval_facts:
                cells = [
                    r for rows in per_seed for r in rows if (r.facts, r.length) == (facts, length)
                ]
                if len(cells) != len(per_seed):
                    continue  # the cell does not fit this length
                mean, error = mean_and_error([c.accuracy for c in cells])
                selected = sum(c.selected for c in cells) / sum(c.questions for c in cells)
                table.setdefault(name, {}).setdefault(length, {})[facts] = (mean, error, selected)
    return table


def verdict(table: dict, s: Settings) -> dict:
    """The pass criterion at the training length, facts count by facts count."""
    x, r = table["rwkvx"][s.ctx], table["rwkv7"][s.ctx]
    passing = [f for f in x if x[f][0] >= s.pass_rwkvx and r[f][0] <= s.pass_rwkv7]
    return {"passed": bool(passing), "facts_where_it_holds": passing}


def breaking_point(cells: dict, threshold: float = 0.9) -> int | None:
    """The fewest facts at which mean accuracy falls below `threshold` (None: never)."""
    below = [f for f in sorted(cells) if cells[f][0] < threshold]
    return below[0] if below else None


def markdown_table(table: dict, s: Settings, length: int) -> str:
    facts = [f for f in s.eval_facts if f in table["rwkvx"].get(length, {})]
    lines = ["| model | " + " | ".join(f"{f} facts" for f in facts) + " |"]
    lines.append("|---|" + "---|" * len(facts))
    for name, by_length in table.items():
        cells = by_length.get(length, {})
        text = [f"{100 * cells[f][0]:.0f} ± {100 * cells[f][1]:.0f}%" for f in facts]
        lines.append(f"| {EVAL_LABELS[name]} | " + " | ".join(text) + " |")
    if "rwkvx" in table:
        rates = [f"{100 * table['rwkvx'][length][f][2]:.0f}%" for f in facts]
        lines.append(
            "| RWKV-X: answer chunk picked by the learned selection | " + " | ".join(rates) + " |"
        )
    return "\n".join(lines)


def plot_accuracy(table: dict, s: Settings, path: str, n_seeds: int) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 4.0))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for name, by_length in table.items():
        cells = by_length[s.ctx]
        facts = sorted(cells)
        diagnostic = EVALS[name][1] != "learned"
        ax.errorbar(
            facts, [cells[f][0] for f in facts], yerr=[cells[f][1] for f in facts],
            marker="." if diagnostic else "o", linestyle="--" if diagnostic else "-",
            color=COLORS[name], label=EVAL_LABELS[name], capsize=3,
        )  # fmt: skip
    ax.axhline(s.pass_rwkvx, color="grey", linestyle="--", linewidth=0.8)
    ax.axhline(s.pass_rwkv7, color="grey", linestyle=":", linewidth=0.8)
    ax.set_xscale("log", base=2)
    ax.set_xticks(s.eval_facts, [str(f) for f in s.eval_facts])
    ax.set_ylim(-0.03, 1.03)
    ax.set_xlabel("Facts in the context")
    ax.set_ylabel("Exact answers")
    ax.set_title(
        f"Many-facts retrieval at {s.ctx} tokens (mean ± s.e. over {n_seeds} seeds)", fontsize=10
    )
    ax.legend(fontsize=7, loc="center right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def plot_losses(s: Settings, out: str, path: str) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    runs = phases(s)
    fig = Figure(figsize=(4.2 * len(runs), 3.6))
    FigureCanvasAgg(fig)
    for i, phase in enumerate(runs):
        ax = fig.add_subplot(1, len(runs), i + 1)
        for name in MODELS:
            for seed in s.seeds:
                steps, losses = read_losses(workdir(out, name, seed, phase))
                window = max(1, len(losses) // 30)
                smooth = np.convolve(losses, np.ones(window) / window, mode="valid")
                ax.plot(steps[window - 1 :], smooth, color=COLORS[name], linewidth=1,
                        label=LABELS[name] if seed == s.seeds[0] else None)  # fmt: skip
        ax.set_xlabel("Step")
        ax.set_ylabel("Training loss (nats per byte)")
        ax.set_title(f"{phase.name}: ctx {phase.ctx}, batch {phase.batch_size}", fontsize=10)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def report(s: Settings, out: str, counts, seconds, rows_by_eval, docs: str | None) -> dict:
    table = summarize(rows_by_eval, s)
    figures = os.path.join(out, "figures")
    os.makedirs(figures, exist_ok=True)
    plot_accuracy(table, s, os.path.join(figures, "facts_accuracy.png"), len(s.seeds))
    plot_losses(s, out, os.path.join(figures, "facts_training_loss.png"))
    for name in MODELS:
        shutil.copyfile(
            os.path.join(out, name, f"seed{s.seeds[0]}", "facts_learned", "heatmap_learned.png"),
            os.path.join(figures, f"facts_heatmap_{name}.png"),
        )
    result = verdict(table, s)
    summary = {
        "settings": dataclasses.asdict(s),
        "parameters": counts,
        "train_seconds": seconds,
        "accuracy": {
            name: {str(n): {str(f): list(c) for f, c in cells.items()} for n, cells in by.items()}
            for name, by in table.items()
        },
        "breaks_at_training_length": {n: breaking_point(table[n][s.ctx]) for n in table},
        "verdict": result,
    }
    write_json(os.path.join(out, "summary.json"), summary)
    for length in s.eval_lengths:
        log(f"\nexact answers at {length} tokens (mean ± s.e. over {len(s.seeds)} seeds):")
        log(markdown_table(table, s, length))
    log(f"\nbreaks (first facts count below 90%): {summary['breaks_at_training_length']}")
    log(f"pass criterion (RWKV-X >= {s.pass_rwkvx:.0%} where RWKV-7 <= {s.pass_rwkv7:.0%} at "
        f"{s.ctx} tokens): {'PASSED' if result['passed'] else 'NOT MET'} {result}")  # fmt: skip
    if docs:
        os.makedirs(docs, exist_ok=True)
        for name in os.listdir(figures):
            if name.startswith("facts_"):
                shutil.copyfile(os.path.join(figures, name), os.path.join(docs, name))
        log(f"figures copied to {docs}")
    return summary


def parse_settings(pairs: list[str], s: Settings, parser) -> Settings:
    changes = {}
    for pair in pairs:
        name, _, value = pair.partition("=")
        if name not in {f.name for f in dataclasses.fields(Settings)}:
            parser.error(f"--set {pair}: no Settings field {name!r}")
        current = getattr(s, name)
        if isinstance(current, tuple):
            changes[name] = tuple(int(v) for v in value.split(","))
        else:
            changes[name] = type(current)(value)
    return dataclasses.replace(s, **changes)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="paper_claim.py --experiment facts", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    parser.add_argument("--quick", action="store_true", help="a minute-scale smoke run")
    parser.add_argument("--out", help="run directory (runs/facts_claim[_quick])")
    parser.add_argument("--docs", help="copy the figures to this directory")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                        help="change a Settings field; a new --out keeps runs apart")  # fmt: skip
    parser.add_argument("--models", default=",".join(MODELS), help="subset to train/evaluate")
    parser.add_argument("--skip-eval", action="store_true", help="stop after training")
    parser.add_argument("--no-diagnostics", action="store_true", help="no RWKV-X diagnostics")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)

    s = parse_settings(args.set, QUICK if args.quick else Settings(), parser)
    out = args.out or ("runs/facts_claim_quick" if args.quick else "runs/facts_claim")
    names = [n for n in args.models.split(",") if n]
    if sorted(set(names) - set(MODELS)):
        parser.error(f"unknown models in {names}; known: {sorted(MODELS)}")
    os.makedirs(out, exist_ok=True)
    saved = read_json(os.path.join(out, "settings.json"), None)
    if saved is not None and saved != json.loads(json.dumps(dataclasses.asdict(s))):
        parser.error(f"{out} holds a run with other settings ({saved}); choose another --out")
    write_json(os.path.join(out, "settings.json"), dataclasses.asdict(s))
    log(f"pass criterion, fixed before the run: RWKV-X >= {s.pass_rwkvx:.0%} where RWKV-7 <= "
        f"{s.pass_rwkv7:.0%} at the same number of facts, {s.ctx} tokens")  # fmt: skip
    counts = check_budget(s, out)
    progress = not args.no_progress
    seconds: dict = {}
    for seed in s.seeds:
        for phase in phases(s):
            make_data(s, out, seed, phase)
    for seed in s.seeds:
        for name in names:
            for phase in phases(s):
                took = train_phase(name, s, out, seed, phase, progress)
                seconds.setdefault(name, {})[f"seed{seed}/{phase.name}"] = took
    if args.skip_eval:
        return 0
    evals = [e for e, (m, mode) in EVALS.items()
             if m in names and (mode == "learned" or not args.no_diagnostics)]  # fmt: skip
    rows = {e: [evaluate(e, s, out, seed) for seed in s.seeds] for e in evals}
    if set(names) == set(MODELS):
        report(s, out, counts, seconds, rows, args.docs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
