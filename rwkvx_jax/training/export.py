"""What a finished run leaves for inference: exported params, an official .pth, a sample."""

from __future__ import annotations

import os
from collections.abc import Callable

import jax
import numpy as np

from rwkvx_jax.checkpoints.conversion import export_pth
from rwkvx_jax.checkpoints.directory import exported_params_dir, save_params
from rwkvx_jax.checkpoints.tensor_files import import_torch
from rwkvx_jax.config import RWKVXConfig
from rwkvx_jax.decoding.decoder import DecodeConfig
from rwkvx_jax.decoding.sampling import SamplingConfig
from rwkvx_jax.decoding.text import TextGenerator
from rwkvx_jax.tokenizer import tokenizer_for_vocab
from rwkvx_jax.training.config import SampleConfig, TrainConfig

Log = Callable[[str], None]


def host_params(params) -> dict:
    """Params as host numpy arrays (gathered across processes when sharded over hosts)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        params = multihost_utils.process_allgather(params, tiled=True)
    return jax.tree.map(np.asarray, jax.device_get(params))


def export_params(workdir: str, model_config: RWKVXConfig, params, config: TrainConfig, log: Log):
    """Writes `export/params` (inference format) and `export/model.pth` (if torch is present)."""
    params = host_params(params)
    params_dir = exported_params_dir(workdir)
    export_dir = os.path.dirname(params_dir)
    if jax.process_index() != 0:
        return export_dir
    os.makedirs(export_dir, exist_ok=True)
    metadata = {
        "source": f"train.py recipe {config.name}, step {config.steps}",
        "source_dtype": model_config.param_dtype,
    }
    save_params(params_dir, model_config, params, metadata, overwrite=True)
    log(f"exported params to {params_dir}")
    try:
        import_torch("the official .pth export")
    except ImportError as err:
        log(f"skipped: {err}")
        return export_dir

    pth = os.path.join(export_dir, "model.pth")
    export_pth(params_dir, pth)
    log(f"exported the official .pth to {pth}")
    return export_dir


def sample_text(model_config: RWKVXConfig, params, sample: SampleConfig, state=None) -> str:
    """A sampled continuation of `sample.prompt` (its temperature, top-p and seed; the
    tokenizer of the model's vocabulary: bytes for 256, else RWKV World), read after the
    decode `state` of one sequence when given (a state-tuned model's)."""
    tokenizer = tokenizer_for_vocab(model_config.vocab_size)
    n_prompt = len(tokenizer.encode(sample.prompt))
    # One prefill piece just covering the prompt: the decoder's default piece (512 tokens)
    # compiles for minutes on CPU for a handful of prompt tokens.
    chunk = model_config.chunk_size
    piece = DecodeConfig(prefill_chunk=chunk * max(1, -(-n_prompt // chunk)))
    generator = TextGenerator(model_config, host_params(params), piece, tokenizer=tokenizer)
    sampling = SamplingConfig(temperature=sample.temperature, top_p=sample.top_p, seed=sample.seed)
    return generator.generate([sample.prompt], sampling, sample.tokens, state=state)[0]
