"""Training samples: ctx+1-token windows over a flat token stream, and the order to read them."""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Iterable, Iterator
from typing import Literal

import grain
import numpy as np

from rwkvx_jax.data.binidx import BinIdxTokens, write_binidx

Order = Literal["shuffle", "magic_prime", "sequential"]
ORDERS: tuple[str, ...] = ("shuffle", "magic_prime", "sequential")


class TokenWindows:
    """Random-access source of training windows: window i is `tokens[i*ctx : i*ctx + ctx + 1]`.

    Consecutive windows overlap by one token, so every token but the first is a target exactly
    once per epoch (the RWKV-LM sampler's layout). A grain `RandomAccessDataSource`.

    Args:
      tokens: 1-D integer token stream: a `BinIdxTokens`, a numpy array or memmap, or a sequence.
      ctx: context length T; samples hold T + 1 tokens (inputs and shifted targets).
    """

    def __init__(self, tokens, ctx: int):
        if ctx < 1:
            raise ValueError(f"ctx must be >= 1, got {ctx}")
        if not isinstance(tokens, BinIdxTokens):
            tokens = np.asarray(tokens)
            if tokens.ndim != 1 or tokens.dtype.kind not in "iu":
                raise ValueError(
                    f"tokens: expected a 1-D integer array, got shape {tokens.shape} "
                    f"dtype {tokens.dtype}"
                )
        self.tokens = tokens
        self.ctx = ctx
        self._length = max(0, (len(tokens) - 1) // ctx)

    def __len__(self) -> int:
        return self._length

    def window(self, index: int) -> np.ndarray:
        """Window `index` as int32 [ctx + 1]."""
        if not 0 <= index < self._length:
            raise IndexError(f"window {index} out of range [0, {self._length})")
        start = int(index) * self.ctx
        return np.asarray(self.tokens[start : start + self.ctx + 1], dtype=np.int32)

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        """Sample `index` as {"tokens": int32 [ctx + 1]}."""
        return {"tokens": self.window(index)}

    def read(self, indices) -> dict[str, np.ndarray]:
        """Windows `indices` stacked as {"tokens": int32 [len(indices), ctx + 1]}."""
        return {"tokens": np.stack([self.window(int(i)) for i in indices])}

    def __repr__(self) -> str:
        return f"TokenWindows({len(self)} windows of {self.ctx}+1 tokens)"


def _is_prime(n: int) -> bool:
    if n < 4:
        return n >= 2
    if n % 2 == 0 or n % 3 == 0:
        return False
    return all(n % f and n % (f + 2) for f in range(5, math.isqrt(n) + 1, 6))


def magic_prime(num_tokens: int, ctx: int) -> int:
    """The sampler's prime: the largest prime p with p % 3 == 2 and p <= num_tokens // ctx - 1.

    This is the value RWKV-LM's make_data.py prints as `--magic_prime` (its search starts at
    `num_tokens // ctx - 1` inclusive), so a corpus prepared there gives the same number here.
    The bound keeps the last window, which starts at (p - 1) * ctx, inside the stream.

    Raises:
      ValueError: no such prime (fewer than 3 windows).
    """
    for p in range(num_tokens // ctx - 1, 1, -1):
        if p % 3 == 2 and _is_prime(p):
            return p
    raise ValueError(
        f"no magic prime for {num_tokens} tokens at ctx {ctx}: need num_tokens // ctx - 1 >= 2"
    )


def magic_prime_window(sample: int, prime: int) -> int:
    """Window read by global sample `sample` (0-based) in RWKV-LM's "magic prime" order.

    RWKV-LM's dataset reads window `(factor * ii**3) % p` for sample number `ii = sample + 1`,
    with `factor = int(p * (sqrt(5) - 1) / 2)`. Since p is prime with p % 3 == 2, cubing is a
    bijection of the integers mod p, and so is multiplying by factor (0 < factor < p): any p
    consecutive samples visit each window in [0, p) exactly once. The golden-ratio factor
    scatters the first samples too (plain `s**3 % p` would read windows 0, 1, 8, 27, ...).
    Python integers, so no overflow at any size.
    """
    factor = int(prime * ((math.sqrt(5) - 1) / 2))
    return (factor * (sample + 1) ** 3) % prime


def window_order(windows: TokenWindows, order: Order, seed: int) -> grain.MapDataset:
    """One epoch of window indices in the requested order, as a grain MapDataset of ints.

    Args:
      windows: the windows to order.
      order: "sequential" (0, 1, 2, ...); "shuffle" (grain's index shuffle with `seed`; after
        `.repeat()` each epoch is reshuffled with seed + epoch); "magic_prime" (RWKV-LM's order,
        see `magic_prime_window`: an epoch is p samples, windows p and above are never read, and
        `seed` is unused).
      seed: shuffle seed in [0, 2**32).
    """
    if order not in ORDERS:
        raise ValueError(f"order must be one of {ORDERS}, got {order!r}")
    if len(windows) < 1:
        raise ValueError(
            f"no training windows in {len(windows.tokens)} tokens: need at least "
            f"ctx + 1 = {windows.ctx + 1}"
        )
    if order == "magic_prime":
        prime = magic_prime(len(windows.tokens), windows.ctx)
        return grain.MapDataset.range(prime).map(functools.partial(magic_prime_window, prime=prime))
    indices = grain.MapDataset.range(len(windows))
    return indices.shuffle(seed) if order == "shuffle" else indices


def windows_stream(windows: Iterable[list[int]], count: int, ctx: int, end: int) -> np.ndarray:
    """The flat stream of `count` ctx-token windows plus a closing `end` token (what a synthetic
    task's `tokens(count)` returns).

    Returns:
      int32 [count * ctx + 1]; `TokenWindows(stream, ctx)` reads exactly these windows.
    """
    stream = np.empty(count * ctx + 1, np.int32)
    for index, window in enumerate(windows):
        stream[index * ctx : (index + 1) * ctx] = window
    stream[-1] = end
    return stream


def write_windows_binidx(
    prefix: str | os.PathLike, windows: Iterable[list[int]], count: int, end: int, dtype
) -> int:
    """Writes `count` windows as a binidx pair (one item per window, the closing `end` token
    appended to the last), for `train.py data.corpus=PREFIX data.order=sequential`.

    Returns:
      Tokens written: count * ctx + 1.
    """
    if count < 1:
        raise ValueError(f"count must be >= 1, got {count}")

    def documents() -> Iterator[list[int]]:
        for index, window in enumerate(windows):
            yield window + [end] if index == count - 1 else window

    return write_binidx(prefix, documents(), dtype=dtype)
