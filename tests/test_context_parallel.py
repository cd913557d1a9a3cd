"""Context parallelism: a sequence cut over the mesh's "context" axis gives the single-device
loss and gradients (rwkvx_jax.context_parallel, wired in rwkvx_jax.ops)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from train_runs import kill_after_first_checkpoint, run_losses, train_cli, two_processes_and_one

from pallas_kernels import wkv7 as kernel_wkv7
from pallas_kernels.topk_attention import select_chunks
from rwkvx_jax import ops, training
from rwkvx_jax import sharding as shd
from rwkvx_jax.context_parallel.state_maps import shard_state_map
from rwkvx_jax.layers import token_shift
from rwkvx_jax.model import RWKVX
from rwkvx_jax.training.config import TrainConfig, apply_overrides

# T = 384 = 3 * 2^7 is no power of two; it cuts into 2, 4 or 8 shards of whole attention chunks
# (16 tokens) and whole chunks of the chunked WKV-7 form (16 tokens).
CTX = 384
RWKV7_RUN = (
    "model.n_rwkv_layer=2 model.n_attn_layer=0 data.batch_size=2 "
    f"data.ctx={CTX} optimizer.lr=1e-2 optimizer.warmup_steps=1 sample.tokens=0"
).split()


def _relative_error(got, want) -> float:
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.max(np.abs(got - want)) / max(np.max(np.abs(want)), 1e-30))


def assert_trees_close(got_tree, want_tree, bound=1e-5):
    """Every leaf within `bound` of that leaf's largest entry (sums in another order move
    entries that nearly cancel by ~1e-6 of the largest)."""
    leaves = jax.tree_util.tree_leaves_with_path(want_tree)
    for (path, want), got in zip(leaves, jax.tree.leaves(got_tree), strict=True):
        assert _relative_error(got, want) <= bound, (shd.path_string(path), got, want)


def loss_and_grads(config: TrainConfig, mesh, params, tokens):
    """The train program's loss and gradients on `mesh` (its step's sharding and kernel mesh)."""
    program = training.TrainProgram.create(config, config.model, mesh)
    state_specs = program.state_shardings["params"]

    def value_and_grad(p, t):
        with training.block_transforms(config.remat, program.activation_sharding):
            return jax.value_and_grad(program.loss_fn)(p, t)

    run = jax.jit(value_and_grad, in_shardings=(state_specs, program.batch_sharding))
    return run(params, program.global_batch(tokens))


@pytest.fixture(scope="module")
def rwkv7_case():
    config = apply_overrides(TrainConfig(), RWKV7_RUN)
    model = RWKVX(config.model)
    params = jax.jit(lambda key: model.init(key, jnp.zeros((1, 8), jnp.int32))["params"])(
        jax.random.key(3)
    )
    # Random weights where init puts zeros (w1, a1, output, ...): every path carries signal.
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(4), len(leaves))
    params = jax.tree.unflatten(
        tree, [p + 0.05 * jax.random.normal(k, p.shape) for p, k in zip(leaves, keys, strict=True)]
    )
    params = jax.tree.map(np.asarray, params)
    tokens = np.random.default_rng(0).integers(0, 256, (2, CTX + 1)).astype(np.int32)
    one = shd.make_mesh((1, 1, 1), devices=jax.devices()[:1])
    return config, params, tokens, loss_and_grads(config, one, params, tokens)


@pytest.mark.parametrize(
    "mesh_shape",
    # context alone at 2, 4 and 8; with data; with fsdp and tensor (slow: `bash .ci/extended`).
    [
        pytest.param((1, 1, 1, 2), marks=pytest.mark.slow),
        pytest.param((1, 1, 1, 4), marks=pytest.mark.slow),
        (1, 1, 1, 8),
        pytest.param((2, 1, 1, 4), marks=pytest.mark.slow),
        (1, 2, 2, 2),
    ],
)
def test_rwkv7_loss_and_gradients_match_one_device(rwkv7_case, mesh_shape):
    config, params, tokens, (want_loss, want_grads) = rwkv7_case
    mesh = shd.make_mesh(mesh_shape, devices=jax.devices()[: int(np.prod(mesh_shape))])
    loss, grads = loss_and_grads(config.replace(mesh=mesh_shape), mesh, params, tokens)
    assert _relative_error(loss, want_loss) <= 1e-5
    assert_trees_close(grads, want_grads)


def test_shard_state_map_is_the_affine_map_of_the_shard():
    """S_in -> S_in M + N and y = y0 + S_in u reproduce the kernel run from S_in."""
    rng = np.random.default_rng(1)
    B, T, H, N = 2, 40, 2, 8
    x = lambda: jnp.asarray(rng.normal(size=(B, T, H, N)), jnp.float32)
    r, k, v = x(), x(), x()
    w = -jnp.exp(x()) * 0.3
    kk = x()
    kk = kk / jnp.linalg.norm(kk, axis=-1, keepdims=True)
    a, b = -kk, kk * jax.nn.sigmoid(x())
    start = jnp.asarray(rng.normal(size=(B, H, N, N)), jnp.float32)
    local = lambda *xs: kernel_wkv7(*xs, backend="reference")
    y0, u, m, n = shard_state_map(local, r, w, k, v, a, b)
    y, end = local(r, w, k, v, a, b, start)
    mapped = jnp.einsum("bhij,bhjk->bhik", start, m, precision="highest") + n
    assert _relative_error(mapped, end) <= 1e-5
    assert _relative_error(y0 + jnp.einsum("bhij,bthj->bthi", start, u), y) <= 1e-5


def test_token_shift_and_final_state_across_shards():
    """ops.token_shift and ops.wkv7 under a context mesh: the carried token and state enter
    the first shard only; the final state is the whole sequence's on every shard."""
    rng = np.random.default_rng(2)
    mesh = shd.make_mesh((1, 1, 1, 4), devices=jax.devices()[:4])
    x = jnp.asarray(rng.normal(size=(2, 32, 6)), jnp.float32)
    first = jnp.asarray(rng.normal(size=(2, 6)), jnp.float32)
    B, T, H, N = 2, 32, 2, 8
    y = lambda: jnp.asarray(rng.normal(size=(B, T, H, N)), jnp.float32)
    r, k, v, kk = y(), y(), y(), y()
    kk = kk / jnp.linalg.norm(kk, axis=-1, keepdims=True)
    inputs = (r, -jnp.exp(y()) * 0.3, k, v, -kk, kk * 0.5)
    state = jnp.asarray(rng.normal(size=(B, H, N, N)), jnp.float32)

    def run(x, first, inputs, state):
        return ops.token_shift(x, first), ops.wkv7(*inputs, state, backend="xla_chunked")

    with ops.kernel_mesh(mesh):
        shifted, (out, final) = jax.jit(run)(x, first, inputs, state)
    np.testing.assert_array_equal(shifted, token_shift(x, first))
    want_out, want_final = ops.wkv7(*inputs, state, backend="xla_chunked")
    assert _relative_error(out, want_out) <= 1e-5
    assert _relative_error(final, want_final) <= 1e-5


def test_uneven_context_split_is_refused():
    mesh = shd.make_mesh((1, 1, 1, 4), devices=jax.devices()[:4])
    with ops.kernel_mesh(mesh), pytest.raises(ValueError, match="4 equal context shards"):
        jax.jit(ops.token_shift)(jnp.zeros((1, 30, 4)))


def test_mesh_has_a_context_axis_and_the_three_number_form_keeps_working():
    four = apply_overrides(TrainConfig(), ["mesh=2,1,1,4"])
    assert four.mesh == (2, 1, 1, 4)
    assert dict(shd.make_mesh(four.mesh).shape) == {"data": 2, "fsdp": 1, "tensor": 1, "context": 4}
    three = shd.make_mesh((2, 2, 2))
    assert dict(three.shape) == {"data": 2, "fsdp": 2, "tensor": 2, "context": 1}
    mesh = shd.make_mesh((2, 1, 1, 4))
    spec = shd.activation_sharding(mesh).spec
    assert tuple(spec) == ("data", "context", None)  # logical "length" -> context
    with pytest.raises(training.TrainConfigError, match="context"):
        apply_overrides(TrainConfig(), ["mesh=1,1,1,1,1"])


@pytest.mark.parametrize("name", ["3.6b-stage3-256k", "3.6b-stage3-1m"])
def test_stage3_recipes_cut_sequences_into_whole_chunks_per_chip(name):
    """64 chips (a v5p-128), fewer sequences than chips, 64K tokens of a sequence per chip in
    whole 2048-token chunks."""
    config = training.recipe(name)
    data, fsdp, tensor, context = config.mesh
    assert data * fsdp * tensor * context == 64 and config.data.batch_size < 64
    assert config.data.batch_size % (data * fsdp) == 0
    assert config.data.ctx // context == 65_536
    assert (config.data.ctx // context) % config.model.chunk_size == 0
    assert config.remat == "ordered" and config.stage == "stage2" and not config.loss.longce


def test_a_context_length_not_in_whole_chunks_per_shard_is_refused():
    config = apply_overrides(TrainConfig(), ["data.ctx=96", "mesh=1,1,1,4"])  # chunks of 16
    with pytest.raises(training.TrainConfigError, match="multiple of 64"):
        mesh = shd.make_mesh(config.mesh, devices=jax.devices()[:4])
        training.TrainProgram.create(config, config.model, mesh)


# ----------------------------------------------------------------------------- RWKV-X

RWKVX_RUN = ["model.n_rwkv_layer=2", "model.n_attn_layer=2"]  # R0 S0 R1 S1, chunk 16, top-3


@pytest.mark.parametrize(
    "backend", ["xla_chunked", pytest.param("reference", marks=pytest.mark.slow)]
)
def test_topk_attention_across_shards_matches_one_device(backend):
    """Queries choose chunks on other shards: the output and the q, k, v gradients equal the
    single-device kernel's (chunk 16, top 3, T = 192 in 4 shards of 3 chunks)."""
    rng = np.random.default_rng(5)
    shape = (2, 192, 2, 8)
    q, k, v = (jnp.asarray(rng.normal(size=shape), jnp.float32) for _ in range(3))
    cotangent = jnp.asarray(rng.normal(size=shape), jnp.float32)
    chosen = np.asarray(select_chunks(q, k, 16, 3))  # [B, T, H, 2] chunk indices
    shard_of_query = (np.arange(192) // 48)[None, :, None, None]
    assert np.any((chosen >= 0) & (chosen // 3 < shard_of_query)), "no pick on another shard"

    def loss(q, k, v):
        o = ops.topk_chunk_attention(q, k, v, chunk_size=16, top_k=3, backend=backend)
        return jnp.sum(o * cotangent), o

    want = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(q, k, v)
    mesh = shd.make_mesh((1, 1, 1, 4), devices=jax.devices()[:4])
    with ops.kernel_mesh(mesh):
        got = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(q, k, v)
    assert_trees_close(got, want)


@pytest.mark.parametrize(
    "mesh_shape", [pytest.param((1, 1, 1, 8), marks=pytest.mark.slow), (2, 2, 1, 2)]
)
def test_rwkvx_loss_and_gradients_match_one_device(mesh_shape):
    batch = 4  # data x fsdp divides it
    config = apply_overrides(TrainConfig(), [*RWKV7_RUN, *RWKVX_RUN, f"data.batch_size={batch}"])
    model = RWKVX(config.model)
    params = jax.jit(lambda key: model.init(key, jnp.zeros((1, 8), jnp.int32))["params"])(
        jax.random.key(3)
    )
    params = jax.tree.map(np.asarray, params)
    tokens = np.random.default_rng(0).integers(0, 256, (batch, CTX + 1)).astype(np.int32)
    one = shd.make_mesh((1, 1, 1), devices=jax.devices()[:1])
    want_loss, want_grads = loss_and_grads(config, one, params, tokens)
    mesh = shd.make_mesh(mesh_shape, devices=jax.devices()[: int(np.prod(mesh_shape))])
    # remat="ordered" (the long-context recipes'): each block's own backward pass, same values.
    sharded = config.replace(mesh=mesh_shape, remat="ordered")
    loss, grads = loss_and_grads(sharded, mesh, params, tokens)
    assert _relative_error(loss, want_loss) <= 1e-5
    assert_trees_close(grads, want_grads)


# ----------------------------------------------------------------------------- traffic


def _step_collectives(ctx: int, *overrides: str):
    config = apply_overrides(
        TrainConfig(),
        [*RWKV7_RUN, "model.n_rwkv_layer=1", f"data.ctx={ctx}", "mesh=1,1,1,4", *overrides],
    )
    mesh = shd.make_mesh(config.mesh, devices=jax.devices()[:4])
    program = training.TrainProgram.create(config, config.model, mesh)
    return training.collective_bytes(program.compile(ctx).as_text()), config.model


def test_rwkv7_step_exchanges_state_sized_bytes_whatever_the_length():
    """The compiled step's collectives at T = 256 and T = 512 (context 4, the loss in pieces of
    32 positions) move the same bytes: the WKV state maps (all-gather forward, reduce-scatter
    backward), [B, C] token-shift messages, and the parameter gradients' all-reduce over the
    context axis (parameters are replicated over it) -- nothing grows with T."""
    short, model = _step_collectives(256, "loss.chunk_tokens=32")
    long, _ = _step_collectives(512, "loss.chunk_tokens=32")
    assert short == long, (short, long)
    B, H, N, C = 2, model.n_embd // model.head_size, model.head_size, model.n_embd
    maps = 2 * 4 * B * H * N * N * 4  # M and N of the 4 shards, fp32, one RWKV block
    assert short["all-gather"] == maps
    assert short["reduce-scatter"] == maps // 4
    # Token shifts: two per block forward and two backward ([B, C] fp32), plus tiny s32 bits.
    assert 4 * B * C * 4 <= short["collective-permute"] < 4 * B * C * 4 + 1024


# ----------------------------------------------------------------------------- runs

# train.py on a context mesh: RWKV-X, ctx 128 = 8 chunks of 16, 2 per shard at context 4.
CONTEXT_RUN = (
    "model.n_rwkv_layer=1 model.n_attn_layer=1 model.wkv_backend=reference "
    "model.attention_backend=reference data.ctx=128 data.batch_size=2 data.max_tokens=40000 "
    "optimizer.lr=1e-2 optimizer.schedule=constant optimizer.lr_final=none "
    "optimizer.total_steps=none optimizer.warmup_steps=2 log_every=1 sample.tokens=0 "
    "checkpoint.export=false mesh=1,1,1,4"
).split()


@pytest.mark.slow
def test_context_axis_across_two_processes_matches_one_process(tmp_path):
    """mesh 1 x 1 x 1 x 4 over 2 processes x 2 CPU devices (jax.distributed, gloo): each
    process holds half of every sequence's shards and reads the same rows; the losses equal a
    one-device run's."""
    multi, one = two_processes_and_one(tmp_path, 3, *CONTEXT_RUN)
    assert [s for s, _ in multi] == [s for s, _ in one] == [1, 2, 3]
    np.testing.assert_allclose([l for _, l in multi], [l for _, l in one], rtol=1e-5)


@pytest.mark.slow
def test_kill_9_and_resume_on_a_context_mesh_reproduce_the_losses(tmp_path):
    steps, every, cache = 8, 2, tmp_path / "jax-cache"
    run = lambda workdir: train_cli(workdir, cache, steps, every, *CONTEXT_RUN, devices=4)
    reference = run(tmp_path / "reference")
    output, _ = reference.communicate(timeout=600)
    assert reference.returncode == 0, output
    expected = run_losses(tmp_path / "reference")
    assert [s for s, _ in expected] == list(range(1, steps + 1))
    workdir = tmp_path / "killed"
    assert kill_after_first_checkpoint(run(workdir), workdir / "checkpoints") < steps
    resumed = run(workdir)
    output, _ = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, output
    assert "resumed from" in output
    assert run_losses(workdir) == expected  # bit-exact, every step


@pytest.mark.aot
def test_aot_compile_with_a_context_axis_for_a_tpu_slice():
    """The RWKV-X step on a TPU topology with context 2 x fsdp 2: the Pallas TPU kernels run
    per shard (the own chunks, the doubled-batch WKV) and the shards exchange state maps and
    keys / values. Needs the TPU compiler (`pip install -e '.[aot]'`, `pytest -m aot`)."""
    devices = training.tpu_topology_devices("v5p:2x2x1")
    config = apply_overrides(
        TrainConfig(),
        [*RWKVX_RUN, "data.ctx=1024", "model.chunk_size=128", "data.batch_size=2",
         "mesh=1,2,1,2", "model.dtype=bfloat16", "remat=ordered"],
    )  # fmt: skip
    program, compiled = training.aot_compile(config, devices)
    assert dict(program.mesh.shape) == {"data": 1, "fsdp": 2, "tensor": 1, "context": 2}
    text = compiled.as_text()
    assert "tpu_custom_call" in text
    assert training.collective_bytes(text)["all-gather"] > 0
