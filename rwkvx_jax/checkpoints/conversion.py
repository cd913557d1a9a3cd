"""File-level conversion: official `.pth` -> checkpoint directory -> `.pth` or safetensors."""

from __future__ import annotations

import logging
import os

import numpy as np

from rwkvx_jax.checkpoints.directory import load_metadata, load_params, save_params
from rwkvx_jax.checkpoints.official_layout import (
    config_from_state_dict,
    params_from_state_dict,
    state_dict_from_params,
)
from rwkvx_jax.checkpoints.tensor_files import read_pth, write_pth, write_safetensors
from rwkvx_jax.config import RWKVXConfig

log = logging.getLogger(__name__)


def _source_dtype(state_dict) -> str:
    dtypes = sorted({str(np.asarray(v).dtype) for v in state_dict.values()})
    return dtypes[0] if len(dtypes) == 1 else "mixed:" + ",".join(dtypes)


def convert_pth(
    in_path: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    dtype: str = "float32",
    overwrite: bool = False,
    **config_overrides,
) -> RWKVXConfig:
    """Converts an official RWKV-X or RWKV-7 `.pth` into a checkpoint directory.

    Reads the file without executing pickled code, infers the config from tensor shapes, checks
    every key and shape, and writes `config.json` + orbax params atomically.

    Args:
      in_path: the `.pth` file.
      out_dir: the directory to create.
      dtype: parameter dtype to store ("float32", "bfloat16", "float16").
      overwrite: replace a non-empty out_dir.
      **config_overrides: non-shape config fields (chunk_size, top_k, dtype, backends,
        allow_dropped_rwkv_blocks).

    Returns:
      The config written.
    """
    state_dict = read_pth(in_path)
    config = config_from_state_dict(state_dict, param_dtype=dtype, **config_overrides)
    params = params_from_state_dict(state_dict, config, dtype)
    metadata = {
        "source_file": os.path.basename(os.fspath(in_path)),
        "source_dtype": _source_dtype(state_dict),
        "source_layout": "rwkv-x" if config.n_attn_layer else "rwkv-7",
    }
    save_params(out_dir, config, params, metadata, overwrite=overwrite)
    log.info("converted %s -> %s (%s)", in_path, out_dir, config)
    return config


def _export_dtype(ckpt_dir, dtype: str | None) -> str | None:
    if dtype is not None:
        return dtype
    source = load_metadata(ckpt_dir).get("source_dtype", "")
    return source if source in ("float32", "bfloat16", "float16") else None


def export_state_dict(ckpt_dir: str | os.PathLike, dtype: str | None = None):
    """A checkpoint directory as an official state dict; dtype defaults to the source file's."""
    config, params = load_params(ckpt_dir)
    return config, state_dict_from_params(params, config, _export_dtype(ckpt_dir, dtype))


def export_pth(ckpt_dir, out_path, *, dtype: str | None = None) -> None:
    """Writes a checkpoint directory as an official `.pth` (needs torch)."""
    _, state_dict = export_state_dict(ckpt_dir, dtype)
    write_pth(out_path, state_dict)


def export_safetensors(ckpt_dir, out_path, *, dtype: str | None = None) -> None:
    """Writes a checkpoint directory as safetensors under the official key names."""
    config, state_dict = export_state_dict(ckpt_dir, dtype)
    write_safetensors(out_path, state_dict, {"rwkvx_config": config.to_json()})


def load_checkpoint_params(path: str | os.PathLike) -> tuple[RWKVXConfig, dict]:
    """(config, params) from an official `.pth` or a checkpoint directory (`save_params`)."""
    path = os.fspath(path)
    if os.path.isdir(path):
        from rwkvx_jax.checkpoints.directory import load_params

        return load_params(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such checkpoint (a .pth file or a params directory)")
    from rwkvx_jax.checkpoints.official_layout import config_from_state_dict, params_from_state_dict
    from rwkvx_jax.checkpoints.tensor_files import read_pth

    state_dict = read_pth(path)
    config = config_from_state_dict(state_dict)
    return config, params_from_state_dict(state_dict, config, "float32")
