"""The serving engine (issue 23 items 3-5): continuous batching over fixed slots, exact per
request, with per-row sampling, a state cache, and nothing compiled after start-up."""

from __future__ import annotations

import contextlib
import time

import jax
import numpy as np
import pytest

from rwkvx_jax.checkpoints.random_weights import demo_model
from rwkvx_jax.decoding.decoder import DecodeConfig, Decoder, greedy_tokens
from rwkvx_jax.decoding.sampling import SamplingConfig
from rwkvx_jax.serving.engine import Engine, Finished, QueueFull, Request, Token
from rwkvx_jax.serving.state_cache import StateCache

PIECE = 32  # two attention chunks of the demo model: prompts below span several pieces
SLOTS = 3
GREEDY = SamplingConfig(temperature=0.0, presence_penalty=0.0, frequency_penalty=0.0)


@pytest.fixture(scope="module")
def decoder():
    config, params = demo_model()
    return Decoder(config, params, DecodeConfig(prefill_chunk=PIECE))


@pytest.fixture(scope="module")
def engine(decoder):
    engine = Engine(decoder, slots=SLOTS, queue_size=8, state_cache=StateCache(64 * 2**20))
    engine.warm_up()
    return engine


def _prompt(seed: int, length: int) -> list[int]:
    return np.random.default_rng(seed).integers(1, 256, length).tolist()


class Collected:
    """A request's events, as `deliver` receives them."""

    def __init__(self):
        self.tokens: list[int] = []
        self.finished: Finished | None = None

    def __call__(self, event):
        assert self.finished is None, "an event after Finished"
        if isinstance(event, Token):
            self.tokens.append(event.token)
        else:
            self.finished = event


def _submit(engine, prompt, max_tokens, sampling=GREEDY) -> tuple[Request, Collected]:
    out = Collected()
    return engine.submit(Request(prompt, sampling, max_tokens, out)), out


def _drain(engine, limit=500):
    for _ in range(limit):
        if not engine.run_once():
            return
    raise AssertionError("the engine never ran out of work")


@contextlib.contextmanager
def _counting_compiles():
    seen = []

    def listener(event, duration, **kwargs):
        if event == "/jax/core/compile/backend_compile_duration":
            seen.append(event)

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        yield seen
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)


def test_greedy_outputs_equal_generate_alone_whatever_the_batch(engine, decoder):
    """Mixed prompt lengths, more requests than slots, arrivals while others stream, a cancelled
    neighbour and state-cache hits: each output equals `Decoder.generate` at batch 1. Nothing is
    compiled while serving."""
    specs = [(1, 5, 9), (2, 70, 12), (3, 40, 6), (4, 100, 10), (5, 33, 8), (6, 64, 7)]
    with _counting_compiles() as compiles:
        started = [
            (spec, *_submit(engine, _prompt(spec[0], spec[1]), spec[2])) for spec in specs[:2]
        ]
        victim, victim_out = _submit(engine, _prompt(9, 50), 40)
        for _ in range(4):
            engine.run_once()
        started += [(s, *_submit(engine, _prompt(s[0], s[1]), s[2])) for s in specs[2:4]]
        for _ in range(3):
            engine.run_once()
        engine.cancel(victim)
        # Continuations of earlier prompts: the cache holds their piece boundaries.
        reused = [(7, _prompt(4, 100) + _prompt(70, 20), 6), (8, _prompt(2, 70), 5)]
        started += [(s, *_submit(engine, s[1], s[2])) for s in reused]
        started += [(s, *_submit(engine, _prompt(s[0], s[1]), s[2])) for s in specs[4:]]
        _drain(engine)
    assert compiles == [], f"{len(compiles)} compilations while serving"
    assert victim_out.finished.reason == "cancelled" and len(victim_out.tokens) < 40
    for spec, request, out in started:
        want = greedy_tokens(decoder, [request.prompt], spec[2])[0].tolist()
        assert out.tokens == want, f"request {spec}"
        assert out.finished.reason == "length"
        assert out.finished.prompt_tokens == len(request.prompt)
        assert out.finished.completion_tokens == spec[2]
    cached = {spec[0]: out.finished.cached_tokens for spec, _, out in started}
    assert cached[7] == 96 and cached[8] == 70, cached


def test_seeded_sampling_is_the_same_alone_and_in_a_full_batch(engine):
    """Per-row settings: a seeded request draws the same tokens whatever its neighbours use."""
    mine = SamplingConfig(temperature=0.9, top_p=0.9, top_k=40, presence_penalty=0.3, seed=11)
    prompt = _prompt(20, 21)
    _, alone = _submit(engine, prompt, 16, mine)
    _drain(engine)
    others = [
        SamplingConfig(temperature=1.3, top_p=1.0, seed=1),
        SamplingConfig(temperature=0.0, presence_penalty=0.0, frequency_penalty=0.0),
    ]
    crowd = [_submit(engine, _prompt(30 + i, 9 + 7 * i), 20, s)[1] for i, s in enumerate(others)]
    _, batched = _submit(engine, prompt, 16, mine)
    _drain(engine)
    assert batched.tokens == alone.tokens and len(alone.tokens) == 16
    assert all(c.finished.reason == "length" for c in crowd)
    _, reseeded = _submit(engine, prompt, 16, SamplingConfig(**{**vars(mine), "seed": 12}))
    _drain(engine)
    assert reseeded.tokens != alone.tokens


def test_stop_tokens_end_a_request_unread(engine, decoder):
    prompt = _prompt(40, 12)
    want = greedy_tokens(decoder, [prompt], 6)[0].tolist()
    stop = SamplingConfig(**{**vars(GREEDY), "stop_tokens": (want[3],)})
    _, out = _submit(engine, prompt, 6, stop)
    _drain(engine)
    first = want.index(want[3])
    assert out.tokens == want[:first] and out.finished.reason == "stop"


def test_bad_requests_and_a_full_queue_are_refused(decoder):
    engine = Engine(decoder, slots=1, queue_size=2)
    with pytest.raises(ValueError, match="max_tokens must be >= 1"):
        _submit(engine, [1, 2], 0)
    with pytest.raises(ValueError, match="prompt is empty"):
        _submit(engine, [], 3)
    cap = decoder.decode_config.cache_size
    with pytest.raises(ValueError, match=f"exceeds the context capacity {cap}"):
        _submit(engine, [1] * 10, cap - 9)
    for token in (1, 2, 3):  # one for the slot, two waiting
        _submit(engine, [token], 1)
    with pytest.raises(QueueFull, match="the queue holds 2"):
        _submit(engine, [4], 1)


def test_state_cache_keeps_to_its_budget_and_drops_the_least_recent(decoder):
    from rwkvx_jax.serving.state_cache import CachedState, prefix_key

    logits, state = decoder.prefill([[1, 2, 3]])
    entry = CachedState.from_device(state, logits)
    cache = StateCache(int(entry.nbytes * 2.5))
    for i in range(3):
        cache.put(prefix_key("", [i] * PIECE), entry)
    assert len(cache) == 2 and cache.used <= cache.budget
    assert cache.longest_prefix("", [0] * PIECE + [5], PIECE) is None  # the oldest went first
    hit = cache.longest_prefix("", [2] * (2 * PIECE + 3), PIECE)
    assert hit is not None and hit.length_in_prompt == PIECE
    assert cache.longest_prefix("other", [2] * PIECE, PIECE) is None  # another start state
    assert (cache.hits, cache.misses) == (1, 2)


def test_an_error_in_one_request_fails_that_request_only(engine, decoder):
    """A saved state whose logits have the wrong width fails in `admit`; the requests around it
    finish, and exactly."""
    from rwkvx_jax.serving.engine import StartState
    from rwkvx_jax.serving.state_cache import CachedState

    _, state = decoder.prefill([[1, 2, 3]])
    too_wide = np.zeros((1, decoder.config.vocab_size + 5), np.float32)
    broken = StartState("broken", CachedState(CachedState.from_device(state, None).state, too_wide))
    before, before_out = _submit(engine, _prompt(50, 20), 5)
    out = Collected()
    engine.submit(Request([], GREEDY, 4, out, start=broken))
    after, after_out = _submit(engine, _prompt(51, 20), 5)
    _drain(engine)
    assert out.finished.reason == "error" and "TypeError" in out.finished.error
    for request, collected in ((before, before_out), (after, after_out)):
        assert collected.tokens == greedy_tokens(decoder, [request.prompt], 5)[0].tolist()


def test_a_long_prompt_stalls_a_running_stream_by_one_piece_at_most(engine, monkeypatch):
    """Between two tokens of a running request the engine reads at most one prefill piece,
    however long the prompts arriving meanwhile."""
    log = []
    read_piece = engine.decoder.prefill

    def logged(*args, **kwargs):
        log.append("piece")
        return read_piece(*args, **kwargs)

    monkeypatch.setattr(engine.decoder, "prefill", logged)
    running = Collected()
    engine.submit(Request(_prompt(60, 8), GREEDY, 30, lambda e: (log.append("token"), running(e))))
    while not running.tokens:
        engine.run_once()
    for seed in (61, 62):
        _submit(engine, _prompt(seed, 5 * PIECE), 3)  # five pieces each
    _drain(engine)
    during = log[log.index("token") : len(log) - log[::-1].index("token")]
    assert during.count("piece") == 10
    assert "piece,piece" not in ",".join(during)


def test_the_engine_thread_outlives_a_failed_step(engine, decoder, monkeypatch):
    """A batched step that raises fails the requests in it ("error"); the thread goes on and
    serves the next request exactly."""
    from rwkvx_jax.serving.service import EngineThread

    real_advance = engine.batch.advance
    calls = []

    def failing_once(active):
        calls.append(1)
        if len(calls) == 1:
            # As a step that fails after donating its buffers: they are gone.
            jax.tree.map(lambda buffer: buffer.delete(), engine.batch.state)
            raise RuntimeError("planted step failure")
        return real_advance(active)

    monkeypatch.setattr(engine.batch, "advance", failing_once)
    thread = EngineThread(engine)
    thread.start()
    try:
        first = Collected()
        engine.submit(Request(_prompt(70, 6), GREEDY, 4, first))
        thread.wake()
        deadline = time.monotonic() + 60
        while first.finished is None and time.monotonic() < deadline:
            time.sleep(0.01)
        second_request, second = _submit(engine, _prompt(71, 6), 4)
        thread.wake()
        while second.finished is None and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        thread.stop()
    assert first.finished.reason == "error" and "planted step failure" in first.finished.error
    assert second.tokens == greedy_tokens(decoder, [second_request.prompt], 4)[0].tolist()
