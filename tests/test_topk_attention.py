"""Top-k chunk attention: XLA chunked version and chunk selection against dense oracles (CPU)."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import selection_oracle as oracle

import pallas_kernels
from pallas_kernels.topk_attention import plan, select_chunks, topk_chunk_attention_reference
from pallas_kernels.topk_attention.reference import attended_mask
from pallas_kernels.topk_attention.xla_chunked import topk_chunk_attention

B, H, D = 2, 2, 16
TOL = 1e-5
METHODS = ("pairs", "blocks")
# (chunk_size, block_size, pair_tile): one block per chunk, and several blocks per chunk with
# several tiles per chunk (exercises the in-chunk loops and the tile packing).
LAYOUTS = ((8, 512, 256), (16, 8, 4))


def _qkv_shape(shape, seed=0, dtype=jnp.float32):
    keys = jax.random.split(jax.random.PRNGKey(seed), 3)
    return tuple(jax.random.normal(kk, shape, dtype) for kk in keys)


def _qkv(t, seed=0, d=D, dtype=jnp.float32):
    return _qkv_shape((B, t, H, d), seed, dtype)


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


def _cotangent(q):
    return jax.random.normal(jax.random.PRNGKey(7), q.shape, jnp.float32).astype(q.dtype)


def _run(q, k, v, chunk_size, top_k, **config):
    """Output and q/k/v gradients (None if grads=False) for a fixed random cotangent."""
    return _compiled(chunk_size, top_k, **config)(q, k, v, _cotangent(q))


@jax.jit
def _masked_out_and_grads(q, k, v, mask, cotangent):
    out, vjp = jax.vjp(lambda q, k, v: _masked_attention(q, k, v, mask), q, k, v)
    return out, vjp(cotangent)


def _oracle_run(q, k, v, chunk_size, top_k):
    """Output and gradients of dense attention under the independent oracle's mask
    (`selection_oracle`, numpy: shares no selection code with the library)."""
    mask = jnp.asarray(oracle.attended_mask(q, k, chunk_size, top_k))
    return _masked_out_and_grads(q, k, v, mask, _cotangent(q))


# ----------------------------------------------------------------------------- (a), (b) sparse


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("method", METHODS)
def test_sparse_forward_and_grads_match_reference(method, layout):
    chunk_size, block_size, pair_tile = layout
    t, top_k = 77 if chunk_size == 8 else 93, 3  # not multiples of the chunk; T > chunk * top_k
    q, k, v = _qkv(t, seed=chunk_size)
    assert plan.needs_selection(t, chunk_size, top_k)
    assert oracle.decision_margin(q, k, chunk_size, top_k) > 1e-4  # no near tie to flip in fp32
    out, grads = _run(
        q, k, v, chunk_size, top_k, method=method, block_size=block_size, pair_tile=pair_tile
    )
    out_ref, grads_ref = _oracle_run(q, k, v, chunk_size, top_k)
    assert _rel_err(out, oracle.topk_chunk_attention(q, k, v, chunk_size, top_k)[0]) < TOL
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


@pytest.mark.parametrize("select", [select_chunks, oracle.select_chunks], ids=["library", "oracle"])
def test_top_k_beyond_chunk_count_selects_every_earlier_chunk(select):
    t, chunk_size, top_k = 77, 8, 20  # 10 chunks, 19 picks asked
    q, k, _ = _qkv(t)
    picked = np.asarray(select(q, k, chunk_size, top_k))
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


@pytest.mark.parametrize("select", [select_chunks, oracle.select_chunks], ids=["library", "oracle"])
def test_ties_pick_lower_chunk_index(select):
    # Hand-written answers: they check the library and the independent oracle alike.
    q, k, v, chunk_size = _tied_inputs()
    picked = np.asarray(select(q, k, chunk_size, 3))
    # Chunk 3 sees candidates 0, 1, 2 with s0 == s2 > s1; chunk 4 sees 0, 1, 2, 3 with three ties.
    assert (picked[:, 12:16] == [0, 2]).all()
    assert (picked[:, 16:20] == [0, 2]).all()
    picked_one = np.asarray(select(q, k, chunk_size, 2))
    assert (picked_one[:, 12:20] == 0).all()
    assert (picked_one[:, 8:12] == 0).all()  # candidates 0, 1: 0 scores higher anyway
    assert (picked_one[:, :4] == -1).all() and (picked_one[:, 4:8] == 0).all()  # chunks 0, 1


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
    assert _rel_err(oracle.topk_chunk_attention(q, k, v, chunk_size, 2)[0], want) < TOL


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
    # Picks are the best-scoring candidates (the oracle's fp64 scores; the gap guards rounding).
    scores = oracle.candidate_scores(q, k, chunk_size)
    for bi, ti, hi in np.ndindex(B, t, H):
        c = ti // chunk_size
        chosen = [j for j in picked[bi, ti, hi] if j >= 0]
        rest = [j for j in range(c) if j not in chosen]
        assert len(set(chosen)) == len(chosen)
        if chosen and rest:
            assert scores[bi, ti, hi, chosen].min() >= scores[bi, ti, hi, rest].max() - 1e-4


# (B, T, H, chunk_size, top_k, copies): random inputs when copies is None, else dyadic inputs
# (exact scores) whose listed chunks are row-permuted copies of others: exact ties, between
# chunks with different keys at each position.
SELECTION_CASES = {
    "random": (2, 150, 2, 8, 4, None),
    "random-fewer-candidates": (2, 77, 2, 8, 20, None),  # 19 picks asked, at most 9 exist
    "ties": (2, 150, 2, 8, 3, ((1, 3), (1, 6), (2, 9), (4, 12))),
    "ties-one-pick": (1, 150, 3, 8, 2, ((0, 2), (1, 5), (2, 9))),
    "ties-chunk16": (1, 181, 3, 16, 4, ((1, 4), (2, 7), (4, 9))),
}


def _selection_inputs(batch, t, heads, chunk_size, top_k, copies, seed=0):
    shape = (batch, t, heads, D)
    if copies is None:
        q, k, v = (np.asarray(x) for x in _qkv_shape(shape, seed))
        assert oracle.decision_margin(q, k, chunk_size, top_k) > 1e-4  # no near tie in fp32
    else:
        q, k, v = oracle.dyadic_inputs(shape, chunk_size, seed=seed, copies=copies)
        across, within = oracle.count_ties(q, k, chunk_size, top_k)
        # Ties at the top_k-th place (they decide the attended set) and among the picks.
        assert across > 0 and (within > 0 or top_k == 2)
    return q, k, v


@pytest.mark.parametrize("case", SELECTION_CASES.values(), ids=SELECTION_CASES.keys())
def test_select_chunks_matches_independent_oracle(case):
    batch, t, heads, chunk_size, top_k, copies = case
    q, k, _ = _selection_inputs(*case)
    want = oracle.select_chunks(q, k, chunk_size, top_k)
    got = np.asarray(select_chunks(jnp.asarray(q), jnp.asarray(k), chunk_size, top_k))
    assert got.shape == want.shape == (batch, t, heads, top_k - 1)
    # Same chunks in the same order (best first, equal scores lower chunk first), same -1s.
    wrong = np.argwhere((got != want).any(-1))
    assert wrong.size == 0, f"{len(wrong)} queries differ, first (b, t, h) {wrong[0].tolist()}"
    mask = np.asarray(attended_mask(jnp.asarray(q), jnp.asarray(k), chunk_size, top_k))
    np.testing.assert_array_equal(mask, oracle.attended_mask(q, k, chunk_size, top_k))


# ----------------------------------------------------------------------------- sparse parity

# The sparse regime (T not a multiple of the chunk, several heads) for every implementation
# against the independent oracle, random and tied inputs, at each kernel's default block sizes
# (capped to divide the chunk): (B, T, H, chunk_size, top_k, copies for the tied inputs).
# T is 3.8 (chunk16) and 4.9 (chunk8) times chunk * top_k; chunk64 (1.6 times) is there for the
# block sizes.
PARITY_CASES = {
    "chunk16": (2, 181, 3, 16, 3, ((1, 4), (2, 7), (4, 9))),
    # The GPU kernel needs chunks of a multiple of 16 when T > chunk * top_k (its blocks are).
    "chunk8": (1, 117, 3, 8, 3, ((1, 4), (2, 7), (4, 9))),
    # Chunks of 64: the GPU kernel's default 64 x 64 blocks and tiles of 64 are really used.
    "chunk64": (1, 200, 2, 64, 2, ((0, 2),)),
}
PARITY_RUNS = [
    ("chunk16", "reference"),
    ("chunk16", "xla_chunked"),
    ("chunk16", "xla_chunked-blocks"),
    ("chunk16", "pallas_gpu"),
    ("chunk16", "pallas_tpu"),
    ("chunk8", "reference"),
    ("chunk8", "xla_chunked"),
    ("chunk8", "pallas_tpu"),
    ("chunk64", "pallas_gpu"),
    ("chunk64", "pallas_tpu"),
]


@functools.cache
def _entry(backend, chunk_size, top_k):
    """Jitted (q, k, v) -> (o, lse or None) through the public entry `topk_chunk_attention`."""
    if backend == "xla_chunked-blocks":  # the entry runs "pairs"; "blocks" is the other method
        fn = functools.partial(topk_chunk_attention, method="blocks", block_size=8, pair_tile=8)
        return jax.jit(
            lambda q, k, v: fn(q, k, v, chunk_size=chunk_size, top_k=top_k, return_lse=True)
        )
    options = {"chunk_size": chunk_size, "topk": top_k, "backend": backend, "interpret": True}
    if backend == "reference":  # no lse
        return jax.jit(
            lambda q, k, v: (pallas_kernels.topk_chunk_attention(q, k, v, **options), None)
        )
    return jax.jit(
        lambda q, k, v: pallas_kernels.topk_chunk_attention(q, k, v, **options, return_lse=True)
    )


@pytest.mark.parametrize("case, backend", PARITY_RUNS, ids=[f"{c}-{b}" for c, b in PARITY_RUNS])
def test_sparse_regime_matches_independent_oracle(case, backend):
    batch, t, heads, chunk_size, top_k, copies = PARITY_CASES[case]
    assert t > chunk_size * top_k and t % chunk_size and plan.needs_selection(t, chunk_size, top_k)
    attention = _entry(backend, chunk_size, top_k)
    for tied in (False, True):  # random inputs, then exact ties at the top_k-th place
        q, k, v = _selection_inputs(batch, t, heads, chunk_size, top_k, copies if tied else None)
        o_ref, lse_ref = oracle.topk_chunk_attention(q, k, v, chunk_size, top_k)
        dense = oracle.masked_attention(q, k, v, np.tri(t, dtype=bool))[0]
        assert _rel_err(dense, o_ref) > 1e-2  # the selection really drops keys here
        o, lse = attention(q, k, v)
        assert o.shape == q.shape and o.dtype == jnp.float32
        assert _rel_err(o, o_ref) < TOL, f"o, tied={tied}"
        if lse is not None:
            assert _rel_err(lse, lse_ref) < TOL, f"lse, tied={tied}"


@pytest.mark.parametrize("backend", ["xla_chunked", "pallas_gpu", "pallas_tpu"])
def test_model_attention_path_matches_independent_oracle(backend, interpreted_kernels):
    """`rwkvx_jax.ops.topk_chunk_attention`, the call the model's sparse block makes (Pallas
    kernels in interpret mode through the conftest fixture), on the tied sparse inputs."""
    from rwkvx_jax import ops

    batch, t, heads, chunk_size, top_k, copies = PARITY_CASES["chunk16"]
    q, k, v = _selection_inputs(batch, t, heads, chunk_size, top_k, copies)
    attention = functools.partial(
        ops.topk_chunk_attention, chunk_size=chunk_size, top_k=top_k, backend=backend
    )
    o = jax.jit(attention)(q, k, v)
    assert _rel_err(o, oracle.topk_chunk_attention(q, k, v, chunk_size, top_k)[0]) < TOL
    kernel = backend.removeprefix("pallas_")
    assert interpreted_kernels == ([] if kernel == backend else [f"topk_chunk_attention_{kernel}"])


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
    mask = jnp.asarray(oracle.attended_mask(q, k, chunk_size, top_k))

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
    assert oracle.decision_margin(*f32[:2], chunk_size, top_k) > 1e-4
    ref = oracle.topk_chunk_attention(*f32, chunk_size, top_k)[0]
    assert _rel_err(out.astype(jnp.float32), ref) < 1e-2


def test_head_dim_64_uses_scale_one_eighth():
    t = 20
    q, k, v = _qkv(t, seed=51, d=64)
    out = _run(q, k, v, 8, 2, grads=False)[0]
    s = jnp.einsum("bqhd,bkhd->bhqk", q, k) * 0.125
    mask = oracle.attended_mask(q, k, 8, 2)
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
