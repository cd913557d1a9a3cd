"""Random checkpoints in the official layout, for tests, benchmarks and the demo.

Values are drawn at scales that keep a model numerically sane (unit-ish activations, decays
spread across their range, every LoRA non-zero) so parity tests exercise every term.
"""

from __future__ import annotations

from collections import OrderedDict

import ml_dtypes
import numpy as np

from rwkvx_jax.checkpoints.official_layout import layout, params_from_state_dict
from rwkvx_jax.config import RWKVXConfig, preset

# The `--demo` model of the command lines: the `tiny` preset (byte vocabulary), seeded.
DEMO_PRESET = "tiny"
DEMO_SEED = 0


def _draw(rng: np.random.Generator, key: str, shape: tuple[int, ...], n_embd: int) -> np.ndarray:
    name = key.split(".")[-1] if not key.endswith(".weight") else key.split(".")[-2]
    normal = lambda scale: rng.standard_normal(shape) * scale
    if key.endswith("emb.weight"):
        return normal(1.0)
    if name in ("ln0", "ln1", "ln2", "ln_out", "ln_x"):
        return 1.0 + normal(0.1) if key.endswith(".weight") else normal(0.1)
    if key.endswith(".bias"):
        return normal(0.1)
    if name.startswith("x_"):
        return rng.uniform(0.0, 1.0, shape)
    if name == "w0":
        return rng.uniform(-4.0, 2.0, shape)
    if name in ("a0", "v0"):
        return normal(0.5)
    if name in ("w1", "a1", "v1", "g1"):
        return normal(shape[0] ** -0.5)
    if name in ("w2", "a2", "v2", "g2"):
        return normal(0.5 * shape[0] ** -0.5)
    if name == "k_k":
        return 0.85 + normal(0.1)
    if name == "k_a":
        return 1.0 + normal(0.1)
    if name == "r_k":
        return normal(0.1)
    if name == "head":
        return normal(n_embd**-0.5)
    if name in ("receptance", "key", "value", "output"):
        fan_in = shape[1]
        return normal((0.5 if name == "output" else 1.0) * fan_in**-0.5)
    raise KeyError(f"no random rule for {key}")


def random_state_dict(config: RWKVXConfig, seed: int = 0, dtype="float32") -> OrderedDict:
    """An official-layout state dict (numpy) for `config`, filled with seeded random values.

    Args:
      config: shapes to produce (prefix `rwkv.` and `moba.{j}` keys when n_attn_layer > 0).
      seed: numpy RNG seed.
      dtype: "float32", "bfloat16" or "float16".
    """
    rng = np.random.default_rng(seed)
    np_dtype = np.dtype(ml_dtypes.bfloat16) if dtype == "bfloat16" else np.dtype(dtype)
    out = OrderedDict()
    for entry in layout(config):
        out[entry.key] = _draw(rng, entry.key, entry.shape, config.n_embd).astype(np_dtype)
    return out


def demo_model(seed: int = DEMO_SEED) -> tuple[RWKVXConfig, dict]:
    """The `--demo` model: the `tiny` preset (byte vocabulary) with seeded random weights."""
    config = preset(DEMO_PRESET)
    return config, params_from_state_dict(random_state_dict(config, seed), config)
