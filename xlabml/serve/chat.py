"""Chat messages as prompt ids: the one function that knows chat templates.

A model post-trained for chat (SFT or DPO, ``xlabml.posttrain``) stores its template with its tokenizer and
checkpoint (``xlabml.chat.chat_template``); ``render_chat`` is where that template is applied: the prompt ends with
``<|assistant|>`` and the reply ends at the model's <eos> or at a role token (a new turn: ``ChatPrompt.stop_ids``). A checkpoint without one (a base model served for chat)
gets the plain-text fallback below, which any model trained on ordinary text can continue::

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
    """A rendered chat: the ids to prefill, the stop strings and stop ids (besides <eos>) the template implies,
    whether to strip the reply."""

    ids: list[int]
    stop: list[str] = field(default_factory=list)
    strip: bool = False
    stop_ids: list[int] = field(default_factory=list)


def render_chat(messages: Sequence[tuple[str, str]], tokenizer, checkpoint=None) -> ChatPrompt:
    """The prompt for the assistant's next reply to `messages`.

    Args:
        messages: (role, text) pairs in order; roles are keys of ``ROLES`` (checked by the request model).
        tokenizer: the model's ``Tokenizer``.
        checkpoint: the ``LoadedCheckpoint`` served (None: a model given without one). When the checkpoint was
            post-trained on chats (``xlabml.chat.chat_template``), its template renders the chat; otherwise the
            plain-text fallback of the module doc does.
    Returns: a ``ChatPrompt``.
    """
    from xlabml.chat import chat_template

    template = chat_template(checkpoint) if checkpoint is not None else None
    if template is not None:
        return ChatPrompt(template.render(messages, add_generation_prompt=True).ids,
                          stop_ids=[i for i in template.stop_ids if i != template.eos_id])
    turns = [f"{ROLES[role]}: {text}" for role, text in messages]
    text = "\n\n".join(turns + ["Assistant:"])
    return ChatPrompt([tokenizer[tokenizer.sos_token]] + tokenizer.encode(text), list(FALLBACK_STOP), strip=True)
