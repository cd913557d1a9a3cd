"""Model configuration: a frozen `RWKVXConfig`, named presets, JSON round trip, shape inference."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from collections.abc import Mapping
from typing import Any

from pallas_kernels.backends import BACKENDS
from pallas_kernels.wkv7.xla_chunked import DEFAULT_CHUNK_SIZE as DEFAULT_WKV_CHUNK_SIZE

HEAD_SIZE = 64

# "auto" picks the Pallas kernel of a TPU or GPU and "xla_chunked" elsewhere (rwkvx_jax.ops).
WKV_BACKENDS = ATTENTION_BACKENDS = BACKENDS
DTYPES = ("float32", "bfloat16", "float16")


class ConfigError(ValueError):
    """A configuration (or a checkpoint's shapes) is inconsistent; the message says what and why."""


@dataclasses.dataclass(frozen=True)
class RWKVXConfig:
    """Everything that fixes an RWKV-X model's shapes and numerics.

    Attributes:
      vocab_size: V, rows of the embedding and of the head.
      n_embd: C, model width; a multiple of `head_size`.
      n_rwkv_layer: L, number of RWKV-7 blocks.
      n_attn_layer: A, number of top-k chunk sparse-attention blocks (0 = plain RWKV-7).
      head_size: N, fixed at 64 by every released model.
      dim_w, dim_a, dim_v, dim_g: LoRA widths of the decay, in-context rate, value residual and
        gate (read from checkpoints, never from a formula).
      chunk_size: sparse-attention chunk length B.
      top_k: chunks attended per query, counting the query's own chunk.
      dtype: compute dtype; param_dtype: storage dtype of parameters.
      wkv_backend, attention_backend: kernel choice, "auto" picks by platform.
      wkv_chunk_size: chunk length of the chunked WKV-7 form (its default was fastest on CPU).
      block0_v_params: the checkpoint's block 0 carries the (unused) value-residual LoRA
        `v0, v1, v2`; they are kept so that export round-trips bit-exactly.
      allow_dropped_rwkv_blocks: reproduce the official quirk that silently skips the trailing
        RWKV blocks when L % A != 0 (SPEC §5). Off by default: such a config is an error.
    """

    vocab_size: int
    n_embd: int
    n_rwkv_layer: int
    n_attn_layer: int = 0
    head_size: int = HEAD_SIZE
    dim_w: int = 64
    dim_a: int = 64
    dim_v: int = 32
    dim_g: int = 128
    chunk_size: int = 2048
    top_k: int = 3
    dtype: str = "float32"
    param_dtype: str = "float32"
    wkv_backend: str = "auto"
    attention_backend: str = "auto"
    wkv_chunk_size: int = DEFAULT_WKV_CHUNK_SIZE
    block0_v_params: bool = False
    allow_dropped_rwkv_blocks: bool = False

    def __post_init__(self):
        positive = ("vocab_size", "n_embd", "n_rwkv_layer", "head_size", "dim_w", "dim_a")
        positive += ("dim_v", "dim_g", "chunk_size", "top_k", "wkv_chunk_size")
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"{name} must be a positive int, got {value!r}")
        if not isinstance(self.n_attn_layer, int) or self.n_attn_layer < 0:
            raise ConfigError(f"n_attn_layer must be an int >= 0, got {self.n_attn_layer!r}")
        if self.head_size != HEAD_SIZE:
            raise ConfigError(
                f"head_size must be {HEAD_SIZE} (every RWKV-7 / RWKV-X model uses 64), "
                f"got {self.head_size}"
            )
        if self.n_embd % self.head_size:
            raise ConfigError(
                f"n_embd={self.n_embd} is not a multiple of head_size={self.head_size}"
            )
        if self.n_attn_layer > self.n_rwkv_layer:
            raise ConfigError(
                f"n_attn_layer={self.n_attn_layer} exceeds n_rwkv_layer={self.n_rwkv_layer}"
            )
        if (
            self.n_attn_layer > 1
            and self.n_rwkv_layer % self.n_attn_layer
            and not self.allow_dropped_rwkv_blocks
        ):
            dropped = self.n_rwkv_layer % self.n_attn_layer
            raise ConfigError(
                f"n_rwkv_layer={self.n_rwkv_layer} is not divisible by "
                f"n_attn_layer={self.n_attn_layer}: the official block order would silently "
                f"never run the last {dropped} RWKV block(s). Pass "
                "allow_dropped_rwkv_blocks=True (convert_torch.py --allow-dropped-rwkv-blocks) "
                "to reproduce that quirk."
            )
        choices = {
            "dtype": DTYPES,
            "param_dtype": DTYPES,
            "wkv_backend": WKV_BACKENDS,
            "attention_backend": ATTENTION_BACKENDS,
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ConfigError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")

    @property
    def n_head(self) -> int:
        return self.n_embd // self.head_size

    @property
    def ffn_dim(self) -> int:
        return 4 * self.n_embd

    def block_order(self) -> tuple[tuple[str, int], ...]:
        """The execution order (SPEC §5) as ("rwkv", i) / ("attn", j) pairs."""
        rwkv = [("rwkv", i) for i in range(self.n_rwkv_layer)]
        if self.n_attn_layer == 0:
            return tuple(rwkv)
        if self.n_attn_layer == 1:
            return tuple(rwkv) + (("attn", 0),)
        interval = self.n_rwkv_layer // self.n_attn_layer
        order: list[tuple[str, int]] = []
        for j in range(self.n_attn_layer):
            order += rwkv[j * interval : (j + 1) * interval]
            order.append(("attn", j))
        return tuple(order)

    def replace(self, **changes: Any) -> RWKVXConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RWKVXConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown config field(s) {unknown}; known fields: {sorted(known)}")
        return cls(**dict(data))

    @classmethod
    def from_json(cls, text: str) -> RWKVXConfig:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise ConfigError(f"config is not valid JSON: {err}") from err
        if not isinstance(data, dict):
            raise ConfigError(f"config JSON must be an object, got {type(data).__name__}")
        return cls.from_dict(data)

    def shape_hash(self) -> str:
        """A short hash of the fields that fix parameter shapes and model maths."""
        keys = ("vocab_size", "n_embd", "n_rwkv_layer", "n_attn_layer", "head_size", "dim_w")
        keys += ("dim_a", "dim_v", "dim_g", "chunk_size", "top_k", "block0_v_params")
        blob = json.dumps({k: getattr(self, k) for k in keys}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    @classmethod
    def from_torch_state_dict(cls, state_dict: Mapping[str, Any], **overrides: Any) -> RWKVXConfig:
        """Infers a config from an official state dict's tensor shapes (SPEC §2).

        Args:
          state_dict: key -> array-like with a `.shape` (torch tensors or numpy arrays). Either a
            RWKV-X layout (`rwkv.` prefix, `moba.{j}.` blocks) or a plain RWKV-7 layout.
          **overrides: non-shape fields to set (dtype, chunk_size, top_k, backends, ...).
        """
        prefix = "rwkv." if any(k.startswith("rwkv.") for k in state_dict) else ""

        def shape(key: str) -> tuple[int, ...]:
            if key not in state_dict:
                raise ConfigError(f"checkpoint has no key {key!r}, needed to infer the config")
            return tuple(int(d) for d in state_dict[key].shape)

        vocab_size, n_embd = _expect_rank(shape(prefix + "emb.weight"), 2, prefix + "emb.weight")
        block_ids = _indices(state_dict, re.compile(re.escape(prefix) + r"blocks\.(\d+)\."))
        attn_ids = _indices(state_dict, re.compile(r"moba\.(\d+)\."))
        if not block_ids:
            raise ConfigError(f"checkpoint has no '{prefix}blocks.N.' keys")
        for name, ids in (("blocks", block_ids), ("moba", attn_ids)):
            if ids and ids != set(range(len(ids))):
                raise ConfigError(f"{name} indices are not contiguous from 0: {sorted(ids)}")
        att0 = prefix + "blocks.0.att."
        n_head, head_size = _expect_rank(shape(att0 + "r_k"), 2, att0 + "r_k")
        if head_size != HEAD_SIZE:
            raise ConfigError(
                f"{att0}r_k has shape {(n_head, head_size)}: head size {head_size}, "
                f"but RWKV-X models use head size {HEAD_SIZE}"
            )
        if n_head * head_size != n_embd:
            raise ConfigError(
                f"{att0}r_k implies {n_head} heads of {head_size} = {n_head * head_size} "
                f"channels, but emb.weight has {n_embd}"
            )
        lora = {
            "dim_w": shape(att0 + "w1")[-1],
            "dim_a": shape(att0 + "a1")[-1],
            "dim_g": shape(att0 + "g1")[-1],
        }
        if len(block_ids) > 1:
            lora["dim_v"] = shape(prefix + "blocks.1.att.v1")[-1]
        elif att0 + "v1" in state_dict:
            lora["dim_v"] = shape(att0 + "v1")[-1]
        fields = dict(
            vocab_size=vocab_size,
            n_embd=n_embd,
            n_rwkv_layer=len(block_ids),
            n_attn_layer=len(attn_ids),
            head_size=head_size,
            block0_v_params=(att0 + "v1") in state_dict,
            **lora,
        )
        fields.update(overrides)
        return cls(**fields)


def _expect_rank(shape: tuple[int, ...], rank: int, key: str) -> tuple[int, ...]:
    if len(shape) != rank:
        raise ConfigError(f"{key} has shape {shape}, expected a rank-{rank} tensor")
    return shape


def _indices(state_dict: Mapping[str, Any], pattern: re.Pattern) -> set[int]:
    found = set()
    for key in state_dict:
        match = pattern.match(key)
        if match:
            found.add(int(match.group(1)))
    return found


# Released models (SPEC §1). LoRA widths of the released checkpoints.
_LORA_768 = dict(dim_w=64, dim_a=64, dim_v=32, dim_g=128)
_LORA_2560 = dict(dim_w=96, dim_a=96, dim_v=64, dim_g=320)

PRESETS: dict[str, RWKVXConfig] = {
    "rwkvx-0.22b": RWKVXConfig(
        vocab_size=65536, n_embd=768, n_rwkv_layer=12, n_attn_layer=4, **_LORA_768
    ),
    "rwkvx-3.6b": RWKVXConfig(
        vocab_size=65536, n_embd=2560, n_rwkv_layer=32, n_attn_layer=8, **_LORA_2560
    ),
    "rwkv7-world-0.1b": RWKVXConfig(vocab_size=65536, n_embd=768, n_rwkv_layer=12, **_LORA_768),
    "rwkv7-world-2.9b": RWKVXConfig(vocab_size=65536, n_embd=2560, n_rwkv_layer=32, **_LORA_2560),
    # Tiny sizes for tests and the CPU default; small chunks so the sparse regime is exercised.
    "tiny": RWKVXConfig(
        vocab_size=256,
        n_embd=128,
        n_rwkv_layer=4,
        n_attn_layer=2,
        dim_w=16,
        dim_a=16,
        dim_v=16,
        dim_g=32,
        chunk_size=16,
        top_k=3,
    ),
    "tiny-rwkv7": RWKVXConfig(
        vocab_size=256,
        n_embd=128,
        n_rwkv_layer=2,
        n_attn_layer=0,
        dim_w=16,
        dim_a=16,
        dim_v=16,
        dim_g=32,
    ),
}


def preset(name: str, **overrides: Any) -> RWKVXConfig:
    """A named preset with optional field overrides."""
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; known: {sorted(PRESETS)}")
    return PRESETS[name].replace(**overrides)
