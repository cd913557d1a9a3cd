"""Serve a model over HTTP, OpenAI-compatible: `rwkvx-serve` / `python -m rwkvx_jax.serve`.

python -m rwkvx_jax.serve --checkpoint DIR                      # http://127.0.0.1:8000
python -m rwkvx_jax.serve --demo --port 0                       # any free port (printed)
python -m rwkvx_jax.serve --checkpoint DIR --slots 16 --max-context 8192 --state-cache-mb 4096

Continuous batching over --slots rows (one compiled decode step), prompts prefilled in pieces
of --prefill-chunk tokens between decode steps, states after prompt prefixes cached under
--state-cache-mb, named states in --states-dir. Everything is compiled before the server says
it is ready: one line on stdout, `rwkvx-serve: ready on http://HOST:PORT (model NAME)`.
SIGTERM (or Ctrl-C) stops taking requests, lets running ones finish for up to --drain-seconds,
cancels the rest and exits 0 (130 for Ctrl-C). Needs the `serve` extra (fastapi, uvicorn).
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import sys
import tempfile

from rwkvx_jax.cli import (
    Parser,
    UsageError,
    add_model_arguments,
    int_at_least,
    load_model,
    number,
    run_cli,
)
from rwkvx_jax.decoding.decoder import DEFAULT_CACHE_CHUNKS, DecodeConfig, Decoder

PROG = "rwkvx-serve"


def _parser() -> argparse.ArgumentParser:
    parser = Parser(prog=PROG, description=__doc__)
    add_model_arguments(parser)
    add = parser.add_argument
    add("--host", default="127.0.0.1", help="address to listen on (default loopback only)")
    add("--port", type=number(int, 0, 65535), default=8000, help="0 = any free port (default 8000)")
    add("--slots", type=int_at_least(1), default=4, help="sequences decoded together (default 4)")
    add(
        "--max-context",
        type=int_at_least(1),
        default=None,
        metavar="TOKENS",
        help="tokens per sequence, saved state + prompt + answer; rounded up to whole attention "
        f"chunks (default {DEFAULT_CACHE_CHUNKS} chunks, as rwkvx-generate's --cache-size)",
    )
    add(
        "--prefill-chunk",
        type=int_at_least(1),
        default=None,
        metavar="TOKENS",
        help="tokens per prefill piece: the longest a prompt stalls running streams, and the "
        "state cache's step (default 512, a whole number of chunks)",
    )
    add(
        "--queue", type=int_at_least(0), default=64, help="requests waiting for a slot (default 64)"
    )
    add(
        "--state-cache-mb",
        type=number(float, 0.0),
        default=1024.0,
        metavar="MB",
        help="host memory for states after prompt prefixes (default 1024; 0 = off)",
    )
    add("--states-dir", metavar="DIR", help="named states (default: a temporary folder)")
    add("--model-name", help="the model id clients send (default: demo, or the folder's name)")
    add(
        "--drain-seconds",
        type=number(float, 0.0),
        default=10.0,
        help="on SIGTERM, how long running requests may finish (default 10)",
    )
    return parser


def _listening_socket(host: str, port: int) -> socket.socket:
    """Bound and listening before the ready line, so no client can arrive too early."""
    try:
        info = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(info[0], socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(info[4])
    except OSError as err:
        raise UsageError(f"cannot listen on {host}:{port} ({err.strerror or err})") from None
    sock.listen(128)
    return sock


def _run(args) -> int:
    try:
        import uvicorn

        from rwkvx_jax.serving.app import create_app
    except ImportError as err:
        raise ImportError(f"{err.name} is missing: pip install 'rwkvx-jax[serve]'") from None
    from rwkvx_jax.serving.engine import Engine
    from rwkvx_jax.serving.metrics import Metrics
    from rwkvx_jax.serving.named_states import NamedStates
    from rwkvx_jax.serving.service import Service
    from rwkvx_jax.serving.state_cache import StateCache
    from rwkvx_jax.tokenizer import tokenizer_for_vocab

    config, params, where = load_model(args)
    chunk = config.chunk_size
    context = args.max_context and -(-args.max_context // chunk) * chunk
    # The [out, in] kernel copy speeds up batch-1 steps on CPU but slows XLA:CPU's products at
    # batch 2-32 (docs/BENCHMARKS.md, decoding: 2.63x -> 3.61x batch-8 tokens/s with "in_out").
    layout = "in_out" if args.slots > 1 else "auto"
    decoder = Decoder(
        config,
        params,
        DecodeConfig(cache_size=context, prefill_chunk=args.prefill_chunk, kernel_layout=layout),
    )
    budget = int(args.state_cache_mb * 2**20)
    cache = StateCache(budget) if budget else None
    engine = Engine(decoder, slots=args.slots, queue_size=args.queue, state_cache=cache)
    name = args.model_name or ("demo" if args.demo else os.path.basename(os.path.normpath(where)))
    states_dir = args.states_dir or tempfile.mkdtemp(prefix="rwkvx-states-")
    states = NamedStates(states_dir, config, decoder.decode_config.cache_size)
    service = Service(engine, tokenizer_for_vocab(config.vocab_size), name, states, Metrics())
    sock = _listening_socket(args.host, args.port)
    engine.warm_up()
    server = uvicorn.Server(
        uvicorn.Config(
            create_app(service),
            log_level="warning",
            access_log=False,
            timeout_graceful_shutdown=args.drain_seconds,
        )
    )
    # uvicorn re-raises the signal it stopped on once it is done; a SIGTERM is our normal end.
    signal.signal(signal.SIGTERM, lambda *_: None)
    host, port = sock.getsockname()[:2]
    service.start()
    print(
        f"{PROG}: ready on http://{host}:{port} (model {name}, {args.slots} slots, context "
        f"{decoder.decode_config.cache_size} tokens, states in {states_dir})",
        flush=True,
    )
    try:
        server.run(sockets=[sock])
    finally:
        service.stop()
    return 0


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    return run_cli(PROG, lambda: _run(args))


if __name__ == "__main__":
    sys.exit(main())
