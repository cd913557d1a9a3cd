"""Ahead-of-time compilation of the train step for a TPU slice this host does not have."""

from __future__ import annotations

import re
from collections import Counter

from rwkvx_jax import ops
from rwkvx_jax import sharding as shd
from rwkvx_jax.config import RWKVXConfig
from rwkvx_jax.training.config import TrainConfig
from rwkvx_jax.training.finetune import program_class


def describe_memory(compiled) -> str:
    """`compiled.memory_analysis()` as one line of per-device sizes."""
    stats = compiled.memory_analysis()
    if stats is None:
        return "memory analysis: not available on this backend"
    fields = (
        ("arguments", "argument_size_in_bytes"),
        ("outputs", "output_size_in_bytes"),
        ("aliased", "alias_size_in_bytes"),
        ("temporaries", "temp_size_in_bytes"),
        ("code", "generated_code_size_in_bytes"),
    )
    parts = [
        f"{label} {_bytes(getattr(stats, attr))}" for label, attr in fields if hasattr(stats, attr)
    ]
    return "memory analysis of the train step (per device): " + ", ".join(parts)


_COLLECTIVE = re.compile(
    r"=\s*(?P<shape>\(.*?\)|\S+)\s+(?P<kind>all-gather|all-reduce|reduce-scatter|"
    r"collective-permute|all-to-all)(?:-start)?\("
)
_ARRAY = re.compile(r"\b(pred|[subf]\d+|bf16)\[([\d,]*)\]")
_GROUPS = re.compile(r"replica_groups=\{(\{[\d,]*\}(?:,\{[\d,]*\})*)\}")
_ELEMENT_BYTES = {"pred": 1, "bf16": 2}


def _array_bytes(dtype: str, dims: str) -> int:
    size = _ELEMENT_BYTES.get(dtype) or max(int(dtype[1:]) // 8, 1)
    for d in filter(None, dims.split(",")):
        size *= int(d)
    return size


def collective_bytes(hlo_text: str) -> Counter:
    """Bytes of each kind of collective in a compiled module's HLO text, per device.

    Counts each collective instruction's result (for an asynchronous `-start`, its largest
    array: the gathered / received buffer), skipping the ones whose replica groups are single
    devices (no data moves: shard_map's transposes over size-1 axes leave those). A measure of
    what crosses devices per step, not a timing: all-gather counts the gathered array,
    reduce-scatter its scattered result, all-reduce the reduced array.

    Returns:
      Counter {"all-gather": bytes, "all-reduce": ..., "reduce-scatter": ...,
      "collective-permute": ..., "all-to-all": ...} (kinds absent count 0).
    """
    totals: Counter = Counter()
    for line in hlo_text.splitlines():
        match = _COLLECTIVE.search(line)
        if match is None or "-done(" in line:
            continue
        groups = _GROUPS.search(line)
        if groups and all("," not in g for g in groups.group(1).split("},{")):
            continue  # every group is one device
        if match["kind"] == "collective-permute" and "source_target_pairs={}" in line:
            continue
        arrays = [_array_bytes(*a) for a in _ARRAY.findall(match["shape"])]
        totals[match["kind"]] += max(arrays) if "-start(" in line else sum(arrays)
    return totals


def describe_collectives(compiled) -> str:
    """`collective_bytes` of a compiled step as one line."""
    totals = collective_bytes(compiled.as_text())
    parts = [f"{kind} {_bytes(n)}" for kind, n in sorted(totals.items())] or ["none"]
    return "collectives of the train step (per device): " + ", ".join(parts)


def _bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n} B"
        n /= 1024
    return str(n)


def tpu_topology_devices(topology: str, chips_per_host_bounds=(2, 2, 1)) -> list:
    """The devices of a TPU slice described by name (e.g. "v5p:4x4x2" = v5p-64), no hardware.

    Needs libtpu installed (it compiles for the chips); raises RuntimeError otherwise.
    """
    from jax.experimental import topologies

    try:
        description = topologies.get_topology_desc(
            platform="tpu",
            topology_name=topology,
            chip_config_name="default",
            chips_per_host_bounds=tuple(chips_per_host_bounds),
            num_slices=1,
        )
    except Exception as err:  # libtpu missing or an unknown topology: say which
        raise RuntimeError(
            f"cannot describe TPU topology {topology!r} on this machine ({err}); ahead-of-time "
            "TPU compilation needs libtpu (pip install -e '.[aot]')"
        ) from err
    return list(description.devices)


def aot_compile(config: TrainConfig, devices, model_config: RWKVXConfig | None = None):
    """Compiles the train step of `config` for `devices` without running (or owning) them.

    Checks that the config shards onto that slice and reports the per-device memory the step
    needs. The params are abstract (`jax.eval_shape`): nothing is allocated. Kernel backends
    "auto" become the kernels of the devices' platform (the Pallas TPU ones for a TPU slice),
    not of this host's.

    Returns:
      (TrainProgram, or FinetuneProgram for a `finetune=` config; compiled step).
    """
    mesh = shd.make_mesh(config.mesh, devices=devices)
    model_config = model_config or config.model
    platform_backend = ops.platform_backend(devices[0].platform).value
    model_config = model_config.replace(
        **{
            name: platform_backend
            for name in ("wkv_backend", "attention_backend")
            if getattr(model_config, name) == "auto"
        }
    )
    program = program_class(config).create(config, model_config, mesh)
    return program, program.compile(config.data.ctx)
