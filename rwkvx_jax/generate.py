"""Text generation from text: `generate_text` and the `python -m rwkvx_jax.generate` CLI.

python -m rwkvx_jax.generate --checkpoint DIR --prompt "The Eiffel tower is in"
python -m rwkvx_jax.generate --demo --prompt "Hello" --max-new-tokens 20 --temperature 0
python -m rwkvx_jax.generate --checkpoint DIR --batch-file prompts.jsonl --max-new-tokens 50
python -m rwkvx_jax.generate --checkpoint DIR --prompt "$CONTEXT" --max-new-tokens 0 \\
    --state-out context.npz                          # read a long context once ...
python -m rwkvx_jax.generate --checkpoint DIR --state-in context.npz --prompt "Q: ..."  # ... reuse

--demo runs a random `tiny` model (byte vocabulary, gibberish output) so the command can be
tried on any machine without a checkpoint. A single prompt streams its text as it is generated;
a batch prints each result, labelled, when all are done. Compiling takes a while on CPU; set
JAX_COMPILATION_CACHE_DIR to a directory to keep compiled code between runs.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp

from rwkvx_jax.cli import run_cli
from rwkvx_jax.config import RWKVXConfig, preset
from rwkvx_jax.decode import DecodeConfig, Decoder
from rwkvx_jax.decode_state import DecodeState
from rwkvx_jax.kv_cache import EVICTION_POLICIES
from rwkvx_jax.sampling import SamplingConfig, token_penalty_weights
from rwkvx_jax.state_io import load_state, read_state_metadata, save_state
from rwkvx_jax.tokenizer import Tokenizer, tokenizer_for_vocab

PROG = "python -m rwkvx_jax.generate"
DEMO_PRESET = "tiny"
DEMO_SEED = 0


def demo_model(seed: int = DEMO_SEED) -> tuple[RWKVXConfig, dict]:
    """The `--demo` model: the `tiny` preset (byte vocabulary) with seeded random weights."""
    from rwkvx_jax.convert import params_from_state_dict
    from rwkvx_jax.random_checkpoint import random_state_dict

    config = preset(DEMO_PRESET)
    return config, params_from_state_dict(random_state_dict(config, seed), config)


def _broadcast_state(state: DecodeState, batch: int) -> DecodeState:
    """A state of `batch` sequences: as given, or one sequence's state copied to every row."""
    have = int(state.lengths.shape[0])
    if have == batch:
        return state
    if have != 1:
        raise ValueError(
            f"the state holds {have} sequences but {batch} prompts were given (give one prompt "
            "per saved sequence, or a state of one sequence to share among all prompts)"
        )
    return jax.tree.map(lambda leaf: jnp.repeat(leaf, batch, axis=0), state)


class TextGenerator:
    """A model, its tokenizer and its compiled decoder: text in, text out.

    Compiled code is kept per instance, so reuse one generator for many calls.

    Example:
      generator = TextGenerator(config, params)
      texts = generator.generate(["Hello"], SamplingConfig(temperature=0.0), 20)
    """

    def __init__(
        self,
        config: RWKVXConfig,
        params,
        decode_config: DecodeConfig | None = None,
        *,
        tokenizer: Tokenizer | None = None,
    ):
        """Builds the decoder (nothing is compiled until the first call).

        Args:
          config: the model config.
          params: its Flax parameter tree.
          decode_config: cache size, eviction, prefill piece, attention mode.
          tokenizer: None picks the one for the model's vocabulary (`tokenizer_for_vocab`).
        """
        self.config = config
        self.tokenizer = tokenizer or tokenizer_for_vocab(config.vocab_size)
        self.decoder = Decoder(config, params, decode_config)
        # The official penalty rule: whitespace and digit tokens add nothing to their count.
        self.token_weights = token_penalty_weights(self.tokenizer.decode, config.vocab_size)

    def encode_prompts(self, prompts: Sequence[str]) -> list[list[int]]:
        """Token ids of each prompt.

        Raises:
          ValueError: no prompts, or a prompt with no tokens (names its index).
          TypeError: a prompt is not a str.
        """
        if isinstance(prompts, str):
            raise TypeError("prompts must be a list of str, got a single str")
        if not prompts:
            raise ValueError("no prompts given")
        ids = []
        for index, prompt in enumerate(prompts):
            if not isinstance(prompt, str):
                raise TypeError(f"prompt {index} must be a str, got {type(prompt).__name__}")
            tokens = self.tokenizer.encode(prompt)
            if not tokens:
                raise ValueError(
                    f"prompt {index} is empty: the model needs at least one token to continue from"
                )
            ids.append(tokens)
        return ids

    def check_sampling(self, sampling: SamplingConfig) -> None:
        """Raises ValueError if a banned or stop token id is outside the vocabulary."""
        for name in ("banned_tokens", "stop_tokens"):
            bad = [t for t in getattr(sampling, name) if t >= self.config.vocab_size]
            if bad:
                raise ValueError(
                    f"{name} {bad} lie outside the model's vocabulary [0, {self.config.vocab_size})"
                )

    def generate(
        self,
        prompts: Sequence[str],
        sampling: SamplingConfig,
        max_new_tokens: int,
        *,
        state: DecodeState | None = None,
        on_text: Callable[[int, str], None] | None = None,
        result: dict | None = None,
    ) -> list[str]:
        """Continues each prompt; see `generate_text`."""
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int):
            raise TypeError(f"max_new_tokens must be an int, got {max_new_tokens!r}")
        if max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
        self.check_sampling(sampling)
        ids = self.encode_prompts(prompts)
        if state is not None:
            state = _broadcast_state(state, len(ids))
        streams = [self.tokenizer.streaming_decoder() for _ in ids]
        pieces: list[list[str]] = [[] for _ in ids]
        generated: list[list[int]] = [[] for _ in ids]

        def emit(row: int, text: str) -> None:
            if text:
                pieces[row].append(text)
                if on_text is not None:
                    on_text(row, text)

        decoded = {}
        steps = self.decoder.generate(
            ids,
            sampling,
            max_new_tokens,
            state=state,
            token_weights=self.token_weights,
            result=decoded,
        )
        for tokens in steps:
            for row, token in enumerate(tokens.tolist()):
                if token >= 0:
                    generated[row].append(token)
                    emit(row, streams[row].push(token))
        for row, stream in enumerate(streams):
            emit(row, stream.flush())
        if result is not None:
            result.update(decoded)
            result["tokens"] = generated
        return ["".join(p) for p in pieces]


def generate_text(
    config: RWKVXConfig,
    params,
    prompts: Sequence[str],
    sampling: SamplingConfig,
    max_new_tokens: int,
    *,
    decode_config: DecodeConfig | None = None,
    state: DecodeState | None = None,
    on_text: Callable[[int, str], None] | None = None,
    result: dict | None = None,
) -> list[str]:
    """Generates a continuation of each prompt, all prompts decoded together as one batch.

    Builds (and compiles) a fresh `TextGenerator`; to generate repeatedly, keep one instead.
    Inputs are checked (prompts, token ids, state batch) before anything is compiled.

    Args:
      config: the model config.
      params: its Flax parameter tree.
      prompts: B non-empty strings.
      sampling: sampler settings (temperature 0 = greedy; stop tokens end a row, and are not
        part of its text).
      max_new_tokens: most tokens generated per prompt (0: only read the prompts).
      decode_config: cache size, eviction, prefill piece, attention mode.
      state: continue saved sequences (`state_io.load_state`): each prompt is appended to its
        row's context; a state of one sequence is shared by every prompt. Consumed.
      on_text: called as on_text(row, text) whenever a row's text grows (never splits a
        UTF-8 character), for streaming.
      result: if given, filled with "state" (the final `DecodeState`, every generated token
        read, ready for `state_io.save_state`), "sampler", and "tokens" (each row's generated
        ids).

    Returns:
      B strings: each prompt's generated text (without the prompt).
    """
    generator = TextGenerator(config, params, decode_config)
    return generator.generate(
        prompts, sampling, max_new_tokens, state=state, on_text=on_text, result=result
    )


# ---------------------------------------------------------------------------------------------
# Command line


class UsageError(ValueError):
    """A command-line input is unusable; the message says which and why."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _number(kind, low=None, high=None, low_open=False, text=""):
    """An argparse type: a finite number of `kind` within [low, high] (or (low, high])."""

    def parse(value: str):
        try:
            number = kind(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {text}, got {value!r}") from None
        too_low = low is not None and (number <= low if low_open else number < low)
        too_high = high is not None and number > high
        if not math.isfinite(number) or too_low or too_high:
            raise argparse.ArgumentTypeError(f"expected {text}, got {value}")
        return number

    return parse


def _parser() -> argparse.ArgumentParser:
    defaults = SamplingConfig()
    parser = _Parser(
        prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    model = parser.add_mutually_exclusive_group(required=True)
    model.add_argument("--checkpoint", metavar="DIR", help="a converted checkpoint directory")
    model.add_argument(
        "--demo", action="store_true", help="a random tiny model instead (no checkpoint needed)"
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt", metavar="TEXT", help="the text to continue")
    source.add_argument(
        "--batch-file",
        metavar="FILE",
        help='prompts, one per line, or JSON lines {"prompt": ...}; generated as one batch',
    )
    count = _number(int, low=0, text="an int >= 0")
    positive = _number(int, low=1, text="an int >= 1")
    real = _number(float, text="a finite number")
    token_id = _number(int, low=0, text="a token id (int >= 0)")
    add = parser.add_argument
    add("--max-new-tokens", type=count, default=200, metavar="N", help="default 200")
    add(
        "--temperature",
        type=_number(float, low=0.0, text="a number >= 0"),
        default=defaults.temperature,
        metavar="T",
        help=f"0 = greedy (default {defaults.temperature})",
    )
    add(
        "--top-p",
        type=_number(float, low=0.0, high=1.0, low_open=True, text="a number in (0, 1]"),
        default=defaults.top_p,
        metavar="P",
        help=f"nucleus mass, 1 = off (default {defaults.top_p})",
    )
    add(
        "--top-k",
        type=count,
        default=defaults.top_k,
        metavar="K",
        help=f"keep the k likeliest tokens, 0 = off (default {defaults.top_k})",
    )
    add(
        "--presence-penalty",
        type=real,
        default=defaults.presence_penalty,
        metavar="X",
        help=f"subtracted from every generated token's logit (default {defaults.presence_penalty})",
    )
    add(
        "--frequency-penalty",
        type=real,
        default=defaults.frequency_penalty,
        metavar="X",
        help=f"times each token's decayed count, subtracted (default {defaults.frequency_penalty})",
    )
    add(
        "--penalty-decay",
        type=_number(float, low=0.0, high=1.0, text="a number in [0, 1]"),
        default=defaults.penalty_decay,
        metavar="X",
        help=f"counts decay by this per generated token (default {defaults.penalty_decay})",
    )
    add("--ban", type=token_id, nargs="+", default=[], metavar="ID", help="token ids never drawn")
    add(
        "--stop",
        type=token_id,
        nargs="*",
        default=None,
        metavar="ID",
        help="token ids that end a sequence (default: end-of-document, id 0; none if empty)",
    )
    add(
        "--seed",
        type=_number(int, text="an int"),
        default=defaults.seed,
        metavar="N",
        help=f"sampling seed (default {defaults.seed})",
    )
    add(
        "--cache-size",
        type=positive,
        default=None,
        metavar="TOKENS",
        help="KV cache per sparse block and sequence (default 16 chunks, or the saved state's)",
    )
    add("--eviction", choices=EVICTION_POLICIES, default=None, help="default distinct")
    add(
        "--attention-mode",
        choices=("train", "official"),
        default=None,
        help="sparse attention of training (default) or of the official runtime",
    )
    add(
        "--prefill-chunk",
        type=positive,
        default=None,
        metavar="TOKENS",
        help="tokens per prefill piece (default 512, a whole number of chunks; demo: one chunk)",
    )
    add("--state-in", metavar="FILE", help="continue from a saved state: the prompt is appended")
    add("--state-out", metavar="FILE", help="save the final state (every generated token read)")
    return parser


def read_batch_file(path: str) -> list[str]:
    """Prompts from a file: one per non-blank line, or JSON lines with a "prompt" string.

    The file is JSON lines when its first non-blank line starts with "{".
    """
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except FileNotFoundError:
        raise UsageError(f"{path}: no such batch file") from None
    except UnicodeDecodeError as err:
        raise UsageError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start})") from None
    rows = [(number, line) for number, line in enumerate(lines, start=1) if line.strip()]
    if not rows:
        raise UsageError(f"{path}: no prompts in the batch file")
    if not rows[0][1].lstrip().startswith("{"):
        return [line for _, line in rows]
    prompts = []
    for number, line in rows:
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise UsageError(f"{path}:{number}: not valid JSON ({err.msg})") from None
        if not isinstance(record, dict) or not isinstance(record.get("prompt"), str):
            raise UsageError(f'{path}:{number}: expected an object with a string "prompt"')
        prompts.append(record["prompt"])
    return prompts


def _decode_config(args, config: RWKVXConfig, saved: dict | None, batch: int) -> DecodeConfig:
    """The decode settings from the flags, reconciled with a saved state's (if any).

    One prompt keeps the kernel layout that reads fastest at batch 1 ("auto"); a batch of
    prompts keeps the kernels as trained, which XLA:CPU multiplies faster at batch 2-32 (see
    `rwkvx_jax.decode_weights`).
    """
    cache_size, mode = args.cache_size, args.attention_mode
    eviction = args.eviction
    if saved is not None:
        saved_mode = "official" if saved.get("cache_kind") == "flat" else "train"
        if mode is not None and saved.get("cache_kind") and mode != saved_mode:
            raise UsageError(
                f"--attention-mode {mode}, but {args.state_in} was saved in {saved_mode} mode"
            )
        mode = mode or saved_mode
        if saved["cache_size"] is not None:
            if cache_size is not None and cache_size != saved["cache_size"]:
                raise UsageError(
                    f"--cache-size {cache_size}, but {args.state_in} holds a cache of "
                    f"{saved['cache_size']} tokens (omit --cache-size to use it)"
                )
            cache_size = saved["cache_size"]
        eviction = eviction or saved.get("extra", {}).get("eviction")
    prefill_chunk = args.prefill_chunk
    if prefill_chunk is None and args.demo:
        prefill_chunk = config.chunk_size  # a short compile: the demo is for trying things out
    decode_config = DecodeConfig(
        cache_size=cache_size,
        eviction=eviction or "distinct",
        prefill_chunk=prefill_chunk,
        attention_mode=mode or "train",
        kernel_layout="auto" if batch == 1 else "in_out",
    )
    return decode_config.resolve(config)


def _write_stdout(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def _label(index: int, total: int, prompt: str) -> str:
    preview = prompt if len(prompt) <= 60 else prompt[:57] + "..."
    return f"=== [{index + 1}/{total}] {json.dumps(preview, ensure_ascii=False)} ==="


def run(args) -> None:
    """Does what the parsed flags ask (raises ValueError / OSError on bad input)."""
    if args.prompt == "":
        raise UsageError("--prompt is empty: the model needs at least one token to continue from")
    prompts = [args.prompt] if args.batch_file is None else read_batch_file(args.batch_file)
    if args.demo:
        config, params = demo_model()
    else:
        from rwkvx_jax.api import load

        config, params = load(args.checkpoint)
    stop = (
        [tokenizer_for_vocab(config.vocab_size).end_of_document] if args.stop is None else args.stop
    )
    sampling = SamplingConfig(
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        presence_penalty=args.presence_penalty,
        frequency_penalty=args.frequency_penalty,
        penalty_decay=args.penalty_decay,
        banned_tokens=tuple(args.ban),
        stop_tokens=tuple(stop),
        seed=args.seed,
    )
    state = saved = None
    if args.state_in is not None:
        saved = read_state_metadata(args.state_in)
        state = load_state(args.state_in, config)
    decode_config = _decode_config(args, config, saved, len(prompts))
    stream = len(prompts) == 1
    result: dict = {}
    texts = generate_text(
        config,
        params,
        prompts,
        sampling,
        args.max_new_tokens,
        decode_config=decode_config,
        state=state,
        on_text=(lambda row, text: _write_stdout(text)) if stream else None,
        result=result,
    )
    if stream:
        _write_stdout("\n")
    else:
        for index, (prompt, text) in enumerate(zip(prompts, texts, strict=True)):
            print(_label(index, len(prompts), prompt))
            print(text, flush=True)
    if args.state_out is not None:
        extra = {
            "eviction": decode_config.eviction,
            "model": "demo" if args.demo else os.path.abspath(args.checkpoint),
        }
        save_state(args.state_out, config, result["state"], extra=extra)


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the command line; returns the exit status (errors: one line on stderr)."""
    args = _parser().parse_args(argv)
    return run_cli(PROG, lambda: run(args))


if __name__ == "__main__":
    sys.exit(main())
