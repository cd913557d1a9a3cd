"""Test setup: 8 host CPU devices for sharding tests and a fast-compiling XLA:CPU, set before
JAX is imported anywhere."""

import functools
import os

import pytest

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
# The tests' shapes are tiny: XLA:CPU spends most of each test compiling, much of that in
# LLVM's optimisation of the generated code, which this option sets. Level 0 cut the slowest
# tests' time by 25-35%; the memory-analysis and no-copy tests, which read what XLA's HLO passes
# made, pass at both levels.
if "--xla_backend_optimization_level" not in os.environ["XLA_FLAGS"]:
    os.environ["XLA_FLAGS"] += " --xla_backend_optimization_level=0"
os.environ.setdefault("JAX_PLATFORMS", "cpu")
if os.environ["JAX_PLATFORMS"] == "cpu":
    # Ahead-of-time TPU compiles (-m aot) load libtpu in every xdist worker; by default libtpu
    # takes a machine-wide lock file and a second process aborts. Nothing runs on a TPU here.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
# The official runtimes read these at import time: pure-PyTorch CPU paths, RWKV-7 enabled.
os.environ["RWKV_CUDA_ON"] = "0"
os.environ["RWKV_JIT_ON"] = "0"
os.environ["RWKV_V7_ON"] = "1"


def pytest_xdist_auto_num_workers(config):
    """`-n auto` (the default, pyproject.toml): one worker per usable core, but at most one per
    4 GiB of memory (a worker peaked at 3.9 GiB resident in a full run on 2 cores). One worker
    when the tests are sent to an accelerator (JAX_PLATFORMS other than cpu): each process
    would claim most of its memory."""
    if os.environ["JAX_PLATFORMS"] != "cpu":
        return 1
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    memory_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return max(1, min(cores or 1, int(memory_gib // 4)))


@pytest.fixture
def interpreted_kernels(monkeypatch):
    """Makes every Pallas kernel entry run in interpret mode (which the model never asks for)
    and records the entries called, in order; yields that list."""
    import pallas_kernels.topk_attention.gpu as topk_gpu
    import pallas_kernels.topk_attention.tpu as topk_tpu
    import pallas_kernels.wkv7.gpu as wkv_gpu
    import pallas_kernels.wkv7.tpu as wkv_tpu

    calls = []
    entries = (
        (wkv_gpu, "wkv7_gpu"),
        (wkv_tpu, "wkv7_tpu"),
        (topk_gpu, "topk_chunk_attention_gpu"),
        (topk_tpu, "topk_chunk_attention_tpu"),
    )
    for module, name in entries:
        real = getattr(module, name)

        def wrapper(*args, _real=real, _name=name, **kwargs):
            calls.append(_name)
            return _real(*args, **{**kwargs, "interpret": True})

        monkeypatch.setattr(module, name, functools.wraps(real)(wrapper))
    yield calls


@pytest.fixture
def race_states(monkeypatch):
    """Records the race-detection state of every kernel TPU interpret mode runs.

    jax 0.10 keeps it in the module global `interpret_pallas_call.races`, replaced at the start
    of each kernel: reading that global after a run sees only the last kernel. Recording every
    instance checks all kernels of a jitted program.
    """
    from jax._src.pallas.mosaic.interpret import interpret_pallas_call as ipc
    from jax.experimental.pallas import tpu as pltpu

    made = []

    class Recorded(ipc.RaceDetectionState):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            made.append(self)

    monkeypatch.setattr(ipc, "RaceDetectionState", Recorded)
    yield made
    pltpu.reset_tpu_interpret_mode_state()
