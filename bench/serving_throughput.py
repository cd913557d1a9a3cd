"""Serving benchmark (issue 23 item 8): `rwkvx-serve` under concurrent clients on loopback.

  python bench/serving_throughput.py                    # rwkvx-0.22b shape, random weights, fp32
  python bench/serving_throughput.py --preset tiny --history 256 --quick   # a quick look

Writes the model (random weights) as a converted checkpoint in a temporary folder, starts
`python -m rwkvx_jax.serve` on it in a subprocess (so clients and server do not share a Python
interpreter), waits for its ready line, then:

1. Concurrency sweep: for each number of clients (default 1, 4, 16; the server has as many slots
   as the largest), every client sends `--requests` streamed greedy completions one after the
   other (prompt `--prompt-tokens` random tokens, `--max-tokens` tokens each). Reported: the
   aggregate output tokens/s, time to first token and inter-token latency p50/p99 as the client
   sees them, and the server's own mean batched decode step time over the same requests
   (`rwkvx_decode_step_seconds` from /metrics). The raw step rate at that occupancy is
   clients / step time; "server / raw" is the aggregate rate over it (issue target >= 0.8).
   Concurrency 1 is sequential single-request generation through the same server: the
   baseline of the "x 1 client" ratio.
2. State cache: a chat whose first turn is a `--history`-token conversation; the second turn
   (the history, an answer and a new message) is answered from the state cache, and its time to
   first token is compared with the same-length prompt that shares no prefix with anything
   (read in full). Target: >= 5x lower with the cache.

Prints Markdown tables. CPU timings on a shared machine are noisy: compare ratios from one run.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/timing.py

import httpx
import numpy as np
from timing import Stopwatch

ROOT = Path(__file__).resolve().parent.parent
READY = re.compile(r"ready on (http://[0-9.]+:\d+)")


def write_checkpoint(preset_name: str, folder: str) -> None:
    """The preset with seeded random weights, as a converted checkpoint folder."""
    from rwkvx_jax.checkpoints.directory import save_params
    from rwkvx_jax.checkpoints.official_layout import params_from_state_dict
    from rwkvx_jax.checkpoints.random_weights import random_state_dict
    from rwkvx_jax.config import preset

    config = preset(preset_name)
    params = params_from_state_dict(random_state_dict(config), config)
    save_params(folder, config, params, {"source": f"random weights, preset {preset_name}"})


def start_server(checkpoint: str, args) -> tuple[subprocess.Popen, str]:
    command = [
        sys.executable, "-m", "rwkvx_jax.serve", "--checkpoint", checkpoint, "--port", "0",
        "--slots", str(max(args.clients)), "--max-context", str(args.max_context),
        "--model-name", "bench", "--queue", "256",
    ]  # fmt: skip
    if args.prefill_chunk:
        command += ["--prefill-chunk", str(args.prefill_chunk)]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}
    server = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True)
    line = server.stdout.readline()
    match = READY.search(line)
    if not match:
        server.kill()
        raise SystemExit(f"the server did not start: {line!r}")
    print(line.strip(), flush=True)
    return server, match.group(1)


def metric(base: str, name: str) -> float:
    text = httpx.get(base + "/metrics").text
    return float(re.search(rf"^{name} (\S+)$", text, re.M).group(1))


def stream_one(base: str, prompt: str, max_tokens: int) -> dict:
    """One streamed greedy completion: client-side TTFT, inter-token gaps, tokens."""
    body = {
        "model": "bench", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
        "stream": True, "stream_options": {"include_usage": True},
    }  # fmt: skip
    clock = Stopwatch()
    arrivals, usage = [], None
    with httpx.stream("POST", base + "/v1/completions", json=body, timeout=3600) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                usage = chunk["usage"]
            elif chunk["choices"] and chunk["choices"][0]["text"]:
                arrivals.append(clock.seconds())
    return {
        "ttft": arrivals[0] if arrivals else clock.seconds(),
        "gaps": list(np.diff(arrivals)),
        "tokens": usage["completion_tokens"],
        "cached": usage["prompt_tokens_details"]["cached_tokens"],
    }


def random_text(rng: np.random.Generator, n_words: int) -> str:
    words = ["alpha", "beta", "gamma", "delta", "river", "stone", "cloud", "seven", "north"]
    return " ".join(rng.choice(words, n_words))


def concurrency_sweep(base: str, args) -> list[dict]:
    rng = np.random.default_rng(0)
    rows = []
    for clients in args.clients:
        prompts = [
            [random_text(rng, args.prompt_tokens) for _ in range(args.requests)]
            for _ in range(clients)
        ]
        steps0 = metric(base, "rwkvx_decode_step_seconds_count")
        step_s0 = metric(base, "rwkvx_decode_step_seconds_sum")
        clock = Stopwatch()
        with concurrent.futures.ThreadPoolExecutor(clients) as pool:
            runs = list(
                pool.map(lambda mine: [stream_one(base, p, args.max_tokens) for p in mine], prompts)
            )
        wall = clock.seconds()
        results = [r for run in runs for r in run]
        steps = metric(base, "rwkvx_decode_step_seconds_count") - steps0
        step_ms = 1e3 * (metric(base, "rwkvx_decode_step_seconds_sum") - step_s0) / steps
        tokens = sum(r["tokens"] for r in results)
        ttft = [r["ttft"] for r in results]
        gaps = [g for r in results for g in r["gaps"]] or [float("nan")]
        rows.append(
            {
                "clients": clients,
                "tok_s": tokens / wall,
                "ttft_p50": np.percentile(ttft, 50),
                "ttft_p99": np.percentile(ttft, 99),
                "itl_p50": np.percentile(gaps, 50),
                "itl_p99": np.percentile(gaps, 99),
                "step_ms": step_ms,
                "raw_tok_s": clients / (step_ms / 1e3),
            }
        )
        print(f"{clients} clients: {rows[-1]}", flush=True)
    return rows


def cache_turns(base: str, args) -> dict:
    """Second-turn TTFT from the state cache against a same-length prompt read in full."""
    rng = np.random.default_rng(1)
    history = f"User: {random_text(rng, args.history)}\n\nAssistant:"
    first = stream_one(base, history, 16)
    second_turn = history + " " + random_text(rng, 12) + "\n\nUser: and then?\n\nAssistant:"
    cached = stream_one(base, second_turn, 1)
    # The same number of words, none shared with anything the server has read.
    fresh_prompt = f"User: {random_text(np.random.default_rng(2), args.history + 17)}"
    fresh = stream_one(base, fresh_prompt, 1)
    return {"first_ttft": first["ttft"], "cached": cached, "fresh": fresh}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="rwkvx-0.22b")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--requests", type=int, default=2, help="per client, one after another")
    parser.add_argument("--prompt-tokens", type=int, default=64, help="words per prompt")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--history", type=int, default=4096, help="words of the first turn")
    parser.add_argument("--max-context", type=int, default=8192)
    parser.add_argument("--prefill-chunk", type=int, default=None)
    parser.add_argument("--quick", action="store_true", help="1 and 4 clients, 1 request each")
    args = parser.parse_args()
    if args.quick:
        args.clients, args.requests = [1, 4], 1
    with tempfile.TemporaryDirectory() as folder:
        checkpoint = os.path.join(folder, "model")
        write_checkpoint(args.preset, checkpoint)
        server, base = start_server(checkpoint, args)
        try:
            rows = concurrency_sweep(base, args)
            cache = cache_turns(base, args)
        finally:
            server.terminate()
            server.wait(timeout=120)
    from decode_latency import machine_line

    print(f"\n## Serving {args.preset} (fp32, random weights), clients on loopback")
    print(machine_line())
    print(
        f"{args.requests} streamed greedy requests per client, ~{args.prompt_tokens}-word "
        f"prompts, {args.max_tokens} tokens each; {max(args.clients)} slots"
    )
    base_rate = rows[0]["tok_s"]
    print(
        "\n| clients | output tok/s | x 1 client | TTFT p50 / p99 s | inter-token p50 / p99 ms "
        "| server step ms | raw step tok/s | server / raw |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['clients']} | {r['tok_s']:.1f} | {r['tok_s'] / base_rate:.2f} "
            f"| {r['ttft_p50']:.2f} / {r['ttft_p99']:.2f} "
            f"| {1e3 * r['itl_p50']:.0f} / {1e3 * r['itl_p99']:.0f} | {r['step_ms']:.1f} "
            f"| {r['raw_tok_s']:.1f} | {r['tok_s'] / r['raw_tok_s']:.2f} |"
        )
    c, f = cache["cached"], cache["fresh"]
    print(
        f"\nsecond chat turn over a {args.history}-word history: TTFT {c['ttft']:.2f} s with "
        f"{c['cached']} prompt tokens from the state cache; the same-length prompt read in full: "
        f"{f['ttft']:.2f} s; ratio {f['ttft'] / c['ttft']:.1f}x "
        f"(first turn {cache['first_ttft']:.2f} s)"
    )


if __name__ == "__main__":
    main()
