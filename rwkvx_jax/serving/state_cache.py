"""States after prompt prefixes, kept under a byte budget and reused across requests.

A whole RWKV-X context is a fixed-size state (RWKV-7 states plus a bounded KV cache), so a chat's
next turn or a repeated system prompt need not be read again: the engine stores the state after
every prefill piece boundary (and after a whole prompt), keyed by the exact token prefix, and a
new request starts from the longest stored prefix of its prompt. Only piece boundaries are
reused for longer prompts, so a request's remaining pieces are the ones a fresh prefill reads
and its outputs are bit for bit the same; a whole-prompt entry serves an identical prompt only.
Entries live on the host (a copy, so the device buffers can be donated to the next piece) and
the least recently used go first when the budget is exceeded.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import threading

import jax
import numpy as np

from rwkvx_jax.model import DecodeState


@dataclasses.dataclass(frozen=True)
class CachedState:
    """A batch-1 decode state and its next-token logits, on the host.

    Attributes:
      state: the `DecodeState` with numpy leaves (batch 1).
      logits: float32 [1, V] or None.
    """

    state: DecodeState
    logits: np.ndarray | None

    @classmethod
    def from_device(cls, state: DecodeState, logits) -> CachedState:
        """A host copy (the device buffers stay usable and donatable)."""
        host = jax.device_get(state)
        host = jax.tree.map(np.array, host)  # own the bytes: a device_get may alias on CPU
        return cls(host, None if logits is None else np.array(logits, np.float32))

    def to_device(self) -> tuple[DecodeState, jax.Array | None]:
        """(a fresh device state, device logits or None); the entry stays as it was."""
        # A numpy copy put on the device (no compiled copy): the entry never shares bytes with
        # a buffer the next piece may donate.
        state = jax.tree.map(lambda leaf: jax.device_put(np.array(leaf)), self.state)
        return state, None if self.logits is None else jax.device_put(np.array(self.logits))

    @property
    def length(self) -> int:
        """Tokens the state has read."""
        return int(np.asarray(self.state.lengths)[0])

    @property
    def nbytes(self) -> int:
        leaves = jax.tree.leaves(self.state)
        return sum(leaf.nbytes for leaf in leaves) + (
            0 if self.logits is None else self.logits.nbytes
        )


def prefix_key(name: str, tokens) -> tuple[str, int, bytes]:
    """The cache key of a token prefix read from the start `name` ("" = an empty sequence)."""
    array = np.asarray(list(tokens), np.int32)
    return name, len(array), hashlib.sha256(array.tobytes()).digest()


@dataclasses.dataclass(frozen=True)
class PrefixHit:
    """The longest usable cached prefix of a prompt: its entry and how many tokens it covers."""

    entry: CachedState
    length_in_prompt: int


class StateCache:
    """LRU of `CachedState`s under a byte budget; thread-safe.

    Attributes:
      hits, misses: lookups that found a prefix / found none.
    """

    def __init__(self, budget_bytes: int):
        """Args:
        budget_bytes: most bytes held; an entry larger than the whole budget is not kept.
        """
        if budget_bytes < 0:
            raise ValueError(f"budget_bytes must be >= 0, got {budget_bytes}")
        self.budget = budget_bytes
        self.used = 0
        self.hits = 0
        self.misses = 0
        self._entries: collections.OrderedDict[tuple, CachedState] = collections.OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._entries)

    def put(self, key: tuple, entry: CachedState) -> None:
        """Stores `entry` as the most recent, dropping the least recent past the budget."""
        size = entry.nbytes
        with self._lock:
            old = self._entries.pop(key, None)
            if old is not None:
                self.used -= old.nbytes
            if size > self.budget:
                return
            self._entries[key] = entry
            self.used += size
            while self.used > self.budget:
                _, dropped = self._entries.popitem(last=False)
                self.used -= dropped.nbytes

    def longest_prefix(self, name: str, prompt, piece: int) -> PrefixHit | None:
        """The entry of the whole prompt, else of its longest prefix of whole pieces; None if
        neither is cached. The entry found becomes the most recent."""
        lengths = [len(prompt)] + list(range(len(prompt) // piece * piece, 0, -piece))
        with self._lock:
            for length in dict.fromkeys(lengths):
                if length == 0:
                    continue
                key = prefix_key(name, prompt[:length])
                entry = self._entries.get(key)
                if entry is not None:
                    self._entries.move_to_end(key)
                    self.hits += 1
                    return PrefixHit(entry, length)
            self.misses += 1
        return None
