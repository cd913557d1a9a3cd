"""The fastest implementation in a bench/wkv7_kernels.py JSON file, as an --impls argument.

  python bench/accelerator/wkv7_best.py RESULTS.json [--prefix PREFIX] [--dtype bfloat16]

Among the implementations whose name starts with --prefix, the one with the smallest geometric
mean of forward+backward time over the sizes (T, B*H) that every candidate finished; printed with
';' between its options, as --impls takes it. Exits non-zero, naming why, when nothing qualifies.
bench/accelerator/wkv7_gpu_session.sh calls it to pick the variant it sets against fla.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path


def best_impl(rows: list[dict], prefix: str, dtype: str) -> str:
    """The prefixed implementation with the least geometric-mean fwd+bwd ms over common sizes."""
    times: dict[str, dict[tuple[int, int], float]] = {}
    for row in rows:
        if row.get("dtype") == dtype and row.get("impl", "").startswith(prefix):
            if "fwd_bwd_ms" in row:
                times.setdefault(row["impl"], {})[(row["T"], row["bh"])] = row["fwd_bwd_ms"]
    if not times:
        raise ValueError(f"no finished {dtype} rows for implementations starting {prefix!r}")
    common = set.intersection(*(set(sizes) for sizes in times.values()))
    if not common:
        raise ValueError(f"no size that all of {sorted(times)} finished")
    score = {
        impl: math.exp(sum(math.log(t[size]) for size in common) / len(common))
        for impl, t in times.items()
    }
    return min(score, key=score.get)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("results", type=Path)
    parser.add_argument("--prefix", default="pallas@schedule=chunk_parallel")
    parser.add_argument("--dtype", default="bfloat16")
    args = parser.parse_args()
    try:
        impl = best_impl(json.loads(args.results.read_text()), args.prefix, args.dtype)
    except (OSError, ValueError) as error:
        sys.exit(f"wkv7_best: {args.results}: {error}")
    print(impl.replace(",", ";"))


if __name__ == "__main__":
    main()
