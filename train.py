"""Train RWKV-X: `python train.py --help` (the command is `rwkvx_jax.train`; `rwkvx-train`)."""

import sys

from rwkvx_jax.train import main

if __name__ == "__main__":
    sys.exit(main())
