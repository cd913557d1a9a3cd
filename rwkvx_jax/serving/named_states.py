"""Named states: decode states saved under a name in one folder, in the `state_files` format.

`POST /v1/states` saves the state after a prompt as `<folder>/<name>.npz`, the same file
`rwkvx-generate --state-out` writes, so a state built offline (batch 1, `--cache-size` equal to
the server's `--max-context`) serves too: drop it in the folder. A request's `state` field starts
from one. Loaded states stay in memory (they are read once per name, and again when the file
changes).
"""

from __future__ import annotations

import os
import threading

from rwkvx_jax.config import RWKVXConfig
from rwkvx_jax.decoding.state_files import (
    StateMismatchError,
    load_state,
    read_state_metadata,
    save_state,
)
from rwkvx_jax.serving.engine import StartState
from rwkvx_jax.serving.state_cache import CachedState


class UnknownState(LookupError):
    """No state of that name in the folder."""


class NamedStates:
    """The folder of named states of one model and context size."""

    def __init__(self, folder: str, config: RWKVXConfig, cache_size: int):
        """Args:
        folder: where the `<name>.npz` files live (created if missing).
        config: the served model.
        cache_size: the server's context capacity; a state must have been saved with it.
        """
        os.makedirs(folder, exist_ok=True)
        self.folder = folder
        self.config = config
        self.cache_size = cache_size
        self._loaded: dict[str, tuple[float, StartState]] = {}
        self._lock = threading.Lock()

    def path(self, name: str) -> str:
        return os.path.join(self.folder, f"{name}.npz")

    def save(self, name: str, entry: CachedState, extra: dict) -> None:
        """Writes the state (atomically) and forgets any older one of that name."""
        save_state(self.path(name), self.config, entry.state, extra=extra, next_logits=entry.logits)
        with self._lock:
            self._loaded.pop(name, None)

    def load(self, name: str) -> StartState:
        """The state called `name`.

        Raises:
          UnknownState: no such file.
          ValueError: the file is not a batch-1 state of this model and context size (says
            which), or is damaged.
        """
        path = self.path(name)
        try:
            stamp = os.stat(path).st_mtime_ns
        except FileNotFoundError:
            raise UnknownState(f"no saved state named {name!r}") from None
        with self._lock:
            known = self._loaded.get(name)
        if known is not None and known[0] == stamp:
            return known[1]
        metadata = read_state_metadata(path)
        if metadata.get("batch") != 1 or metadata.get("cache_size") != self.cache_size:
            raise StateMismatchError(
                f"state {name!r} holds batch {metadata.get('batch')} with cache size "
                f"{metadata.get('cache_size')}; this server needs batch 1 and cache size "
                f"{self.cache_size} (its --max-context)"
            )
        state, logits = load_state(path, self.config, with_next_logits=True)
        start = StartState(name, CachedState.from_device(state, logits))
        with self._lock:
            self._loaded[name] = (stamp, start)
        return start
