"""Inference checkpoints: a directory with `config.json`, `metadata.json` and orbax `params/`.

Directories are written whole into a temporary sibling and renamed into place, so a failed
conversion leaves no partial output.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from rwkvx_jax.config import RWKVXConfig

FORMAT_NAME = "rwkvx-jax-params"
FORMAT_VERSION = 1
METADATA_FILE = "metadata.json"
# A training run's folder (train.py's workdir): its config, and its params exported for
# inference as a checkpoint directory.
RUN_CONFIG_FILE = "train_config.json"
RUN_EXPORT_FOLDER = "export"


class CheckpointError(ValueError):
    """A checkpoint directory is missing, incomplete or inconsistent; says which and why."""


def save_params(
    out_dir: str | os.PathLike,
    config: RWKVXConfig,
    params: Mapping,
    metadata: Mapping[str, Any] | None = None,
    *,
    overwrite: bool = False,
) -> None:
    """Writes `config.json`, `metadata.json` and `params/` into out_dir, atomically.

    Args:
      out_dir: target directory; must not exist (or be empty) unless `overwrite`; its parent
        folder must exist.
      config: the model config.
      params: the Flax parameter tree.
      metadata: extra facts to record (source file, source dtype, ...).
      overwrite: replace an existing non-empty out_dir.
    """
    out_dir = os.path.abspath(os.fspath(out_dir))
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise CheckpointError(f"{out_dir} exists and is not a directory")
    if os.path.isdir(out_dir) and os.listdir(out_dir) and not overwrite:
        raise CheckpointError(
            f"{out_dir} exists and is not empty; choose a new directory or pass overwrite=True "
            "(--overwrite)"
        )
    parent = os.path.dirname(out_dir)
    if not os.path.isdir(parent):
        # Not created: a mistyped output path should fail, not grow a tree of folders.
        raise CheckpointError(f"{out_dir}: the folder {parent} does not exist")
    staging = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.tmp-", dir=parent)
    try:
        checkpointer = ocp.StandardCheckpointer()
        checkpointer.save(os.path.join(staging, "params"), jax.tree.map(np.asarray, params))
        checkpointer.wait_until_finished()
        with open(os.path.join(staging, "config.json"), "w") as f:
            f.write(config.to_json() + "\n")
        info = {"format": FORMAT_NAME, "version": FORMAT_VERSION}
        info.update(metadata or {})
        with open(os.path.join(staging, METADATA_FILE), "w") as f:
            json.dump(info, f, indent=2, sort_keys=True)
            f.write("\n")
        if os.path.isdir(out_dir):
            backup = staging + ".old"
            os.replace(out_dir, backup)
            os.replace(staging, out_dir)
            shutil.rmtree(backup)
        else:
            os.replace(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def load_metadata(ckpt_dir: str | os.PathLike) -> dict[str, Any]:
    """The `metadata.json` of a checkpoint directory."""
    path = os.path.join(os.fspath(ckpt_dir), METADATA_FILE)
    if not os.path.isfile(path):
        raise CheckpointError(f"{path} is missing: {ckpt_dir} is not an rwkvx-jax checkpoint")
    with open(path) as f:
        info = json.load(f)
    if info.get("format") != FORMAT_NAME:
        raise CheckpointError(f"{path}: format {info.get('format')!r}, expected {FORMAT_NAME!r}")
    return info


def load_params(ckpt_dir: str | os.PathLike) -> tuple[RWKVXConfig, dict]:
    """Reads a directory written by `save_params`.

    Returns:
      (config, params) with params a nested dict of arrays in their stored dtype.
    """
    ckpt_dir = os.path.abspath(os.fspath(ckpt_dir))
    if not os.path.isdir(ckpt_dir):
        raise CheckpointError(f"{ckpt_dir}: no such checkpoint directory")
    load_metadata(ckpt_dir)
    config_path = os.path.join(ckpt_dir, "config.json")
    if not os.path.isfile(config_path):
        raise CheckpointError(f"{config_path} is missing")
    with open(config_path) as f:
        config = RWKVXConfig.from_json(f.read())
    params_dir = os.path.join(ckpt_dir, "params")
    if not os.path.isdir(params_dir):
        raise CheckpointError(f"{params_dir} is missing")
    params = ocp.StandardCheckpointer().restore(params_dir)
    return config, params


def exported_params_dir(run_dir: str | os.PathLike) -> str:
    """Where a training run keeps its params exported for inference: RUN/export/params."""
    return os.path.join(os.fspath(run_dir), RUN_EXPORT_FOLDER, "params")


def find_checkpoint(path: str | os.PathLike) -> str:
    """The checkpoint directory `path` names: itself, or a training run's exported params.

    Raises:
      CheckpointError: neither; says what was looked for (a run that has not exported yet is
        named as such).
    """
    absolute = os.path.abspath(os.fspath(path))
    if not os.path.isdir(absolute):
        raise CheckpointError(f"{path}: no such checkpoint directory")
    if os.path.isfile(os.path.join(absolute, METADATA_FILE)):
        return absolute
    exported = exported_params_dir(absolute)
    if os.path.isfile(os.path.join(exported, METADATA_FILE)):
        return exported
    if os.path.isfile(os.path.join(absolute, RUN_CONFIG_FILE)):
        raise CheckpointError(
            f"{path} is a training run without exported params ({exported} is missing: the "
            "run has not finished, or ran with checkpoint.export=false)"
        )
    raise CheckpointError(
        f"{path} is neither a converted checkpoint (no {METADATA_FILE}) nor a train.py run "
        f"directory with {RUN_EXPORT_FOLDER}/params"
    )
