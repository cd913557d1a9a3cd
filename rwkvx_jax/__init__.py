"""rwkvx_jax: RWKV-X (RWKV-7 blocks interleaved with top-k chunk sparse attention) in JAX/Flax."""

from rwkvx_jax.api import forward, load
from rwkvx_jax.checkpoints.conversion import convert_pth, export_pth, export_safetensors
from rwkvx_jax.config import PRESETS, ConfigError, RWKVXConfig, preset
from rwkvx_jax.decoding.decoder import DecodeConfig, Decoder
from rwkvx_jax.decoding.sampling import SamplingConfig
from rwkvx_jax.decoding.weights import DecodeWeights, prepare_decode_weights
from rwkvx_jax.model import RWKVX
from rwkvx_jax.sparse.official import OfficialAttention
from rwkvx_jax.tokenizer import ByteTokenizer, WorldTokenizer, tokenizer_for_vocab

__all__ = [
    "PRESETS",
    "RWKVX",
    "ByteTokenizer",
    "ConfigError",
    "DecodeConfig",
    "DecodeWeights",
    "Decoder",
    "OfficialAttention",
    "RWKVXConfig",
    "SamplingConfig",
    "WorldTokenizer",
    "convert_pth",
    "export_pth",
    "export_safetensors",
    "forward",
    "load",
    "prepare_decode_weights",
    "preset",
    "tokenizer_for_vocab",
]
