"""Text sources → documents → token ids → training windows, on Hugging Face ``datasets``.

Every stage is an Arrow dataset (memory-mapped, fingerprinted, cached); nothing here loads a corpus into
Python lists. The stages:

- :func:`load_locations` / :func:`load_splits` (in ``xlabml.sources``, re-exported here): data sources (``datasets.load_dataset`` arguments, a file
  path, or ``{builtin: python-docs}``) become one ``datasets.Dataset`` of documents per split, with a single
  ``text`` column.
- :class:`TokenDataset`: the token ids of every document of a split (``Dataset.map`` into an ``ids`` column,
  cached on disk under a key that includes a hash of the tokenizer model), or only their lengths when
  encoding on the fly.
- :class:`SequenceDataset`: training windows of ``seq_len + 1`` tokens over ``<sos> + ids + <eos>`` of each
  document, padded (one document per window) or packed (documents concatenated, with position and
  document ids so that attention stays inside a document).
"""
from __future__ import annotations

import glob
import hashlib
import logging
import os
from collections import OrderedDict
from collections.abc import Sequence

import datasets
import numpy as np
import pyarrow.compute as pc
import torch
from torch.utils.data import Dataset

from xlabml.sources import (  # noqa: F401  (re-exported: the whole pipeline from one module)
    ARROW_BATCH, BUILDER_BY_EXTENSION, DEFAULT_SPLITS, SPLIT_NAMES, format_split_report, load_locations, load_source,
    load_splits, text_lengths,
)

log = logging.getLogger(__name__)

# Bump when the cached encoding's layout changes, so old caches are not reused.
_CACHE_VERSION = "xlab-tokens-1"


# --------------------------------------------------------------------------------------------- encoding

def _available_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


class TokenizerWorker:
    """A picklable holder of a tokenizer for ``datasets.map`` workers: the tokenizer is rebuilt from its model bytes
    in each worker process (a SentencePiece processor does not pickle), on first use.

    `num_threads` caps SentencePiece's batch threads, so that `num_proc` processes share the CPUs instead of
    each starting one thread per CPU.
    """

    def __init__(self, model_proto: bytes, num_threads: int | None = None):
        self.model_proto, self.num_threads, self._tokenizer = model_proto, num_threads, None

    def __getstate__(self):
        return {**self.__dict__, "_tokenizer": None}

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            from xlabml.tokenizer import Tokenizer
            self._tokenizer = Tokenizer.load(self.model_proto, num_threads=self.num_threads)
        return self._tokenizer


class _Encode(TokenizerWorker):
    """Batch encoder of documents: their ids, or only their lengths."""

    def __init__(self, model_proto: bytes, lengths_only: bool = False, num_threads: int | None = None):
        super().__init__(model_proto, num_threads)
        self.lengths_only = lengths_only

    def __call__(self, texts: list[str]) -> dict:
        ids = self.tokenizer.encode(list(texts))
        if self.lengths_only:
            return {"length": np.fromiter(map(len, ids), dtype=np.int32, count=len(ids))}
        return {"ids": ids}


class TokenDataset(Dataset):
    """Token ids of every document of a text dataset, encoded once and cached on disk.

    ``Dataset.map(batched=True, num_proc=num_proc)`` writes an ``ids`` column (int32) to
    ``cache_dir/ids-<key>.arrow``, where the key hashes the text dataset's fingerprint and the tokenizer
    model, so a second run with the same data and tokenizer reuses the file and a different tokenizer file
    gets a new one (the key does not depend on ``num_proc``). With ``dynamic=True`` only the token count of each
    document is cached (a ``length`` column) and documents are encoded from ``texts`` when a window needs them.

    Attributes: ``data`` (the Arrow dataset), ``lengths`` (int64 array of token counts per document),
    ``from_cache`` (whether the encoding was read from the cache).
    Item ``i``: the token ids of document ``i`` (int64 numpy array).
    """

    def __init__(self, texts: datasets.Dataset, tokenizer, num_proc: int = 1, dynamic: bool = False,
                 cache_dir: str | None = None, batch_size: int = 1000):
        if "text" not in texts.column_names:
            raise ValueError(f"TokenDataset: expected a 'text' column, got columns {texts.column_names}")
        if len(texts) == 0:
            raise ValueError("TokenDataset: the text dataset has no documents")
        self.dynamic = dynamic
        self.model_proto = tokenizer.model_proto
        self.texts = texts if dynamic else None
        cache_dir = os.path.expanduser(cache_dir or os.path.join(datasets.config.HF_DATASETS_CACHE, "xlabml"))
        os.makedirs(cache_dir, exist_ok=True)
        kind = "lengths" if dynamic else "ids"
        key = hashlib.sha256(f"{_CACHE_VERSION}:{kind}:{texts._fingerprint}:{tokenizer.content_hash}"
                             .encode()).hexdigest()[:24]
        cache_file = os.path.join(cache_dir, f"{kind}-{key}.arrow")
        num_proc = max(1, min(int(num_proc or 1), len(texts)))
        cached = _cached_files(cache_file)
        self.from_cache = cached is not None
        if cached is not None:  # written by any earlier num_proc
            parts = [datasets.Dataset.from_file(f) for f in cached]
            self.data = parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)
        else:
            features = datasets.Features({"length": datasets.Value("int32")} if dynamic else
                                         {"ids": datasets.List(datasets.Value("int32"))})
            threads = max(1, _available_cpus() // num_proc)
            self.data = texts.map(
                _Encode(tokenizer.model_proto, lengths_only=dynamic, num_threads=threads), input_columns="text",
                batched=True, batch_size=batch_size, num_proc=num_proc if num_proc > 1 else None,
                remove_columns=texts.column_names, features=features, cache_file_name=cache_file, new_fingerprint=key,
                desc=f"Encoding {len(texts)} documents" + (" (lengths only)" if dynamic else ""),
            )
        if len(self.data) != len(texts):
            raise RuntimeError(f"cached encoding {cache_file} has {len(self.data)} rows for {len(texts)} documents; "
                               "delete it to encode again")
        self.lengths = self._read_lengths()
        self._flat = None
        self._encode = _Encode(tokenizer.model_proto) if dynamic else None
        self._recent: OrderedDict[int, np.ndarray] = OrderedDict()

    @classmethod
    def from_ids(cls, ids: Sequence[Sequence[int]] | datasets.Dataset) -> "TokenDataset":
        """A TokenDataset over given token ids (a list of lists, or a dataset with an ``ids`` column)."""
        self = cls.__new__(cls)
        if not isinstance(ids, datasets.Dataset):
            ids = datasets.Dataset.from_dict(
                {"ids": [list(doc) for doc in ids]},
                features=datasets.Features({"ids": datasets.List(datasets.Value("int32"))}))
        self.data, self.dynamic, self.model_proto, self.from_cache, self.texts = ids, False, None, False, None
        self.lengths = self._read_lengths()
        self._flat, self._encode, self._recent = None, None, OrderedDict()
        return self

    def _read_lengths(self) -> np.ndarray:
        if self.dynamic:
            chunks = [batch["length"].to_numpy(zero_copy_only=False)
                      for batch in self.data.with_format("arrow").iter(batch_size=ARROW_BATCH)]
        else:
            chunks = [pc.list_value_length(batch["ids"]).to_numpy(zero_copy_only=False)
                      for batch in self.data.with_format("arrow").iter(batch_size=ARROW_BATCH)]
        return np.concatenate(chunks).astype(np.int64) if chunks else np.zeros(0, np.int64)

    def __getstate__(self):  # worker processes rebuild their memory-mapped views
        state = dict(self.__dict__)
        state["_flat"], state["_recent"] = None, OrderedDict()
        return state

    def __len__(self) -> int:
        return len(self.lengths)

    def __getitem__(self, index: int) -> np.ndarray:
        return self.ids(int(index), 0, int(self.lengths[index]))

    @property
    def num_tokens(self) -> int:
        """Total number of token ids (without <sos>/<eos>)."""
        return int(self.lengths.sum())

    def ids(self, doc: int, start: int, stop: int) -> np.ndarray:
        """Token ids ``start:stop`` of document `doc` (int64 array), read without copying the document."""
        if self.dynamic:
            return self._encoded(doc)[start:stop].astype(np.int64)
        if self._flat is None:
            self._flat = _FlatColumn(self.data, "ids")
        return self._flat.slice(doc, start, stop)

    def gather(self, docs: np.ndarray, positions: np.ndarray) -> np.ndarray:
        """Token ``positions[k]`` of document ``docs[k]`` for every k (int64 array; `docs` non-decreasing)."""
        if not self.dynamic:
            if self._flat is None:
                self._flat = _FlatColumn(self.data, "ids")
            return self._flat.gather(docs, positions)
        out = np.empty(len(docs), dtype=np.int64)
        for doc in np.unique(docs):
            where = docs == doc
            out[where] = self._encoded(int(doc))[positions[where]]
        return out

    def _encoded(self, doc: int) -> np.ndarray:
        ids = self._recent.get(doc)
        if ids is None:
            ids = np.asarray(self._encode([self.texts[doc]["text"]])["ids"][0], dtype=np.int32)
            self._recent[doc] = ids
            if len(self._recent) > 64:  # neighbouring windows of one document reuse its encoding
                self._recent.popitem(last=False)
        return ids


def _cached_files(cache_file: str) -> list[str] | None:
    """The files of a finished encoding: one file, or every shard of a ``num_proc`` run (any ``num_proc``)."""
    if os.path.exists(cache_file):
        return [cache_file]
    stem, ext = os.path.splitext(cache_file)
    for first in sorted(glob.glob(f"{glob.escape(stem)}_00000_of_*{ext}")):
        count = first[len(stem) + len("_00000_of_"):-len(ext)]
        if count.isdigit():
            shards = [f"{stem}_{r:05d}_of_{int(count):05d}{ext}" for r in range(int(count))]
            if all(os.path.exists(f) for f in shards):
                return shards
    return None


class _FlatColumn:
    """Zero-copy numpy views of a memory-mapped list column: row → (values array, offset)."""

    def __init__(self, dataset: datasets.Dataset, column: str):
        if dataset._indices is not None:
            dataset = dataset.flatten_indices()
        chunks = dataset.data.table.column(column).chunks
        self.values, self.offsets, starts = [], [], [0]
        for chunk in chunks:
            offsets = np.asarray(chunk.offsets, dtype=np.int64)
            self.values.append(chunk.values.to_numpy(zero_copy_only=False))
            self.offsets.append(offsets)
            starts.append(starts[-1] + len(chunk))
        self.row_starts = np.asarray(starts, dtype=np.int64)

    def gather(self, rows: np.ndarray, positions: np.ndarray) -> np.ndarray:
        chunks = np.searchsorted(self.row_starts, rows, side="right") - 1
        if len(rows) == 0 or chunks[0] == chunks[-1]:  # the usual case: one chunk
            c = int(chunks[0]) if len(rows) else 0
            return self.values[c][self.offsets[c][rows - self.row_starts[c]] + positions].astype(np.int64)
        out = np.empty(len(rows), dtype=np.int64)
        for c in np.unique(chunks):
            where = chunks == c
            out[where] = self.values[c][self.offsets[c][rows[where] - self.row_starts[c]] + positions[where]]
        return out

    def slice(self, row: int, start: int, stop: int) -> np.ndarray:
        chunk = int(np.searchsorted(self.row_starts, row, side="right")) - 1
        base = self.offsets[chunk][row - self.row_starts[chunk]]
        return self.values[chunk][base + start:base + stop].astype(np.int64)


# -------------------------------------------------------------------------------------------- sequences

def resolve_step(step_size: float | int, seq_len: int) -> int:
    """Window step in tokens: a float is a fraction of `seq_len`, an int a token count."""
    if isinstance(step_size, bool) or not isinstance(step_size, (int, float)):
        raise ValueError(f"step_size={step_size!r}: expected a fraction of seq_len (float) or a token count (int)")
    if isinstance(step_size, float):
        if not 0 < step_size <= 1:
            raise ValueError(f"step_size={step_size!r}: a float step is a fraction of seq_len, expected (0, 1]")
        return max(1, round(step_size * seq_len))
    if not 1 <= step_size <= seq_len:
        raise ValueError(f"step_size={step_size!r}: an int step is a token count, expected 1..seq_len={seq_len}")
    return step_size


def warmup_length(step: int, seq_len: int, start: int, steps: int) -> int:
    """Window length at optimizer step ``step`` (0-based) of a sequence-length warmup: ``start`` tokens at step 0,
    growing linearly towards ``seq_len`` over ``steps`` steps in stages of ``start`` tokens
    (``start * floor((start + (seq_len - start) * step / steps) / start)``), and ``seq_len`` from step ``steps``
    on. E.g. ``seq_len=64, start=16, steps=600``: 16 for steps 0-199, 32 for 200-399, 48 for 400-599, then 64."""
    if step >= steps or start >= seq_len:
        return seq_len
    grown = start + (seq_len - start) * step / steps
    return min(seq_len, max(start, start * int(grown // start)))


def _num_windows(num_targets: np.ndarray, seq_len: int, step: int) -> np.ndarray:
    """Windows needed so that every one of `num_targets` targets is covered: 1 + ceil((n - seq_len) / step)."""
    return 1 + np.maximum(0, -(-(num_targets - seq_len) // step))


class SequenceDataset(Dataset):
    """Windows of ``seq_len + 1`` tokens over ``<sos> + ids + <eos>`` of each document.

    Item: a dict of LongTensors of shape ``(seq_len,)``: ``x`` (inputs) and ``y`` (targets, ``pad_index`` where
    no loss is taken); packed mode adds ``positions`` and ``doc_ids``.

    - padded (default): each window holds one document, starting at ``0, step, 2*step, ...`` until the
      document's last target is covered; a short window is filled with ``pad_index``. The dataset is an index
      of ``(document, start)`` pairs kept as two int64 arrays.
    - packed: the documents form one stream, cut into windows starting every ``step`` tokens; only the last
      window may be padded. ``doc_ids`` numbers the documents inside a window from 0 (padding is one more
      document) and ``positions`` count from 0 at each document start and at the window start. The target
      after a document's ``<eos>`` (the next document's ``<sos>``) is ``pad_index`` unless ``train_sos``.

    With ``step == seq_len`` one pass shows every token of every document once as a target, plus one ``<eos>``
    per document.
    """

    def __init__(self, tokens: TokenDataset, seq_len: int, step_size: float | int = 1.0, packed: bool = False,
                 train_sos: bool = False, sos_index: int = 1, eos_index: int = 2, pad_index: int = 3):
        if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 1:
            raise ValueError(f"seq_len={seq_len!r}: expected an int >= 1")
        if len(tokens) == 0:
            raise ValueError("SequenceDataset: no documents")
        self.tokens, self.seq_len, self.step = tokens, seq_len, resolve_step(step_size, seq_len)
        self.packed, self.train_sos = packed, train_sos
        self.sos_index, self.eos_index, self.pad_index = sos_index, eos_index, pad_index
        sizes = tokens.lengths + 2  # <sos> ids <eos>
        if packed:
            self.doc_starts = np.zeros(len(sizes) + 1, dtype=np.int64)
            np.cumsum(sizes, out=self.doc_starts[1:])
            self._len = int(_num_windows(np.int64(self.doc_starts[-1] - 1), seq_len, self.step))
        else:
            counts = _num_windows(sizes - 1, seq_len, self.step)
            self.doc_index = np.repeat(np.arange(len(sizes), dtype=np.int64), counts)
            first = np.cumsum(counts) - counts
            self.starts = (np.arange(len(self.doc_index), dtype=np.int64) - np.repeat(first, counts)) * self.step
            self._len = len(self.doc_index)

    def __len__(self) -> int:
        return self._len

    def _document(self, doc: int, start: int, stop: int) -> np.ndarray:
        """Tokens ``start:stop`` of ``<sos> + ids + <eos>`` of document `doc`."""
        n = int(self.tokens.lengths[doc])
        out = np.empty(stop - start, dtype=np.int64)
        lo, hi = max(start, 1), min(stop, n + 1)
        if hi > lo:
            out[lo - start:hi - start] = self.tokens.ids(doc, lo - 1, hi - 1)
        if start == 0:
            out[0] = self.sos_index
        if stop == n + 2:
            out[-1] = self.eos_index
        return out

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        index = int(index)
        if not 0 <= index < self._len:
            raise IndexError(f"window {index} out of range for {self._len} windows")
        size = self.seq_len + 1
        if not self.packed:
            doc, start = int(self.doc_index[index]), int(self.starts[index])
            stop = min(start + size, int(self.tokens.lengths[doc]) + 2)
            return padded_item(self._document(doc, start, stop), self.seq_len, self.pad_index)

        start = index * self.step
        stop = min(start + size, int(self.doc_starts[-1]))
        where = np.arange(start, stop, dtype=np.int64)  # stream positions of the window's real tokens
        doc = np.searchsorted(self.doc_starts, where, side="right") - 1
        local = where - self.doc_starts[doc]  # position inside <sos> ids <eos>
        is_sos, is_eos = local == 0, local == self.tokens.lengths[doc] + 1
        body = ~(is_sos | is_eos)
        tokens = np.empty(stop - start, dtype=np.int64)
        tokens[is_sos], tokens[is_eos] = self.sos_index, self.eos_index
        tokens[body] = self.tokens.gather(doc[body], local[body] - 1)
        return packed_item(tokens, local, doc, self.seq_len, self.pad_index, self.train_sos)


def padded_item(tokens: np.ndarray, seq_len: int, pad_index: int) -> dict[str, torch.Tensor]:
    """A padded window: `tokens` (at most ``seq_len + 1`` of one document) filled up with `pad_index`.

    Returns ``{"x", "y"}``, LongTensors of shape ``(seq_len,)``.
    """
    window = np.full(seq_len + 1, pad_index, dtype=np.int64)
    window[:len(tokens)] = tokens
    return {"x": torch.from_numpy(window[:-1].copy()), "y": torch.from_numpy(window[1:].copy())}


def packed_item(tokens: np.ndarray, local: np.ndarray, doc: np.ndarray, seq_len: int, pad_index: int,
                train_sos: bool = False) -> dict[str, torch.Tensor]:
    """A packed window from its ``n <= seq_len + 1`` real tokens (a stretch of the packed document stream).

    Args:
        tokens: the token ids, shape ``(n,)``.
        local: each token's position inside its document's ``<sos> ids <eos>`` (0 at ``<sos>``), shape ``(n,)``.
        doc: each token's document number (non-decreasing; only differences matter), shape ``(n,)``.
    Returns: ``{"x", "y", "positions", "doc_ids"}``, LongTensors of shape ``(seq_len,)`` (see SequenceDataset).
    """
    size, n = seq_len + 1, len(tokens)
    window = np.full(size, pad_index, dtype=np.int64)
    window[:n] = tokens
    doc_ids = np.empty(size, dtype=np.int64)
    doc_ids[:n] = doc - doc[0]
    doc_ids[n:] = doc[-1] - doc[0] + 1  # padding (last window only) is one more document
    positions = np.empty(size, dtype=np.int64)
    positions[:n] = np.minimum(local, np.arange(n))  # restart at document starts and at the window start
    positions[n:] = np.arange(size - n)
    targets = window[1:].copy()
    if not train_sos:
        targets[:n - 1][local[1:] == 0] = pad_index
    return {"x": torch.from_numpy(window[:-1].copy()), "y": torch.from_numpy(targets),
            "positions": torch.from_numpy(positions[:-1].copy()),
            "doc_ids": torch.from_numpy(doc_ids[:-1].copy())}
