"""bench/decode_latency.py's measuring tools: the matrix-vector chain covers exactly the step's
matrices, and the paired floor reports per-step ratios from its own samples."""

import importlib.util
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from rwkvx_jax.checkpoints.official_layout import params_from_state_dict
from rwkvx_jax.checkpoints.random_weights import random_state_dict
from rwkvx_jax.config import preset
from rwkvx_jax.decoding.weights import prepare_decode_weights


def _load_bench_decode():
    """bench/decode_latency.py as a module, loaded by path (bench/ is a folder of scripts, not a
    package)."""
    path = Path(__file__).resolve().parents[1] / "bench" / "decode_latency.py"
    spec = importlib.util.spec_from_file_location("bench_decode", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


bench_decode = _load_bench_decode()

TINY = preset("tiny")


@pytest.fixture(scope="module")
def params():
    return jax.tree.map(jnp.asarray, params_from_state_dict(random_state_dict(TINY, seed=3), TINY))


def _matmul_leaves(params):
    """The arrays a decode step multiplies a vector by: Dense kernels (the head's included)
    and the time mix's low-rank factors; not the embedding table (one row is read), not
    elementwise parameters such as r_k."""
    lora = {"w1", "w2", "a1", "a2", "v1", "v2", "g1", "g2"}
    return {
        path: x
        for path, x in traverse_util.flatten_dict(params).items()
        if x.ndim == 2 and path[0] != "emb" and (path[-1] == "kernel" or path[-1] in lora)
    }


@pytest.mark.parametrize("layout", ["out_in", "in_out"])
def test_matrix_vector_chain_multiplies_every_step_matrix_once(params, layout):
    weights = prepare_decode_weights(params, layout)
    chain = bench_decode.MatrixVectorChain(weights)
    expected = _matmul_leaves(params)
    assert len(chain.arrays) == len(expected)
    assert chain.nbytes == sum(x.nbytes for x in expected.values())
    # Every [out, in] kernel contracts its minor axis, every other matrix its major one.
    transposed = {id(x) for x in weights.transposed.values()}
    assert all(
        (a == 1) == (id(x) in transposed) for x, a in zip(chain.arrays, chain.axes, strict=True)
    )
    assert (layout == "out_in") == bool(transposed)
    # Each product is kept (none simplified away into a slice or a reduction of the weights).
    text = chain.compiled_text()
    assert text.count(" dot(") == len(expected)
    assert chain.seconds() > 0


def test_paired_floor_ratios_come_from_its_own_samples(params):
    weights = prepare_decode_weights(params, "out_in")
    paired = bench_decode.PairedFloor(weights, gib=1 / 64)
    for _ in range(3):
        paired.sample()
    # Replace the samples with known values: 1 GB/s and a 2 ms chain.
    paired.bandwidths = [1e9] * 3
    paired.chain_seconds = [2e-3] * 3
    steps = np.array([4e-3, 5e-3, 6e-3])
    ratios = paired.ratios(steps, weight_bytes=2_000_000)  # floor 2 ms
    assert ratios["step_vs_floor"] == pytest.approx(2.5)
    assert ratios["chain_vs_floor"] == pytest.approx(1.0)
    assert ratios["step_vs_chain"] == pytest.approx(2.5)
    assert ratios["bandwidth_gb_s"] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="4 steps but 3 samples"):
        paired.ratios(np.ones(4), weight_bytes=1)
    paired.close()
