"""Experimental WKV-7 GPU schedules: correct and tested, not yet measured against the default.

- `chunk_parallel`: the chunk maths in parallel over chunks, then an N x N affine map of the
  state per chunk scanned in order (`scan_group` composes several chunks' maps per step).
- `factored`: the chunk maths in parallel, stored as each chunk's rank-C [C, N] factors, then
  one pass in order that applies them to the state (`segments` walks parts of the sequence in
  parallel); fla's kernel structure with this project's maths and dot precision plan.
- `chunk_grid`: what both share (the per-chunk kernel grid, the gradient kernel).

Why experimental: the chunk-parallel schedule was timed once on an H100 (faster than the
sequential one at B*H = 8, slower at B*H = 64; docs/BENCHMARKS.md), and neither its current
defaults nor the factored schedule have run on a GPU. They stay here, runnable and tested
against the oracle on the CPU in interpret mode, until
`bench/accelerator/wkv7_gpu_session.sh` measures them against the sequential schedule and fla;
then one earns the default or they go.

Select one through the GPU kernel's options, as any other setting:
    pallas_kernels.wkv7.gpu.wkv7_gpu(r, w, k, v, a, b, state,
                                     options=GpuOptions(schedule="factored"))
(`pallas_kernels.wkv7.gpu_options.GpuOptions`; or "pallas@schedule=chunk_parallel" in
bench/wkv7_kernels.py's --impls). The default schedule, "sequential", and the chunk maths every
schedule shares (`gpu_chunk`) live in `pallas_kernels.wkv7`.
"""
