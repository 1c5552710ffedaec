"""Streamed corpora: hash splits, shard plans, windows equal to SequenceDataset's, exact resume, sampling."""
import itertools
import json
from collections import Counter

import datasets
import pytest
import torch
from torchdata.stateful_dataloader import StatefulDataLoader

from xlabml.datasets import SequenceDataset, TokenDataset, load_source, load_splits
from xlabml.streaming import StreamLoader, StreamWindows, TextStream, hash_fraction, sample_stream, shard_plan
from xlabml.tokenizer import TokenizerTrainer

WORDS = "the quick brown fox jumps over a lazy dog while python code runs in loops".split()
PAD, EOS = 3, 2


def make_docs(n):
    """Distinct documents (each names its number) of 2 to ~60 words, so some span several windows."""
    return [f"doc {i} " + " ".join(WORDS[(i * 7 + j) % len(WORDS)] for j in range(1 + (i * 13) % 60))
            for i in range(n)]


DOCS = make_docs(240)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return TokenizerTrainer().train(DOCS, 300, tmp_path_factory.mktemp("tok") / "tok.model")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """DOCS in 6 JSONL files and in 2 Parquet files (row groups of 16), in order: file by file."""
    root = tmp_path_factory.mktemp("stream")
    for f in range(6):
        with open(root / f"part-{f}.jsonl", "w") as out:
            out.writelines(json.dumps({"text": d}) + "\n" for d in DOCS[f * 40:(f + 1) * 40])
    for f in range(2):
        datasets.Dataset.from_dict({"text": DOCS[f * 120:(f + 1) * 120]}).to_parquet(
            str(root / f"part-{f}.parquet"), batch_size=16)
    return {"json": {"path": "json", "data_files": str(root / "*.jsonl"), "streaming": True},
            "parquet": {"path": "parquet", "data_files": str(root / "*.parquet"), "streaming": True}}


def stream(corpus, kind="json", low=0.0, high=1.0, seed=42):
    return TextStream(load_source(corpus[kind]), low, high, seed)


def windows(tokenizer, text_stream, seq_len=8, step=1.0, packed=False, **kwargs):
    return StreamWindows(text_stream, tokenizer, seq_len, step, packed=packed, **kwargs)


def same(a, b):
    return len(a) == len(b) and all(a[i].keys() == b[i].keys() and all(torch.equal(a[i][k], b[i][k]) for k in a[i])
                                    for i in range(len(a)))


# ------------------------------------------------------------------------------------------ hash split, shards

def test_hash_fraction_is_a_fixed_function():
    # Splits of existing runs depend on these values: a change of hash would move documents between splits.
    assert hash_fraction("hello world", 42) == 0.5683751148470639
    assert hash_fraction("hello world", 43) == 0.5936491005829105
    assert 0 <= hash_fraction("\ud800 lone surrogate", 1) < 1  # any str hashes


def test_shard_plan_deals_whole_shards_then_strides_the_rest():
    plans = [shard_plan(6, 4, c) for c in range(4)]
    assert plans == [[(0, False), (4, True), (5, True)], [(1, False), (4, True), (5, True)],
                     [(2, False), (4, True), (5, True)], [(3, False), (4, True), (5, True)]]
    assert shard_plan(3, 4, 2) == [(0, True), (1, True), (2, True)]  # fewer shards than consumers: all strided
    assert shard_plan(8, 4, 1, order=[7, 6, 5, 4, 3, 2, 1, 0]) == [(6, False), (2, False)]


def test_hash_split_is_stable_follows_the_ratios_and_depends_on_the_seed(corpus):
    splits, report = load_splits(corpus["json"], {"train": 0.7, "val": 0.2, "test": 0})
    assert report == {"train": 0.7, "val": 0.2, "test": pytest.approx(0.1), "unused": 0.0}
    member = {name: [s.contains(d) for d in DOCS] for name, s in splits.items()}
    assert all(sum(member[n][i] for n in member) == 1 for i in range(len(DOCS)))  # each in exactly one split
    share = {n: sum(m) / len(DOCS) for n, m in member.items()}
    assert abs(share["train"] - 0.7) < 0.09 and abs(share["val"] - 0.2) < 0.08
    again, _ = load_splits(corpus["json"], {"train": 0.7, "val": 0.2, "test": 0})
    assert [again["val"].contains(d) for d in DOCS] == member["val"]  # another run (any rank) agrees
    other, _ = load_splits(corpus["json"], {"train": 0.7, "val": 0.2, "test": 0}, seed=43)
    assert [other["val"].contains(d) for d in DOCS] != member["val"]
    assert [d for d in splits["val"].head(1000)] == [d for d, m in zip(DOCS, member["val"]) if m]


def test_counts_cannot_split_a_stream(corpus):
    with pytest.raises(ValueError, match=r"\{'val': 20\}: a document count cannot be taken from streamed locations"):
        load_splits(corpus["json"], {"train": 0.9, "val": 20})


# ------------------------------------------------------------------------------------------ windows

@pytest.mark.parametrize("kind", ["json", "parquet"])
@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("step", [1.0, 0.5, 3])
def test_windows_equal_sequence_datasets(tokenizer, corpus, kind, packed, step):
    streamed = list(windows(tokenizer, stream(corpus, kind), 8, step, packed))
    reference = SequenceDataset(TokenDataset.from_ids(tokenizer.encode(DOCS)), 8, step, packed=packed)
    assert same(streamed, [reference[i] for i in range(len(reference))])


@pytest.mark.parametrize("packed", [False, True])
def test_every_token_is_a_target_once_per_pass_across_ranks_and_workers(tokenizer, corpus, packed):
    train = stream(corpus, "parquet", 0.0, 0.8)
    kept = [d for d in DOCS if train.contains(d)]
    expected = Counter(t for ids in tokenizer.encode(kept) for t in ids) + Counter({EOS: len(kept)})
    targets = Counter()
    for rank in range(2):
        loader = StatefulDataLoader(windows(tokenizer, train, 16, 1.0, packed, shuffle=True, shuffle_buffer=7,
                                            rank=rank, world_size=2), batch_size=5, num_workers=2)
        for batch in loader:
            targets.update(t for t in batch["y"].flatten().tolist() if t != PAD)
    assert targets == expected


def test_ranks_and_workers_read_disjoint_documents_that_make_up_the_split(tokenizer, corpus):
    # 2 ranks x 2 workers over 6 files: 4 whole files, then every 4th document of the other 2. One document per
    # window (padded, long windows), decoded back to its text.
    train = stream(corpus, "json", 0.0, 0.75)
    per_rank = []
    for rank in range(2):
        loader = StatefulDataLoader(windows(tokenizer, train, 320, 1.0, shuffle=True, shuffle_buffer=5, rank=rank,
                                            world_size=2), batch_size=3, num_workers=2)
        texts = [tokenizer.decode([t for t in x.tolist()]) for batch in loader for x in batch["x"]]
        per_rank.append(texts)
    union = Counter(per_rank[0]) + Counter(per_rank[1])
    assert union == Counter(d for d in DOCS if train.contains(d))  # each document of the split exactly once
    assert all(len(texts) > 50 for texts in per_rank)


# ------------------------------------------------------------------------------------------ resume

@pytest.mark.parametrize("packed", [False, True])
def test_resume_from_any_window_matches_uninterrupted_iteration(tokenizer, corpus, packed):
    def make():
        return windows(tokenizer, stream(corpus, "parquet", 0.0, 0.9), 8, 0.5, packed, shuffle=True,
                       shuffle_buffer=6, cycle=True)
    one_pass = sum(1 for _ in windows(tokenizer, stream(corpus, "parquet", 0.0, 0.9), 8, 0.5, packed))
    reference = list(itertools.islice(make(), one_pass + 40))
    # a window in the middle of a long document, block edges, the end of a pass and the next pass
    for cut in (0, 1, 5, 6, 7, 100, one_pass - 1, one_pass, one_pass + 13):
        interrupted = make()
        it = iter(interrupted)
        head = list(itertools.islice(it, cut))
        resumed = make()
        resumed.load_state_dict(interrupted.state_dict())
        assert same(head + list(itertools.islice(resumed, one_pass + 40 - cut)), reference), cut
    assert not same(reference[:one_pass], [reference[(i + 1) % one_pass] for i in range(one_pass)])


@pytest.mark.parametrize("num_workers, cuts", [(0, (0, 3, 11, 40)), (2, (5, 30))])
def test_stateful_dataloader_round_trip(tokenizer, corpus, num_workers, cuts):
    def make():
        return StatefulDataLoader(windows(tokenizer, stream(corpus, "json", 0.0, 0.9), 8, 1.0, True, shuffle=True,
                                          shuffle_buffer=10, cycle=True), batch_size=4, num_workers=num_workers)
    reference = [b["x"] for b in itertools.islice(make(), 80)]
    for cut in cuts:
        loader = make()
        it = iter(loader)
        head = [next(it)["x"] for _ in range(cut)]
        state = loader.state_dict()
        del it
        resumed = make()
        resumed.load_state_dict(state)
        rest = [b["x"] for b in itertools.islice(resumed, 80 - cut)]
        assert len(head + rest) == 80 and all(torch.equal(a, b) for a, b in zip(head + rest, reference)), cut


@pytest.mark.slow
def test_a_worker_that_finished_its_pass_stays_finished_after_resume(tokenizer, corpus):
    # One pass per iteration (epochs): near the end of a pass one worker has run out while the other goes on.
    epoch = {"n": 0}

    def make():
        return StreamLoader(windows(tokenizer, stream(corpus, "json", 0.0, 0.9), 32, 1.0, True, shuffle=True,
                                    shuffle_buffer=10), epoch=lambda: epoch["n"], batch_size=4, num_workers=2)
    loader = make()
    epoch["n"] = 0
    first = [b["x"] for b in loader]
    epoch["n"] = 1
    second = [b["x"] for b in loader]
    assert len(first) > 20 and not all(torch.equal(a, b) for a, b in zip(first, second))
    for cut in (len(first) - 6, len(first) - 1):
        epoch["n"] = 0
        interrupted = make()
        it = iter(interrupted)
        head = [next(it)["x"] for _ in range(cut)]
        state = interrupted.state_dict()
        del it
        resumed = make()
        resumed.load_state_dict(state)
        rest = [b["x"] for b in resumed]
        assert len(head) + len(rest) == len(first) and all(torch.equal(a, b) for a, b in zip(head + rest, first))
        epoch["n"] = 1
        assert all(torch.equal(a, b) for a, b in zip([b["x"] for b in resumed], second))


def test_lightning_holds_a_batch_so_the_loader_reports_the_state_before_it(tokenizer, corpus):
    def make(held):
        return StreamLoader(windows(tokenizer, stream(corpus), 8, 1.0, shuffle=True, shuffle_buffer=4, cycle=True),
                            held_batches=held, batch_size=2)
    reference = [b["x"] for b in itertools.islice(make(0), 12)]
    loader = make(1)
    it = iter(loader)
    [next(it) for _ in range(6)]  # a loop that trained on 5 batches and holds the 6th
    resumed = make(0)
    resumed.load_state_dict(loader.state_dict())
    assert all(torch.equal(a["x"], b) for a, b in zip(itertools.islice(resumed, 7), reference[5:]))


def test_state_of_another_number_of_consumers_is_refused(tokenizer, corpus):
    source = windows(tokenizer, stream(corpus), 8, shuffle=True, cycle=True, rank=1, world_size=2)
    list(itertools.islice(source, 3))
    target = windows(tokenizer, stream(corpus), 8, shuffle=True, cycle=True)
    target.load_state_dict(source.state_dict())
    with pytest.raises(ValueError, match="saved by data consumer 1 of 2.*this is consumer 0 of 1"):
        next(iter(target))


def test_evaluation_windows_are_in_stream_order_every_time(tokenizer, corpus):
    val = stream(corpus, "json", 0.8, 1.0)
    evaluation = windows(tokenizer, val, 8, 1.0, True, resume=False)
    first = list(itertools.islice(evaluation, 10))  # cut short, as limit_val_batches does
    full = list(evaluation)
    kept = [d for d in DOCS if val.contains(d)]
    reference = SequenceDataset(TokenDataset.from_ids(tokenizer.encode(kept)), 8, packed=True)
    assert same(full, [reference[i] for i in range(len(reference))]) and same(first, full[:10])


# ------------------------------------------------------------------------------------------ sampling

def test_stream_sample_is_bounded_spread_and_seeded(corpus):
    whole = stream(corpus, "json")
    total = sum(len(d.encode()) for d in DOCS)
    budget = total // 4
    sample = sample_stream(whole, budget, seed=1)  # scans 4 x budget: the whole stream
    assert sum(len(t.encode()) for t in sample) <= budget and len(sample) > 30
    where = sorted(DOCS.index(t) for t in sample)
    assert {i // 40 for i in where} == set(range(6))  # from every file ...
    assert sum(i % 40 >= 20 for i in where) > len(where) / 4  # ... not only from their heads
    assert sample_stream(whole, budget, seed=1) == sample and sample_stream(whole, budget, seed=2) != sample
    heads = sample_stream(whole, budget, seed=1, scan_bytes=total // 6, spread=6)  # reads 1/36 of each file
    assert all(DOCS.index(t) % 40 < 12 for t in heads)


# ------------------------------------------------------------------------------------------ command line

def xlab(*args):
    from xlabml.cli import main
    try:
        main(list(args))
    except SystemExit as exit:
        return exit.code
    return 0


def test_streaming_overlay_parses_on_the_release_config(capsys):
    import yaml
    repo = __import__("pathlib").Path(__file__).resolve().parent.parent
    assert xlab("fit", "-c", str(repo / "conf" / "xlab.yaml"), "-c", str(repo / "conf" / "extra" / "streaming.yaml"),
                "--print_config") == 0
    config = yaml.safe_load(capsys.readouterr().out)
    assert config["data"]["locations"]["streaming"] is True and config["data"]["splits"] == {"train": 0.99, "val": 0.01}
    assert config["trainer"]["max_steps"] > 0 and isinstance(config["trainer"]["val_check_interval"], int)


@pytest.mark.slow
def test_fit_validate_test_from_a_stream_on_the_command_line(tmp_path, monkeypatch, capsys):
    import yaml
    monkeypatch.chdir(tmp_path)
    config = {
        "trainer": {"max_steps": 6, "val_check_interval": 3, "limit_val_batches": 2, "limit_test_batches": 2,
                    "num_sanity_val_steps": 0, "enable_progress_bar": False, "enable_model_summary": False},
        "data": {"locations": {"builtin": "python-topics", "streaming": True},
                 "splits": {"train": 0.9, "val": 0.05, "test": 0}, "num_tokens": 400,
                 "tokenizer_path": str(tmp_path / "tok.model"), "tokenizer_sample_bytes": 100_000,
                 "seq_len": 32, "batch_size": 4, "packed": True, "shuffle_buffer": 16},
        "model": {"d_model": 32, "n_layers": 1, "n_heads": 2, "d_ff": 64, "dropout": 0.0},
    }
    (tmp_path / "stream.yaml").write_text(yaml.safe_dump(config))
    assert xlab("fit", "-c", "stream.yaml") == 0
    out = capsys.readouterr().out
    assert "val_loss" in out and "unigram entropy" not in out  # no full pass to count the stream's tokens
    last = tmp_path / "logs" / "version_0" / "checkpoints" / "last.ckpt"
    for stage in ("validate", "test"):
        assert xlab(stage, "-c", "stream.yaml", "--ckpt_path", str(last)) == 0
        assert f"{stage.replace('validate', 'val')}_loss" in capsys.readouterr().out
    assert xlab("compute_stats", "-c", "stream.yaml", "--sample_size", "20") == 0
    assert "streamed split: figures from its first 20 documents" in capsys.readouterr().out


def _resume_on_two_ranks(rank, port, source, model_path, result_dir):
    """One rank of a 2-process gloo group: the loader state saved by rank 0 resumes both ranks exactly."""
    import torch.distributed as dist
    from xlabml.tokenizer import Tokenizer
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    tokenizer = Tokenizer.load(model_path)

    def make():
        return StreamLoader(StreamWindows(TextStream(load_source(source), 0.0, 0.9), tokenizer, 8, 1.0, packed=True,
                                          shuffle=True, shuffle_buffer=6, cycle=True, rank=rank, world_size=2),
                            held_batches=1, batch_size=3)
    reference = [b["x"] for b in itertools.islice(make(), 12)]
    loader = make()
    it = iter(loader)
    [next(it) for _ in range(6)]  # trained on 5, holds the 6th
    saved = [loader.state_dict()]  # every rank gathers; only rank 0's copy is kept, as Lightning does
    dist.broadcast_object_list(saved, src=0)
    resumed = make()
    resumed.load_state_dict(saved[0])
    rest = [b["x"] for b in itertools.islice(resumed, 7)]
    torch.save({"reference": reference, "rest": rest, "consumers": [s["dataset_state"]["consumer"]
                                                                     for s in saved[0]["ranks"]]},
               f"{result_dir}/rank{rank}.pt")
    dist.destroy_process_group()


@pytest.mark.slow
def test_every_rank_resumes_from_the_state_rank_0_saved(tokenizer, corpus, tmp_path):
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torch.multiprocessing.spawn(_resume_on_two_ranks, args=(port, corpus["json"], tokenizer.path, str(tmp_path)),
                                nprocs=2)
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for result in results:
        assert result["consumers"] == [0, 1]  # both ranks' positions are in the saved state
        assert all(torch.equal(a, b) for a, b in zip(result["rest"], result["reference"][5:]))
    assert not torch.equal(results[0]["reference"][0], results[1]["reference"][0])  # the ranks read other data
