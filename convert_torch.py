"""Convert official RWKV-X / RWKV-7 PyTorch checkpoints to rwkvx-jax, and back.

python convert_torch.py IN.pth OUT_DIR [--dtype float32|bfloat16|float16]
python convert_torch.py CKPT_DIR OUT.pth           [--dtype ...]   # needs torch
python convert_torch.py CKPT_DIR OUT.safetensors   [--dtype ...]
python convert_torch.py --demo [WORK_DIR]          # end-to-end on a random checkpoint
"""

from __future__ import annotations

import argparse
import os
import sys

from rwkvx_jax import convert_pth, export_pth, export_safetensors
from rwkvx_jax.checkpoint import CheckpointError
from rwkvx_jax.config import ConfigError
from rwkvx_jax.convert import ConversionError
from rwkvx_jax.pth_io import CheckpointFormatError

USER_ERRORS = (CheckpointError, CheckpointFormatError, ConfigError, ConversionError, ImportError)


def parse_args(argv):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("source", nargs="?", help="a .pth file, or a checkpoint directory")
    parser.add_argument("target", nargs="?", help="output directory, .pth or .safetensors")
    parser.add_argument(
        "--dtype",
        choices=("float32", "bfloat16", "float16"),
        default=None,
        help="stored dtype (import: default float32; export: default the source file's dtype)",
    )
    parser.add_argument("--chunk-size", type=int, default=2048, help="sparse-attention chunk")
    parser.add_argument("--top-k", type=int, default=3, help="chunks attended per query")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty OUT_DIR")
    parser.add_argument(
        "--allow-dropped-rwkv-blocks",
        action="store_true",
        help="accept L %% A != 0 and reproduce the official runtime, which never runs the "
        "trailing RWKV blocks",
    )
    parser.add_argument(
        "--demo",
        action="store_true",
        help="write a random official-layout checkpoint, convert, run, export and verify",
    )
    args = parser.parse_args(argv)
    if not args.demo and (args.source is None or args.target is None):
        parser.error("give SOURCE and TARGET (or --demo)")
    return args


def run(args) -> None:
    if args.demo:
        from rwkvx_jax.demo import run_demo

        run_demo(args.source)
        return
    if os.path.isdir(args.source):
        if args.target.endswith(".pth"):
            export_pth(args.source, args.target, dtype=args.dtype)
        elif args.target.endswith(".safetensors"):
            export_safetensors(args.source, args.target, dtype=args.dtype)
        else:
            raise ConversionError(
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


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        run(args)
    except USER_ERRORS as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
