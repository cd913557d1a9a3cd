#!/usr/bin/env bash
# One prepared accelerator session (what the device tool runs, from the repository root): the
# kernel benchmarks bench/wkv7_kernels.py, bench/model_accelerator.py and bench/topk_kernels.py,
# logs and JSON under $OUT. Usage: bash bench/accelerator/accelerator_session.sh [wkv7 args...]
#   WKV_TIMEOUT / TOPK_TIMEOUT / MODEL_TIMEOUT (seconds) bound each part; SKIP_WKV / SKIP_TOPK /
#   SKIP_MODEL=1 skip one; WKV_NAME names the WKV part's log and JSON (default wkv7), so two
#   WKV runs in one session (e.g. fla, whose first call autotunes, in a run of its own) keep both.
# Carried wheels in .whl/ (fla-core for the fla baseline) are installed first
# (bench/accelerator/accelerator_env.sh).
set -u
. bench/accelerator/accelerator_env.sh
# bench/wkv7_kernels.py times fla by default and whenever --impls names it.
if [ "${SKIP_WKV:-0}" != 1 ] && { [[ "$*" != *--impls* ]] || [[ "$*" == *fla* ]]; }; then
  require_fla_wheel
fi
python3 -c "import jax; print('jax', jax.__version__, jax.devices())"
if [ "${SKIP_WKV:-0}" != 1 ]; then
  timeout "${WKV_TIMEOUT:-300}" python3 bench/wkv7_kernels.py \
    --json "$OUT/${WKV_NAME:-wkv7}.json" "$@" 2>&1 | tee "$OUT/${WKV_NAME:-wkv7}.log"
fi
if [ "${SKIP_MODEL:-0}" != 1 ]; then
  timeout "${MODEL_TIMEOUT:-180}" python3 bench/model_accelerator.py 2>&1 | tee "$OUT/model.log"
fi
if [ "${SKIP_TOPK:-0}" != 1 ]; then
  timeout "${TOPK_TIMEOUT:-240}" python3 bench/topk_kernels.py --json "$OUT/topk.json" 2>&1 \
    | tee "$OUT/topk.log"
fi
date -u
