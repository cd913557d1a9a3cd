"""`topk_chunk_attention`: the public entry, choosing the TPU, GPU, pure-JAX or reference form."""

from __future__ import annotations

from pallas_kernels.backends import Backend, resolve_backend
from pallas_kernels.topk_attention.reference import topk_chunk_attention_reference
from pallas_kernels.topk_attention.xla_chunked import topk_chunk_attention as _xla_attention


def topk_chunk_attention(
    q, k, v, *, chunk_size, topk, backend="auto", interpret=False, return_lse=False
):
    """Top-k chunk sparse attention with the training semantics of SPEC §4.

    Each query attends causally within its own chunk (chunks of `chunk_size` aligned at 0) and
    to every key of the `topk - 1` earlier complete chunks whose mean key scores highest
    against it (fp32, unscaled, ties to the lower chunk; the selection is not differentiated).
    Work is exact-cost on every backend: about T * (chunk_size / 2 + (topk - 1) * chunk_size)
    query-key products per head, not T^2 / 2.

    Args:
      q, k, v: [B, T, H, D] (batch, time, head, head size), float32 or bfloat16; any T.
      chunk_size: chunk length.
      topk: chunks attended per query, its own included (>= 1).
      backend: a `pallas_kernels.backends.Backend` name: "auto" (the Pallas kernel on a TPU or
        GPU, "xla_chunked" elsewhere), "pallas_tpu", "pallas_gpu", "xla_chunked" (the pure-JAX
        exact-cost version) or "reference" (dense masked attention, O(T^2) memory).
      interpret: run a Pallas kernel in interpret mode (CPU testing); for "pallas_tpu" this may
        also be a `jax.experimental.pallas.tpu.InterpretParams`. Ignored by the others.
      return_lse: also return the float32 log-sum-exp of each query's logits, [B, T, H] (not
        with "reference").

    Returns:
      o [B, T, H, D] in q's dtype, or (o, lse) when return_lse. Differentiable in q, k, v.
    """
    backend = resolve_backend(backend, what="topk_chunk_attention")
    if backend == Backend.REFERENCE:
        if return_lse:
            raise ValueError("topk_chunk_attention: the reference backend returns no lse")
        return topk_chunk_attention_reference(q, k, v, chunk_size=chunk_size, top_k=topk)
    options = {"chunk_size": chunk_size, "top_k": topk, "return_lse": return_lse}
    if backend == Backend.XLA_CHUNKED:
        return _xla_attention(q, k, v, **options)
    if backend == Backend.PALLAS_GPU:
        from pallas_kernels.topk_attention.gpu import topk_chunk_attention_gpu

        return topk_chunk_attention_gpu(q, k, v, interpret=interpret, **options)
    from pallas_kernels.topk_attention.tpu import topk_chunk_attention_tpu

    return topk_chunk_attention_tpu(q, k, v, interpret=interpret, **options)
