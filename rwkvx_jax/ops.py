"""Backend dispatch for the two kernels the model needs: WKV-7 and top-k chunk attention.

Model code calls only these two functions; which implementation runs is decided here from the
config's backend names, so kernels can change without touching the model.
"""

from __future__ import annotations

from pallas_kernels.topk_attention import topk_chunk_attention as _topk_chunked
from pallas_kernels.topk_attention import topk_chunk_attention_reference as _topk_reference
from pallas_kernels.wkv7 import wkv7_chunked as _wkv7_chunked
from pallas_kernels.wkv7 import wkv7_reference as _wkv7_reference
from pallas_kernels.wkv7.xla_chunked import DEFAULT_CHUNK_SIZE


def resolve_backend(name: str) -> str:
    """Maps "auto" to the implementation for the current default platform."""
    if name != "auto":
        return name
    # Every platform uses the chunked pure-JAX path until Pallas kernels are registered here.
    return "xla_chunked"


def wkv7(
    r, w, k, v, a, b, state=None, *, backend: str = "auto", chunk_size: int = DEFAULT_CHUNK_SIZE
):
    """WKV-7 recurrence; see `pallas_kernels.wkv7.wkv7_reference` for the maths.

    Args:
      r, w, k, v, a, b: [B, T, H, N]; w is the log-decay (<= 0).
      state: optional [B, H, N, N] fp32 initial state (rows: value dims, columns: key dims).
      backend: "auto", "reference" or "xla_chunked".
      chunk_size: chunk length of the chunked form.

    Returns:
      (y [B, T, H, N] fp32, final_state [B, H, N, N] fp32).
    """
    backend = resolve_backend(backend)
    if backend == "reference":
        return _wkv7_reference(r, w, k, v, a, b, state)
    if backend == "xla_chunked":
        return _wkv7_chunked(r, w, k, v, a, b, state, chunk_size=chunk_size)
    raise ValueError(f"unknown wkv backend {backend!r}; expected 'reference' or 'xla_chunked'")


def topk_chunk_attention(q, k, v, *, chunk_size: int, top_k: int, backend: str = "auto"):
    """Top-k chunk sparse attention with the training semantics of SPEC §4.

    Args:
      q, k, v: [B, T, H, D].
      chunk_size: chunk length; top_k: chunks attended per query, its own included.
      backend: "auto", "reference" (dense masked, O(T^2) memory) or "xla_chunked".

    Returns:
      o: [B, T, H, D] in q's dtype.
    """
    backend = resolve_backend(backend)
    if backend == "reference":
        return _topk_reference(q, k, v, chunk_size=chunk_size, top_k=top_k)
    if backend == "xla_chunked":
        return _topk_chunked(q, k, v, chunk_size=chunk_size, top_k=top_k)
    raise ValueError(
        f"unknown attention backend {backend!r}; expected 'reference' or 'xla_chunked'"
    )
