"""`wkv7`: the public WKV-7 entry point, choosing the TPU, GPU, chunked-XLA or reference form."""

from __future__ import annotations

from pallas_kernels.backends import Backend, resolve_backend
from pallas_kernels.wkv7.reference import wkv7_reference
from pallas_kernels.wkv7.xla_chunked import DEFAULT_CHUNK_SIZE, wkv7_chunked


def wkv7(r, w, k, v, a, b, state=None, *, backend="auto", interpret=False, chunk_size=None):
    """WKV-7 recurrence over a sequence, differentiable in every input and the initial state.

    Per batch and head, with the state S in R^{N x N} (rows index value dims, columns key dims,
    the official BlinkDL layout; fla's kernels use the transpose):
        S_t = S_{t-1} diag(exp(w_t)) + (S_{t-1} a_t) b_t^T + v_t k_t^T,   y_t = S_t r_t.

    Layout: token inputs are [B, T, H, N] (batch, time, head, head size); the kernels work
    head-major ([B*H, T, N]) internally, so each call pays one transpose in and out.

    Args:
      r, w, k, v, a, b: [B, T, H, N], float32 or bfloat16; `w` is the log-decay (<= 0; RWKV-7
        keeps it >= -0.6065 per step). Any T: the tail is padded internally.
      state: optional [B, H, N, N] float32 initial state (zeros when None).
      backend: a `pallas_kernels.backends.Backend` name: "auto" (the Pallas kernel on a TPU or
        GPU, "xla_chunked" elsewhere), "pallas_tpu", "pallas_gpu", "xla_chunked" (the chunked
        matmul form in plain JAX) or "reference" (the `lax.scan` oracle).
      interpret: run a Pallas kernel in interpret mode (CPU testing). For "pallas_tpu" this may
        also be a `jax.experimental.pallas.tpu.InterpretParams`. Ignored by the others.
      chunk_size: chunk length; None takes the backend's default (xla_chunked 16, pallas_gpu 16,
        pallas_tpu 64; the reference has none).

    Returns:
      (y [B, T, H, N] float32, final_state [B, H, N, N] float32).
    """
    backend = resolve_backend(backend, what="wkv7")
    if backend == Backend.REFERENCE:
        return wkv7_reference(r, w, k, v, a, b, state)
    if backend == Backend.XLA_CHUNKED:
        return wkv7_chunked(r, w, k, v, a, b, state, chunk_size=chunk_size or DEFAULT_CHUNK_SIZE)
    if backend == Backend.PALLAS_GPU:
        from pallas_kernels.wkv7.gpu import wkv7_gpu
        from pallas_kernels.wkv7.gpu_options import GpuOptions

        options = GpuOptions(chunk_size=chunk_size)
        return wkv7_gpu(r, w, k, v, a, b, state, options=options, interpret=interpret)
    from pallas_kernels.wkv7.tpu import wkv7_tpu

    chunk = {} if chunk_size is None else {"chunk_size": chunk_size}
    return wkv7_tpu(r, w, k, v, a, b, state, interpret=interpret, **chunk)
