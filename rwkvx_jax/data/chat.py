"""Chat records for fine-tuning: the RWKV World chat format, with the loss on the answers only.

A `.jsonl` file holds one conversation per line:

    {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]}

Roles are "system", "user" and "assistant". A conversation is rendered the way RWKV World
models are prompted, each turn `Role: content` followed by a blank line:

    User: Hi\\n\\nAssistant: Hello!\\n\\n

and ends with the end-of-document token. Inside a turn "\\n\\n" would read as the end of the
turn, so a content's blank lines are folded to single newlines and its ends stripped. Only an
answer is a training target: the text after "Assistant:" (its leading space, the answer and the
closing blank line, which teaches the model to end its turn); everything else is context.

For training, each conversation starts a window of its own (`chat_jsonl_tokens` with `ctx`):
it is padded with unscored end-of-document tokens to a whole number of windows, so every
conversation is read from the start state, as at inference (state tuning learns exactly that
state). A conversation longer than a window goes on in the next one, which starts from the
start state mid-conversation: pick a ctx that holds the conversations.

The loss mask travels inside the token stream itself, so windows, shuffling, sharding and resume
need nothing new: a token that is context only is stored as `-1 - id` (negative), a scored one
as `id`. `split_scored` turns a batch of such tokens back into ids and a mask (numpy or jax).
"""

from __future__ import annotations

import json
import os
import re

import jax.numpy as jnp
import numpy as np

from rwkvx_jax.data.corpora import DocumentTokenizer

ROLES = {"system": "System", "user": "User", "assistant": "Assistant"}
_BLANK_LINES = re.compile(r"\n\s*\n")


def turn_text(content: str) -> str:
    """A message's content as it goes into a turn: ends stripped, blank lines folded."""
    return _BLANK_LINES.sub("\n", content.strip())


def chat_prompt(question: str) -> str:
    """The prompt that asks a one-turn question: `User: question\\n\\nAssistant:` (the model
    writes the answer after it, starting with a space)."""
    return f"{ROLES['user']}: {turn_text(question)}\n\n{ROLES['assistant']}:"


def _checked_messages(record, where: str) -> list[tuple[str, str]]:
    if not isinstance(record, dict) or not isinstance(record.get("messages"), list):
        raise ValueError(f'{where}: expected an object with a list "messages"')
    messages = []
    for index, message in enumerate(record["messages"]):
        role = message.get("role") if isinstance(message, dict) else None
        content = message.get("content") if isinstance(message, dict) else None
        if role not in ROLES or not isinstance(content, str):
            raise ValueError(
                f"{where}: message {index} must be {{'role': one of {sorted(ROLES)}, 'content': "
                f"a string}}, got {message!r}"
            )
        messages.append((role, content))
    if not any(role == "assistant" for role, _ in messages):
        raise ValueError(f"{where}: no assistant message, so nothing to train on")
    return messages


def chat_pieces(record, where: str = "record") -> list[tuple[str, bool]]:
    """A conversation as (text, scored) pieces in order; their texts joined are the rendered
    conversation (without the end-of-document token).

    Raises:
      ValueError: not {"messages": [...]} with known roles and string contents, or no
        assistant message; names `where`.
    """
    pieces = []
    for role, content in _checked_messages(record, where):
        if role == "assistant":
            pieces += [(f"{ROLES[role]}:", False), (f" {turn_text(content)}\n\n", True)]
        else:
            pieces.append((f"{ROLES[role]}: {turn_text(content)}\n\n", False))
    return pieces


def encode_chat(record, tokenizer: DocumentTokenizer, where: str = "record") -> np.ndarray:
    """A conversation as signed tokens (see the module docstring), int32 [n], end token last.

    Each piece is tokenized on its own, so an answer's first token never merges with the
    "Assistant:" before it: the model learns to answer after exactly the prompt `chat_prompt`
    gives at inference.
    """
    tokens = []
    for text, scored in chat_pieces(record, where):
        ids = np.asarray(tokenizer.encode(text), np.int64)
        tokens.append(ids if scored else -1 - ids)
    tokens.append(np.asarray([-1 - tokenizer.end_of_document], np.int64))
    return np.concatenate(tokens).astype(np.int32)


def chat_jsonl_tokens(
    path: str | os.PathLike, tokenizer: DocumentTokenizer, ctx: int | None = None
) -> np.ndarray:
    """Every conversation of a chat `.jsonl` file, encoded and packed: signed int32 [n].

    With `ctx`, each conversation is padded with unscored end-of-document tokens to a multiple
    of ctx tokens and one more is added at the end, so that `TokenWindows(stream, ctx)` window
    i starts exactly where a conversation (or its next ctx tokens) starts.

    Raises:
      ValueError: a line is not JSON or not a conversation (`path:line` says which), or the
        file holds none.
    """
    path = os.fspath(path)
    conversations = []
    with open(path, encoding="utf-8") as lines:
        for line_number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            where = f"{path}:{line_number}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{where}: invalid JSON ({err.msg})") from None
            conversations.append(encode_chat(record, tokenizer, where))
    if not conversations:
        raise ValueError(f"{path}: no conversations")
    if ctx is None:
        return np.concatenate(conversations)
    pad = -1 - tokenizer.end_of_document
    padded = [np.pad(c, (0, -len(c) % ctx), constant_values=pad) for c in conversations]
    return np.concatenate([*padded, np.asarray([pad], np.int32)])


def split_scored(tokens):
    """(ids, scored) of signed tokens: ids the token ids, scored True where a token is a
    training target. Works on numpy and jax arrays (jax arrays come out of either)."""
    scored = tokens >= 0
    return jnp.where(scored, tokens, -1 - tokens), scored
