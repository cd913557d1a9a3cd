"""The server as clients see it (issue 23 items 1, 2, 4, 6, 7): `python -m rwkvx_jax.serve
--demo` in a subprocess on a free loopback port, called with the official `openai` package and
with httpx."""

from __future__ import annotations

import concurrent.futures
import json
import os
import pathlib
import re
import signal
import subprocess
import sys
import threading
import time

import httpx
import openai
import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
CONTEXT = 1024  # room for the long generations the disconnect and queue tests need
SLOTS, QUEUE = 3, 2
READY = re.compile(r"ready on (http://127\.0\.0\.1:\d+)")
# A greedy request that never meets the end-of-text token: the demo model continues "ab" for
# all CONTEXT - 8 tokens (a stream that stops early would not hold its slot).
LONG = {"model": "demo", "prompt": "ab", "max_tokens": CONTEXT - 8, "temperature": 0}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """(base URL, process) of a demo server; stopped with SIGTERM at the end."""
    states = tmp_path_factory.mktemp("states")
    command = [
        sys.executable, "-m", "rwkvx_jax.serve", "--demo", "--port", "0", "--slots", str(SLOTS),
        "--queue", str(QUEUE), "--max-context", str(CONTEXT), "--prefill-chunk", "32",
        "--states-dir", str(states),
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    process = subprocess.Popen(
        command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    line = process.stdout.readline()
    match = READY.search(line)
    if not match:
        process.kill()
        raise AssertionError(f"no ready line: {line!r} {process.stderr.read()}")
    yield match.group(1), process, states
    if process.poll() is None:
        process.kill()
        process.wait()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server[0] + "/v1", api_key="unused", max_retries=0)


def _post(server, path, body, **kwargs):
    return httpx.post(server[0] + path, json=body, timeout=60, **kwargs)


def _metric(server, name: str) -> float:
    text = httpx.get(server[0] + "/metrics").text
    return float(re.search(rf"^{name} (\S+)$", text, re.M).group(1))


def test_health_models_and_metrics(server, client):
    assert httpx.get(server[0] + "/health").json() == {"status": "ok"}
    assert [m.id for m in client.models.list()] == ["demo"]
    text = httpx.get(server[0] + "/metrics").text
    for name in (
        "rwkvx_requests_total", "rwkvx_prompt_tokens_total", "rwkvx_completion_tokens_total",
        "rwkvx_queue_depth", "rwkvx_busy_slots", "rwkvx_state_cache_hits_total",
        "rwkvx_state_cache_misses_total", "rwkvx_time_to_first_token_seconds_bucket",
        "rwkvx_inter_token_latency_seconds_count",
    ):  # fmt: skip
        assert f"\n{name}" in text, name


def test_completion_streamed_and_not_give_the_same_text(client):
    args = {"model": "demo", "prompt": "The cat sat on", "max_tokens": 12, "temperature": 0}
    whole = client.completions.create(**args)
    assert whole.choices[0].finish_reason == "length"
    assert whole.usage.prompt_tokens == len(b"The cat sat on")
    assert whole.usage.completion_tokens == 12 and whole.usage.total_tokens == 26
    chunks = list(client.completions.create(**args, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == whole.choices[0].text
    assert chunks[-1].choices[0].finish_reason == "length"


def test_chat_with_a_system_message_streams_usage_and_done(server, client):
    messages = [
        {"role": "system", "content": "You answer briefly."},
        {"role": "user", "content": "Hi there"},
    ]
    # No max_tokens: chat's default (512) is cut to the context the prompt leaves.
    long_chat = [{"role": "user", "content": "word " * 140}]  # 700 bytes: 512 would not fit
    free = client.chat.completions.create(model="demo", messages=long_chat, temperature=0)
    assert free.usage.prompt_tokens + 512 > CONTEXT >= free.usage.total_tokens
    reply = client.chat.completions.create(
        model="demo", messages=messages, max_tokens=6, temperature=0
    )
    assert reply.choices[0].message.role == "assistant"
    prompt = "System: You answer briefly.\n\nUser: Hi there\n\nAssistant:"
    assert reply.usage.prompt_tokens == len(prompt.encode())
    stream = client.chat.completions.create(
        model="demo", messages=messages, max_tokens=6, temperature=0, stream=True,
        stream_options={"include_usage": True},
    )  # fmt: skip
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == reply.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == reply.usage.completion_tokens
    raw = _post(server, "/v1/chat/completions", {"model": "demo", "messages": messages,
                "max_tokens": 3, "stream": True})  # fmt: skip
    events = [line for line in raw.text.split("\n\n") if line]
    assert events[-1] == "data: [DONE]" and all(e.startswith("data: ") for e in events)


def test_a_stop_string_ends_the_text_before_it(client):
    args = {"model": "demo", "prompt": "abc", "max_tokens": 20, "temperature": 0}
    full = client.completions.create(**args).choices[0].text
    stop = full[5:7]
    cut = client.completions.create(**args, stop=[stop]).choices[0]
    assert cut.text == full[: full.index(stop)] and cut.finish_reason == "stop"


@pytest.mark.parametrize(
    ("body", "status", "param"),
    [
        ({"prompt": "x", "max_tokens": 0}, 400, "max_tokens"),
        ({"prompt": "x", "max_tokens": "8"}, 400, "max_tokens"),
        ({"prompt": "x", "max_tokens": CONTEXT}, 400, "max_tokens"),
        ({"prompt": ""}, 400, "prompt"),
        ({"prompt": 5}, 400, "prompt"),
        ({"prompt": "x", "n": 2}, 400, "n"),
        ({"prompt": "x", "temperature": -1}, 400, "temperature"),
        ({"prompt": "x", "stop": [1]}, 400, "stop"),
        ({"prompt": "x", "model": "gpt-4"}, 404, "model"),
        ({"prompt": "x", "state": "nowhere"}, 404, "state"),
    ],
)
def test_bad_requests_get_openai_errors(server, body, status, param):
    response = _post(server, "/v1/completions", {"model": "demo", **body})
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["param"] == param and error["message"] and error["type"]


def test_bad_json_and_chat_bodies_and_the_openai_exceptions(server, client):
    response = httpx.post(server[0] + "/v1/completions", content=b"{nope", timeout=10)
    assert response.status_code == 400 and "not valid JSON" in response.json()["error"]["message"]
    for messages in ([], [{"role": "robot", "content": "x"}], [{"role": "user"}]):
        response = _post(server, "/v1/chat/completions", {"model": "demo", "messages": messages})
        assert response.status_code == 400, messages
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        client.completions.create(model="demo", prompt="x", max_tokens=0)
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.completions.create(model="nope", prompt="x")


def test_named_states_and_the_state_cache(server, client):
    system = "You are a terse assistant who knows RWKV. " * 3
    saved = _post(server, "/v1/states", {"name": "terse", "prompt": system}).json()
    assert saved["tokens"] == len(system.encode())
    assert (server[2] / "terse.npz").is_file()
    args = {"model": "demo", "max_tokens": 8, "temperature": 0}
    from_state = client.completions.create(**args, prompt="Q: hi", extra_body={"state": "terse"})
    fresh = client.completions.create(**args, prompt=system + "Q: hi")
    assert from_state.choices[0].text == fresh.choices[0].text
    assert from_state.usage.prompt_tokens == len(b"Q: hi")
    again = client.completions.create(**args, prompt=system + "Q: hi, again")
    # The fresh request's pieces (32 tokens each) up to its last whole one are cached.
    cached = len((system + "Q: hi").encode()) // 32 * 32
    assert again.usage.prompt_tokens_details.cached_tokens == cached
    assert _metric(server, "rwkvx_state_cache_hits_total") >= 1


def test_a_state_file_written_offline_serves_and_a_mismatched_one_is_refused(server, client):
    """`state_files.save_state` (what `rwkvx-generate --state-out` writes) from this process: the
    server starts from it exactly as from the state it saved itself for the same prompt."""
    from rwkvx_jax.checkpoints.random_weights import demo_model
    from rwkvx_jax.decoding.decoder import DecodeConfig, Decoder
    from rwkvx_jax.decoding.state_files import save_state
    from rwkvx_jax.model import init_decode_state

    context = "A long shared context, read once. " * 2
    config, params = demo_model()
    # The server's settings (more than one slot: the kernels as trained), so the two states
    # are read by the same compiled piece.
    settings = DecodeConfig(cache_size=CONTEXT, prefill_chunk=32, kernel_layout="in_out")
    decoder = Decoder(config, params, settings)
    logits, state = decoder.prefill([list(context.encode())])
    save_state(server[2] / "offline.npz", config, state, next_logits=logits)
    save_state(server[2] / "too-small.npz", config, init_decode_state(config, 1, 256))
    _post(server, "/v1/states", {"name": "online", "prompt": context}).raise_for_status()
    args = {"model": "demo", "prompt": "Q:", "max_tokens": 8, "temperature": 0}
    texts = [
        client.completions.create(**args, extra_body={"state": name}).choices[0].text
        for name in ("offline", "online")
    ]
    assert texts[0] == texts[1]
    refused = _post(server, "/v1/completions", {**args, "state": "too-small"})
    assert refused.status_code == 400 and "cache size 256" in refused.json()["error"]["message"]


def test_a_state_tuning_export_serves_as_a_named_state(server, client):
    """Issue 25 item 2: the state `finetune=state` exports (`tuned_decode_state`, written by
    `save_state` as `StateMethod.export` does) is a named state the server starts from: its
    greedy text equals `Decoder.generate` from the same state, and differs from a fresh start."""
    import jax

    from rwkvx_jax.checkpoints.random_weights import demo_model
    from rwkvx_jax.decoding.decoder import DecodeConfig, Decoder
    from rwkvx_jax.decoding.sampling import SamplingConfig
    from rwkvx_jax.decoding.state_files import save_state
    from rwkvx_jax.training.config import StateTuningConfig
    from rwkvx_jax.training.state_tuning import init_tuned_states, tuned_decode_state

    config, params = demo_model()
    zeros = init_tuned_states(config, StateTuningConfig(token_shift=True))
    leaves, tree = jax.tree_util.tree_flatten(zeros)
    keys = jax.random.split(jax.random.key(3), len(leaves))
    tuned = tree.unflatten(
        [jax.random.normal(k, x.shape) for k, x in zip(keys, leaves, strict=True)]
    )
    state = tuned_decode_state(config, tuned, cache_size=CONTEXT)
    save_state(server[2] / "tuned.npz", config, state)

    prompt, max_tokens = "Q: hi", 8
    settings = DecodeConfig(cache_size=CONTEXT, prefill_chunk=32, kernel_layout="in_out")
    decoder = Decoder(config, params, settings)
    # Greedy with no penalties: what an OpenAI request without penalty fields asks for.
    greedy = SamplingConfig(temperature=0.0, presence_penalty=0.0, frequency_penalty=0.0)
    steps = decoder.generate(
        [list(prompt.encode())], greedy, max_tokens,
        state=tuned_decode_state(config, tuned, cache_size=CONTEXT),
    )  # fmt: skip
    tokens = [int(t[0]) for t in steps]
    tokens = tokens[: tokens.index(-1)] if -1 in tokens else tokens
    args = {"model": "demo", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0}
    served = client.completions.create(**args, extra_body={"state": "tuned"}).choices[0].text
    fresh = client.completions.create(**args).choices[0].text
    expected = bytes(t for t in tokens if t != 0).decode("utf-8", errors="replace")
    assert served == expected
    assert served != fresh


def _stream_and_drop(server, tokens_read: int, max_tokens: int = CONTEXT - 8) -> None:
    """Streams a long generation and hangs up after `tokens_read` events."""
    body = {**LONG, "max_tokens": max_tokens, "stream": True}
    with httpx.stream("POST", server[0] + "/v1/completions", json=body, timeout=60) as response:
        for i, _ in enumerate(response.iter_lines()):
            if i >= tokens_read:
                break


def test_a_disconnected_client_frees_its_slot(server):
    before = _metric(server, "rwkvx_completion_tokens_total")
    _stream_and_drop(server, 4)
    deadline = time.monotonic() + 5
    while _metric(server, "rwkvx_busy_slots") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _metric(server, "rwkvx_busy_slots") == 0
    assert _metric(server, "rwkvx_completion_tokens_total") - before < CONTEXT - 8


def _stream_until(server, release: threading.Event) -> None:
    """Streams a long generation until `release` is set, then hangs up."""
    body = {**LONG, "stream": True}
    with httpx.stream("POST", server[0] + "/v1/completions", json=body, timeout=120) as response:
        for _ in response.iter_lines():
            if release.is_set():
                break


def test_a_full_queue_is_429_and_the_server_keeps_serving(server, client):
    release = threading.Event()
    with concurrent.futures.ThreadPoolExecutor(SLOTS + QUEUE) as pool:
        # SLOTS streams take the slots, QUEUE more wait for one; all hold on until released.
        holders = [pool.submit(_stream_until, server, release) for _ in range(SLOTS + QUEUE)]
        try:
            # A burst first queues more than QUEUE (the engine moves them into slots one
            # prefill at a time): wait for the steady state, every slot busy and QUEUE waiting.
            def occupancy():
                return _metric(server, "rwkvx_busy_slots"), _metric(server, "rwkvx_queue_depth")

            deadline = time.monotonic() + 60
            while occupancy() != (SLOTS, QUEUE) and time.monotonic() < deadline:
                time.sleep(0.02)
            assert occupancy() == (SLOTS, QUEUE)
            with pytest.raises(openai.RateLimitError, match="queue holds"):
                client.completions.create(model="demo", prompt="x", max_tokens=1)
        finally:
            release.set()
        for holder in holders:
            holder.result()
    reply = client.completions.create(model="demo", prompt="x", max_tokens=2)
    assert reply.usage.completion_tokens == 2


def _load_request(i: int) -> dict:
    """Request i of the load test: mixed lengths, greedy or seeded, streamed or not."""
    body = {
        "model": "demo",
        "prompt": f"{i}: " + "lorem ipsum dolor " * (i % 7),
        "max_tokens": 4 + (i * 5) % 23,
        "temperature": 0 if i % 3 else 0.8,
        "seed": i,
        "stream": i % 2 == 0,
    }
    if i % 4 == 1:
        body["top_p"], body["top_k"] = 0.9, 20
    return body


def _run_load_request(server, body, drop_after=None) -> tuple[str, dict | None, int]:
    """(text, usage or None, 429s seen); retries while the queue is full, as a client would."""
    refused = 0
    while True:
        if not body["stream"]:
            response = _post(server, "/v1/completions", body)
            if response.status_code == 429:
                refused += 1
                time.sleep(0.05)
                continue
            assert response.status_code == 200, response.text
            reply = response.json()
            return reply["choices"][0]["text"], reply["usage"], refused
        streamed = {**body, "stream_options": {"include_usage": True}}
        with httpx.stream("POST", server[0] + "/v1/completions", json=streamed, timeout=60) as r:
            if r.status_code == 429:
                refused += 1
                r.read()
                time.sleep(0.05)
                continue
            text, usage, events = "", None, 0
            for line in r.iter_lines():
                if not line.startswith("data: {"):
                    continue
                chunk = json.loads(line[6:])
                events += 1
                if chunk.get("usage"):
                    usage = chunk["usage"]
                elif chunk["choices"]:
                    text += chunk["choices"][0]["text"]
                if drop_after is not None and events >= drop_after:
                    return text, None, refused
            return text, usage, refused


def test_load_48_requests_from_12_clients_nothing_lost_duplicated_or_altered(server):
    """Each request's text and usage under load equal the same request served alone; every
    fifth request hangs up after two events; afterwards nothing is left in the engine."""
    bodies = [_load_request(i) for i in range(48)]
    kept = [i for i in range(48) if i % 5 != 3]
    alone = {i: _run_load_request(server, bodies[i])[:2] for i in kept}
    with concurrent.futures.ThreadPoolExecutor(12) as pool:
        futures = {
            i: pool.submit(_run_load_request, server, bodies[i], None if i in kept else 2)
            for i in range(48)
        }
        results = {i: f.result() for i, f in futures.items()}
    for i in kept:
        (text, usage, _), (want_text, want_usage) = results[i], alone[i]
        # Only the cache's share may differ: the requests served alone left their prefixes.
        del usage["prompt_tokens_details"], want_usage["prompt_tokens_details"]
        assert (text, usage) == (want_text, want_usage), f"request {i}"
    deadline = time.monotonic() + 5
    while _metric(server, "rwkvx_busy_slots") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _metric(server, "rwkvx_busy_slots") == 0 and _metric(server, "rwkvx_queue_depth") == 0


def test_sigterm_drains_a_running_stream_and_exits_0(server):
    """SIGTERM while a stream runs: the stream still ends with [DONE] (drained within
    --drain-seconds), and the server exits 0."""
    body = {**LONG, "max_tokens": 200, "stream": True}
    with httpx.stream("POST", server[0] + "/v1/completions", json=body, timeout=60) as response:
        lines = response.iter_lines()
        assert next(lines).startswith("data: ")
        server[1].send_signal(signal.SIGTERM)
        rest = [line for line in lines if line]
    assert rest[-1] == "data: [DONE]"
    assert server[1].wait(timeout=30) == 0, server[1].stderr.read()
