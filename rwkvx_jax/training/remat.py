"""Rematerialisation and activation sharding of every block of the model while training."""

from __future__ import annotations

import contextlib
import contextvars
import functools

import jax
from flax import linen as nn
from jax.sharding import NamedSharding

from rwkvx_jax import ops
from rwkvx_jax.rwkv7 import RWKVBlock
from rwkvx_jax.sparse.block import SparseBlock
from rwkvx_jax.training.config import REMAT_POLICIES

# The jax.checkpoint policies of the remat settings that use it ("ordered" does not).
_REMAT_POLICIES = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


_inside_block = contextvars.ContextVar("inside_block", default=False)


@contextlib.contextmanager
def block_transforms(remat: str = "none", activation_sharding: NamedSharding | None = None):
    """While active, every RWKV / sparse block call is rematerialised and/or sharding-pinned.

    The model builds its blocks itself, so this works through a Flax method interceptor around
    each block's `__call__`:
      remat: "full" / "dots" runs the block inside `nn.checkpoint` (jax.checkpoint) with that
        policy; "ordered" saves nothing inside a block either and also makes the backward
        pass finish one block before it starts the next (`_ordered_remat_call`). The module
        is the same, so parameter paths do not change. "none": no remat.
      activation_sharding: the sharding of [B, T, C] activations at block boundaries (the
        residual stream in and out, and `v_first`), batch over ("data", "fsdp"); it keeps
        GSPMD from resharding activations along the model width between blocks. Its mesh also
        becomes the kernel mesh (`ops.kernel_mesh`): the Pallas kernels run per device.
    """
    if remat not in REMAT_POLICIES:
        raise ValueError(f"remat policy must be one of {REMAT_POLICIES}, got {remat!r}")
    if remat == "none" and activation_sharding is None:
        yield
        return

    def pin(x):
        if activation_sharding is None or getattr(x, "ndim", None) != 3:
            return x  # None (v_first of block 0) or not an activation
        return jax.lax.with_sharding_constraint(x, activation_sharding)

    def call(module, x, *args, **kwargs):
        token = _inside_block.set(True)
        try:
            if isinstance(module, RWKVBlock):
                v_first, *rest = args
                x, v_first, state = type(module).__call__(
                    module, pin(x), pin(v_first), *rest, **kwargs
                )
                return pin(x), pin(v_first), state
            x, state = type(module).__call__(module, pin(x), *args, **kwargs)
            return pin(x), state
        finally:
            _inside_block.reset(token)

    if remat == "none":
        wrapped = call
    elif remat == "ordered":
        wrapped = functools.partial(_ordered_remat_call, call)
    else:
        wrapped = nn.checkpoint(call, policy=_REMAT_POLICIES[remat])

    def interceptor(next_fun, args, kwargs, context):
        is_block = isinstance(context.module, RWKVBlock | SparseBlock)
        if context.method_name == "__call__" and is_block and not _inside_block.get():
            return wrapped(context.module, *args, **kwargs)
        return next_fun(*args, **kwargs)

    # Pallas kernels cannot be partitioned by XLA: they run per device on the same mesh.
    mesh = None if activation_sharding is None else activation_sharding.mesh
    with nn.intercept_methods(interceptor), ops.kernel_mesh(mesh):
        yield


def _ordered_remat_call(call, module, x, *args, **kwargs):
    """`call(module, x, *args)` rematerialised, with a backward pass that goes block by block.

    Under jax.checkpoint, XLA may put off a block's weight gradients (and, with FSDP, their
    reduce-scatters) while it recomputes the blocks below, so the recomputed activations of
    several blocks are live at once: 7 in the 3.6b stage-2 step on a v5p (docs/BENCHMARKS.md).
    Here the block is a `jax.custom_vjp` whose backward recomputes the block from its saved
    inputs and returns the input cotangents and all the parameter gradients through one
    `optimization_barrier`: the next block down cannot start before this one is done. The
    values are those of no remat (the same operations; only the schedule changes).
    """
    if kwargs:
        raise ValueError(f"remat='ordered' takes blocks called positionally, got {sorted(kwargs)}")
    params = module.variables["params"]
    unbound = module.clone(parent=None)

    def pure(params, x, args):
        return unbound.apply({"params": params}, x, *args, method=call)

    @jax.custom_vjp
    def run(params, x, args):
        return pure(params, x, args)

    def run_fwd(params, x, args):
        return pure(params, x, args), (params, x, args)

    def run_bwd(residuals, cotangent):
        # As jax.checkpoint does: the barrier keeps XLA from merging the recomputation with the
        # forward pass (CSE) and from starting it before the output cotangent exists.
        residuals, cotangent = jax.lax.optimization_barrier((residuals, cotangent))
        _, vjp = jax.vjp(pure, *residuals)
        return jax.lax.optimization_barrier(vjp(cotangent))

    run.defvjp(run_fwd, run_bwd)
    return run(params, x, args)
