"""State tuning (`finetune=state`): learn each RWKV-7 block's initial decode state.

An RWKV-7 block reads a sequence starting from a state: the WKV state [H, N, N] and the two
token-shift inputs [C]. A fresh sequence starts from zeros; state tuning learns one starting
state per block (shared by every sequence) and leaves every parameter as it was. At inference
the learnt state is just a saved decode state (`decoding.state_files`, exported by
`StateMethod.export`): `generate --state-in` and `Decoder` read it like any other, so it costs
nothing per token.

The model is unchanged: the learnt states travel in the params handed to it, each under its
block's `initial_state` (`with_initial_states`; Flax ignores params no module asks for), and a
Flax method interceptor (`initial_states`) hands a block that state when the model calls the
block without one. The gradient reaches the state through the WKV kernel (differentiable in
its initial state) and the token shifts. Being params, the states are explicit inputs of every
block, also under `remat=ordered`, and the interceptor holds no traced value, so it stays
active over the backward pass (where rematerialised blocks run again). The learnt state starts
at zero, where the model is exactly the base model.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import linen as nn

from rwkvx_jax.checkpoints.directory import exported_params_dir
from rwkvx_jax.config import RWKVXConfig
from rwkvx_jax.decoding.decoder import DecodeConfig
from rwkvx_jax.decoding.state_files import save_state
from rwkvx_jax.model import DecodeState, block_name, init_decode_state
from rwkvx_jax.rwkv7 import RWKVBlock, RWKVBlockState
from rwkvx_jax.training.config import StateTuningConfig, TrainConfig
from rwkvx_jax.training.export import host_params

Log = Callable[[str], None]
STATE_FILE = "state.npz"
SHIFTS = ("att_x_prev", "ffn_x_prev")
INITIAL_STATE = "initial_state"


def init_tuned_states(model_config: RWKVXConfig, tuning: StateTuningConfig) -> dict:
    """Zero starting states, fp32: {block name: {"wkv": [H, N, N]} (+ "att_x_prev",
    "ffn_x_prev": [C] with `tuning.token_shift`)} for every RWKV-7 block."""
    c, n = model_config.n_embd, model_config.head_size
    states = {}
    for kind, index in model_config.block_order():
        if kind == "rwkv":
            state = {"wkv": jnp.zeros((c // n, n, n), jnp.float32)}
            if tuning.token_shift:
                state.update({name: jnp.zeros((c,), jnp.float32) for name in SHIFTS})
            states[block_name(kind, index)] = state
    return states


def _block_state(tuned: dict, batch: int, shift_dtype) -> RWKVBlockState:
    """One block's learnt state for `batch` sequences (None shifts: the model's zeros)."""
    rows = lambda leaf: jnp.broadcast_to(leaf[None], (batch, *leaf.shape))
    shifts = [rows(tuned[n]).astype(shift_dtype) if n in tuned else None for n in SHIFTS]
    return RWKVBlockState(shifts[0], rows(tuned["wkv"]), shifts[1])


def with_initial_states(params, tuned: dict) -> dict:
    """The params with each tuned block's learnt state under its `initial_state` key."""
    return {
        **params,
        **{name: {**params[name], INITIAL_STATE: state} for name, state in tuned.items()},
    }


@contextlib.contextmanager
def initial_states():
    """While active, an RWKV-7 block whose params hold an `initial_state` (`with_initial_states`)
    and that the model calls without a state starts from that state, for every row.

    Enter it outside `remat.block_transforms` (interceptors run in the order they were
    entered): the state is then an argument of the (possibly rematerialised) block call.
    """

    def interceptor(next_fun, args, kwargs, context):
        module = context.module
        if (
            context.method_name == "__call__"
            and isinstance(module, RWKVBlock)
            and len(args) == 2
            and kwargs.get("state") is None
            and INITIAL_STATE in module.variables.get("params", {})
        ):
            x, v_first = args
            learnt = module.variables["params"][INITIAL_STATE]
            args = (x, v_first, _block_state(learnt, x.shape[0], module.dtype))
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(interceptor):
        yield


def tuned_decode_state(
    model_config: RWKVXConfig, tuned: dict, *, batch: int = 1, cache_size: int | None = None
) -> DecodeState:
    """The `DecodeState` of `batch` fresh sequences that start from the learnt states.

    Args:
      model_config: the model.
      tuned: the learnt states (`init_tuned_states`' layout).
      batch: sequences.
      cache_size: the sparse blocks' (empty) KV caches; None: the decoder's default.
    """
    cache_size = cache_size or DecodeConfig().resolve(model_config).cache_size
    state = init_decode_state(model_config, batch, cache_size)
    blocks = dict(state.blocks)
    for name, learnt in tuned.items():
        fresh = blocks[name]
        learnt = _block_state(learnt, batch, model_config.dtype)
        blocks[name] = RWKVBlockState(
            *(fresh[i] if learnt[i] is None else learnt[i] for i in range(len(fresh)))
        )
    return DecodeState(state.lengths, blocks)


@dataclasses.dataclass(frozen=True)
class StateMethod:
    """What `FinetuneProgram` trains for finetune=state (see the module docstring)."""

    model_config: RWKVXConfig
    tuning: StateTuningConfig

    def init(self, params, key: jax.Array) -> dict:
        del params, key
        return init_tuned_states(self.model_config, self.tuning)

    def model_params(self, params, tuned):
        return with_initial_states(params, tuned)

    def forward_context(self):
        return initial_states()

    def inference(self, params, tuned):
        return params, tuned_decode_state(self.model_config, host_params(tuned))

    def export(
        self, workdir: str, model_config: RWKVXConfig, params, tuned, config: TrainConfig,
        log: Log,
    ) -> str:  # fmt: skip
        """Writes `export/state.npz`, a decode state of one sequence (`generate --checkpoint
        BASE --state-in` reads it). Returns the export folder."""
        del params
        export_dir = os.path.dirname(exported_params_dir(workdir))
        state = tuned_decode_state(model_config, host_params(tuned))
        if jax.process_index() == 0:
            os.makedirs(export_dir, exist_ok=True)
            path = os.path.join(export_dir, STATE_FILE)
            extra = {
                "tuned": "state tuning",
                "base": config.init_checkpoint,
                "token_shift": self.tuning.token_shift,
                "steps": config.steps,
            }
            save_state(path, model_config, state, extra=extra)
            log(f"exported the tuned state to {path} (use: generate --state-in {path})")
        return export_dir
