"""Continuous batching: requests join and leave a fixed set of slots between decode steps.

One `Engine.run_once` does at most one prefill piece (of the oldest request waiting for a slot)
and then one decode step of every busy slot, so a long prompt delays running streams by one
piece at most. Prefill runs at batch 1 (`Decoder.prefill`, one piece per call, the same pieces
`Decoder.generate` reads) and the finished state is written into its slot (`SlotBatch.admit`);
a request's tokens are therefore those `Decoder.generate` gives it alone, whatever else is in
the batch. Stop tokens, token budgets and cancellations are checked on the host after each step.

The engine is not thread-safe by itself: `submit` and `cancel` take its lock, and one thread
(`serving.engine_thread`) calls `run_once`. Results go out through each request's `deliver`
callback, called on that thread.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import threading
import time
from collections.abc import Callable

import jax
import numpy as np

from rwkvx_jax.decoding.decoder import Decoder
from rwkvx_jax.decoding.sampling import SamplingConfig
from rwkvx_jax.model import DecodeState
from rwkvx_jax.serving.batched_step import SlotBatch
from rwkvx_jax.serving.state_cache import CachedState, StateCache, prefix_key

# Why a request ended (the OpenAI `finish_reason` values, plus the two only the engine knows).
FINISH_STOP, FINISH_LENGTH, FINISH_CANCELLED, FINISH_ERROR = "stop", "length", "cancelled", "error"


class QueueFull(RuntimeError):
    """Every slot is busy and the waiting queue is at its bound."""


@dataclasses.dataclass(frozen=True)
class StartState:
    """Where a request starts instead of an empty sequence: a saved batch-1 state.

    Attributes:
      name: what the state cache keys its prefixes under (a named state's name).
      state: the saved state and its next-token logits (None: the prompt may not be empty),
        on the host; each request gets its own device copy.
    """

    name: str
    state: CachedState


@dataclasses.dataclass(frozen=True)
class Token:
    """A generated token (`deliver` event)."""

    token: int


@dataclasses.dataclass(frozen=True)
class Prefilled:
    """The state after a prompt (`deliver` event of an `only_prefill` request, before its
    `Finished`)."""

    state: CachedState


@dataclasses.dataclass(frozen=True)
class Finished:
    """The last event of a request: why it ended and its token counts.

    Attributes:
      reason: "stop", "length", "cancelled" or "error".
      prompt_tokens: prompt tokens read (0 when cancelled before its prefill).
      completion_tokens: tokens delivered.
      cached_tokens: prompt tokens taken from the state cache instead of being read.
      error: the error's message when reason is "error".
    """

    reason: str
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0
    error: str = ""


@dataclasses.dataclass
class Request:
    """One generation: a prompt, its settings and where its events go.

    Attributes:
      prompt: token ids (may be empty only with a `start` that has logits).
      sampling: temperature, top-k/p, penalties, decay and seed (bans are not applied; its
        `stop_tokens` end the request, unread and undelivered).
      max_tokens: most tokens generated (>= 1).
      deliver: called with each `Token`, then one `Finished`, on the engine's thread.
      start: a saved state to continue, or None.
      only_prefill: read the prompt and deliver the state after it (`Prefilled`); generate
        nothing (max_tokens is then ignored).
      id, submitted: set by `submit` (a serial number, `time.monotonic()`).
      cancelled: set by `cancel`; the engine ends the request at its next round.
    """

    prompt: list[int]
    sampling: SamplingConfig
    max_tokens: int
    deliver: Callable[[Token | Prefilled | Finished], None]
    start: StartState | None = None
    only_prefill: bool = False
    id: int = 0
    submitted: float = 0.0
    cancelled: bool = False


@dataclasses.dataclass
class _Prefill:
    """A request being read in pieces, from `position` on, into `state`."""

    request: Request
    slot: int
    position: int
    cached: int
    state: DecodeState | None
    logits: jax.Array | None


@dataclasses.dataclass
class _Running:
    """A request in a slot: tokens delivered so far, prompt tokens taken from the cache."""

    request: Request
    generated: int
    cached: int


class Engine:
    """Schedules requests over a `SlotBatch`.

    Example:
      engine = Engine(decoder, slots=4, queue_size=16)
      engine.warm_up()
      engine.submit(Request(prompt, SamplingConfig(temperature=0.0), 20, events.append))
      while engine.run_once(): pass
    """

    def __init__(
        self,
        decoder: Decoder,
        *,
        slots: int,
        queue_size: int,
        state_cache: StateCache | None = None,
        on_step: Callable[[float, int], None] | None = None,
    ):
        """Args:
        decoder: the model's decoder (its prefill piece size is the cache's piece boundary;
          its cache size bounds each request's context).
        slots: rows decoded together.
        queue_size: requests that may wait while every slot is busy; one more is `QueueFull`.
        state_cache: states after prompt prefixes, reused across requests; None keeps none.
        on_step: called after each decode step with (seconds, busy slots), for metrics.
        """
        self.decoder = decoder
        self.batch = SlotBatch(decoder, slots)
        self.queue_size = queue_size
        self.cache = state_cache
        self.on_step = on_step
        self.piece = decoder.decode_config.prefill_chunk
        self.max_context = decoder.decode_config.cache_size
        self.lock = threading.Lock()
        self._waiting: collections.deque[Request] = collections.deque()
        self._prefill: _Prefill | None = None
        self._running: dict[int, _Running] = {}
        self._ids = itertools.count(1)

    def warm_up(self) -> None:
        """Compiles every function serving calls (see `SlotBatch.warm_up`)."""
        self.batch.warm_up()

    # ---------------------------------------------------------------- called from any thread

    def submit(self, request: Request) -> Request:
        """Queues a request; returns it with its id set.

        Raises:
          QueueFull: the waiting queue is at its bound.
          ValueError: the request cannot run (empty prompt without start logits, max_tokens < 1,
            prompt plus max_tokens past the context capacity); says which.
        """
        self.check(request)
        with self.lock:
            # Every slot busy plus `queue_size` waiting; a burst may arrive before the engine
            # has given free slots their requests, so count in-flight requests, not the list.
            in_flight = len(self._waiting) + len(self._running) + (self._prefill is not None)
            if in_flight >= self.batch.slots + self.queue_size:
                raise QueueFull(
                    f"all {self.batch.slots} slots are busy and {self.queue_size} requests wait "
                    f"for one (the queue holds {self.queue_size}); try again later"
                )
            request.id = next(self._ids)
            request.submitted = time.monotonic()
            self._waiting.append(request)
        return request

    def check(self, request: Request) -> None:
        """Raises ValueError when `request` cannot run; see `submit`."""
        if request.max_tokens < 1 and not request.only_prefill:
            raise ValueError(f"max_tokens must be >= 1, got {request.max_tokens}")
        start = request.start
        if not request.prompt and (start is None or start.state.logits is None):
            raise ValueError("the prompt is empty (and no saved state with next-token logits)")
        already = start.state.length if start is not None else 0
        total = already + len(request.prompt) + (0 if request.only_prefill else request.max_tokens)
        if total > self.max_context:
            raise ValueError(
                f"{already} saved + {len(request.prompt)} prompt tokens + max_tokens "
                f"{request.max_tokens} = {total} exceeds the context capacity "
                f"{self.max_context} tokens"
            )

    def cancel(self, request: Request) -> None:
        """Ends a request at the engine's next step (its slot is freed then)."""
        request.cancelled = True

    def counts(self) -> tuple[int, int]:
        """(requests waiting, busy slots), for metrics."""
        with self.lock:
            busy = len(self._running) + (self._prefill is not None)
            return len(self._waiting), busy

    def has_work(self) -> bool:
        with self.lock:
            return bool(self._waiting or self._prefill or self._running)

    # ---------------------------------------------------------------- the engine's own thread

    def run_once(self) -> bool:
        """One prefill piece (if a request is being read) and one decode step (if any slot is
        busy). Returns whether anything was left to do before the call."""
        with self.lock:
            self._drop_cancelled()
            if self._prefill is None:
                self._start_prefill()
            busy = bool(self._prefill or self._running)
        if not busy:
            return False
        if self._prefill is not None:
            self._guarded(self._prefill.request, self._read_piece)
        if self._running:
            self._decode_step()
        return True

    def cancel_all(self, reason: str = FINISH_CANCELLED, error: str = "") -> None:
        """Ends every request now, each with a `Finished` of this reason: "cancelled" at
        shutdown, "error" when a batched step failed (the slots' state is then unknown)."""
        with self.lock:
            waiting, self._waiting = list(self._waiting), collections.deque()
            job, self._prefill = self._prefill, None
            running, self._running = self._running, {}
        if reason == FINISH_ERROR:
            self.batch.reset()
        for request in waiting + ([job.request] if job is not None else []):
            request.deliver(Finished(reason, 0, 0, error=error))
        for entry in running.values():
            self._finish(entry, reason, error)

    def _drop_cancelled(self) -> None:
        for request in [r for r in self._waiting if r.cancelled]:
            self._waiting.remove(request)
            request.deliver(Finished(FINISH_CANCELLED, 0, 0))
        if self._prefill is not None and self._prefill.request.cancelled:
            self._prefill.request.deliver(Finished(FINISH_CANCELLED, 0, 0))
            self._prefill = None
        for slot, entry in list(self._running.items()):
            if entry.request.cancelled:
                del self._running[slot]
                self._finish(entry, FINISH_CANCELLED)

    def _free_slot(self) -> int | None:
        free = [s for s in range(self.batch.slots) if s not in self._running]
        return free[0] if free else None

    def _start_prefill(self) -> None:
        slot = self._free_slot()
        if slot is None or not self._waiting:
            return
        request = self._waiting.popleft()
        job = _Prefill(request, slot, 0, 0, None, None)
        hit = None
        if self.cache is not None:
            hit = self.cache.longest_prefix(self._cache_name(request), request.prompt, self.piece)
        if hit is not None:  # the cached state already continues any saved start state
            job.position = job.cached = hit.length_in_prompt
            job.state, job.logits = hit.entry.to_device()
        elif request.start is not None:
            job.state, job.logits = request.start.state.to_device()
        self._prefill = job

    @staticmethod
    def _cache_name(request: Request) -> str:
        return request.start.name if request.start is not None else ""

    def _read_piece(self) -> None:
        job = self._prefill
        prompt = job.request.prompt
        if job.position < len(prompt):
            piece = prompt[job.position : job.position + self.piece]
            job.logits, job.state = self.decoder.prefill([piece], job.state)
            job.position += len(piece)
            boundary = job.position % self.piece == 0 or job.position == len(prompt)
            if self.cache is not None and boundary:
                key = prefix_key(self._cache_name(job.request), prompt[: job.position])
                self.cache.put(key, CachedState.from_device(job.state, job.logits))
        if job.position < len(prompt):
            return
        if job.state is None:  # an empty prompt cannot reach here without a start state
            raise AssertionError("a request with neither prompt nor state reached prefill")
        if job.request.only_prefill:
            with self.lock:
                self._prefill = None
            request = job.request
            request.deliver(Prefilled(CachedState.from_device(job.state, job.logits)))
            request.deliver(Finished(FINISH_STOP, len(request.prompt), 0, job.cached))
            return
        self.batch.admit(job.slot, job.state, job.logits, job.request.sampling)
        with self.lock:
            self._running[job.slot] = _Running(job.request, 0, job.cached)
            self._prefill = None

    def _guarded(self, request: Request, work: Callable[[], None]) -> None:
        """Runs one request's work; an error ends that request alone."""
        try:
            work()
        except Exception as err:  # noqa: BLE001 - one request's failure must not stop the rest
            with self.lock:
                if self._prefill is not None and self._prefill.request is request:
                    self._prefill = None
            request.deliver(Finished(FINISH_ERROR, 0, 0, error=f"{type(err).__name__}: {err}"))

    def _decode_step(self) -> None:
        active = np.zeros((self.batch.slots,), bool)
        slots = list(self._running)
        active[slots] = True
        started = time.perf_counter()
        tokens = self.batch.advance(active)
        if self.on_step is not None:
            self.on_step(time.perf_counter() - started, len(slots))
        for slot in slots:
            entry = self._running[slot]
            token = int(tokens[slot])
            reason = None
            if token in entry.request.sampling.stop_tokens:
                reason = FINISH_STOP
            else:
                entry.request.deliver(Token(token))
                entry.generated += 1
                if entry.generated >= entry.request.max_tokens:
                    reason = FINISH_LENGTH
            if reason is not None:
                with self.lock:
                    del self._running[slot]
                self._finish(entry, reason)

    def _finish(self, entry: _Running, reason: str, error: str = "") -> None:
        request = entry.request
        # Usage counts the request's own prompt, not the context of a saved state it continues.
        request.deliver(Finished(reason, len(request.prompt), entry.generated, entry.cached, error))
