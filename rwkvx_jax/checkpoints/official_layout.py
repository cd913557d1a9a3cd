"""Official PyTorch state dict (SPEC §2) <-> Flax params: one table, validated both ways.

The Flax parameter tree mirrors the official keys (`blocks.3.att.key.weight` <->
`blocks_3/att/key/kernel`), so conversion is this table plus transposes of linear weights
([out, in] -> [in, out]) and reshapes of the [1, 1, C] vectors to [C]. Every value is copied
bit for bit apart from a requested dtype cast, so export inverts import exactly.
"""

from __future__ import annotations

import dataclasses
import re
from collections import OrderedDict
from collections.abc import Mapping

import jax.numpy as jnp
import ml_dtypes
import numpy as np

from rwkvx_jax.config import ConfigError, RWKVXConfig
from rwkvx_jax.model import bare_params, block_name

_ATT_VECTORS = ("x_r", "x_w", "x_k", "x_v", "x_a", "x_g", "w0", "a0", "v0", "k_k", "k_a")
_LINEARS = ("receptance", "key", "value", "output")
_FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(ml_dtypes.bfloat16), np.dtype(np.float16))


class ConversionError(ValueError):
    """A state dict does not match the layout its config implies; the message lists why."""


@dataclasses.dataclass(frozen=True)
class Entry:
    """One official tensor and where it lives in the Flax tree.

    `kind` is "copy" (same shape), "vector" ([1, 1, C] <-> [C]) or "linear" ([out, in] weight
    <-> [in, out] kernel).
    """

    key: str
    path: tuple[str, ...]
    shape: tuple[int, ...]
    kind: str


def checkpoint_prefix(config: RWKVXConfig) -> str:
    """RWKV-X checkpoints prefix the RWKV-7 part with `rwkv.`; plain RWKV-7 ones do not."""
    return "rwkv." if config.n_attn_layer > 0 else ""


def layout(config: RWKVXConfig) -> list[Entry]:
    """Every official key for `config`, in the official order, with shapes and Flax paths."""
    C, V, H, N = config.n_embd, config.vocab_size, config.n_head, config.head_size
    p = checkpoint_prefix(config)
    entries = [Entry(p + "emb.weight", ("emb", "embedding"), (V, C), "copy")]

    def norm(key: str, path: tuple[str, ...]) -> list[Entry]:
        return [
            Entry(key + ".weight", path + ("scale",), (C,), "copy"),
            Entry(key + ".bias", path + ("bias",), (C,), "copy"),
        ]

    def ffn(key: str, path: tuple[str, ...]) -> list[Entry]:
        return [
            Entry(key + ".x_k", path + ("x_k",), (1, 1, C), "vector"),
            Entry(key + ".key.weight", path + ("key", "kernel"), (4 * C, C), "linear"),
            Entry(key + ".value.weight", path + ("value", "kernel"), (C, 4 * C), "linear"),
        ]

    lora = {
        "w": config.dim_w,
        "a": config.dim_a,
        "v": config.dim_v,
        "g": config.dim_g,
    }
    for i in range(config.n_rwkv_layer):
        key, path = f"{p}blocks.{i}", (block_name("rwkv", i),)
        if i == 0:
            entries += norm(key + ".ln0", path + ("ln0",))
        entries += norm(key + ".ln1", path + ("ln1",))
        entries += norm(key + ".ln2", path + ("ln2",))
        att, att_path = key + ".att", path + ("att",)
        has_v = i > 0 or config.block0_v_params
        for name in _ATT_VECTORS:
            if name == "v0" and not has_v:
                continue
            entries.append(Entry(f"{att}.{name}", att_path + (name,), (1, 1, C), "vector"))
        for letter, width in lora.items():
            if letter == "v" and not has_v:
                continue
            for name, shape in ((f"{letter}1", (C, width)), (f"{letter}2", (width, C))):
                entries.append(Entry(f"{att}.{name}", att_path + (name,), shape, "copy"))
        entries.append(Entry(f"{att}.r_k", att_path + ("r_k",), (H, N), "copy"))
        for name in _LINEARS:
            entries.append(
                Entry(f"{att}.{name}.weight", att_path + (name, "kernel"), (C, C), "linear")
            )
        entries += norm(att + ".ln_x", att_path + ("ln_x",))
        entries += ffn(key + ".ffn", path + ("ffn",))
    entries += norm(p + "ln_out", ("ln_out",))
    entries.append(Entry(p + "head.weight", ("head", "kernel"), (V, C), "linear"))
    for j in range(config.n_attn_layer):
        key, path = f"moba.{j}", (block_name("attn", j),)
        entries += norm(key + ".ln1", path + ("ln1",))
        entries += norm(key + ".ln2", path + ("ln2",))
        for name in _LINEARS:
            entries.append(
                Entry(f"{key}.att.{name}.weight", path + ("att", name, "kernel"), (C, C), "linear")
            )
        entries += ffn(key + ".ffn", path + ("ffn",))
    return entries


def _natural_key(key: str):
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", key)]


def validate_state_dict(state_dict: Mapping[str, np.ndarray], config: RWKVXConfig) -> None:
    """Raises ConversionError listing missing keys, stray keys and wrong shapes (all at once)."""
    expected = {e.key: e.shape for e in layout(config)}
    problems = []
    missing = sorted(set(expected) - set(state_dict), key=_natural_key)
    stray = sorted(set(state_dict) - set(expected), key=_natural_key)
    if missing:
        problems.append(f"missing keys: {missing}")
    if stray:
        problems.append(
            f"unexpected keys (not part of an RWKV-X/RWKV-7 checkpoint of this shape): {stray}"
        )
    for key, shape in expected.items():
        if key in state_dict and tuple(state_dict[key].shape) != shape:
            problems.append(f"{key} has shape {tuple(state_dict[key].shape)}, expected {shape}")
    for key, value in state_dict.items():
        dtype = np.asarray(value).dtype
        if key in expected and dtype not in _FLOAT_DTYPES:
            problems.append(f"{key} has dtype {dtype}, expected float32, bfloat16 or float16")
    if problems:
        raise ConversionError(
            f"state dict does not match the inferred config "
            f"(L={config.n_rwkv_layer}, A={config.n_attn_layer}, C={config.n_embd}):\n  "
            + "\n  ".join(problems)
        )


def _set(tree: dict, path: tuple[str, ...], value) -> None:
    for name in path[:-1]:
        tree = tree.setdefault(name, {})
    tree[path[-1]] = value


def _get(tree: Mapping, path: tuple[str, ...]):
    for name in path:
        if name not in tree:
            raise ConversionError(f"params have no entry {'/'.join(path)}")
        tree = tree[name]
    return tree


def _cast(array: np.ndarray, dtype) -> np.ndarray:
    dtype = np.dtype(jnp.dtype(dtype))
    array = np.asarray(array)
    return array if array.dtype == dtype else array.astype(dtype)


def params_from_state_dict(
    state_dict: Mapping[str, np.ndarray], config: RWKVXConfig, dtype=None
) -> dict:
    """Official state dict -> Flax params (nested dict of numpy arrays).

    Args:
      state_dict: official key -> array (numpy or anything `np.asarray` accepts).
      config: the model config (e.g. `RWKVXConfig.from_torch_state_dict(state_dict)`).
      dtype: parameter dtype; defaults to `config.param_dtype`.
    """
    validate_state_dict(state_dict, config)
    dtype = dtype or config.param_dtype
    params: dict = {}
    for entry in layout(config):
        value = np.asarray(state_dict[entry.key])
        if entry.kind == "vector":
            value = value.reshape(entry.shape[-1])
        elif entry.kind == "linear":
            value = value.T
        _set(params, entry.path, np.ascontiguousarray(_cast(value, dtype)))
    return params


def state_dict_from_params(params: Mapping, config: RWKVXConfig, dtype=None) -> OrderedDict:
    """Flax params -> official state dict (numpy arrays in the official shapes and key order).

    Args:
      params: the Flax parameter tree (with or without a top-level "params" wrapper).
      config: the model config.
      dtype: dtype of the written tensors; defaults to each parameter's own dtype.
    """
    params = bare_params(params)
    out = OrderedDict()
    for entry in layout(config):
        value = np.asarray(_get(params, entry.path))
        if entry.kind == "vector":
            value = value.reshape(entry.shape)
        elif entry.kind == "linear":
            value = value.T
        if tuple(value.shape) != entry.shape:
            raise ConversionError(
                f"{'/'.join(entry.path)} has shape {value.shape}; as {entry.key} it must be "
                f"{entry.shape}"
            )
        out[entry.key] = np.ascontiguousarray(_cast(value, dtype) if dtype else value)
    return out


def config_from_state_dict(state_dict: Mapping[str, np.ndarray], **overrides) -> RWKVXConfig:
    """`RWKVXConfig.from_torch_state_dict` with errors reported as ConversionError."""
    try:
        return RWKVXConfig.from_torch_state_dict(state_dict, **overrides)
    except ConfigError as err:
        raise ConversionError(str(err)) from err
