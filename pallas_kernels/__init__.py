"""Kernels for RWKV-X: WKV-7 recurrence and top-k chunk sparse attention (reference, XLA, Pallas).

This package never imports `rwkvx_jax`; the model reaches it through `rwkvx_jax.ops`.
"""
