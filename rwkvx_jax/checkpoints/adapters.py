"""LoRA adapters on disk (one safetensors file) and applied to a base model's params.

An adapter is a pytree beside the params, never inside them:

    {"lora": {<the params' nesting down to a kernel>: {"lora_a": A [in, r], "lora_b": B [r, out]}},
     "vectors": {<the params' nesting down to a vector>: its trained value}}   # optional

and the adapted model's params are the base's with each adapted kernel W replaced by
W + scale * A @ B (scale = alpha / rank) and each trained vector replaced by its value
(`apply_adapter`). Training forms exactly these params (`rwkvx_jax.training.lora`), so the
model with an adapter applied at load and the merged export are the same model.

The file is safetensors: tensors named by their path in that tree, joined with dots
(`lora.blocks_0.att.key.kernel.lora_a`), float32, and metadata: the format name and version,
the scale, rank and alpha, and the base model's `shape_hash` and config, checked on load.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from rwkvx_jax.checkpoints.tensor_files import read_safetensors, write_safetensors
from rwkvx_jax.config import RWKVXConfig

FORMAT_NAME = "rwkvx-jax-lora-adapter"
FORMAT_VERSION = 1
LORA_A, LORA_B = "lora_a", "lora_b"


class AdapterError(ValueError):
    """An adapter file or tree does not fit the base model; says which leaf and why."""


def _flat(tree, prefix: str = "") -> dict[str, Any]:
    """{dotted path: leaf} of a nested dict."""
    out = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(_flat(value, name + "."))
        else:
            out[name] = value
    return out


def _nested(flat: Mapping[str, Any]) -> dict:
    tree: dict = {}
    for name, value in flat.items():
        *parents, leaf = name.split(".")
        node = tree
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return tree


def lora_delta(a, b, scale: float):
    """scale * A @ B in fp32 at full precision: [in, r] x [r, out] -> [in, out]."""
    product = jnp.matmul(
        jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32), precision="highest"
    )
    return scale * product


def apply_adapter(params, adapter, scale: float, where: str = "adapter"):
    """The base `params` with `adapter` applied (see the module docstring); works under jit.

    The base is not changed: the result shares every untouched leaf with it. An adapted leaf
    keeps the base leaf's dtype (the sum is formed in fp32).

    Raises:
      AdapterError: an adapter leaf names no parameter of the base or has another shape.
    """
    flat_params = _flat(params)
    replaced = {}
    for name, pair in _flat_pairs(adapter.get("lora", {})).items():
        weight = flat_params.get(name)
        a, b = pair[LORA_A], pair[LORA_B]
        if weight is None:
            raise AdapterError(f"{where}: the base model has no kernel {name}")
        if (a.shape[0], b.shape[1]) != weight.shape or a.shape[1] != b.shape[0]:
            raise AdapterError(
                f"{where}: {name} is {list(weight.shape)} in the base, the adapter's A @ B is "
                f"{list(a.shape)} x {list(b.shape)}"
            )
        merged = jnp.asarray(weight, jnp.float32) + lora_delta(a, b, scale)
        replaced[name] = merged.astype(weight.dtype)
    for name, value in _flat(adapter.get("vectors", {})).items():
        weight = flat_params.get(name)
        if weight is None or weight.shape != value.shape:
            shape = None if weight is None else list(weight.shape)
            raise AdapterError(
                f"{where}: trained vector {name} is {list(value.shape)}, the base has {shape}"
            )
        replaced[name] = jnp.asarray(value).astype(weight.dtype)
    return _nested({**flat_params, **replaced})


def _flat_pairs(lora) -> dict[str, Mapping]:
    """{dotted kernel path: {"lora_a": A, "lora_b": B}} of an adapter's "lora" tree."""
    pairs: dict[str, dict] = {}
    for name, value in _flat(lora).items():
        kernel, _, part = name.rpartition(".")
        if part not in (LORA_A, LORA_B):
            raise AdapterError(f"adapter leaf {name}: expected {LORA_A} or {LORA_B} last")
        pairs.setdefault(kernel, {})[part] = value
    for kernel, pair in pairs.items():
        if len(pair) != 2:
            raise AdapterError(f"adapter kernel {kernel} needs both {LORA_A} and {LORA_B}")
    return pairs


def save_adapter(
    path: str | os.PathLike,
    config: RWKVXConfig,
    adapter,
    *,
    rank: int,
    alpha: float,
    extra: Mapping[str, Any] | None = None,
) -> None:
    """Writes an adapter as one safetensors file, atomically (host copies of its leaves).

    Args:
      path: the file (replaced if it exists).
      config: the base model the adapter belongs to.
      adapter: {"lora": ..., "vectors": ...} (see the module docstring).
      rank, alpha: the adapter's rank and alpha (scale = alpha / rank).
      extra: JSON-serialisable facts kept in the metadata (e.g. the base checkpoint's path).
    """
    tensors = {name: np.asarray(jax.device_get(v)) for name, v in _flat(adapter).items()}
    metadata = {
        "format": FORMAT_NAME,
        "version": str(FORMAT_VERSION),
        "rank": str(rank),
        "alpha": repr(float(alpha)),
        "scale": repr(alpha / rank),
        "shape_hash": config.shape_hash(),
        "config": config.to_json(),
        "extra": json.dumps(dict(extra or {})),
    }
    write_safetensors(path, tensors, metadata)


def read_adapter_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The metadata of an adapter file (format, version, rank, alpha, scale, shape_hash,
    config, extra) without reading its tensors.

    Raises:
      AdapterError: missing, not safetensors, or not an adapter.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise AdapterError(f"{path}: no such adapter file")
    try:
        with open(path, "rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(length))
    except (struct.error, ValueError, UnicodeDecodeError, OverflowError, MemoryError) as err:
        raise AdapterError(f"{path}: not a safetensors adapter file ({err})") from None
    metadata = header.get("__metadata__", {}) if isinstance(header, dict) else {}
    if metadata.get("format") != FORMAT_NAME:
        raise AdapterError(
            f"{path}: format {metadata.get('format')!r}, expected {FORMAT_NAME!r} (written by "
            "train.py finetune=lora)"
        )
    if int(metadata.get("version", 0)) > FORMAT_VERSION:
        raise AdapterError(
            f"{path}: adapter format version {metadata['version']}; this rwkvx-jax reads "
            f"versions <= {FORMAT_VERSION}"
        )
    return metadata


def load_adapter(path: str | os.PathLike, config: RWKVXConfig) -> tuple[dict, float]:
    """(adapter tree, scale) from a file written by `save_adapter`, for the base `config`.

    Raises:
      AdapterError: the file is missing or not an adapter, or belongs to a base of another
        shape (names both shape hashes).
    """
    path = os.fspath(path)
    metadata = read_adapter_metadata(path)
    if metadata.get("shape_hash") != config.shape_hash():
        raise AdapterError(
            f"{path} adapts a model with shape hash {metadata.get('shape_hash')}, this base's is "
            f"{config.shape_hash()} (load it on the base it was trained on)"
        )
    return _nested(read_safetensors(path)), float(metadata["scale"])


def apply_adapter_file(path: str | os.PathLike, config: RWKVXConfig, params):
    """`params` with the adapter in the file at `path` applied (host numpy arrays)."""
    adapter, scale = load_adapter(path, config)
    merged = apply_adapter(params, adapter, scale, where=os.fspath(path))
    return jax.tree.map(np.asarray, merged)
