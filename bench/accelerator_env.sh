# Sourced by the accelerator session scripts (bench/accelerator_session.sh,
# bench/wkv7_gpu_session.sh): $OUT, the carried wheels, the environment, the machine's header.
OUT=${OUT:-/tmp/accelerator_out}
mkdir -p "$OUT"
# Carried wheels in .whl/ (fla-core for the fla baseline) go to /tmp/site once per machine:
# reinstalling under a running fla process (a warm-up left running by an earlier call) would
# pull files from under it.
if [ ! -d /tmp/site/fla ] && compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
    --target /tmp/site .whl/*.whl
fi
export PYTHONPATH="$PWD:/tmp/site${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
# JAX would otherwise take 75% of the GPU up front, leaving fla (PyTorch) too little.
export XLA_PYTHON_CLIENT_PREALLOCATE=false
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null
date -u
