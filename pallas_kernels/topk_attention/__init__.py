"""Top-k chunk sparse attention (SPEC §4 train semantics): selection, dense oracle, XLA version."""

from .reference import select_chunks, topk_chunk_attention_reference
from .xla_chunked import selected_chunks_attention, topk_chunk_attention

__all__ = [
    "select_chunks",
    "selected_chunks_attention",
    "topk_chunk_attention",
    "topk_chunk_attention_reference",
]
