"""Ahead-of-time compilation of the train step for a TPU slice this host does not have."""

from __future__ import annotations

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
