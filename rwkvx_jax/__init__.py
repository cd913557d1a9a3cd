"""rwkvx_jax: RWKV-X (RWKV-7 blocks interleaved with top-k chunk sparse attention) in JAX/Flax."""

from rwkvx_jax.api import forward, load
from rwkvx_jax.config import PRESETS, ConfigError, RWKVXConfig, preset
from rwkvx_jax.convert_files import convert_pth, export_pth, export_safetensors
from rwkvx_jax.model import RWKVX

__all__ = [
    "PRESETS",
    "RWKVX",
    "ConfigError",
    "RWKVXConfig",
    "convert_pth",
    "export_pth",
    "export_safetensors",
    "forward",
    "load",
    "preset",
]
