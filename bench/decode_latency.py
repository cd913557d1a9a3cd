"""Decode benchmarks (issue 3 item 9): per-token latency and memory of `Decoder.step` on CPU.

  python bench/decode_latency.py --contexts [--max-context 65536]   # (a) small model, 1K .. 1M
  python bench/decode_latency.py --vs-official [--quick]            # (b) 0.22B shape vs official
  python bench/decode_latency.py --cache-sweep                      # step cost against the cap
  python bench/decode_latency.py --contexts --vs-official           # both

(a) `--contexts`: a small model (default C=256, L=4, A=2, V=256, chunk 512, top-k 3, fp32,
    random weights) with a fixed KV-cache cap (default 16 chunks). Every context runs in a fresh
    subprocess so that its peak RSS is its own: a real `prefill` of random tokens builds the
    context (`Decoder.prefill` calls of 32K tokens continuing the state, so the host-side token
    arrays stay small), then 8 warm-up and 64 timed `step`s at batch 1. The prefill stops
    `--boundary` (32) tokens short of the context so that the timed steps cross the chunk
    boundary at the context: one of them completes a chunk and pushes it into the cache
    (evicting past the cap). That step is reported apart ("push step"), and so is the cost per
    token amortised over a chunk. Ratios: latency(ctx) / latency(8K) and peak RSS(ctx) / peak
    RSS(first context at or past the cap); the issue's targets are <= 1.15 at 1M and within
    10%. Takes ~8 minutes up to 1M on 2 busy cores (most of it the 1M prefill).
`--cache-sweep`: the same small model, ms/token of `step` at a short context against the cache
    cap (default 4, 16, 64 chunks), and ms per `prefill` piece (one chunk of new tokens
    continuing that state): neither should grow with the cap.
(b) `--vs-official`: the rwkvx-0.22b shape (V65536 C768 L12 A4, chunk 2048) with random weights
    written once to a .pth and loaded by both sides. Batch 1 ms/token of our `step` in fp32 and
    bf16 (params and compute) and of the official `rwkv-x==0.2.7` runtime ("cpu fp32",
    `forward(token, state)`) after contexts of 2K and 8K tokens (the same random tokens; each
    side builds its context with its own prefill, the 8K context continuing the 2K one). The
    memory-bandwidth floor is measured in the same run: bytes of weights read per token (every
    parameter except the embedding table, of which one row) / the best read bandwidth of
    jitted reads of a 1 GiB fp32 array (a sum, row sums, a matrix-vector product). Because
    the machine's bandwidth swings with other VMs' load, the fp32 steps are also measured
    paired: right before each timed step the 1 GiB reads run again, and so does a chain of
    XLA matrix-vector products over the decoder's own matrices and nothing else
    (`MatrixVectorChain`, what XLA:CPU's products alone cost); the medians of the per-step
    ratios step / floor, chain / floor and step / chain are printed in their own table. Then
    tokens/s at batch 8 and 32 (fp32, 2K context: one sequence's prefilled state replicated to
    every row).

Prints progress bars, the measurements, and Markdown tables with the ratios. CPU timings on a
shared machine are noisy: compare ratios measured in one run, not numbers across runs.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import math
import os
import platform
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("RWKV_CUDA_ON", "0")
os.environ.setdefault("JAX_PLATFORMS", "cpu")  # a CPU benchmark; skips probing other backends
sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/timing.py, when tests load this

import jax
import jax.numpy as jnp
import numpy as np
from timing import Stopwatch, seconds, timed
from tqdm.auto import tqdm

from rwkvx_jax import preset
from rwkvx_jax.checkpoints.official_layout import params_from_state_dict
from rwkvx_jax.checkpoints.random_weights import random_state_dict
from rwkvx_jax.checkpoints.tensor_files import write_pth
from rwkvx_jax.config import RWKVXConfig
from rwkvx_jax.decoding.decoder import DecodeConfig, Decoder
from rwkvx_jax.decoding.weights import DecodeWeights

DEFAULT_CONTEXTS = (1024, 8192, 65536, 262144, 1048576)
MiB = 2**20


# --------------------------------------------------------------------------------------------
# Shared helpers
# --------------------------------------------------------------------------------------------


def peak_rss_mib() -> float:
    """This process's peak resident set size so far (ru_maxrss: KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / MiB if sys.platform == "darwin" else peak / 1024


def current_rss_mib() -> float | None:
    """Resident set size now (Linux /proc), or None where unavailable."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def tree_mib(tree) -> float:
    return sum(x.nbytes for x in jax.tree.leaves(tree)) / MiB


def jit_cache_size(fn) -> int | None:
    """Compiled variants of a jitted function (private JAX API; None if unavailable)."""
    size = getattr(fn, "_cache_size", None)
    return size() if callable(size) else None


def short(n: int) -> str:
    """1024 -> 1K, 1048576 -> 1M (exact powers only), else the number."""
    for unit, div in (("M", 2**20), ("K", 2**10)):
        if n >= div and n % div == 0:
            return f"{n // div}{unit}"
    return str(n)


def machine_line() -> str:
    return (
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"jax {jax.__version__} on {jax.default_backend()}"
    )


def logits_ready(outputs) -> None:
    """The sync of a timed `prefill` or `step`: waits for its logits (its first output)."""
    outputs[0].block_until_ready()


def time_steps(
    decoder: Decoder, state, tokens: np.ndarray, warmup: int, desc: str, before_each=None
):
    """Runs one `step` per column of tokens [B, n]; returns (seconds of the timed steps, state).

    The first `warmup` steps are not timed. Every step blocks on its logits. `before_each`, if
    given, is called right before every step (a paired measurement: `PairedFloor.sample`).
    """
    times = []
    for i in tqdm(range(tokens.shape[1]), desc=desc, unit="step", leave=False):
        column = jnp.asarray(tokens[:, i], jnp.int32)
        if before_each is not None and i >= warmup:
            before_each()
        step_s, (_, state) = timed(decoder.step, column, state, sync=logits_ready)
        if i >= warmup:
            times.append(step_s)
    return np.array(times), state


def push_index(first_position: int, n: int, chunk: int) -> int | None:
    """Index among n steps (the first reading position first_position) that completes a chunk."""
    for i in range(n):
        if (first_position + i) % chunk == chunk - 1:
            return i
    return None


# --------------------------------------------------------------------------------------------
# (a) latency and peak RSS against context, small model, one subprocess per context
# --------------------------------------------------------------------------------------------


def small_config(args) -> RWKVXConfig:
    return RWKVXConfig(
        vocab_size=args.vocab,
        n_embd=args.width,
        n_rwkv_layer=args.layers,
        n_attn_layer=args.attn_layers,
        chunk_size=args.chunk_size,
        top_k=args.top_k,
    )


def shape_line(config: RWKVXConfig, cache_size: int, prefill_chunk: int) -> str:
    return (
        f"model: V={config.vocab_size} C={config.n_embd} L={config.n_rwkv_layer} "
        f"A={config.n_attn_layer} chunk={config.chunk_size} top_k={config.top_k} "
        f"{config.dtype}, random weights, batch 1; cache_size={cache_size} tokens "
        f"({cache_size // config.chunk_size} chunks), prefill_chunk={prefill_chunk}"
    )


def context_child(args) -> None:
    """One context in this (fresh) process; prints `RESULT {json}` as the last stdout line."""
    ctx = args.child_context
    config = small_config(args)
    cache_size = args.cache_chunks * config.chunk_size
    params = jax.tree.map(jnp.asarray, params_from_state_dict(random_state_dict(config), config))
    decoder = Decoder(
        config, params, DecodeConfig(cache_size=cache_size, prefill_chunk=args.prefill_chunk)
    )
    boundary = min(args.boundary, ctx - 1)
    n_prefill = ctx - boundary
    n_steps = args.warmup + args.steps
    rng = np.random.default_rng(ctx)
    draw = lambda n: rng.integers(0, config.vocab_size, size=(1, n), dtype=np.int32)
    rss_start = current_rss_mib()

    # The first piece alone (it compiles), then the rest in segments of `prefill_segment`
    # tokens continuing the state: prefill throughput without compiling, and host-side token
    # arrays bounded by the segment (prefill keeps several copies of its [B, T] input).
    piece = decoder.decode_config.prefill_chunk
    first = min(piece, n_prefill)
    first_piece_s, (_, state) = timed(lambda: decoder.prefill(draw(first)), sync=logits_ready)
    rss_first_piece = current_rss_mib()
    segment = max(args.prefill_segment // piece, 1) * piece
    clock = Stopwatch()
    bar = tqdm(total=n_prefill - first, desc=f"prefill {short(ctx)}", unit="tok", leave=False)
    with bar:
        done = first
        while done < n_prefill:
            n = min(segment, n_prefill - done)
            logits, state = decoder.prefill(draw(n), state)
            logits.block_until_ready()
            done += n
            bar.update(n)
    prefill_s = clock.seconds()
    rss_prefill = current_rss_mib()
    tokens = draw(n_steps)
    first_step_s, (_, state) = timed(
        lambda: decoder.step(jnp.asarray(tokens[:, 0], jnp.int32), state), sync=logits_ready
    )
    times, state = time_steps(
        decoder, state, tokens[:, 1:], args.warmup - 1, desc=f"steps @{short(ctx)}"
    )
    rss_end = current_rss_mib()
    # Position read by the first timed step: n_prefill + warmup.
    push = push_index(n_prefill + args.warmup, len(times), config.chunk_size)
    regular = np.delete(times, push) if push is not None else times
    median = float(np.median(regular))
    push_s = float(times[push]) if push is not None else None
    chunk = config.chunk_size
    amortised = median if push_s is None else ((chunk - 1) * median + push_s) / chunk
    result = {
        "context": ctx,
        "n_prefill": n_prefill,
        "first_piece_s": first_piece_s,
        "prefill_tok_s": (n_prefill - first) / prefill_s if n_prefill > first else None,
        "first_step_s": first_step_s,
        "median_ms": 1e3 * median,
        "min_ms": 1e3 * float(regular.min()),
        "max_regular_ms": 1e3 * float(regular.max()),
        "push_ms": None if push_s is None else 1e3 * push_s,
        "amortised_ms": 1e3 * amortised,
        "peak_rss_mib": peak_rss_mib(),
        "rss_start_mib": rss_start,
        "rss_first_piece_mib": rss_first_piece,
        "rss_prefill_mib": rss_prefill,
        "rss_end_mib": rss_end,
        "state_mib": tree_mib(state),
        "params_mib": tree_mib(params),
        "step_compiles": jit_cache_size(decoder._step),
        "piece_compiles": jit_cache_size(decoder._piece),
        "final_length": int(np.asarray(state.lengths)[0]),
    }
    print("RESULT " + json.dumps(result), flush=True)


def child_command(args, ctx: int) -> list[str]:
    flags = {
        "--child-context": ctx,
        "--vocab": args.vocab,
        "--width": args.width,
        "--layers": args.layers,
        "--attn-layers": args.attn_layers,
        "--chunk-size": args.chunk_size,
        "--top-k": args.top_k,
        "--cache-chunks": args.cache_chunks,
        "--prefill-chunk": args.prefill_chunk,
        "--prefill-segment": args.prefill_segment,
        "--warmup": args.warmup,
        "--steps": args.steps,
        "--boundary": args.boundary,
    }
    command = [sys.executable, os.path.abspath(__file__)]
    for flag, value in flags.items():
        command += [flag, str(value)]
    return command


def tok_s(r: dict) -> str:
    return f"{r['prefill_tok_s']:.0f}" if r["prefill_tok_s"] else "n/a"


def run_contexts(args) -> None:
    config = small_config(args)
    cache_size = args.cache_chunks * config.chunk_size
    contexts = [c for c in args.context_list if c <= args.max_context]
    print("\n## (a) ms/token and peak RSS against context (small model, CPU)")
    print(machine_line())
    print(shape_line(config, cache_size, args.prefill_chunk))
    print(
        f"per context, in a fresh subprocess: prefill (context - {args.boundary}) random tokens, "
        f"{args.warmup} warm-up + {args.steps} timed steps crossing the chunk boundary at the "
        "context (median of the steps that push nothing; the pushing step apart)"
    )
    results = []
    for ctx in tqdm(contexts, desc="contexts", unit="ctx"):
        clock = Stopwatch()
        proc = subprocess.run(child_command(args, ctx), stdout=subprocess.PIPE, text=True)
        lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
        if proc.returncode or not lines:
            tqdm.write(f"context {ctx}: subprocess failed (exit {proc.returncode})")
            tqdm.write(proc.stdout[-2000:])
            continue
        r = json.loads(lines[-1][len("RESULT ") :])
        results.append(r)
        push = f"{r['push_ms']:.2f}" if r["push_ms"] is not None else "n/a"
        tqdm.write(
            f"  {short(ctx):>5}: step {r['median_ms']:.2f} ms (min {r['min_ms']:.2f}, "
            f"max {r['max_regular_ms']:.2f}), push step {push} ms, amortised "
            f"{r['amortised_ms']:.2f} ms; peak RSS {r['peak_rss_mib']:.0f} MiB (after the first "
            f"piece {r['rss_first_piece_mib']:.0f}, after prefill {r['rss_prefill_mib']:.0f}, "
            f"after steps {r['rss_end_mib']:.0f}); prefill "
            f"{tok_s(r)} tok/s after a first piece of {r['first_piece_s']:.1f} s (compiling); "
            f"first step {r['first_step_s']:.1f} s; "
            f"compiled step x{r['step_compiles']}, piece x{r['piece_compiles']}; "
            f"wall {clock.seconds():.0f} s"
        )
    if not results:
        return
    print(
        f"state {results[0]['state_mib']:.1f} MiB, params {results[0]['params_mib']:.1f} MiB; "
        "peak RSS includes compiling (it varies by a few % between identical processes), hence "
        "the growth past the RSS right after the first (compiling) prefill piece"
    )

    by_ctx = {r["context"]: r for r in results}
    ref = by_ctx.get(args.reference_context) or results[0]
    capped = [r for r in results if r["context"] >= cache_size]
    rss_ref = capped[0] if capped else None
    rss_name = short(rss_ref["context"]) if rss_ref else "n/a"
    print(
        f"\n| context | step ms (median) | push step ms | amortised ms/token | "
        f"latency / {short(ref['context'])} | peak RSS MiB | RSS / {rss_name} | "
        "peak - RSS after 1st piece, MiB | prefill tok/s |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for r in results:
        lat = r["median_ms"] / ref["median_ms"]
        if rss_ref and r["context"] >= cache_size:
            rss_ratio = f"{r['peak_rss_mib'] / rss_ref['peak_rss_mib']:.3f}"
        else:
            rss_ratio = "(below cap)"
        push = f"{r['push_ms']:.2f}" if r["push_ms"] is not None else "n/a"
        print(
            f"| {short(r['context'])} | {r['median_ms']:.2f} | {push} | {r['amortised_ms']:.2f} "
            f"| {lat:.3f} | {r['peak_rss_mib']:.0f} | {rss_ratio} "
            f"| {max(r['peak_rss_mib'] - r['rss_first_piece_mib'], 0):.0f} | {tok_s(r)} |"
        )

    last = results[-1]
    lat = last["median_ms"] / ref["median_ms"]
    amort = last["amortised_ms"] / ref["amortised_ms"]
    print(
        f"\ntarget latency({short(last['context'])}) / latency({short(ref['context'])}) <= 1.15:"
        f" {lat:.3f} median, {amort:.3f} amortised -> {'met' if lat <= 1.15 else 'MISSED'}"
    )
    if len(capped) > 1:
        spread = max(abs(r["peak_rss_mib"] / rss_ref["peak_rss_mib"] - 1) for r in capped)
        print(
            f"target peak RSS within 10% once the cap ({cache_size} tokens) is reached: largest "
            f"deviation {spread:.1%} -> {'met' if spread <= 0.10 else 'MISSED'}"
        )


def run_cache_sweep(args) -> None:
    """ms/token of `step` on the small model against the cache cap, at a fixed short context.

    With fixed-shape state the cost per token should not depend on the cap beyond the top-k
    chunks a step reads; a cost that grows with the cap is a full-cache copy per step.
    """
    config = small_config(args)
    chunk = config.chunk_size
    n_prefill = chunk + chunk // 2  # one complete chunk, then mid-chunk: no push while timed
    print("\n## cache-cap sweep: ms/token against cache_size (small model, CPU)")
    print(machine_line())
    print(shape_line(config, args.cache_chunks * chunk, args.prefill_chunk).split(";")[0])
    print(
        f"per cap: prefill {n_prefill} random tokens, {args.warmup} warm-up + {args.steps} timed "
        "steps (median), no chunk completes while timed"
    )
    params = jax.tree.map(jnp.asarray, params_from_state_dict(random_state_dict(config), config))
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, config.vocab_size, size=(1, n_prefill + args.warmup + args.steps))
    rows = []
    for n_chunks in tqdm(args.sweep_chunks, desc="cache caps", unit="cap"):
        decoder = Decoder(
            config, params, DecodeConfig(cache_size=n_chunks * chunk, prefill_chunk=chunk)
        )
        _, state = decoder.prefill(tokens[:, :n_prefill])
        times, state = time_steps(
            decoder, state, tokens[:, n_prefill:], args.warmup, f"cap {n_chunks} chunks"
        )
        prefill_ms = time_prefill_pieces(decoder, state, rng, repeats=3)
        rows.append((n_chunks, tree_mib(state), 1e3 * float(np.median(times)), prefill_ms))
        tqdm.write(
            f"  cap {n_chunks} chunks: step {rows[-1][2]:.2f} ms/token, prefill "
            f"{prefill_ms:.1f} ms per {chunk}-token piece"
        )
        del decoder, state
        gc.collect()
    print(
        "\n| cap (chunks) | cap (tokens) | state MiB | step ms (median) | vs smallest "
        f"| prefill ms per {chunk} tokens (median) | vs smallest |"
    )
    print("|---|---|---|---|---|---|---|")
    for n_chunks, mib, ms, prefill_ms in rows:
        print(
            f"| {n_chunks} | {n_chunks * chunk} | {mib:.1f} | {ms:.2f} | {ms / rows[0][2]:.2f}x "
            f"| {prefill_ms:.1f} | {prefill_ms / rows[0][3]:.2f}x |"
        )


def time_prefill_pieces(decoder: Decoder, state, rng, repeats: int) -> float:
    """Median ms of one compiled `prefill` piece continuing `state` (consumed), new tokens each."""
    piece = decoder.decode_config.prefill_chunk
    vocab = decoder.config.vocab_size
    times = []
    for i in range(repeats + 1):  # the first call compiles
        tokens = rng.integers(0, vocab, size=(1, piece))
        piece_s, (_, state) = timed(decoder.prefill, tokens, state, sync=logits_ready)
        if i:
            times.append(piece_s)
    return 1e3 * float(np.median(times))


# --------------------------------------------------------------------------------------------
# (b) 0.22B shape against the official runtime, the bandwidth floor, and batching
# --------------------------------------------------------------------------------------------


def _read_probes(n: int) -> tuple[jax.Array, dict]:
    """A materialised fp32 array of n elements and the jitted reads of it the floor is taken
    from: a flat sum, per-row sums of [64, n/64] (XLA can split them across cores), and a
    matrix-vector product of [n/1024, 1024] (the op a decode step is made of)."""
    x = jnp.ones((n,), jnp.float32) + 0  # materialised, not a broadcast constant
    vector = jnp.ones((1024,), jnp.float32)
    variants = {
        "sum": jax.jit(jnp.sum),
        "row sums": jax.jit(lambda a: jnp.sum(a.reshape(64, -1), axis=1)),
        "matrix-vector": jax.jit(lambda a: a.reshape(-1, 1024) @ vector),
    }
    for fn in variants.values():
        fn(x).block_until_ready()
    return x, variants


def _elements(gib: float) -> int:
    n = int(gib * 2**30) // 4
    return n - n % (64 * 1024)


def measure_read_bandwidth(gib: float = 1.0, repeats: int = 7) -> float:
    """Best-of-`repeats` bytes/s of jitted fp32 reads of a `gib` GiB array (`_read_probes`; the
    fastest read counts). The best, not the mean: a slow repeat (another job on the cores)
    must not lower the floor, which would flatter the ratios against it.
    """
    n = _elements(gib)
    x, variants = _read_probes(n)
    best = min(seconds(fn, x) for fn in variants.values() for _ in range(repeats))
    del x
    return 4 * n / best


# Low-rank (LoRA) factors of the RWKV-7 time mix: plain parameters multiplied as x @ factor.
_LORA_FACTORS = ("w1", "w2", "a1", "a2", "v1", "v2", "g1", "g2")


class MatrixVectorChain:
    """One jitted chain of one matrix-vector product per matrix a decode step multiplies by
    (the decoder's own arrays, in their layout: [out, in] kernels contract their minor axis),
    each product's input depending on the previous result, and nothing else.

    What XLA:CPU's matrix-vector products alone cost for these weights: no step built from
    them can be faster, so step / chain is the overhead of everything else in the step.
    """

    def __init__(self, weights: DecodeWeights):
        mats = [(x, 1) for x in weights.transposed.values()]
        for path, x in jax.tree_util.tree_leaves_with_path(weights.rest):
            keys = [str(getattr(p, "key", p)) for p in path]
            if x.ndim == 2 and "emb" not in keys and keys[-1] in ("kernel", *_LORA_FACTORS):
                mats.append((x, 0))
        self.arrays = [x for x, _ in mats]
        self.axes = tuple(axis for _, axis in mats)
        self.nbytes = sum(x.nbytes for x in self.arrays)
        self.seed = jnp.zeros((), self.arrays[0].dtype)
        axes = self.axes

        @jax.jit
        def chain(arrays, seed):
            s = seed
            for a, axis in zip(arrays, axes, strict=True):
                # The input depends on the previous product, so the products run one after
                # another as in the model; the sum reads the whole output (a slice might let
                # XLA shrink the product).
                x = jnp.tanh(jnp.linspace(-1.0, 1.0, a.shape[axis], dtype=a.dtype) + s)[None]
                s = jnp.sum(jax.lax.dot_general(x, a, (((1,), (axis,)), ((), ())))) * 1e-6
            return s

        self.chain = chain
        self.seconds()  # compiles

    def seconds(self) -> float:
        return seconds(self.chain, self.arrays, self.seed)

    def compiled_text(self) -> str:
        return self.chain.lower(self.arrays, self.seed).compile().as_text()


class PairedFloor:
    """The floor and the matrix-vector chain measured right before each timed step.

    The machines these benchmarks run on share their memory bandwidth with other VMs, and it
    swings (measured: a 256 MiB read at 23-42 GB/s within 40 s in one process). A floor taken
    once, at its best moment, and set against steps timed later measures the neighbours as
    much as the step; each `sample()` here reads the 1 GiB array once per read variant (the
    fastest counts) and runs the `MatrixVectorChain` once, so every step has a floor and a
    chain from the same moment, and the ratios are taken step by step.
    """

    def __init__(self, weights: DecodeWeights, gib: float = 1.0):
        self.n = _elements(gib)
        self.array, self.variants = _read_probes(self.n)
        self.chain = MatrixVectorChain(weights)
        self.bandwidths: list[float] = []
        self.chain_seconds: list[float] = []

    def sample(self) -> None:
        best = min(seconds(fn, self.array) for fn in self.variants.values())
        self.bandwidths.append(4 * self.n / best)
        self.chain_seconds.append(self.chain.seconds())

    def ratios(self, step_seconds: np.ndarray, weight_bytes: int) -> dict[str, float]:
        """Medians over the steps of: step / floor, chain / floor, step / chain (the last
        len(step_seconds) samples are those steps')."""
        if len(self.bandwidths) < len(step_seconds):
            raise ValueError(f"{len(step_seconds)} steps but {len(self.bandwidths)} samples")
        bandwidth = np.array(self.bandwidths[-len(step_seconds) :])
        chain = np.array(self.chain_seconds[-len(step_seconds) :])
        floor = weight_bytes / bandwidth
        return {
            "bandwidth_gb_s": float(np.median(bandwidth)) / 1e9,
            "chain_ms": 1e3 * float(np.median(chain)),
            "step_vs_floor": float(np.median(step_seconds / floor)),
            "chain_vs_floor": float(np.median(chain / floor)),
            "step_vs_chain": float(np.median(step_seconds / chain)),
        }

    def close(self) -> None:
        del self.array, self.chain


def weight_bytes_per_token(params) -> int:
    """Bytes of parameters one token reads: all of them, but only one row of the embedding."""
    table = params["emb"]["embedding"]
    total = sum(x.nbytes for x in jax.tree.leaves(params))
    return total - table.nbytes + table.nbytes // table.shape[0]


def attended_kv_bytes(config: RWKVXConfig, context: int | None = None) -> int:
    """Keys and values one decode step reads per sequence at `context` tokens: per sparse block
    the whole open chunk (read in full, rows past the token masked) plus up to top_k - 1
    complete chunks (as many as exist). None: the most, top_k chunks."""
    itemsize = jnp.dtype(config.dtype).itemsize
    chunks = config.top_k
    if context is not None:
        chunks = 1 + min(config.top_k - 1, context // config.chunk_size)
    per_block = 2 * chunks * config.chunk_size * config.n_embd * itemsize
    return config.n_attn_layer * per_block


def official_decode(path: str, tokens: np.ndarray, plan, warmup: int) -> dict[int, np.ndarray]:
    """Official runtime: for each (ctx, n_prefill_from, n_prefill_to, n_steps) of `plan`, its
    prefill continues the state, then n_steps `forward(token, state)` steps are timed."""
    import torch
    from rwkv_x import model_old

    model = model_old.RWKV_X(path, "cpu fp32")
    state = None
    out = {}
    with torch.no_grad():
        for ctx, begin, end, n_steps in plan:
            tqdm.write(f"official: prefill tokens [{begin}, {end}) for context {short(ctx)}")
            _, state = model.forward(tokens[begin:end].tolist(), state)
            times = []
            for i in tqdm(range(n_steps), desc=f"official @{short(ctx)}", leave=False):
                step_s = seconds(model.forward, int(tokens[end + i]), state, sync=None)
                if i >= warmup:
                    times.append(step_s)
            out[ctx] = np.array(times)
    del model, state
    gc.collect()
    return out


def ours_decode(
    config, params, cache_size, tokens, plan, warmup, name, paired_gib: float | None = None
) -> tuple[dict[int, np.ndarray], dict[int, dict]]:
    """Ours: the same plan as `official_decode`, prefill via `Decoder.prefill`. With
    `paired_gib`, a `PairedFloor` (of that many GiB) samples before every timed step; returns
    (step seconds by context, `PairedFloor.ratios` by context, empty without it)."""
    decoder = Decoder(config, params, DecodeConfig(cache_size=cache_size))
    paired = None if paired_gib is None else PairedFloor(decoder.weights, paired_gib)
    state = None
    out, ratios = {}, {}
    for ctx, begin, end, n_steps in plan:
        _, state = decoder.prefill(tokens[None, begin:end], state, progress=True)
        times, state = time_steps(
            decoder, state, tokens[None, end : end + n_steps], warmup, f"{name} @{short(ctx)}",
            before_each=None if paired is None else paired.sample,
        )  # fmt: skip
        out[ctx] = times
        if paired is not None:
            ratios[ctx] = paired.ratios(times, weight_bytes_per_token(params))
    compiles = (jit_cache_size(decoder._step), jit_cache_size(decoder._piece))
    tqdm.write(f"{name}: compiled step x{compiles[0]}, prefill piece x{compiles[1]}")
    if paired is not None:
        paired.close()
    del decoder, state, paired
    gc.collect()
    return out, ratios


def batch_decode(config, params, ctx, batch_sizes, boundary, warmup, steps) -> dict:
    """tokens/s at batch 1 and each batch size: one prefilled sequence's state replicated to
    every row (batch 1 is re-measured here: the cache size differs from the batch-1 runs)."""
    chunk = config.chunk_size
    n_prefill = ctx - boundary
    cache_size = max(math.ceil((n_prefill + warmup + steps) / chunk), 3) * chunk
    decoder = Decoder(config, params, DecodeConfig(cache_size=cache_size))
    rng = np.random.default_rng(1)
    prompt = rng.integers(0, config.vocab_size, size=(1, n_prefill), dtype=np.int32)
    _, one = decoder.prefill(prompt, progress=True)
    out = {}
    for batch in (1, *batch_sizes):
        state = jax.tree.map(lambda x, b=batch: jnp.repeat(x, b, axis=0), one)
        tokens = rng.integers(0, config.vocab_size, size=(batch, warmup + steps), dtype=np.int32)
        times, state = time_steps(decoder, state, tokens, warmup, f"batch {batch}")
        out[batch] = {
            "ms": 1e3 * float(np.median(times)),
            "tok_s": batch / float(np.median(times)),
            "state_mib": tree_mib(state),
            "rss_mib": current_rss_mib(),
        }
        tqdm.write(
            f"batch {batch}: {out[batch]['ms']:.1f} ms/step, {out[batch]['tok_s']:.1f} tok/s "
            f"(state {out[batch]['state_mib']:.0f} MiB, RSS now {out[batch]['rss_mib']:.0f} MiB)"
        )
        del state
        gc.collect()
    return out, cache_size


def run_vs_official(args) -> None:
    config = preset(args.preset)
    contexts = (512, 1024) if args.quick else tuple(args.official_contexts)
    batch_sizes = tuple(args.batch_sizes)
    batch_ctx = contexts[0]
    warmup, steps = args.official_warmup, args.official_steps
    chunk = config.chunk_size
    boundary = min(args.boundary, min(contexts) - 1)
    n_steps = warmup + steps
    # One token stream: prefill to ctx - boundary, n_steps steps, continue prefill to the next.
    plan, begin = [], 0
    for ctx in contexts:
        end = ctx - boundary
        if end < begin:
            raise SystemExit(f"contexts {contexts} are too close for {n_steps} steps each")
        plan.append((ctx, begin, end, n_steps))
        begin = end + n_steps
    tokens = np.random.default_rng(0).integers(0, config.vocab_size, size=begin, dtype=np.int32)
    cache_size = max(math.ceil(begin / chunk), 3) * chunk

    print("\n## (b) 0.22B shape, random weights: decode vs the official runtime")
    print(machine_line())
    print(
        f"model: {args.preset} (V={config.vocab_size} C={config.n_embd} L={config.n_rwkv_layer} "
        f"A={config.n_attn_layer} chunk={chunk} top_k={config.top_k}), batch 1, "
        f"cache_size={cache_size} tokens (nothing evicted); per context: prefill to "
        f"context - {boundary}, {warmup} warm-up + {steps} timed steps (median)"
    )

    tqdm.write("measuring read bandwidth (jitted fp32 reads of 1 GiB, best of 7)...")
    bandwidth = measure_read_bandwidth(args.bandwidth_gib)
    print(f"read bandwidth: {bandwidth / 1e9:.1f} GB/s")

    state_dict = random_state_dict(config, seed=0)
    floors, timings, weight_bytes, configs, paired_ratios = {}, {}, {}, {}, {}
    for dtype in ("float32", "bfloat16"):
        cfg = dataclasses.replace(config, dtype=dtype, param_dtype=dtype)
        params = jax.tree.map(jnp.asarray, params_from_state_dict(state_dict, cfg))
        weights = weight_bytes_per_token(params)
        kv = attended_kv_bytes(cfg)
        floors[dtype] = weights / bandwidth
        weight_bytes[dtype], configs[dtype] = weights, cfg
        print(
            f"{dtype}: weights read per token {weights / 1e6:.0f} MB -> floor "
            f"{1e3 * floors[dtype]:.1f} ms/token (with the attended KV, {kv / 1e6:.0f} MB more: "
            f"{1e3 * (weights + kv) / bandwidth:.1f} ms)"
        )
        name = f"rwkvx-jax {'fp32' if dtype == 'float32' else 'bf16'}"
        timings[name], ratios = ours_decode(
            cfg, params, cache_size, tokens, plan, warmup, name,
            paired_gib=args.bandwidth_gib if dtype == "float32" else None,
        )  # fmt: skip
        if ratios:
            paired_ratios = ratios
        for ctx, t in timings[name].items():
            tqdm.write(f"{name} @{short(ctx)}: {1e3 * np.median(t):.1f} ms/token")
        if dtype == "float32":
            fp32_params, fp32_config = params, cfg
        else:
            del params
        gc.collect()

    official = None
    if not args.skip_official:
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "bench.pth")
            write_pth(path, state_dict)
            official = official_decode(path, tokens, plan, warmup)
        for ctx, t in official.items():
            tqdm.write(f"official fp32 @{short(ctx)}: {1e3 * np.median(t):.1f} ms/token")
        timings["official rwkv-x 0.2.7 fp32"] = official
    del state_dict
    gc.collect()

    batches, batch_cache = batch_decode(
        fp32_config, fp32_params, batch_ctx, batch_sizes, boundary,
        args.batch_warmup, args.batch_steps,
    )  # fmt: skip

    print(
        f"\nfloor = weights read per token / {bandwidth / 1e9:.1f} GB/s: "
        f"fp32 {1e3 * floors['float32']:.1f} ms, bf16 {1e3 * floors['bfloat16']:.1f} ms"
    )
    print(
        "(+ KV: the keys and values the step must read besides: per sparse block the open chunk "
        "and the complete chunks it picks, up to top_k - 1)"
    )
    print(
        "\n| implementation | context | ms/token | vs official | vs own-dtype floor "
        "| vs floor + KV |"
    )
    print("|---|---|---|---|---|---|")
    for name, by_ctx in timings.items():
        dtype = "bfloat16" if "bf16" in name else "float32"
        for ctx, t in by_ctx.items():
            ms = 1e3 * float(np.median(t))
            vs_official = (
                f"{ms / (1e3 * float(np.median(official[ctx]))):.2f}x" if official else "n/a"
            )
            kv = attended_kv_bytes(configs[dtype], ctx - boundary)
            with_kv = 1e3 * (weight_bytes[dtype] + kv) / bandwidth
            print(
                f"| {name} | {short(ctx)} | {ms:.1f} | {vs_official} "
                f"| {ms / 1e3 / floors[dtype]:.2f}x | {ms / with_kv:.2f}x |"
            )

    print(
        "\npaired (fp32): before each timed step, the floor's 1 GiB reads and a chain of XLA "
        "matrix-vector products over the decoder's own matrices, nothing else "
        "(`MatrixVectorChain`); medians of the per-step ratios:"
    )
    print(
        "\n| context | ms/token | GB/s | step vs paired floor | matrix-vector chain ms "
        "| chain vs paired floor | step vs chain |"
    )
    print("|---|---|---|---|---|---|---|")
    for ctx, r in paired_ratios.items():
        ms = 1e3 * float(np.median(timings["rwkvx-jax fp32"][ctx]))
        print(
            f"| {short(ctx)} | {ms:.1f} | {r['bandwidth_gb_s']:.1f} | {r['step_vs_floor']:.2f}x "
            f"| {r['chain_ms']:.1f} | {r['chain_vs_floor']:.2f}x | {r['step_vs_chain']:.2f}x |"
        )

    single = batches[1]["tok_s"]
    print(
        f"\nbatching (fp32, context {short(batch_ctx)}, cache_size {batch_cache}; one prefilled "
        f"state replicated to every row; {args.batch_warmup} warm-up + {args.batch_steps} timed "
        "steps, median):"
    )
    print("\n| batch | ms/step | tokens/s | vs batch 1 |")
    print("|---|---|---|---|")
    for batch, r in batches.items():
        print(f"| {batch} | {r['ms']:.1f} | {r['tok_s']:.1f} | {r['tok_s'] / single:.2f}x |")


# --------------------------------------------------------------------------------------------


def int_list(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--contexts", action="store_true", help="run (a)")
    parser.add_argument("--vs-official", action="store_true", help="run (b)")
    parser.add_argument("--warmup", type=int, default=8, help="(a) untimed steps")
    parser.add_argument("--steps", type=int, default=64, help="(a) timed steps")
    parser.add_argument(
        "--boundary", type=int, default=32,
        help="prefill stops this many tokens short of the context, so the timed steps cross "
        "the chunk boundary there (0: prefill the whole context)",
    )  # fmt: skip

    small = parser.add_argument_group("(a) small model")
    small.add_argument("--context-list", type=int_list, default=list(DEFAULT_CONTEXTS))
    small.add_argument("--max-context", type=int, default=max(DEFAULT_CONTEXTS))
    small.add_argument("--reference-context", type=int, default=8192)
    small.add_argument("--vocab", type=int, default=256)
    small.add_argument("--width", type=int, default=256)
    small.add_argument("--layers", type=int, default=4)
    small.add_argument("--attn-layers", type=int, default=2)
    small.add_argument("--chunk-size", type=int, default=512)
    small.add_argument("--top-k", type=int, default=3)
    small.add_argument("--cache-chunks", type=int, default=16, help="cache cap, in chunks")
    small.add_argument("--prefill-chunk", type=int, default=4096, help="DecodeConfig.prefill_chunk")
    small.add_argument(
        "--prefill-segment", type=int, default=32768, help="tokens per Decoder.prefill call"
    )
    small.add_argument(
        "--cache-sweep", action="store_true", help="ms/token against the cache cap (small model)"
    )
    small.add_argument("--sweep-chunks", type=int_list, default=[4, 16, 64])
    small.add_argument("--child-context", type=int, default=None, help=argparse.SUPPRESS)

    big = parser.add_argument_group("(b) 0.22B shape")
    big.add_argument("--preset", default="rwkvx-0.22b")
    big.add_argument("--quick", action="store_true", help="contexts 512 and 1024")
    big.add_argument("--official-contexts", type=int_list, default=[2048, 8192])
    big.add_argument("--official-warmup", type=int, default=4)
    big.add_argument("--official-steps", type=int, default=32)
    big.add_argument("--batch-sizes", type=int_list, default=[8, 32])
    big.add_argument("--batch-warmup", type=int, default=3)
    big.add_argument("--batch-steps", type=int, default=12)
    big.add_argument("--bandwidth-gib", type=float, default=1.0)
    big.add_argument("--skip-official", action="store_true")
    args = parser.parse_args()

    if args.child_context is not None:
        context_child(args)
        return
    if not (args.contexts or args.vs_official or args.cache_sweep):
        parser.error("choose at least one of --contexts, --cache-sweep, --vs-official")
    if args.warmup < 1:
        parser.error("--warmup must be >= 1")
    if args.contexts:
        run_contexts(args)
    if args.cache_sweep:
        run_cache_sweep(args)
    if args.vs_official:
        run_vs_official(args)


if __name__ == "__main__":
    main()
