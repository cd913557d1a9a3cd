"""CPU training throughput and MFU of the library's train step, fp32.

  python bench/train_throughput.py [--models tiny,0.1b,0.22b] [--seq-len 4096] [--batch 1]
                                   [--steps 3] [--breakdown] [--set model.wkv_chunk_size=32 ...]
  python bench/train_throughput.py --models 0.1b,0.1b+loss.chunk_tokens=0  # chunked vs whole logits

Each model runs `rwkvx_jax.training.TrainProgram` (the step `train.py` runs: loss with L2Wrap,
gradients, AdamW with clipping, parameter update), built from the `tiny` recipe with the model,
context and batch overridden, on a one-device mesh, from random params and random tokens; no data
pipeline, no checkpoints. The step is compiled once, run once more to warm up, then timed
`--steps` times (best and median).

MFU = model FLOPs per step / (step seconds x peak). Model FLOPs come from
`rwkvx_jax.training.training_flops_per_token` (the figure the trainer's progress bar uses); the
peak is the highest `rwkvx_jax.training.measure_peak_flops` (fp32, 1024^2 and 2048^2) of many
probes in this run: at the start, after every timed step and breakdown round, and at the end
(see `Peak`); if a breakdown part ran at a higher rate of model FLOPs than every probe, that rate
is the peak. On a machine shared with other jobs the step time depends on their load: the script
prints the load average, every step's time and the spread of the probes; compare within one run.

Models: `tiny` (the tiny recipe's V256 C128 L4 A2), `0.1b` (the rwkv7-world-0.1b shape: V65536
C768 L12, no sparse blocks), `0.22b` (rwkvx-0.22b: the same plus 4 sparse blocks), or any preset.
`NAME+KEY=VALUE[+...]` runs that model with train-config overrides of its own (after `--set`),
so one run can time two settings of one model one after the other.

`--breakdown` also times, for each model, the train step again and forward and forward+backward
(no optimiser) of: the whole loss; embedding + head + CE/L2Wrap with every block skipped, and
the logits alone; one RWKV block (x L), its TimeMix, WKV-7 kernel and ChannelMix; one sparse
block (x A), its attention layer, attention kernel and ChannelMix. Each part's model FLOPs over
its time over the peak shows which parts run far from the matmul rate. All parts are timed in
turn, round after round (best of `--breakdown-repeats`), so that they share the machine's busy
and quiet moments.
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import resource
import statistics

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from timing import Stopwatch, seconds, timed

from rwkvx_jax import ops
from rwkvx_jax import sharding as shd
from rwkvx_jax.model import RWKVX
from rwkvx_jax.rwkv7 import ChannelMix, RWKVBlock, TimeMix
from rwkvx_jax.sparse.block import SparseBlock, TopKChunkAttention
from rwkvx_jax.training.aot import describe_memory
from rwkvx_jax.training.config import REMAT_POLICIES, apply_overrides, recipe
from rwkvx_jax.training.flops import (
    matmul_param_count,
    mean_attended_keys,
    measure_peak_flops,
    training_flops_per_token,
)
from rwkvx_jax.training.program import TrainProgram

MODELS = {"tiny": "tiny", "0.1b": "rwkv7-world-0.1b", "0.22b": "rwkvx-0.22b"}


# ----------------------------------------------------------------------------- peak and memory


class Peak:
    """The MFU denominator: the highest fp32 matmul FLOP/s seen in this run.

    `rwkvx_jax.training.measure_peak_flops` (best of 3) at 1024^2 and 2048^2, probed at the
    start, after every timed step and breakdown part, and at the end. Other jobs on a shared
    machine only ever lower a probe, so the highest sample is the honest ceiling (a lower one
    would flatter the MFU)."""

    SIZES = (1024, 2048)

    def __init__(self, mesh):
        self.mesh = mesh
        self.samples: list[float] = []

    def probe(self, times: int = 1) -> float:
        for _ in range(times):
            for size in self.SIZES:
                self.samples.append(measure_peak_flops(self.mesh, "float32", size=size))
        return max(self.samples)

    @property
    def best(self) -> float:
        return max(self.samples)

    def summary(self) -> str:
        gf = sorted(s / 1e9 for s in self.samples)
        return (f"{len(gf)} probes ({'/'.join(f'{n}^2' for n in self.SIZES)}): min {gf[0]:.1f}, "
                f"median {statistics.median(gf):.1f}, max {gf[-1]:.1f} GFLOP/s")  # fmt: skip


def rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


# ----------------------------------------------------------------------------- one model


def train_config(preset_name: str, ctx: int, batch: int, remat: str, extra=()):
    overrides = [
        f"model={preset_name}", "model.dtype=float32", "model.param_dtype=float32",
        f"data.ctx={ctx}", f"data.batch_size={batch}", "mesh=1,1,1", f"remat={remat}",
        "stage=pretrain", *extra,
    ]  # fmt: skip
    return apply_overrides(recipe("tiny"), overrides), overrides


def flops_terms(model_config, params, ctx: int) -> dict[str, float]:
    """training_flops_per_token split into the terms its docstring names (per token)."""
    C, L, A = model_config.n_embd, model_config.n_rwkv_layer, model_config.n_attn_layer
    keys = mean_attended_keys(ctx, model_config.chunk_size, model_config.top_k) if A else 0.0
    return {
        "6 x matmul params": 6.0 * matmul_param_count(params),
        "WKV-7": 27.0 * model_config.head_size * C * L,
        "attention": 12.0 * C * keys * A,
        "total": training_flops_per_token(model_config, params, ctx),
    }


def bench_model(name: str, args, mesh, peak: Peak) -> dict:
    """`name`: a model name, optionally with `+KEY=VALUE` overrides of its own (`--models`); the
    whole of it labels the model's rows."""
    model, *own = (part.strip() for part in name.split("+"))
    preset_name = MODELS.get(model, model)
    config, overrides = train_config(
        preset_name, args.seq_len, args.batch, args.remat, [*args.set, *own]
    )
    mc = config.model
    T, B = args.seq_len, args.batch
    print(f"\n## {name}: preset {preset_name} (V={mc.vocab_size}, C={mc.n_embd}, "
          f"L={mc.n_rwkv_layer}, A={mc.n_attn_layer}, chunk {mc.chunk_size}, top-k {mc.top_k}), "
          f"T={T}, batch {B}")  # fmt: skip
    print(f"   config: recipe tiny + {' '.join(overrides)}")
    program = TrainProgram.create(config, mc, mesh)
    abstract_params = program.abstract_state["params"]
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(abstract_params))
    terms = flops_terms(mc, abstract_params, T)
    flops_step = B * T * terms["total"]
    n_matmul = matmul_param_count(abstract_params)
    print(f"   params {n_params / 1e6:.1f}M, matmul params {n_matmul / 1e6:.1f}M "
          "(rank >= 2 except emb and r_k; includes the head)")  # fmt: skip
    print("   training_flops_per_token: " + ", ".join(
        f"{k} {v / 1e6:.1f} MFLOP" for k, v in terms.items()
    ) + f"; per step {flops_step / 1e9:.1f} GFLOP")  # fmt: skip

    state = program.init_state()
    compile_s, compiled = timed(program.compile, T, sync=None)
    print(f"   compiled in {compile_s:.1f} s; {describe_memory(compiled)}")
    rng = np.random.default_rng(0)
    batch = program.global_batch(rng.integers(0, mc.vocab_size, (B, T + 1)))

    first, (state, metrics) = timed(program.step, state, batch)
    steps = args.steps if first >= 2.0 else max(args.steps, 10)
    times, losses = [], [float(metrics["loss"])]
    for _ in range(steps):
        step_s, (state, metrics) = timed(program.step, state, batch)
        times.append(step_s)
        losses.append(float(metrics["loss"]))
        peak.probe()
    best, median = min(times), statistics.median(times)
    print(f"   warm-up step {first:.2f} s; {steps} timed steps: "
          + ", ".join(f"{t:.2f}" for t in times)
          + f" s; losses {losses[0]:.3f} -> {losses[-1]:.3f} (ln V = {np.log(mc.vocab_size):.3f}); "
          f"peak RSS so far {rss_gib():.1f} GiB")  # fmt: skip
    result = dict(
        name=name, preset=preset_name, T=T, B=B, steps=steps, best=best, median=median,
        flops_step=flops_step, compile_s=compile_s,
    )  # fmt: skip
    del compiled, metrics
    if args.breakdown:
        result["breakdown"] = breakdown(program, state, batch, args, peak)
    del state
    program._compiled = None
    jax.clear_caches()
    gc.collect()
    return result


# ----------------------------------------------------------------------------- breakdown

_CAPTURED = (RWKVBlock, SparseBlock, TimeMix, ChannelMix, TopKChunkAttention)


def _capture_modules(model: RWKVX, params, tokens) -> dict[str, nn.Module]:
    """Unbound copies of the model's blocks and their sublayers, by parameter path
    ("blocks_1", "blocks_1/att", ...), captured while tracing its forward."""
    found = {}

    def interceptor(next_fun, args, kwargs, context):
        module = context.module
        if context.method_name == "__call__" and isinstance(module, _CAPTURED):
            found.setdefault("/".join(module.scope.path), module.clone(parent=None))
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(interceptor):
        jax.eval_shape(lambda p, t: model.apply({"params": p}, t), params, tokens)
    return found


def _skip_blocks(next_fun, args, kwargs, context):
    """Interceptor: every RWKV / sparse block returns its input (emb -> head only)."""
    module = context.module
    if context.method_name == "__call__" and isinstance(module, RWKVBlock):
        x, v_first = args[0], args[1]
        return x, v_first, {}
    if context.method_name == "__call__" and isinstance(module, SparseBlock):
        return args[0], {}
    return next_fun(*args, **kwargs)


def _module_fwd_bwd(module, n_inputs: int, cotangent):
    """jitted (forward, forward+backward) of <module's first output, cotangent>, gradients
    w.r.t. the params and every input (as in training)."""

    def loss(p, *xs):
        return jnp.vdot(module.apply({"params": p}, *xs)[0], cotangent)

    both = jax.value_and_grad(loss, argnums=tuple(range(1 + n_inputs)))
    return jax.jit(loss), jax.jit(both)


def _subtree(params, path: str):
    for part in path.split("/"):
        params = params[part]
    return params


def breakdown(program: TrainProgram, state, batch, args, peak: Peak) -> list:
    """Rows (part, depth, count, fwd s, fwd+bwd s, model GFLOP of fwd+bwd) for one model.

    Every part (and the train step itself) is compiled and run once, then all are timed in
    turn, `--breakdown-repeats` rounds, best of the rounds: on a shared machine each part then
    sees the same mix of quiet and busy moments. Each row of depth d + 1 is a part of the row of
    depth d above it; the depth-2 rows (x count) add up to the whole loss's fwd+bwd.
    """
    mc = program.model_config
    T, B, C, N = args.seq_len, args.batch, mc.n_embd, mc.head_size
    L, A, H = mc.n_rwkv_layer, mc.n_attn_layer, mc.n_embd // mc.head_size
    BT = B * T
    nan = float("nan")
    params = jax.tree.map(jnp.copy, state["params"])  # the step donates (deletes) its state
    parts = []  # (label, depth, count, fwd fn or None, fwd+bwd fn, args, GFLOP of fwd+bwd)

    held = {"state": state}

    def train_step():
        held["state"], metrics = program.step(held["state"], batch)
        return held["state"], metrics

    total = training_flops_per_token(mc, params, T) * BT / 1e9
    parts.append(("train step (loss, grads, AdamW update)", 0, 1, None, train_step, (), total))
    loss_fn = program.loss_fn
    parts.append(("whole loss, no optimiser", 1, 1, jax.jit(loss_fn),
                  jax.jit(jax.value_and_grad(loss_fn)), (params, batch), total))  # fmt: skip

    head_gflop = 6.0 * matmul_param_count({"head": params["head"]}) * BT / 1e9

    def skipped(p, tokens):
        with nn.intercept_methods(_skip_blocks):
            return loss_fn(p, tokens)

    # A random cotangent: with sum() XLA turns the backward matmuls into reductions.
    logits_ct = jax.random.normal(jax.random.key(8), (B, T, mc.vocab_size), jnp.float32)

    def logits_only(p, tokens):
        with nn.intercept_methods(_skip_blocks):
            return jnp.vdot(program.model.apply({"params": p}, tokens[:, :-1]), logits_ct)

    parts.append(("emb + ln_out + head + CE + L2Wrap (blocks skipped)", 2, 1, jax.jit(skipped),
                  jax.jit(jax.value_and_grad(skipped)), (params, batch), head_gflop))  # fmt: skip
    parts.append(("emb + ln_out + head, logits only", 3, 1, jax.jit(logits_only),
                  jax.jit(jax.value_and_grad(logits_only)), (params, batch),
                  head_gflop))  # fmt: skip

    modules = _capture_modules(program.model, params, batch[:, :-1])
    keys = jax.random.split(jax.random.key(7), 8)
    x = jax.random.normal(keys[0], (B, T, C), jnp.float32)
    ct = jax.random.normal(keys[1], (B, T, C), jnp.float32)
    wkv_gflop = 27.0 * N * C * BT / 1e9

    def module_part(path, label, depth, count, inputs, extra_gflop=0.0):
        p = _subtree(params, path)
        fwd, both = _module_fwd_bwd(modules[path], len(inputs), ct)
        gflop = 6.0 * matmul_param_count(p) * BT / 1e9 + extra_gflop
        parts.append((f"{label} ({path})", depth, count, fwd, both, (p, *inputs), gflop))

    name = "blocks_1" if L > 1 else "blocks_0"
    v_first = jax.random.normal(keys[2], (B, T, C), jnp.float32) if L > 1 else None
    module_part(name, "RWKV block", 2, L, (x, v_first), wkv_gflop)
    module_part(f"{name}/att", "TimeMix", 3, L, (x, v_first), wkv_gflop)

    shape = (B, T, H, N)
    r, k, v, kk = (jax.random.normal(keys[3 + i], shape) for i in range(4))
    w = -0.6065 * jax.nn.sigmoid(jax.random.normal(keys[7], shape))
    kk = kk / jnp.linalg.norm(kk, axis=-1, keepdims=True)
    wkv_loss = lambda *xs: jnp.vdot(
        ops.wkv7(*xs, backend=mc.wkv_backend, chunk_size=mc.wkv_chunk_size)[0], r
    )
    parts.append(("WKV-7 kernel", 4, L, jax.jit(wkv_loss),
                  jax.jit(jax.value_and_grad(wkv_loss, argnums=tuple(range(6)))),
                  (r, w, k, v, -kk, 0.5 * kk), wkv_gflop))  # fmt: skip
    module_part(f"{name}/ffn", "ChannelMix", 3, L, (x,))

    if A:
        keys_per_query = mean_attended_keys(T, mc.chunk_size, mc.top_k)
        attn_gflop = 12.0 * C * keys_per_query * BT / 1e9
        module_part("moba_0", "sparse block", 2, A, (x,), attn_gflop)
        module_part("moba_0/att", "top-k chunk attention layer", 3, A, (x,), attn_gflop)
        attend_loss = lambda q, k, v: jnp.vdot(
            ops.topk_chunk_attention(
                q, k, v, chunk_size=mc.chunk_size, top_k=mc.top_k, backend=mc.attention_backend
            ),
            r,
        )
        parts.append(("attention kernel", 4, A, jax.jit(attend_loss),
                      jax.jit(jax.value_and_grad(attend_loss, argnums=(0, 1, 2))), (r, k, v),
                      attn_gflop))  # fmt: skip
        module_part("moba_0/ffn", "ChannelMix", 3, A, (x,))

    calls = [(i, kind, fn, part[5]) for i, part in enumerate(parts)
             for kind, fn in (("fwd", part[3]), ("both", part[4])) if fn is not None]  # fmt: skip
    clock = Stopwatch()
    for _, _, fn, fn_args in calls:  # compile + one run each
        jax.block_until_ready(fn(*fn_args))
    compiled_s = clock.seconds()
    print(f"   breakdown: {len(calls)} functions compiled and run once in {compiled_s:.0f} s; "
          f"now {args.breakdown_repeats} timed rounds")  # fmt: skip
    times = {(i, kind): [] for i, kind, _, _ in calls}
    for _ in range(args.breakdown_repeats):
        for i, kind, fn, fn_args in calls:
            times[(i, kind)].append(seconds(fn, *fn_args))
        peak.probe()
    rows = []
    for i, (label, depth, count, *_, gflop) in enumerate(parts):
        fwd = min(times.get((i, "fwd"), [nan]))
        both = min(times[(i, "both")])
        rows.append((label, depth, count, fwd, both, gflop))
        print(f"     {label}: fwd {fwd:.3f} s, fwd+bwd {both:.3f} s (x{count}; rounds "
              + ", ".join(f"{t:.2f}" for t in times[(i, "both")]) + ")")  # fmt: skip
    step_s, whole = rows[0][4], rows[1][4]
    parts_s = sum(count * both for _, depth, count, _, both, _ in rows[2:] if depth == 2)
    rows.insert(2, ("optimiser + update: step - whole loss", 1, 1, nan, step_s - whole, nan))
    rows.append(("rest of the loss: whole loss - the parts above", 2, 1, nan, whole - parts_s, nan))
    return rows


# ----------------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--models", default="tiny,0.1b", help=f"comma list: {sorted(MODELS)} "
                        "or preset names, each optionally with +KEY=VALUE overrides of its own, "
                        "e.g. 0.1b,0.1b+loss.chunk_tokens=0")  # fmt: skip
    parser.add_argument("--seq-len", type=int, default=4096)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument(
        "--steps", type=int, default=3, help="timed steps (at least 10 when a step takes < 2 s)"
    )
    parser.add_argument("--remat", default="none", choices=REMAT_POLICIES)
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE",
        help="extra train-config override for every model, e.g. model.wkv_chunk_size=32",
    )  # fmt: skip
    parser.add_argument("--breakdown", action="store_true", help="time the step's parts too")
    parser.add_argument("--breakdown-repeats", type=int, default=3)
    args = parser.parse_args()

    mesh = shd.make_mesh((1, 1, 1), jax.devices()[:1])
    load = os.getloadavg()
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}; jax {jax.__version__} on "
          f"{jax.default_backend()}; fp32")  # fmt: skip
    peak = Peak(mesh)
    print(f"peak fp32 matmul at the start: {peak.probe(times=3) / 1e9:.1f} GFLOP/s")

    results = [bench_model(name.strip(), args, mesh, peak) for name in args.models.split(",")]

    peak.probe(times=3)
    load = os.getloadavg()
    print(f"\npeak fp32 matmul, {peak.summary()}. Load average now "
          f"{load[0]:.2f} {load[1]:.2f} {load[2]:.2f}; peak RSS {rss_gib():.1f} GiB")  # fmt: skip
    top, fastest = peak.best, None
    for r in results:
        for part, _, _, fwd, both, gflop in r.get("breakdown", []):
            for rate in (gflop / 3 * 1e9 / fwd, gflop * 1e9 / both):
                if rate > top:
                    top, fastest = rate, f"{r['name']}: {part}"
    if fastest:
        print(f"The fastest breakdown part ({fastest}) ran at {top / 1e9:.1f} GFLOP/s of model "
              "FLOPs, above every probe: the MFU below uses that rate as the peak.")  # fmt: skip
    else:
        print("MFU below uses the highest probe as the peak.")

    print("\n| model | T | batch | steps | step s (best / median) | tokens/s (best) "
          "| model GFLOP/step | peak GFLOP/s | MFU (best / median) |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|")
    for r in results:
        tokens = r["B"] * r["T"]
        print(f"| {r['name']} ({r['preset']}) | {r['T']} | {r['B']} | {r['steps']} | "
              f"{r['best']:.2f} / {r['median']:.2f} | {tokens / r['best']:,.0f} | "
              f"{r['flops_step'] / 1e9:,.1f} | {top / 1e9:.1f} | "
              f"{r['flops_step'] / r['best'] / top:.1%} / "
              f"{r['flops_step'] / r['median'] / top:.1%} |")  # fmt: skip

    for r in results:
        if "breakdown" in r:
            print_breakdown(r, top)


def print_breakdown(r: dict, peak: float) -> None:
    step_s = r["breakdown"][0][4]
    print(f"\n{r['name']} breakdown, T={r['T']}, batch {r['B']}; the step in the same rounds: "
          f"{step_s:.2f} s. share = count x fwd+bwd s / that step; % of peak = model FLOPs "
          "(fwd: 1/3 of fwd+bwd's) / time / peak:\n")  # fmt: skip
    print("| part | x | fwd s | fwd+bwd s | bwd / fwd | x count s | share of step "
          "| model GFLOP (x1) | fwd % of peak | fwd+bwd % of peak |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|")
    fmt = lambda value, spec: "" if np.isnan(value) else format(value, spec)
    for part, depth, count, fwd, both, gflop in r["breakdown"]:
        fwd_eff = gflop / 3 * 1e9 / fwd / peak
        both_eff = gflop * 1e9 / both / peak
        label = ".." * depth + (" of which " if depth else "") + part
        print(f"| {label} | {count} | {fmt(fwd, '.3f')} | {both:.3f} | "
              f"{fmt((both - fwd) / fwd, '.1f')} | {count * both:.2f} | "
              f"{count * both / step_s:.0%} | {fmt(gflop, ',.1f')} | {fmt(fwd_eff, '.0%')} | "
              f"{fmt(both_eff, '.0%')} |")  # fmt: skip


if __name__ == "__main__":
    main()
