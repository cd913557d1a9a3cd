"""What the HTTP app calls: text requests in, text deltas out, over the engine's thread.

`Service` owns the engine's thread (`run_once` in a loop, woken by each submission), turns
prompts into tokens and tokens into text (`TextStream`, stop strings), looks up named states,
and keeps the metrics. Each request's events cross from the engine's thread to the event loop
through an asyncio queue; a request whose consumer goes away (a client that disconnects) is
cancelled in the engine, which frees its slot at the next step.
"""

from __future__ import annotations

import asyncio
import dataclasses
import threading
import time
from collections.abc import AsyncIterator

from rwkvx_jax.decoding.sampling import SamplingConfig
from rwkvx_jax.serving.engine import (
    FINISH_CANCELLED,
    FINISH_ERROR,
    FINISH_STOP,
    Engine,
    Finished,
    Prefilled,
    QueueFull,
    Request,
    Token,
)
from rwkvx_jax.serving.metrics import Metrics
from rwkvx_jax.serving.named_states import NamedStates, UnknownState
from rwkvx_jax.serving.protocol import ApiError, GenerationParams
from rwkvx_jax.serving.state_cache import CachedState
from rwkvx_jax.serving.text_stream import TextStream
from rwkvx_jax.tokenizer import Tokenizer


@dataclasses.dataclass
class Outcome:
    """How a generation ended: OpenAI's finish_reason and usage counts."""

    finish_reason: str = ""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0

    def usage(self) -> dict:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": self.cached_tokens},
        }


class EngineThread(threading.Thread):
    """Runs `engine.run_once` until stopped; sleeps while there is nothing to do. A batched
    step that raises fails the requests in it, never the thread."""

    def __init__(self, engine: Engine):
        super().__init__(name="rwkvx-engine", daemon=True)
        self.engine = engine
        self._wake = threading.Event()
        self._stopping = threading.Event()

    def wake(self) -> None:
        self._wake.set()

    def stop(self) -> None:
        self._stopping.set()
        self._wake.set()
        self.join()

    def run(self) -> None:
        while not self._stopping.is_set():
            try:
                worked = self.engine.run_once()
            except Exception as err:  # noqa: BLE001 - the server outlives any request
                self.engine.cancel_all(FINISH_ERROR, f"{type(err).__name__}: {err}")
                worked = True
            if not worked:
                self._wake.wait(0.05)
                self._wake.clear()


class Service:
    """The served model behind the HTTP app."""

    def __init__(
        self,
        engine: Engine,
        tokenizer: Tokenizer,
        model_name: str,
        named_states: NamedStates,
        metrics: Metrics | None = None,
    ):
        self.engine = engine
        self.tokenizer = tokenizer
        self.model_name = model_name
        self.named_states = named_states
        self.metrics = metrics or Metrics()
        self.thread = EngineThread(engine)
        self.created = int(time.time())
        self._register_gauges()

    def _register_gauges(self) -> None:
        gauge, engine = self.metrics.gauge, self.engine
        gauge("rwkvx_queue_depth", "Requests waiting for a slot", lambda: engine.counts()[0])
        gauge("rwkvx_busy_slots", "Slots prefilling or decoding", lambda: engine.counts()[1])
        gauge("rwkvx_slots", "Slots decoded together", lambda: engine.batch.slots)
        cache = engine.cache
        if cache is not None:
            gauge("rwkvx_state_cache_bytes", "Bytes of cached states", lambda: cache.used)
            gauge("rwkvx_state_cache_entries", "Cached states", lambda: len(cache))
            hits, misses = lambda: cache.hits, lambda: cache.misses
            gauge("rwkvx_state_cache_hits_total", "Prefill lookups that hit", hits, "counter")
            gauge(
                "rwkvx_state_cache_misses_total", "Prefill lookups that missed", misses, "counter"
            )
        engine.on_step = lambda seconds, busy: self.metrics.observe(
            "rwkvx_decode_step_seconds", seconds
        )

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        """Ends every request still in the engine ("cancelled") and stops its thread."""
        self.thread.stop()
        self.engine.cancel_all()

    def _encode(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text)) if text else []

    def _start_state(self, name: str | None):
        if name is None:
            return None
        try:
            return self.named_states.load(name)
        except UnknownState as err:
            raise ApiError(404, str(err), param="state", code="state_not_found") from None
        except ValueError as err:
            raise ApiError(400, f"state {name!r}: {err}", param="state") from None

    def _submit(self, request: Request) -> None:
        try:
            self.engine.submit(request)
        except QueueFull as err:
            raise ApiError(429, str(err), kind="rate_limit_error", code="queue_full") from None
        except ValueError as err:
            raise ApiError(400, str(err), param="max_tokens") from None
        self.thread.wake()

    def _listener(self) -> tuple[asyncio.Queue, object]:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        return queue, lambda event: loop.call_soon_threadsafe(queue.put_nowait, event)

    async def generate(self, params: GenerationParams, outcome: Outcome) -> AsyncIterator[str]:
        """Text deltas of one generation; `outcome` is filled when it ends.

        Raises:
          ApiError: the request cannot run (before any delta is produced).
        """
        arrived = time.monotonic()
        queue, deliver = self._listener()
        prompt, start = self._encode(params.prompt), self._start_state(params.state)
        max_tokens = params.max_tokens
        if max_tokens is None:  # the default, shortened to the context the prompt leaves
            used = len(prompt) + (start.state.length if start is not None else 0)
            room = self.engine.max_context - used
            max_tokens = min(params.default_max_tokens, room) if room > 0 else 1
        request = Request(prompt, params.sampling, max_tokens, deliver, start=start)
        self._submit(request)
        self.metrics.add("rwkvx_requests_total")
        text = TextStream(self.tokenizer, params.stop)
        last = None
        try:
            while True:
                event = await queue.get()
                if isinstance(event, Token):
                    now = time.monotonic()
                    name = "rwkvx_time_to_first_token_seconds"
                    if last is not None:
                        name = "rwkvx_inter_token_latency_seconds"
                    self.metrics.observe(name, now - (last if last is not None else arrived))
                    last = now
                    delta = text.push(event.token)
                    if delta:
                        yield delta
                    if text.stopped:
                        self.engine.cancel(request)
                        outcome.finish_reason = FINISH_STOP
                        outcome.prompt_tokens = len(request.prompt)
                        outcome.completion_tokens = text.tokens
                        break
                elif isinstance(event, Finished):
                    if event.reason == FINISH_ERROR:
                        raise RuntimeError(event.error)
                    rest = text.finish()
                    if rest:
                        yield rest
                    outcome.finish_reason = event.reason
                    outcome.prompt_tokens = event.prompt_tokens
                    outcome.completion_tokens = event.completion_tokens
                    outcome.cached_tokens = event.cached_tokens
                    break
        finally:
            if not outcome.finish_reason or outcome.finish_reason == FINISH_CANCELLED:
                self.engine.cancel(request)
            self.metrics.add("rwkvx_prompt_tokens_total", outcome.prompt_tokens)
            self.metrics.add("rwkvx_prompt_tokens_cached_total", outcome.cached_tokens)
            self.metrics.add("rwkvx_completion_tokens_total", outcome.completion_tokens)

    async def save_state(self, name: str, prompt: str, base: str | None) -> dict:
        """Reads `prompt` (after the state `base`, if given) and saves the state as `name`."""
        queue, deliver = self._listener()
        request = Request(
            prompt=self._encode(prompt),
            sampling=SamplingConfig(temperature=0.0),  # nothing is sampled
            max_tokens=0,
            deliver=deliver,
            start=self._start_state(base),
            only_prefill=True,
        )
        self._submit(request)
        entry: CachedState | None = None
        try:
            while True:
                event = await queue.get()
                if isinstance(event, Prefilled):
                    entry = event.state
                elif isinstance(event, Finished):
                    break
        finally:
            if entry is None:
                self.engine.cancel(request)
        if entry is None:
            raise RuntimeError(f"reading the prompt failed: {event.error or event.reason}")
        extra = {"prompt_tokens": len(request.prompt), "base_state": base}
        await asyncio.to_thread(self.named_states.save, name, entry, extra)
        return {"object": "state", "name": name, "tokens": entry.length, **extra}
