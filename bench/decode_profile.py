"""Where one decode step's time goes on CPU (issue 3): per-part op times of `Decoder.step`.

  python bench/decode_profile.py                       # rwkvx-0.22b, random weights, 2K context
  python bench/decode_profile.py --context 8192 --steps 20

Builds the context with a real `prefill`, then traces `--steps` compiled steps with the JAX
profiler (XLA:CPU records every executed op) and adds the ops' times up by the part of the model
their HLO metadata names: the RWKV-7 blocks, the sparse blocks' projections and channel mix, the
sparse blocks' attention over the KV cache, the head, and the rest. Each part's weight bytes
give its achieved read bandwidth, next to the best bandwidth of jitted reads of a 1 GiB array
measured in the same run (the floor `bench/decode_latency.py --vs-official` uses). The op times
are summed as recorded (ops of one step hardly ever overlap on XLA:CPU); the step's wall time is
printed beside them.
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # a CPU benchmark; skips probing other backends

import jax
import jax.numpy as jnp
import numpy as np
from decode_latency import (
    logits_ready,
    machine_line,
    measure_read_bandwidth,
    weight_bytes_per_token,
)
from timing import timed
from tqdm.auto import tqdm

from rwkvx_jax import preset
from rwkvx_jax.checkpoints.official_layout import params_from_state_dict
from rwkvx_jax.checkpoints.random_weights import random_state_dict
from rwkvx_jax.decoding.decoder import DecodeConfig, Decoder

PARTS = (
    "RWKV-7 blocks",
    "sparse blocks: projections + channel mix",
    "sparse blocks: attention over the cache",
    "head (ln_out + [C, V] matmul)",
    "rest (embedding, glue)",
)
_INSTRUCTION = re.compile(r"\s*(?:ROOT )?%(\S+) = \S+ ([\w-]+)\((.*)")
_OP_NAME = re.compile(r'op_name="([^"]*)"')
_OPERAND = re.compile(r"%([\w.-]+)")
_COMPUTATION = re.compile(r"(?:ENTRY )?%([\w.-]+) \(")
_CALLS = re.compile(r"calls=%([\w.-]+)")
_PROJECTION = re.compile(r"/moba_\d+/(att/(receptance|key|value|output)|ffn|ln\d)/")


def part_of(path: str) -> int | None:
    """Index in PARTS of the model part a path (op metadata or parameter name) names."""
    if re.search(r"/blocks_\d+/", path):
        return 0
    if _PROJECTION.search(path):
        return 1
    if re.search(r"/moba_\d+/", path):
        return 2
    if re.search(r"/(head|ln_out)/", path):
        return 3
    return None


def _as_path(op_name: str) -> str:
    """`params['moba_0']['att']['key']['kernel']`, `state.blocks['moba_0'].cache.keys` and
    `jit(f)/RWKVX/moba_0/att/...` alike -> a '/'-separated path."""
    return "/" + re.sub(r"[\[\]'.\\]+", "/", op_name).strip("/") + "/"


def weight_bytes(params) -> list[int]:
    """Bytes of weights each part reads per token; the rest (embedding, one row of it) is what
    `weight_bytes_per_token` counts beyond the named parts."""
    out = [0] * len(PARTS)
    for path, leaf in jax.tree_util.tree_leaves_with_path(params):
        part = part_of("/" + "/".join(str(getattr(p, "key", p)) for p in path) + "/")
        if part is not None:
            out[part] += leaf.nbytes
    out[-1] = weight_bytes_per_token(params) - sum(out)
    return out


def instruction_parts(hlo_text: str) -> dict[str, tuple[int, str]]:
    """HLO instruction name -> (part index, opcode), from the compiled module's text.

    An instruction's part comes from its own metadata, else from its operands' (XLA:CPU keeps
    no metadata on dots: a weight matmul is placed by the parameter it reads, an attention dot
    by the cache gather that feeds it)."""
    ops = {}
    has_dot, computation = set(), None
    for line in hlo_text.splitlines():
        header = _COMPUTATION.match(line)
        if header:
            computation = header.group(1)
        elif " dot(" in line and computation:
            has_dot.add(computation)
    for line in hlo_text.splitlines():
        match = _INSTRUCTION.match(line)
        if match:
            name, opcode, rest = match.groups()
            called = _CALLS.search(rest)
            if opcode == "fusion" and called and called.group(1) in has_dot:
                opcode = "dot"  # a fusion around a matrix product (e.g. a YNN library call)
            op_name = _OP_NAME.search(line)
            own = part_of(_as_path(op_name.group(1))) if op_name else None
            ops[name] = (own, opcode, [o for o in _OPERAND.findall(rest) if o != name])
    memo: dict[str, int | None] = {}

    def resolve(name: str, depth: int = 0) -> int | None:
        if name in memo:
            return memo[name]
        memo[name] = None  # cycles through loop tuples
        own, _, operands = ops[name]
        if own is None and depth < 12:
            own = next(
                (p for o in operands if o in ops for p in [resolve(o, depth + 1)] if p is not None),
                None,
            )
        memo[name] = own
        return own

    rest = len(PARTS) - 1
    return {
        name: (rest if resolve(name) is None else resolve(name), opcode)
        for name, (_, opcode, _) in ops.items()
    }


def trace_op_times(run_steps, n_steps: int) -> collections.Counter:
    """Total microseconds per traced event name over `run_steps()` (n_steps steps)."""
    with tempfile.TemporaryDirectory() as tmp:
        jax.profiler.start_trace(tmp, create_perfetto_trace=True)
        run_steps()
        jax.profiler.stop_trace()
        (path,) = glob.glob(os.path.join(tmp, "**", "*.trace.json.gz"), recursive=True)
        with gzip.open(path) as f:
            events = json.load(f)
    events = events["traceEvents"] if isinstance(events, dict) else events
    times = collections.Counter()
    for event in events:
        if event.get("ph") == "X":
            times[event["name"]] += event["dur"] / n_steps
    return times


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", default="rwkvx-0.22b")
    parser.add_argument("--context", type=int, default=2048, help="tokens before the steps")
    parser.add_argument("--cache-size", type=int, default=None, help="DecodeConfig.cache_size")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--steps", type=int, default=10, help="traced steps")
    parser.add_argument("--warmup", type=int, default=5)
    args = parser.parse_args()

    config = preset(args.preset)
    cache = (
        args.cache_size
        or max(4, -(-(args.context + args.warmup + 2 * args.steps) // config.chunk_size) + 1)
        * config.chunk_size
    )
    tqdm.write("measuring read bandwidth (jitted fp32 reads of 1 GiB, best of 7)...")
    bandwidth = measure_read_bandwidth()
    params = jax.tree.map(jnp.asarray, params_from_state_dict(random_state_dict(config), config))
    decoder = Decoder(config, params, DecodeConfig(cache_size=cache))
    rng = np.random.default_rng(0)
    prompt = rng.integers(0, config.vocab_size, size=(args.batch, args.context), dtype=np.int32)
    _, state = decoder.prefill(prompt, progress=True)
    tokens = jnp.asarray(rng.integers(0, config.vocab_size, size=(args.batch,)), jnp.int32)
    valid = jnp.ones((args.batch,), bool)
    compiled = decoder._step.lower(decoder.weights, state, tokens, valid).compile()
    parts = instruction_parts(compiled.as_text())

    walls = []

    def run_steps(n, record):
        nonlocal state
        for _ in range(n):
            step_s, (_, state) = timed(decoder.step, tokens, state, sync=logits_ready)
            if record:
                walls.append(step_s)

    run_steps(args.warmup, False)
    times = trace_op_times(lambda: run_steps(args.steps, True), args.steps)
    ms = [0.0] * len(PARTS)
    dot_ms = [0.0] * len(PARTS)
    largest = [collections.Counter() for _ in PARTS]
    for name, us in times.items():
        if name in parts:
            index, opcode = parts[name]
            if opcode in ("while", "conditional", "call"):
                continue  # containers: their ops are recorded themselves
            ms[index] += us / 1e3
            largest[index][f"{re.sub(r'[.][0-9]+$', '', name)} ({opcode})"] += us / 1e3
            if opcode == "dot":
                dot_ms[index] += us / 1e3
    weights = weight_bytes(params)
    wall = 1e3 * float(np.median(walls))

    print(f"\n## One decode step of {args.preset}, by part")
    print(machine_line())
    print(
        f"batch {args.batch}, context {args.context} tokens, cache_size {cache}, fp32, random "
        f"weights; {args.steps} traced steps after {args.warmup} warm-up"
    )
    print(
        f"step wall time {wall:.2f} ms (median); ops recorded {sum(ms):.2f} ms; read bandwidth "
        f"{bandwidth / 1e9:.1f} GB/s; weight floor {sum(weights) / bandwidth * 1e3:.2f} ms"
    )
    print("\n| part | ms/step | share | of which matmuls | weights MB | weights / part time |")
    print("|---|---|---|---|---|---|")
    for i, part in enumerate(PARTS):
        rate = f"{weights[i] / (ms[i] / 1e3) / 1e9:.1f} GB/s" if weights[i] and ms[i] else "-"
        print(
            f"| {part} | {ms[i]:.2f} | {ms[i] / sum(ms):.0%} | {dot_ms[i]:.2f} "
            f"| {weights[i] / 1e6:.1f} | {rate} |"
        )
    print("\nlargest op kinds per part (ms/step):")
    for i, part in enumerate(PARTS):
        top = ", ".join(f"{k} {v:.2f}" for k, v in largest[i].most_common(4))
        print(f"- {part}: {top}")


if __name__ == "__main__":
    main()
