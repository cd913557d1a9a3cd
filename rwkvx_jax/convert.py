"""Convert official RWKV-X / RWKV-7 PyTorch checkpoints to rwkvx-jax, and back.

python convert_torch.py IN.pth OUT_DIR [--dtype float32|bfloat16|float16]
python convert_torch.py CKPT_DIR OUT.pth           [--dtype ...]   # needs torch
python convert_torch.py CKPT_DIR OUT.safetensors   [--dtype ...]
python convert_torch.py --demo [WORK_DIR]          # end-to-end on a random checkpoint

(`rwkvx-convert` and `python -m rwkvx_jax.convert` are the same command.)
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

from rwkvx_jax.checkpoints.conversion import convert_pth, export_pth, export_safetensors
from rwkvx_jax.cli import Parser, UsageError, number, output_path, run_cli

PROG = "convert_torch.py"


def parse_args(argv: Sequence[str] | None):
    parser = Parser(prog=PROG, description=__doc__)
    add = parser.add_argument
    add("source", nargs="?", help="a .pth file, or a checkpoint directory")
    add("target", nargs="?", help="output directory, .pth or .safetensors")
    add(
        "--dtype",
        choices=("float32", "bfloat16", "float16"),
        default=None,
        help="stored dtype (import: default float32; export: default the source file's dtype)",
    )
    add("--chunk-size", type=number(int, low=1), default=2048, help="sparse-attention chunk")
    add("--top-k", type=number(int, low=1), default=3, help="chunks attended per query")
    add("--overwrite", action="store_true", help="replace a non-empty OUT_DIR")
    add(
        "--allow-dropped-rwkv-blocks",
        action="store_true",
        help="accept L %% A != 0 and reproduce the official runtime, which never runs the "
        "trailing RWKV blocks",
    )
    add(
        "--demo",
        action="store_true",
        help="write a random official-layout checkpoint, convert, run, export and verify",
    )
    args = parser.parse_args(argv)
    if not args.demo and (args.source is None or args.target is None):
        parser.error("give SOURCE and TARGET (or --demo)")
    return args


def run(args) -> None:
    """Does what the parsed flags ask (raises ValueError / OSError / ImportError on bad input)."""
    if args.demo:
        from rwkvx_jax.convert_demo import run_demo

        run_demo(args.source)
        return
    if os.path.isdir(args.source):
        if args.target.endswith(".pth"):
            export_pth(args.source, output_path(args.target, "TARGET"), dtype=args.dtype)
        elif args.target.endswith(".safetensors"):
            target = output_path(args.target, "TARGET")
            export_safetensors(args.source, target, dtype=args.dtype)
        else:
            raise UsageError(
                f"exporting {args.source}: the target must end in .pth or .safetensors, "
                f"got {args.target!r}"
            )
        print(f"wrote {args.target}")
        return
    config = convert_pth(
        args.source,
        args.target,
        dtype=args.dtype or "float32",
        overwrite=args.overwrite,
        chunk_size=args.chunk_size,
        top_k=args.top_k,
        allow_dropped_rwkv_blocks=args.allow_dropped_rwkv_blocks,
    )
    print(f"wrote {args.target}: {config}")


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the command line; returns the exit status (`rwkvx_jax.cli` conventions)."""
    args = parse_args(argv)
    return run_cli(PROG, lambda: run(args))


if __name__ == "__main__":
    sys.exit(main())
