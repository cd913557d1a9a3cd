"""Shape legend used in docstrings across the package.

  B  batch                      T  time (tokens)
  C  model width (n_embd)       V  vocabulary size
  H  heads (C / N)              N  head size (64), also D in attention code
  L  RWKV-7 blocks              A  sparse-attention blocks
  nC chunks (ceil(T / chunk))   K  top-k chunks attended per query

WKV-7 state: [B, H, N, N] fp32, rows index value dims, columns key dims (BlinkDL layout).
Official linear weights are [out, in]; Flax kernels are [in, out].
"""
