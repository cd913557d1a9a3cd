"""bench/wkv7_kernels.py's driver, run on the CPU (GPU kernels in interpret mode): every
implementation named gets its rows, gradient check and oracle errors (and with --stages the
chunk-parallel kernels' own times), and a failing one becomes an error row instead of ending the
run. The timings of such a run mean nothing and are not checked."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STAGE_NAMES = ["fwd terms", "scan", "outputs", "bwd terms", "reverse scan", "gradients"]
FACTORED_STAGE_NAMES = ["fwd terms", "pass", "bwd terms", "reverse pass", "gradients"]


def _run_wkv7_bench(out, *args):
    """bench/wkv7_kernels.py on the CPU at T = 32, B*H = 2, one repeat, JSON to `out`; its results.

    A subprocess, as the documented commands run it."""
    command = [
        sys.executable, str(ROOT / "bench" / "wkv7_kernels.py"), "--allow-cpu", "--seq-lens", "32",
        "--bh", "2", "--repeats", "1", "--json", str(out), *args,
    ]  # fmt: skip
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    run = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    return run, json.loads(out.read_text())


def test_wkv7_bench_driver(tmp_path):
    out = tmp_path / "wkv7.json"
    impls = "pallas,pallas@schedule=chunk_parallel;chunk_size=32,xla,fla"
    # chunk_size=24 is invalid: it must fail in every part and leave the rest of the run alone.
    bad = "pallas@schedule=chunk_parallel,chunk_size=24"
    impls_fp32 = bad.replace(",", ";")
    run, results = _run_wkv7_bench(out, "--impls", impls, "--impls-fp32", impls_fp32, "--stages")
    checks = {
        r["impl"]: r["gradient_rel_diff_vs_xla"] for r in results if "gradient_rel_diff_vs_xla" in r
    }
    # Every valid Pallas implementation of either list, once; the XLA path is the reference.
    assert set(checks) == {"pallas", "pallas@schedule=chunk_parallel,chunk_size=32"}
    assert all(diff < 1e-5 for diff in checks.values()), checks
    failed = [r for r in results if "gradient_error" in r]
    assert [r["impl"] for r in failed] == [bad] and "chunk_size" in failed[0]["gradient_error"]
    rows = {(r["dtype"], r["impl"]): r for r in results if "fwd_ms" in r or "error" in r}
    assert set(rows) == {
        ("bfloat16", "pallas"),
        ("bfloat16", "pallas@schedule=chunk_parallel,chunk_size=32"),
        ("bfloat16", "xla"),
        ("bfloat16", "fla"),
        ("float32", bad),
    }
    # fla needs CUDA and the fla-core package: an error row, and the run went on.
    assert "error" in rows[("bfloat16", "fla")]
    assert "chunk_size" in rows[("float32", bad)]["error"]
    for (dtype, impl), row in rows.items():
        if impl in ("fla", bad):
            continue
        assert row["fwd_ms"] > 0 and row["fwd_bwd_ms"] > 0, impl
        # bf16 dots in the Pallas kernels: ~3e-3; the XLA path computes in fp32.
        tol = 1e-2 if impl.startswith("pallas") else 1e-5
        assert row["y_err"] < tol and row["state_err"] < tol, (dtype, impl, row)
    assert "| 32 | 2 | bfloat16 | pallas@schedule=chunk_parallel,chunk_size=32 |" in run.stdout
    # --stages: each kernel of the chunk-parallel implementations timed on its own.
    stages = {(r["dtype"], r["impl"]): r["stages_ms"] for r in results if "stages_ms" in r}
    assert set(stages) == {("bfloat16", "pallas@schedule=chunk_parallel,chunk_size=32")}
    stage_errors = [r for r in results if "stages_error" in r]
    assert [(r["dtype"], r["impl"]) for r in stage_errors] == [("float32", bad)]
    for times in stages.values():
        assert list(times) == STAGE_NAMES and min(times.values()) > 0


def test_wkv7_bench_stages_only(tmp_path):
    """--stages-only: per-kernel rows of the factored implementation (the driver test above
    has the chunk-parallel ones) and no whole-call timings or errors; the gradient check at
    --gradient-check-seq-len."""
    fa = "pallas@schedule=factored;exact_dot_precision=bf16x3;gradient_value_tile=16"
    _, results = _run_wkv7_bench(
        tmp_path / "stages.json", "--dtypes", "bfloat16", "--impls", f"pallas,{fa}",
        "--gradient-check-seq-len", "16", "--stages-only",
    )  # fmt: skip
    fa = fa.replace(";", ",")
    # --gradient-check-seq-len: the check at a size of its own (T = 16), once, before the rest.
    checks = [(r["T"], r["impl"]) for r in results if "gradient_rel_diff_vs_xla" in r]
    assert checks == [(16, "pallas"), (16, fa)], results
    assert all(r["gradient_rel_diff_vs_xla"] < 1e-4 for r in results[:2]), results[:2]
    assert [(r["impl"], list(r["stages_ms"])) for r in results[2:]] == [(fa, FACTORED_STAGE_NAMES)]


def test_wkv7_bench_forward_only(tmp_path):
    """--forward-only: every row has its forward time and oracle errors and no forward+backward
    time, and the table leaves that column (and its ratios) empty."""
    run, results = _run_wkv7_bench(
        tmp_path / "fwd.json", "--dtypes", "bfloat16", "--impls", "pallas,xla",
        "--skip-gradient-check", "--forward-only",
    )  # fmt: skip
    assert [r["impl"] for r in results] == ["pallas", "xla"], results
    for row in results:
        assert row["fwd_ms"] > 0 and "fwd_bwd_ms" not in row, row
        tol = 1e-2 if row["impl"] == "pallas" else 1e-5  # bf16 dots in the Pallas kernel
        assert row["y_err"] < tol and row["state_err"] < tol, row
    pallas_line = next(
        x for x in run.stdout.splitlines() if x.startswith("| 32 | 2 | bfloat16 | pallas |")
    )
    cells = [c.strip() for c in pallas_line.strip("|").split("|")]
    assert cells[5] == "" and cells[8].endswith("x") and cells[9] == "", cells


def _best(tmp_path, rows, *args):
    path = tmp_path / "results.json"
    path.write_text(json.dumps(rows))
    script = ROOT / "bench" / "accelerator" / "wkv7_best.py"
    command = [sys.executable, str(script), str(path), *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=60)


def test_wkv7_best_picks_the_least_geometric_mean_over_shared_sizes(tmp_path):
    cp = "pallas@schedule=chunk_parallel"
    row = lambda impl, T, ms, dtype="bfloat16": {
        "T": T, "bh": 8, "dtype": dtype, "impl": impl, "fwd_bwd_ms": ms,
    }  # fmt: skip
    rows = [
        # A (chunk 32): 10 and 40 ms, geometric mean 20; B (chunk 16): 5 and 100, 22.4. So A,
        # though B has the smallest single time.
        row(f"{cp},chunk_size=32", 1, 10.0),
        row(f"{cp},chunk_size=32", 2, 40.0),
        row(cp, 1, 5.0),
        row(cp, 2, 100.0),
        row("pallas", 1, 1.0),  # not chunk-parallel: never picked
        row(f"{cp},num_warps=8", 1, 2.0, dtype="float32"),  # another dtype: ignored
    ]
    run = _best(tmp_path, rows)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == f"{cp};chunk_size=32"  # options joined as --impls takes them
    # A failed size (no time) leaves only the sizes every candidate finished: T = 1, B wins.
    rows[1] = {k: v for k, v in rows[1].items() if k != "fwd_bwd_ms"} | {"error": "boom"}
    assert _best(tmp_path, rows).stdout.strip() == cp
    # Nothing qualifies: a non-zero exit naming why.
    run = _best(tmp_path, rows, "--dtype", "float16")
    assert run.returncode != 0 and "no finished float16 rows" in run.stderr


def _triton_spills():
    import importlib.util

    spec = importlib.util.spec_from_file_location("triton_spills", ROOT / "bench/triton_spills.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    return tool


def test_triton_spills_counts_the_instruction_mix():
    """Opcodes are read from cuobjdump's SASS lines, predicated ones included; operands,
    directives and encodings are not counted."""
    sass = """
        .headerflags    @"EF_CUDA_SM90 EF_CUDA_VIRTUAL_SM(EF_CUDA_SM90)"
        /*0070*/                   FFMA R4, R5, R6, R4 ;          /* 0x0000000605047223 */
        /*0080*/              @!P3 LDS.64 R8, [R54+0x400] ;       /* 0x000400083600b984 */
        /*0090*/                   LDSM.16.M88.4 R12, [R3] ;       /* 0x000000000c0c783b */
        /*00a0*/                   HMMA.16816.F32.BF16 R16, R12, R8, R16 ;
        /*00a8*/                   HGMMA.64x64x16.F32.BF16 R24, gdesc[UR4], R24 ;
        /*00b0*/               @P0 BAR.SYNC.DEFER_BLOCKING 0x0 ;
        /*00c0*/                   FFMA.FTZ R4, R5, R6, R4 ;
        /*00d0*/                   STS [R54], R85 ;  // FFMA in a comment
    """
    mix = _triton_spills().instruction_mix(sass)
    assert mix == {"ffma": 2, "tensor_core": 2, "shared_loads": 2, "bars": 1}


def test_triton_spills_takes_each_kernel_with_its_launch_settings():
    """bench/triton_spills.py's capture (no triton package needed for it): every Pallas kernel
    of the forward and the gradient, with the num_warps / num_stages of its custom call."""
    tool = _triton_spills()
    import jax.numpy as jnp

    options = {"schedule": "chunk_parallel", "num_warps": 8}
    sources = tool.kernel_sources(options, 256, 2, jnp.bfloat16)
    stages = {name: (s["num_warps"], s["num_stages"]) for name, s in sources.items()}
    assert stages == {
        "wkv7_gpu_forward_terms": (8, 1),
        "wkv7_gpu_scan": (8, 2),  # the scans pipeline their loads
        "wkv7_gpu_outputs": (8, 1),
        "wkv7_gpu_backward_terms": (8, 1),
        "wkv7_gpu_reverse_scan": (8, 2),
        "wkv7_gpu_gradients": (8, 1),
    }
    assert all(s["ttir"].startswith("module @" + name) for name, s in sources.items())
    sequential = tool.kernel_sources({}, 256, 2, jnp.bfloat16)
    assert {name: s["num_warps"] for name, s in sequential.items()} == {
        "wkv7_gpu_forward": 4,
        "wkv7_gpu_backward": 4,
    }
