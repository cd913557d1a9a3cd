"""Convert official checkpoints: `python convert_torch.py --help` (the command is
`rwkvx_jax.convert`; `rwkvx-convert`)."""

import sys

from rwkvx_jax.convert import main

if __name__ == "__main__":
    sys.exit(main())
