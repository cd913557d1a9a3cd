"""WKV-7 on an accelerator: the Pallas kernel against the chunked XLA path and fla, same run.

  python bench/wkv7_kernels.py [--seq-lens 4096,16384,65536] [--bh 8,64]
                               [--dtypes bfloat16,float32] [--impls pallas,xla,fla] [--repeats 5]
                               [--json FILE] [--quick] [--forward-only]

For every T x B*H (B = 1, H = B*H, N = 64) and dtype it times forward and forward+backward
(all seven gradients, random cotangents on y and the final state) of each implementation and
prints milliseconds and the ratios xla / pallas and fla / pallas (> 1: ours is faster). Every
forward output is also compared with the fp32 `lax.scan` oracle run on the same (dtype-rounded)
inputs: max|y - y_ref| / max|y_ref|, and the final state likewise. At the smallest size each
Pallas implementation's gradients are compared with the chunked XLA path's (itself tested
against the oracle).

Implementations: "pallas" = `pallas_kernels.wkv7(backend="pallas_gpu")` on GPU or "pallas_tpu"
on TPU; "xla" = `backend="xla_chunked"` (chunk 16); "fla" = fla's Triton `chunk_rwkv7` through
PyTorch (GPU only; needs the `fla-core` package; given RWKV-7's decay bound as `lower_bound`,
fla's fastest legal setting). Inputs follow RWKV-7's ranges: log-decay in [-0.6065, 0),
a = -kk, b = kk * a_rate with kk unit-norm per head. Timings: median of --repeats after one
warm-up call, device-synchronised.
Results stream to stdout (a markdown table) and, with --json, to a file after every case.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
from pathlib import Path

import jax
import jax.numpy as jnp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from timing import Stopwatch, median_ms  # noqa: E402

import pallas_kernels  # noqa: E402
from pallas_kernels.wkv7 import wkv7_reference  # noqa: E402

N = 64
DECAY_BOUND = -0.6065  # RWKV-7: log-decay = -exp(-softplus(-x) - 0.5) >= -e^{-1/2}


@functools.partial(jax.jit, static_argnums=(1, 2))
def make_inputs(seed: int, T: int, H: int) -> dict[str, jax.Array]:
    """fp32 inputs in RWKV-7's ranges, [1, T, H, N] each, plus cotangents, made on the device."""
    keys = jax.random.split(jax.random.key(seed), 8)
    shape = (1, T, H, N)
    normal = lambda i, scale=1.0: scale * jax.random.normal(keys[i], shape, jnp.float32)
    log_decay = -jnp.exp(-jax.nn.softplus(-normal(0)) - 0.5)
    kk = normal(1)
    kk = kk / jnp.linalg.norm(kk, axis=-1, keepdims=True)
    a_rate = jax.nn.sigmoid(normal(2))
    return {
        "r": normal(3, 0.5),
        "w": log_decay,
        "k": normal(4, 0.5),
        "v": normal(5),
        "a": -kk,
        "b": kk * a_rate,
        "dy": normal(6),
        "ds": 0.1 * jax.random.normal(keys[7], (1, H, N, N), jnp.float32),
    }


@jax.jit
def device_rel_err(got, want):
    """max |got - want| / max |want|, computed on the device (fp32)."""
    got, want = got.astype(jnp.float32), want.astype(jnp.float32)
    return jnp.max(jnp.abs(got - want)) / jnp.maximum(jnp.max(jnp.abs(want)), 1e-30)


def rel_err(got, want) -> float:
    return float(device_rel_err(got, want))


# ----------------------------------------------------------------------------- JAX impls


def kernel_for(impl: str):
    """The WKV-7 function an implementation name stands for.

    "xla" is the chunked XLA path; "pallas" the accelerator's kernel with its defaults;
    "pallas@KEY=VALUE,..." the GPU kernel with options (e.g. pallas@dot_precision=tf32x3,
    pallas@chunk_size=32,value_tile=32, pallas@schedule=chunk_parallel,num_warps=8).
    """
    if impl == "xla":
        return functools.partial(pallas_kernels.wkv7, backend="xla_chunked")
    # On a CPU (--allow-cpu, to check this driver) the GPU kernels run in interpret mode.
    interpret = jax.default_backend() == "cpu"
    if impl == "pallas":
        return functools.partial(
            pallas_kernels.wkv7, backend=accelerator_backend(), interpret=interpret
        )
    name, _, options = impl.partition("@")
    if name != "pallas" or accelerator_backend() != "pallas_gpu":
        raise ValueError(f"unknown implementation {impl!r} on {jax.default_backend()}")
    from pallas_kernels.wkv7.gpu import wkv7_gpu
    from pallas_kernels.wkv7.gpu_options import GpuOptions

    options = GpuOptions(**impl_options(impl))
    return functools.partial(wkv7_gpu, options=options, interpret=interpret)


def impl_options(impl: str) -> dict:
    """The GPU kernel's options (`GpuOptions` fields) of "pallas@KEY=VALUE,...": {KEY: VALUE},
    digits as ints."""
    options = {}
    for item in filter(None, impl.partition("@")[2].split(",")):
        key, _, value = item.partition("=")
        options[key] = int(value) if value.isdigit() else value
    return options


def jax_fns(impl: str):
    kernel = kernel_for(impl)

    def forward(r, w, k, v, a, b):
        return kernel(r, w, k, v, a, b)

    def loss(r, w, k, v, a, b, dy, ds):
        y, s = forward(r, w, k, v, a, b)
        return jnp.vdot(y, dy) + jnp.vdot(s, ds)

    return jax.jit(forward), jax.jit(jax.grad(loss, argnums=tuple(range(6))))


def jax_case(impl, xs, dtype, repeats, backward=True):
    """(forward ms, forward+backward ms or None when not `backward`, y, final state)."""
    forward, grads = jax_fns(impl)
    args = [xs[n].astype(dtype) for n in "rwkvab"]
    cot = [xs["dy"], xs["ds"]]
    sync = jax.block_until_ready
    fwd_ms = median_ms(lambda: forward(*args), repeats, sync)
    both_ms = median_ms(lambda: grads(*args, *cot), repeats, sync) if backward else None
    y, s = forward(*args)
    return fwd_ms, both_ms, y, s


# ----------------------------------------------------------------------------- fla


def fla_case(xs, dtype, repeats, backward=True):
    import torch
    from fla.ops.rwkv7 import chunk_rwkv7

    # Zero-copy hand-over of the device arrays (DLPack); fla keeps the state as [K, V], the
    # transpose of ours.
    to_torch = lambda x: torch.from_dlpack(x)
    args = [to_torch(xs[n].astype(dtype)) for n in "rwkvab"]
    dy = to_torch(xs["dy"].astype(dtype))
    ds = to_torch(jnp.swapaxes(xs["ds"], -1, -2))

    def forward(inputs):
        r, w, k, v, a, b = inputs
        return chunk_rwkv7(
            r, w, k, v, a, b, scale=1.0, output_final_state=True, lower_bound=DECAY_BOUND
        )

    def both():
        inputs = [x.detach().requires_grad_(True) for x in args]
        y, s = forward(inputs)
        torch.autograd.backward((y, s), (dy, ds))
        return inputs[0].grad

    def sync(_):
        torch.cuda.synchronize()

    with torch.no_grad():
        fwd_ms = median_ms(lambda: forward(args), repeats, sync)
        y, s = forward(args)
    both_ms = median_ms(both, repeats, sync) if backward else None
    to_jax = lambda x: jax.dlpack.from_dlpack(x.float().contiguous())
    return fwd_ms, both_ms, to_jax(y), jnp.swapaxes(to_jax(s), -1, -2)


# ----------------------------------------------------------------------------- stages

# Each chunk-parallel schedule's kernels, in the order a forward+backward runs them.
STAGES = {
    "chunk_parallel": ("fwd terms", "scan", "outputs", "bwd terms", "reverse scan", "gradients"),
    "factored": ("fwd terms", "pass", "bwd terms", "reverse pass", "gradients"),
}


def _stage_calls(cfg, hx, dy, ds):
    """{stage: (jitted fn, args)} of cfg.schedule's kernels, on inputs the earlier stages made."""
    from pallas_kernels.wkv7.experimental import chunk_parallel as cp
    from pallas_kernels.wkv7.experimental import factored as fa
    from pallas_kernels.wkv7.experimental.chunk_grid import gradient_call

    s0 = jnp.zeros_like(ds)
    if cfg.schedule == "factored":
        fns = {
            "fwd terms": jax.jit(lambda x: fa.forward_terms_call(cfg, x)),
            "pass": jax.jit(lambda t, v, s: fa.forward_pass_call(cfg, t, v, s, save_starts=True)),
            "bwd terms": jax.jit(lambda x: fa.backward_terms_call(cfg, x)),
            "reverse pass": jax.jit(lambda t, g, s: fa.reverse_pass_call(cfg, t, g, s)),
            "gradients": jax.jit(lambda x, g, st, en: gradient_call(cfg, x, g, st, en)),
        }
        terms, terms_b = fns["fwd terms"](hx), fns["bwd terms"](hx)
        starts = fns["pass"](terms, hx[3], s0)[2]
        end_cots = fns["reverse pass"](terms_b, dy, ds)[1]
        args = {
            "fwd terms": (hx,),
            "pass": (terms, hx[3], s0),
            "bwd terms": (hx,),
            "reverse pass": (terms_b, dy, ds),
            "gradients": (hx, dy, starts, end_cots),
        }
    else:
        fns = {
            "fwd terms": jax.jit(lambda x: cp.forward_terms_call(cfg, x)),
            "scan": jax.jit(lambda m, d, s: cp.scan_maps(cfg, m, d, s, reverse=False)),
            "outputs": jax.jit(lambda y0, q, starts: cp.output_call(cfg, y0, q, starts)),
            "bwd terms": jax.jit(lambda x, g: cp.backward_terms_call(cfg, x, g)),
            "reverse scan": jax.jit(lambda m, e, s: cp.scan_maps(cfg, m, e, s, reverse=True)),
            "gradients": jax.jit(lambda x, g, st, en: gradient_call(cfg, x, g, st, en)),
        }
        maps, drive, q, y0 = fns["fwd terms"](hx)
        starts = fns["scan"](maps, drive, s0)[1]
        maps_b, e = fns["bwd terms"](hx, dy)
        end_cots = fns["reverse scan"](maps_b, e, ds)[1]
        args = {
            "fwd terms": (hx,),
            "scan": (maps, drive, s0),
            "outputs": (y0, q, starts),
            "bwd terms": (hx, dy),
            "reverse scan": (maps_b, e, ds),
            "gradients": (hx, dy, starts, end_cots),
        }
    return {name: (fns[name], args[name]) for name in STAGES[cfg.schedule]}


def stage_times(impl: str, xs, dtype, repeats) -> dict[str, float]:
    """Milliseconds of each kernel of a chunk-parallel or factored implementation, on its own
    (B = 1).

    Chunk-parallel: forward chunk terms, state scan, outputs; backward chunk terms, reverse
    scan, gradients (a scan with scan_group > 1 includes XLA's composition and expansion of
    the maps). Factored: forward chunk terms, the pass (state and y); backward chunk terms,
    reverse pass, gradients. Their sum is about the forward+backward time less the XLA glue
    (transposes, casts). Uses the modules' pallas_call wrappers directly, so the numbers say
    where the time goes.
    """
    from pallas_kernels.wkv7 import gpu
    from pallas_kernels.wkv7.gpu_options import GpuOptions

    _, seq, heads, n = xs["r"].shape
    cfg = GpuOptions(**impl_options(impl)).resolve(
        n, heads, [(name, dtype) for name in "rwkvab"], seq_len=seq,
        interpret=jax.default_backend() == "cpu",
    )  # fmt: skip
    # As wkv7_gpu lays them out: factored, token-major padded to chunk x segments; else
    # head-major padded to the chunk.
    if cfg.schedule == "factored":
        layout = functools.partial(gpu.pad_tokens, multiple=cfg.chunk * cfg.segments)
    else:
        layout = functools.partial(gpu.head_major, chunk=cfg.chunk)
    hx = tuple(layout(xs[name].astype(dtype)) for name in "rwkvab")
    dy, ds = layout(xs["dy"]), xs["ds"].reshape(heads, n, n)
    calls = _stage_calls(cfg, hx, dy, ds)
    return {name: median_ms(lambda f=fn, a=a: f(*a), repeats) for name, (fn, a) in calls.items()}


# ----------------------------------------------------------------------------- driver


def oracle(xs, dtype):
    """fp32 scan on the inputs rounded to `dtype` (so the error measured is the compute's)."""
    args = [xs[n].astype(dtype).astype(jnp.float32) for n in "rwkvab"]
    return jax.jit(wkv7_reference)(*args)


def gradients(xs, impl: str):
    """The 7 fp32 gradients (inputs and a non-zero initial state, so its gradient is tested)
    of <y, dy> + <final state, ds> through an implementation."""
    kernel = kernel_for(impl)

    def loss(r, w, k, v, a, b, s0):
        y, s = kernel(r, w, k, v, a, b, s0)
        return jnp.vdot(y, xs["dy"]) + jnp.vdot(s, xs["ds"])

    args = [xs[n] for n in "rwkvab"] + [0.1 * xs["ds"]]
    return jax.jit(jax.grad(loss, argnums=tuple(range(7))))(*args)


def accelerator_backend() -> str:
    """The Pallas backend of this accelerator (the GPU kernels, interpreted, on a CPU host)."""
    platform = jax.default_backend()
    return "pallas_tpu" if platform == "tpu" else "pallas_gpu"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seq-lens", default="4096,16384,65536")
    parser.add_argument("--bh", default="8,64", help="B*H values (B = 1)")
    parser.add_argument("--dtypes", default="bfloat16,float32")
    parser.add_argument(
        "--impls",
        default="pallas,xla,fla",
        help="comma-separated; pallas@KEY=VALUE;... passes options to the GPU kernel",
    )
    parser.add_argument(
        "--impls-fp32",
        help="implementations for float32 when it should differ from --impls (e.g. only pallas, "
        "to get the fp32 errors without the full timing grid)",
    )
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", type=Path, help="write results here after every case")
    parser.add_argument("--quick", action="store_true", help="T=1024, B*H=4, 2 repeats")
    parser.add_argument(
        "--skip-gradient-check",
        action="store_true",
        help="leave out the Pallas-vs-XLA gradient check (when another run of the session did it)",
    )
    parser.add_argument(
        "--stages",
        action="store_true",
        help="also time each kernel of every chunk-parallel or factored implementation on its own",
    )
    parser.add_argument(
        "--gradient-check-seq-len",
        type=int,
        help="run the gradient check at this T (B*H the smallest --bh) before the timings, "
        "instead of at the smallest timed size",
    )
    parser.add_argument(
        "--stages-only",
        action="store_true",
        help="--stages without the whole-call timings and errors (when another run did those)",
    )
    parser.add_argument(
        "--forward-only",
        action="store_true",
        help="time and check the forward only (the fwd+bwd column stays empty): error sweeps at "
        "sizes where the backward would take long, e.g. interpret mode at T = 64K",
    )
    parser.add_argument(
        "--allow-cpu",
        action="store_true",
        help="run on CPU too, the GPU kernels in interpret mode (only to check this driver; "
        "no timings to keep)",
    )
    args = parser.parse_args()
    if args.quick:
        args.seq_lens, args.bh, args.repeats = "1024", "4", 2
    args.stages = args.stages or args.stages_only
    if args.gradient_check_seq_len is not None and args.gradient_check_seq_len < 1:
        parser.error(f"--gradient-check-seq-len must be >= 1, got {args.gradient_check_seq_len}")
    # Options inside one implementation are separated by ';' (commas separate implementations).
    impls = [impl.replace(";", ",") for impl in args.impls.split(",")]
    impls_fp32 = [x.replace(";", ",") for x in (args.impls_fp32 or args.impls).split(",")]
    if jax.default_backend() not in ("gpu", "tpu") and not args.allow_cpu:
        sys.exit("bench/wkv7_kernels.py times accelerator kernels; this JAX sees no GPU or TPU")
    if jax.default_backend() == "tpu":  # fla is a CUDA (Triton) library
        impls = [impl for impl in impls if impl != "fla"]
        impls_fp32 = [impl for impl in impls_fp32 if impl != "fla"]
    print(f"# WKV-7: {jax.devices()[0].device_kind}, jax {jax.__version__}")
    results = []
    header = (
        "| T | B*H | dtype | impl | fwd ms | fwd+bwd ms | y err | state err | "
        "xla/pallas fwd | xla/pallas f+b | fla/pallas fwd | fla/pallas f+b |"
    )
    print(header + "\n" + "|---" * 12 + "|")

    def save(rows_so_far: dict) -> None:
        # Each finished implementation is saved at once, so a run cut short by its timeout
        # keeps everything measured before the cut.
        if args.json:
            write_json(args.json, results + list(rows_so_far.values()))

    seq_lens, bhs = [int(x) for x in args.seq_lens.split(",")], [int(x) for x in args.bh.split(",")]
    if not args.skip_gradient_check:  # before any timing, at the smallest size by default
        pallas = dict.fromkeys(i for i in impls + impls_fp32 if i.startswith("pallas"))
        T, bh = args.gradient_check_seq_len or min(seq_lens), min(bhs)
        results.extend(gradient_rows(make_inputs(T + bh, T, bh), T, bh, pallas))
    for T in seq_lens:
        for bh in bhs:
            xs = make_inputs(T + bh, T, bh)
            for dtype in args.dtypes.split(","):
                chosen = impls_fp32 if dtype == "float32" else impls
                if not args.stages_only:
                    rows = run_size(
                        xs, T, bh, dtype, chosen, args.repeats, save, backward=not args.forward_only
                    )
                    for row in rows.values():
                        print(table_row(row, rows), flush=True)
                    results.extend(rows.values())
                for impl in chosen if args.stages else ():
                    if impl_options(impl).get("schedule") in STAGES:
                        results.append(stage_row(impl, xs, T, bh, dtype, args.repeats))
                if args.json:
                    write_json(args.json, results)


def _error_text(error: Exception) -> str:
    return f"{type(error).__name__}: {error}"[:2000]


def gradient_rows(xs, T, bh, impls) -> list[dict]:
    """One row per implementation: the largest relative difference of its 7 gradients from
    the chunked XLA path's; a failing implementation records its error instead."""
    want = gradients(xs, "xla")  # the reference, computed once for every implementation
    rows = []
    for impl in impls:
        row = {"T": T, "bh": bh, "impl": impl}
        try:
            got = gradients(xs, impl)
            diff = max(rel_err(g, w) for g, w in zip(got, want, strict=True))
            row["gradient_rel_diff_vs_xla"] = diff
            text = f"max rel diff {row['gradient_rel_diff_vs_xla']:.2e}"
        except Exception as error:  # a variant that fails must not end the run
            row["gradient_error"] = _error_text(error)
            text = f"failed: {row['gradient_error'][:300]}"
        print(f"gradient check T={T} B*H={bh} fp32: {impl} vs xla {text}", flush=True)
        rows.append(row)
    return rows


def stage_row(impl, xs, T, bh, dtype, repeats) -> dict:
    """The --stages row of one chunk-parallel or factored implementation; a failure records
    its error."""
    row = {"T": T, "bh": bh, "dtype": dtype, "impl": impl}
    try:
        row["stages_ms"] = stage_times(impl, xs, dtype, repeats)
    except Exception as error:  # a variant that fails must not end the run
        row["stages_error"] = _error_text(error)
        text = f"failed: {row['stages_error'][:300]}"
    else:
        cells = " | ".join(f"{name} {ms:.2f}" for name, ms in row["stages_ms"].items())
        text = f"{cells} | sum {sum(row['stages_ms'].values()):.2f}"
    print(f"  stages ms T={T} B*H={bh} {dtype} {impl}: {text}", flush=True)
    return row


def write_json(path: Path, results: list[dict]) -> None:
    """Writes the results whole (temporary file, then rename), so a kill never leaves half."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(results, indent=1))
    tmp.replace(path)


def run_size(xs, T, bh, dtype, impls, repeats, after_each=None, backward=True) -> dict[str, dict]:
    """Times every implementation on one input set; failures become rows with an error.

    after_each(rows) is called with the rows so far after every implementation; backward=False
    leaves out the forward+backward timing (rows without "fwd_bwd_ms").
    """
    y_ref, s_ref = oracle(xs, dtype)
    rows = {}
    for impl in impls:
        row = {"T": T, "bh": bh, "dtype": dtype, "impl": impl}
        # A progress line per implementation, so a stalled one is named in the log.
        print(f"  T={T} B*H={bh} {dtype} {impl}: ...", end="", flush=True)
        clock = Stopwatch()
        try:
            case = fla_case if impl == "fla" else functools.partial(jax_case, impl)
            fwd, both, y, s = case(xs, dtype, repeats, backward)
        except Exception as error:  # one failing case must not lose the others
            row["error"] = _error_text(error)
        else:
            row.update(fwd_ms=fwd, y_err=rel_err(y, y_ref), state_err=rel_err(s, s_ref))
            if both is not None:
                row["fwd_bwd_ms"] = both
        done = f"fwd {row['fwd_ms']:.2f} ms" if "fwd_ms" in row else "failed"
        if "fwd_bwd_ms" in row:
            done += f", fwd+bwd {row['fwd_bwd_ms']:.2f} ms"
        print(f" {done} ({clock.seconds():.1f} s)", flush=True)
        rows[impl] = row
        if after_each:
            after_each(rows)
    return rows


def table_row(row: dict, rows: dict) -> str:
    """One markdown row; a Pallas row also gets the xla / fla timings over its own."""
    head = f"| {row['T']} | {row['bh']} | {row['dtype']} | {row['impl']} |"
    if "error" in row:
        return f"{head} failed: {row['error'][:300]} |"
    ratios = []
    for other in ("xla", "fla"):
        for key in ("fwd_ms", "fwd_bwd_ms"):
            ok = row["impl"].startswith("pallas") and key in row and key in rows.get(other, {})
            ratios.append(f"{rows[other][key] / row[key]:.2f}x" if ok else "")
    both = f"{row['fwd_bwd_ms']:.2f}" if "fwd_bwd_ms" in row else ""
    return (
        f"{head} {row['fwd_ms']:.2f} | {both} | {row['y_err']:.1e} | "
        f"{row['state_err']:.1e} | " + " | ".join(ratios) + " |"
    )


if __name__ == "__main__":
    main()
