"""The one clock of the benchmarks: timed calls, repeated calls, their best and median, a stopwatch.

Every bench script times through these (`tests/test_bench_layout.py` checks that no other bench
file imports `time`). Scripts import this file as `from timing import ...`: a script's folder is
sys.path[0] when it runs, and a script that tests load by path puts its folder there itself.

`sync(result)` waits until a call's work is done before the clock stops: JAX's
`block_until_ready` by default; None for host work that is finished when the call returns (the
tokenizers, the official PyTorch runtime on the CPU).
"""

from __future__ import annotations

import time

import jax
import numpy as np


def timed(fn, *args, sync=jax.block_until_ready):
    """(seconds, result) of one call fn(*args), `sync(result)` included."""
    start = time.perf_counter()
    result = fn(*args)
    if sync is not None:
        sync(result)
    return time.perf_counter() - start, result


def seconds(fn, *args, sync=jax.block_until_ready) -> float:
    """Seconds of one call fn(*args), `sync(result)` included."""
    return timed(fn, *args, sync=sync)[0]


def call_seconds(fn, repeats: int, sync=jax.block_until_ready, warmup: int = 1) -> list[float]:
    """Seconds of each of `repeats` calls of fn(), after `warmup` untimed (compiling) calls."""
    for _ in range(warmup):
        seconds(fn, sync=sync)
    return [seconds(fn, sync=sync) for _ in range(repeats)]


def best_seconds(fn, repeats: int, sync=jax.block_until_ready, warmup: int = 1) -> float:
    """Fewest seconds of `repeats` calls of fn() after `warmup` untimed calls.

    The best, not the mean, where a slow repeat (another job on the cores) must not count.
    """
    return min(call_seconds(fn, repeats, sync, warmup))


def median_ms(fn, repeats: int, sync=jax.block_until_ready) -> float:
    """Median milliseconds of `repeats` calls of fn() after one warm-up (compiling) call."""
    return 1e3 * float(np.median(call_seconds(fn, repeats, sync)))


class Stopwatch:
    """Wall seconds since it was made: for work timed as a whole (a phase, a loop, a run)."""

    def __init__(self):
        self._start = time.perf_counter()

    def seconds(self) -> float:
        return time.perf_counter() - self._start


def rel_err(got, want) -> float:
    """max |got - want| / max |want|, in float64."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.max(np.abs(got - want)) / max(np.max(np.abs(want)), 1e-30))
