# bench/accelerator/: what drives a session on a lent accelerator, run from the repository root
# (the device tool's working directory). This file is sourced by the session scripts beside it
# (accelerator_session.sh, wkv7_gpu_session.sh): $OUT, the carried wheels, the environment, the
# machine's header.
OUT=${OUT:-/tmp/accelerator_out}
mkdir -p "$OUT"
# Carried wheels in .whl/ (fla-core for the fla baseline) go to /tmp/site once per machine:
# reinstalling under a running fla process (a warm-up left running by an earlier call) would
# pull files from under it.
if [ ! -d /tmp/site/fla ] && compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
    --target /tmp/site .whl/*.whl
fi
# require_fla_wheel: stop (exit 2), before any timing, when .whl/ holds no fla-core wheel: fla is
# the baseline of issue 5's target, and the GPU machine cannot fetch it. ALLOW_NO_FLA=1 goes on.
require_fla_wheel() {
  if compgen -G ".whl/fla_core-*.whl" >/dev/null || [ "${ALLOW_NO_FLA:-0}" = 1 ]; then return; fi
  echo "no fla-core wheel in .whl/: run 'bash bench/accelerator/wkv7_gpu_session.sh wheels'" \
    "here first and carry .whl (ALLOW_NO_FLA=1 runs without fla)" >&2
  exit 2
}
export PYTHONPATH="$PWD:/tmp/site${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
# JAX would otherwise take 75% of the GPU up front, leaving fla (PyTorch) too little.
export XLA_PYTHON_CLIENT_PREALLOCATE=false
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null
date -u
