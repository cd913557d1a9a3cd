"""The weights a `Decoder` computes with: the dense kernels in the layout that reads fastest.

A decode step at small batch is a chain of matrix-vector products that read every weight once
per token, so its speed is the speed at which XLA streams the kernels. XLA:CPU streams a kernel
stored [out, in] (each output a dot product of one contiguous row) at the machine's read
bandwidth, but one stored [in, out] (as Flax's `Dense` keeps it) at ~70% of it: measured at the
rwkvx-0.22b shape, batch 1, 2K context, 32.2 -> 28.0 ms/token on a 2-core VM (the [C, V] head
alone reads faster as [in, out] and stays so). At batch 2-32 XLA:CPU multiplies the [in, out]
kernels faster (batch 8: 75 vs 87 ms per step), so batch generation should pass
`DecodeConfig(kernel_layout="in_out")`. On accelerators the kernels keep their layout.

The decoder therefore holds `DecodeWeights`: every parameter except the transposed kernels
(`rest`) and the kernels [out, in] keyed by module path (`transposed`); the model runs
unchanged, with `Dense` calls of those modules intercepted (`dense_layout`).
"""

from __future__ import annotations

import contextlib
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import linen as nn
from flax import traverse_util

from rwkvx_jax.config import ConfigError
from rwkvx_jax.model import bare_params

KERNEL_LAYOUTS = ("auto", "in_out", "out_in")
# Dense modules whose kernel stays [in, out] in the "out_in" layout (measured faster so).
_KEEP_IN_OUT = ("head",)


class DecodeWeights(NamedTuple):
    """Model weights prepared for decoding (a pytree; pass it to several decoders to share it).

    Attributes:
      rest: the Flax parameter tree without the transposed kernels.
      transposed: "/"-joined module path (e.g. "blocks_0/att/key") -> kernel [out, in].
    """

    rest: Any
    transposed: dict[str, jax.Array]


def check_kernel_layout(layout: str) -> None:
    if layout not in KERNEL_LAYOUTS:
        raise ConfigError(f"kernel_layout must be one of {KERNEL_LAYOUTS}, got {layout!r}")


def resolve_layout(layout: str, params) -> str:
    """ "auto" -> "out_in" when the weights live on CPU, else "in_out"."""
    check_kernel_layout(layout)
    if layout != "auto":
        return layout
    leaves = jax.tree.leaves(params)
    devices = getattr(leaves[0], "devices", None) if leaves else None
    platform = next(iter(devices())).platform if devices else jax.default_backend()
    return "out_in" if platform == "cpu" else "in_out"


def prepare_decode_weights(params, layout: str = "auto") -> DecodeWeights:
    """Splits `params` ({"params": tree} or the tree) into `DecodeWeights` for `layout`.

    "out_in" copies each transposed kernel once ([out, in], contiguous); the returned weights
    do not reference the original kernels, so dropping `params` frees them.
    """
    if isinstance(params, DecodeWeights):
        return params
    params = bare_params(params)
    if resolve_layout(layout, params) == "in_out":
        return DecodeWeights(params, {})
    flat = traverse_util.flatten_dict(params)
    move = {
        path
        for path, x in flat.items()
        if path[-1] == "kernel" and jnp.ndim(x) == 2 and path[0] not in _KEEP_IN_OUT
    }
    rest = traverse_util.unflatten_dict({p: x for p, x in flat.items() if p not in move})
    transposed = {"/".join(p[:-1]): jnp.asarray(flat[p]).T.copy() for p in move}
    return DecodeWeights(rest, transposed)


@contextlib.contextmanager
def dense_layout(transposed: dict[str, jax.Array]):
    """Inside: `nn.Dense` modules whose path is in `transposed` compute x @ kernel with the
    [out, in] kernel given there (contracting its minor axis) instead of their own parameter.

    Use it while tracing a model apply (inside jit); only bias-free Dense layers are expected.
    """

    def intercept(next_fun, args, kwargs, context):
        module = context.module
        if context.method_name != "__call__" or not isinstance(module, nn.Dense):
            return next_fun(*args, **kwargs)
        kernel = transposed.get("/".join(module.path))
        if kernel is None:
            return next_fun(*args, **kwargs)
        if module.use_bias:
            raise ValueError(f"dense_layout: {'/'.join(module.path)} has a bias; not supported")
        (x,) = args
        dtype = module.dtype or jnp.result_type(x, kernel)
        dims = (((x.ndim - 1,), (1,)), ((), ()))
        return jax.lax.dot_general(
            x.astype(dtype), kernel.astype(dtype), dims, precision=module.precision
        )

    with nn.intercept_methods(intercept):
        yield
