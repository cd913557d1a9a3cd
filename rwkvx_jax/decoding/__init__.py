"""Decoding: from a model and a prompt to tokens and text, with fixed memory per sequence.

Rooms:
  decoder      `Decoder` / `DecodeConfig`: chunked parallel prefill, a jit-compiled one-token
               step, streaming generation (SPEC §6).
  weights      `DecodeWeights`: the dense kernels in the layout that reads fastest.
  sampling     `SamplingConfig` and the sampler inside jit: penalties, temperature, top-k/p.
  row_sampling `sample_rows`: the same sampler with settings and PRNG keys per row.
  state_files  decode states on disk (`save_state` / `load_state`), checked against the model.
  text         `TextGenerator` / `generate_text`: text in, text out through the tokenizer.

The decode state itself (`DecodeState`) is the model's: each block owns its part
(`rwkvx_jax.rwkv7.RWKVBlockState`, `rwkvx_jax.sparse.block.SparseBlockState`) and
`rwkvx_jax.model` composes them. The command line is `rwkvx_jax.generate`.
"""
