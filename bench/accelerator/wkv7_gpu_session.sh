#!/usr/bin/env bash
# Issue 5's GPU measurement of the parallel WKV-7 schedules (bench/wkv7_kernels.py runs), run from
# the repository root (the device tool's working directory) and planned for one lent H100
# (15 device minutes, start-up included) as at most two calls on one warm machine; call `run`
# with carry [".whl"] (the fla-core wheel; add ".triton_cache" when a saved one exists, below)
# and timeout_s 595:
#
#   bash bench/accelerator/wkv7_gpu_session.sh measure
#       1. the sequential kernel (baseline), the factored schedule (its defaults; with
#          split-bf16 tensor-core exact dots, exact_dot_precision=bf16x3, and full-row
#          gradients; that at chunk 32) and the chunk-parallel one (bf16x3, full-row
#          gradients), bf16, T 16K / 64K x B*H 8 / 64, the fp32 errors and times of the
#          bf16x3 factored variant with 32-row gradient tiles (with fp32 inputs full rows spill
#          9.6 KB offline), and the gradient check of all six (fp32, T = 4096, B*H = 8, against the
#          XLA path);
#       2. the per-kernel times alone (--stages-only) at T = 64K, B*H 64 then 8: the factored
#          bf16x3 variant first, then that without segments (at B*H = 8 the default cuts T
#          into 8 parallel segments), the other parallel variants of step 1, and the factored
#          bf16x3 variant at 4 warps (for its passes' times; its gradient kernel spills there);
#       3. fla's Triton autotuning in a process of its own (setsid, so it outlives the call;
#          the GPU is otherwise idle while it times configurations), then, if it finishes in
#          time, fla against the fastest of step 1's variants (bench/accelerator/wkv7_best.py).
#   bash bench/accelerator/wkv7_gpu_session.sh fla
#       step 3 on its own: waits for the autotuning started by `measure` (or starts it). Run it
#       at once when `measure` ends with the autotuning unfinished (a machine stays warm 30 s).
#   bash bench/accelerator/wkv7_gpu_session.sh wheels
#       on the development machine, before the first call: downloads the fla-core wheel into
#       .whl/ (ignored by git, so a new checkout lacks it; the GPU machine cannot fetch it).
#       `measure` and `fla` stop at once, before any timing, when .whl/ holds no fla-core wheel.
#
# What earlier sessions saw (docs/BENCHMARKS.md): fla's autotuning on a fresh machine took over
# 5.5 minutes; a chunk-parallel variant with chunk 64 had not compiled after ~2 minutes, so it
# is left out. fla caches its tuned configurations in Triton's cache: every call ends by saving
# that cache as $OUT/triton_cache.tgz; unpacked into .triton_cache/ (ignored by git) and carried,
# it is used as TRITON_CACHE_DIR and spares the next machine the autotuning.
#
# Logs and JSON land in $OUT. CALL_LIMIT (seconds, default 580) is the time this call plans to;
# SIZES / STAGE_SIZES override the sizes, BENCH_ARGS adds arguments to every bench/wkv7_kernels.py
# run (a dry run of this script on CPU: SIZES=STAGE_SIZES="--seq-lens 64 --bh 2"
# BENCH_ARGS=--allow-cpu, with the wheel fetched or ALLOW_NO_FLA=1; fla's rows then fail for want
# of CUDA, as they should).
set -u
phase=${1:?usage: bash bench/accelerator/wkv7_gpu_session.sh measure|fla|wheels}
case "$phase" in
  measure | fla | wheels) ;;
  *)
    echo "unknown phase $phase (expected measure, fla or wheels)" >&2
    exit 2
    ;;
esac
CALL_LIMIT=${CALL_LIMIT:-580}
CP="pallas@schedule=chunk_parallel"
FA="pallas@schedule=factored"
SIZES=${SIZES:---seq-lens 16384,65536 --bh 8,64}
STAGE_SIZES=${STAGE_SIZES:---seq-lens 65536 --bh 64,8}
BENCH_ARGS=${BENCH_ARGS:-}
WARM_DONE=/tmp/fla_warm.done
WARM_LOG=/tmp/fla_warm.log
FLA_WHEEL=fla-core==0.6.0  # the version the 2026-11-27 H100 runs used

if [ "$phase" = wheels ]; then
  python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux2014_x86_64 -d .whl "$FLA_WHEEL" || exit
  ls -l .whl
  exit 0
fi
. bench/accelerator/accelerator_env.sh
require_fla_wheel
export TRITON_CACHE_DIR=/tmp/triton_cache
if [ -d .triton_cache ] && [ ! -d $TRITON_CACHE_DIR ]; then cp -r .triton_cache $TRITON_CACHE_DIR; fi

left() { echo $((CALL_LIMIT - SECONDS)); }

bench() {  # bench NAME TIMEOUT ARGS...: bench/wkv7_kernels.py, log and JSON in $OUT
  local name=$1 limit=$2
  shift 2
  echo "== $name (limit ${limit} s, $(date -u +%T))"
  if [ "$limit" -lt 20 ]; then
    echo "== $name skipped: ${limit} s left"
    return
  fi
  set -o pipefail
  # shellcheck disable=SC2086  # BENCH_ARGS is a list of arguments
  timeout "$limit" python3 bench/wkv7_kernels.py --json "$OUT/$name.json" "$@" $BENCH_ARGS 2>&1 \
    | tee "$OUT/$name.log"
  echo "== $name exit $? after $SECONDS s"
}

save_triton_cache() {  # the tuned fla configurations, for carrying to the next machine
  [ -d $TRITON_CACHE_DIR ] || return
  local archive=$OUT/triton_cache.tgz
  tar czf "$archive" -C $TRITON_CACHE_DIR .
  # A file over 16 MB does not come back: then only the autotuning results (the next machine
  # compiles the chosen configurations, not all of them).
  if [ "$(stat -c %s "$archive")" -gt 15000000 ]; then
    (cd $TRITON_CACHE_DIR && find . -name '*autotune*' -print0 | tar czf "$archive" --null -T -)
  fi
  ls -l "$archive"
}

start_fla_warmup() {
  if [ -e $WARM_DONE ] || pgrep -f "fla_warmup_marker" >/dev/null; then return; fi
  echo "== fla warm-up started ($(date -u +%T))"
  # setsid: the device tool ends a call's processes except those in a session of their own.
  setsid bash -c "python3 bench/wkv7_kernels.py --seq-lens 16384 --bh 8 --dtypes bfloat16 \
    --impls fla --repeats 1 --skip-gradient-check --json /tmp/fla_warm.json $BENCH_ARGS \
    > $WARM_LOG 2>&1; \
    touch $WARM_DONE # fla_warmup_marker" </dev/null >/dev/null 2>&1 &
}

wait_fla_warmup() {  # wait_fla_warmup SECONDS_TO_LEAVE: true once the autotuning has finished
  local leave=$1
  start_fla_warmup
  while [ ! -e $WARM_DONE ] && [ "$(left)" -gt "$leave" ]; do sleep 5; done
  cp $WARM_LOG "$OUT/fla_warmup.log" 2>/dev/null
  if [ -e $WARM_DONE ]; then
    echo "== fla warm-up finished after $SECONDS s of this call"
    return 0
  fi
  echo "== fla warm-up still running at $SECONDS s:" \
    "run 'bash bench/accelerator/wkv7_gpu_session.sh fla' now"
  return 1
}

compare_with_fla() {
  local best
  best=$(python3 bench/accelerator/wkv7_best.py /tmp/wkv7_schedules.json --prefix pallas) \
    || best="$FA"
  echo "== fastest variant: $best"
  # fla first in each size, before JAX's memory pool grows at that size.
  # shellcheck disable=SC2086  # SIZES is a list of arguments
  bench wkv7_fla $(($(left) - 5)) $SIZES --dtypes bfloat16 --impls "fla,$best" --repeats 3 \
    --skip-gradient-check
}

case "$phase" in
  measure)
    # Five variants fill ~300 s (each compiles per size; chunk 32 took ~20 s a size).
    # The factored schedule is fla's structure with this project's maths and dot plan: the
    # chunk terms in parallel, stored as [C, N] factors, then an in-order pass per (B*H, value
    # tile) with two dependent [C, N]-sized dots per chunk on the state's path; against the
    # chunk-parallel schedule it drops the N x N maps (~2 KB per token and head at chunk 16,
    # written and read) and the outputs kernel. Offline (bench/triton_spills.py, sm_90) none
    # of its passes spills, and with bf16x3 a pass step is 22 HMMA, 4 FFMA and 62 shared loads
    # per thread. Split-bf16 exact dots move the state path and the chunk inverse from the FMA
    # units (bound by shared-memory reads there) to tensor cores; with them the full-row
    # gradient kernel does not spill at chunk 16 (11.5 KB with IEEE dots), and full rows skip
    # the per-tile partial sums of the key-side gradients. At chunk 32, which halves the
    # passes' steps and the stored start states, only the gradient kernel spills (196 B).
    # At B*H = 8 the passes run only 32 programs (16-row value tiles), so the factored default
    # cuts the sequence into 8 segments walked in parallel (a carry pass finds each segment's
    # map, XLA chains them): two walks of T / 8 chunks instead of one of T.
    split="exact_dot_precision=bf16x3"
    fa_split="$FA;$split;gradient_value_tile=64"
    cp_split="$CP;$split;gradient_value_tile=64"
    variants="$FA,$fa_split,$fa_split;chunk_size=32,$cp_split"
    # shellcheck disable=SC2086
    bench wkv7_schedules 340 $SIZES --dtypes bfloat16,float32 \
      --impls "pallas,$variants" --impls-fp32 "$FA;$split" \
      --repeats 3 --gradient-check-seq-len 4096
    cp "$OUT/wkv7_schedules.json" /tmp/wkv7_schedules.json  # for a second call's `fla` phase
    stage_variants="$fa_split,$fa_split;segments=1,$FA,$fa_split;chunk_size=32,$cp_split"
    # shellcheck disable=SC2086
    bench wkv7_stages 120 $STAGE_SIZES --dtypes bfloat16 --repeats 3 --skip-gradient-check \
      --impls "$stage_variants,$fa_split;num_warps=4" --stages-only
    # The comparison needs ~100 s; with less left, the `fla` call does it.
    if wait_fla_warmup 100; then compare_with_fla; fi
    ;;
  fla)
    if wait_fla_warmup 100; then compare_with_fla; fi
    ;;
esac
save_triton_cache
date -u
