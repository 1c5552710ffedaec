"""Chat messages as prompt ids: the one function that knows chat templates.

A model post-trained for chat stores its template with its tokenizer and checkpoint; ``render_chat`` is where
that template is applied. A checkpoint without one (a base model served for chat) gets the plain-text fallback
below, which any model trained on ordinary text can continue::

    <sos>System: {system message}

    User: {user message}

    Assistant: {assistant message}

    User: {user message}

    Assistant:

Messages are separated by a blank line; "developer" messages render as "System". The reply ends at the model's
<eos> or where it starts a new turn (the stop strings "\\nUser:", "\\nAssistant:", "\\nSystem:", added to the
request's own), and whitespace at its ends is dropped.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

ROLES = {"system": "System", "developer": "System", "user": "User", "assistant": "Assistant"}
FALLBACK_STOP = ("\nUser:", "\nAssistant:", "\nSystem:")


@dataclass
class ChatPrompt:
    """A rendered chat: the ids to prefill, the stop strings the template implies, whether to strip the reply."""

    ids: list[int]
    stop: list[str] = field(default_factory=list)
    strip: bool = False


def render_chat(messages: Sequence[tuple[str, str]], tokenizer, checkpoint=None) -> ChatPrompt:
    """The prompt for the assistant's next reply to `messages`.

    Args:
        messages: (role, text) pairs in order; roles are keys of ``ROLES`` (checked by the request model).
        tokenizer: the model's ``Tokenizer``.
        checkpoint: the ``LoadedCheckpoint`` served (None: a model given without one). When a checkpoint
            records a chat template, that template renders the chat; none does yet, so this is the plain-text
            fallback of the module doc.
    Returns: a ``ChatPrompt``.
    """
    turns = [f"{ROLES[role]}: {text}" for role, text in messages]
    text = "\n\n".join(turns + ["Assistant:"])
    return ChatPrompt([tokenizer[tokenizer.sos_token]] + tokenizer.encode(text), list(FALLBACK_STOP), strip=True)
