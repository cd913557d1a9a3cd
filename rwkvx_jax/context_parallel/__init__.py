"""Context parallelism: one sequence cut into contiguous shards over the mesh's "context" axis.

Every function here runs inside `jax.shard_map` on one shard of the sequence and talks to the
other shards through collectives over the axis it is given; `rwkvx_jax.ops` wires them to the
kernels. The rooms:

- `state_maps`: WKV-7 across shards. A shard's tokens act on the incoming state as an affine
  map S -> S M + N ([N, N] per head, whatever the shard's length); shards all-gather their
  maps, fold their predecessors' into their entry state and correct their outputs.
- `token_shift`: the token shift across a shard boundary (the previous shard's last token).
- `chunk_attention`: top-k chunk attention across shards: own chunks local, chunk means and
  keys / values all-gathered, each query's chosen chunks read from them.
"""
