"""The WKV-7 GPU kernel's options: `GpuOptions`, their defaults and their validation.

`GpuOptions` holds what a caller may choose (None: automatic) and checks what it can without
the inputs; `GpuOptions.resolve` fills in the automatic settings for one call's shapes and
dtypes and returns the static `gpu_chunk.KernelConfig` that the schedules' kernels take.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from pallas_kernels.wkv7.gpu_chunk import KernelConfig

DOT_PRECISIONS = ("highest", "tf32x3", "bf16")
EXACT_DOT_PRECISIONS = ("highest", "tf32x3", "bf16x3")
# "sequential": one program per (batch x head, value tile) walks the chunks (gpu_sequential);
# "chunk_parallel": the chunk work in parallel, an N x N scan in order
# (experimental.chunk_parallel); "factored": the chunk work in parallel, then a pass in order
# through each chunk's rank-C factors (experimental.factored).
SCHEDULES = ("sequential", "chunk_parallel", "factored")
# The schedules whose backward runs the chunk-parallel gradient kernel (gradient_value_tile).
CHUNK_GRADIENT_SCHEDULES = ("chunk_parallel", "factored")
MIN_CHUNK_SIZE = 16
MAX_CHUNK_SIZE = 64
DEFAULT_CHUNK_SIZE = 16
# What resolve uses when schedule / chunk_size / num_warps / gradient_value_tile / scan_group
# are None. Measured on an H100 (docs/BENCHMARKS.md, 2026-11-27): the chunk-parallel schedule
# with chunk 16, 4 warps and full-row gradients was faster than the sequential one at B*H = 8
# (forward+backward 1.6x) but 2.2x slower at B*H = 64, its backward 9x its forward; so the
# sequential schedule stays the default. Its gradient kernel spilled ~11 KB per thread there
# (bench/triton_spills.py, compiled for sm_90 offline); with 32-row value tiles and 8 warps it
# spills ~200 B, and no other chunk-parallel kernel spills at 8 warps: hence these defaults, not
# yet timed on a GPU (bench/accelerator/wkv7_gpu_session.sh).
DEFAULT_SCHEDULE = "sequential"
SCHEDULE_DEFAULTS = {
    "sequential": {"chunk_size": DEFAULT_CHUNK_SIZE, "num_warps": 4},
    "chunk_parallel": {
        "chunk_size": DEFAULT_CHUNK_SIZE,
        "num_warps": 8,
        "gradient_value_tile": 32,
        "scan_group": 1,
    },
    # Not yet timed on a GPU: the chunk-parallel schedule's settings (offline, its passes do
    # not spill at 8 warps; bench/triton_spills.py).
    "factored": {"chunk_size": DEFAULT_CHUNK_SIZE, "num_warps": 8, "gradient_value_tile": 32},
}
MAX_NUM_WARPS = 16
MAX_SCAN_GROUP = 16
MAX_SEGMENTS = 16
# segments=None never cuts a sequence into segments shorter than this many chunks.
MIN_SEGMENT_CHUNKS = 32
MIN_VALUE_TILE = 16
# The programs that fill the GPU: its SM count (`target_programs`); an H100's 132 where the
# kernels are not compiled on a GPU (interpret mode, cross-lowering on a host without one).
TARGET_PROGRAMS = 132
_SUPPORTED_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
_HALF_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


def target_programs(interpret=False):
    """How many programs fill the GPU: the SM count of JAX's first device when JAX's default
    backend is a GPU and the kernels are compiled (not interpreted), else TARGET_PROGRAMS
    (an H100's 132), so interpret-mode runs and cross-lowering pick the same tiles anywhere."""
    if interpret or jax.default_backend() != "gpu":
        return TARGET_PROGRAMS
    count = getattr(jax.devices()[0], "core_count", None)
    return count if isinstance(count, int) and count > 0 else TARGET_PROGRAMS


def auto_value_tile(n, programs_per_tile, target=TARGET_PROGRAMS):
    """Largest value tile (>= 16) that gives at least `target` programs, else 16.

    Halving the tile doubles the programs but also the (duplicated) key-side chunk work, so
    full rows are kept whenever batch x heads alone fills the GPU.
    """
    vt = n
    while vt > MIN_VALUE_TILE and programs_per_tile * (n // vt) < target:
        vt //= 2
    return vt


def auto_segments(programs, n_chunks, target=TARGET_PROGRAMS):
    """Segments for the factored schedule's passes: doubled while the passes' programs
    (B*H x value tiles x segments) stay below `target`, up to MAX_SEGMENTS and while
    segments keep >= MIN_SEGMENT_CHUNKS chunks (n_chunks None: no such bound).

    Below `target` (the SM count) most SMs idle while the passes walk T / C chunks in order, one
    latency-bound step each; segments shorten that walk at three times the pass work."""
    segments = 1
    while (
        programs * segments < target
        and segments < MAX_SEGMENTS
        and (n_chunks is None or n_chunks // (2 * segments) >= MIN_SEGMENT_CHUNKS)
    ):
        segments *= 2
    return segments


def _is_power_of_two(x):
    return isinstance(x, int) and not isinstance(x, bool) and x > 0 and x & (x - 1) == 0


def _check_choice(name, value, choices):
    """A string option must be None or one of choices."""
    if value is not None and (not isinstance(value, str) or value not in choices):
        raise ValueError(f"wkv7_gpu: {name} must be None or one of {choices}, got {value!r}")


def _check_tile(name, tile, n=None):
    """A value tile (state rows per program) must be None or a power of two in
    [MIN_VALUE_TILE, N] (n None: the head size is not known yet, only the lower bound holds)."""
    if tile is None or (_is_power_of_two(tile) and MIN_VALUE_TILE <= tile <= (n or tile)):
        return
    bound = f"in [{MIN_VALUE_TILE}, N = {n}]" if n else f">= {MIN_VALUE_TILE}"
    raise ValueError(
        f"wkv7_gpu: {name} must be None or a power of two {bound} (it must divide the head "
        f"size N), got {tile!r}"
    )


def _check_count(name, value, limit):
    """A count option (num_warps, scan_group, segments) must be None or a power of two in
    [1, limit]."""
    if value is not None and not (_is_power_of_two(value) and value <= limit):
        raise ValueError(
            f"wkv7_gpu: {name} must be None or a power of two in [1, {limit}], got {value!r}"
        )


@dataclasses.dataclass(frozen=True)
class GpuOptions:
    """Options of `wkv7_gpu`: static, validated on construction; None picks the default.

    Attributes:
        schedule: "sequential" (one program per batch x head and value tile walks the chunks,
            the whole chunk maths on its critical path), "chunk_parallel" (the chunk maths in
            parallel over chunks, only an N x N affine map of the state per chunk in order;
            `experimental.chunk_parallel`), "factored" (the chunk maths in parallel, stored as
            [C, N] factors per chunk, then one pass in order that applies them to the state
            and writes y; `experimental.factored`), or None: DEFAULT_SCHEDULE ("sequential").
            Same maths and dot precision plan; with "chunk_parallel" / "factored", value_tile
            applies to the state scans / passes.
        chunk_size: a power of two in [16, 64], or None: the schedule's default
            (SCHEDULE_DEFAULTS; 16 for every schedule). On an H100 the chunk-parallel
            schedule's gradient at chunk 64 had not compiled after ~2 minutes
            (docs/BENCHMARKS.md).
        num_warps: Triton warps per program, every kernel of the call, a power of two in
            [1, 16], or None: the schedule's default (4 sequential, 8 chunk-parallel and
            factored).
        value_tile: the state rows per program, a power of two in [16, N]; None picks N when
            B * H fills the GPU's SMs (`target_programs`), smaller tiles otherwise.
        gradient_value_tile: "chunk_parallel" / "factored" only; the state rows per program of
            the backward's gradient kernel (grid B*H x chunks x N / tile; key-side gradients
            are summed over the tiles), a power of two in [16, N], or None: 32 (at most N).
        scan_group: "chunk_parallel" only; chunks whose maps XLA composes into one step of the
            state scans (fewer sequential steps for ~N^3 parallel work per chunk each way), a
            power of two in [1, 16], or None: 1.
        segments: "factored" only; parts of the sequence (padded to a multiple of chunk_size x
            segments) whose in-order passes run in parallel: a first pass finds each part's
            map and the state it makes from zero, XLA chains them into the parts' start
            states, and the pass proper runs from those (two walks over T / segments chunks
            instead of one over T, for three times the pass work). A power of two in [1, 16],
            or None: doubled from 1 while the passes run fewer programs than the GPU has SMs
            (`target_programs`) and each part keeps >= MIN_SEGMENT_CHUNKS chunks.
        dot_precision: "highest" (IEEE fp32 dots, no tensor cores: exact, slow), "tf32x3"
            (three TF32 tensor-core passes, near-fp32; interpret mode runs it as "highest"),
            "bf16" (bf16 operands, fp32 accumulation, for the intra-chunk C x C matrices and
            the products that reach only y or a per-token gradient; the decay sums stay IEEE
            fp32, the other dots follow exact_dot_precision), or None: "bf16" when any of r,
            w, k, v, a, b is bfloat16 / float16, "highest" when all are float32.
        exact_dot_precision: the dots whose errors reach the chunk-to-chunk transition and
            compound over T: A_ab, the inverse (I - A_ab)^{-1} and its products, and every dot
            that multiplies the carried state or its cotangent or makes their increments.
            "highest" (IEEE fp32 on the FMA units), "tf32x3" (as above), "bf16x3" (each fp32
            operand split into two bf16 parts, three tensor-core products: ~2^-16 relative per
            product), or None: "tf32x3" when dot_precision is "tf32x3", else "highest".

    Raises:
        ValueError: naming the option, its value and what was expected, on a value that no
            input could make valid (and on an option given to a schedule it does not apply
            to); `resolve` checks the rest against the inputs.
    """

    schedule: str | None = None
    chunk_size: int | None = None
    num_warps: int | None = None
    value_tile: int | None = None
    gradient_value_tile: int | None = None
    scan_group: int | None = None
    segments: int | None = None
    dot_precision: str | None = None
    exact_dot_precision: str | None = None

    def __post_init__(self):
        _check_choice("schedule", self.schedule, SCHEDULES)
        schedule = self.schedule or DEFAULT_SCHEDULE
        only = (
            ("gradient_value_tile", self.gradient_value_tile, CHUNK_GRADIENT_SCHEDULES),
            ("scan_group", self.scan_group, ("chunk_parallel",)),
            ("segments", self.segments, ("factored",)),
        )
        for name, value, schedules in only:
            if value is not None and schedule not in schedules:
                names = " / ".join(repr(s) for s in schedules)
                raise ValueError(
                    f"wkv7_gpu: {name} applies to schedule={names} only; got schedule={schedule!r}"
                )
        chunk = self.chunk_size
        if chunk is not None and not (
            _is_power_of_two(chunk) and MIN_CHUNK_SIZE <= chunk <= MAX_CHUNK_SIZE
        ):
            raise ValueError(
                f"wkv7_gpu: chunk_size must be None or a power of two in [{MIN_CHUNK_SIZE}, "
                f"{MAX_CHUNK_SIZE}], got {chunk!r} (Triton dots need every dim >= 16; larger "
                "chunks exceed the register budget of one program)"
            )
        _check_count("num_warps", self.num_warps, MAX_NUM_WARPS)
        _check_tile("value_tile", self.value_tile)
        _check_tile("gradient_value_tile", self.gradient_value_tile)
        _check_count("scan_group", self.scan_group, MAX_SCAN_GROUP)
        _check_count("segments", self.segments, MAX_SEGMENTS)
        _check_choice("dot_precision", self.dot_precision, DOT_PRECISIONS)
        _check_choice("exact_dot_precision", self.exact_dot_precision, EXACT_DOT_PRECISIONS)

    @classmethod
    def get_default(cls):
        """The default schedule with its measured settings (SCHEDULE_DEFAULTS); the settings
        that depend on the inputs (value tiles, segments, dot precisions) stay automatic."""
        settings = SCHEDULE_DEFAULTS[DEFAULT_SCHEDULE]
        # The gradient tile's default is at most N, so it is left for resolve.
        settings = {key: v for key, v in settings.items() if key != "gradient_value_tile"}
        return cls(schedule=DEFAULT_SCHEDULE, **settings)

    def resolve(self, n, programs_per_tile, dtypes, *, seq_len=None, interpret=False):
        """The kernel settings for one call: these options checked against its inputs, every
        None filled in.

        Args:
            n: the head size N.
            programs_per_tile: B * H (the programs per value tile of the in-order kernels).
            dtypes: [(name, dtype)] of the inputs r, w, k, v, a, b (and of the initial state,
                named "state").
            seq_len: T, which bounds the automatic segments; None: no bound.
            interpret: whether the kernels run in interpret mode (then, and without a GPU,
                the automatic tiles fill an H100's TARGET_PROGRAMS).

        Returns:
            A `gpu_chunk.KernelConfig`.

        Raises:
            ValueError: on a head size N that is not a power of two >= 16, a value tile larger
                than N, or an unsupported dtype.
        """
        schedule = self.schedule or DEFAULT_SCHEDULE
        defaults = SCHEDULE_DEFAULTS[schedule]
        if not _is_power_of_two(n) or n < MIN_VALUE_TILE:
            raise ValueError(
                f"wkv7_gpu: head size N must be a power of two >= {MIN_VALUE_TILE} (Triton block "
                f"shapes), got N = {n}"
            )
        _check_tile("value_tile", self.value_tile, n)
        for name, dtype in dtypes:
            if jnp.dtype(dtype) not in _SUPPORTED_DTYPES:
                raise ValueError(
                    f"wkv7_gpu: {name} has dtype {jnp.dtype(dtype)}; expected float32, bfloat16 "
                    "or float16"
                )
        gradient_tile, scan_group = n, 1
        if schedule in CHUNK_GRADIENT_SCHEDULES:
            gradient_tile = self.gradient_value_tile or min(defaults["gradient_value_tile"], n)
            _check_tile("gradient_value_tile", gradient_tile, n)
            scan_group = self.scan_group or defaults.get("scan_group", 1)
        chunk_size = self.chunk_size or defaults["chunk_size"]
        dot_precision = self.dot_precision
        if dot_precision is None:
            half = any(jnp.dtype(dt) in _HALF_DTYPES for name, dt in dtypes if name != "state")
            dot_precision = "bf16" if half else "highest"
        exact_dot_precision = self.exact_dot_precision
        if exact_dot_precision is None:
            exact_dot_precision = "tf32x3" if dot_precision == "tf32x3" else "highest"
        target = target_programs(interpret)
        value_tile = self.value_tile or auto_value_tile(n, programs_per_tile, target)
        segments = self.segments
        if segments is None:
            n_chunks = None if seq_len is None else -(-seq_len // chunk_size)
            programs = programs_per_tile * (n // value_tile)
            segments = auto_segments(programs, n_chunks, target) if schedule == "factored" else 1
        return KernelConfig(
            schedule=schedule,
            chunk=chunk_size,
            value_tile=value_tile,
            interpret=bool(interpret),
            dot_precision=dot_precision,
            exact_dot_precision=exact_dot_precision,
            num_warps=self.num_warps or defaults["num_warps"],
            gradient_value_tile=gradient_tile,
            scan_group=scan_group,
            segments=segments,
        )
