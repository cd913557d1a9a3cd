"""Encode/decode throughput of the RWKV World tokenizer: rwkvx-jax vs the official TRIE_TOKENIZER.

  python bench/tokenizer_speed.py [--step 1] [--repeats 3]

Corpus: the local Python standard library's .py files (every `step`-th, sorted; site-packages
excluded). Both tokenizers run in the same process, interleaved, best of `repeats` wall-clock
passes each; the ids are checked identical. Prints load times, MB/s and the ratio ours/official.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import sysconfig

import rwkv
from rwkv.rwkv_tokenizer import TRIE_TOKENIZER
from timing import timed

from rwkvx_jax.tokenizer import WORLD_VOCAB_FILE, WorldTokenizer

THIRD_PARTY_DIRS = ("site-packages", "dist-packages")


def stdlib_sources(step: int) -> list[bytes]:
    root = sysconfig.get_paths()["stdlib"]
    paths = []
    for directory, subdirectories, files in os.walk(root):
        subdirectories[:] = [d for d in subdirectories if d not in THIRD_PARTY_DIRS]
        paths += [os.path.join(directory, f) for f in files if f.endswith(".py")]
    sources = []
    for path in sorted(paths)[::step]:
        with open(path, "rb") as f:
            sources.append(f.read())
    return sources


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--step", type=int, default=1, help="take every step-th stdlib file")
    parser.add_argument("--repeats", type=int, default=3, help="best of this many passes")
    args = parser.parse_args()

    print(
        f"machine: {platform.platform()}, {os.cpu_count()} CPUs, load average "
        f"{os.getloadavg()[0]:.2f}; python {platform.python_version()}"
    )
    sources = stdlib_sources(args.step)
    total = sum(map(len, sources))
    print(f"corpus: {len(sources)} stdlib .py files (every {args.step}), {total / 1e6:.1f} MB")

    official_load, official = timed(
        lambda: TRIE_TOKENIZER(os.path.join(os.path.dirname(rwkv.__file__), WORLD_VOCAB_FILE)),
        sync=None,
    )
    ours_load, ours = timed(WorldTokenizer, sync=None)
    ours_compile, _ = timed(ours.encode, "", sync=None)
    print(
        f"load: official {official_load:.2f} s; ours {ours_load:.2f} s, plus {ours_compile:.2f} s "
        "to compile the pattern on first encode"
    )

    encoders = {
        "official": lambda: [official.encodeBytes(s) for s in sources],
        "ours": lambda: [ours.encode_bytes(s) for s in sources],
    }
    best = dict.fromkeys(encoders, float("inf"))
    ids = {}
    for _ in range(args.repeats):
        for name, encode in encoders.items():
            seconds, ids[name] = timed(encode, sync=None)
            best[name] = min(best[name], seconds)
    if ids["ours"] != ids["official"]:
        sys.exit("ids differ between ours and the official tokenizer")
    tokens = sum(map(len, ids["ours"]))
    print(f"encode: {tokens} tokens ({total / tokens:.2f} bytes/token), identical ids")
    for name, seconds in best.items():
        print(
            f"  {name:9s} {total / seconds / 1e6:7.2f} MB/s  "
            f"({seconds:.2f} s, best of {args.repeats})"
        )
    print(f"  ratio ours/official: {best['official'] / best['ours']:.2f}x")

    decoders = {
        "official": lambda: [official.decodeBytes(i) for i in ids["official"]],
        "ours": lambda: [ours.decode_bytes(i) for i in ids["ours"]],
    }
    best = dict.fromkeys(decoders, float("inf"))
    for _ in range(args.repeats):
        for name, decode in decoders.items():
            best[name] = min(best[name], timed(decode, sync=None)[0])
    print("decode to bytes:")
    for name, seconds in best.items():
        print(f"  {name:9s} {total / seconds / 1e6:7.2f} MB/s")
    print(f"  ratio ours/official: {best['official'] / best['ours']:.2f}x")


if __name__ == "__main__":
    main()
