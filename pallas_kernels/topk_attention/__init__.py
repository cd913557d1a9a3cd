"""Top-k chunk sparse attention (SPEC §4 train semantics): selection, dense oracle, XLA version,
and the Pallas TPU/GPU kernels behind one entry point, `topk_chunk_attention`."""

from .ops import topk_chunk_attention
from .reference import select_chunks, topk_chunk_attention_reference
from .xla_chunked import topk_chunk_attention as topk_chunk_attention_xla

__all__ = [
    "select_chunks",
    "topk_chunk_attention",
    "topk_chunk_attention_reference",
    "topk_chunk_attention_xla",
]
