"""Backend dispatch for the two kernels the model needs: WKV-7 and top-k chunk attention.

Model code calls only these two functions; which implementation runs is decided here from the
config's backend names, so kernels can change without touching the model.
"""

from __future__ import annotations

from pallas_kernels.backends import resolve_backend as _platform_backend
from pallas_kernels.topk_attention import topk_chunk_attention as _topk_attention
from pallas_kernels.topk_attention import topk_chunk_attention_reference as _topk_reference
from pallas_kernels.wkv7 import wkv7 as _wkv7
from pallas_kernels.wkv7 import wkv7_reference as _wkv7_reference
from pallas_kernels.wkv7.xla_chunked import DEFAULT_CHUNK_SIZE

# Config backend name -> `pallas_kernels` backend name.
_KERNEL_BACKEND = {"xla_chunked": "xla", "pallas_tpu": "tpu", "pallas_gpu": "gpu"}
_FROM_PLATFORM = {"xla": "xla_chunked", "tpu": "pallas_tpu", "gpu": "pallas_gpu"}
BACKENDS = ("auto", "reference", *_KERNEL_BACKEND)


def resolve_backend(name: str) -> str:
    """Maps "auto" to the implementation for the default device's platform.

    TPU -> "pallas_tpu", GPU -> "pallas_gpu", anything else (CPU) -> "xla_chunked".
    """
    if name not in BACKENDS:
        raise ValueError(f"unknown kernel backend {name!r}; expected one of {BACKENDS}")
    if name != "auto":
        return name
    return _FROM_PLATFORM[_platform_backend("auto", kernel="rwkvx_jax.ops")]


def wkv7(
    r, w, k, v, a, b, state=None, *, backend: str = "auto", chunk_size: int = DEFAULT_CHUNK_SIZE
):
    """WKV-7 recurrence; see `pallas_kernels.wkv7.wkv7_reference` for the maths.

    Args:
      r, w, k, v, a, b: [B, T, H, N]; w is the log-decay (<= 0).
      state: optional [B, H, N, N] fp32 initial state (rows: value dims, columns: key dims).
      backend: "auto", "reference", "xla_chunked", "pallas_tpu" or "pallas_gpu".
      chunk_size: chunk length of the chunked XLA form (the Pallas kernels use their own).

    Returns:
      (y [B, T, H, N] fp32, final_state [B, H, N, N] fp32).
    """
    backend = resolve_backend(backend)
    if backend == "reference":
        return _wkv7_reference(r, w, k, v, a, b, state)
    kernel_backend = _KERNEL_BACKEND[backend]
    chunk = chunk_size if kernel_backend == "xla" else None
    return _wkv7(r, w, k, v, a, b, state, backend=kernel_backend, chunk_size=chunk)


def topk_chunk_attention(q, k, v, *, chunk_size: int, top_k: int, backend: str = "auto"):
    """Top-k chunk sparse attention with the training semantics of SPEC §4.

    Args:
      q, k, v: [B, T, H, D].
      chunk_size: chunk length; top_k: chunks attended per query, its own included.
      backend: "auto", "reference" (dense masked, O(T^2) memory), "xla_chunked",
        "pallas_tpu" or "pallas_gpu".

    Returns:
      o: [B, T, H, D] in q's dtype.
    """
    backend = resolve_backend(backend)
    if backend == "reference":
        return _topk_reference(q, k, v, chunk_size=chunk_size, top_k=top_k)
    return _topk_attention(
        q, k, v, chunk_size=chunk_size, topk=top_k, backend=_KERNEL_BACKEND[backend]
    )
