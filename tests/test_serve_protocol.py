"""The server's model-free parts: chat format, stop strings over streamed text, request checks,
Prometheus text."""

from __future__ import annotations

import pytest

from rwkvx_jax.serving.chat_format import CHAT_STOP, chat_prompt
from rwkvx_jax.serving.metrics import Metrics
from rwkvx_jax.serving.protocol import ApiError, parse_generation, parse_state_request
from rwkvx_jax.serving.text_stream import TextStream
from rwkvx_jax.tokenizer import ByteTokenizer, WorldTokenizer


def test_chat_prompt_is_the_rwkv_world_format():
    prompt = chat_prompt(
        [("system", "Be kind."), ("user", "Hi\n\n\nthere "), ("assistant", "Hello."), ("user", "?")]
    )
    assert prompt == (
        "System: Be kind.\n\nUser: Hi\nthere\n\nAssistant: Hello.\n\nUser: ?\n\nAssistant:"
    )
    with pytest.raises(ValueError, match="role must be one of"):
        chat_prompt([("tool", "x")])


@pytest.mark.parametrize("split", [1, 2, 3])
def test_text_stream_cuts_at_the_first_stop_string_across_tokens(split):
    """Bytes arrive `split` at a time; the stop string straddles tokens; a partial match that
    comes to nothing is released, not lost."""
    tokenizer = ByteTokenizer()
    text = "ab\n\nUsx\n\nUser: more"
    stream = TextStream(tokenizer, [CHAT_STOP, "zz"])
    out = ""
    ids = tokenizer.encode(text)
    for i in range(0, len(ids), split):
        for token in ids[i : i + split]:
            out += stream.push(token)
    out += stream.finish()
    assert out == "ab\n\nUsx" and stream.stopped


def test_text_stream_never_splits_a_character_and_flushes_at_the_end():
    tokenizer = WorldTokenizer()
    ids = tokenizer.encode("héllo wörld ✓")
    stream = TextStream(tokenizer, ["never"])
    pieces = [stream.push(t) for t in ids] + [stream.finish()]
    assert "".join(pieces) == "héllo wörld ✓" and stream.tokens == len(ids)


def _params(**body):
    return parse_generation({"model": "m", **body}, chat=False, model="m")


def test_generation_fields_become_sampling_settings():
    params = _params(
        prompt=["hi"], max_tokens=7, temperature=0.5, top_p=0.9, top_k=5, presence_penalty=1,
        frequency_penalty=-1, seed=3, stop="\n", stream=True,
        stream_options={"include_usage": True},
    )  # fmt: skip
    s = params.sampling
    assert (params.prompt, params.max_tokens, params.stop) == ("hi", 7, ("\n",))
    assert (s.temperature, s.top_p, s.top_k, s.seed) == (0.5, 0.9, 5, 3)
    assert (s.presence_penalty, s.frequency_penalty, s.penalty_decay) == (1.0, -1.0, 1.0)
    assert s.stop_tokens == (0,) and params.stream and params.include_usage
    chat = parse_generation(
        {"model": "m", "messages": [{"role": "user", "content": [{"type": "text", "text": "x"}]}]},
        chat=True,
        model="m",
    )
    assert chat.prompt == "User: x\n\nAssistant:" and chat.stop == (CHAT_STOP,)
    assert (chat.max_tokens, chat.default_max_tokens) == (None, 512)
    assert _params(prompt="x").default_max_tokens == 16


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"prompt": "x", "top_p": 0}, "top_p"),
        ({"prompt": "x", "top_k": 1.5}, "top_k"),
        ({"prompt": "x", "seed": "1"}, "seed"),
        ({"prompt": "x", "stream": "yes"}, "stream"),
        ({"prompt": "x", "stop": ["a"] * 5}, "stop"),
        ({"prompt": "x", "logprobs": 2}, "logprobs"),
        ({"prompt": "x", "state": "../etc"}, "state"),
        ({"prompt": "x", "presence_penalty": float("nan")}, "presence_penalty"),
        ({"prompt": "x", "max_tokens": True}, "max_tokens"),
    ],
)
def test_bad_fields_name_the_field(body, param):
    with pytest.raises(ApiError) as caught:
        _params(**body)
    assert caught.value.status == 400 and caught.value.param == param
    assert caught.value.body()["error"]["param"] == param


def test_state_requests_are_checked():
    assert parse_state_request({"name": "sys-1", "prompt": "p"}) == ("sys-1", "p", None)
    for body in ({"name": "a/b", "prompt": "p"}, {"name": "a", "prompt": ""}, []):
        with pytest.raises(ApiError):
            parse_state_request(body)


def test_metrics_render_prometheus_text():
    metrics = Metrics()
    metrics.add("rwkvx_requests_total", 2)
    for seconds in (0.001, 0.2, 100.0):
        metrics.observe("rwkvx_time_to_first_token_seconds", seconds)
    metrics.gauge("rwkvx_busy_slots", "busy", lambda: 3)
    text = metrics.render()
    assert "\nrwkvx_requests_total 2\n" in text
    assert 'rwkvx_time_to_first_token_seconds_bucket{le="0.005"} 1\n' in text
    assert 'rwkvx_time_to_first_token_seconds_bucket{le="0.25"} 2\n' in text
    assert 'rwkvx_time_to_first_token_seconds_bucket{le="+Inf"} 3\n' in text
    assert "rwkvx_time_to_first_token_seconds_count 3\n" in text
    assert "# TYPE rwkvx_busy_slots gauge\nrwkvx_busy_slots 3\n" in text
