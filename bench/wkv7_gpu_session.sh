#!/usr/bin/env bash
# The GPU WKV-7 measurement of issue 5 as two device calls (each fits one 10-minute call), on
# one warm machine, in this order (call `run` with carry [".whl"] for the fla-core wheel):
#
#   bash bench/wkv7_gpu_session.sh schedules
#       the chunk-parallel variants (chunk 16 / 32 / 64, 4 or 8 warps) against the XLA path,
#       T 16K and 64K, bf16, with the time of each kernel (--stages), and the fp32 errors;
#   BEST='pallas@schedule=chunk_parallel;chunk_size=32' bash bench/wkv7_gpu_session.sh fla
#       the best variant of the first call (BEST, this default if unset) against fla's
#       chunk_rwkv7, bf16, T 4K / 16K / 64K x B*H 8 / 64 (the sequential kernel against fla:
#       docs/BENCHMARKS.md).
#
# fla runs in a process of its own, first in its rows: on a fresh machine its Triton kernels
# autotune on first use, which took over 5.5 minutes on an H100 (2026-11-27); its first case
# absorbs that, and the rest of the run is quick. Should that phase time out all the same, run
# it again at once: the warm machine's Triton cache keeps what was compiled (seen: a second
# process's first fla call took 0.49 s). Logs and JSON land in $OUT.
# Override the sizes with SIZES="--seq-lens ... --bh ... --repeats ...".
set -u
phase=${1:?usage: bash bench/wkv7_gpu_session.sh schedules|fla}
export SKIP_TOPK=1 SKIP_MODEL=1
CP="pallas@schedule=chunk_parallel"
case "$phase" in
  schedules)
    SIZES=${SIZES:---seq-lens 16384,65536 --bh 8,64 --repeats 3}
    VARIANTS="$CP,$CP;chunk_size=32,$CP;chunk_size=64,$CP;num_warps=8,$CP;chunk_size=32;num_warps=8"
    # shellcheck disable=SC2086  # SIZES is a list of arguments
    WKV_NAME=wkv7_schedules WKV_TIMEOUT=${WKV_TIMEOUT:-570} bash bench/accelerator_session.sh \
      $SIZES --dtypes bfloat16,float32 --impls "$VARIANTS,xla" --impls-fp32 "$CP" --stages
    ;;
  fla)
    SIZES=${SIZES:---seq-lens 4096,16384,65536 --bh 8,64 --repeats 3}
    # shellcheck disable=SC2086
    WKV_NAME=wkv7_fla WKV_TIMEOUT=${WKV_TIMEOUT:-570} bash bench/accelerator_session.sh $SIZES \
      --dtypes bfloat16 --impls "fla,${BEST:-$CP;chunk_size=32}" --skip-gradient-check
    ;;
  *)
    echo "unknown phase $phase (expected schedules or fla)" >&2
    exit 2
    ;;
esac
