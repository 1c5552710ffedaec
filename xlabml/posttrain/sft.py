"""Instruction tuning data: chats → token ids and trained targets → windows whose targets are the replies.

A chat is rendered (``xlabml.posttrain.records.render_example``) into ``<sos> body`` and stored as a document of
the pretraining pipeline: ``ids`` = the body without ``<sos>`` (and without the ``<eos>`` that ends a chat whose
last message is a reply, which ``SequenceDataset`` puts back), plus ``trained``: one flag for each position of
the window stream's ``body <eos>``, whether it is a target. So padded and packed windows (with positions and
document ids), strides and the resumable sampler are those of pretraining (``xlabml.datasets``);
``ChatSequenceDataset`` only sets ``y`` to ``pad`` at every target that is not a reply's token or a reply's
``<eos>``. Encodings are cached on disk like ``TokenDataset``'s, under a key of the examples, the tokenizer hash
and the encoding version.
"""
from __future__ import annotations

import json

import datasets
import numpy as np
import torch

from xlabml.chat import template_of
from xlabml.datasets import SequenceDataset, TokenDataset, _FlatColumn
from xlabml.posttrain.records import RecordEncoder, encode_records, render_example

_CACHE_VERSION = "xlab-chat-ids-1"


class _EncodeChats(RecordEncoder):
    """Batch encoder of normalized chat examples."""

    def __call__(self, texts: list[str]) -> dict:
        tokenizer = self.tokenizer
        template = template_of(tokenizer)
        eos = tokenizer[tokenizer.eos_token]
        ids, trained = [], []
        for text in texts:
            rendered = render_example(json.loads(text), tokenizer, template)
            body, flags = rendered.ids[1:], rendered.targets[1:]
            if body and body[-1] == eos and flags[-1]:  # the last reply's <eos> is the document's
                body = body[:-1]
            else:  # the document's <eos> follows a message that is not a reply: not a target
                flags = flags + [False]
            ids.append(body)
            trained.append(flags)
        return {"ids": ids, "trained": trained}


def encode_chats(texts: datasets.Dataset, tokenizer, num_proc: int = 1, cache_dir: str | None = None,
                 batch_size: int = 1000) -> TokenDataset:
    """Token ids (``ids``) and trained flags (``trained``) of every chat example, cached on disk.

    Args:
        texts: normalized chat examples (a ``text`` column of JSON: ``xlabml.posttrain.records.load_examples``).
        tokenizer: the tokenizer; its chat template renders the chats (required for rows of messages).
    Returns: a ``TokenDataset`` whose ``data`` also holds the ``trained`` column (``len(ids) + 1`` flags a row).
    """
    features = datasets.Features({"ids": datasets.List(datasets.Value("int32")),
                                  "trained": datasets.List(datasets.Value("int8"))})
    data = encode_records(texts, tokenizer, _EncodeChats, features, "chats", "chats", _CACHE_VERSION,
                          num_proc=num_proc, cache_dir=cache_dir, batch_size=batch_size)
    tokens = TokenDataset.from_ids(data)
    tokens.from_cache = data.from_cache
    return tokens


class ChatSequenceDataset(SequenceDataset):
    """``SequenceDataset`` windows of encoded chats (``encode_chats``) in which only reply tokens are targets.

    Items as ``SequenceDataset``'s (``x``, ``y``; packed: ``positions``, ``doc_ids``), with ``y = pad_index`` at
    every target that is not trained: the ``<sos>``, role tokens and contents of system and user messages, the
    role token that opens a reply, the next chat's ``<sos>`` in a packed window. ``train_sos`` does not apply.
    """

    def __init__(self, tokens: TokenDataset, seq_len: int, step_size: float | int = 1.0, packed: bool = False,
                 sos_index: int = 1, eos_index: int = 2, pad_index: int = 3):
        if "trained" not in tokens.data.column_names:
            raise ValueError("ChatSequenceDataset: the token dataset has no 'trained' column (use encode_chats)")
        super().__init__(tokens, seq_len, step_size, packed=packed, train_sos=False, sos_index=sos_index,
                         eos_index=eos_index, pad_index=pad_index)
        self._trained = None

    def __getstate__(self):
        return {**self.__dict__, "_trained": None}

    def target_places(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """(document, position in ``<sos> ids <eos>``) of each real target of window `index`, in window order."""
        size = self.seq_len + 1
        if not self.packed:
            doc, start = int(self.doc_index[index]), int(self.starts[index])
            stop = min(start + size, int(self.tokens.lengths[doc]) + 2)
            local = np.arange(start + 1, stop, dtype=np.int64)
            return np.full(len(local), doc, dtype=np.int64), local
        start = index * self.step
        stop = min(start + size, int(self.doc_starts[-1]))
        where = np.arange(start + 1, stop, dtype=np.int64)
        doc = np.searchsorted(self.doc_starts, where, side="right") - 1
        return doc, where - self.doc_starts[doc]

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        item = super().__getitem__(index)
        doc, local = self.target_places(int(index))
        if self._trained is None:
            self._trained = _FlatColumn(self.tokens.data, "trained")
        keep = np.zeros(self.seq_len, dtype=bool)
        inside = local > 0  # position 0 is a <sos>: never a target
        flags = np.zeros(len(local), dtype=bool)
        flags[inside] = self._trained.gather(doc[inside], local[inside] - 1) != 0
        keep[:len(local)] = flags
        item["y"][torch.from_numpy(~keep)] = self.pad_index
        return item
