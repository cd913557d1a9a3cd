"""Device mesh, logical-axis rules and parameter shardings for training.

Four mesh axes: "data" and "fsdp" split the batch (fsdp also the model width of every
matrix), "tensor" the heads, and "context" the sequence (`rwkvx_jax.context_parallel`).

Layers never name mesh axes. Each parameter gets logical axis names from its path (the official
key layout is fixed, so the path says what a tensor is), and one rules table maps logical names
to mesh axes. A mesh axis that does not divide a dimension is dropped for that dimension (the
dimension is replicated), so a sharding is never uneven.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor", "context")

# Logical name -> mesh axis (or axes, outermost first, or None = replicated). Megatron-style
# tensor parallelism splits the heads / MLP / vocabulary dimension, so a key -> value matmul
# pair needs no collective in between; FSDP splits the model width of every matrix.
LOGICAL_AXIS_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("batch", ("data", "fsdp")),
    # Context parallelism: a sequence in contiguous shards, one per "context" device.
    ("length", "context"),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("mlp", "tensor"),
    ("vocab", "tensor"),
    ("lora", None),
    ("channels", None),
    ("head_dim", None),
)

Rules = Sequence[tuple[str, str | tuple[str, ...] | None]]
Logical = tuple[str | None, ...]

# Parameter path suffix -> logical axes. Paths look like "blocks_3/att/key/kernel"; optimizer
# state leaves end with the path of the parameter they belong to, so the same table covers them.
_PARAM_AXES: tuple[tuple[re.Pattern, Logical], ...] = tuple(
    (re.compile(pattern), axes)
    for pattern, axes in (
        (r"(^|/)emb/embedding$", ("vocab", "embed")),
        (r"(^|/)head/kernel$", ("embed", "vocab")),
        (r"/att/(receptance|key|value)/kernel$", ("embed", "heads")),
        (r"/att/output/kernel$", ("heads", "embed")),
        (r"/ffn/key/kernel$", ("embed", "mlp")),
        (r"/ffn/value/kernel$", ("mlp", "embed")),
        (r"/att/[wavg]1$", ("embed", "lora")),
        (r"/att/[wavg]2$", ("lora", "embed")),
        (r"/att/r_k$", ("heads", "head_dim")),
    )
)


def make_mesh(shape: Sequence[int] = (-1, 1, 1), devices: Sequence[Any] | None = None) -> Mesh:
    """A Mesh with axes ("data", "fsdp", "tensor", "context").

    Args:
      shape: sizes of (data, fsdp, tensor, context), or of (data, fsdp, tensor) with context 1;
        at most one may be -1, meaning "all remaining devices".
      devices: the devices to use (default: all, `jax.devices()`; or e.g. the devices of a TPU
        topology description for ahead-of-time compilation); their count must equal the
        product of the shape.

    Raises:
      ValueError: the shape does not fit the devices; says how many there are.
    """
    devices = list(jax.devices() if devices is None else devices)
    shape = tuple(int(s) for s in shape)
    if len(shape) == len(MESH_AXES) - 1:
        shape = (*shape, 1)  # the three-number form: no context parallelism
    if len(shape) != len(MESH_AXES):
        raise ValueError(
            f"mesh shape {shape} must have one size per axis {MESH_AXES} (or the first three)"
        )
    if shape.count(-1) > 1 or any(s == 0 or s < -1 for s in shape):
        raise ValueError(f"mesh shape {shape}: sizes must be >= 1, with at most one -1")
    known = math.prod(s for s in shape if s != -1)
    if -1 in shape:
        if len(devices) % known:
            raise ValueError(
                f"mesh shape {shape}: {len(devices)} devices are not divisible by {known}"
            )
        shape = tuple(len(devices) // known if s == -1 else s for s in shape)
    if math.prod(shape) != len(devices):
        raise ValueError(
            f"mesh shape {dict(zip(MESH_AXES, shape, strict=True))} needs {math.prod(shape)} "
            f"devices, but {len(devices)} are available"
        )
    # Topology-aware device order on TPU (tensor on the fastest links); a reshape elsewhere.
    grid = mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=True)
    return Mesh(grid, MESH_AXES)


def path_string(path) -> str:
    """A pytree key path as "a/b/c" (dict keys, attribute names and sequence indices)."""
    parts = []
    for key in path:
        for attribute in ("key", "name", "idx"):
            if hasattr(key, attribute):
                parts.append(str(getattr(key, attribute)))
                break
        else:
            parts.append(str(key))
    return "/".join(parts)


def param_logical_axes(path: str, shape: Sequence[int]) -> Logical:
    """Logical axis names of a parameter (or of an optimizer-state leaf shaped like one).

    Known RWKV-X parameters are looked up by path suffix; vectors are "channels" (replicated);
    any other 2-D array puts "embed" (fsdp) on its larger dimension and "heads" (tensor) on the
    other; anything else is replicated.
    """
    rank = len(shape)
    for pattern, axes in _PARAM_AXES:
        if pattern.search(path) and len(axes) == rank:
            return axes
    if rank == 1:
        return ("channels",)
    if rank == 2:
        return ("embed", "heads") if shape[0] >= shape[1] else ("heads", "embed")
    return (None,) * rank


def _rule_table(rules: Rules) -> dict[str, tuple[str, ...]]:
    table = {}
    for name, axes in rules:
        if name in table:
            raise ValueError(f"logical axis {name!r} appears twice in the rules")
        table[name] = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
        for axis in table[name]:
            if axis not in MESH_AXES:
                raise ValueError(f"rule {name!r} -> {axes!r}: {axis!r} is not in {MESH_AXES}")
    return table


def logical_to_partition_spec(
    logical: Logical,
    shape: Sequence[int],
    mesh: Mesh,
    rules: Rules = LOGICAL_AXIS_RULES,
) -> PartitionSpec:
    """Maps logical axis names to a PartitionSpec for `shape` on `mesh`.

    A mesh axis is kept for a dimension only when the dimension stays divisible by the product of
    the mesh axes kept so far, and only once per spec; size-1 mesh axes are left out. Unknown
    logical names raise, None means replicated.
    """
    if len(logical) != len(shape):
        raise ValueError(f"logical axes {logical} do not match shape {tuple(shape)}")
    table = _rule_table(rules)
    used: set[str] = set()
    spec = []
    for name, dim in zip(logical, shape, strict=True):
        if name is None:
            spec.append(None)
            continue
        if name not in table:
            raise ValueError(f"logical axis {name!r} has no rule; known: {sorted(table)}")
        kept: list[str] = []
        for axis in table[name]:
            size = mesh.shape[axis]
            if axis in used or size == 1 or dim % (math.prod(mesh.shape[a] for a in kept) * size):
                continue
            kept.append(axis)
        used.update(kept)
        spec.append(None if not kept else kept[0] if len(kept) == 1 else tuple(kept))
    return PartitionSpec(*spec)


def tree_partition_specs(tree, mesh: Mesh, rules: Rules = LOGICAL_AXIS_RULES):
    """PartitionSpec of every leaf of a params / train-state tree (arrays or shape structs)."""

    def spec(path, leaf):
        shape = tuple(np.shape(leaf))
        return logical_to_partition_spec(
            param_logical_axes(path_string(path), shape), shape, mesh, rules
        )

    return jax.tree_util.tree_map_with_path(spec, tree)


def tree_shardings(tree, mesh: Mesh, rules: Rules = LOGICAL_AXIS_RULES):
    """NamedSharding of every leaf of a params / train-state tree."""
    specs = tree_partition_specs(tree, mesh, rules)
    return jax.tree.map(lambda s: NamedSharding(mesh, s), specs)


def batch_sharding(mesh: Mesh, rank: int = 2, rules: Rules = LOGICAL_AXIS_RULES) -> NamedSharding:
    """Sharding of a [batch, ...] input: batch over ("data", "fsdp"), the rest replicated."""
    axes = _rule_table(rules)["batch"]
    axes = tuple(a for a in axes if mesh.shape[a] > 1)
    batch_axes = None if not axes else axes[0] if len(axes) == 1 else axes
    return NamedSharding(mesh, PartitionSpec(batch_axes, *([None] * (rank - 1))))


def activation_sharding(mesh: Mesh, rules: Rules = LOGICAL_AXIS_RULES) -> NamedSharding:
    """Sharding of [batch, length, channels] activations: batch over ("data", "fsdp"), length
    over "context" (context parallelism), channels replicated."""
    axes = _rule_table(rules)
    kept = lambda name: tuple(a for a in axes[name] if mesh.shape[a] > 1)
    spec = [None if not a else a[0] if len(a) == 1 else a for a in (kept("batch"), kept("length"))]
    return NamedSharding(mesh, PartitionSpec(*spec, None))


def context_rows_sharding(
    mesh: Mesh, rank: int, rules: Rules = LOGICAL_AXIS_RULES
) -> NamedSharding:
    """Sharding of [context shards * batch, length / shards, ...]: row s * B + b is shard s of
    sequence b; rows over "context" then the batch axes, so a [B, T, ...] array cut along T
    keeps every device's part where it is."""
    table = _rule_table(rules)
    axes = tuple(a for a in (*table["length"], *table["batch"]) if mesh.shape[a] > 1)
    rows = None if not axes else axes[0] if len(axes) == 1 else axes
    return NamedSharding(mesh, PartitionSpec(rows, *([None] * (rank - 1))))


def context_shards(mesh: Mesh) -> int:
    """How many contiguous pieces a sequence is cut into (the "context" axis size)."""
    return mesh.shape["context"]


def batch_shards(mesh: Mesh, rules: Rules = LOGICAL_AXIS_RULES) -> int:
    """How many ways the batch dimension is split (the global batch must be a multiple)."""
    return math.prod(mesh.shape[a] for a in _rule_table(rules)["batch"])


def abstract_with_shardings(abstract, shardings):
    """ShapeDtypeStructs carrying shardings (targets for restoring a checkpoint in place)."""
    return jax.tree.map(
        lambda leaf, sharding: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding),
        abstract,
        shardings,
    )
