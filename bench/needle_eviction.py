"""Needle in a haystack past the KV-cache cap: which eviction policy keeps retrieval working.

A byte-level RWKV-X with random weights reads a passkey haystack (SPEC §8 sentences) with one
needle line at a chosen depth, several times longer than the cache, then the question. For each
eviction policy we report, per depth:

* needle kept: every sparse block still holds a chunk overlapping the needle when the question
  is read (a chunk that is gone can never be selected again);
* question error: max |logit - exact| / max |exact| over the question's tokens, where "exact" is
  the same model decoded with a cache large enough to never evict (the train-exact semantics).

Random weights cannot answer the question, so retrieval quality is measured as agreement with
exact decoding, which is what a trained model's retrieval rests on.

Usage: python bench/needle_eviction.py [--cache-chunks 8] [--chunk 64] [--context 4096]
"""

from __future__ import annotations

import argparse

import numpy as np
from timing import Stopwatch
from tqdm import tqdm

from rwkvx_jax.checkpoints.official_layout import params_from_state_dict
from rwkvx_jax.checkpoints.random_weights import random_state_dict
from rwkvx_jax.config import RWKVXConfig
from rwkvx_jax.decoding.decoder import DecodeConfig, Decoder

HAYSTACK = (
    "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
)
NEEDLE = "The pass key is 71432. Remember it. 71432 is the pass key. "
QUESTION = "What is the pass key? The pass key is"


def build_prompt(context: int, depth: float) -> tuple[list[int], tuple[int, int]]:
    """Byte tokens of haystack + needle at `depth` (0..1), `context` tokens before the question.

    Returns:
      (tokens, (needle_start, needle_end)).
    """
    body = context - len(NEEDLE)
    hay = (HAYSTACK * (body // len(HAYSTACK) + 1))[:body]
    cut = int(depth * body)
    cut = hay.rfind(". ", 0, cut) + 2 if ". " in hay[:cut] else 0
    text = hay[:cut] + NEEDLE + hay[cut:]
    return list(text.encode()), (cut, cut + len(NEEDLE))


def question_logits(decoder: Decoder, context: list[int]):
    """Prefill the context, then step through the question; returns logits [Q, V] and state."""
    logits, state = decoder.prefill([context])
    rows = [np.asarray(logits[0])]
    question = list(QUESTION.encode())
    for token in question[:-1]:
        logits, state = decoder.step(np.array([token]), state)
        rows.append(np.asarray(logits[0]))
    # The question's tokens are fed one by one, so context + question are all read.
    return np.stack(rows), state


def needle_kept(state, span: tuple[int, int], chunk: int) -> bool:
    """Every sparse block still holds a chunk that overlaps the needle's token span."""
    wanted = set(range(span[0] // chunk, (span[1] - 1) // chunk + 1))
    for name, block in state.blocks.items():
        if name.startswith("moba_"):
            ids = set(np.asarray(block.cache.chunk_ids[0]).tolist())
            if not wanted & ids:
                return False
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache-chunks", type=int, default=8, help="cache size in chunks")
    parser.add_argument("--chunk", type=int, default=64)
    parser.add_argument("--context", type=int, default=4096, help="tokens before the question")
    parser.add_argument("--depths", type=float, nargs="+", default=[0.1, 0.3, 0.5, 0.7, 0.9])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    args = parser.parse_args()

    config = RWKVXConfig(
        vocab_size=256, n_embd=128, n_rwkv_layer=4, n_attn_layer=2,
        dim_w=16, dim_a=16, dim_v=16, dim_g=32, chunk_size=args.chunk, top_k=3,
    )  # fmt: skip
    cap = args.cache_chunks * args.chunk
    exact_cache = (-(-(args.context + len(QUESTION)) // args.chunk) + 1) * args.chunk
    print(
        f"model C={config.n_embd} L={config.n_rwkv_layer} A={config.n_attn_layer} "
        f"chunk={args.chunk} top_k={config.top_k}; context {args.context} tokens, "
        f"cache cap {cap} tokens ({args.context / cap:.1f}x over), random weights"
    )
    results = {policy: [] for policy in ("distinct", "oldest")}
    clock = Stopwatch()
    for seed in args.seeds:
        params = params_from_state_dict(random_state_dict(config, seed=seed), config)
        exact = Decoder(config, params, DecodeConfig(cache_size=exact_cache, prefill_chunk=512))
        capped = {
            policy: Decoder(
                config, params, DecodeConfig(cache_size=cap, eviction=policy, prefill_chunk=512)
            )
            for policy in results
        }
        for depth in tqdm(args.depths, desc=f"seed {seed}"):
            context, span = build_prompt(args.context, depth)
            reference, _ = question_logits(exact, context)
            for policy, decoder in capped.items():
                logits, state = question_logits(decoder, context)
                error = float(np.abs(logits - reference).max() / np.abs(reference).max())
                kept = needle_kept(state, span, args.chunk)
                results[policy].append((seed, depth, kept, error))

    print("\n| policy | depth | seed | needle kept | question error vs exact |")
    print("|---|---|---|---|---|")
    for policy, rows in results.items():
        for seed, depth, kept, error in rows:
            print(f"| {policy} | {depth:.1f} | {seed} | {'yes' if kept else 'no'} | {error:.2e} |")
    print("\n| policy | needle kept | median question error | max question error |")
    print("|---|---|---|---|")
    for policy, rows in results.items():
        kept = sum(r[2] for r in rows)
        errors = [r[3] for r in rows]
        print(f"| {policy} | {kept}/{len(rows)} | {np.median(errors):.2e} | {max(errors):.2e} |")
    print(f"\n({clock.seconds():.0f} s)")


if __name__ == "__main__":
    main()
