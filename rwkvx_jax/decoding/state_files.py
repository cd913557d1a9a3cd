"""Decode states on disk: one `.npz` per state, bit-exact, checked against the model on load.

Layout: one member per state leaf, named by its pytree key path (`blocks.moba_0.cache.keys`),
holding the leaf's bytes as unsigned ints of the same width (so bfloat16 and every other dtype
survive numpy unchanged), plus a `__metadata__` member: UTF-8 JSON with the format name and
version, the model's `shape_hash` and config, the batch size, cache size and kind, the
`state_signature`, each leaf's dtype and shape, and the caller's `extra` facts. Files are
written to a temporary name beside the target and renamed into place, so a failed save never
leaves a partial file, and they are read with `allow_pickle=False` only.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import zipfile
import zlib
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from rwkvx_jax.atomic_files import write_atomically
from rwkvx_jax.config import RWKVXConfig
from rwkvx_jax.model import DecodeState, init_decode_state
from rwkvx_jax.sparse.kv_cache import ChunkKVCache, cached_tokens
from rwkvx_jax.sparse.official import FlatKVCache

FORMAT_NAME = "rwkvx-jax-decode-state"
# 2 adds the optional next-token logits; version 1 files read the same without them.
FORMAT_VERSION = 2
METADATA_KEY = "__metadata__"
NEXT_LOGITS_KEY = "__next_logits__"


class StateFileError(ValueError):
    """A state file is missing, unreadable, corrupt or not a decode state; names the file."""


class StateMismatchError(ValueError):
    """A saved state belongs to a model of another shape (or dtype) than the one loading it."""


def state_signature(config: RWKVXConfig, state: DecodeState) -> str:
    """Hash of everything a state must agree with to be reused: the model's shapes and
    numerics settings and the state's own shapes and dtypes."""
    leaves = jax.tree_util.tree_leaves_with_path(state)
    shapes = [(jax.tree_util.keystr(p), x.shape, str(x.dtype)) for p, x in leaves]
    blob = json.dumps([config.shape_hash(), config.chunk_size, config.top_k, shapes], default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _leaf_name(path) -> str:
    return jax.tree_util.keystr(path, simple=True, separator=".")


def _raw_dtype(dtype: np.dtype) -> np.dtype:
    """Unsigned int of the same width: numpy stores these bytes as they are."""
    return np.dtype(f"uint{8 * dtype.itemsize}")


def _cache_layout(config: RWKVXConfig, state: DecodeState) -> tuple[int | None, str | None]:
    """(cache_size, cache kind "chunk" | "flat") of a state; (None, None) without sparse blocks."""
    caches = [block.cache for block in state.blocks.values() if hasattr(block, "cache")]
    if not caches:
        return None, None
    cache = caches[0]
    if isinstance(cache, ChunkKVCache):
        return cached_tokens(cache), "chunk"
    if isinstance(cache, FlatKVCache):
        return int(cache.keys.shape[2]), "flat"
    raise TypeError(f"unknown KV cache type {type(cache).__name__} in the decode state")


def _state_template(config: RWKVXConfig, batch: int, cache_size, cache_kind) -> DecodeState:
    """Shapes and dtypes (no buffers) of the state `init_decode_state` builds."""
    build = functools.partial(
        init_decode_state, config, batch, cache_size, flat_cache=cache_kind == "flat"
    )
    return jax.eval_shape(build)


def save_state(
    path: str | os.PathLike,
    config: RWKVXConfig,
    state: DecodeState,
    *,
    extra: Mapping[str, Any] | None = None,
    next_logits=None,
) -> None:
    """Writes a decode state to `path` (a single `.npz`), atomically.

    Args:
      path: the file to write (replaced if it exists).
      config: the model the state belongs to.
      state: the state (e.g. `Decoder.generate`'s `result["state"]`); not consumed.
      extra: JSON-serialisable facts to keep beside it (read back by `read_state_metadata`).
      next_logits: float32 [B, V], the logits of the token that follows the state (e.g.
        `Decoder.generate`'s `result["logits"]`), so a continuation can start with no new
        prompt tokens (`load_next_logits`); None stores none.

    Raises:
      StateMismatchError: the state's leaves do not have the shapes `config` gives a state.
      TypeError: `extra` is not JSON-serialisable.
    """
    path = os.fspath(path)
    batch = int(state.lengths.shape[0])
    cache_size, cache_kind = _cache_layout(config, state)
    template = _state_template(config, batch, cache_size, cache_kind)
    template_leaves = jax.tree_util.tree_leaves_with_path(template)
    leaves = jax.tree_util.tree_leaves_with_path(state)
    if jax.tree.structure(template) != jax.tree.structure(state):
        raise StateMismatchError(
            f"cannot save to {path}: the state's structure does not match a state of this model "
            f"(expected leaves {[_leaf_name(p) for p, _ in template_leaves]}, "
            f"got {[_leaf_name(p) for p, _ in leaves]})"
        )
    arrays, leaf_info = {}, {}
    for (leaf_path, leaf), (_, want) in zip(leaves, template_leaves, strict=True):
        name = _leaf_name(leaf_path)
        host = np.asarray(leaf)
        if host.shape != want.shape or host.dtype != want.dtype:
            raise StateMismatchError(
                f"cannot save to {path}: leaf {name} is {host.dtype}{list(host.shape)}, a state "
                f"of this model has {want.dtype}{list(want.shape)}"
            )
        arrays[name] = np.ascontiguousarray(host).view(_raw_dtype(host.dtype))
        leaf_info[name] = {"dtype": host.dtype.name, "shape": list(host.shape)}
    metadata = {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "shape_hash": config.shape_hash(),
        "config": config.to_dict(),
        "batch": batch,
        "cache_size": cache_size,
        "cache_kind": cache_kind,
        "signature": state_signature(config, state),
        "leaves": leaf_info,
        "extra": dict(extra or {}),
    }
    try:
        blob = json.dumps(metadata, sort_keys=True).encode("utf-8")
    except TypeError as err:
        raise TypeError(f"save_state: extra must be JSON-serialisable ({err})") from None
    arrays[METADATA_KEY] = np.frombuffer(blob, np.uint8)
    if next_logits is not None:
        logits = np.asarray(next_logits, np.float32)
        if logits.shape != (batch, config.vocab_size):
            raise StateMismatchError(
                f"cannot save to {path}: next_logits has shape {list(logits.shape)}, expected "
                f"[batch, vocab_size] = [{batch}, {config.vocab_size}]"
            )
        arrays[NEXT_LOGITS_KEY] = logits

    def write(staged: str) -> None:
        with open(staged, "wb") as f:  # a file object: np.savez would append ".npz" to a name
            np.savez(f, **arrays)

    write_atomically(path, write)


# What numpy / zipfile raise on a damaged or foreign file.
_READ_ERRORS = (OSError, EOFError, ValueError, KeyError, zipfile.BadZipFile, zlib.error)
# An .npz is a zip archive: a local file header, or the end record of an empty archive.
_ZIP_MAGIC = (b"PK\x03\x04", b"PK\x05\x06")


def _open(path: str):
    if not os.path.isfile(path):
        raise StateFileError(f"{path}: no such state file")
    with open(path, "rb") as f:
        head = f.read(4)
    if head not in _ZIP_MAGIC:
        raise StateFileError(
            f"{path}: not a decode-state file (expected an .npz archive; the file starts with "
            f"{head!r})"
        )
    try:
        archive = np.load(path, allow_pickle=False)
    except _READ_ERRORS as err:
        raise StateFileError(f"{path}: not a readable decode-state file ({err})") from None
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise StateFileError(f"{path}: a single .npy array, not a decode-state .npz file")
    return archive


def _read_metadata(path: str, archive) -> dict[str, Any]:
    if METADATA_KEY not in archive.files:
        raise StateFileError(f"{path}: no {METADATA_KEY} entry; not an rwkvx-jax decode state")
    try:
        metadata = json.loads(archive[METADATA_KEY].tobytes().decode("utf-8"))
    except (*_READ_ERRORS, UnicodeDecodeError) as err:
        raise StateFileError(f"{path}: unreadable {METADATA_KEY} ({err})") from None
    if not isinstance(metadata, dict) or metadata.get("format") != FORMAT_NAME:
        found = metadata.get("format") if isinstance(metadata, dict) else None
        raise StateFileError(f"{path}: format {found!r}, expected {FORMAT_NAME!r}")
    version = metadata.get("version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise StateFileError(
            f"{path}: format version {version!r}; this rwkvx-jax reads versions <= {FORMAT_VERSION}"
        )
    required = ("shape_hash", "config", "batch", "cache_size", "signature", "leaves")
    missing = [key for key in required if key not in metadata]
    if missing:
        raise StateFileError(f"{path}: metadata lacks {missing}")
    return metadata


def read_state_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The metadata of a state file (format, shape_hash, config, batch, cache_size, cache_kind,
    signature, leaves, extra) without reading its arrays.

    Raises:
      StateFileError: the file is missing, damaged or not a decode state.
    """
    path = os.fspath(path)
    with _open(path) as archive:
        return _read_metadata(path, archive)


def _config_differences(saved: Mapping[str, Any], config: RWKVXConfig) -> str:
    current = config.to_dict()
    fields = sorted(set(saved) | set(current))
    diffs = [
        f"{name}: {saved.get(name, '<absent>')!r} (state) vs {current.get(name, '<absent>')!r} "
        "(model)"
        for name in fields
        if saved.get(name, "<absent>") != current.get(name, "<absent>")
    ]
    return "; ".join(diffs) if diffs else "no config field differs"


def _check_model(path: str, metadata: Mapping[str, Any], config: RWKVXConfig) -> None:
    if metadata["shape_hash"] != config.shape_hash():
        raise StateMismatchError(
            f"{path} holds a state of a model with shape hash {metadata['shape_hash']}, but this "
            f"model's shape hash is {config.shape_hash()} "
            f"({_config_differences(metadata['config'], config)})"
        )


def _decode_leaf(path: str, archive, name: str, info, want) -> np.ndarray:
    """The leaf `name` in its own dtype, checked against the template leaf `want`."""
    if not isinstance(info, dict) or "dtype" not in info:
        raise StateFileError(f"{path}: metadata has no dtype for leaf {name}")
    try:
        dtype = jnp.dtype(info["dtype"])
    except TypeError:
        raise StateFileError(f"{path}: leaf {name} has unknown dtype {info['dtype']!r}") from None
    if dtype != want.dtype:
        raise StateMismatchError(
            f"{path}: leaf {name} is {dtype.name}, this model's state holds {want.dtype} "
            "(was the state saved with another compute dtype?)"
        )
    try:
        raw = archive[name]
    except _READ_ERRORS as err:
        raise StateFileError(f"{path}: leaf {name} is unreadable ({err})") from None
    if raw.dtype != _raw_dtype(dtype) or raw.shape != tuple(want.shape):
        raise StateFileError(
            f"{path}: leaf {name} holds {raw.dtype}{list(raw.shape)}, expected "
            f"{_raw_dtype(dtype)}{list(want.shape)} (the bytes of {dtype.name})"
        )
    return raw.view(dtype)


def load_state(path: str | os.PathLike, config: RWKVXConfig, *, with_next_logits: bool = False):
    """Reads a state written by `save_state` for the model `config`.

    The state's shapes are rebuilt from `config` (`init_decode_state` with the saved batch,
    cache size and cache kind) and every leaf is checked against them.

    Args:
      path: the state file.
      config: the model that reads it.
      with_next_logits: also return the next-token logits saved with it (`load_next_logits`),
        read in the same pass over the file.

    Returns:
      The `DecodeState`, every leaf in a device buffer of its own (ready to be donated); with
      with_next_logits, (state, float32 [B, V] logits or None when the file holds none).

    Raises:
      StateFileError: the file is missing, damaged or not a decode state (names the file).
      StateMismatchError: the state belongs to another model: names both shape hashes and the
        config fields that differ (or the leaf whose dtype or shape differs).
    """
    path = os.fspath(path)
    with _open(path) as archive:
        metadata = _read_metadata(path, archive)
        _check_model(path, metadata, config)
        cache_kind = metadata.get("cache_kind")
        try:
            template = _state_template(
                config, int(metadata["batch"]), metadata["cache_size"], cache_kind
            )
        except (TypeError, ValueError) as err:
            raise StateFileError(
                f"{path}: batch {metadata['batch']!r} / cache_size {metadata['cache_size']!r} "
                f"give no valid state for this model ({err})"
            ) from None
        template_leaves, treedef = jax.tree_util.tree_flatten_with_path(template)
        names = [_leaf_name(p) for p, _ in template_leaves]
        stored = set(archive.files) - {METADATA_KEY, NEXT_LOGITS_KEY}
        if stored != set(names) or set(metadata["leaves"]) != set(names):
            missing = sorted(set(names) - stored)
            unexpected = sorted(stored - set(names))
            raise StateFileError(
                f"{path}: leaves do not match a state of this model (missing {missing}, "
                f"unexpected {unexpected})"
            )
        values = [
            _decode_leaf(path, archive, name, metadata["leaves"][name], want)
            for name, (_, want) in zip(names, template_leaves, strict=True)
        ]
        logits = _read_next_logits(path, archive, metadata, config) if with_next_logits else None
    signature = state_signature(config, template)
    if signature != metadata["signature"]:
        raise StateMismatchError(
            f"{path}: state signature {metadata['signature']} differs from this model's "
            f"{signature} ({_config_differences(metadata['config'], config)})"
        )
    state = jax.tree_util.tree_unflatten(treedef, [jax.device_put(v) for v in values])
    return (state, logits) if with_next_logits else state


def load_next_logits(path: str | os.PathLike, config: RWKVXConfig) -> np.ndarray | None:
    """The next-token logits saved with a state (`save_state(..., next_logits=)`), float32
    [B, V], or None when the file holds none.

    Raises:
      StateFileError: the file is missing or damaged, or its logits have the wrong shape.
      StateMismatchError: the state belongs to another model.
    """
    path = os.fspath(path)
    with _open(path) as archive:
        metadata = _read_metadata(path, archive)
        _check_model(path, metadata, config)
        return _read_next_logits(path, archive, metadata, config)


def _read_next_logits(path: str, archive, metadata, config: RWKVXConfig) -> np.ndarray | None:
    if NEXT_LOGITS_KEY not in archive.files:
        return None
    try:
        logits = archive[NEXT_LOGITS_KEY]
    except _READ_ERRORS as err:
        raise StateFileError(f"{path}: next-token logits are unreadable ({err})") from None
    expected = (int(metadata["batch"]), config.vocab_size)
    if logits.dtype != np.float32 or logits.shape != expected:
        raise StateFileError(
            f"{path}: next-token logits are {logits.dtype}{list(logits.shape)}, expected "
            f"float32{list(expected)}"
        )
    return logits
