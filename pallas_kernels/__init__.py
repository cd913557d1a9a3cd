"""Kernels for RWKV-X: WKV-7 recurrence and top-k chunk sparse attention (reference, XLA, Pallas).

Public entry points (each picks its implementation with `backend=`, a `backends.Backend` name:
"auto", "pallas_tpu", "pallas_gpu", "xla_chunked" or "reference"):
  `pallas_kernels.wkv7(r, w, k, v, a, b, state=None, *, backend, interpret)` and
  `pallas_kernels.topk_chunk_attention(q, k, v, *, chunk_size, topk, backend, interpret)`.

This package never imports `rwkvx_jax`; the model reaches it through `rwkvx_jax.ops`.
"""

from pallas_kernels import wkv7
from pallas_kernels.topk_attention import topk_chunk_attention

__all__ = ["topk_chunk_attention", "wkv7"]
