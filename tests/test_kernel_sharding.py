"""Pallas kernels on a mesh of devices: XLA cannot partition a Pallas custom call, so
rwkvx_jax.ops runs them per device (shard_map) under `ops.kernel_mesh`, which the training step
enters. Without it JAX refuses to lower a Mosaic kernel on sharded operands, and a Triton one
gets the whole batch on every device."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from test_train import SMALL_RUN

from rwkvx_jax import ops, training
from rwkvx_jax import sharding as shd
from rwkvx_jax.training.config import TrainConfig, apply_overrides

PALLAS_BACKENDS = ["pallas_gpu", "pallas_tpu"]
TOL = 1e-5  # fp32, relative to the largest reference value


def _rel(a, b):
    return float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b)))


def _train_config(backend, *overrides):
    overrides = [*SMALL_RUN, "workdir=/nonexistent", *overrides]
    overrides += [f"model.wkv_backend={backend}", f"model.attention_backend={backend}"]
    return apply_overrides(TrainConfig(), overrides)


@pytest.mark.parametrize("remat", ["none", "full", "ordered"])
@pytest.mark.parametrize("backend", PALLAS_BACKENDS)
def test_train_step_runs_the_pallas_kernels_per_device(backend, remat):
    """The sharded train step (mesh 2 x 2 x 2, global batch 8, 2 heads) lowers for its
    platform with every Pallas custom call on one device's share: 2 of the 8 sequences and 1
    of the 2 heads, so head-major operands lead with B*H = 2, not 16. With remat (the stage-2
    recipes') the backward recomputes both forward kernels, per device too."""
    config = _train_config(backend, "mesh=2,2,2", f"remat={remat}")
    program = training.TrainProgram.create(config, config.model, shd.make_mesh(config.mesh))
    tokens = (config.data.batch_size, config.data.ctx + 1)
    batch = jax.ShapeDtypeStruct(tokens, jnp.int32, sharding=program.batch_sharding)
    step = jax.jit(
        program.step_fn,
        in_shardings=(program.state_shardings, program.batch_sharding),
        out_shardings=(program.state_shardings, None),
    )
    platform = "tpu" if backend == "pallas_tpu" else "cuda"
    traced = step.trace(program.abstract_state_with_shardings(), batch)
    text = traced.lower(lowering_platforms=(platform,)).as_text()
    target = "tpu_custom_call" if platform == "tpu" else "xla.gpu.triton"
    calls = [line for line in text.splitlines() if target in line and "custom_call" in line]
    # WKV-7 forward and backward, top-k attention forward and its two backward kernels; with
    # remat the two forward kernels once more.
    assert len(calls) == {"none": 5, "full": 7, "ordered": 7}[remat]
    types = [line.split("} :")[-1] for line in calls]
    assert {int(d) for t in types for d in re.findall(r"tensor<(\d+)x", t)} == {2}, types


def _sharded(mesh, *arrays):
    batch = NamedSharding(mesh, PartitionSpec(("data", "fsdp")))
    return [jax.device_put(x, batch) for x in arrays]


@pytest.mark.parametrize("heads", [2, 1], ids=["heads-split", "heads-repeated"])
@pytest.mark.parametrize("backend", PALLAS_BACKENDS)
def test_per_device_kernels_match_one_device(backend, heads, interpreted_kernels):
    """WKV-7 (with a state) and top-k attention on a 2 x 1 x 2 mesh, forward and every
    gradient, against the same calls on one device; with 1 head the tensor axis repeats the
    work instead of splitting it."""
    mesh = shd.make_mesh((2, 1, 2), devices=jax.devices()[:4])
    batch, seq, n = 4, 40, 64
    keys = jax.random.split(jax.random.key(heads), 9)
    shape = (batch, seq, heads, n)
    r, k, v, kk = (jax.random.normal(keys[i], shape) for i in range(4))
    w = -0.6065 * jax.nn.sigmoid(jax.random.normal(keys[4], shape))
    kk = kk / jnp.linalg.norm(kk, axis=-1, keepdims=True)
    state = 0.1 * jax.random.normal(keys[5], (batch, heads, n, n))
    wkv_args = (r, w, k, v, -kk, 0.5 * kk, state)
    q, kq, vq = (jax.random.normal(keys[6 + i], (batch, 64, heads, 32)) for i in range(3))

    def loss(wkv_args, qkv):
        y, s = ops.wkv7(*wkv_args, backend=backend)
        o = ops.topk_chunk_attention(*qkv, chunk_size=16, top_k=2, backend=backend)
        return jnp.sum(y * jnp.cos(y)) + jnp.sum(s**2) + jnp.sum(o * jnp.sin(o))

    value_and_grad = jax.value_and_grad(loss, argnums=(0, 1))
    want = jax.jit(value_and_grad)(wkv_args, (q, kq, vq))
    sharded = (_sharded(mesh, *wkv_args), _sharded(mesh, q, kq, vq))
    with ops.kernel_mesh(mesh):
        # Both kernels, forward and backward, inside shard_maps (4 of them).
        assert str(jax.make_jaxpr(value_and_grad)(*sharded)).count("shard_map[") == 4
        got = jax.jit(value_and_grad)(*sharded)
    assert {"wkv7_" + backend[7:], "topk_chunk_attention_" + backend[7:]} <= set(
        interpreted_kernels
    )
    for (path, g), g_ref in zip(
        jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(want), strict=True
    ):
        assert _rel(g, g_ref) < TOL, (jax.tree_util.keystr(path), _rel(g, g_ref))


def test_kernel_mesh_needs_the_training_axes():
    mesh = Mesh(np.array(jax.devices()[:2]), ("x",))
    with pytest.raises(ValueError, match=r"axes must be \('data', 'fsdp', 'tensor', 'context'\)"):
        with ops.kernel_mesh(mesh):
            pass
