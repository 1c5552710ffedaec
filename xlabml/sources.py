"""Text sources -> documents -> splits, on Hugging Face ``datasets``: the first stage of ``xlabml.datasets``.

- :func:`load_source` / :func:`load_locations`: a data source (``datasets.load_dataset`` arguments, a file path
  or glob, or ``{builtin: python-docs}``) becomes a ``datasets.Dataset`` of documents with one ``text`` column,
  or, with ``streaming: true``, a ``datasets.IterableDataset`` read as it is consumed (corpora bigger than the
  disk).
- :func:`load_splits`: the documents shared out into train/val/test/predict splits (ratios, counts, or each
  split from its own sources), empty documents skipped. Streamed documents are shared out by a hash of their
  text (``xlabml.streaming.TextStream``).
- :func:`sample_documents`: a seeded random subset of a split's documents within a byte budget (what the
  tokenizer trains on).
"""
from __future__ import annotations

import glob
import logging
import os
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import datasets
import numpy as np
import pyarrow.compute as pc

if TYPE_CHECKING:
    from xlabml.streaming import TextStream

log = logging.getLogger(__name__)

SPLIT_NAMES = ("train", "val", "test", "predict")
DEFAULT_SPLITS = {"train": 0.9, "val": 0.05, "test": 0.025, "predict": 0}
BUILDER_BY_EXTENSION = {
    ".txt": "text", ".text": "text", ".md": "text", ".rst": "text",
    ".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv", ".arrow": "arrow",
}
ARROW_BATCH = 16384  # rows per Arrow batch when scanning a column


# ---------------------------------------------------------------------------------------------- sources

def load_source(source: str | Mapping[str, Any]) -> datasets.Dataset | datasets.IterableDataset:
    """Load one data source as a dataset of documents with a single ``text`` column.

    Args:
        source: a local file path or glob (builder chosen by extension: text, json, parquet, csv, arrow), or
            ``{"builtin": NAME}`` for a built-in corpus, or a dict of ``datasets.load_dataset`` keyword arguments
            (``path``, ``name``, ``split``, ``data_files``, ``revision``, ``trust_remote_code``, ``sample_by``
            for text files, ...) plus ``column`` (the text column, default ``"text"``, renamed to ``text``)
            and ``drop_columns`` (default true: keep only the text column). ``streaming: true`` streams the
            source instead of downloading and converting it first.
    Returns: a ``datasets.Dataset``, or with ``streaming: true`` a ``datasets.IterableDataset`` (its shards
        kept: each file is one); a ``DatasetDict`` (no ``split`` given) is flattened by concatenating its splits.
    """
    if isinstance(source, (str, os.PathLike)):
        source = {"data_files": os.fspath(source)}
    if not isinstance(source, Mapping):
        raise ValueError(f"data source {source!r}: expected a file path or a dict of datasets.load_dataset "
                         "arguments (or {builtin: NAME})")
    kwargs = dict(source)
    column = kwargs.pop("column", "text")
    drop_columns = kwargs.pop("drop_columns", True)
    if "builtin" in kwargs:
        name = kwargs.pop("builtin")
        streaming = kwargs.pop("streaming", False)
        if kwargs:
            raise ValueError(f"data source {dict(source)!r}: a built-in corpus takes only 'column', "
                             f"'drop_columns' and 'streaming', not {sorted(kwargs)}")
        from xlabml.corpus import BUILTIN_CORPORA, load_builtin_corpus
        if name not in BUILTIN_CORPORA:
            raise ValueError(f"data source {dict(source)!r}: unknown built-in corpus {name!r}; "
                             f"expected one of {sorted(BUILTIN_CORPORA)}")
        dataset = load_builtin_corpus(name)
        if streaming:  # e.g. to try a streamed setup offline: a few shards of contiguous documents
            dataset = dataset.to_iterable_dataset(num_shards=min(len(dataset), 8))
    else:
        _resolve_local_files(kwargs, source)
        try:
            dataset = datasets.load_dataset(**kwargs)
        except FileNotFoundError as e:
            raise FileNotFoundError(f"data source {dict(source)!r}: {e}") from e
        except ConnectionError as e:
            raise ConnectionError(f"data source {dict(source)!r} needs the network: {e}") from e
        except datasets.exceptions.DatasetGenerationError as e:
            raise ValueError(f"data source {dict(source)!r} could not be read: {e.__cause__ or e}") from e
    if isinstance(dataset, (datasets.IterableDataset, datasets.IterableDatasetDict)):
        return _text_stream_source(dataset, column, drop_columns, source)
    if isinstance(dataset, datasets.DatasetDict):
        if not dataset:
            raise ValueError(f"data source {dict(source)!r} has no splits")
        parts = list(dataset.values())
        dataset = parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)
    if column not in dataset.column_names:
        raise ValueError(f"data source {dict(source)!r}: text column {column!r} not found; "
                         f"the source has columns {dataset.column_names} (set 'column')")
    feature = dataset.features[column]
    if not (isinstance(feature, datasets.Value) and feature.dtype in ("string", "large_string")):
        raise ValueError(f"data source {dict(source)!r}: column {column!r} holds {feature}, expected text")
    if drop_columns:
        dataset = dataset.select_columns([column])
    if column != "text":
        if "text" in dataset.column_names:
            dataset = dataset.remove_columns("text")
        dataset = dataset.rename_column(column, "text")
    if len(dataset) == 0:
        raise ValueError(f"data source {dict(source)!r} has no documents")
    return dataset


def _text_stream_source(dataset, column: str, drop_columns: bool, source: Mapping) -> datasets.IterableDataset:
    """A streamed source with its text column as ``text`` (checked now when the stream declares its features)."""
    if isinstance(dataset, datasets.IterableDatasetDict):
        if not dataset:
            raise ValueError(f"data source {dict(source)!r} has no splits")
        parts = list(dataset.values())
        dataset = parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)
    features = dataset.features
    if features is not None:  # text files and some hub streams declare none: checked when read
        if column not in features:
            raise ValueError(f"data source {dict(source)!r}: text column {column!r} not found; "
                             f"the source has columns {list(features)} (set 'column')")
        feature = features[column]
        if not (isinstance(feature, datasets.Value) and feature.dtype in ("string", "large_string")):
            raise ValueError(f"data source {dict(source)!r}: column {column!r} holds {feature}, expected text")
    if drop_columns:
        dataset = dataset.select_columns([column])
    if column != "text":
        if features is not None and "text" in features and not drop_columns:
            dataset = dataset.remove_columns("text")
        dataset = dataset.rename_column(column, "text")
    return dataset


def _resolve_local_files(kwargs: dict, source: Mapping) -> None:
    """Turn a local file `path` into (builder, data_files); check that local data files exist."""
    path = kwargs.get("path")
    if path is not None:
        expanded = os.path.expanduser(os.fspath(path))
        if os.path.isfile(expanded):
            if kwargs.get("data_files") is not None:
                raise ValueError(f"data source {dict(source)!r}: 'path' is a file, so 'data_files' must not be set")
            kwargs["path"], kwargs["data_files"] = _builder_for(expanded, source), expanded
        elif not os.path.exists(expanded) and _looks_like_path(path):
            raise FileNotFoundError(f"data source {dict(source)!r}: path {path!r} does not exist")
    elif kwargs.get("data_files") is None:
        raise ValueError(f"data source {dict(source)!r}: expected 'path', 'data_files' or 'builtin'")
    data_files = kwargs.get("data_files")
    if data_files is None or kwargs.get("path") not in (None, *set(BUILDER_BY_EXTENSION.values())):
        return  # hub dataset or directory: load_dataset resolves its own files
    patterns = _flatten_patterns(data_files)
    resolved = []
    for pattern in patterns:
        if "://" in pattern:
            resolved.append(pattern)
            continue
        expanded = os.path.expanduser(pattern)
        if glob.has_magic(expanded):
            if not glob.glob(expanded, recursive=True):
                raise FileNotFoundError(f"data source {dict(source)!r}: no file matches {pattern!r}")
        elif not os.path.isfile(expanded):
            raise FileNotFoundError(f"data source {dict(source)!r}: data file {pattern!r} does not exist")
        resolved.append(expanded)
    local = [f for p in resolved if "://" not in p for f in glob.glob(p, recursive=True)]
    if local and len(local) == len(resolved) and all(os.path.getsize(f) == 0 for f in local):
        raise ValueError(f"data source {dict(source)!r} has no documents: its files are empty")
    if kwargs.get("path") is None:
        kwargs["path"] = _builder_for(resolved[0], source)
    kwargs["data_files"] = _map_patterns(data_files, os.path.expanduser)


def _flatten_patterns(data_files) -> list[str]:
    if isinstance(data_files, (str, os.PathLike)):
        return [os.fspath(data_files)]
    if isinstance(data_files, Mapping):
        return [p for v in data_files.values() for p in _flatten_patterns(v)]
    return [p for v in data_files for p in _flatten_patterns(v)]


def _map_patterns(data_files, fn):
    if isinstance(data_files, (str, os.PathLike)):
        return fn(os.fspath(data_files))
    if isinstance(data_files, Mapping):
        return {k: _map_patterns(v, fn) for k, v in data_files.items()}
    return [_map_patterns(v, fn) for v in data_files]


def _builder_for(path: str, source: Mapping) -> str:
    name = path[:-3] if path.endswith(".gz") else path
    extension = os.path.splitext(name)[1].lower()
    if extension not in BUILDER_BY_EXTENSION:
        raise ValueError(f"data source {dict(source)!r}: cannot tell the format of {path!r}; set 'path' to one of "
                         f"{sorted(set(BUILDER_BY_EXTENSION.values()))}")
    return BUILDER_BY_EXTENSION[extension]


def _looks_like_path(path) -> bool:
    """A local path (not a hub dataset id such as ``wikimedia/wikipedia``)."""
    path = os.fspath(path)
    return (path.startswith(("/", "./", "../", "~"))
            or os.path.splitext(path[:-3] if path.endswith(".gz") else path)[1].lower() in BUILDER_BY_EXTENSION)


def _as_source_list(locations) -> list:
    if locations is None:
        return []
    if isinstance(locations, (str, os.PathLike, Mapping)):
        return [locations]
    return list(locations)


def load_locations(locations) -> datasets.Dataset | datasets.IterableDataset:
    """Load and concatenate one source or a list of sources (see :func:`load_source`).

    If any source is streamed the result is a stream: the other sources are read from their Arrow files as
    one more shard each, after the streamed ones' shards.
    """
    sources = _as_source_list(locations)
    if not sources:
        raise ValueError(f"data locations {locations!r}: expected at least one data source")
    parts = [load_source(source) for source in sources]
    if len(parts) == 1:
        return parts[0]
    if any(isinstance(p, datasets.IterableDataset) for p in parts):
        parts = [p if isinstance(p, datasets.IterableDataset) else p.select_columns(["text"]).to_iterable_dataset()
                 for p in parts]
        return datasets.concatenate_datasets([p.select_columns(["text"]) for p in parts])
    common = [c for c in parts[0].column_names if all(c in p.column_names for p in parts[1:])]
    return datasets.concatenate_datasets([p.select_columns(common) for p in parts])


def text_lengths(dataset: datasets.Dataset, column: str = "text") -> np.ndarray:
    """Length in characters of every document, read column-wise from Arrow (int64 array)."""
    chunks = [pc.fill_null(pc.utf8_length(batch[column]), 0).to_numpy(zero_copy_only=False)
              for batch in dataset.with_format("arrow").iter(batch_size=ARROW_BATCH)]
    return np.concatenate(chunks).astype(np.int64) if chunks else np.zeros(0, np.int64)


def sample_documents(dataset: datasets.Dataset, max_bytes: int, seed: int = 42) -> np.ndarray:
    """Indices (ascending) of a seeded random subset of the documents whose texts total at most `max_bytes`.

    Documents are taken in a seeded random order until the next one would pass the budget, so the sample is
    spread over the whole dataset, not taken from its head; every document when they all fit. Only the Arrow
    offsets are read to size the documents.
    """
    chunks = [pc.fill_null(pc.binary_length(batch["text"]), 0).to_numpy(zero_copy_only=False)
              for batch in dataset.with_format("arrow").iter(batch_size=ARROW_BATCH)]
    sizes = np.concatenate(chunks).astype(np.int64) if chunks else np.zeros(0, np.int64)
    if sizes.sum() <= max_bytes:
        return np.arange(len(sizes))
    order = np.random.default_rng(seed).permutation(len(sizes))
    count = int(np.searchsorted(np.cumsum(sizes[order]), max_bytes, side="right"))
    return np.sort(order[:count])


def _nonempty(dataset: datasets.Dataset) -> np.ndarray:
    chunks = [pc.fill_null(pc.binary_length(batch["text"]), 0).to_numpy(zero_copy_only=False) > 0
              for batch in dataset.with_format("arrow").iter(batch_size=ARROW_BATCH)]
    mask = np.concatenate(chunks) if chunks else np.zeros(0, bool)
    return np.flatnonzero(mask)


# ----------------------------------------------------------------------------------------------- splits

def _is_count_or_ratio(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def load_splits(locations, splits: Mapping[str, Any] | None = None, seed: int = 42, load=None
                ) -> tuple[dict[str, datasets.Dataset | TextStream], dict[str, Any]]:
    """Documents of each split, and a report of how the documents were shared out.

    Args:
        locations: the sources that numeric splits share out (see :func:`load_locations`); may be ``None``
            when every split names its own source.
        splits: split name (``train``, ``val``, ``test``, ``predict``) → either a float ratio of the
            documents of `locations`, an int count of them, ``0`` for "the remainder" (at most one split), or
            its own source / list of sources (e.g. a held-out file for ``val``). Documents are shuffled with
            `seed` before they are shared out; within a split they keep their source order. Splits not named
            are absent. Default: ``{train: 0.9, val: 0.05, test: 0.025, predict: 0}``.

    Streamed `locations` (a source with ``streaming: true``) cannot be counted or shuffled up front: each
    split is then a :class:`~xlabml.streaming.TextStream` of the documents whose text hashes (keyed by `seed`)
    into the split's share of ``[0, 1)``, so every rank, worker and run agrees on it; only ratios (and ``0``)
    are allowed. A split given as its own streamed source is that whole stream.
    `load` reads one source or a list of them into a dataset with a ``text`` column (default
    :func:`load_locations`; ``xlabml.posttrain`` passes one that reads chats or preference pairs).
    Returns: ``(splits_by_name, report)``; the report counts ``documents`` (in `locations`), ``empty``
        (empty documents, skipped), the documents of each split and ``unused`` ones; for streamed locations it
        holds each split's share (float) and the ``unused`` share, and ``"stream"`` for a streamed split source.
    """
    splits = dict(DEFAULT_SPLITS if splits is None else splits)
    unknown = sorted(set(splits) - set(SPLIT_NAMES))
    if unknown:
        raise ValueError(f"splits {splits!r}: unknown split names {unknown}; expected some of {list(SPLIT_NAMES)}")
    numeric = {k: v for k, v in splits.items() if _is_count_or_ratio(v)}
    explicit = {k: v for k, v in splits.items() if k not in numeric}
    for name, value in numeric.items():
        if value < 0 or isinstance(value, float) and value > 1:
            raise ValueError(f"splits.{name}={value!r}: expected a ratio in [0, 1], a document count >= 0, "
                             "or a data source")
    zeros = [k for k, v in numeric.items() if v == 0]
    if len(zeros) > 1:
        raise ValueError(f"splits {splits!r}: only one split may be 0 (the remainder), got {zeros}")
    ratio_sum = sum(v for v in numeric.values() if isinstance(v, float))
    if ratio_sum > 1 + 1e-9:
        ratios = {k: v for k, v in numeric.items() if isinstance(v, float)}
        raise ValueError(f"splits {ratios!r}: ratios sum to {ratio_sum:.6g}, past 1")

    load = load or load_locations
    result: dict[str, datasets.Dataset | TextStream] = {}
    report: dict[str, Any] = {}
    documents = None
    if numeric:
        if not _as_source_list(locations):
            raise ValueError(f"splits {splits!r}: numeric splits share out the documents of 'locations', "
                             "but no locations are given")
        documents = load(locations)
    if isinstance(documents, datasets.IterableDataset):
        result, report = _hash_splits(documents, numeric, seed)
    elif numeric:
        kept = _nonempty(documents)
        n = len(kept)
        report.update(documents=len(documents), empty=len(documents) - n)
        if n == 0:
            raise ValueError(f"data locations {locations!r}: every document is empty")
        wanted = sum(v * n if isinstance(v, float) else v for v in numeric.values())
        if wanted > n + 1e-6:
            raise ValueError(f"splits {numeric!r} need {wanted:.6g} documents, "
                             f"but the locations hold {n} non-empty documents")
        counts = {k: (v if isinstance(v, int) else round(v * n)) for k, v in numeric.items() if v != 0}
        excess = sum(counts.values()) - n
        floats = sorted((k for k in counts if isinstance(numeric[k], float)), key=lambda k: -counts[k])
        for k in floats[:max(0, excess)]:  # rounding overshoot (at most one per ratio): trim the largest
            counts[k] -= 1
        remainder = n - sum(counts.values())
        if zeros:
            counts[zeros[0]] = remainder
            remainder = 0
        order = np.random.default_rng(seed).permutation(kept)
        start = 0
        for name in SPLIT_NAMES:
            if name in counts:
                indices = np.sort(order[start:start + counts[name]])
                start += counts[name]
                whole = len(indices) == len(documents)  # every document, in order: keep the fingerprint
                result[name] = documents if whole else documents.select(indices)
                report[name] = counts[name]
        report["unused"] = remainder
    for name, source in explicit.items():
        dataset = load(source)
        if isinstance(dataset, datasets.IterableDataset):
            from xlabml.streaming import TextStream  # (xlabml.streaming builds on this module)
            result[name], report[name] = TextStream(dataset, seed=seed), "stream"
            continue
        kept = _nonempty(dataset)
        if len(kept) < len(dataset):
            report["empty"] = report.get("empty", 0) + len(dataset) - len(kept)
            dataset = dataset.select(kept)
        result[name] = dataset
        report[name] = len(dataset)
    log.debug(format_split_report(report))
    return {k: result[k] for k in SPLIT_NAMES if k in result}, report


def _hash_splits(documents: datasets.IterableDataset, numeric: Mapping[str, int | float], seed: int
                 ) -> tuple[dict[str, TextStream], dict[str, Any]]:
    """Numeric splits of a stream: consecutive shares of the hash range ``[0, 1)``, in SPLIT_NAMES order."""
    counts = {k: v for k, v in numeric.items() if isinstance(v, int) and v > 0}
    if counts:
        raise ValueError(f"splits {counts!r}: a document count cannot be taken from streamed locations "
                         "(streaming: true), whose size is unknown until read to the end; give each split a "
                         "ratio of the documents instead, e.g. {train: 0.99, val: 0.01}")
    from xlabml.streaming import TextStream  # (xlabml.streaming builds on this module)
    shares = {k: float(v) for k, v in numeric.items() if v != 0}
    for k in (k for k, v in numeric.items() if v == 0):  # the remainder
        shares[k] = max(0.0, 1.0 - sum(shares.values()))
    result, report, low = {}, {}, 0.0
    for name in SPLIT_NAMES:
        if name in shares:
            result[name] = TextStream(documents, low, low + shares[name], seed)
            report[name] = shares[name]
            low += shares[name]
    report["unused"] = max(0.0, round(1.0 - low, 12))
    return result, report


def format_split_report(report: Mapping[str, Any]) -> str:
    """One line describing a :func:`load_splits` report."""
    if any(isinstance(report.get(k), float) for k in SPLIT_NAMES):
        shares = ", ".join(f"{k} {report[k]:.4g}" for k in SPLIT_NAMES if isinstance(report.get(k), float))
        streams = [k for k in SPLIT_NAMES if report.get(k) == "stream"]
        return (f"data: streamed documents shared out by a hash of their text: {shares} (unused "
                f"{report['unused']:.4g})" + (f"; streamed from their own sources: {', '.join(streams)}"
                                              if streams else ""))
    shares = ", ".join(f"{k} {report[k]}" for k in SPLIT_NAMES if k in report)
    message = f"data: documents per split: {shares}"
    if "documents" in report:
        message += (f" (of {report['documents']} documents in locations; {report['empty']} empty skipped; "
                    f"{report['unused']} unused)")
    elif report.get("empty"):
        message += f" ({report['empty']} empty skipped)"
    return message
