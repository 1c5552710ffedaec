"""Preference data for DPO: (prompt, chosen, rejected) rows → pairs of padded sequences, targets the responses.

Each row is rendered twice (``xlabml.posttrain.records.render_pair``): the prompt followed by the chosen
response, and by the rejected one, through the chat template or as plain text. The encodings (full sequences,
``<sos>`` to the response's ``<eos>``, and their trained flags) are cached on disk like ``TokenDataset``'s.
``PreferenceDataset`` gives one pair per row, each sequence in one padded window of ``seq_len`` targets: a pair
whose longer sequence does not fit (more than ``seq_len + 1`` tokens) is left out, with one warning counting
them (and an error when none fit), because a cut response would change what the preference is about.
"""
from __future__ import annotations

import json

import datasets
import numpy as np
import pyarrow.compute as pc
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch.utils.data import Dataset

from xlabml.chat import template_of
from xlabml.datasets import _FlatColumn, padded_item
from xlabml.posttrain.records import RecordEncoder, encode_records, render_pair

_CACHE_VERSION = "xlab-preference-ids-1"
SIDES = ("chosen", "rejected")


class _EncodePairs(RecordEncoder):
    """Batch encoder of normalized preference examples."""

    def __call__(self, texts: list[str]) -> dict:
        tokenizer = self.tokenizer
        template = template_of(tokenizer)
        out = {f"{side}_{column}": [] for side in SIDES for column in ("ids", "trained")}
        for text in texts:
            example = json.loads(text)
            for side in SIDES:
                rendered = render_pair(example["prompt"], example[side], example.get("system"), tokenizer, template)
                out[f"{side}_ids"].append(rendered.ids)
                out[f"{side}_trained"].append(rendered.targets)
        return out


def encode_pairs(texts: datasets.Dataset, tokenizer, num_proc: int = 1, cache_dir: str | None = None,
                 batch_size: int = 1000) -> datasets.Dataset:
    """``chosen_ids``, ``chosen_trained``, ``rejected_ids``, ``rejected_trained`` of every preference example
    (normalized: ``xlabml.posttrain.records.load_examples``), cached on disk."""
    ids, flags = datasets.List(datasets.Value("int32")), datasets.List(datasets.Value("int8"))
    features = datasets.Features({f"{side}_{c}": ids if c == "ids" else flags
                                  for side in SIDES for c in ("ids", "trained")})
    return encode_records(texts, tokenizer, _EncodePairs, features, "preference pairs", "pairs", _CACHE_VERSION,
                          num_proc=num_proc, cache_dir=cache_dir, batch_size=batch_size)


class PreferenceDataset(Dataset):
    """One item per preference pair that fits a window: ``chosen_x``, ``chosen_y``, ``rejected_x``,
    ``rejected_y``, LongTensors of shape ``(seq_len,)`` (padded windows; ``y`` is ``pad_index`` wherever the
    target is not a token of the response or its ``<eos>``).

    Attributes: ``rows`` (int64 array: the encoded rows kept, in order), ``dropped`` (how many did not fit).
    """

    def __init__(self, data: datasets.Dataset, seq_len: int, pad_index: int = 3, name: str = "preference"):
        if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 1:
            raise ValueError(f"seq_len={seq_len!r}: expected an int >= 1")
        self.data, self.seq_len, self.pad_index = data, seq_len, pad_index
        longest = np.zeros(len(data), dtype=np.int64)
        for side in SIDES:
            lengths = np.concatenate([pc.list_value_length(b[f"{side}_ids"]).to_numpy(zero_copy_only=False)
                                      for b in data.with_format("arrow").iter(batch_size=16384)])
            longest = np.maximum(longest, lengths)
        self.rows = np.flatnonzero(longest <= seq_len + 1)
        self.dropped = len(data) - len(self.rows)
        if len(self.rows) == 0:
            raise ValueError(f"{name} split: none of its {len(data)} preference pairs fits data.seq_len={seq_len} "
                             f"(the shortest needs {int(longest.min()) - 1} targets): raise data.seq_len")
        if self.dropped:
            rank_zero_warn(f"{name} split: {self.dropped} of {len(data)} preference pairs are longer than "
                           f"data.seq_len={seq_len} targets and are left out (the longest needs "
                           f"{int(longest.max()) - 1})")
        self._columns = None

    def __getstate__(self):
        return {**self.__dict__, "_columns": None}

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        index = int(index)
        if not 0 <= index < len(self.rows):
            raise IndexError(f"pair {index} out of range for {len(self.rows)} pairs")
        if self._columns is None:
            self._columns = {name: _FlatColumn(self.data, name) for name in self.data.column_names}
        row = int(self.rows[index])
        item = {}
        for side in SIDES:
            ids_column, flags_column = self._columns[f"{side}_ids"], self._columns[f"{side}_trained"]
            ids = _row(ids_column, row)
            trained = _row(flags_column, row).astype(bool)
            window = padded_item(ids, self.seq_len, self.pad_index)
            keep = np.zeros(self.seq_len, dtype=bool)
            keep[:len(ids) - 1] = trained[1:]
            window["y"][torch.from_numpy(~keep)] = self.pad_index
            item[f"{side}_x"], item[f"{side}_y"] = window["x"], window["y"]
        return item


def _row(column: _FlatColumn, row: int) -> np.ndarray:
    """All values of one row of a list column (int64)."""
    chunk = int(np.searchsorted(column.row_starts, row, side="right")) - 1
    offsets = column.offsets[chunk]
    local = row - column.row_starts[chunk]
    return column.values[chunk][offsets[local]:offsets[local + 1]].astype(np.int64)
