"""Timing and error helpers shared by the accelerator benchmarks."""

from __future__ import annotations

import time

import jax
import numpy as np


def median_ms(fn, repeats: int, sync=jax.block_until_ready) -> float:
    """Median milliseconds of `repeats` calls of fn() after one warm-up (compiling) call.

    `sync(result)` must wait for the device (JAX's block_until_ready by default).
    """
    sync(fn())
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        sync(fn())
        times.append(time.perf_counter() - start)
    return 1e3 * float(np.median(times))


def rel_err(got, want) -> float:
    """max |got - want| / max |want|, in float64."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.max(np.abs(got - want)) / max(np.max(np.abs(want)), 1e-30))
