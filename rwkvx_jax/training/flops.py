"""Model FLOPs of a training token and the peak matmul rate of a mesh: the two halves of MFU."""

from __future__ import annotations

import math
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from rwkvx_jax import sharding as shd
from rwkvx_jax.config import RWKVXConfig


def matmul_param_count(params) -> int:
    """Parameters used in a matmul once per token: every array of rank >= 2 except `emb`
    (a lookup) and the tiny per-head `r_k`."""
    count = 0
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        name = shd.path_string(path)
        if len(np.shape(leaf)) >= 2 and not name.startswith("emb/") and not name.endswith("r_k"):
            count += int(np.prod(np.shape(leaf)))
    return count


def mean_attended_keys(ctx: int, chunk_size: int, top_k: int) -> float:
    """Keys per query of top-k chunk attention: its own chunk causally + top_k - 1 full chunks."""
    t = np.arange(ctx)
    keys = t % chunk_size + 1 + np.minimum(t // chunk_size, top_k - 1) * chunk_size
    return float(keys.mean())


def training_flops_per_token(config: RWKVXConfig, params, ctx: int) -> float:
    """Model FLOPs of one training token (forward + backward), the MFU numerator.

    6 x matmul parameters, plus per RWKV block the WKV-7 recurrence (forward ~9 N^2 per head:
    decay, S a, the two rank-1 updates, S r; backward twice that), plus per sparse block the
    attention scores and values over the mean attended keys (4 C per key forward, x3).
    """
    dense = 6.0 * matmul_param_count(params)
    wkv = 27.0 * config.head_size * config.n_embd * config.n_rwkv_layer
    keys = mean_attended_keys(ctx, config.chunk_size, config.top_k) if config.n_attn_layer else 0
    attention = 12.0 * config.n_embd * keys * config.n_attn_layer
    return dense + wkv + attention


def measure_peak_flops(mesh: Mesh, dtype="float32", size: int | None = None) -> float:
    """Best-of-3 matmul FLOP/s of all the mesh's devices together (the MFU denominator).

    Each device multiplies its own [size, size] pair (one batched matmul sharded over every
    mesh axis), so the figure is what these devices reach on dense matmuls in this process.
    """
    devices = mesh.devices.size
    platform = mesh.devices.flat[0].platform
    size = size or (1024 if platform == "cpu" else 8192)
    sharding = NamedSharding(mesh, PartitionSpec(mesh.axis_names))
    make = jax.jit(
        lambda key: jax.random.normal(key, (devices, size, size), jnp.dtype(dtype)),
        out_shardings=sharding,
    )
    a = make(jax.random.key(1))
    b = make(jax.random.key(2))
    matmul = jax.jit(lambda a, b: jnp.einsum("bij,bjk->bik", a, b), out_shardings=sharding)
    matmul(a, b).block_until_ready()
    best = math.inf
    for _ in range(3):
        start = time.perf_counter()
        matmul(a, b).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return 2.0 * devices * size**3 / best
