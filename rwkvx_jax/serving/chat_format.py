"""Chat messages as one RWKV World prompt.

The RWKV World models were tuned on turns of the form

    System: You are a helpful assistant.

    User: What is RWKV?

    Assistant: An RNN with transformer-level performance.

    User: And RWKV-X?

    Assistant:

that is, "Role: content" turns separated by a blank line, ending with "Assistant:" for the model
to continue. A blank line therefore ends a turn: inside a message, runs of newlines are folded
to one (as RWKV-Runner and Ai00 do), so a message cannot fake a turn of another role. The
generated answer stops at the next "\\n\\nUser:" (`CHAT_STOP`), where the model would start
writing the user's turn itself.
"""

from __future__ import annotations

import re

ROLES = {"system": "System", "user": "User", "assistant": "Assistant"}
CHAT_STOP = "\n\nUser:"
_BLANK_LINES = re.compile(r"\n(\s*\n)+")


def chat_prompt(messages: list[tuple[str, str]]) -> str:
    """The prompt of a conversation.

    Args:
      messages: (role, content) pairs in order; role is "system", "user" or "assistant".

    Returns:
      The turns joined by blank lines, ending with "Assistant:" (no trailing space: the World
      tokenizer reads " word" as one token, which the model then writes itself).

    Raises:
      ValueError: no messages, or a role outside `ROLES`.
    """
    if not messages:
        raise ValueError("messages must hold at least one message")
    turns = []
    for role, content in messages:
        if role not in ROLES:
            raise ValueError(f"message role must be one of {sorted(ROLES)}, got {role!r}")
        text = _BLANK_LINES.sub("\n", content.strip())
        turns.append(f"{ROLES[role]}: {text}")
    return "\n\n".join(turns) + "\n\nAssistant:"
