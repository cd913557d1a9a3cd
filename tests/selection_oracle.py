"""An independent oracle for top-k chunk attention (SPEC §4), in plain numpy.

Written from SPEC §4 alone and sharing no code with `pallas_kernels` or `rwkvx_jax`, so a
selection bug in the library's `select_chunks` (which every implementation and the library's
own dense oracle call) cannot hide by being on both sides of a comparison:

- positions split into chunks of `chunk_size` aligned at position 0;
- a query t in chunk c may pick among the complete chunks j < c (every chunk before the
  query's own is complete), scored by `q_t . mean(k over chunk j)`, unscaled;
- it attends causally inside its own chunk (always) plus every key of the top (top_k - 1)
  candidates, all of them when there are fewer; ties go to the lower chunk index;
- one softmax over the union of those keys, logits scaled by 1 / sqrt(D) (SPEC's 1/8 for its
  heads of 64; the library uses 1 / sqrt(D) for every D).

Everything is computed in float64. SPEC asks for fp32 scores: on inputs whose scores are exact
in fp32 (small dyadic numbers, `dyadic_inputs`) both agree bit for bit, ties included; on random
inputs use `decision_margin` to check that no choice is closer than fp32 rounding.
"""

from __future__ import annotations

import numpy as np


def _as64(x) -> np.ndarray:
    return np.asarray(x, dtype=np.float64)


def chunk_means(k, chunk_size: int) -> np.ndarray:
    """Mean key of every complete chunk: [B, T, H, D] -> float64 [B, T // chunk_size, H, D]."""
    k = _as64(k)
    b, t, h, d = k.shape
    n_complete = t // chunk_size
    blocks = k[:, : n_complete * chunk_size].reshape(b, n_complete, chunk_size, h, d)
    return blocks.sum(axis=2) / chunk_size


def candidate_scores(q, k, chunk_size: int) -> np.ndarray:
    """Gate scores q_t . mean_j, float64 [B, T, H, nC]; -inf where j is not a candidate of t.

    nC = T // chunk_size complete chunks; chunk j is a candidate of query t when j < t // chunk.
    """
    means = chunk_means(k, chunk_size)
    scores = np.einsum("bthd,bjhd->bthj", _as64(q), means)
    own = np.arange(_as64(q).shape[1]) // chunk_size
    candidate = np.arange(means.shape[1])[None, :] < own[:, None]  # [T, nC]
    return np.where(candidate[None, :, None, :], scores, -np.inf)


def select_chunks(q, k, chunk_size: int, top_k: int) -> np.ndarray:
    """Chunks each query attends besides its own: int64 [B, T, H, top_k - 1], best first.

    Candidates are ordered by score, highest first, equal scores lower chunk index first (a
    stable sort of the negated scores keeps index order among equals); missing picks are -1.
    """
    n_pick = top_k - 1
    scores = candidate_scores(q, k, chunk_size)
    b, t, h, n_chunks = scores.shape
    order = np.argsort(-scores, axis=-1, kind="stable")  # -(-inf) = inf: non-candidates last
    n_candidates = np.minimum(np.arange(t) // chunk_size, n_chunks)[None, :, None, None]
    picks = np.full((b, t, h, n_pick), -1, np.int64)
    width = min(n_pick, n_chunks)
    keep = np.arange(width) < n_candidates
    picks[..., :width] = np.where(keep, order[..., :width], -1)
    return picks


def decision_margin(q, k, chunk_size: int, top_k: int) -> float:
    """Smallest nonzero gap between a query's last chosen score and its best rejected one.

    Exact ties (gap 0, see `count_ties`) are left out: they are exact in fp32 too only when the
    inputs make them so (`dyadic_inputs`, copied chunks). inf means no query had to reject a
    candidate. On random inputs a margin far above fp32 rounding means an fp32 implementation
    must make the same choices as this float64 oracle.
    """
    n_pick = top_k - 1
    scores = candidate_scores(q, k, chunk_size)
    if n_pick == 0 or n_pick >= scores.shape[-1]:
        return float("inf")
    ranked = -np.sort(-scores, axis=-1)  # descending
    last, first_rejected = ranked[..., n_pick - 1], ranked[..., n_pick]
    contested = np.isfinite(first_rejected)
    gaps = last[contested] - first_rejected[contested]
    gaps = gaps[gaps > 0]
    return float(gaps.min()) if gaps.size else float("inf")


def count_ties(q, k, chunk_size: int, top_k: int) -> tuple[int, int]:
    """(queries with an exact tie across the top_k-th place, queries with a tie among picks).

    A tie across the place decides which chunks are attended; one among the picks only their
    order. Tests use it to show their inputs exercise the tie rule.
    """
    n_pick = top_k - 1
    ranked = -np.sort(-candidate_scores(q, k, chunk_size), axis=-1)
    if n_pick == 0 or ranked.shape[-1] == 0:
        return 0, 0
    finite = np.isfinite(ranked)
    across = 0
    if n_pick < ranked.shape[-1]:
        at_place = finite[..., n_pick] & (ranked[..., n_pick - 1] == ranked[..., n_pick])
        across = int(at_place.sum())
    head = ranked[..., : min(n_pick, ranked.shape[-1])]
    within = (head[..., 1:] == head[..., :-1]) & np.isfinite(head[..., 1:])
    return across, int(within.any(axis=-1).sum())


def attended_mask(q, k, chunk_size: int, top_k: int) -> np.ndarray:
    """bool [B, H, T(query), T(key)]: own chunk causally, plus every key of each picked chunk."""
    picks = select_chunks(q, k, chunk_size, top_k)  # [B, T, H, P]
    b, t, h, _ = picks.shape
    pos = np.arange(t)
    chunk_of = pos // chunk_size
    own = (chunk_of[:, None] == chunk_of[None, :]) & (pos[None, :] <= pos[:, None])
    mask = np.broadcast_to(own, (b, h, t, t)).copy()
    for bi, ti, hi in np.ndindex(b, t, h):
        for j in picks[bi, ti, hi]:
            if j >= 0:
                mask[bi, hi, ti, j * chunk_size : (j + 1) * chunk_size] = True
    return mask


def masked_attention(q, k, v, mask) -> tuple[np.ndarray, np.ndarray]:
    """float64 softmax attention under a [B, H, T, T] (or [T, T]) mask, scale 1 / sqrt(D).

    Returns (o [B, T, H, D], lse [B, T, H]); every row must keep at least one key.
    """
    q, k, v = _as64(q), _as64(k), _as64(v)
    logits = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(q.shape[-1])
    logits = np.where(mask, logits, -np.inf)
    top = logits.max(axis=-1, keepdims=True)
    weights = np.exp(logits - top)
    total = weights.sum(axis=-1, keepdims=True)
    o = np.einsum("bhqk,bkhd->bqhd", weights / total, v)
    lse = (top + np.log(total))[..., 0]  # [B, H, T]
    return o, np.swapaxes(lse, 1, 2)


def topk_chunk_attention(q, k, v, chunk_size: int, top_k: int) -> tuple[np.ndarray, np.ndarray]:
    """SPEC §4 top-k chunk attention: (o [B, T, H, D], lse [B, T, H]), float64."""
    return masked_attention(q, k, v, attended_mask(q, k, chunk_size, top_k))


def dyadic_inputs(shape, chunk_size: int, *, seed: int, copies=()) -> tuple[np.ndarray, ...]:
    """float32 q, k, v of `shape` [B, T, H, D] whose gate scores are exact in fp32.

    q and k are multiples of 1/4 in [-1.5, 1.5]; with a power-of-two chunk_size every chunk
    mean and every score is exact in fp32 (and float64), so equal scores are equal bitwise in
    any summation order. `copies` is a sequence of (source, target) chunk pairs: chunk `target`
    gets a row permutation of chunk `source`'s keys (same mean, so an exact tie, but different
    keys at each position, and its own values), so a wrong tie-break changes the output. v is
    standard normal.
    """
    assert chunk_size & (chunk_size - 1) == 0, "power-of-two chunks keep the means exact"
    rng = np.random.default_rng(seed)
    q = rng.integers(-6, 7, size=shape) / 4
    k = rng.integers(-6, 7, size=shape) / 4
    v = rng.standard_normal(shape)
    for source, target in copies:
        rows = k[:, source * chunk_size : (source + 1) * chunk_size]
        perm = rng.permutation(chunk_size)
        while chunk_size > 1 and (perm == np.arange(chunk_size)).all():
            perm = rng.permutation(chunk_size)
        k[:, target * chunk_size : (target + 1) * chunk_size] = rows[:, perm]
    return tuple(x.astype(np.float32) for x in (q, k, v))
