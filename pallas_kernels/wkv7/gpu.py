"""WKV-7 as Pallas-Triton GPU kernels: the entry `wkv7_gpu`, which runs the schedule its options
pick on the inputs laid out as that schedule reads them.

Three schedules run the same chunk maths (`gpu_chunk`), forward and chunk-reverse backward
under one custom VJP each:
- "sequential" (`gpu_sequential`, the default): one program per (batch x head, value tile)
  walks its sequence's chunks in order, the whole chunk maths on its critical path;
- "chunk_parallel" (`experimental.chunk_parallel`): the chunk maths in parallel over chunks,
  then an N x N affine map of the state per chunk in order;
- "factored" (`experimental.factored`): the chunk maths in parallel, then a pass in order
  through each chunk's rank-C factors.
All three follow one dot precision plan (`gpu_chunk.DotPlan`: which dots may round their
operands and which stay near-fp32 because their errors compound over T). The options, their
defaults and their validation are `gpu_options.GpuOptions`.
"""

from __future__ import annotations

import jax.numpy as jnp

from pallas_kernels.wkv7.experimental.chunk_parallel import wkv7_heads_chunk_parallel
from pallas_kernels.wkv7.experimental.factored import wkv7_tokens_factored
from pallas_kernels.wkv7.gpu_options import GpuOptions
from pallas_kernels.wkv7.gpu_sequential import wkv7_heads_sequential
from pallas_kernels.wkv7.reference import check_wkv7_shapes


def wkv7_gpu(r, w, k, v, a, b, state=None, *, options=None, interpret=False):
    """WKV-7 on GPU (Pallas-Triton): same result as `wkv7_reference`, differentiable.

    Per batch and head, with S in R^{N x N} (rows index value dims, columns key dims):
        S_t = S_{t-1} diag(exp(w_t)) + (S_{t-1} a_t) b_t^T + v_t k_t^T,   y_t = S_t r_t.
    The sequence is cut into chunks; with the default schedule one program per (batch x head,
    value tile) loops over them with its state rows in registers. The custom VJP stores one
    fp32 state per chunk (N^2 * 4 / chunk_size bytes per token and head) and recomputes
    everything else in the backward. T need not be a multiple of the chunk: the tail is padded
    with r = k = v = a = b = 0, w = 0, which leaves the state untouched.

    Inputs are loaded in their own dtype and computed in fp32 (decay sums, exponents, state);
    the options' `dot_precision` and `exact_dot_precision` pick the dots' operand precision
    (always fp32 accumulation); gradients come back in the input dtypes. The chunk's centred
    exponents stay finite for |w| * chunk_size / 2 < ~40: RWKV-7's w >= -0.6065 is safe for
    every allowed chunk.

    Args:
        r, w, k, v, a, b: [B, T, H, N] float32 / bfloat16 / float16; `w` is the log-decay
            (w <= 0); in RWKV-7, a = -kk and b = kk * a_rate. N a power of two >= 16.
        state: optional initial state [B, H, N, N] (zeros if None), cast to fp32.
        options: static `GpuOptions` (schedule, chunk size, tiles, warps, dot precisions), or
            None: `GpuOptions()`, every setting automatic.
        interpret: run the kernels in Pallas interpret mode (CPU testing).

    Returns:
        y: [B, T, H, N] float32; final_state: [B, H, N, N] float32.

    Raises:
        ValueError: on mismatched shapes, options that do not fit the inputs (head size, value
            tiles) or an unsupported dtype.
        TypeError: when options is neither None nor a `GpuOptions`.
    """
    if options is None:
        options = GpuOptions()
    if not isinstance(options, GpuOptions):
        raise TypeError(f"wkv7_gpu: options must be None or a GpuOptions, got {options!r}")
    batch, seq, heads, n = check_wkv7_shapes(r, w, k, v, a, b, state)
    named = (("r", r), ("w", w), ("k", k), ("v", v), ("a", a), ("b", b))
    dtypes = [(name, x.dtype) for name, x in named]
    if state is not None:
        dtypes.append(("state", state.dtype))
    cfg = options.resolve(n, batch * heads, dtypes, seq_len=seq, interpret=interpret)
    if state is None:
        state = jnp.zeros((batch, heads, n, n), jnp.float32)
    if seq == 0:
        return jnp.zeros(r.shape, jnp.float32), state.astype(jnp.float32)
    s0 = state.astype(jnp.float32).reshape(batch * heads, n, n)
    if cfg.schedule == "factored":
        # Its kernels read and write the token-major arrays as they are: no transposes.
        xs = tuple(pad_tokens(x, cfg.chunk * cfg.segments) for _, x in named)
        y, s_final = wkv7_tokens_factored(cfg, xs, s0)
        return y[:, :seq], s_final.reshape(batch, heads, n, n)
    xs = tuple(head_major(x, cfg.chunk) for _, x in named)
    if cfg.schedule == "chunk_parallel":
        y, s_final = wkv7_heads_chunk_parallel(cfg, xs, s0)
    else:
        y, s_final = wkv7_heads_sequential(cfg, xs, s0)
    y = y[:, :seq].reshape(batch, heads, seq, n).transpose(0, 2, 1, 3)
    return y, s_final.reshape(batch, heads, n, n)


def pad_tokens(x, multiple):
    """[B, T, H, N] -> [B, Tp, H, N], the tail zero-padded to Tp, a multiple of `multiple`
    (zero inputs, w = 0 included, leave the state untouched)."""
    pad = -x.shape[1] % multiple
    return jnp.pad(x, ((0, 0), (0, pad), (0, 0), (0, 0))) if pad else x


def head_major(x, chunk):
    """[B, T, H, N] -> [B*H, Tp, N], the tail zero-padded to Tp, a multiple of chunk (zero
    inputs, w = 0 included, leave the state untouched)."""
    x = pad_tokens(x, chunk)
    batch, seq, heads, n = x.shape
    return x.transpose(0, 2, 1, 3).reshape(batch * heads, seq, n)
