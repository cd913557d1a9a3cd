"""Registers, spills and instruction mix of the WKV-7 GPU kernels, compiled for an H100 on a host
without a GPU.

  pip install triton==3.6.0   # not a project dependency: ~190 MB, only this tool needs it
  python bench/triton_spills.py [--impls pallas,pallas@schedule=chunk_parallel;num_warps=8]
                                [--seq-len 4096] [--bh 8] [--dtype bfloat16] [--arch 90]
                                [--json FILE]

Each implementation (bench/wkv7_kernels.py's syntax: "pallas@KEY=VALUE;...", ';' between options)
is cross-lowered for CUDA as JAX would run it, forward and gradient; every Pallas kernel's Triton
IR is taken from the lowering, with the num_warps / num_stages of its custom call, compiled for
sm_90 by the `triton` package (for --arch: 90 an H100 / H200, 80 an A100, 89 an L4 / RTX 4090) and
passed through its bundled `ptxas -v`. The table gives each
kernel's registers per thread, spill stores / loads and stack frame in bytes, shared memory
(marked "over" past what one program may take on that GPU: it would not launch there), and the
compile time. A kernel at the 255-register ceiling with spills moves its overflow
through local memory on every use: on the 2026-11-27 H100 run, the chunk-parallel gradient
kernel with full value rows spilled 11 KB here and its backward took 9x its forward.

The last four columns count SASS instructions per thread in the kernel's code (`cuobjdump
-sass`; Triton unrolls the dots, so a loop body is counted once): FFMA (fp32 dots on the FMA
units), tensor-core dots (HMMA, and HGMMA, Hopper's warpgroup form, which Triton picks for
some larger dots), shared-memory loads (LDS and LDSM, with which every dot reads its operands)
and barriers. The FMA dot path reads each operand from shared memory once per
product row or column: in the chunk-parallel scan step, 256 FFMA came with 99 shared loads
(~1 KB) per thread, which makes shared-memory bandwidth, not FMA throughput, its likely bound.

The pip `triton` is not the Triton inside XLA's GPU compiler that runs these kernels on a GPU,
so the numbers are indicative: they rank settings, they do not time anything.
"""

from __future__ import annotations

import argparse
import functools
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from jax._src.pallas.triton import lowering as triton_lowering  # noqa: E402
from timing import timed  # noqa: E402

from pallas_kernels.wkv7.gpu import wkv7_gpu  # noqa: E402
from pallas_kernels.wkv7.gpu_options import GpuOptions  # noqa: E402

N = 64
# The attributes after the IR in each Triton custom call's backend config (sorted by name).
# Shared memory one program may opt in to, bytes (CUDA programming guide, per compute capability).
SHARED_LIMIT = {80: 166912, 86: 101376, 89: 101376, 90: 232448}
_LAUNCH = re.compile(r'name = "(\w+)", num_stages = (\d+) : i32, num_warps = (\d+) : i32')


def kernel_sources(options: dict, seq_len: int, bh: int, dtype) -> dict[str, dict]:
    """{kernel name: {"ttir": text, "num_warps": w, "num_stages": s}} for the forward and the
    gradient of `wkv7_gpu` with `GpuOptions(**options)`, cross-lowered for CUDA (no GPU
    needed)."""
    captured = []
    original = triton_lowering.lower_jaxpr_to_triton_module

    def capture(*args, **kwargs):
        result = original(*args, **kwargs)
        captured.append(result.module.operation.get_asm(enable_debug_info=False))
        return result

    token = jax.ShapeDtypeStruct((1, seq_len, bh, N), dtype)
    kernel = functools.partial(wkv7_gpu, options=GpuOptions(**options))

    def loss(*xs):
        y, s = kernel(*xs)
        return jnp.sum(y) + jnp.sum(s)

    triton_lowering.lower_jaxpr_to_triton_module = capture
    try:
        texts = [
            jax.jit(fn).trace(*(token,) * 6).lower(lowering_platforms=("cuda",)).as_text()
            for fn in (kernel, jax.grad(loss, argnums=tuple(range(6))))
        ]
    finally:
        triton_lowering.lower_jaxpr_to_triton_module = original
    launches = {name: (int(s), int(w)) for text in texts for name, s, w in _LAUNCH.findall(text)}
    sources = {}
    for ttir in captured:
        name = re.search(r"tt\.func public @(\w+)", ttir).group(1)
        stages, warps = launches[name]
        sources[name] = {"ttir": ttir, "num_warps": warps, "num_stages": stages}
    return sources


# SASS opcode (the mnemonic before the first '.') -> instruction mix column.
MIX = {
    "FFMA": "ffma",
    "HMMA": "tensor_core",
    "HGMMA": "tensor_core",
    "LDS": "shared_loads",
    "LDSM": "shared_loads",
    "BAR": "bars",
}
_SASS_OPCODE = re.compile(r"^\s*/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_]*)", re.M)


def instruction_mix(sass: str) -> dict[str, int]:
    """{column: count} of MIX's opcodes in `cuobjdump -sass` text (predicated ones included)."""
    mix = dict.fromkeys(MIX.values(), 0)
    for opcode in _SASS_OPCODE.findall(sass):
        if opcode in MIX:
            mix[MIX[opcode]] += 1
    return mix


def compile_report(name: str, source: dict, workdir: Path, arch: int = 90) -> dict:
    """Compiles one kernel's Triton IR for sm_{arch}; reads ptxas -v's resource report and the
    cubin's instruction mix."""
    import triton
    from triton.backends.compiler import GPUTarget

    path = workdir / f"{name}.ttir"
    path.write_text(source["ttir"])
    options = {"num_warps": source["num_warps"], "num_stages": source["num_stages"]}
    seconds, compiled = timed(
        lambda: triton.compile(str(path), target=GPUTarget("cuda", arch, 32), options=options),
        sync=None,
    )
    ptx = workdir / f"{name}.ptx"
    ptx.write_text(compiled.asm["ptx"])
    tools = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    ptxas_arch = f"sm_{arch}a" if arch == 90 else f"sm_{arch}"  # 90a: Hopper's wgmma
    report = subprocess.run(
        [str(tools / "ptxas"), f"-arch={ptxas_arch}", "-v", str(ptx), "-o", os.devnull],
        capture_output=True, text=True, check=True,
    ).stderr  # fmt: skip
    cubin = workdir / f"{name}.cubin"
    cubin.write_bytes(compiled.asm["cubin"])
    sass = subprocess.run(
        [str(tools / "cuobjdump"), "-sass", str(cubin)], capture_output=True, text=True, check=True
    ).stdout
    number = lambda pattern: int(re.search(pattern, report).group(1))
    return {
        "kernel": name,
        **options,
        "registers": number(r"Used (\d+) registers"),
        "spill_stores": number(r"(\d+) bytes spill stores"),
        "spill_loads": number(r"(\d+) bytes spill loads"),
        "stack": number(r"(\d+) bytes stack frame"),
        "shared": compiled.metadata.shared,
        "shared_over_limit": compiled.metadata.shared > SHARED_LIMIT[arch],
        "compile_s": seconds,
        **instruction_mix(sass),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--impls", default="pallas,pallas@schedule=chunk_parallel")
    parser.add_argument("--seq-len", type=int, default=4096)
    parser.add_argument("--bh", type=int, default=8, help="B*H (B = 1); sets the auto value tile")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--arch", type=int, default=90, choices=sorted(SHARED_LIMIT),
                        help="compute capability x 10 to compile for")  # fmt: skip
    parser.add_argument("--json", type=Path, help="write the rows here (whole, via a rename)")
    args = parser.parse_args()
    try:
        import triton  # noqa: F401
    except ImportError:
        sys.exit("bench/triton_spills.py needs the triton package: pip install triton==3.6.0")
    # bench/wkv7_kernels.py's implementation syntax and JSON writer (this script's folder is on
    # sys.path).
    from wkv7_kernels import impl_options, write_json

    rows = []
    columns = (
        "impl | kernel | warps | stages | registers | spill st / ld B | stack B | shared | s | "
        "FFMA | HMMA + HGMMA | shared loads | barriers"
    )
    print(f"| {columns} |")
    print("|---" * 13 + "|")
    with tempfile.TemporaryDirectory() as tmp:
        # A fresh Triton cache, so the compile times are real ones.
        os.environ["TRITON_CACHE_DIR"] = os.path.join(tmp, "cache")
        for impl in args.impls.split(","):
            options = impl_options(impl.replace(";", ","))
            sources = kernel_sources(options, args.seq_len, args.bh, jnp.dtype(args.dtype))
            for name, source in sources.items():
                row = {"impl": impl, **compile_report(name, source, Path(tmp), args.arch)}
                rows.append(row)
                print(
                    f"| {impl} | {name} | {row['num_warps']} | {row['num_stages']} | "
                    f"{row['registers']} | {row['spill_stores']} / {row['spill_loads']} | "
                    f"{row['stack']} | {row['shared']}{' over' * row['shared_over_limit']} | "
                    f"{row['compile_s']:.1f} | "
                    f"{row['ffma']} | {row['tensor_core']} | {row['shared_loads']} | "
                    f"{row['bars']} |",
                    flush=True,
                )
    if args.json:
        write_json(args.json, rows)


if __name__ == "__main__":
    main()
