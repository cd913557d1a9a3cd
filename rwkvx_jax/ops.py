"""Backend dispatch for the two kernels the model needs: WKV-7 and top-k chunk attention.

Model code calls only these two functions; which implementation runs is decided here from the
config's backend names, so kernels can change without touching the model.

On a mesh of several devices the Pallas kernels run per device (`kernel_mesh`): XLA cannot
partition a Pallas custom call. JAX refuses to lower a Mosaic (TPU) kernel on sharded
operands, and a Triton (GPU) one would be given whole, replicated operands on every device.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Iterator, Sequence

import jax
from jax.sharding import Mesh

from pallas_kernels import topk_chunk_attention as kernel_topk_chunk_attention
from pallas_kernels import wkv7 as kernel_wkv7

# The backend names and what "auto" means, re-exported for the library (configs, AOT).
from pallas_kernels.backends import BACKENDS, PALLAS_BACKENDS, platform_backend, resolve_backend
from pallas_kernels.wkv7.xla_chunked import DEFAULT_CHUNK_SIZE
from rwkvx_jax.sharding import MESH_AXES, logical_to_partition_spec

_kernel_mesh: contextvars.ContextVar[Mesh | None] = contextvars.ContextVar(
    "kernel_mesh", default=None
)
# Logical axes of the kernels' operands (rwkvx_jax.sharding's rules: batch over ("data",
# "fsdp"), heads over "tensor", each kept only where it divides the dimension).
_TOKENS = ("batch", "length", "heads", "head_dim")  # [B, T, H, N]
_STATE = ("batch", "heads", None, None)  # [B, H, N, N]


@contextlib.contextmanager
def kernel_mesh(mesh: Mesh | None) -> Iterator[None]:
    """While active (during tracing), Pallas kernel calls run per device over `mesh`.

    Each call goes through `jax.shard_map`: batch split over ("data", "fsdp") and heads over
    "tensor" where they divide (rwkvx_jax.sharding's rules; other mesh axes see the whole
    dimension and repeat the work), so every device runs the kernel on its own batch rows and
    heads, which is exact: the recurrence and the attention never mix them. Operands sharded
    otherwise are resharded to that by XLA first. A mesh of one device, None, or the XLA /
    reference backends: calls are left as they are.

    The training step traces the model inside this (rwkvx_jax.training.remat.block_transforms).

    Raises:
      ValueError: the mesh's axes are not ("data", "fsdp", "tensor") (sharding.make_mesh).
    """
    if mesh is not None and tuple(mesh.axis_names) != MESH_AXES:
        raise ValueError(
            f"kernel_mesh: the mesh's axes must be {MESH_AXES} (rwkvx_jax.sharding.make_mesh), "
            f"got {tuple(mesh.axis_names)}"
        )
    token = _kernel_mesh.set(mesh)
    try:
        yield
    finally:
        _kernel_mesh.reset(token)


def _per_device(
    kernel: Callable, args: Sequence[jax.Array], in_axes: Sequence[tuple], out_axes: Sequence[tuple]
) -> tuple:
    """kernel(*args) (a tuple of arrays) through shard_map over the active kernel mesh, or
    directly without one; in_axes / out_axes name each argument's / result's logical axes."""
    mesh = _kernel_mesh.get()
    if mesh is None or mesh.size == 1:
        return kernel(*args)
    outs = jax.eval_shape(kernel, *args)
    specs = lambda axes, values: tuple(
        logical_to_partition_spec(a, x.shape, mesh) for a, x in zip(axes, values, strict=True)
    )
    # check_vma=False: pallas_call has no replication rule for shard_map's check.
    return jax.shard_map(
        kernel, mesh=mesh, in_specs=specs(in_axes, args), out_specs=specs(out_axes, outs),
        check_vma=False,
    )(*args)  # fmt: skip


def wkv7(
    r, w, k, v, a, b, state=None, *, backend: str = "auto", chunk_size: int = DEFAULT_CHUNK_SIZE
):
    """WKV-7 recurrence; see `pallas_kernels.wkv7.wkv7_reference` for the maths.

    Args:
      r, w, k, v, a, b: [B, T, H, N]; w is the log-decay (<= 0).
      state: optional [B, H, N, N] fp32 initial state (rows: value dims, columns: key dims).
      backend: a `pallas_kernels.backends.Backend` name ("auto", "reference", "xla_chunked",
        "pallas_tpu", "pallas_gpu").
      chunk_size: chunk length of the chunked XLA form (the Pallas kernels use their own).

    Returns:
      (y [B, T, H, N] fp32, final_state [B, H, N, N] fp32).
    """
    backend = resolve_backend(backend, what="wkv_backend")
    if backend not in PALLAS_BACKENDS:
        return kernel_wkv7(r, w, k, v, a, b, state, backend=backend, chunk_size=chunk_size)
    kernel = lambda *xs: tuple(kernel_wkv7(*xs, backend=backend))
    args = (r, w, k, v, a, b) if state is None else (r, w, k, v, a, b, state)
    in_axes = (_TOKENS,) * 6 + (() if state is None else (_STATE,))
    return _per_device(kernel, args, in_axes, (_TOKENS, _STATE))


def topk_chunk_attention(q, k, v, *, chunk_size: int, top_k: int, backend: str = "auto"):
    """Top-k chunk sparse attention with the training semantics of SPEC §4.

    Args:
      q, k, v: [B, T, H, D].
      chunk_size: chunk length; top_k: chunks attended per query, its own included.
      backend: a `pallas_kernels.backends.Backend` name ("auto", "reference" (dense masked,
        O(T^2) memory), "xla_chunked", "pallas_tpu", "pallas_gpu").

    Returns:
      o: [B, T, H, D] in q's dtype.
    """
    backend = resolve_backend(backend, what="attention_backend")
    kernel = lambda *qkv: (
        kernel_topk_chunk_attention(*qkv, chunk_size=chunk_size, topk=top_k, backend=backend),
    )
    if backend not in PALLAS_BACKENDS:
        return kernel(q, k, v)[0]
    return _per_device(kernel, (q, k, v), (_TOKENS,) * 3, (_TOKENS,))[0]


__all__ = [
    "BACKENDS",
    "kernel_mesh",
    "platform_backend",
    "resolve_backend",
    "topk_chunk_attention",
    "wkv7",
]
