"""Backend dispatch for the two kernels the model needs: WKV-7 and top-k chunk attention.

Model code calls only these two functions; which implementation runs is decided here from the
config's backend names, so kernels can change without touching the model.

On a mesh of several devices the Pallas kernels run per device (`kernel_mesh`): XLA cannot
partition a Pallas custom call. JAX refuses to lower a Mosaic (TPU) kernel on sharded
operands, and a Triton (GPU) one would be given whole, replicated operands on every device.

On a mesh whose "context" axis cuts the sequence (context parallelism), every backend runs per
device on its shard of the tokens, and the shards exchange what crosses their boundaries
(`rwkvx_jax.context_parallel`): WKV-7 state maps, the token shift's last token, and the sparse
attention's chunk means and keys / values.
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
from pallas_kernels.topk_attention.xla_chunked import selected_chunks_attention
from pallas_kernels.wkv7.xla_chunked import DEFAULT_CHUNK_SIZE
from rwkvx_jax import layers
from rwkvx_jax.context_parallel.chunk_attention import topk_attention_across_shards
from rwkvx_jax.context_parallel.state_maps import wkv7_across_shards
from rwkvx_jax.context_parallel.token_shift import shift_across_shards
from rwkvx_jax.sharding import MESH_AXES, logical_to_partition_spec

_kernel_mesh: contextvars.ContextVar[Mesh | None] = contextvars.ContextVar(
    "kernel_mesh", default=None
)
# Logical axes of the kernels' operands (rwkvx_jax.sharding's rules: batch over ("data",
# "fsdp"), heads over "tensor", each kept only where it divides the dimension).
_TOKENS = ("batch", "length", "heads", "head_dim")  # [B, T, H, N]
_STATE = ("batch", "heads", None, None)  # [B, H, N, N]
_ACTIVATIONS = ("batch", "length", None)  # [B, T, C]
_ROWS = ("batch", None)  # [B, C]
_CONTEXT = "context"


@contextlib.contextmanager
def kernel_mesh(mesh: Mesh | None) -> Iterator[None]:
    """While active (during tracing), Pallas kernel calls run per device over `mesh`.

    Each call goes through `jax.shard_map`: batch split over ("data", "fsdp") and heads over
    "tensor" where they divide (rwkvx_jax.sharding's rules; other mesh axes see the whole
    dimension and repeat the work), so every device runs the kernel on its own batch rows and
    heads, which is exact: the recurrence and the attention never mix them. Operands sharded
    otherwise are resharded to that by XLA first. A mesh of one device, None, or the XLA /
    reference backends: calls are left as they are. With a "context" axis of size > 1 the
    time axis is split over it too, for every backend, and `token_shift`, `wkv7` and
    `topk_chunk_attention` exchange what crosses the shard boundaries
    (`rwkvx_jax.context_parallel`).

    The training step traces the model inside this (rwkvx_jax.training.remat.block_transforms).

    Raises:
      ValueError: the mesh's axes are not ("data", "fsdp", "tensor", "context")
        (sharding.make_mesh).
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


def context_shards() -> int:
    """How many shards the active kernel mesh cuts a sequence into (1: no context axis)."""
    mesh = _kernel_mesh.get()
    return 1 if mesh is None else mesh.shape[_CONTEXT]


def _check_context_split(length: int, what: str) -> None:
    shards = context_shards()
    if length % shards:
        raise ValueError(
            f"{what}: {length} tokens cannot be cut into {shards} equal context shards (the "
            "mesh's context axis); use a length that is a multiple of it"
        )


def _per_device(
    kernel: Callable,
    args: Sequence[jax.Array],
    in_axes: Sequence[tuple],
    out_axes: Sequence[tuple],
    shapes: Callable | None = None,
) -> tuple:
    """kernel(*args) (a tuple of arrays) through shard_map over the active kernel mesh, or
    directly without one; in_axes / out_axes name each argument's / result's logical axes.
    shapes(*args) gives the results' global shapes when `kernel` itself cannot be traced
    outside shard_map (it uses collectives); default: kernel."""
    mesh = _kernel_mesh.get()
    if mesh is None or mesh.size == 1:
        return (shapes or kernel)(*args)
    outs = jax.eval_shape(shapes or kernel, *args)
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
    # The Pallas kernels pick their own chunk (chunk_size is the chunked XLA form's).
    chunk = None if backend in PALLAS_BACKENDS else chunk_size
    local = lambda *xs: tuple(kernel_wkv7(*xs, backend=backend, chunk_size=chunk))
    if context_shards() == 1 and backend not in PALLAS_BACKENDS:
        return local(r, w, k, v, a, b, state)
    args = (r, w, k, v, a, b) if state is None else (r, w, k, v, a, b, state)
    in_axes = (_TOKENS,) * 6 + (() if state is None else (_STATE,))
    if context_shards() == 1:
        return _per_device(local, args, in_axes, (_TOKENS, _STATE))
    _check_context_split(r.shape[1], "wkv7")
    across = lambda *xs: wkv7_across_shards(local, *xs, axis=_CONTEXT)
    return _per_device(across, args, in_axes, (_TOKENS, _STATE), shapes=local)


def token_shift(x, previous=None):
    """`layers.token_shift` (out[:, t] = x[:, t-1], `previous` or zeros first), across context
    shards when the kernel mesh has them.

    Args:
      x: [B, T, C]; previous: [B, C] or None.
    """
    if context_shards() == 1:
        return layers.token_shift(x, previous)
    _check_context_split(x.shape[1], "token_shift")
    args = (x,) if previous is None else (x, previous)
    in_axes = (_ACTIVATIONS,) if previous is None else (_ACTIVATIONS, _ROWS)
    shift = lambda *xs: (shift_across_shards(*xs, axis=_CONTEXT),)
    plain = lambda *xs: (layers.token_shift(*xs),)
    return _per_device(shift, args, in_axes, (_ACTIVATIONS,), shapes=plain)[0]


def topk_chunk_attention(q, k, v, *, chunk_size: int, top_k: int, backend: str = "auto"):
    """Top-k chunk sparse attention with the training semantics of SPEC §4.

    Under a kernel mesh with context shards, each shard attends its own tokens' queries
    (`_topk_across_shards`).

    Args:
      q, k, v: [B, T, H, D].
      chunk_size: chunk length; top_k: chunks attended per query, its own included.
      backend: a `pallas_kernels.backends.Backend` name ("auto", "reference" (dense masked,
        O(T^2) memory), "xla_chunked", "pallas_tpu", "pallas_gpu").

    Returns:
      o: [B, T, H, D] in q's dtype.
    """
    backend = resolve_backend(backend, what="attention_backend")
    if context_shards() > 1:
        return _topk_across_shards(q, k, v, chunk_size, top_k, backend)
    kernel = lambda *qkv: (
        kernel_topk_chunk_attention(*qkv, chunk_size=chunk_size, topk=top_k, backend=backend),
    )
    if backend not in PALLAS_BACKENDS:
        return kernel(q, k, v)[0]
    return _per_device(kernel, (q, k, v), (_TOKENS,) * 3, (_TOKENS,))[0]


def _topk_across_shards(q, k, v, chunk_size: int, top_k: int, backend: str):
    """`topk_chunk_attention` with the sequence cut into context shards of whole chunks: the
    backend's kernel for the own chunks, the XLA pairs form for the chosen ones
    (`rwkvx_jax.context_parallel.chunk_attention`)."""
    _check_context_split(q.shape[1], "topk_chunk_attention")
    if (q.shape[1] // context_shards()) % chunk_size:
        raise ValueError(
            f"topk_chunk_attention: {q.shape[1]} tokens in {context_shards()} context shards "
            f"are not whole {chunk_size}-token chunks per shard"
        )
    # The own chunks are plain causal attention; the reference backend returns no lse.
    own_backend = "xla_chunked" if backend == "reference" else backend
    own = lambda *qkv: kernel_topk_chunk_attention(
        *qkv, chunk_size=chunk_size, topk=1, backend=own_backend, return_lse=True
    )
    chosen = lambda q, k, v, sel: selected_chunks_attention(
        q, k, v, sel, chunk_size=chunk_size, head_major_keys=True
    )
    across = lambda *qkv: (
        topk_attention_across_shards(
            *qkv, chunk_size=chunk_size, top_k=top_k, own=own, chosen=chosen, axis=_CONTEXT
        ),
    )
    shapes = lambda *qkv: (jax.ShapeDtypeStruct(qkv[0].shape, qkv[0].dtype),)
    return _per_device(across, (q, k, v), (_TOKENS,) * 3, (_TOKENS,), shapes=shapes)[0]


__all__ = [
    "BACKENDS",
    "kernel_mesh",
    "platform_backend",
    "resolve_backend",
    "token_shift",
    "topk_chunk_attention",
    "wkv7",
]
