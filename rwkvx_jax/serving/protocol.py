"""The OpenAI wire format: request bodies checked field by field, errors as OpenAI writes them.

A body that cannot run is an `ApiError` naming the field (`param`) and what was expected; the
app answers it with `error_body` and its HTTP status, so clients (the official `openai` package
among them) raise their usual exceptions. Fields the server does not use (`user`, `logit_bias`
when empty, ...) are ignored, as OpenAI-compatible servers do; fields it cannot honour (`n` > 1,
`logprobs`) are errors rather than silently different results.
"""

from __future__ import annotations

import dataclasses
import math
import re
import secrets
from typing import Any

from rwkvx_jax.decoding.sampling import SamplingConfig
from rwkvx_jax.serving.chat_format import CHAT_STOP, chat_prompt

# Completions default to OpenAI's 16 tokens; a chat answer runs until it stops or this many.
COMPLETION_MAX_TOKENS = 16
CHAT_MAX_TOKENS = 512
MAX_STOP_STRINGS = 4
STATE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
# The end-of-document token (id 0) ends every generation, as in `rwkvx-generate`.
END_OF_TEXT = 0


class ApiError(Exception):
    """A request the server refuses: HTTP status, OpenAI error type, message, field, code."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        kind: str = "invalid_request_error",
        code: str | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.param, self.kind, self.code = (
            status,
            message,
            param,
            kind,
            code,
        )

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.kind, self.param, self.code)


def error_body(message: str, kind: str, param: str | None = None, code: str | None = None):
    """The OpenAI error object: {"error": {"message", "type", "param", "code"}}."""
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def bad(param: str, expected: str, value: Any) -> ApiError:
    return ApiError(400, f"'{param}' must be {expected}, got {value!r}", param=param)


@dataclasses.dataclass(frozen=True)
class GenerationParams:
    """A checked completion or chat request.

    Attributes:
      prompt: the prompt text (a chat's messages already in the chat format).
      max_tokens: most tokens generated; None when the request leaves it out.
      default_max_tokens: the most when left out (16 for completions, 512 for chat), capped
        by the context left after the prompt.
      sampling: temperature, top-k/p, penalties (no decay: OpenAI counts occurrences), seed,
        and the end-of-text stop token.
      stop: stop strings (a chat adds `CHAT_STOP`).
      stream: answer as server-sent events.
      include_usage: with stream, a last chunk carrying `usage`.
      state: the named state to start from, or None.
    """

    prompt: str
    max_tokens: int | None
    default_max_tokens: int
    sampling: SamplingConfig
    stop: tuple[str, ...]
    stream: bool
    include_usage: bool
    state: str | None


def _number(body, name, default, low, high, *, integer=False):
    value = body.get(name, default)
    if value is None:
        return default
    kind = "an integer" if integer else "a number"
    ok_type = isinstance(value, int) if integer else isinstance(value, int | float)
    if isinstance(value, bool) or not ok_type or not math.isfinite(value):
        raise bad(name, f"{kind} in [{low}, {high}]", value)
    if not low <= value <= high:
        raise bad(name, f"{kind} in [{low}, {high}]", value)
    return value


def _top_p(body) -> float:
    top_p = float(_number(body, "top_p", 1.0, 0.0, 1.0))
    if top_p <= 0.0:
        raise bad("top_p", "a number in (0, 1]", top_p)
    return top_p


def _stop_strings(body) -> tuple[str, ...]:
    stop = body.get("stop")
    if stop is None:
        return ()
    if isinstance(stop, str):
        stop = [stop]
    if (
        not isinstance(stop, list)
        or len(stop) > MAX_STOP_STRINGS
        or not all(isinstance(s, str) and s for s in stop)
    ):
        raise bad("stop", f"a non-empty string or a list of at most {MAX_STOP_STRINGS}", stop)
    return tuple(stop)


def _prompt_text(body) -> str:
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if not isinstance(prompt, str):
        raise bad("prompt", "a string (or a list of one string)", prompt)
    return prompt


def _chat_text(body) -> str:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise bad("messages", "a non-empty list of {role, content} objects", messages)
    pairs = []
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise bad(where, "an object with 'role' and 'content'", message)
        content = message.get("content")
        if isinstance(content, list):  # content parts: text only
            if not all(isinstance(p, dict) and p.get("type") == "text" for p in content):
                raise bad(f"{where}.content", "a string or a list of text parts", content)
            content = "".join(str(p.get("text", "")) for p in content)
        if not isinstance(content, str):
            raise bad(f"{where}.content", "a string", content)
        pairs.append((message.get("role"), content))
    try:
        return chat_prompt(pairs)
    except ValueError as err:
        raise ApiError(400, str(err), param="messages") from None


def parse_generation(body: Any, *, chat: bool, model: str) -> GenerationParams:
    """Checks a /v1/completions (chat=False) or /v1/chat/completions body.

    Raises:
      ApiError: 400 for a bad field, 404 for another model than `model`.
    """
    if not isinstance(body, dict):
        raise ApiError(400, f"the request body must be a JSON object, got {type(body).__name__}")
    if body.get("model") != model:
        raise ApiError(
            404,
            f"model {body.get('model')!r} does not exist; this server serves {model!r}",
            param="model",
            code="model_not_found",
        )
    prompt = _chat_text(body) if chat else _prompt_text(body)
    if body.get("n", 1) not in (1, None):
        raise bad("n", "1 (one choice per request)", body.get("n"))
    if body.get("logprobs") not in (None, False):
        raise bad("logprobs", "null (log probabilities are not returned)", body.get("logprobs"))
    default_max = CHAT_MAX_TOKENS if chat else COMPLETION_MAX_TOKENS
    max_tokens = _number(body, "max_tokens", None, 1, 2**31 - 1, integer=True)
    if chat and body.get("max_completion_tokens") is not None:
        max_tokens = _number(body, "max_completion_tokens", None, 1, 2**31 - 1, integer=True)
    seed = body.get("seed")
    if seed is None:
        seed = secrets.randbelow(2**31)
    elif isinstance(seed, bool) or not isinstance(seed, int):
        raise bad("seed", "an integer", seed)
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise bad("stream", "true or false", stream)
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise bad("stream_options", "an object", options)
    state = body.get("state")
    if state is not None and (not isinstance(state, str) or not STATE_NAME.match(state)):
        raise bad("state", "the name of a saved state", state)
    sampling = SamplingConfig(
        temperature=float(_number(body, "temperature", 1.0, 0.0, 2.0)),
        top_p=_top_p(body),
        top_k=int(_number(body, "top_k", 0, 0, 2**31 - 1, integer=True)),
        presence_penalty=float(_number(body, "presence_penalty", 0.0, -2.0, 2.0)),
        frequency_penalty=float(_number(body, "frequency_penalty", 0.0, -2.0, 2.0)),
        penalty_decay=1.0,
        stop_tokens=(END_OF_TEXT,),
        seed=seed % 2**63,
    )
    stop = _stop_strings(body) + ((CHAT_STOP,) if chat else ())
    if not prompt and state is None:
        raise bad("messages" if chat else "prompt", "non-empty (or a 'state' to continue)", "")
    return GenerationParams(
        prompt=prompt,
        max_tokens=max_tokens,
        default_max_tokens=default_max,
        sampling=sampling,
        stop=stop,
        stream=stream,
        include_usage=bool(options.get("include_usage", False)),
        state=state,
    )


def parse_state_request(body: Any) -> tuple[str, str, str | None]:
    """(name, prompt, base state or None) of a POST /v1/states body."""
    if not isinstance(body, dict):
        raise ApiError(400, f"the request body must be a JSON object, got {type(body).__name__}")
    name, prompt, base = body.get("name"), body.get("prompt"), body.get("state")
    if not isinstance(name, str) or not STATE_NAME.match(name):
        raise bad("name", "1-64 characters of letters, digits, '_', '.', '-'", name)
    if not isinstance(prompt, str) or not prompt:
        raise bad("prompt", "a non-empty string", prompt)
    if base is not None and (not isinstance(base, str) or not STATE_NAME.match(base)):
        raise bad("state", "the name of a saved state", base)
    return name, prompt, base
