"""The chat template: how a conversation becomes token ids, for training (SFT, DPO) and for serving.

A chat model's tokenizer holds three reserved control tokens, ``<|system|>``, ``<|user|>`` and ``<|assistant|>``,
at the end of its vocabulary. Every tokenizer ``TokenizerTrainer`` trains has them, so a model pretrained with
it is instruction-tuned with the same tokenizer. A tokenizer made before they were reserved gets them appended by
:func:`add_chat_tokens` (``./manage.py add-chat-tokens BASE.model CHAT.model``): every id of the base tokenizer
keeps its meaning, the content hash changes (checkpoints trained with it record the chat tokenizer), and a model
from the base needs three more vocabulary rows (``model.init_from`` copies the shared rows: ``xlabml.init_from``).
The template is a fixed layout of those tokens (``xlab-chat-1``); the tokens in the tokenizer are what
marks a model as a chat model, so the template travels with the tokenizer and the checkpoint (``template_of``)::

    <sos> <|system|> system text <|user|> user text <|assistant|> reply <eos> <|user|> ... <|assistant|>

Each message is its role token followed by its content, encoded on its own; an assistant's reply ends with
``<eos>``, so every generation loop that stops at ``<eos>`` stops at the end of the reply (a model that writes a
role token instead also ends its reply there: ``ChatTemplate.stop_ids``). A prompt for the next reply ends with
``<|assistant|>`` (``add_generation_prompt``). Training targets are exactly the assistant replies' tokens and
the ``<eos>`` that ends each of them (``ChatTemplate.render``).

Control tokens are never produced by ``Tokenizer.encode``: a message whose text spells ``<|user|>`` is encoded as
that text, decodes back to it, and cannot fake a turn. Control tokens decode to ''.

Every tokenizer trained by XLab holds the role tokens, so a base model's tokenizer has a template too, whose tokens
that model never learned: what to prompt a model with is ``chat_template(checkpoint)``, the template of a checkpoint
that was post-trained on chats (``data.format: chat`` or ``preference``), None for a base model.

Public API: ``ChatTemplate``, ``template_of``, ``chat_template``, ``render_chat``, ``add_chat_tokens``, ``make_chat_tokenizer``,
``check_messages``, ``render_plain``, ``extends``.
"""
from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from xlabml.tokenizer import CHAT_TOKENS, Tokenizer, _control_piece

__all__ = ["ChatTemplate", "Rendered", "template_of", "chat_template", "render_chat", "add_chat_tokens", "make_chat_tokenizer",
           "check_messages", "render_plain", "extends", "ROLES", "ROLE_TOKENS", "TEMPLATE_NAME"]

TEMPLATE_NAME = "xlab-chat-1"
ROLES = ("system", "user", "assistant")
ROLE_TOKENS = dict(zip(ROLES, CHAT_TOKENS))  # <|system|>, <|user|>, <|assistant|>: the vocabulary's last ids
ROLE_ALIASES = {"developer": "system"}  # OpenAI's newer name for the system message


@dataclass
class Rendered:
    """A rendered chat or prompt/response pair.

    Attributes:
        ids: the token ids, ``<sos>`` first.
        targets: for each id, whether it is a training target (a reply's token or the ``<eos>`` ending a reply).
    """

    ids: list[int]
    targets: list[bool]


def check_messages(messages: Sequence[Any], where: str = "messages") -> list[tuple[str, str]]:
    """Messages as ``(role, content)`` pairs, roles normalized (``developer`` is ``system``).

    Args:
        messages: a list of ``{"role": ..., "content": ...}`` mappings or ``(role, content)`` pairs; roles are
            ``system``, ``user``, ``assistant`` (or ``developer``), contents strings.
        where: what to call them in an error (e.g. ``chats.jsonl row 12``).
    Raises:
        ValueError: not a non-empty list, an unknown role, a content that is not a string (one line, naming
            `where` and the message's index).
    """
    if isinstance(messages, (str, bytes, Mapping)) or not isinstance(messages, Sequence) or not messages:
        raise ValueError(f"{where}: expected a non-empty list of messages ({{role, content}}), got {messages!r:.80}")
    pairs = []
    for index, message in enumerate(messages):
        if isinstance(message, Mapping):
            if "role" not in message or "content" not in message:
                raise ValueError(f"{where}: message {index} needs 'role' and 'content', got keys {sorted(message)}")
            # keys another tool adds (a file's other messages may give them values: then they are null here)
            unknown = sorted(k for k, v in message.items() if k not in ("role", "content", "name") and v is not None)
            if unknown:
                raise ValueError(f"{where}: message {index} has keys {unknown} that XLab's template cannot render; "
                                 "a message holds 'role' and 'content'")
            role, content = message["role"], message["content"]
        elif isinstance(message, Sequence) and not isinstance(message, (str, bytes)) and len(message) == 2:
            role, content = message
        else:
            raise ValueError(f"{where}: message {index} is {message!r:.80}; expected {{role, content}}")
        role = ROLE_ALIASES.get(role, role)
        if role not in ROLES:
            raise ValueError(f"{where}: message {index} has role {role!r}; expected one of {list(ROLES)}")
        if not isinstance(content, str):
            raise ValueError(f"{where}: message {index} ({role}) has content {content!r:.80}; expected a string")
        pairs.append((role, content))
    return pairs


class ChatTemplate:
    """The ``xlab-chat-1`` layout (module docstring) over a tokenizer that holds the role tokens.

    Attributes:
        tokenizer: the chat tokenizer.
        role_ids: role → id of its token.
        sos_id, eos_id: the tokenizer's ``<sos>`` and ``<eos>`` (``<eos>`` ends every assistant reply).
        stop_ids: ids that end a generated reply: ``<eos>`` and the role tokens.
    Raises (constructor):
        ValueError: the tokenizer lacks the role tokens (names the file and the command that adds them).
    """

    name = TEMPLATE_NAME

    def __init__(self, tokenizer: Tokenizer):
        missing = [token for token in ROLE_TOKENS.values() if token not in tokenizer]
        if missing:
            raise ValueError(f"tokenizer {tokenizer.path or '(from bytes)'} has no chat tokens {missing}: make a chat "
                             "tokenizer from it with `./manage.py add-chat-tokens BASE.model CHAT.model` and train "
                             "with that one")
        self.tokenizer = tokenizer
        self.role_ids = {role: tokenizer[token] for role, token in ROLE_TOKENS.items()}
        self.sos_id, self.eos_id = tokenizer[tokenizer.sos_token], tokenizer[tokenizer.eos_token]
        self.stop_ids = (self.eos_id, *self.role_ids.values())

    def render(self, messages: Sequence[Any], add_generation_prompt: bool = False, where: str = "messages"
               ) -> Rendered:
        """Ids of a chat, and which of them are training targets.

        Args:
            messages: as ``check_messages`` takes them.
            add_generation_prompt: end with ``<|assistant|>``, the prompt for the next reply.
            where: what to call the messages in an error.
        Returns: a ``Rendered``: ``<sos>``, then each message's role token and content (and ``<eos>`` after an
            assistant's); targets are the assistants' content tokens and their ``<eos>``.
        """
        ids, targets = [self.sos_id], [False]
        pairs = check_messages(messages, where)
        encoded = self.tokenizer.encode([content for _, content in pairs])
        for (role, _), content in zip(pairs, encoded):
            ids.append(self.role_ids[role])
            targets.append(False)
            ids.extend(content)
            if role == "assistant":
                ids.append(self.eos_id)
                targets.extend([True] * (len(content) + 1))
            else:
                targets.extend([False] * len(content))
        if add_generation_prompt:
            ids.append(self.role_ids["assistant"])
            targets.append(False)
        return Rendered(ids, targets)

    def __repr__(self) -> str:
        return f"ChatTemplate({self.name!r}, tokenizer={self.tokenizer.path!r}, role_ids={self.role_ids})"


def render_chat(messages: Sequence[Any], tokenizer: Tokenizer, add_generation_prompt: bool = True) -> list[int]:
    """The ids of a chat through the tokenizer's template: by default the prompt for the assistant's next reply.

    Raises:
        ValueError: the tokenizer has no chat template, or bad messages (see ``check_messages``).
    """
    return ChatTemplate(tokenizer).render(messages, add_generation_prompt).ids


def render_plain(tokenizer: Tokenizer, prompt: str, response: str | None = None) -> Rendered:
    """A prompt/response pair as plain text, for a tokenizer without a chat template: ``<sos> prompt response
    <eos>`` (prompt and response encoded separately, so the response's first token starts at its first character);
    targets are the response's tokens and the ``<eos>``. Without a response: ``<sos> prompt``."""
    sos, eos = tokenizer[tokenizer.sos_token], tokenizer[tokenizer.eos_token]
    prompt_ids = tokenizer.encode(prompt)
    ids, targets = [sos, *prompt_ids], [False] * (1 + len(prompt_ids))
    if response is not None:
        response_ids = tokenizer.encode(response)
        ids += [*response_ids, eos]
        targets += [True] * (len(response_ids) + 1)
    return Rendered(ids, targets)


def template_of(source: Any) -> ChatTemplate | None:
    """The chat template of a tokenizer, a checkpoint or anything holding a tokenizer; None for a plain one.

    Args:
        source: a ``Tokenizer``; an object with a ``tokenizer`` attribute (``LoadedCheckpoint``,
            ``XLabDataModule``) or, failing that, a ``tokenizer_path``; or a path: a checkpoint (``.ckpt``,
            ``.safetensors``: its recorded tokenizer, checked against the recorded hash) or a tokenizer model file.
    """
    tokenizer = _find_tokenizer(source)
    if tokenizer is None or not all(token in tokenizer for token in ROLE_TOKENS.values()):
        return None
    return ChatTemplate(tokenizer)


POST_TRAINING_FORMATS = ("chat", "preference")  # data formats whose rows go through the template


def chat_template(checkpoint: Any) -> ChatTemplate | None:
    """The template to prompt a checkpoint with: its tokenizer's template when the checkpoint was trained on chats
    or preference pairs (its data settings' ``format`` is ``chat`` or ``preference``, and the tokenizer holds the
    role tokens); None for a base model, whose role tokens were never trained (prompt it with plain text).

    Args:
        checkpoint: a ``LoadedCheckpoint`` (``xlabml.checkpoints.load_checkpoint``) or a checkpoint path.
    """
    if isinstance(checkpoint, (str, os.PathLike)):
        from xlabml.checkpoints import data_hparams, read_checkpoint

        settings = data_hparams(read_checkpoint(checkpoint))
    else:
        settings = getattr(checkpoint, "data_hparams", None) or {}
    if settings.get("format") not in POST_TRAINING_FORMATS:
        return None
    return template_of(checkpoint)


def _find_tokenizer(source: Any) -> Tokenizer | None:
    if isinstance(source, Tokenizer):
        return source
    if isinstance(source, (str, os.PathLike)):
        if Path(source).suffix in (".ckpt", ".safetensors"):
            return _checkpoint_tokenizer(source)
        return Tokenizer.load(source)
    tokenizer = getattr(source, "tokenizer", None)
    if isinstance(tokenizer, Tokenizer):
        return tokenizer
    path = getattr(source, "tokenizer_path", None)
    if path:
        return Tokenizer.load(path)
    return None


def _checkpoint_tokenizer(path) -> Tokenizer | None:
    from xlabml.checkpoints import check_tokenizer, data_hparams, read_checkpoint, resolve_tokenizer_path, tokenizer_state

    checkpoint = read_checkpoint(path)
    tokenizer_path = resolve_tokenizer_path(data_hparams(checkpoint), path)
    if tokenizer_path is None:
        return None
    tokenizer = Tokenizer.load(tokenizer_path)
    recorded = tokenizer_state(checkpoint)
    check_tokenizer(tokenizer, recorded.get("tokenizer_hash"), recorded.get("tokenizer_path"), path)
    return tokenizer


# ---------------------------------------------------------------------------------------------------------------
# making a chat tokenizer


def add_chat_tokens(tokenizer: Tokenizer) -> Tokenizer:
    """The chat tokenizer of a plain one: the role tokens appended as control tokens, at ids ``len(tokenizer)``,
    ``+1``, ``+2`` (``Tokenizer.with_control_tokens``). A model using it needs ``n_vocab >= len(tokenizer) + 3``.

    Raises:
        ValueError: the tokenizer already has (some of) the role tokens.
    """
    present = [token for token in ROLE_TOKENS.values() if token in tokenizer]
    if present:
        raise ValueError(f"tokenizer {tokenizer.path or '(from bytes)'} already has {present} (ids "
                         f"{[tokenizer[t] for t in present]}): it is a chat tokenizer as it is")
    return tokenizer.with_control_tokens(list(ROLE_TOKENS.values()))


def make_chat_tokenizer(path: str | os.PathLike, output: str | os.PathLike) -> Tokenizer:
    """Load the tokenizer at `path`, add the chat tokens and save it to `output` (atomically; never overwrites)."""
    chat = add_chat_tokens(Tokenizer.load(path))
    chat.save(output)
    return chat


def extends(tokenizer: Tokenizer, content_hash: str | None) -> bool:
    """Whether `tokenizer` is the tokenizer with `content_hash`, or that tokenizer with the chat tokens added by
    ``add_chat_tokens``: a model trained with the latter may start from one trained with the former (ids below
    ``len`` of the base mean the same)."""
    if not content_hash:
        return False
    if tokenizer.content_hash == content_hash:
        return True
    proto = tokenizer.model_proto
    return proto.endswith(_CHAT_SUFFIX) and (
        hashlib.sha256(proto[:-len(_CHAT_SUFFIX)]).hexdigest()[:16] == content_hash)


# what add_chat_tokens appends to a model file's bytes
_CHAT_SUFFIX = b"".join(_control_piece(token) for token in ROLE_TOKENS.values())
