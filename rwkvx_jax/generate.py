"""Generate text from a prompt: `rwkvx-generate` / `python -m rwkvx_jax.generate`.

python -m rwkvx_jax.generate --checkpoint DIR --prompt "The Eiffel tower is in"
python -m rwkvx_jax.generate --demo --prompt "Hello" --max-new-tokens 20 --temperature 0
python -m rwkvx_jax.generate --checkpoint DIR --batch-file prompts.jsonl --max-new-tokens 50
python -m rwkvx_jax.generate --checkpoint DIR --prompt "$CONTEXT" --max-new-tokens 0 \\
    --state-out context.npz                          # read a long context once ...
python -m rwkvx_jax.generate --checkpoint DIR --state-in context.npz --prompt "Q: ..."  # ... reuse
python -m rwkvx_jax.generate --checkpoint DIR --state-in context.npz --prompt ""  # continue it
python -m rwkvx_jax.generate --checkpoint runs/tiny --prompt "def "   # a train.py run's export

--demo runs a random `tiny` model (byte vocabulary, gibberish output) so the command can be
tried on any machine without a checkpoint. A single prompt streams its text as it is generated;
a batch prints each result, labelled, when all are done. Compiling takes a while on CPU; set
JAX_COMPILATION_CACHE_DIR to a directory to keep compiled code between runs.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from rwkvx_jax.checkpoints.adapters import apply_adapter_file
from rwkvx_jax.cli import (
    Parser,
    UsageError,
    add_decode_arguments,
    add_model_arguments,
    load_model,
    number,
    output_path,
    run_cli,
)
from rwkvx_jax.config import RWKVXConfig
from rwkvx_jax.decoding.decoder import DecodeConfig
from rwkvx_jax.decoding.sampling import SamplingConfig
from rwkvx_jax.decoding.state_files import (
    load_state,
    read_state_metadata,
    save_state,
)
from rwkvx_jax.decoding.text import generate_text
from rwkvx_jax.tokenizer import tokenizer_for_vocab

PROG = "python -m rwkvx_jax.generate"


def _parser() -> argparse.ArgumentParser:
    defaults = SamplingConfig()
    parser = Parser(prog=PROG, description=__doc__)
    add_model_arguments(parser)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--prompt", metavar="TEXT", help='the text to continue ("" with --state-in: none)'
    )
    source.add_argument(
        "--batch-file",
        metavar="FILE",
        help='prompts, one per line, or JSON lines {"prompt": ...}; generated as one batch',
    )
    count = number(int, low=0, text="an int >= 0")
    real = number(float, text="a finite number")
    token_id = number(int, low=0, text="a token id (int >= 0)")
    add = parser.add_argument
    add("--max-new-tokens", type=count, default=200, metavar="N", help="default 200")
    add(
        "--temperature",
        type=number(float, low=0.0, text="a number >= 0"),
        default=defaults.temperature,
        metavar="T",
        help=f"0 = greedy (default {defaults.temperature})",
    )
    add(
        "--top-p",
        type=number(float, low=0.0, high=1.0, low_open=True, text="a number in (0, 1]"),
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
        type=number(float, low=0.0, high=1.0, text="a number in [0, 1]"),
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
        type=number(int, text="an int"),
        default=defaults.seed,
        metavar="N",
        help=f"sampling seed (default {defaults.seed})",
    )
    add_decode_arguments(
        parser,
        cache_default="16 chunks, or the saved state's",
        prefill_default="512, a whole number of chunks; demo: one chunk",
    )
    add("--state-in", metavar="FILE", help="continue from a saved state: the prompt is appended")
    add(
        "--adapter",
        metavar="FILE",
        help="apply a LoRA adapter (train.py finetune=lora: export/adapter.safetensors) to the "
        "checkpoint's params",
    )
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
    rows = [(line_number, line) for line_number, line in enumerate(lines, start=1) if line.strip()]
    if not rows:
        raise UsageError(f"{path}: no prompts in the batch file")
    if not rows[0][1].lstrip().startswith("{"):
        return [line for _, line in rows]
    prompts = []
    for line_number, line in rows:
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise UsageError(f"{path}:{line_number}: not valid JSON ({err.msg})") from None
        if not isinstance(record, dict) or not isinstance(record.get("prompt"), str):
            raise UsageError(f'{path}:{line_number}: expected an object with a string "prompt"')
        prompts.append(record["prompt"])
    return prompts


def _decode_config(args, config: RWKVXConfig, saved: dict | None, batch: int) -> DecodeConfig:
    """The decode settings from the flags, reconciled with a saved state's (if any).

    One prompt keeps the kernel layout that reads fastest at batch 1 ("auto"); a batch of
    prompts keeps the kernels as trained, which XLA:CPU multiplies faster at batch 2-32 (see
    `rwkvx_jax.decoding.weights`).
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
    if args.prompt == "" and args.state_in is None:
        raise UsageError(
            "--prompt is empty: the model needs at least one token to continue from (an empty "
            "prompt continues a --state-in state)"
        )
    prompts = [args.prompt] if args.batch_file is None else read_batch_file(args.batch_file)
    if args.state_out is not None:
        output_path(args.state_out, "--state-out")
    config, params, model_name = load_model(args)
    if args.adapter is not None:
        params = apply_adapter_file(args.adapter, config, params)
        model_name = f"{model_name} + {args.adapter}"
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
    state = saved = logits = None
    if args.state_in is not None:
        saved = read_state_metadata(args.state_in)
        state, logits = load_state(args.state_in, config, with_next_logits=True)
        if args.prompt == "" and logits is None:
            raise UsageError(
                f"--prompt is empty, but {args.state_in} holds no next-token logits (it was "
                "saved by an older rwkvx-jax); give the text to continue with --prompt"
            )
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
        logits=logits,
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
        extra = {"eviction": decode_config.eviction, "model": model_name}
        save_state(
            args.state_out, config, result["state"], extra=extra, next_logits=result["logits"]
        )


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the command line; returns the exit status (errors: one line on stderr)."""
    args = _parser().parse_args(argv)
    return run_cli(PROG, lambda: run(args))


if __name__ == "__main__":
    sys.exit(main())
