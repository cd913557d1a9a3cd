"""The sparse-attention side of RWKV-X: the block and what it needs to decode.

Rooms:
  block            `SparseBlock` (top-k chunk attention + an RWKV-7 channel mix, SPEC §4) and
                   its decode state `SparseBlockState`.
  kv_cache         `ChunkKVCache`: the fixed-capacity, chunk-granular cache and its eviction.
  cached_attention new tokens against the cache (prefill pieces and single decode steps) with
                   the training semantics.
  chunk_sources    attention over chosen chunks read straight from the cache's arrays.
  official         attention_mode="official": the official runtime's inference behaviour.

The parallel forward reaches the kernels through `rwkvx_jax.ops`; nothing here imports the
decoder, training or any command line.
"""
