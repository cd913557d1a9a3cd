#!/usr/bin/env bash
# The GPU WKV-7 measurement of issue 5 as two device calls (each fits one 10-minute call):
#
#   bash bench/wkv7_gpu_session.sh fla        # the chunk-parallel variants vs fla, bf16 (the
#                                             # sequential kernel vs fla: docs/BENCHMARKS.md)
#   bash bench/wkv7_gpu_session.sh schedules  # the same variants vs the XLA path, with the
#                                             # time of each kernel (--stages), and fp32 errors
#
# Run them on one warm machine, in this order (call `run` with carry [".whl"] for fla-core).
# fla goes first and in a process of its own: on a fresh machine its Triton kernels autotune on
# first use, which took over 5.5 minutes on an H100 (2026-11-27, docs/BENCHMARKS.md); its first
# case absorbs that, and the rest of the run is quick. Should the phase time out all the same,
# run it again at once: the warm machine's Triton cache keeps what was compiled (seen: a second
# process's first fla call took 0.49 s). Logs and JSON land in $OUT.
# Override the sizes with SIZES="--seq-lens ... --bh ... --repeats ...".
set -u
phase=${1:?usage: bash bench/wkv7_gpu_session.sh fla|schedules}
export SKIP_TOPK=1 SKIP_MODEL=1
SIZES=${SIZES:---seq-lens 4096,16384,65536 --bh 8,64 --repeats 3}
CP="pallas@schedule=chunk_parallel"
VARIANTS="$CP,$CP;chunk_size=32,$CP;chunk_size=64"
case "$phase" in
  fla)
    # shellcheck disable=SC2086  # SIZES is a list of arguments
    WKV_NAME=wkv7_fla WKV_TIMEOUT=${WKV_TIMEOUT:-570} bash bench/accelerator_session.sh $SIZES \
      --dtypes bfloat16 --impls "fla,$VARIANTS" --skip-gradient-check
    ;;
  schedules)
    # shellcheck disable=SC2086
    WKV_NAME=wkv7_schedules WKV_TIMEOUT=${WKV_TIMEOUT:-570} bash bench/accelerator_session.sh \
      $SIZES --dtypes bfloat16,float32 --impls "$VARIANTS,xla" --impls-fp32 "$CP" --stages
    ;;
  *)
    echo "unknown phase $phase (expected fla or schedules)" >&2
    exit 2
    ;;
esac
