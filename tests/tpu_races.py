"""TPU interpret mode's race detector, shared by the TPU kernel tests: two simulated cores,
NaN for uninitialised memory, and a planted race (the `race_states` fixture is in conftest)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu


def race_params() -> pltpu.InterpretParams:
    """Two cores split the "parallel" axes as on a v4 / v5p megacore chip; uninitialised memory
    is NaN, so reading any unwritten block poisons the result."""
    return pltpu.InterpretParams(
        detect_races=True, uninitialized_memory="nan", num_cores_or_threads=2, random_seed=0
    )


def run_planted_race() -> None:
    """A kernel whose grid steps, split over two cores, all write one output block: a race."""

    def copy(x_ref, o_ref):
        o_ref[...] = x_ref[...]

    racy = pl.pallas_call(
        copy,
        grid=(4,),
        in_specs=[pl.BlockSpec((8, 128), lambda i: (i, 0))],
        out_specs=pl.BlockSpec((8, 128), lambda i: (0, 0)),
        out_shape=jax.ShapeDtypeStruct((8, 128), jnp.float32),
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel",)),
        interpret=race_params(),
    )
    jax.block_until_ready(racy(jnp.ones((32, 128), jnp.float32)))
