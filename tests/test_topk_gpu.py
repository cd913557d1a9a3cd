"""GPU (Pallas-Triton) top-k chunk attention: interpret vs the dense oracle, CUDA lowering, cost."""

import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import selection_oracle as oracle

from pallas_kernels.topk_attention.gpu import (
    BlockSizes,
    gpu_work_fraction,
    topk_chunk_attention_gpu,
)
from pallas_kernels.topk_attention.reference import select_chunks

_TOL = dict(rtol=1e-5, atol=1e-5)


def _inputs(t, h=2, d=16, seed=0, tied_chunks=0, chunk_size=16):
    """Random fp32 q, k, v [1, T, H, D]; the first `tied_chunks` key chunks share one mean.

    Tied chunks hold row permutations of the same dyadic keys, so their means (and scores) are
    bitwise equal while their contents differ: a wrong tie-break changes the output.
    """
    keys = jax.random.split(jax.random.PRNGKey(seed), 3)
    q, k, v = (jax.random.normal(x, (1, t, h, d), jnp.float32) for x in keys)
    if tied_chunks:
        base = jnp.round(k[:, :chunk_size] * 4) / 4  # exact sums: the means tie bitwise
        perms = np.random.default_rng(seed).permuted(
            np.tile(np.arange(chunk_size), (tied_chunks, 1)), axis=1
        )
        tied = jnp.concatenate([base[:, p] for p in perms], axis=1)
        k = k.at[:, : tied_chunks * chunk_size].set(tied)
    return q, k, v


def _dense_masked(q, k, v, mask):
    """fp32 attention and log-sum-exp under a [B, H, T, T] mask, scale 1 / sqrt(D)."""
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, precision=jax.lax.Precision.HIGHEST)
    logits = jnp.where(mask, logits / math.sqrt(q.shape[-1]), -jnp.inf)
    o = jnp.einsum(
        "bhqk,bkhd->bqhd", jax.nn.softmax(logits, axis=-1), v, precision=jax.lax.Precision.HIGHEST
    )
    return o, jnp.swapaxes(jax.nn.logsumexp(logits, axis=-1), 1, 2)


def _check_against_oracle(q, k, v, *, chunk_size, top_k, block_sizes):
    """Compares o, lse and the q/k/v gradients of a loss using both with dense attention under
    the independent oracle's mask (`selection_oracle`: no selection code shared with the
    kernel)."""
    w_o = jax.random.normal(jax.random.PRNGKey(1), q.shape, jnp.float32)
    w_lse = jax.random.normal(jax.random.PRNGKey(2), q.shape[:3], jnp.float32)
    mask = jnp.asarray(oracle.attended_mask(q, k, chunk_size, top_k))

    def kernel(q, k, v):
        o, lse = topk_chunk_attention_gpu(
            q,
            k,
            v,
            chunk_size=chunk_size,
            top_k=top_k,
            block_sizes=block_sizes,
            interpret=True,
            return_lse=True,
        )
        return (o * w_o).sum() + (lse * w_lse).sum(), (o, lse)

    def dense(q, k, v):
        o, lse = _dense_masked(q, k, v, mask)
        return (o * w_o).sum() + (lse * w_lse).sum(), (o, lse)

    grad = lambda f: jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2), has_aux=True))
    (_, (o, lse)), grads = grad(kernel)(q, k, v)
    (_, (o_ref, lse_ref)), grads_ref = grad(dense)(q, k, v)
    np.testing.assert_allclose(o, o_ref, **_TOL, err_msg="o")
    np.testing.assert_allclose(lse, lse_ref, **_TOL, err_msg="lse")
    for name, g, g_ref in zip("qkv", grads, grads_ref, strict=True):
        np.testing.assert_allclose(g, g_ref, **_TOL, err_msg=f"d{name}")


@pytest.mark.parametrize(
    "t, chunk_size, top_k, blocks",
    [
        # Sparse, T not a multiple of the chunk, three chunks with tied means.
        (100, 16, 3, BlockSizes(block_q=16, block_k=16, pair_tile=16)),
        # Sparse, chunk 32, one pick, block_q != block_k, pair tiles spanning two key blocks.
        (80, 32, 2, BlockSizes(block_q=32, block_k=16, pair_tile=16)),
        # Sparse, chunk 64: the default 64 x 64 blocks and tiles of 64 ...
        (200, 64, 2, BlockSizes()),
        # ... and the defaults with a chunk of 16: blocks capped to 16, tiles of 64 kept.
        (120, 16, 2, BlockSizes()),
        # Own chunk only (no pairs), partial last chunk.
        (50, 16, 1, BlockSizes(block_q=16, block_k=16, pair_tile=16)),
        # top_k above the number of chunks: one causal segment, block_k > block_q.
        (70, 16, 8, BlockSizes(block_q=16, block_k=32, pair_tile=16)),
    ],
)
def test_matches_oracle_fp32(t, chunk_size, top_k, blocks):
    q, k, v = _inputs(t, tied_chunks=min(3, t // chunk_size), chunk_size=chunk_size)
    _check_against_oracle(q, k, v, chunk_size=chunk_size, top_k=top_k, block_sizes=blocks)


def test_ties_are_exercised():
    """The tied-input construction really produces equal scores with differing chunk contents,
    and ties that decide which chunks are attended (at the top_k-th place)."""
    q, k, _ = _inputs(100, tied_chunks=3, chunk_size=16)
    means = k[:, :48].reshape(1, 3, 16, 2, 16).mean(axis=2)
    assert bool((means[:, 0] == means[:, 1]).all() & (means[:, 1] == means[:, 2]).all())
    assert not bool((k[:, :16] == k[:, 16:32]).all())
    across, within = oracle.count_ties(q, k, 16, 3)
    assert across > 0 and within > 0
    np.testing.assert_array_equal(select_chunks(q, k, 16, 3), oracle.select_chunks(q, k, 16, 3))


@pytest.mark.slow
@pytest.mark.parametrize(
    "t, chunk_size, top_k, blocks",
    [
        (128, 32, 3, BlockSizes(block_q=32, block_k=32, pair_tile=32)),
        (96, 16, 4, BlockSizes(block_q=16, block_k=16, pair_tile=32)),
        (40, 16, 3, BlockSizes(block_q=16, block_k=16, pair_tile=16)),
    ],
)
def test_matches_oracle_more_shapes(t, chunk_size, top_k, blocks):
    q, k, v = _inputs(t, d=32, seed=3)
    _check_against_oracle(q, k, v, chunk_size=chunk_size, top_k=top_k, block_sizes=blocks)


def test_bf16_inputs_close_to_fp32_oracle():
    q, k, v = (x.astype(jnp.bfloat16) for x in _inputs(100, seed=4))
    attention = jax.jit(
        lambda q, k, v: topk_chunk_attention_gpu(
            q,
            k,
            v,
            chunk_size=16,
            top_k=3,
            block_sizes=BlockSizes(block_q=16, block_k=16, pair_tile=16),
            interpret=True,
        )
    )
    o = attention(q, k, v)
    assert o.dtype == jnp.bfloat16
    # The fp32 oracle on the same (bf16-rounded) inputs; bf16 dot operands cost ~1e-2.
    f32 = [np.asarray(x, np.float32) for x in (q, k, v)]
    assert oracle.decision_margin(*f32[:2], 16, 3) > 1e-4
    ref = oracle.topk_chunk_attention(*f32, 16, 3)[0]
    np.testing.assert_allclose(o.astype(jnp.float32), ref, rtol=2e-2, atol=2e-2)
    # The bf16 path is really taken: fp32 dots on these inputs land near 1e-7.
    assert np.abs(np.asarray(o, np.float32) - ref).max() > 1e-4


def _union_work_fraction(sel, seq_len, chunk_size, block):
    """Dense-union alternative: each query block visits every key block of every chunk any of its
    rows selected, plus its own chunk up to the diagonal; fraction of dense-causal products."""
    picks = np.moveaxis(np.asarray(sel), 2, 1).reshape(-1, seq_len // block, block * sel.shape[-1])
    visited = 0
    for group in picks:
        for i, rows in enumerate(group):
            chunks = np.unique(rows[rows >= 0]).size
            own = (i * block) % chunk_size + block
            visited += block * (chunks * chunk_size + own)
    return visited / picks.shape[0] / (seq_len * (seq_len + 1) / 2)


def test_work_fraction_at_64k_random_queries():
    t, chunk_size, top_k, heads = 65536, 2048, 3, 2
    static = gpu_work_fraction(t, chunk_size=chunk_size, top_k=top_k)
    keys = jax.random.split(jax.random.PRNGKey(0), 2)
    q, k = (jax.random.normal(x, (1, t, heads, 64), jnp.float32) for x in keys)
    sel = select_chunks(q, k, chunk_size, top_k)
    exact = gpu_work_fraction(t, chunk_size=chunk_size, top_k=top_k, sel=sel)
    union = _union_work_fraction(sel, t, chunk_size, 64)
    print(
        f"work fraction at T=64K: pairs static {static:.4f}, exact {exact:.4f}, union {union:.4f}"
    )
    assert exact <= static <= 0.20
    # The needed products alone: own causal chunk + (top_k - 1) full chunks per query.
    needed = t * (chunk_size + 1) / 2 + (t - chunk_size * 2) * 2 * chunk_size + chunk_size**2
    assert exact >= needed / (t * (t + 1) / 2)
    assert union > 0.9  # random queries: the per-block union is nearly dense


def test_work_fraction_dense_regime_is_about_one():
    # T <= chunk * top_k: one causal segment, only diagonal-block waste above 1.
    frac = gpu_work_fraction(4096, chunk_size=2048, top_k=3)
    assert 1.0 <= frac <= 1.0 + 64 / 4096 * 2


def _triton_kernels(lowered) -> list[str]:
    text = lowered.as_text()
    assert text.count("xla.gpu.triton") == len(re.findall(r'name = "topk_\w+"', text))
    return sorted(re.findall(r'name = "(topk_\w+)"', text))


@pytest.mark.parametrize(
    "dtype, block_q, t",
    [(jnp.float32, 64, 8192), (jnp.float32, 128, 8192), (jnp.bfloat16, 128, 8000)],
)
def test_cuda_lowering_production_blocks(dtype, block_q, t):
    x = jax.ShapeDtypeStruct((1, t, 2, 64), dtype)

    def attention(q, k, v):
        return topk_chunk_attention_gpu(
            q, k, v, chunk_size=2048, top_k=3, block_sizes=BlockSizes(block_q=block_q)
        )

    def loss(q, k, v):
        return attention(q, k, v).astype(jnp.float32).sum()

    lower = lambda f: jax.jit(f).trace(x, x, x).lower(lowering_platforms=("cuda",))
    assert _triton_kernels(lower(attention)) == ["topk_own_fwd", "topk_pairs_fwd"]
    assert _triton_kernels(lower(jax.grad(loss, argnums=(0, 1, 2)))) == [
        "topk_own_dkv",
        "topk_own_dq",
        "topk_own_fwd",
        "topk_pairs_dkv",
        "topk_pairs_dq",
        "topk_pairs_fwd",
    ]


def test_cuda_lowering_dense_regime():
    x = jax.ShapeDtypeStruct((2, 4096, 2, 64), jnp.bfloat16)

    def loss(q, k, v):
        blocks = BlockSizes(block_q=128)
        o = topk_chunk_attention_gpu(q, k, v, chunk_size=2048, top_k=3, block_sizes=blocks)
        return o.astype(jnp.float32).sum()

    lowered = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).trace(x, x, x)
    kernels = _triton_kernels(lowered.lower(lowering_platforms=("cuda",)))
    assert kernels == ["topk_own_dkv", "topk_own_dq", "topk_own_fwd"]


def test_triton_modules_pass_the_mlir_verifier(monkeypatch):
    """Plain lowering does not verify the Triton modules (ptxas-free CI would miss e.g. scf.for
    bound-type errors, seen once on a real H100): run the MLIR verifier on every kernel."""
    from jax._src.pallas.triton import lowering, pallas_call_registration

    verified = {}
    lower = lowering.lower_jaxpr_to_triton_module

    def lower_and_verify(*args, **kwargs):
        result = lower(*args, **kwargs)
        name = re.search(
            r'sym_name = "(\w+)"', result.module.operation.get_asm(large_elements_limit=1)
        )
        verified[name.group(1) if name else len(verified)] = result.module.operation.verify()
        return result

    monkeypatch.setattr(
        pallas_call_registration.lowering, "lower_jaxpr_to_triton_module", lower_and_verify
    )
    x = jax.ShapeDtypeStruct((1, 8192, 2, 64), jnp.bfloat16)

    def loss(q, k, v):
        blocks = BlockSizes(block_q=128)
        o = topk_chunk_attention_gpu(q, k, v, chunk_size=2048, top_k=3, block_sizes=blocks)
        return o.astype(jnp.float32).sum()

    jax.jit(jax.grad(loss, argnums=(0, 1, 2))).trace(x, x, x).lower(lowering_platforms=("cuda",))
    assert len(verified) == 6 and all(verified.values()), verified


@pytest.mark.parametrize(
    "sizes, match",
    [
        (dict(block_q=48), "block_q.*48"),
        (dict(block_k=8), "block_k.*8"),
        (dict(pair_tile=100), "pair_tile"),
    ],
)
def test_bad_block_sizes_raise(sizes, match):
    with pytest.raises(ValueError, match=match):
        BlockSizes(**sizes)


def test_block_sizes_defaults_and_type():
    assert BlockSizes.get_default() == BlockSizes(block_q=64, block_k=64, pair_tile=64)
    x = jnp.zeros((1, 100, 2, 16), jnp.float32)
    with pytest.raises(ValueError, match="block_sizes"):
        topk_chunk_attention_gpu(x, x, x, chunk_size=16, top_k=2, block_sizes=dict(block_q=16))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(chunk_size=0), "chunk_size"),
        (dict(top_k=0), "top_k"),
        (dict(chunk_size=24, top_k=2), "multiple of 16"),
    ],
)
def test_bad_arguments_raise(kwargs, match):
    x = jnp.zeros((1, 100, 2, 16), jnp.float32)
    args = dict(chunk_size=16, top_k=2) | kwargs
    with pytest.raises(ValueError, match=match):
        topk_chunk_attention_gpu(x, x, x, interpret=True, **args)


def test_bad_shapes_raise():
    x = jnp.zeros((1, 100, 2, 16), jnp.float32)
    with pytest.raises(ValueError, match="shape mismatch"):
        topk_chunk_attention_gpu(x, x[:, :50], x, chunk_size=16, top_k=2, interpret=True)
    with pytest.raises(ValueError, match="seq_len"):
        gpu_work_fraction(0, chunk_size=16, top_k=2)


def _has_cuda() -> bool:
    try:
        return bool(jax.devices("gpu"))
    except RuntimeError:
        return False


@pytest.mark.skipif(not _has_cuda(), reason="needs a CUDA GPU (compiled Triton kernels)")
@pytest.mark.parametrize(
    "dtype, t, block_q, tol",
    [
        (jnp.float32, 8192, 64, 1e-5),
        (jnp.float32, 6000, 128, 1e-5),  # dense regime, T not a block multiple
        (jnp.bfloat16, 8192, 128, 2e-2),
    ],
)
def test_on_gpu_matches_xla_chunked(dtype, t, block_q, tol):
    from pallas_kernels.topk_attention.xla_chunked import topk_chunk_attention

    keys = jax.random.split(jax.random.PRNGKey(5), 4)
    q, k, v = (jax.random.normal(x, (1, t, 4, 64), jnp.float32).astype(dtype) for x in keys[:3])
    w = jax.random.normal(keys[3], q.shape, jnp.float32)

    def run(fn, **kw):
        def loss(q, k, v):
            o = fn(q, k, v, chunk_size=2048, top_k=3, **kw)
            return (o.astype(jnp.float32) * w).sum(), o

        (_, o), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(q, k, v)
        return [o, *grads]

    got = run(topk_chunk_attention_gpu, block_sizes=BlockSizes(block_q=block_q))
    # The fp32 XLA version on fp32-upcast inputs is the reference.
    q, k, v = (x.astype(jnp.float32) for x in (q, k, v))
    want = run(topk_chunk_attention)
    for name, a, b in zip(["o", "dq", "dk", "dv"], got, want, strict=True):
        a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
        rel = np.linalg.norm(a - b) / np.linalg.norm(b)
        print(f"{np.dtype(dtype).name} T={t} {name}: rel err {rel:.2e}")
        assert np.isfinite(a).all() and rel < tol, name
