"""Data sources, splits and windows: exact values on toy token lists and small local files."""
import json

import datasets
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from xlabml.datasets import (SequenceDataset, TokenDataset, load_locations, load_source, load_splits,
                             resolve_step, text_lengths, warmup_length)

SOS, EOS, PAD = 1, 2, 3


def toy_docs(lengths):
    """Documents with distinct token ids (>= 4), so every target can be traced back to its place."""
    docs, next_id = [], 4
    for n in lengths:
        docs.append(list(range(next_id, next_id + n)))
        next_id += n
    return docs


def windows(dataset):
    return [{k: v.tolist() for k, v in dataset[i].items()} for i in range(len(dataset))]


# ------------------------------------------------------------------------------------------ padded windows

def test_padded_windows_exact():
    docs = toy_docs([3, 1, 0, 7])
    ds = SequenceDataset(TokenDataset.from_ids(docs), seq_len=4, packed=False)
    assert windows(ds) == [
        {"x": [1, 4, 5, 6], "y": [4, 5, 6, 2]},
        {"x": [1, 7, 2, 3], "y": [7, 2, 3, 3]},
        {"x": [1, 2, 3, 3], "y": [2, 3, 3, 3]},
        {"x": [1, 8, 9, 10], "y": [8, 9, 10, 11]},
        {"x": [11, 12, 13, 14], "y": [12, 13, 14, 2]},
    ]
    assert ds.doc_index.tolist() == [0, 1, 2, 3, 3]
    assert ds.starts.tolist() == [0, 0, 0, 0, 4]
    assert ds.doc_index.dtype == np.int64 and ds.starts.dtype == np.int64


def test_padded_overlapping_windows():
    # 10 ids -> 12 tokens, 11 targets; seq_len 4, step 2: starts 0, 2, 4, 6, 8 (the last covers target 11)
    ds = SequenceDataset(TokenDataset.from_ids(toy_docs([10])), seq_len=4, step_size=0.5)
    assert ds.starts.tolist() == [0, 2, 4, 6, 8]
    assert windows(ds)[-1] == {"x": [11, 12, 13, 2], "y": [12, 13, 2, 3]}
    assert windows(ds)[1] == {"x": [5, 6, 7, 8], "y": [6, 7, 8, 9]}
    assert SequenceDataset(TokenDataset.from_ids(toy_docs([10])), seq_len=4, step_size=3).starts.tolist() == [0, 3, 6, 9]


# ------------------------------------------------------------------------------------------ packed windows

def test_packed_windows_exact():
    docs = toy_docs([3, 1, 0, 7])  # stream: 1 4 5 6 2 | 1 7 2 | 1 2 | 1 8 9 10 11 12 13 14 2   (20 tokens)
    ds = SequenceDataset(TokenDataset.from_ids(docs), seq_len=4, packed=True)
    assert windows(ds) == [
        {"x": [1, 4, 5, 6], "y": [4, 5, 6, 2], "positions": [0, 1, 2, 3], "doc_ids": [0, 0, 0, 0]},
        {"x": [2, 1, 7, 2], "y": [3, 7, 2, 3], "positions": [0, 0, 1, 2], "doc_ids": [0, 1, 1, 1]},
        {"x": [1, 2, 1, 8], "y": [2, 3, 8, 9], "positions": [0, 1, 0, 1], "doc_ids": [0, 0, 1, 1]},
        {"x": [9, 10, 11, 12], "y": [10, 11, 12, 13], "positions": [0, 1, 2, 3], "doc_ids": [0, 0, 0, 0]},
        {"x": [13, 14, 2, 3], "y": [14, 2, 3, 3], "positions": [0, 1, 2, 0], "doc_ids": [0, 0, 0, 1]},
    ]


def test_packed_train_sos_keeps_the_next_documents_sos_as_target():
    ds = SequenceDataset(TokenDataset.from_ids(toy_docs([3, 1, 0, 7])), seq_len=4, packed=True, train_sos=True)
    assert windows(ds)[1]["y"] == [1, 7, 2, 1]
    assert windows(ds)[2]["y"] == [2, 1, 8, 9]


def reference_packed(docs, seq_len, step, train_sos):
    """Straightforward per-token construction of packed windows, to compare against."""
    stream, doc_of, pos_in_doc = [], [], []
    for d, ids in enumerate(docs):
        tokens = [SOS, *ids, EOS]
        stream += tokens
        doc_of += [d] * len(tokens)
        pos_in_doc += list(range(len(tokens)))
    out, start = [], 0
    while True:
        w = list(range(start, min(start + seq_len + 1, len(stream))))
        m, first_doc = len(w), doc_of[w[0]]
        tok = [stream[p] for p in w] + [PAD] * (seq_len + 1 - m)
        doc = [doc_of[p] - first_doc for p in w] + [doc_of[w[-1]] - first_doc + 1] * (seq_len + 1 - m)
        pos = [min(pos_in_doc[p], k) for k, p in enumerate(w)] + list(range(seq_len + 1 - m))
        sos = [pos_in_doc[p] == 0 for p in w] + [False] * (seq_len + 1 - m)
        y = [PAD if sos[k + 1] and not train_sos else tok[k + 1] for k in range(seq_len)]
        out.append({"x": tok[:seq_len], "y": y, "positions": pos[:seq_len], "doc_ids": doc[:seq_len]})
        if w[-1] >= len(stream) - 1:
            return out
        start += step


@settings(max_examples=150, deadline=None)
@given(lengths=st.lists(st.integers(0, 12), min_size=1, max_size=8), seq_len=st.integers(1, 9),
       step_fraction=st.sampled_from([1.0, 0.5, 0.25]), train_sos=st.booleans())
def test_packed_matches_reference(lengths, seq_len, step_fraction, train_sos):
    docs = toy_docs(lengths)
    ds = SequenceDataset(TokenDataset.from_ids(docs), seq_len=seq_len, step_size=step_fraction, packed=True,
                         train_sos=train_sos)
    assert windows(ds) == reference_packed(docs, seq_len, resolve_step(step_fraction, seq_len), train_sos)


# ------------------------------------------------------------------------------------------ exact accounting

def assert_exact_accounting(docs, seq_len, packed):
    """With step == seq_len, the targets of one epoch are each document's tokens + one <eos>, exactly once."""
    ds = SequenceDataset(TokenDataset.from_ids(docs), seq_len=seq_len, step_size=seq_len, packed=packed)
    seen = {}
    for i in range(len(ds)):
        item = ds[i]
        x, y = item["x"].tolist(), item["y"].tolist()
        assert len(x) == len(y) == seq_len
        for j, target in enumerate(y):
            if target == PAD:
                continue
            assert target != SOS
            if target == EOS:  # attribute an <eos> to the document of its input token
                doc = (int(ds.doc_index[i]) if not packed
                       else int(np.searchsorted(ds.doc_starts, i * seq_len + j, side="right")) - 1)
                seen.setdefault(("eos", doc), 0)
                seen[("eos", doc)] += 1
            else:
                seen.setdefault(target, 0)
                seen[target] += 1
    expected = {t: 1 for ids in docs for t in ids} | {("eos", d): 1 for d in range(len(docs))}
    assert seen == expected
    total_targets = sum(len(ids) + 1 for ids in docs)
    n_real = sum(int((ds[i]["y"] != PAD).sum()) for i in range(len(ds)))
    assert n_real == total_targets


@pytest.mark.parametrize("packed", [False, True])
def test_exact_accounting_fixed(packed):
    assert_exact_accounting(toy_docs([0, 1, 2, 3, 4, 5, 15, 16, 17, 31, 32, 33]), seq_len=16, packed=packed)


@settings(max_examples=120, deadline=None)
@given(data=st.data(), seq_len=st.integers(1, 12), packed=st.booleans())
def test_exact_accounting_property(data, seq_len, packed):
    # document lengths around multiples of the window size, where off-by-one errors live
    around = st.integers(-3, 3).flatmap(lambda d: st.integers(0, 3).map(lambda k: max(0, k * seq_len + d)))
    lengths = data.draw(st.lists(around, min_size=1, max_size=10))
    assert_exact_accounting(toy_docs(lengths), seq_len, packed)


def test_packed_windows_are_full_except_the_last():
    docs = toy_docs([5, 9, 2, 30, 1])
    ds = SequenceDataset(TokenDataset.from_ids(docs), seq_len=8, packed=True)
    stream_len = sum(n + 2 for n in [5, 9, 2, 30, 1])
    assert len(ds) == -(-(stream_len - 1) // 8)
    for i in range(len(ds) - 1):
        assert PAD not in ds[i]["x"].tolist()


# ------------------------------------------------------------------------------------------ argument checks

@pytest.mark.parametrize("seq_len", [0, -3, 2.5])
def test_bad_seq_len(seq_len):
    with pytest.raises(ValueError, match=f"seq_len={seq_len!r}"):
        SequenceDataset(TokenDataset.from_ids([[5]]), seq_len=seq_len)


@pytest.mark.parametrize("step", [0.0, 1.5, 0, 17, "half"])
def test_bad_step_size(step):
    with pytest.raises(ValueError, match="step_size="):
        resolve_step(step, 16)


def test_step_resolution():
    assert resolve_step(1.0, 16) == 16 and resolve_step(0.5, 16) == 8 and resolve_step(5, 16) == 5
    assert resolve_step(0.01, 16) == 1


# ------------------------------------------------------------------------------------------ token access

def test_token_dataset_reads_slices_across_chunks():
    part1 = TokenDataset.from_ids([[4, 5, 6], [7]]).data
    part2 = TokenDataset.from_ids([[8, 9], [], [10, 11, 12, 13]]).data
    tokens = TokenDataset.from_ids(datasets.concatenate_datasets([part1, part2]))
    assert tokens.lengths.tolist() == [3, 1, 2, 0, 4]
    assert [tokens[i].tolist() for i in range(5)] == [[4, 5, 6], [7], [8, 9], [], [10, 11, 12, 13]]
    assert tokens.ids(4, 1, 3).tolist() == [11, 12]
    assert tokens.num_tokens == 10
    docs = [[4, 5, 6], [7], [8, 9], [], [10, 11, 12, 13]]
    for seq_len in (3, 5, 20):  # packed windows that gather across the two Arrow chunks
        ds = SequenceDataset(tokens, seq_len=seq_len, packed=True)
        assert windows(ds) == reference_packed(docs, seq_len, seq_len, False)


# ------------------------------------------------------------------------------------------ sources

@pytest.fixture
def files(tmp_path):
    (tmp_path / "lines.txt").write_text("alpha one\nbeta two\n\ngamma three\n")
    (tmp_path / "paras.txt").write_text("p1 line a\np1 line b\n\np2 line a\n\n\np3\n")
    (tmp_path / "docs.jsonl").write_text("\n".join(json.dumps({"body": f"doc {i}", "n": i}) for i in range(5)))
    (tmp_path / "docs.csv").write_text("id,content\n1,first row\n2,second row\n")
    datasets.Dataset.from_dict({"text": ["pq a", "pq b", "pq c"]}).to_parquet(str(tmp_path / "docs.parquet"))
    (tmp_path / "empty.txt").write_text("")
    return tmp_path


def test_local_text_by_line_and_paragraph(files):
    lines = load_source({"path": "text", "data_files": str(files / "lines.txt")})
    assert lines["text"] == ["alpha one", "beta two", "", "gamma three"]
    paras = load_source({"path": "text", "data_files": str(files / "paras.txt"), "sample_by": "paragraph"})
    assert [t.strip() for t in paras["text"]] == ["p1 line a\np1 line b", "p2 line a", "p3"]
    document = load_source({"path": str(files / "paras.txt"), "sample_by": "document"})
    assert document["text"] == [(files / "paras.txt").read_text()]


def test_json_column_renamed_and_other_columns_dropped(files):
    ds = load_source({"data_files": str(files / "docs.jsonl"), "column": "body"})
    assert ds.column_names == ["text"] and ds["text"] == [f"doc {i}" for i in range(5)]
    kept = load_source({"path": "json", "data_files": str(files / "docs.jsonl"), "column": "body",
                        "drop_columns": False})
    assert sorted(kept.column_names) == ["n", "text"]


def test_csv_parquet_and_path_shorthand(files):
    assert load_source({"path": "csv", "data_files": str(files / "docs.csv"), "column": "content"})["text"] == [
        "first row", "second row"]
    assert load_source(str(files / "docs.parquet"))["text"] == ["pq a", "pq b", "pq c"]


def test_dataset_dict_is_flattened_and_sources_concatenated(files):
    dd = load_source({"path": "text", "data_files": {"a": str(files / "lines.txt"), "b": str(files / "paras.txt")}})
    assert len(dd) == 4 + 7
    both = load_locations([str(files / "docs.parquet"),
                           {"data_files": str(files / "docs.jsonl"), "column": "body"}])
    assert both["text"] == ["pq a", "pq b", "pq c"] + [f"doc {i}" for i in range(5)]


def test_builtin_corpus_source():
    ds = load_source({"builtin": "python-topics"})
    assert ds.column_names == ["text"] and len(ds) > 50
    with pytest.raises(ValueError, match="'no-such-corpus'"):
        load_source({"builtin": "no-such-corpus"})


def test_missing_files(files):
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        load_source({"path": "text", "data_files": str(files / "nope.txt")})
    with pytest.raises(FileNotFoundError, match=r"\*.nothing"):
        load_source({"path": "text", "data_files": str(files / "*.nothing")})
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        load_source(str(files / "missing.jsonl"))
    with pytest.raises(FileNotFoundError, match="gone.txt"):
        load_source({"path": "./gone.txt"})


def test_empty_source(files):
    with pytest.raises(ValueError, match="empty.txt.*has no documents"):
        load_source({"path": "text", "data_files": str(files / "empty.txt")})


def test_missing_text_column_names_it(files):
    with pytest.raises(ValueError, match=r"text column 'text' not found.*\['id', 'content'\]"):
        load_source({"path": "csv", "data_files": str(files / "docs.csv")})
    with pytest.raises(ValueError, match="'n' holds"):
        load_source({"data_files": str(files / "docs.jsonl"), "column": "n"})
    with pytest.raises(ValueError, match="expected at least one data source"):
        load_locations([])


# ------------------------------------------------------------------------------------------ splits

@pytest.fixture
def numbered(tmp_path):
    path = tmp_path / "numbered.txt"
    path.write_text("".join(f"doc {i}\n" for i in range(200)))
    return str(path)


def split_ids(splits):
    return {k: sorted(int(t.split()[1]) for t in v["text"]) for k, v in splits.items()}


def test_ratio_splits_sizes_disjoint_and_deterministic(numbered):
    splits, report = load_splits(numbered, seed=7)
    assert {k: len(v) for k, v in splits.items()} == {"train": 180, "val": 10, "test": 5, "predict": 5}
    assert report == {"documents": 200, "empty": 0, "train": 180, "val": 10, "test": 5, "predict": 5, "unused": 0}
    ids = split_ids(splits)
    assert sorted(sum(ids.values(), [])) == list(range(200))
    assert split_ids(load_splits(numbered, seed=7)[0]) == ids
    assert split_ids(load_splits(numbered, seed=8)[0])["val"] != ids["val"]
    # within a split, documents keep their source order
    assert [int(t.split()[1]) for t in splits["val"]["text"]] == ids["val"]


def test_counts_remainder_and_unused(numbered):
    splits, report = load_splits(numbered, {"train": 0.5, "val": 20, "test": 0.1})
    assert {k: len(v) for k, v in splits.items()} == {"train": 100, "val": 20, "test": 20}
    assert report["unused"] == 60
    splits, report = load_splits(numbered, {"train": 0, "val": 3})
    assert {k: len(v) for k, v in splits.items()} == {"train": 197, "val": 3} and report["unused"] == 0


def test_rounding_never_overshoots(tmp_path):
    path = tmp_path / "seven.txt"
    path.write_text("".join(f"doc {i}\n" for i in range(7)))
    splits, report = load_splits(str(path), {"train": 0.5, "val": 0.5})  # 3.5 + 3.5 rounds to 4 + 4
    assert len(splits["train"]) + len(splits["val"]) == 7 and report["unused"] == 0


def test_empty_documents_are_skipped_and_counted(files):
    splits, report = load_splits(str(files / "lines.txt"), {"train": 0})
    assert splits["train"]["text"] == ["alpha one", "beta two", "gamma three"]
    assert report["empty"] == 1 and report["documents"] == 4


def test_explicit_split_sources(numbered, tmp_path):
    held = tmp_path / "held.txt"
    held.write_text("held a\nheld b\n")
    splits, report = load_splits(numbered, {"train": 0, "val": {"path": "text", "data_files": str(held)},
                                            "test": str(held)})
    assert len(splits["train"]) == 200 and splits["val"]["text"] == ["held a", "held b"]
    assert splits["test"]["text"] == ["held a", "held b"] and report["val"] == 2
    only_sources, _ = load_splits(None, {"train": str(held), "val": str(held)})
    assert len(only_sources["train"]) == 2


@pytest.mark.parametrize("splits, match", [
    ({"train": 0.9, "val": 0.2}, r"ratios sum to 1\.1, past 1"),
    ({"train": 0, "val": 0}, r"only one split may be 0.*\['train', 'val'\]"),
    ({"train": 150, "val": 100}, "need 250 documents, but the locations hold 200"),
    ({"train": 0.5, "val": 101}, "need 201 documents, but the locations hold 200"),
    ({"train": 1.5}, r"splits.train=1.5"),
    ({"train": -1}, r"splits.train=-1"),
    ({"training": 0.9}, r"unknown split names \['training'\]"),
])
def test_bad_splits(numbered, splits, match):
    with pytest.raises(ValueError, match=match):
        load_splits(numbered, splits)


def test_numeric_splits_need_locations():
    with pytest.raises(ValueError, match="no locations"):
        load_splits(None, {"train": 0.9})


def test_text_lengths_counts_characters():
    ds = datasets.Dataset.from_dict({"text": ["abc", "", "héllo", None]})
    assert text_lengths(ds).tolist() == [3, 0, 5, 0]


def test_hub_dataset_offline_is_a_clear_error():
    with pytest.raises(ConnectionError, match="'wikimedia/wikipedia'.*needs the network"):
        load_source({"path": "wikimedia/wikipedia", "name": "20231101.en", "split": "train"})


# ------------------------------------------------------------------------------------------ streamed sources

def test_streamed_source_keeps_its_shards_and_names_the_text_column(files):
    stream = load_source({"data_files": str(files / "docs.jsonl"), "column": "body", "streaming": True})
    assert isinstance(stream, datasets.IterableDataset) and stream.num_shards == 1
    assert [row["text"] for row in stream] == [f"doc {i}" for i in range(5)] and list(stream.features) == ["text"]
    with pytest.raises(ValueError, match=r"text column 'text' not found; the source has columns \['body', 'n'\]"):
        load_source({"data_files": str(files / "docs.jsonl"), "streaming": True})
    mixed = load_locations([{"data_files": str(files / "docs.jsonl"), "column": "body", "streaming": True},
                            str(files / "docs.parquet")])  # a local file joins the stream as one more shard
    assert isinstance(mixed, datasets.IterableDataset) and mixed.num_shards == 2
    assert [row["text"] for row in mixed] == [f"doc {i}" for i in range(5)] + ["pq a", "pq b", "pq c"]
    builtin = load_source({"builtin": "python-topics", "streaming": True})
    assert builtin.num_shards == 8 and next(iter(builtin))["text"] == load_source({"builtin": "python-topics"})[0]["text"]


def test_a_split_from_its_own_streamed_source(numbered, files):
    from xlabml.streaming import TextStream
    splits, report = load_splits(numbered, {"train": 0.8, "val": {"data_files": str(files / "docs.jsonl"),
                                                                  "column": "body", "streaming": True}})
    assert isinstance(splits["val"], TextStream) and splits["val"].head(10) == [f"doc {i}" for i in range(5)]
    assert report["val"] == "stream" and report["train"] == 160 and len(splits["train"]) == 160


def test_sample_documents_is_bounded_spread_and_seeded(numbered):
    from xlabml.sources import sample_documents
    documents = load_source(numbered)
    sizes = [len(t.encode()) for t in documents["text"]]
    budget = sum(sizes) // 5
    indices = sample_documents(documents, budget, seed=3)
    assert budget - max(sizes) < sum(sizes[i] for i in indices) <= budget
    assert list(indices) == sorted(indices) and indices[0] < 20 and indices[-1] >= 180  # not the head
    assert np.array_equal(sample_documents(documents, budget, seed=3), indices)
    assert not np.array_equal(sample_documents(documents, budget, seed=4), indices)
    assert list(sample_documents(documents, sum(sizes), seed=3)) == list(range(200))  # all fit: all


def test_warmup_length_stated_example():
    lengths = [warmup_length(step, 64, 16, 600) for step in range(700)]
    assert lengths == [16] * 200 + [32] * 200 + [48] * 200 + [64] * 100
    assert [warmup_length(s, 64, 16, 0) for s in (0, 5)] == [64, 64]  # no warmup
    assert warmup_length(0, 64, 64, 100) == 64  # start at full length: nothing to grow


@given(seq_len=st.integers(1, 300), start=st.integers(1, 300), steps=st.integers(1, 500))
def test_warmup_length_grows_in_stages_to_seq_len(seq_len, start, steps):
    start = min(start, seq_len)
    lengths = [warmup_length(step, seq_len, start, steps) for step in range(steps + 3)]
    assert lengths[0] == start and lengths[steps:] == [seq_len] * 3
    assert all(a <= b for a, b in zip(lengths, lengths[1:]))  # never shrinks
    assert all(n == seq_len or (n % start == 0 and start <= n < seq_len) for n in lengths)  # stages of start
