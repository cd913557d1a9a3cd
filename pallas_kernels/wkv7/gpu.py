"""WKV-7 as Pallas-Triton GPU kernels: the public entry `wkv7_gpu`, its options, their defaults
and their validation.

Three schedules run the same chunk maths (`gpu_chunk`), forward and chunk-reverse backward
under one custom VJP each:
- "sequential" (`gpu_sequential`, the default): one program per (batch x head, value tile)
  walks its sequence's chunks in order, the whole chunk maths on its critical path;
- "chunk_parallel" (`experimental.chunk_parallel`): the chunk maths in parallel over chunks,
  then an N x N affine map of the state per chunk in order;
- "factored" (`experimental.factored`): the chunk maths in parallel, then a pass in order
  through each chunk's rank-C factors.
All three follow one dot precision plan (`gpu_chunk.DotPlan`: which dots may round their
operands and which stay near-fp32 because their errors compound over T).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.wkv7.experimental.chunk_parallel import wkv7_heads_chunk_parallel
from pallas_kernels.wkv7.experimental.factored import wkv7_tokens_factored
from pallas_kernels.wkv7.gpu_chunk import KernelConfig
from pallas_kernels.wkv7.gpu_sequential import wkv7_heads_sequential
from pallas_kernels.wkv7.reference import check_wkv7_shapes

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
# What wkv7_gpu uses when schedule / chunk_size / num_warps / gradient_value_tile / scan_group
# are None. Measured on an H100 (docs/BENCHMARKS.md, 2026-11-27): the chunk-parallel schedule
# with chunk 16, 4 warps and full-row gradients was faster than the sequential one at B*H = 8
# (forward+backward 1.6x) but 2.2x slower at B*H = 64, its backward 9x its forward; so the
# sequential schedule stays the default. Its gradient kernel spilled ~11 KB per thread there
# (bench/triton_spills.py, compiled for sm_90 offline); with 32-row value tiles and 8 warps it
# spills ~200 B, and no other chunk-parallel kernel spills at 8 warps: hence these defaults, not
# yet timed on a GPU (bench/wkv7_gpu_session.sh).
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


def _check_choice(name, value, choices):
    """A string option must be None or one of choices."""
    if value is not None and (not isinstance(value, str) or value not in choices):
        raise ValueError(f"wkv7_gpu: {name} must be None or one of {choices}, got {value!r}")


# --------------------------------------------------------------------------------------------
# Public entry.


def _is_power_of_two(x):
    return isinstance(x, int) and not isinstance(x, bool) and x > 0 and x & (x - 1) == 0


def target_programs(interpret=False):
    """How many programs fill the GPU: the SM count of JAX's first device when JAX's default
    backend is a GPU and the kernels are compiled (not interpreted), else TARGET_PROGRAMS
    (an H100's 132), so interpret-mode runs and cross-lowering pick the same tiles anywhere."""
    if interpret or jax.default_backend() != "gpu":
        return TARGET_PROGRAMS
    count = getattr(jax.devices()[0], "core_count", None)
    return count if isinstance(count, int) and count > 0 else TARGET_PROGRAMS


def _auto_value_tile(n, programs_per_tile, target=TARGET_PROGRAMS):
    """Largest value tile (>= 16) that gives at least `target` programs, else 16.

    Halving the tile doubles the programs but also the (duplicated) key-side chunk work, so
    full rows are kept whenever batch x heads alone fills the GPU.
    """
    vt = n
    while vt > MIN_VALUE_TILE and programs_per_tile * (n // vt) < target:
        vt //= 2
    return vt


def _auto_segments(programs, n_chunks, target=TARGET_PROGRAMS):
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


def _check_tile(name, tile, n):
    """A value tile (state rows per program) must be a power of two in [MIN_VALUE_TILE, N]."""
    if not (_is_power_of_two(tile) and MIN_VALUE_TILE <= tile <= n):
        raise ValueError(
            f"wkv7_gpu: {name} must be None or a power of two in [{MIN_VALUE_TILE}, N = {n}] "
            f"(it must divide N), got {tile!r}"
        )


def _check_count(name, value, limit):
    """A count option (scan_group, segments) must be None or a power of two in [1, limit]."""
    if value is not None and not (_is_power_of_two(value) and value <= limit):
        raise ValueError(
            f"wkv7_gpu: {name} must be None or a power of two in [1, {limit}], got {value!r}"
        )


def _schedule_settings(schedule, chunk_size, num_warps, n, gradient_value_tile, scan_group,
                       segments):  # fmt: skip
    """(schedule, chunk_size, num_warps, gradient_value_tile, scan_group) with None replaced by
    the schedule's defaults; gradient_value_tile applies to CHUNK_GRADIENT_SCHEDULES (N
    otherwise), scan_group to "chunk_parallel" (1 otherwise), segments (checked here, chosen
    by resolve_config) to "factored"."""
    _check_choice("schedule", schedule, SCHEDULES)
    schedule = DEFAULT_SCHEDULE if schedule is None else schedule
    defaults = SCHEDULE_DEFAULTS[schedule]
    chunk_size = defaults["chunk_size"] if chunk_size is None else chunk_size
    num_warps = defaults["num_warps"] if num_warps is None else num_warps
    options = (
        ("gradient_value_tile", gradient_value_tile, CHUNK_GRADIENT_SCHEDULES),
        ("scan_group", scan_group, ("chunk_parallel",)),
        ("segments", segments, ("factored",)),
    )
    for name, value, schedules in options:
        if value is not None and schedule not in schedules:
            only = " / ".join(repr(s) for s in schedules)
            raise ValueError(
                f"wkv7_gpu: {name} applies to schedule={only} only; got schedule={schedule!r}"
            )
    if schedule not in CHUNK_GRADIENT_SCHEDULES:
        return schedule, chunk_size, num_warps, n, 1
    if gradient_value_tile is None:
        gradient_value_tile = min(defaults["gradient_value_tile"], n)
    _check_tile("gradient_value_tile", gradient_value_tile, n)
    _check_count("scan_group", scan_group, MAX_SCAN_GROUP)
    _check_count("segments", segments, MAX_SEGMENTS)
    if scan_group is None:
        scan_group = defaults.get("scan_group", 1)
    return schedule, chunk_size, num_warps, gradient_value_tile, scan_group


def _check_arguments(n, chunk_size, value_tile, dot_precision, exact_dot_precision, num_warps,
                     dtypes):  # fmt: skip
    if not _is_power_of_two(chunk_size) or not MIN_CHUNK_SIZE <= chunk_size <= MAX_CHUNK_SIZE:
        raise ValueError(
            f"wkv7_gpu: chunk_size must be a power of two in [{MIN_CHUNK_SIZE}, "
            f"{MAX_CHUNK_SIZE}], got {chunk_size!r} (Triton dots need every dim >= 16; larger "
            "chunks exceed the register budget of one program)"
        )
    if not _is_power_of_two(n) or n < MIN_VALUE_TILE:
        raise ValueError(
            f"wkv7_gpu: head size N must be a power of two >= {MIN_VALUE_TILE} (Triton block "
            f"shapes), got N = {n}"
        )
    if value_tile is not None:
        _check_tile("value_tile", value_tile, n)
    _check_choice("dot_precision", dot_precision, DOT_PRECISIONS)
    _check_choice("exact_dot_precision", exact_dot_precision, EXACT_DOT_PRECISIONS)
    if not _is_power_of_two(num_warps) or num_warps > 16:
        raise ValueError(
            f"wkv7_gpu: num_warps must be a power of two in [1, 16], got {num_warps!r}"
        )
    for name, dtype in dtypes:
        if jnp.dtype(dtype) not in _SUPPORTED_DTYPES:
            raise ValueError(
                f"wkv7_gpu: {name} has dtype {jnp.dtype(dtype)}; expected float32, bfloat16 "
                "or float16"
            )


def wkv7_gpu(
    r, w, k, v, a, b, state=None, *, chunk_size=None, value_tile=None, dot_precision=None,
    exact_dot_precision=None, schedule=None, num_warps=None, gradient_value_tile=None,
    scan_group=None, segments=None, interpret=False,
):  # fmt: skip
    """WKV-7 on GPU (Pallas-Triton): same result as `wkv7_reference`, differentiable.

    Per batch and head, with S in R^{N x N} (rows index value dims, columns key dims):
        S_t = S_{t-1} diag(exp(w_t)) + (S_{t-1} a_t) b_t^T + v_t k_t^T,   y_t = S_t r_t.
    The sequence is cut into chunks; with the default schedule one program per (batch x head,
    value tile) loops over them with its state rows in registers. The custom VJP stores one
    fp32 state per chunk (N^2 * 4 / chunk_size bytes per token and head) and recomputes
    everything else in the backward. T need not be a multiple of the chunk: the tail is padded with
    r = k = v = a = b = 0, w = 0, which leaves the state untouched.

    Inputs are loaded in their own dtype and computed in fp32 (decay sums, exponents, state);
    `dot_precision` and `exact_dot_precision` pick the dots' operand precision (always fp32
    accumulation); gradients come back in the input dtypes. The chunk's centred
    exponents stay finite for |w| * chunk_size / 2 < ~40: RWKV-7's w >= -0.6065 is safe for
    every allowed chunk.

    Args:
        r, w, k, v, a, b: [B, T, H, N] float32 / bfloat16 / float16; `w` is the log-decay
            (w <= 0); in RWKV-7, a = -kk and b = kk * a_rate. N a power of two >= 16.
        state: optional initial state [B, H, N, N] (zeros if None), cast to fp32.
        chunk_size: static power of two in [16, 64], or None: the schedule's default
            (`SCHEDULE_DEFAULTS`; 16 for both). On an H100 the chunk-parallel schedule's
            gradient at chunk 64 had not compiled after ~2 minutes (docs/BENCHMARKS.md).
        value_tile: static power of two in [16, N], the state rows per program; None picks N
            when B * H fills the GPU's SMs (`target_programs`), smaller tiles otherwise.
        dot_precision: static; "highest" (IEEE fp32 dots, no tensor cores: exact, slow),
            "tf32x3" (three TF32 tensor-core passes, near-fp32; interpret mode runs it as
            "highest"), "bf16" (bf16 operands, fp32 accumulation, for the intra-chunk C x C
            matrices and the products that reach only y or a per-token gradient; the decay
            sums stay IEEE fp32, the other dots follow exact_dot_precision), or None: "bf16"
            when any of r, w, k, v, a, b is bfloat16 / float16, "highest" when all are
            float32.
        exact_dot_precision: static; the dots whose errors reach the chunk-to-chunk
            transition and compound over T: A_ab, the inverse (I - A_ab)^{-1} and its
            products, and every dot that multiplies the carried state or its cotangent or
            makes their increments. "highest" (IEEE fp32 on the FMA units), "tf32x3" (as
            above), "bf16x3" (each fp32 operand split into two bf16 parts, three tensor-core
            products: ~2^-16 relative per product), or None: "tf32x3" when dot_precision is
            "tf32x3", else "highest".
        schedule: static; "sequential" (one program per batch x head and value tile walks
            the chunks, the whole chunk maths on its critical path), "chunk_parallel" (the
            chunk maths in parallel over chunks, only an N x N affine map of the state per
            chunk in order; see `experimental.chunk_parallel`), "factored" (the chunk maths in
            parallel, stored as [C, N] factors per chunk, then one pass in order that applies
            them to the state and writes y; see `experimental.factored`), or None:
            `DEFAULT_SCHEDULE` ("sequential"). Same maths and dot precision plan; with
            "chunk_parallel" / "factored", value_tile applies to the state scans / passes.
        num_warps: static; Triton warps per program, every kernel of the call, or None: the
            schedule's default (4 sequential, 8 chunk-parallel and factored).
        gradient_value_tile: static, "chunk_parallel" / "factored" only; the state rows per
            program of the backward's gradient kernel (grid B*H x chunks x N / tile; key-side
            gradients are summed over the tiles), a power of two in [16, N], or None: 32 (at
            most N).
        scan_group: static, "chunk_parallel" only; chunks whose maps XLA composes into one
            step of the state scans (fewer sequential steps for ~N^3 parallel work per chunk
            each way), a power of two in [1, 16], or None: 1.
        segments: static, "factored" only; parts of the sequence (padded to a multiple of
            chunk_size x segments) whose in-order passes run in parallel: a first pass finds
            each part's map and the state it makes from zero, XLA chains them into the
            parts' start states, and the pass proper runs from those (two walks over
            T / segments chunks instead of one over T, for three times the pass work). A
            power of two in [1, 16], or None: doubled from 1 while the passes run fewer
            programs than the GPU has SMs (`target_programs`) and each part keeps >=
            MIN_SEGMENT_CHUNKS chunks.
        interpret: run the kernels in Pallas interpret mode (CPU testing).

    Returns:
        y: [B, T, H, N] float32; final_state: [B, H, N, N] float32.

    Raises:
        ValueError: on mismatched shapes, a bad chunk_size / value_tile / dot_precision /
            exact_dot_precision / schedule / num_warps / gradient_value_tile / scan_group /
            segments / head size or an unsupported dtype.
    """
    batch, seq, heads, n = check_wkv7_shapes(r, w, k, v, a, b, state)
    named = (("r", r), ("w", w), ("k", k), ("v", v), ("a", a), ("b", b))
    dtypes = [(name, x.dtype) for name, x in named]
    if state is not None:
        dtypes.append(("state", state.dtype))
    schedule, cfg = resolve_config(
        n, batch * heads, dtypes, chunk_size=chunk_size, value_tile=value_tile,
        dot_precision=dot_precision, exact_dot_precision=exact_dot_precision,
        schedule=schedule, num_warps=num_warps, gradient_value_tile=gradient_value_tile,
        scan_group=scan_group, segments=segments, seq_len=seq, interpret=interpret,
    )  # fmt: skip
    if state is None:
        state = jnp.zeros((batch, heads, n, n), jnp.float32)
    if seq == 0:
        return jnp.zeros(r.shape, jnp.float32), state.astype(jnp.float32)
    s0 = state.astype(jnp.float32).reshape(batch * heads, n, n)
    if schedule == "factored":
        # Its kernels read and write the token-major arrays as they are: no transposes.
        xs = tuple(pad_tokens(x, cfg.chunk * cfg.segments) for _, x in named)
        y, s_final = wkv7_tokens_factored(cfg, xs, s0)
        return y[:, :seq], s_final.reshape(batch, heads, n, n)
    xs = tuple(head_major(x, cfg.chunk) for _, x in named)
    if schedule == "chunk_parallel":
        y, s_final = wkv7_heads_chunk_parallel(cfg, xs, s0)
    else:
        y, s_final = wkv7_heads_sequential(cfg, xs, s0)
    y = y[:, :seq].reshape(batch, heads, seq, n).transpose(0, 2, 1, 3)
    return y, s_final.reshape(batch, heads, n, n)


def resolve_config(
    n, programs_per_tile, dtypes, *, chunk_size=None, value_tile=None, dot_precision=None,
    exact_dot_precision=None, schedule=None, num_warps=None, gradient_value_tile=None,
    scan_group=None, segments=None, seq_len=None, interpret=False,
):  # fmt: skip
    """(schedule, kernel config) for wkv7_gpu's options: validated, None filled in.

    n: head size; programs_per_tile: B * H; dtypes: [(name, dtype)] of the inputs (and the
    state, named "state"); seq_len: T (bounds the automatic segments; None: no bound). Also
    used by bench/wkv7.py to run single kernels as wkv7_gpu would.
    """
    schedule, chunk_size, num_warps, gradient_tile, scan_group = _schedule_settings(
        schedule, chunk_size, num_warps, n, gradient_value_tile, scan_group, segments
    )
    _check_arguments(
        n, chunk_size, value_tile, dot_precision, exact_dot_precision, num_warps, dtypes
    )
    if dot_precision is None:
        half = any(jnp.dtype(dt) in _HALF_DTYPES for name, dt in dtypes if name != "state")
        dot_precision = "bf16" if half else "highest"
    if exact_dot_precision is None:
        exact_dot_precision = "tf32x3" if dot_precision == "tf32x3" else "highest"
    target = target_programs(interpret)
    if value_tile is None:
        value_tile = _auto_value_tile(n, programs_per_tile, target)
    if segments is None:
        n_chunks = None if seq_len is None else -(-seq_len // chunk_size)
        programs = programs_per_tile * (n // value_tile)
        segments = _auto_segments(programs, n_chunks, target) if schedule == "factored" else 1
    cfg = KernelConfig(
        schedule, chunk_size, value_tile, bool(interpret), dot_precision, exact_dot_precision,
        num_warps, gradient_tile, scan_group, segments,
    )  # fmt: skip
    return schedule, cfg


def pad_tokens(x, multiple):
    """[B, T, H, N] -> [B, Tp, H, N], the tail zero-padded to Tp, a multiple of `multiple`
    (zero inputs, w = 0 included, leave the state untouched)."""
    pad = -x.shape[1] % multiple
    return jnp.pad(x, ((0, 0), (0, pad), (0, 0), (0, 0))) if pad else x


def head_major(x, chunk):
    """[B, T, H, N] -> [B*H, Tp, N], the tail zero-padded to Tp, a multiple of chunk (zero
    inputs, w = 0 included, leave the state untouched)."""
    x = pad_tokens(x, chunk)
    batch, seq, heads, n = x.shape
    return x.transpose(0, 2, 1, 3).reshape(batch * heads, seq, n)
