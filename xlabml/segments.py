"""Consecutive segments for segment recurrence (Transformer-XL memory, ``xlabml.memory``).

A split's documents, each ``<sos> ids <eos>``, form one token stream (as packed windows do). The stream is cut
into ``rows * world_size`` rows of equal length (Transformer-XL's batchify); batch ``i`` holds, for each row, the
``i``-th segment of ``seq_len`` tokens of that row, so a row's segment continues its segment of the step before
and the memory a model keeps between steps is the row's previous tokens. Every target of the stream is in
exactly one segment; the rows' last segments are padded.

An item is a whole batch (the loader takes ``batch_size=None``): LongTensors ``x``, ``y``, ``positions``,
``doc_ids`` of shape ``(rows, seq_len)`` and a bool ``reset`` of shape ``(rows,)``, True where a row's stream
starts (the first step of a pass). ``doc_ids`` are the documents' numbers in the split (the same across
segments, so a memory sees only its own document's tokens), padding ``-2``; ``positions`` restart at each
document start and at each segment start, as in packed windows (a model with memory numbers tokens itself).
The target after a document's ``<eos>`` is ``pad_index`` unless ``train_sos``.

Resuming is exact through the loader's sampler (``ResumableSampler`` without shuffling): the batch order is
fixed, so the position in it is the whole state.
"""
from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Dataset

from xlabml.datasets import TokenDataset, packed_item

PAD_DOC = -2  # document id of padding: never a document's (>= 0) nor an empty memory slot's (-1)


class SegmentDataset(Dataset):
    """Batches of consecutive segments of each row of the split's token stream (see the module doc).

    Args:
        tokens: the split's token ids.
        seq_len: tokens per segment.
        rows: rows per batch (per process).
        rank, world_size: this process's rows are rows ``rank * rows ..`` of ``rows * world_size`` in all.
    """

    def __init__(self, tokens: TokenDataset, seq_len: int, rows: int, sos_index: int = 1, eos_index: int = 2,
                 pad_index: int = 3, train_sos: bool = False, rank: int = 0, world_size: int = 1):
        if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 1:
            raise ValueError(f"seq_len={seq_len!r}: expected an int >= 1")
        if not isinstance(rows, int) or rows < 1:
            raise ValueError(f"rows={rows!r}: expected an int >= 1 (the batch size)")
        if len(tokens) == 0:
            raise ValueError("SegmentDataset: no documents")
        self.tokens, self.seq_len, self.rows = tokens, seq_len, rows
        self.sos_index, self.eos_index, self.pad_index, self.train_sos = sos_index, eos_index, pad_index, train_sos
        self.doc_starts = np.zeros(len(tokens) + 1, dtype=np.int64)
        np.cumsum(tokens.lengths + 2, out=self.doc_starts[1:])
        self.targets = int(self.doc_starts[-1]) - 1  # every stream token but the first is a target once
        total_rows = rows * world_size
        self.row_len = -(-self.targets // total_rows)  # targets per row (the last rows may have fewer)
        self.first_row = rank * rows
        self._len = max(1, -(-self.row_len // seq_len))

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        index = int(index)
        if not 0 <= index < self._len:
            raise IndexError(f"segment {index} out of range for {self._len} steps")
        items = [self._row(self.first_row + r, index) for r in range(self.rows)]
        batch = {key: torch.stack([item[key] for item in items]) for key in items[0]}
        batch["reset"] = torch.full((self.rows,), index == 0, dtype=torch.bool)
        return batch

    def _row(self, row: int, step: int) -> dict[str, torch.Tensor]:
        """Segment ``step`` of stream row ``row``: inputs at stream positions ``start .. stop - 1`` and their
        targets (one more token), padded to ``seq_len``."""
        start = row * self.row_len + step * self.seq_len
        end = min((row + 1) * self.row_len, self.targets)  # the row's last input position + 1
        stop = min(start + self.seq_len, end)
        if stop <= start:
            return self._padding()
        where = np.arange(start, stop + 1, dtype=np.int64)  # inputs and the last target
        doc = np.searchsorted(self.doc_starts, where, side="right") - 1
        local = where - self.doc_starts[doc]  # position inside <sos> ids <eos>
        is_sos, is_eos = local == 0, local == self.tokens.lengths[doc] + 1
        body = ~(is_sos | is_eos)
        tokens = np.empty(len(where), dtype=np.int64)
        tokens[is_sos], tokens[is_eos] = self.sos_index, self.eos_index
        tokens[body] = self.tokens.gather(doc[body], local[body] - 1)
        item = packed_item(tokens, local, doc, self.seq_len, self.pad_index, self.train_sos)
        n = len(where) - 1  # real inputs (the last token is only a target)
        item["x"][n:] = self.pad_index
        doc_ids = np.full(self.seq_len, PAD_DOC, dtype=np.int64)
        doc_ids[:n] = doc[:n]
        item["doc_ids"] = torch.from_numpy(doc_ids)
        return item

    def _padding(self) -> dict[str, torch.Tensor]:
        pad = torch.full((self.seq_len,), self.pad_index, dtype=torch.long)
        return {"x": pad, "y": pad.clone(), "positions": torch.arange(self.seq_len),
                "doc_ids": torch.full((self.seq_len,), PAD_DOC, dtype=torch.long)}
