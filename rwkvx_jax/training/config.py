"""Typed training config: a frozen `TrainConfig`, named recipes, JSON files, dotted overrides.

A run is described by one `TrainConfig`. Start from a named recipe (`RECIPES`) or a JSON file
(the fields of `TrainConfig`, nested; `"base": "<recipe>"` starts from that recipe, otherwise
from the defaults, which are the `tiny` recipe), then apply command-line overrides such as
`optimizer.lr=3e-4 data.ctx=256 mesh=2,2,2 model=rwkvx-0.22b model.dtype=bfloat16`. Every value
is converted to and checked against the field's declared type; unknown keys are errors that name
the known ones.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import os
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from rwkvx_jax.config import PRESETS, RWKVXConfig, preset
from rwkvx_jax.training.optimizer import OptimizerConfig

STAGES = ("pretrain", "stage1", "stage2")
REMAT_POLICIES = ("none", "full", "dots", "ordered")
EXPAND_INITS = ("copy", "zero")
TOKENIZERS = ("auto", "bytes", "world")
ORDERS = ("shuffle", "magic_prime", "sequential")
RECORDS = ("text", "chat")
FINETUNE_METHODS = ("none", "lora", "state")
# The dense kernels LoRA can adapt, as `<module>.<layer>` of every block (RWKV-7 r/k/v/o and
# the channel mix; the sparse blocks' q (named receptance, as officially)/k/v/o and FFN).
LORA_TARGETS = ("att.receptance", "att.key", "att.value", "att.output", "ffn.key", "ffn.value")


class TrainConfigError(ValueError):
    """A training config, file or override is invalid; the message names the key and the fix."""


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Where the tokens come from and how they are cut into batches.

    Attributes:
      corpus: "stdlib" (the local Python standard library's source as bytes, always present),
        a path to a `.jsonl` file (one {"text": ...} object per line, tokenized and packed), or
        a binidx prefix (`PREFIX.bin` + `PREFIX.idx`, as RWKV-LM's make_data writes them).
      ctx: training context T; each sample is T + 1 contiguous tokens.
      batch_size: global sequences per step (all hosts together); a multiple of the mesh's
        data x fsdp size and of the number of processes.
      order: window order: "shuffle" (grain, seeded), "magic_prime" (RWKV-LM's), "sequential".
      max_tokens: read at most this many tokens of the corpus (stdlib and jsonl); None = all.
      tokenizer: for jsonl: "bytes" (UTF-8 bytes, vocab 256), "world" (RWKV World, vocab
        65536) or "auto" (by the model's vocabulary size).
      jsonl_field: the jsonl key holding each document's text (records="text").
      records: what each jsonl line holds: "text" (a document, every token trained on) or
        "chat" (a conversation, `{"messages": [{"role": ..., "content": ...}, ...]}`, rendered
        in the RWKV World chat format with the loss on the assistant's answers only; see
        `rwkvx_jax.data.chat`; fine-tuning only).
      prefetch: batches read ahead by grain threads.
    """

    corpus: str = "stdlib"
    ctx: int = 128
    batch_size: int = 16
    order: str = "shuffle"
    max_tokens: int | None = None
    tokenizer: str = "auto"
    jsonl_field: str = "text"
    records: str = "text"
    prefetch: int = 2

    def __post_init__(self):
        _check_positive(self, "ctx", "batch_size")
        _check_choice(self, "order", ORDERS)
        _check_choice(self, "tokenizer", TOKENIZERS)
        _check_choice(self, "records", RECORDS)
        if self.records == "chat" and not self.corpus.endswith(".jsonl"):
            raise TrainConfigError(
                f"data.records='chat' reads a .jsonl file of conversations, got data.corpus="
                f"{self.corpus!r}"
            )
        if self.max_tokens is not None and self.max_tokens < self.ctx + 1:
            raise TrainConfigError(
                f"data.max_tokens={self.max_tokens} is below one sample (data.ctx + 1 = "
                f"{self.ctx + 1})"
            )
        if self.prefetch < 0:
            raise TrainConfigError(f"data.prefetch must be >= 0, got {self.prefetch}")


@dataclasses.dataclass(frozen=True)
class LossConfig:
    """The training loss (SPEC §7): mean token cross-entropy, L2Wrap, optional LongCE.

    Attributes:
      l2wrap: add RWKV-LM's L2Wrap gradient on the largest logit (the loss value is unchanged).
      longce: weight each token's loss by LongCE (needs ctx > longce_start to matter).
      longce_window, longce_stride, longce_start, longce_cap: see `losses.longce_loss`.
      chunk_tokens: the loss makes the logits this many positions at a time and never holds
        [B, T, V] (`losses.chunked_token_cross_entropy`); a memory bound, not a change of
        the loss. 0 makes them whole, in one head forward: no recomputation, for when
        [B, T, V] fits (the chunked loss runs the head forward twice).
    """

    l2wrap: bool = True
    longce: bool = False
    longce_window: int = 4000
    longce_stride: int = 4000
    longce_start: int = 8000
    longce_cap: float = 10.0
    chunk_tokens: int = 1024

    def __post_init__(self):
        _check_positive(self, "longce_window", "longce_stride", "longce_cap")
        if self.chunk_tokens < 0:
            raise TrainConfigError(
                f"loss.chunk_tokens must be >= 0 (0: whole logits), got {self.chunk_tokens}"
            )
        if self.longce_start < self.longce_window:
            raise TrainConfigError(
                f"loss.longce_start={self.longce_start} must be >= loss.longce_window="
                f"{self.longce_window}"
            )


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    """Orbax checkpointing of the train state and the data iterator.

    Attributes:
      every: save every this many steps (the final step is always saved); 0 saves only at the
        end.
      keep: most recent checkpoints kept.
      async_save: write checkpoints in a background thread while training goes on.
      export: at the end, also write the params in the inference format (`export/params`) and,
        when torch is installed, as an official `.pth` (`export/model.pth`).
    """

    every: int = 100
    keep: int = 3
    async_save: bool = True
    export: bool = True

    def __post_init__(self):
        if self.every < 0:
            raise TrainConfigError(f"checkpoint.every must be >= 0, got {self.every}")
        _check_positive(self, "keep")


@dataclasses.dataclass(frozen=True)
class SampleConfig:
    """The sample printed after training (byte-level or World-tokenizer models).

    Attributes:
      prompt: text to continue.
      tokens: tokens to generate; 0 disables the sample.
      temperature: sampling temperature (0 = greedy).
      top_p: nucleus mass, in (0, 1] (1 = off).
      seed: sampling seed.
    """

    prompt: str = "def "
    tokens: int = 64
    temperature: float = 1.0
    top_p: float = 0.85
    seed: int = 0

    def __post_init__(self):
        if self.tokens < 0:
            raise TrainConfigError(f"sample.tokens must be >= 0, got {self.tokens}")
        if self.tokens and not self.prompt:
            raise TrainConfigError("sample.prompt must be non-empty when sample.tokens > 0")
        if not self.temperature >= 0:
            raise TrainConfigError(f"sample.temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise TrainConfigError(f"sample.top_p must be in (0, 1], got {self.top_p}")


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """LoRA adapters (`finetune=lora`): W + (alpha / rank) A @ B on the chosen dense kernels.

    Attributes:
      rank: r, the inner width of each adapter (A [in, r], B [r, out]; B starts at zero, so the
        adapted model starts as the base model exactly).
      alpha: the adapter's scale is alpha / rank.
      targets: which kernels of every block get an adapter, from `LORA_TARGETS`
        (`lora.targets=att.key,att.value`).
      train_vectors: also train the small vectors (token-shift mixes, decay and gate biases,
        LayerNorms: every parameter with fewer than two dims over 1); their trained values go
        into the adapter file beside A and B.
    """

    rank: int = 8
    alpha: float = 16.0
    targets: tuple[str, ...] = LORA_TARGETS
    train_vectors: bool = False

    def __post_init__(self):
        _check_positive(self, "rank", "alpha")
        unknown = [t for t in self.targets if t not in LORA_TARGETS]
        if unknown or not self.targets:
            raise TrainConfigError(
                f"lora.targets must be a non-empty list from {LORA_TARGETS}, got {self.targets}"
            )

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


@dataclasses.dataclass(frozen=True)
class StateTuningConfig:
    """State tuning (`finetune=state`): learn each RWKV-7 block's initial decode state.

    Attributes:
      token_shift: also learn the initial token-shift inputs (the time mix's and the channel
        mix's previous token), not only the WKV state.
    """

    token_shift: bool = False


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """One training run. The defaults are the `tiny` recipe (a few minutes on one CPU).

    Attributes:
      name: recipe name (for logs).
      model: the model (a preset name on the command line: `model=rwkvx-0.22b`).
      optimizer: optimiser and schedule (SPEC §7); `optimizer.grad_accum_steps` = k averages k
        steps' gradients per update.
      data: corpus and batching.
      loss: loss terms.
      checkpoint: checkpoint cadence and export.
      sample: the greedy sample printed by `train.py` at the end.
      mesh: (data, fsdp, tensor, context) mesh sizes, or (data, fsdp, tensor) with context 1;
        one may be -1 (all remaining devices). context > 1 cuts each sequence into that many
        contiguous shards (context parallelism, docs/CONTEXT_PARALLEL.md).
      steps: training steps (batches). With grad_accum_steps = k the optimiser updates every k
        steps; schedules count updates.
      seed: parameter init and data shuffle seed.
      remat: rematerialise each block in the backward pass: "none", "full" (save nothing
        inside a block), "dots" (save matmul outputs without batch dims) or "ordered" (as
        "full", with the backward pass finishing each block before the next; the least memory
        with FSDP, see `rwkvx_jax.training.remat.block_transforms`).
      log_every: write metrics (JSONL, TensorBoard, progress bar) every this many steps.
      workdir: where checkpoints, metrics, plots and exports go; an existing workdir resumes.
      stage: "pretrain" (all params), "stage1" (only the sparse blocks `moba_*` train; the rest
        are frozen and carry no optimiser state) or "stage2" (all params, long context).
      init_checkpoint: params to start from (when not resuming): an official `.pth` or a
        directory written by `convert_torch.py` / a previous run's `export/params`. A RWKV-7
        checkpoint (no sparse blocks) is expanded to the model's n_attn_layer. None: random init
        (stage1 then expands a random RWKV-7).
      expand_init: how new sparse blocks start: "copy" (official) or "zero" (identity).
      finetune: "none" (train the params as `stage` says), "lora" (low-rank adapters on a frozen
        `init_checkpoint`, see `lora`) or "state" (each RWKV-7 block's initial state on a frozen
        `init_checkpoint`, see `state_tuning`); the frozen params get no optimiser state.
      lora: the adapters of finetune="lora".
      state_tuning: what finetune="state" learns.
    """

    name: str = "tiny"
    model: RWKVXConfig = dataclasses.field(default_factory=lambda: preset("tiny"))
    optimizer: OptimizerConfig = dataclasses.field(
        default_factory=lambda: OptimizerConfig(
            lr=3e-3,
            lr_final=3e-4,
            schedule="cosine",
            warmup_steps=20,
            total_steps=300,
            weight_decay=1e-3,
        )
    )
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    loss: LossConfig = dataclasses.field(default_factory=LossConfig)
    checkpoint: CheckpointConfig = dataclasses.field(default_factory=CheckpointConfig)
    sample: SampleConfig = dataclasses.field(default_factory=SampleConfig)
    mesh: tuple[int, ...] = (-1, 1, 1)
    steps: int = 300
    seed: int = 0
    remat: str = "none"
    log_every: int = 1
    workdir: str = "runs/tiny"
    stage: str = "pretrain"
    init_checkpoint: str | None = None
    expand_init: str = "copy"
    finetune: str = "none"
    lora: LoraConfig = dataclasses.field(default_factory=LoraConfig)
    state_tuning: StateTuningConfig = dataclasses.field(default_factory=StateTuningConfig)

    def __post_init__(self):
        _check_positive(self, "steps", "log_every")
        _check_choice(self, "remat", REMAT_POLICIES)
        _check_choice(self, "stage", STAGES)
        _check_choice(self, "expand_init", EXPAND_INITS)
        _check_choice(self, "finetune", FINETUNE_METHODS)
        self._check_finetune()
        if (
            len(self.mesh) not in (3, 4)
            or self.mesh.count(-1) > 1
            or any(s == 0 or s < -1 for s in self.mesh)
        ):
            raise TrainConfigError(
                f"mesh={self.mesh}: give (data, fsdp, tensor) or (data, fsdp, tensor, context) "
                "sizes >= 1, at most one -1"
            )
        if self.stage == "stage1" and self.model.n_attn_layer == 0:
            raise TrainConfigError(
                "stage='stage1' trains the sparse blocks, but model.n_attn_layer is 0"
            )
        if self.loss.longce and self.data.ctx <= self.loss.longce_start:
            raise TrainConfigError(
                f"loss.longce=true does nothing at data.ctx={self.data.ctx} <= "
                f"loss.longce_start={self.loss.longce_start}"
            )

    def _check_finetune(self) -> None:
        if self.finetune == "none":
            if self.data.records == "chat":
                raise TrainConfigError(
                    "data.records='chat' trains on the answers only, which fine-tuning does: "
                    "set finetune=lora or finetune=state"
                )
            return
        if self.init_checkpoint is None:
            raise TrainConfigError(
                f"finetune={self.finetune} adapts a checkpoint: set init_checkpoint= (an official "
                ".pth or a converted / exported params directory)"
            )
        if self.stage == "stage1":
            raise TrainConfigError(
                f"finetune={self.finetune} freezes the base itself; use stage=pretrain"
            )
        if self.loss.longce:
            raise TrainConfigError(f"finetune={self.finetune} does not take loss.longce=true")

    def replace(self, **changes: Any) -> TrainConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return json.loads(self.to_json())

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True)


def _check_positive(obj, *names: str) -> None:
    for name in names:
        value = getattr(obj, name)
        if not value > 0:
            raise TrainConfigError(f"{_section(obj)}{name} must be > 0, got {value!r}")


def _check_choice(obj, name: str, choices: Sequence[str]) -> None:
    value = getattr(obj, name)
    if value not in choices:
        raise TrainConfigError(f"{_section(obj)}{name} must be one of {choices}, got {value!r}")


def _section(obj) -> str:
    names = {
        DataConfig: "data.", LossConfig: "loss.", CheckpointConfig: "checkpoint.",
        SampleConfig: "sample.", LoraConfig: "lora.",
    }  # fmt: skip
    return names.get(type(obj), "")


# ----------------------------------------------------------------------------- recipes

# Paths the big recipes expect; override `data.corpus=...` / `init_checkpoint=...`.
MINIPILE = "data/minipile/minipile_text_document"
PROLONG_64K = "data/prolong-64k/prolong_64k_text_document"
RWKV7_0P1B = "checkpoints/rwkv7-g1-0.1b.pth"
RWKV7_2P9B = "checkpoints/rwkv7-g1-2.9b.pth"

# SPEC §7 optimiser: Adam, decoupled decay 1e-3 on matrices, betas (0.9, 0.99), eps 1e-18,
# clip 1.0, lr 1e-5 constant after 10 warmup steps from 1%.
_PAPER_OPTIMIZER = OptimizerConfig(
    lr=1e-5, warmup_steps=10, warmup_init_fraction=0.01, schedule="constant", weight_decay=1e-3,
    b1=0.9, b2=0.99, eps=1e-18, grad_clip=1.0,
)  # fmt: skip

# Stage 1: ~1.5B MiniPile tokens at ctx 1024 in batches of 64 -> 1.5e9 / 65,536 = 22,888 steps.
_STAGE1_STEPS = 22_888
# Stage 2 (3.6B per SPEC §7): 5,000 steps x 64 sequences x 64,000 tokens = 20.5B tokens.
_STAGE2_STEPS = 5_000


def _tiny() -> TrainConfig:
    """`tiny` (default): tiny RWKV-X (V256 C128 L4 A2) on stdlib bytes, ctx 128, batch 16,
    300 steps, lr 3e-3 cosine to 3e-4; a few minutes on one CPU."""
    return TrainConfig()


def _stage1(model: str, init: str, mesh: tuple[int, int, int]) -> TrainConfig:
    return TrainConfig(
        name=f"{model}-stage1",
        model=preset(f"rwkvx-{model}", dtype="bfloat16"),
        optimizer=_PAPER_OPTIMIZER,
        data=DataConfig(corpus=MINIPILE, ctx=1024, batch_size=64, order="magic_prime"),
        checkpoint=CheckpointConfig(every=1000, keep=3),
        sample=SampleConfig(prompt="The Eiffel Tower is in", tokens=32),
        mesh=mesh,
        steps=_STAGE1_STEPS,
        remat="none",
        log_every=10,
        workdir=f"runs/{model}-stage1",
        stage="stage1",
        init_checkpoint=init,
        expand_init="copy",
    )


def _stage2(model: str, mesh: tuple[int, int, int]) -> TrainConfig:
    return TrainConfig(
        name=f"{model}-stage2",
        model=preset(f"rwkvx-{model}", dtype="bfloat16"),
        optimizer=_PAPER_OPTIMIZER,
        data=DataConfig(corpus=PROLONG_64K, ctx=64_000, batch_size=64, order="magic_prime"),
        checkpoint=CheckpointConfig(every=250, keep=3),
        sample=SampleConfig(prompt="The Eiffel Tower is in", tokens=32),
        mesh=mesh,
        steps=_STAGE2_STEPS,
        # Ordered remat: the 3.6b step at ctx 64K fits a v5p chip (89.6 GiB of temporaries; 98.4
        # with one sequence per chip under "full"; docs/BENCHMARKS.md).
        remat="ordered",
        log_every=1,
        workdir=f"runs/{model}-stage2",
        stage="stage2",
        init_checkpoint=f"runs/{model}-stage1/export/params",
    )


def _stage3(model: str, ctx: int, batch: int, mesh: tuple[int, ...]) -> TrainConfig:
    """Stage 2 continued at `ctx` tokens per sequence, each sequence cut over the mesh's
    context axis (docs/CONTEXT_PARALLEL.md): fewer sequences per step than chips."""
    name = f"{model}-stage3-{ctx // 1024}k" if ctx < 2**20 else f"{model}-stage3-{ctx // 2**20}m"
    return _stage2(model, mesh).replace(
        name=name,
        data=DataConfig(corpus=PROLONG_64K, ctx=ctx, batch_size=batch, order="magic_prime"),
        steps=1_000,
        workdir=f"runs/{name}",
        init_checkpoint=f"runs/{model}-stage2/export/params",
    )


RECIPES: dict[str, Callable[[], TrainConfig]] = {
    "tiny": _tiny,
    # 0.22B: RWKV-7 0.1B (L12 C768) + 4 sparse blocks. Data-parallel fits easily.
    "0.22b-stage1": lambda: _stage1("0.22b", RWKV7_0P1B, (-1, 1, 1)),
    "0.22b-stage2": lambda: _stage2("0.22b", (1, -1, 1)),
    # 3.6B: RWKV-7 2.9B (L32 C2560) + 8 sparse blocks. FSDP over all devices.
    "3.6b-stage1": lambda: _stage1("3.6b", RWKV7_2P9B, (1, -1, 1)),
    "3.6b-stage2": lambda: _stage2("3.6b", (1, -1, 1)),
    # 3.6B past one chip's sequence: 64K tokens of a sequence per chip (a v5p-128, 64 chips:
    # `--aot-topology v5p:4x4x4`), 16 sequences of 256K or 4 of 1M per step (4.2M tokens).
    "3.6b-stage3-256k": lambda: _stage3("3.6b", 2**18, 16, (1, 16, 1, 4)),
    "3.6b-stage3-1m": lambda: _stage3("3.6b", 2**20, 4, (1, 4, 1, 16)),
}


def recipe(name: str) -> TrainConfig:
    """A named recipe (see `RECIPES`)."""
    if name not in RECIPES:
        raise TrainConfigError(f"unknown recipe {name!r}; known: {sorted(RECIPES)}")
    return RECIPES[name]()


# ----------------------------------------------------------------------------- typed values


def _hints(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _type_name(tp) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


_TRUE, _FALSE = ("true", "1", "yes", "on"), ("false", "0", "no", "off")


def _convert(value: Any, tp: Any, key: str, from_text: bool) -> Any:
    """`value` as type `tp` (parsed from text when `from_text`), or a TrainConfigError."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        members = [m for m in typing.get_args(tp) if m is not type(None)]
        if value is None or (from_text and str(value).strip().lower() in ("none", "null")):
            return None
        return _convert(value, members[0], key, from_text)
    if origin is tuple:
        return _convert_tuple(value, tp, key, from_text)
    if dataclasses.is_dataclass(tp):
        raise TrainConfigError(
            f"{key} is a section; set its fields ({key}.<field>=...), known fields: "
            f"{sorted(_hints(tp))}"
        )
    expected = f"{key} expects {_type_name(tp)}, got {value!r}"
    if tp is bool:
        if from_text:
            text = str(value).strip().lower()
            if text in _TRUE or text in _FALSE:
                return text in _TRUE
            raise TrainConfigError(f"{expected} (use true/false)")
        if isinstance(value, bool):
            return value
        raise TrainConfigError(expected)
    if tp is int:
        if from_text:
            try:
                return int(str(value).replace("_", ""))
            except ValueError:
                raise TrainConfigError(expected) from None
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise TrainConfigError(expected)
    if tp is float:
        if from_text:
            try:
                return float(value)
            except ValueError:
                raise TrainConfigError(expected) from None
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        raise TrainConfigError(expected)
    if tp is str:
        if isinstance(value, str):
            return value
        raise TrainConfigError(expected)
    raise TrainConfigError(f"{key}: unsupported field type {tp!r}")


def _convert_tuple(value: Any, tp: Any, key: str, from_text: bool) -> tuple:
    args = typing.get_args(tp)
    if from_text:
        text = str(value).strip()
        if text.startswith(("[", "(")):
            text = text[1:-1]
        items = [item.strip() for item in text.split(",") if item.strip()]
    elif isinstance(value, list | tuple):
        items = list(value)
    else:
        raise TrainConfigError(f"{key} expects a list, got {value!r}")
    if len(args) == 2 and args[1] is Ellipsis:
        item_types = [args[0]] * len(items)
    else:
        if len(items) != len(args):
            raise TrainConfigError(f"{key} expects {len(args)} values, got {value!r}")
        item_types = list(args)
    return tuple(
        _convert(item, item_tp, f"{key}[{i}]", from_text)
        for i, (item, item_tp) in enumerate(zip(items, item_types, strict=True))
    )


def _unknown_key(key: str, name: str, known: Sequence[str]) -> TrainConfigError:
    close = difflib.get_close_matches(name, known, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return TrainConfigError(f"unknown config key {key!r}{hint}; known here: {sorted(known)}")


def _model_from(value: Any, base: RWKVXConfig, key: str, from_text: bool) -> RWKVXConfig:
    """A model config from a preset name, or a dict of fields (optionally with "preset")."""
    if isinstance(value, str):
        if value not in PRESETS:
            raise TrainConfigError(
                f"{key}: unknown model preset {value!r}; known: {sorted(PRESETS)}"
            )
        return preset(value)
    if isinstance(value, Mapping):
        fields = dict(value)
        model = (
            _model_from(fields.pop("preset"), base, key, from_text) if "preset" in fields else base
        )
        return _with_fields(model, fields, key, from_text)
    raise TrainConfigError(f"{key} expects a preset name or an object of fields, got {value!r}")


def _with_fields(obj, fields: Mapping[str, Any], prefix: str, from_text: bool):
    """A copy of the frozen dataclass `obj` with `fields` converted and set (recursively)."""
    hints = _hints(type(obj))
    changes = {}
    for name, value in fields.items():
        key = f"{prefix}.{name}" if prefix else name
        if name not in hints:
            raise _unknown_key(key, name, list(hints))
        tp = hints[name]
        current = getattr(obj, name)
        if tp is RWKVXConfig:
            changes[name] = _model_from(value, current, key, from_text)
        elif dataclasses.is_dataclass(tp) and isinstance(value, Mapping):
            changes[name] = _with_fields(current, value, key, from_text)
        else:
            changes[name] = _convert(value, tp, key, from_text)
    try:
        return dataclasses.replace(obj, **changes)
    except TrainConfigError:
        raise
    except (ValueError, TypeError) as err:
        where = f" in {prefix}" if prefix else ""
        raise TrainConfigError(f"invalid value{where}: {err}") from err


def config_from_dict(data: Mapping[str, Any], base: TrainConfig | None = None) -> TrainConfig:
    """A TrainConfig from nested JSON-style data, on top of `base` (or of data["base"]).

    Args:
      data: `TrainConfig` fields, nested per section; `"base": "<recipe>"` picks the starting
        recipe; `"model"` may be a preset name, or an object of model fields with an optional
        "preset".
      base: the starting config when data has no "base" (default: the defaults = `tiny`).
    """
    data = dict(data)
    if "base" in data:
        base = recipe(_convert(data.pop("base"), str, "base", False))
    return _with_fields(base or TrainConfig(), data, "", from_text=False)


def load_config(name_or_path: str) -> TrainConfig:
    """A named recipe, or a JSON file of `TrainConfig` fields (see `config_from_dict`)."""
    if name_or_path in RECIPES:
        return recipe(name_or_path)
    if not os.path.isfile(name_or_path):
        raise TrainConfigError(
            f"--config {name_or_path!r} is neither a recipe ({sorted(RECIPES)}) nor a file"
        )
    with open(name_or_path) as f:
        try:
            data = json.load(f)
        except json.JSONDecodeError as err:
            raise TrainConfigError(f"{name_or_path}: invalid JSON ({err})") from err
    if not isinstance(data, dict):
        raise TrainConfigError(f"{name_or_path}: expected a JSON object, got {type(data).__name__}")
    try:
        return config_from_dict(data)
    except TrainConfigError as err:
        raise TrainConfigError(f"{name_or_path}: {err}") from err


def apply_overrides(config: TrainConfig, overrides: Sequence[str]) -> TrainConfig:
    """Applies `key=value` overrides (dotted keys, values parsed by each field's type).

    Examples: `steps=100`, `optimizer.lr=3e-4`, `data.corpus=/data/minipile_text_document`,
    `mesh=2,2,2`, `model=rwkvx-0.22b`, `model.dtype=bfloat16`, `init_checkpoint=none`.
    All overrides are applied together (so `model.n_rwkv_layer=2 model.n_attn_layer=2` never
    passes through an invalid state); a later value for the same key wins, and `model=<preset>`
    starts the model over from that preset.
    """
    merged: dict[str, Any] = {}
    for override in overrides:
        key, sep, value = override.partition("=")
        key = key.strip()
        if not sep or not key or any(not part for part in key.split(".")):
            raise TrainConfigError(f"override {override!r} must look like key=value")
        *sections, leaf = key.split(".")
        node = merged
        for part in sections:
            child = node.get(part)
            if isinstance(child, str):  # model=<preset> followed by model.<field>=...
                child = {"preset": child}
            elif child is None:
                child = {}
            node[part] = child
            node = child
        node[leaf] = value
    return _with_fields(config, merged, "", from_text=True)
