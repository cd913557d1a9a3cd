"""The paper's central claim at CPU scale: RWKV-X keeps passkey retrieval past its training
length, RWKV-7 of the same size falls off.

One reproducible experiment, in four steps that each resume where they stopped (docs/
PAPER_CLAIM.md has the results):

1. data: the synthetic retrieval mix (`rwkvx_jax.data.synthetic.RetrievalMix`), one binidx
   file per training phase: windows holding one passkey document (the evaluation's prompt,
   SPEC §8, pass-key line at a random depth, then the answer) plus stdlib source text, or
   stdlib text only.
2. train: a tiny RWKV-X (4 RWKV + 2 sparse-attention blocks, chunk 32, top-k 3) and a tiny
   RWKV-7 with six RWKV blocks (the same parameter budget within 5%), each in two phases, a
   curriculum of lengths: 128-token windows of short documents without the task description,
   then 512-token windows (the training length) of full prompts whose lengths grow over the
   first 30% of the phase. Both through `training.train` with the `tiny` recipe and the same
   overrides; the equivalent `train.py` commands are printed.
3. eval: passkey retrieval (`PasskeyEvaluator`, greedy, exact match) at 1x to 16x the training
   length, 10 depths x 5 seeds; then two diagnostics of the trained RWKV-X: dense attention
   (top-k covering every chunk) and its attention output zeroed (its RWKV blocks alone).
4. report: accuracy table (stdout + summary.json), plots of accuracy by length and by needle
   distance, training curves, each model's heatmap; `--docs DIR` copies the figures there.

python bench/paper_claim.py                      # the real run: ~25-30 min training on two
                                                 # CPU cores, ~6 min evaluation
python bench/paper_claim.py --quick              # a smoke test of every step (~2 min)
python bench/paper_claim.py --docs docs/paper_claim   # also copy the figures for the docs

`--experiment facts` runs the second experiment instead (bench/many_facts_claim.py): many-facts
retrieval inside the training length, where a recurrent state is the bottleneck.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import sys

import numpy as np
from timing import Stopwatch

# The bench scripts run from the repository root without installing it.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from rwkvx_jax.atomic_files import write_text_atomically
from rwkvx_jax.training.config import TrainConfig, apply_overrides, recipe


@dataclasses.dataclass(frozen=True)
class Settings:
    """Everything the experiment depends on.

    Training has two phases, both with the `tiny` recipe's optimiser (AdamW, warmup, cosine from
    lr to lr_final), the second starting from the first one's exported params:
      short: windows of `short_ctx` tokens, passkey documents without the task description
        (it does not fit), i.e. cheap short-range retrieval; `short_steps=0` skips the phase.
      long: windows of `ctx` tokens (the training length), the full evaluation prompt, document
        lengths growing over the first `curriculum_fraction` of the phase.
    """

    short_ctx: int = 128
    short_batch_size: int = 16
    short_steps: int = 400
    ctx: int = 512
    batch_size: int = 4
    steps: int = 700
    lr: float = 3e-3
    lr_final: float = 3e-4
    warmup_steps: int = 20
    curriculum_fraction: float = 0.3
    plain_fraction: float = 0.05
    plain_bytes: int = 8_000_000
    chunk_size: int = 32
    top_k: int = 3
    seed: int = 0
    length_multiples: tuple[int, ...] = (1, 2, 4, 8, 16)
    depths: int = 10
    seeds: int = 5

    @property
    def lengths(self) -> list[int]:
        return [m * self.ctx for m in self.length_multiples]


@dataclasses.dataclass(frozen=True)
class Phase:
    """One training run of the curriculum."""

    name: str
    ctx: int
    batch_size: int
    steps: int
    task_probability: float
    curriculum_fraction: float

    @property
    def windows(self) -> int:
        return self.steps * self.batch_size


# Added to Settings.seed so the phases draw different documents; any distinct values would do,
# these are the ones the documented run used.
PHASE_DATA_SEEDS = {"short": 5, "long": 4}


def phases(s: Settings) -> list[Phase]:
    short = Phase("short", s.short_ctx, s.short_batch_size, s.short_steps, 0.0, 0.0)
    long = Phase("long", s.ctx, s.batch_size, s.steps, 1.0, s.curriculum_fraction)
    return [short, long] if s.short_steps else [long]


QUICK = Settings(
    short_ctx=128,
    short_batch_size=4,
    short_steps=3,
    ctx=320,
    batch_size=4,
    steps=4,
    warmup_steps=2,
    plain_bytes=500_000,
    length_multiples=(1, 2),
    depths=2,
    seeds=1,
)

# The two models: RWKV-X as the `tiny` preset (R R S R R S) with chunks small enough that the
# training length already exercises top-k selection; RWKV-7 with two more RWKV blocks in place
# of the two sparse blocks (a sparse block and an RWKV block cost about the same parameters).
MODELS: dict[str, list[str]] = {
    "rwkvx": ["model=tiny"],
    "rwkv7": ["model=tiny-rwkv7", "model.n_rwkv_layer=6"],
}
# What is evaluated: each trained model, and two diagnostics of the trained RWKV-X that say
# where its retrieval comes from: its attention read densely (top-k = every chunk, so chunk
# selection cannot miss the needle), and its attention switched off (the sparse blocks'
# output projections zeroed; their channel mixes stay), i.e. its RWKV blocks alone.
EVALS: dict[str, tuple[str, str | None]] = {
    "rwkvx": ("rwkvx", None),
    "rwkv7": ("rwkv7", None),
    "rwkvx-dense": ("rwkvx", "dense"),
    "rwkvx-noattn": ("rwkvx", "no-attention"),
}
LABELS = {
    "rwkvx": "RWKV-X (4 RWKV + 2 sparse)",
    "rwkv7": "RWKV-7 (6 RWKV)",
    "rwkvx-dense": "RWKV-X, dense attention at eval",
    "rwkvx-noattn": "RWKV-X, attention output zeroed",
}
COLORS = {
    "rwkvx": "#1f77b4",
    "rwkv7": "#d62728",
    "rwkvx-dense": "#17becf",
    "rwkvx-noattn": "#7f7f7f",
}


def model_overrides(name: str, s: Settings) -> list[str]:
    overrides = list(MODELS[name])
    if name == "rwkvx":
        overrides += [f"model.chunk_size={s.chunk_size}", f"model.top_k={s.top_k}"]
    return overrides


def workdir(out: str, name: str, phase: Phase) -> str:
    return os.path.join(out, name, phase.name)


def train_overrides(name: str, s: Settings, out: str, phase: Phase) -> list[str]:
    """The `train.py` overrides of one model's run of one phase (on top of the `tiny` recipe)."""
    overrides = model_overrides(name, s) + [
        f"name=paper-claim-{name}-{phase.name}",
        f"workdir={workdir(out, name, phase)}",
        f"data.corpus={data_prefix(out, phase)}",
        "data.order=sequential",
        f"data.ctx={phase.ctx}",
        f"data.batch_size={phase.batch_size}",
        f"steps={phase.steps}",
        f"seed={s.seed}",
        f"optimizer.lr={s.lr}",
        f"optimizer.lr_final={s.lr_final}",
        f"optimizer.warmup_steps={s.warmup_steps}",
        f"optimizer.total_steps={phase.steps}",
        f"checkpoint.every={max(1, phase.steps // 4)}",
        "checkpoint.keep=1",
        "sample.tokens=0",
    ]
    previous = phases(s).index(phase) - 1
    if previous >= 0:
        start = workdir(out, name, phases(s)[previous])
        overrides.append(f"init_checkpoint={os.path.join(start, 'export', 'params')}")
    return overrides


def train_config(name: str, s: Settings, out: str, phase: Phase) -> TrainConfig:
    return apply_overrides(recipe("tiny"), train_overrides(name, s, out, phase))


def data_prefix(out: str, phase: Phase) -> str:
    return os.path.join(out, "data", f"retrieval_mix_{phase.name}")


def final_params(out: str, name: str, s: Settings) -> str:
    return os.path.join(workdir(out, name, phases(s)[-1]), "export", "params")


def log(text: str) -> None:
    print(text, flush=True)


# ----------------------------------------------------------------------------- data


def make_data(s: Settings, out: str, phase: Phase) -> None:
    from rwkvx_jax import ByteTokenizer
    from rwkvx_jax.data import stdlib_corpus_tokens
    from rwkvx_jax.data.synthetic import RetrievalMix

    prefix = data_prefix(out, phase)
    if os.path.exists(prefix + ".bin"):
        log(f"data {phase.name}: {prefix}.bin exists")
        return
    os.makedirs(os.path.dirname(prefix), exist_ok=True)
    clock = Stopwatch()
    mix = RetrievalMix(
        ByteTokenizer(),
        stdlib_corpus_tokens(s.plain_bytes),
        phase.ctx,
        seed=s.seed + PHASE_DATA_SEEDS[phase.name],
        curriculum_windows=int(phase.curriculum_fraction * phase.windows),
        plain_fraction=s.plain_fraction,
        task_probability=phase.task_probability,
    )
    # One window more than the run reads: TokenWindows needs ctx + 1 tokens for the last.
    n = mix.write_binidx(prefix, phase.windows + 1)
    log(
        f"data {phase.name}: {phase.windows + 1} windows x {phase.ctx} tokens ({n:,} tokens) in "
        f"{prefix} ({clock.seconds():.1f} s); documents {mix.min_length}.."
        f"{phase.ctx} tokens, curriculum over the first {mix.curriculum_windows} windows"
    )


# ----------------------------------------------------------------------------- train


def parameter_count(config) -> int:
    import jax

    from rwkvx_jax.model import RWKVX

    shapes = jax.eval_shape(
        lambda key: RWKVX(config).init(key, np.zeros((1, 8), np.int32)), jax.random.key(0)
    )
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes))


def check_budget(s: Settings, out: str) -> dict[str, int]:
    last = phases(s)[-1]
    counts = {name: parameter_count(train_config(name, s, out, last).model) for name in MODELS}
    ratio = counts["rwkv7"] / counts["rwkvx"]
    log(
        "parameters: "
        + ", ".join(f"{name} {n:,}" for name, n in counts.items())
        + f" (RWKV-7 / RWKV-X = {ratio:.3f})"
    )
    if abs(ratio - 1) > 0.05:
        raise SystemExit(f"parameter budgets differ by more than 5% ({ratio:.3f})")
    return counts


def train_phase(name: str, s: Settings, out: str, phase: Phase, progress: bool) -> float:
    """Trains (or resumes) one model's phase; returns the wall seconds it took (all attempts)."""
    command = " ".join(["python train.py"] + train_overrides(name, s, out, phase))
    return timed_training(
        train_config(name, s, out, phase), command, f"{name} {phase.name}", progress
    )


def timed_training(config: TrainConfig, command: str, label: str, progress: bool) -> float:
    """Trains (or resumes) one run, logging its `train.py` command; returns its wall seconds
    over all attempts, kept in the run's train_seconds.json so a finished run is not retrained."""
    from rwkvx_jax import training

    timing_path = os.path.join(config.workdir, "train_seconds.json")
    previous = read_json(timing_path, {"seconds": 0.0, "complete": False})
    if previous["complete"]:
        log(f"train {label}: done ({previous['seconds']:.0f} s)")
        return previous["seconds"]
    log(f"train {label}: {command}")
    os.makedirs(config.workdir, exist_ok=True)
    clock = Stopwatch()
    training.train(config, progress=progress, log=log)
    seconds = previous["seconds"] + clock.seconds()
    write_json(timing_path, {"seconds": seconds, "complete": True})
    log(f"train {label}: {seconds:.0f} s")
    return seconds


# ----------------------------------------------------------------------------- eval


def passkey_dir(out: str, name: str) -> str:
    model, change = EVALS[name]
    return os.path.join(out, model, "passkey" if change is None else f"passkey_{change}")


def ablated(config, params, change: str | None, longest: int):
    """The model config and params of one evaluation (see EVALS)."""
    import jax

    if change is None:
        return config, params
    if change == "dense":
        return config.replace(top_k=-(-longest // config.chunk_size) + 1), params

    def zero_attention_output(path, leaf):
        keys = [getattr(p, "key", None) for p in path]
        is_output = keys[0].startswith("moba_") and keys[1:3] == ["att", "output"]
        return leaf * 0 if is_output else leaf

    return config, jax.tree_util.tree_map_with_path(zero_attention_output, params)


def evaluate(name: str, s: Settings, out: str, progress: bool) -> list:
    import rwkvx_jax
    from rwkvx_jax.data.passkey import depth_grid
    from rwkvx_jax.evals.passkey import PasskeyEvaluator, format_summary

    model, change = EVALS[name]
    config, params = rwkvx_jax.load(final_params(out, model, s))
    config, params = ablated(config, params, change, max(s.lengths))
    evaluator = PasskeyEvaluator(config, params)
    clock = Stopwatch()
    run = evaluator.run(
        passkey_dir(out, name),
        s.lengths,
        depth_grid(s.depths),
        range(s.seeds),
        model_name=f"paper-claim-{name}",
        progress=progress,
    )
    log(f"eval {name}: {run.computed} prompts in {clock.seconds():.0f} s")
    log(format_summary(run.rows))
    return run.rows


# ----------------------------------------------------------------------------- report


def accuracy_by_length(rows) -> dict[int, float]:
    lengths = sorted({r.length for r in rows})
    return {n: float(np.mean([r.correct for r in rows if r.length == n])) for n in lengths}


def read_losses(path: str) -> tuple[np.ndarray, np.ndarray]:
    """(steps, losses) of one run's metrics.jsonl (the last record of a step wins)."""
    by_step = {}
    with open(os.path.join(path, "metrics.jsonl")) as f:
        for line in f:
            record = json.loads(line)
            by_step[record["step"]] = record["loss"]
    steps = sorted(by_step)
    return np.asarray(steps), np.asarray([by_step[k] for k in steps])


def plot_accuracy(results: dict, s: Settings, path: str) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 4.0))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for name, accuracy in results.items():
        lengths = sorted(accuracy)
        diagnostic = EVALS[name][1] is not None
        ax.plot(
            lengths, [accuracy[n] for n in lengths], marker="." if diagnostic else "o",
            linestyle="--" if diagnostic else "-", color=COLORS[name], label=LABELS[name],
        )  # fmt: skip
    ax.axvline(s.ctx, color="grey", linestyle=":", label=f"training length ({s.ctx})")
    ax.axhline(0.9, color="grey", linestyle="--", linewidth=0.8, label="90%")
    ax.set_xscale("log", base=2)
    ax.set_xticks(s.lengths, [str(n) for n in s.lengths])
    ax.set_ylim(-0.03, 1.03)
    ax.set_xlabel("Context length (byte tokens)")
    ax.set_ylabel("Passkey accuracy")
    prompts = s.depths * s.seeds
    ax.set_title(f"Passkey retrieval past the training length ({prompts} prompts per length)")
    ax.legend(loc="lower left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def plot_distance(rows_by_model: dict, s: Settings, path: str) -> None:
    """Accuracy against the needle's distance from the question, one line per context length.

    Separates "how far back is the needle" from "how much text came before it": if retrieval
    only depended on distance, the lines of all lengths would coincide.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    names = [n for n in MODELS if n in rows_by_model]
    fig = Figure(figsize=(4.6 * len(names), 3.8))
    FigureCanvasAgg(fig)
    from rwkvx_jax.data.passkey import DEFAULT_KEY_DIGITS, TASK

    edges = 2.0 ** np.arange(5, 15, 0.5)  # 32 .. 16K tokens, half-octave bins
    # The farthest a needle stood from the end of a training prompt: right after the task, in
    # a document filling the window (answer " N." and end of document after the prompt).
    farthest = s.ctx - len(TASK.encode()) - (DEFAULT_KEY_DIGITS + 3)
    colors = {n: f"C{i}" for i, n in enumerate(s.lengths)}
    for i, name in enumerate(names):
        ax = fig.add_subplot(1, len(names), i + 1, sharey=fig.axes[0] if i else None)
        for length in s.lengths:
            rows = [r for r in rows_by_model[name] if r.length == length]
            distance = np.array([r.prompt_tokens - r.needle_token for r in rows])
            correct = np.array([r.correct for r in rows], float)
            bins = np.digitize(distance, edges)
            xs, ys = [], []
            for b in sorted(set(bins)):
                xs.append(float(np.exp(np.mean(np.log(distance[bins == b])))))
                ys.append(float(correct[bins == b].mean()))
            ax.plot(xs, ys, marker="o", color=colors[length], label=f"context {length}")
        ax.axvline(farthest, color="grey", linestyle=":", label="farthest in training")
        ax.set_xscale("log", base=2)
        ax.set_ylim(-0.03, 1.03)
        ax.set_xlabel("Needle to end of prompt (tokens)")
        ax.set_ylabel("Passkey accuracy")
        ax.set_title(LABELS[name], fontsize=10)
        ax.legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def plot_losses(s: Settings, out: str, path: str) -> None:
    """Training loss of both models, one panel per phase."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    runs = phases(s)
    fig = Figure(figsize=(4.2 * len(runs), 3.8))
    FigureCanvasAgg(fig)
    for i, phase in enumerate(runs):
        ax = fig.add_subplot(1, len(runs), i + 1)
        for name in MODELS:
            steps, losses = read_losses(workdir(out, name, phase))
            window = max(1, len(losses) // 40)
            smooth = np.convolve(losses, np.ones(window) / window, mode="valid")
            ax.plot(steps, losses, color=COLORS[name], alpha=0.2, linewidth=0.6)
            ax.plot(
                steps[window - 1 :], smooth, color=COLORS[name], label=LABELS[name],
                linestyle="-" if name == "rwkvx" else "--", linewidth=1.6,
            )  # fmt: skip
        ax.set_yscale("log")
        ax.set_xlabel("Step")
        ax.set_ylabel("Training loss (nats per byte)")
        ax.set_title(f"{phase.name}: ctx {phase.ctx}, batch {phase.batch_size}", fontsize=10)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def report(s: Settings, out: str, counts, seconds, rows_by_model, docs: str | None) -> dict:
    results = {name: accuracy_by_length(rows) for name, rows in rows_by_model.items()}
    figures = os.path.join(out, "figures")
    os.makedirs(figures, exist_ok=True)
    plot_accuracy(results, s, os.path.join(figures, "accuracy_by_length.png"))
    plot_losses(s, out, os.path.join(figures, "training_loss.png"))
    plot_distance(rows_by_model, s, os.path.join(figures, "accuracy_by_distance.png"))
    for name in MODELS:
        shutil.copyfile(
            os.path.join(passkey_dir(out, name), "passkey_heatmap.png"),
            os.path.join(figures, f"heatmap_{name}.png"),
        )
    final_loss = {}
    for name in MODELS:
        _, losses = read_losses(workdir(out, name, phases(s)[-1]))
        final_loss[name] = float(np.mean(losses[-max(1, len(losses) // 10) :]))
    total = {name: sum(by_phase.values()) for name, by_phase in seconds.items()}
    summary = {
        "settings": dataclasses.asdict(s),
        "parameters": counts,
        "train_seconds": seconds,
        "final_loss": final_loss,
        "accuracy": {name: {str(n): a for n, a in acc.items()} for name, acc in results.items()},
        "prompts_per_length": s.depths * s.seeds,
    }
    write_json(os.path.join(out, "summary.json"), summary)
    head = "| model | params | train s | final loss | " + " | ".join(
        f"{n} ({n // s.ctx}x)" for n in s.lengths
    )
    lines = [head + " |", "|" + "---|" * (4 + len(s.lengths))]
    for name in results:
        cells = [f"{results[name].get(n, float('nan')):.0%}" for n in s.lengths]
        trained = name in MODELS
        lines.append(
            f"| {LABELS[name]} | {counts[name]:,} | {total[name]:.0f} | {final_loss[name]:.3f} | "
            if trained
            else f"| {LABELS[name]} | | | | "
        )
        lines[-1] += " | ".join(cells) + " |"
    log("\n".join(lines))
    if docs:
        os.makedirs(docs, exist_ok=True)
        for name in os.listdir(figures):
            shutil.copyfile(os.path.join(figures, name), os.path.join(docs, name))
        log(f"figures copied to {docs}")
    return summary


# ----------------------------------------------------------------------------- main


def read_json(path: str, default):
    """The JSON in `path`, or `default` when there is no such file."""
    if not os.path.exists(path):
        return default
    with open(path) as f:
        return json.load(f)


def write_json(path: str, data) -> None:
    """Writes `data` as sorted, indented JSON, atomically."""
    write_text_atomically(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


def parse_settings(pairs: list[str], s: Settings, parser) -> dict:
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
    return changes


def main(argv=None) -> int:
    experiment = argparse.ArgumentParser(add_help=False)
    experiment.add_argument("--experiment", choices=("passkey", "facts"), default="passkey")
    chosen, rest = experiment.parse_known_args(argv)
    if chosen.experiment == "facts":
        import many_facts_claim

        return many_facts_claim.main(rest)
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--experiment", choices=("passkey", "facts"), default="passkey",
        help="passkey past the training length (this file) or many facts within it",
    )  # fmt: skip
    parser.add_argument("--quick", action="store_true", help="a minute-scale smoke run")
    parser.add_argument("--out", help="run directory (runs/paper_claim[_quick])")
    parser.add_argument("--docs", help="copy the figures to this directory")
    parser.add_argument("--seeds", type=int, help="passkey seeds per (length, depth)")
    parser.add_argument("--depths", type=int, help="passkey depths")
    parser.add_argument(
        "--set", action="append", default=[], metavar="FIELD=VALUE",
        help="change a Settings field (e.g. --set batch_size=4); a new --out keeps runs apart",
    )  # fmt: skip
    parser.add_argument("--models", default=",".join(MODELS), help="subset to train/evaluate")
    parser.add_argument(
        "--skip-eval", action="store_true", help="stop after training (e.g. to time it)"
    )
    parser.add_argument(
        "--no-diagnostics", action="store_true",
        help="evaluate only the trained models (not RWKV-X with dense / no attention)",
    )  # fmt: skip
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)

    s = QUICK if args.quick else Settings()
    changes = {k: getattr(args, k) for k in ("seeds", "depths") if getattr(args, k)}
    s = dataclasses.replace(s, **changes, **parse_settings(args.set, s, parser))
    out = args.out or ("runs/paper_claim_quick" if args.quick else "runs/paper_claim")
    names = [n for n in args.models.split(",") if n]
    unknown = sorted(set(names) - set(MODELS))
    if unknown:
        parser.error(f"unknown models {unknown}; known: {sorted(MODELS)}")
    os.makedirs(out, exist_ok=True)
    saved = read_json(os.path.join(out, "settings.json"), None)
    if saved is not None and saved != json.loads(json.dumps(dataclasses.asdict(s))):
        parser.error(f"{out} holds a run with other settings ({saved}); choose another --out")
    write_json(os.path.join(out, "settings.json"), dataclasses.asdict(s))
    progress = not args.no_progress

    counts = check_budget(s, out)
    for phase in phases(s):
        make_data(s, out, phase)
    seconds = {
        name: {phase.name: train_phase(name, s, out, phase, progress) for phase in phases(s)}
        for name in names
    }
    if args.skip_eval:
        return 0
    evals = [
        name
        for name, (model, change) in EVALS.items()
        if model in names and (change is None or not args.no_diagnostics)
    ]
    rows = {name: evaluate(name, s, out, progress) for name in evals}
    if set(names) == set(MODELS):
        report(s, out, counts, seconds, rows, args.docs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
