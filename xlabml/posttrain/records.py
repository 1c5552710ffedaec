"""Chat and preference files → checked, normalized examples → token ids with their trained targets.

A source is a file path or glob (``.jsonl``/``.json``, ``.parquet``, ``.csv``, ``.arrow``) or a dict of
``datasets.load_dataset`` arguments, plus ``columns`` (``{our name: the file's name}``, e.g.
``{messages: conversations}``). Rows:

- chat (``data.format: chat``, SFT): ``messages: [{role, content}, ...]`` (roles ``system``, ``user``,
  ``assistant``; every assistant message is trained), or ``prompt`` and ``response`` (or ``completion``), each a
  string or a list of messages, with an optional ``system`` string (only the response is trained).
- preference (``data.format: preference``, DPO): ``prompt``, ``chosen``, ``rejected``, each a string or a list
  of messages (``system`` optional); or ``chosen`` and ``rejected`` alone, as whole conversations that share
  every message but their last replies (the shared messages are the prompt).

Every row is checked when the file is read: a row without an assistant reply, an empty response, identical
chosen and rejected responses, an unknown role or column gives one error naming the file and the row (1-based).
A checked row is stored as one JSON string in a ``text`` column, so splitting, shuffling and caching work as for
text (``xlabml.sources.load_splits``).

Rendering (``render_example``, ``render_pair``) needs the tokenizer: rows of messages go through the chat
template (``xlabml.chat``), which the tokenizer must hold; string prompt/response rows go through the template
when the tokenizer holds one (as a user message and the assistant's reply), else as plain text
(``xlabml.chat.render_plain``).
"""
from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from typing import Any

import datasets

from xlabml.chat import ChatTemplate, Rendered, check_messages, render_plain
from xlabml.datasets import TokenizerWorker
from xlabml.sources import _as_source_list, _resolve_local_files

FORMATS = ("chat", "preference")
_RESPONSE_COLUMNS = ("response", "completion")


# ---------------------------------------------------------------------------------------------------------------
# reading


def load_examples(locations, format: str) -> datasets.Dataset:
    """Read one source or a list of them (concatenated) into checked examples (a ``text`` column of JSON).

    Args:
        locations: source(s) as in the module docstring.
        format: ``chat`` or ``preference``.
    Raises:
        FileNotFoundError: a file is missing. ValueError: a bad source or row (one line naming it).
    """
    if format not in FORMATS:
        raise ValueError(f"format {format!r}: expected one of {list(FORMATS)}")
    sources = _as_source_list(locations)
    if not sources:
        raise ValueError(f"data locations {locations!r}: expected at least one data source")
    parts = [_examples(source, format) for source in sources]
    return parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)


def _examples(source, format: str) -> datasets.Dataset:
    if isinstance(source, (str, os.PathLike)):
        source = {"data_files": os.fspath(source)}
    if not isinstance(source, Mapping):
        raise ValueError(f"data source {source!r}: expected a file path or a dict of datasets.load_dataset arguments")
    kwargs = dict(source)
    columns = kwargs.pop("columns", None) or {}
    name = _source_name(source)
    if kwargs.pop("streaming", False):
        raise ValueError(f"data source {name}: {format} data cannot be streamed (streaming: true); it is read and "
                         "checked whole")
    if "builtin" in kwargs or "column" in kwargs:
        raise ValueError(f"data source {name}: {format} data is read from files of records (JSON Lines, Parquet, "
                         "...); 'builtin' and 'column' are for text")
    _resolve_local_files(kwargs, source)
    if kwargs.get("path") == "text":
        raise ValueError(f"data source {name}: a text file holds no {format} records; expected JSON Lines, JSON, "
                         "Parquet, CSV or Arrow")
    try:
        dataset = datasets.load_dataset(**kwargs)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"data source {name}: {e}") from e
    except datasets.exceptions.DatasetGenerationError as e:
        raise ValueError(f"data source {name} could not be read: {e.__cause__ or e}") from e
    if isinstance(dataset, datasets.DatasetDict):
        parts = list(dataset.values())
        if not parts:
            raise ValueError(f"data source {name} has no splits")
        dataset = parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)
    if not isinstance(columns, Mapping):
        raise ValueError(f"data source {name}: columns={columns!r}: expected a mapping {{our name: the file's name}}")
    for ours, theirs in columns.items():
        if theirs not in dataset.column_names:
            raise ValueError(f"data source {name}: columns maps {ours!r} to {theirs!r}, which is not a column; "
                             f"the source has {dataset.column_names}")
    dataset = dataset.rename_columns({theirs: ours for ours, theirs in columns.items() if theirs != ours})
    if len(dataset) == 0:
        raise ValueError(f"data source {name} has no rows")
    _check_columns(dataset.column_names, format, name)
    return dataset.map(_Normalize(format, name), with_indices=True, batched=True,
                       remove_columns=dataset.column_names,
                       features=datasets.Features({"text": datasets.Value("string")}),
                       desc=f"Checking {len(dataset)} {format} rows")


def _source_name(source: Mapping) -> str:
    files = source.get("data_files") or source.get("path")
    return str(files) if isinstance(files, (str, os.PathLike)) else repr(dict(source))


def _check_columns(names: list[str], format: str, source: str) -> None:
    if format == "chat":
        if "messages" in names or "prompt" in names and any(c in names for c in _RESPONSE_COLUMNS):
            return
        expected = "'messages', or 'prompt' and 'response' (or 'completion')"
    else:
        if {"chosen", "rejected"} <= set(names):
            return
        expected = "'prompt', 'chosen' and 'rejected' (or 'chosen' and 'rejected' as whole conversations)"
    raise ValueError(f"data source {source}: {format} rows need columns {expected}; the source has {names} "
                     "(rename with columns: {our name: the file's name})")


class _Normalize:
    """Batch function: each row checked and written as one JSON string (picklable, for ``datasets.map``)."""

    def __init__(self, format: str, source: str):
        self.format, self.source = format, source

    def __call__(self, batch: dict[str, list], indices: list[int]) -> dict[str, list[str]]:
        normalize = normalize_chat if self.format == "chat" else normalize_preference
        keys = list(batch)
        texts = []
        for offset, index in enumerate(indices):
            row = {key: batch[key][offset] for key in keys}
            example = normalize(row, f"{self.source} row {index + 1}")
            texts.append(json.dumps(example, ensure_ascii=False, separators=(",", ":")))
        return {"text": texts}


# ---------------------------------------------------------------------------------------------------------------
# checking rows


def normalize_chat(row: Mapping[str, Any], where: str) -> dict[str, Any]:
    """A chat row checked and normalized: ``{"messages": [[role, content], ...]}`` or ``{"prompt": str | messages,
    "response": str | messages, "system": str | None}``.

    Raises:
        ValueError: no assistant reply, an empty reply, a bad message (one line naming `where`).
    """
    if row.get("messages") is not None:
        messages = check_messages(row["messages"], where)
        _check_replies(messages, where, "a chat")
        return {"messages": [list(m) for m in messages]}
    response_column = next((c for c in _RESPONSE_COLUMNS if row.get(c) is not None), "response")
    prompt, response = row.get("prompt"), row.get(response_column)
    if prompt is None or response is None:
        raise ValueError(f"{where}: needs 'messages', or 'prompt' and '{response_column}'; got "
                         f"{sorted(k for k, v in row.items() if v is not None)}")
    system = _system(row, where)
    return {"prompt": _prompt(prompt, where), "response": _response(response, where, response_column),
            "system": system}


def normalize_preference(row: Mapping[str, Any], where: str) -> dict[str, Any]:
    """A preference row checked and normalized: ``{"prompt": str | messages, "chosen": str | messages,
    "rejected": str | messages, "system": str | None}``.

    Raises:
        ValueError: a missing or empty response, chosen equal to rejected, a bad message (one line naming `where`).
    """
    for column in ("chosen", "rejected"):
        if row.get(column) is None:
            raise ValueError(f"{where}: '{column}' is missing (a preference row needs 'prompt', 'chosen' and "
                             "'rejected')")
    prompt, chosen, rejected = row.get("prompt"), row["chosen"], row["rejected"]
    if prompt is None:  # implicit prompt: two whole conversations sharing all but their last replies
        if isinstance(chosen, str) or isinstance(rejected, str):
            raise ValueError(f"{where}: 'prompt' is missing; without it 'chosen' and 'rejected' must be whole "
                             "conversations (lists of messages) sharing the prompt")
        chosen, rejected = check_messages(chosen, f"{where} chosen"), check_messages(rejected, f"{where} rejected")
        shared = 0
        while shared < min(len(chosen), len(rejected)) and chosen[shared] == rejected[shared]:
            shared += 1
        while shared and chosen[shared - 1][0] == "assistant":  # the replies start after the last prompt turn
            shared -= 1
        if shared == 0:
            raise ValueError(f"{where}: 'prompt' is missing and 'chosen' and 'rejected' share no prompt message")
        prompt, chosen, rejected = chosen[:shared], chosen[shared:], rejected[shared:]
    example = {"prompt": _prompt(prompt, where), "chosen": _response(chosen, where, "chosen"),
               "rejected": _response(rejected, where, "rejected"), "system": _system(row, where)}
    if example["chosen"] == example["rejected"]:
        raise ValueError(f"{where}: 'chosen' and 'rejected' are the same response; a preference pair needs two "
                         "different ones")
    return example


def _prompt(prompt: Any, where: str) -> str | list[list[str]]:
    if isinstance(prompt, str):
        return prompt
    return [list(m) for m in check_messages(prompt, f"{where} prompt")]


def _response(response: Any, where: str, column: str) -> str | list[list[str]]:
    if isinstance(response, str):
        if not response:
            raise ValueError(f"{where}: '{column}' is empty; every response needs text to train on")
        return response
    messages = check_messages(response, f"{where} {column}")
    _check_replies(messages, where, f"'{column}'")
    return [list(m) for m in messages]


def _check_replies(messages: list[tuple[str, str]], where: str, what: str) -> None:
    replies = [i for i, (role, _) in enumerate(messages) if role == "assistant"]
    if not replies:
        raise ValueError(f"{where}: {what} has no assistant message; there is nothing to train on")
    for i in replies:
        if not messages[i][1]:
            raise ValueError(f"{where}: {what}'s assistant message {i} is empty; every reply needs text to train on")


def _system(row: Mapping[str, Any], where: str) -> str | None:
    system = row.get("system")
    if system is not None and not isinstance(system, str):
        raise ValueError(f"{where}: 'system' is {system!r:.80}; expected a string")
    return system or None


# ---------------------------------------------------------------------------------------------------------------
# rendering


def render_example(example: Mapping[str, Any], tokenizer, template: ChatTemplate | None) -> Rendered:
    """A normalized chat example as ids and trained targets (every assistant reply of ``messages``; only the
    response of a prompt/response pair)."""
    if "messages" in example:
        return _require(template, tokenizer).render(example["messages"])
    return render_pair(example["prompt"], example["response"], example.get("system"), tokenizer, template)


def render_pair(prompt, response, system: str | None, tokenizer, template: ChatTemplate | None) -> Rendered:
    """A prompt and a response (strings or message lists, normalized) as ids; targets: the response only.

    Strings go through the template when there is one, else they are plain text; messages need the template.
    """
    if isinstance(prompt, str) and isinstance(response, str) and template is None:
        if system:
            raise ValueError("a 'system' message needs a chat template: the tokenizer has none (add the chat tokens "
                             "with `./manage.py add-chat-tokens`)")
        return render_plain(tokenizer, prompt, response)
    template = _require(template, tokenizer)
    head = ([("system", system)] if system else []) + (
        [("user", prompt)] if isinstance(prompt, str) else [tuple(m) for m in prompt])
    tail = [("assistant", response)] if isinstance(response, str) else [tuple(m) for m in response]
    rendered = template.render(head + tail)
    prompt_length = len(template.render(head).ids)  # messages are encoded one by one: a prefix of the whole
    rendered.targets[:prompt_length] = [False] * prompt_length
    return rendered


def _require(template: ChatTemplate | None, tokenizer) -> ChatTemplate:
    return template if template is not None else ChatTemplate(tokenizer)  # raises, naming the fix


# ---------------------------------------------------------------------------------------------------------------
# encoding, cached on disk


class RecordEncoder(TokenizerWorker):
    """Base of the batch encoders of normalized examples given to ``datasets.map`` (the tokenizer rebuilt in each
    worker process: ``TokenizerWorker``). Subclasses define ``__call__(texts) -> columns``."""


def encode_records(texts: datasets.Dataset, tokenizer, encoder: type[RecordEncoder], features: datasets.Features,
                   kind: str, prefix: str, version: str, num_proc: int = 1, cache_dir: str | None = None,
                   batch_size: int = 1000) -> datasets.Dataset:
    """``texts`` (normalized examples, a ``text`` column) encoded by ``encoder`` into ``features``, cached on disk
    under a key of the texts' fingerprint, the tokenizer's content hash and ``version``; ``from_cache`` tells
    whether the cache had it. ``kind`` names the examples in messages, ``prefix`` the cache file."""
    from xlabml.datasets import _available_cpus, _cached_files

    cache_dir = os.path.expanduser(cache_dir or os.path.join(datasets.config.HF_DATASETS_CACHE, "xlabml"))
    os.makedirs(cache_dir, exist_ok=True)
    key = hashlib.sha256(f"{version}:{texts._fingerprint}:{tokenizer.content_hash}".encode()).hexdigest()[:24]
    cache_file = os.path.join(cache_dir, f"{prefix}-{key}.arrow")
    num_proc = max(1, min(int(num_proc or 1), len(texts)))
    cached = _cached_files(cache_file)
    if cached is not None:
        parts = [datasets.Dataset.from_file(f) for f in cached]
        data = parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)
    else:
        data = texts.map(
            encoder(tokenizer.model_proto, num_threads=max(1, _available_cpus() // num_proc)),
            input_columns="text", batched=True, batch_size=batch_size, num_proc=num_proc if num_proc > 1 else None,
            remove_columns=texts.column_names, features=features, cache_file_name=cache_file, new_fingerprint=key,
            desc=f"Encoding {len(texts)} {kind}")
    if len(data) != len(texts):
        raise RuntimeError(f"cached encoding {cache_file} has {len(data)} rows for {len(texts)} {kind}; delete it")
    data.from_cache = cached is not None
    return data
