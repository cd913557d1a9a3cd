"""LoRA fine-tuning (`finetune=lora`): adapters beside a frozen base, formed into its weights.

The model modules know nothing of adapters. The adapter is its own pytree (the layout of
`rwkvx_jax.checkpoints.adapters`): before each forward the loss forms the adapted params,
W + (alpha / rank) A @ B for every adapted kernel (`apply_adapter`), and calls the unchanged
model with them. The gradient is taken with respect to the adapter only, so only A, B (and,
with `lora.train_vectors`, the small vectors) are trained and carry optimiser state; the base
params pass through the step untouched. B starts at zero, so the first forward is exactly the
base model's. The merged export is the same expression, so merged and adapted forwards are
the same model.

The cost of forming the weights: one transient copy of the adapted kernels per step (sharded
like the kernels), and the backward pass makes each adapted kernel's full [in, out] gradient
before projecting it onto A and B (docs/BENCHMARKS.md: a LoRA step took 0.88x of a full
fine-tuning step for the 0.1B shape on CPU). Adding scale * (x A) B to each layer's output
through a method interceptor instead would skip those gradients; tried, its sharded steps
parted from the single-device ones by 6e-5 of the loss by the third step (the merged form
agrees to 2e-7), unexplained, so it is not used.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from rwkvx_jax.checkpoints.adapters import LORA_A, LORA_B, apply_adapter, save_adapter
from rwkvx_jax.config import RWKVXConfig
from rwkvx_jax.training.config import LoraConfig, TrainConfig
from rwkvx_jax.training.export import export_params, host_params
from rwkvx_jax.training.optimizer import weight_decay_mask

Log = Callable[[str], None]
ADAPTER_FILE = "adapter.safetensors"


def adapted_kernels(params, targets) -> list[tuple[str, str, str]]:
    """(block, module, layer) of every kernel the targets name (`LORA_TARGETS` entries such as
    "att.key"), block by block in the params' order."""
    found = []
    for block, modules in params.items():
        for target in targets:
            module, layer = target.split(".")
            if "kernel" in modules.get(module, {}).get(layer, {}):
                found.append((block, module, layer))
    return found


def small_vectors(params):
    """The params with fewer than two dims over 1 (token-shift mixes, biases, LayerNorms) as a
    nested dict of their values; the matrices are left out."""
    is_matrix = weight_decay_mask(params)

    def keep(tree, mask):
        out = {}
        for key, value in tree.items():
            if isinstance(value, dict):
                kept = keep(value, mask[key])
                if kept:
                    out[key] = kept
            elif not mask[key]:
                out[key] = jnp.asarray(value, jnp.float32)
        return out

    return keep(params, is_matrix)


def init_adapter(params, lora: LoraConfig, key: jax.Array) -> dict:
    """A fresh adapter for `params` (arrays or shape structs): A ~ U(-1/sqrt(in), 1/sqrt(in))
    [in, r], B = 0 [r, out], fp32; with `lora.train_vectors`, the small vectors' base values.

    Raises:
      ValueError: no kernel of the params is named by `lora.targets`.
    """
    kernels = adapted_kernels(params, lora.targets)
    if not kernels:
        raise ValueError(f"lora.targets {lora.targets} name no kernel of this model")
    keys = jax.random.split(key, len(kernels))
    tree: dict = {}
    for (block, module, layer), k in zip(kernels, keys, strict=True):
        fan_in, fan_out = params[block][module][layer]["kernel"].shape
        bound = 1.0 / math.sqrt(fan_in)
        pair = {
            LORA_A: jax.random.uniform(k, (fan_in, lora.rank), jnp.float32, -bound, bound),
            LORA_B: jnp.zeros((lora.rank, fan_out), jnp.float32),
        }
        tree.setdefault(block, {}).setdefault(module, {})[layer] = {"kernel": pair}
    adapter = {"lora": tree}
    if lora.train_vectors:
        adapter["vectors"] = small_vectors(params)
    return adapter


@dataclasses.dataclass(frozen=True)
class LoraMethod:
    """What `FinetuneProgram` trains for finetune=lora (see the module docstring)."""

    lora: LoraConfig

    def init(self, params, key: jax.Array) -> dict:
        return init_adapter(params, self.lora, key)

    def model_params(self, params, adapter):
        return apply_adapter(params, adapter, self.lora.scale)

    def forward_context(self):
        return contextlib.nullcontext()

    def inference(self, params, adapter):
        return apply_adapter(params, adapter, self.lora.scale), None

    def export(
        self, workdir: str, model_config: RWKVXConfig, params, adapter, config: TrainConfig,
        log: Log,
    ) -> str:  # fmt: skip
        """Writes `export/adapter.safetensors` (the adapter alone) and the merged model:
        `export/params` and, with torch, `export/model.pth`. Returns the export folder."""
        adapter = host_params(adapter)
        merged = jax.tree.map(np.asarray, self.inference(host_params(params), adapter)[0])
        export_dir = export_params(workdir, model_config, merged, config, log)
        if jax.process_index() == 0:
            path = os.path.join(export_dir, ADAPTER_FILE)
            save_adapter(
                path, model_config, adapter, rank=self.lora.rank, alpha=self.lora.alpha,
                extra={"base": config.init_checkpoint, "targets": list(self.lora.targets)},
            )  # fmt: skip
            log(f"exported the adapter ({_size(adapter)}) to {path}")
        return export_dir


def _size(tree) -> str:
    count = sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(tree))
    return f"{count:,} params"
