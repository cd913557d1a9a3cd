"""Top-k chunk attention: XLA chunked version and chunk selection against dense oracles (CPU)."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.topk_attention import plan, select_chunks, topk_chunk_attention_reference
from pallas_kernels.topk_attention.reference import attended_mask
from pallas_kernels.topk_attention.xla_chunked import topk_chunk_attention

B, H, D = 2, 2, 16
TOL = 1e-5
METHODS = ("pairs", "blocks")
# (chunk_size, block_size, pair_tile): one block per chunk, and several blocks per chunk with
# several tiles per chunk (exercises the in-chunk loops and the tile packing).
LAYOUTS = ((8, 512, 256), (16, 8, 4))


def _qkv(t, seed=0, d=D, dtype=jnp.float32):
    keys = jax.random.split(jax.random.PRNGKey(seed), 3)
    return tuple(jax.random.normal(kk, (B, t, H, d), dtype) for kk in keys)


def _rel_err(x, ref):
    return float(jnp.abs(x - ref).max() / jnp.abs(ref).max())


@jax.jit
def _masked_attention(q, k, v, mask):
    """Dense fp32 attention under an explicit [T, T] or [B, H, T, T] boolean mask."""
    s = jnp.einsum("bqhd,bkhd->bhqk", q, k, precision="highest") / math.sqrt(q.shape[-1])
    p = jax.nn.softmax(jnp.where(mask, s, -jnp.inf), axis=-1)
    return jnp.einsum("bhqk,bkhd->bqhd", p, v, precision="highest")


def _causal_mask(t):
    return jnp.tril(jnp.ones((t, t), bool))


def _own_chunk_causal_mask(t, chunk_size):
    chunk = jnp.arange(t) // chunk_size
    return _causal_mask(t) & (chunk[:, None] == chunk[None, :])


@functools.cache
def _compiled(
    chunk_size, top_k, method="pairs", block_size=512, pair_tile=256, reference=False, grads=True
):
    """One jitted (q, k, v, cotangent) -> (out, (dq, dk, dv) or None) per configuration.

    Cached so tests sharing a configuration share one compilation (XLA compilation dominates
    the runtime of these small shapes); grads=False compiles the forward only.
    """
    if reference:
        fn = functools.partial(topk_chunk_attention_reference, chunk_size=chunk_size, top_k=top_k)
    else:
        fn = functools.partial(
            topk_chunk_attention,
            chunk_size=chunk_size,
            top_k=top_k,
            method=method,
            block_size=block_size,
            pair_tile=pair_tile,
        )

    @jax.jit
    def out_and_grads(q, k, v, cotangent):
        if not grads:
            return fn(q, k, v), None
        out, vjp = jax.vjp(fn, q, k, v)
        return out, vjp(cotangent)

    return out_and_grads


def _run(q, k, v, chunk_size, top_k, **config):
    """Output and q/k/v gradients (None if grads=False) for a fixed random cotangent."""
    cotangent = jax.random.normal(jax.random.PRNGKey(7), q.shape, jnp.float32).astype(q.dtype)
    return _compiled(chunk_size, top_k, **config)(q, k, v, cotangent)


# ----------------------------------------------------------------------------- (a), (b) sparse


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("method", METHODS)
def test_sparse_forward_and_grads_match_reference(method, layout):
    chunk_size, block_size, pair_tile = layout
    t, top_k = 77 if chunk_size == 8 else 93, 3  # not multiples of the chunk; T > chunk * top_k
    q, k, v = _qkv(t, seed=chunk_size)
    assert plan.needs_selection(t, chunk_size, top_k)
    out, grads = _run(
        q, k, v, chunk_size, top_k, method=method, block_size=block_size, pair_tile=pair_tile
    )
    out_ref, grads_ref = _run(q, k, v, chunk_size, top_k, reference=True)
    assert _rel_err(out, out_ref) < TOL
    # The sparse mask must actually drop keys here, or this test would not test selection.
    dense = _masked_attention(q, k, v, _causal_mask(t))
    assert _rel_err(out_ref, dense) > 1e-2
    for name, g, g_ref in zip("qkv", grads, grads_ref, strict=True):
        assert _rel_err(g, g_ref) < TOL, name


# ----------------------------------------------------------------------------- (c), (d), (e)


@pytest.mark.parametrize(
    "t, chunk_size, top_k",
    [(48, 16, 3), (77, 8, 20), (5, 8, 3)],  # T == chunk * top_k, top_k > nC (partial), T < chunk
)
def test_short_sequences_equal_dense_causal(t, chunk_size, top_k):
    q, k, v = _qkv(t, seed=t)
    assert plan.is_dense_causal(t, chunk_size, top_k)
    dense_out, dense_vjp = jax.vjp(
        lambda q, k, v: _masked_attention(q, k, v, _causal_mask(t)), q, k, v
    )
    out, grads = _run(q, k, v, chunk_size, top_k)
    out_ref, _ = _run(q, k, v, chunk_size, top_k, reference=True, grads=False)
    assert _rel_err(out, dense_out) < TOL
    assert _rel_err(out_ref, dense_out) < TOL
    cotangent = jax.random.normal(jax.random.PRNGKey(7), q.shape)
    for g, g_dense in zip(grads, dense_vjp(cotangent), strict=True):
        assert _rel_err(g, g_dense) < TOL


def test_top_k_beyond_chunk_count_selects_every_earlier_chunk():
    t, chunk_size, top_k = 77, 8, 20  # 10 chunks, 19 picks asked
    q, k, _ = _qkv(t)
    picked = np.asarray(select_chunks(q, k, chunk_size, top_k))
    own = np.arange(t) // chunk_size
    for pos in (0, 8, 40, 76):
        got = picked[:, pos]  # [B, H, 19]
        want = set(range(own[pos]))
        for row in got.reshape(-1, top_k - 1):
            assert set(row[row >= 0].tolist()) == want
            assert (row[len(want) :] == -1).all()


def test_top_k_one_is_own_chunk_causal():
    t, chunk_size = 77, 8
    q, k, v = _qkv(t, seed=3)
    assert not plan.is_dense_causal(t, chunk_size, 1) and not plan.needs_selection(t, chunk_size, 1)
    want = _masked_attention(q, k, v, _own_chunk_causal_mask(t, chunk_size))
    assert select_chunks(q, k, chunk_size, 1).shape == (B, t, H, 0)
    assert _rel_err(_run(q, k, v, chunk_size, 1, grads=False)[0], want) < TOL
    assert _rel_err(_run(q, k, v, chunk_size, 1, reference=True, grads=False)[0], want) < TOL


# ----------------------------------------------------------------------------- (f) ties


def _tied_inputs():
    """Chunks of 4; chunks 0, 2, 3 hold identical keys, chunk 1 scores lower. Values differ.

    Small integers keep every mean and score exact in fp32, so the ties are exact.
    """
    chunk_size, n_chunks = 4, 5
    t = chunk_size * n_chunks
    base = np.array([[1, 0, 2, 1], [3, 1, 0, 1], [1, 1, 1, 0], [0, 2, 1, 1]], np.float32)
    keys = np.tile(base, (n_chunks, 1))  # [T, 4]
    keys[chunk_size : 2 * chunk_size] = -base  # chunk 1: negated mean, scores lower
    k = np.broadcast_to(keys[None, :, None, :], (B, t, H, 4)).copy()
    q = np.ones((B, t, H, 4), np.float32)  # score = sum(mean key) > 0 for chunks 0, 2, 3
    v = np.asarray(jax.random.normal(jax.random.PRNGKey(5), (B, t, H, 4)))
    return jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), chunk_size


def test_ties_pick_lower_chunk_index():
    q, k, v, chunk_size = _tied_inputs()
    picked = np.asarray(select_chunks(q, k, chunk_size, top_k=3))
    # Chunk 3 sees candidates 0, 1, 2 with s0 == s2 > s1; chunk 4 sees 0, 1, 2, 3 with three ties.
    assert (picked[:, 12:16] == [0, 2]).all()
    assert (picked[:, 16:20] == [0, 2]).all()
    picked_one = np.asarray(select_chunks(q, k, chunk_size, top_k=2))
    assert (picked_one[:, 12:20] == 0).all()
    assert (picked_one[:, 8:12] == 0).all()  # candidates 0, 1: 0 scores higher anyway


@pytest.mark.parametrize("method", METHODS)
def test_ties_attention_uses_lower_chunk(method):
    q, k, v, chunk_size = _tied_inputs()
    t = q.shape[1]
    # Expected mask written by hand: own chunk causal, plus chunk 0 for queries in chunks >= 1.
    chunk = np.arange(t) // chunk_size
    mask = np.asarray(_own_chunk_causal_mask(t, chunk_size)) | (
        (chunk[:, None] >= 1) & (chunk[None, :] == 0)
    )
    want = _masked_attention(q, k, v, jnp.asarray(mask))
    assert (
        _rel_err(_run(q, k, v, chunk_size, 2, method=method, pair_tile=2, grads=False)[0], want)
        < TOL
    )
    assert _rel_err(_run(q, k, v, chunk_size, 2, reference=True, grads=False)[0], want) < TOL


# ----------------------------------------------------------------------------- (g) selection


def test_select_chunks_only_earlier_chunks_and_best_scores():
    t, chunk_size, top_k = 77, 8, 4
    q, k, _ = _qkv(t, seed=11)
    picked = np.asarray(select_chunks(q, k, chunk_size, top_k))
    assert picked.shape == (B, t, H, top_k - 1) and picked.dtype == np.int32
    own = (np.arange(t) // chunk_size)[None, :, None, None]
    valid = picked >= 0
    assert (picked[valid] < np.broadcast_to(own, picked.shape)[valid]).all()
    assert (picked[~valid] == -1).all()
    # Exactly min(own chunk, top_k - 1) picks, valid ones first, all distinct.
    n_valid = valid.sum(-1)
    assert (n_valid == np.minimum(own[..., 0], top_k - 1)).all()
    assert (np.diff(valid.astype(int), axis=-1) <= 0).all()
    # Picks are the best-scoring candidates (fp64 scores; the gap guards rounding).
    qn, kn = np.asarray(q, np.float64), np.asarray(k, np.float64)
    n_chunks = -(-t // chunk_size)
    means = np.stack(
        [kn[:, j * chunk_size : (j + 1) * chunk_size].mean(1) for j in range(n_chunks)], 1
    )
    scores = np.einsum("bthd,bjhd->bthj", qn, means)
    for bi, ti, hi in np.ndindex(B, t, H):
        c = ti // chunk_size
        chosen = [j for j in picked[bi, ti, hi] if j >= 0]
        rest = [j for j in range(c) if j not in chosen]
        assert len(set(chosen)) == len(chosen)
        if chosen and rest:
            assert scores[bi, ti, hi, chosen].min() >= scores[bi, ti, hi, rest].max() - 1e-4


# ----------------------------------------------------------------------------- (h) causality


@pytest.mark.parametrize("method", METHODS)
def test_future_tokens_do_not_change_past_outputs(method):
    t, chunk_size, top_k, cut = 77, 8, 3, 45  # cut inside chunk 5; same config as LAYOUTS[0]
    q, k, v = _qkv(t, seed=21)
    out, _ = _run(q, k, v, chunk_size, top_k, method=method, grads=False)
    noise = _qkv(t, seed=22)
    future = (jnp.arange(t) >= cut)[None, :, None, None]
    q2, k2, v2 = (jnp.where(future, n * 3.0, x) for x, n in zip((q, k, v), noise, strict=True))
    out2, _ = _run(q2, k2, v2, chunk_size, top_k, method=method, grads=False)
    assert float(jnp.abs(out2[:, :cut] - out[:, :cut]).max()) <= 1e-6
    assert float(jnp.abs(out2[:, cut:] - out[:, cut:]).max()) > 1e-2  # the perturbation matters


def test_shorter_sequence_gives_the_prefix():
    # T = 45 pads differently from T = 77 (partial chunk 5 is last): padding must not leak.
    t, chunk_size, top_k, cut = 77, 8, 3, 45
    q, k, v = _qkv(t, seed=21)
    out, _ = _run(q, k, v, chunk_size, top_k, grads=False)
    out_short, _ = _run(q[:, :cut], k[:, :cut], v[:, :cut], chunk_size, top_k, grads=False)
    assert float(jnp.abs(out_short - out[:, :cut]).max()) <= 1e-6


# ----------------------------------------------------------------------------- extras


def test_lse_and_its_gradient_match_dense():
    t, chunk_size, top_k = 77, 8, 3
    q, k, v = _qkv(t, seed=31)
    mask = attended_mask(q, k, chunk_size, top_k)

    def dense_lse(q, k):
        s = jnp.einsum("bqhd,bkhd->bhqk", q, k, precision="highest") / math.sqrt(D)
        return jnp.swapaxes(jax.nn.logsumexp(jnp.where(mask, s, -jnp.inf), axis=-1), 1, 2)

    def fast_lse(q, k):
        return topk_chunk_attention(q, k, v, chunk_size=chunk_size, top_k=top_k, return_lse=True)[1]

    @jax.jit
    def values_and_grads(q, k, cotangent):
        (lse, vjp), (lse_ref, vjp_ref) = jax.vjp(fast_lse, q, k), jax.vjp(dense_lse, q, k)
        return lse, lse_ref, vjp(cotangent), vjp_ref(cotangent)

    cotangent = jax.random.normal(jax.random.PRNGKey(3), (B, t, H))
    lse, lse_ref, grads, grads_ref = values_and_grads(q, k, cotangent)
    assert lse.shape == (B, t, H)
    assert _rel_err(lse, lse_ref) < TOL
    for g, g_ref in zip(grads, grads_ref, strict=True):
        assert _rel_err(g, g_ref) < TOL


def test_bf16_inputs_give_bf16_output_close_to_fp32():
    t, chunk_size, top_k = 77, 8, 3
    q, k, v = _qkv(t, seed=41, dtype=jnp.bfloat16)
    out = _run(q, k, v, chunk_size, top_k, grads=False)[0]
    assert out.dtype == jnp.bfloat16
    f32 = tuple(x.astype(jnp.float32) for x in (q, k, v))
    ref = _run(*f32, chunk_size, top_k, reference=True, grads=False)[0]
    assert _rel_err(out.astype(jnp.float32), ref) < 1e-2


def test_head_dim_64_uses_scale_one_eighth():
    t = 20
    q, k, v = _qkv(t, seed=51, d=64)
    out = _run(q, k, v, 8, 2, grads=False)[0]
    s = jnp.einsum("bqhd,bkhd->bhqk", q, k) * 0.125
    mask = attended_mask(q, k, 8, 2)
    want = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(jnp.where(mask, s, -jnp.inf), -1), v)
    assert _rel_err(out, want) < TOL


# ----------------------------------------------------------------------------- (i) arguments


@pytest.mark.parametrize(
    "fn",
    [
        lambda q, k, v, **kw: topk_chunk_attention(q, k, v, **kw),
        lambda q, k, v, **kw: topk_chunk_attention_reference(q, k, v, **kw),
        lambda q, k, v, **kw: select_chunks(q, k, kw["chunk_size"], kw["top_k"]),
    ],
    ids=["xla", "reference", "select"],
)
def test_bad_arguments_raise_value_error(fn):
    q, k, v = _qkv(16)
    with pytest.raises(ValueError, match="chunk_size"):
        fn(q, k, v, chunk_size=0, top_k=3)
    with pytest.raises(ValueError, match="chunk_size"):
        fn(q, k, v, chunk_size=-8, top_k=3)
    with pytest.raises(ValueError, match="chunk_size"):
        fn(q, k, v, chunk_size=8.0, top_k=3)
    with pytest.raises(ValueError, match="top_k"):
        fn(q, k, v, chunk_size=8, top_k=0)
    with pytest.raises(ValueError, match="shape mismatch"):
        fn(q, k[:, :8], v[:, :8], chunk_size=8, top_k=3)
    with pytest.raises(ValueError, match=r"\[B, T, H, D\]"):
        fn(q[0], k[0], v[0], chunk_size=8, top_k=3)


def test_bad_method_raises_value_error():
    q, k, v = _qkv(16)
    with pytest.raises(ValueError, match="method"):
        topk_chunk_attention(q, k, v, chunk_size=8, top_k=3, method="gather")
