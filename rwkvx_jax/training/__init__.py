"""Training: typed configs and recipes, the sharded train step, and the loop that runs it.

Rooms:
  config          `TrainConfig`, its sections, named recipes, JSON files, dotted overrides.
  program         `TrainProgram`: model + optimiser + shardings, sharded init, compiled step.
  losses          cross-entropy in pieces, L2Wrap, LongCE.
  optimizer       clipped AdamW with masked decay, warmup schedule, freezing.
  remat           `block_transforms`: rematerialisation and activation sharding per block.
  initial_params  random init, RWKV-7 -> RWKV-X expansion (`expand`), or a checkpoint.
  corpus          the token stream of `DataConfig.corpus`.
  flops           model FLOPs per token and measured peak matmul rate (MFU).
  metrics         metrics.jsonl, TensorBoard and loss.png of a run.
  aot             ahead-of-time compilation for a TPU slice.
  export          exported params / `.pth` and a text sample at the end of a run.
  finetune        `FinetuneProgram`: the step of a fine-tuning method on a frozen base.
  lora            LoRA adapters beside the base, formed into its weights; merged export.
  state_tuning    learnt initial RWKV-7 states; exported as a decode-state file.
  loop            `train`: resume or start, step, log, checkpoint, export.

The command line is `rwkvx_jax.train` (`train.py`, `rwkvx-train`). Checkpoint formats live in
`rwkvx_jax.checkpoints`, the input pipeline in `rwkvx_jax.data`.
"""

from rwkvx_jax.checkpoints.train_state import CheckpointStore
from rwkvx_jax.training.aot import (
    aot_compile,
    collective_bytes,
    describe_collectives,
    describe_memory,
    tpu_topology_devices,
)
from rwkvx_jax.training.config import (
    RECIPES,
    TrainConfig,
    TrainConfigError,
    apply_overrides,
    load_config,
    recipe,
)
from rwkvx_jax.training.corpus import load_corpus
from rwkvx_jax.training.export import export_params, host_params, sample_text
from rwkvx_jax.training.finetune import FinetuneProgram
from rwkvx_jax.training.flops import (
    matmul_param_count,
    measure_peak_flops,
    training_flops_per_token,
)
from rwkvx_jax.training.loop import NonFiniteError, StopRequested, TrainResult, train
from rwkvx_jax.training.metrics import MetricsLog, read_metrics
from rwkvx_jax.training.program import TrainProgram
from rwkvx_jax.training.remat import block_transforms

__all__ = [
    "RECIPES",
    "CheckpointStore",
    "FinetuneProgram",
    "MetricsLog",
    "NonFiniteError",
    "StopRequested",
    "TrainConfig",
    "TrainConfigError",
    "TrainProgram",
    "TrainResult",
    "aot_compile",
    "collective_bytes",
    "describe_collectives",
    "apply_overrides",
    "block_transforms",
    "describe_memory",
    "export_params",
    "host_params",
    "load_config",
    "load_corpus",
    "matmul_param_count",
    "measure_peak_flops",
    "read_metrics",
    "recipe",
    "sample_text",
    "tpu_topology_devices",
    "train",
    "training_flops_per_token",
]
