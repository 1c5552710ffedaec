"""XLabDataModule: tokenizer preparation, encoding cache, loaders, exact mid-epoch resume, stats and checks."""
import csv
import io
import json
import os
from collections import Counter
from types import SimpleNamespace

import lightning as L
import pytest
import torch

import xlabml.tokenizer
from xlabml.datamodules import XLabDataModule
from xlabml.tokenizer import Tokenizer, TokenizerTrainer

NUM_TOKENS = 400


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A small local corpus: 120 one-line documents of varied length."""
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    words = "the quick brown fox jumps over a lazy dog while python code runs in loops".split()
    lines = [" ".join(words[(i * 7 + j) % len(words)] for j in range(3 + (i * 5) % 40)) for i in range(120)]
    path.write_text("\n".join(lines) + "\n")
    return str(path)


@pytest.fixture(scope="module")
def tokenizer_file(tmp_path_factory, corpus):
    path = tmp_path_factory.mktemp("tok") / "tok.model"
    with open(corpus) as f:
        TokenizerTrainer().train(f.read().splitlines(), NUM_TOKENS, path)
    return str(path)


def make(tmp_path, corpus, tokenizer_file=None, **kwargs):
    args = dict(locations=corpus, num_tokens=NUM_TOKENS, tokenizer_path=tokenizer_file, seq_len=16, batch_size=4,
                cache_dir=str(tmp_path / "cache"))
    args.update(kwargs)
    return XLabDataModule(**args)


@pytest.fixture
def count_encodes(monkeypatch):
    calls = []
    original = Tokenizer.encode

    def encode(self, text):
        calls.append(1 if isinstance(text, str) else len(text))
        return original(self, text)

    monkeypatch.setattr(xlabml.tokenizer.Tokenizer, "encode", encode)
    return calls


# ------------------------------------------------------------------------------------------ tokenizer

def test_trains_tokenizer_on_train_split_into_new_directory(tmp_path, corpus, monkeypatch):
    path = tmp_path / "new" / "dir" / "tok.model"
    dm = make(tmp_path, corpus, str(path), tokenizer_train_args={"model_type": "char"})
    dm.prepare_data()
    assert path.is_file() and len(dm.tokenizer) <= NUM_TOKENS
    assert dm.tokenizer.decode(dm.tokenizer.encode("lazy fox")) == "lazy fox"
    # the next run loads the file instead of training again
    monkeypatch.setattr(TokenizerTrainer, "train", lambda *a, **k: pytest.fail("trained again"))
    again = make(tmp_path, corpus, str(path), tokenizer_train_args={"model_type": "char"})
    again.prepare_data()
    assert again.tokenizer.model_proto == dm.tokenizer.model_proto


def test_tokenizer_path_required_to_train(tmp_path, corpus):
    with pytest.raises(ValueError, match="tokenizer_path is not set"):
        make(tmp_path, corpus, None).prepare_data()


def test_tokenizer_url_download(tmp_path, corpus, tokenizer_file):
    path = tmp_path / "downloaded" / "tok.model"
    dm = make(tmp_path, corpus, str(path), tokenizer_url=f"file://{tokenizer_file}")
    dm.prepare_data()
    assert path.read_bytes() == open(tokenizer_file, "rb").read()
    cached = make(tmp_path, corpus, None, tokenizer_url=f"file://{tokenizer_file}")
    assert cached.tokenizer_path.startswith(str(tmp_path / "cache"))
    assert len(cached.tokenizer) == NUM_TOKENS and os.path.isfile(cached.tokenizer_path)
    missing = f"file://{tmp_path}/nowhere/tok.model"
    with pytest.raises(ConnectionError, match=f"tokenizer_url='{missing}'"):
        make(tmp_path, corpus, str(tmp_path / "t2.model"), tokenizer_url=missing).prepare_data()
    assert not (tmp_path / "t2.model").exists() and not (tmp_path / "t2.model.part").exists()


def test_vocabulary_larger_than_num_tokens_is_an_error(tmp_path, corpus, tokenizer_file):
    dm = make(tmp_path, corpus, tokenizer_file, num_tokens=300)
    with pytest.raises(ValueError, match=f"tokenizer {tokenizer_file} has 400 tokens, more than num_tokens=300"):
        dm.num_tokens


def test_vocabulary_smaller_than_num_tokens_warns(tmp_path, corpus, tokenizer_file):
    dm = make(tmp_path, corpus, tokenizer_file, num_tokens=512)
    with pytest.warns(UserWarning, match="has 400 tokens, fewer than num_tokens=512"):
        assert dm.num_tokens == 512
    assert dm.pad_index == 3 and dm.seq_len == 16


def test_num_tokens_before_the_tokenizer_exists(tmp_path, corpus):
    assert make(tmp_path, corpus, str(tmp_path / "later.model"), num_tokens=1000).num_tokens == 1000


@pytest.mark.parametrize("kwargs, match", [
    (dict(seq_len=0), "seq_len=0"),
    (dict(step_size=1.5), "step_size=1.5"),
    (dict(eval_step_size=0), "eval_step_size=0: an int step is a token count"),
    (dict(num_tokens=3), "num_tokens=3"),
    (dict(splits={"train": 0.9, "eval": 0.1}), r"unknown split names \['eval'\]"),
])
def test_bad_arguments(tmp_path, corpus, kwargs, match):
    with pytest.raises(ValueError, match=match):
        make(tmp_path, corpus, **kwargs)


def test_eval_step_size_strides_the_eval_splits_only(tmp_path, corpus, tokenizer_file):
    dm = make(tmp_path, corpus, tokenizer_file, step_size=1, eval_step_size=1.0)
    dm.setup("fit")
    train, val = dm.datasets["train"], dm.datasets["val"]
    assert (train.step, val.step) == (1, 16)
    # non-overlapping windows: every target of every val document (its ids and one <eos>) scored exactly once
    targets = sum(int((val[i]["y"] != dm.pad_index).sum()) for i in range(len(val)))
    assert targets == int(val.tokens.lengths.sum()) + len(val.tokens)
    same = make(tmp_path, corpus, tokenizer_file, step_size=4)
    same.setup("fit")
    assert (same.datasets["train"].step, same.datasets["val"].step) == (4, 4)  # default: the training stride


# ------------------------------------------------------------------------------------------ encoding cache

def test_second_prepare_reuses_the_cache_and_a_new_tokenizer_does_not(tmp_path, corpus, tokenizer_file,
                                                                     count_encodes):
    make(tmp_path, corpus, tokenizer_file).prepare_data()
    assert sum(count_encodes) == 120  # every document once
    count_encodes.clear()
    dm = make(tmp_path, corpus, tokenizer_file)
    dm.prepare_data()
    dm.setup("fit")
    assert count_encodes == []
    first = dm.datasets["train"].tokens
    assert first.from_cache

    other = tmp_path / "other.model"
    with open(corpus) as f:
        TokenizerTrainer({"model_type": "char"}).train(f.read().splitlines(), NUM_TOKENS, other)
    dm2 = make(tmp_path, corpus, str(other))
    dm2.setup("fit")
    assert sum(count_encodes) == 108 + 6  # train and val encoded again with the new tokenizer
    second = dm2.datasets["train"].tokens
    assert not second.from_cache
    assert second.data.cache_files[0]["filename"] != first.data.cache_files[0]["filename"]
    assert second.num_tokens > first.num_tokens  # characters, not subwords


def test_num_proc_and_dynamic_encode_give_the_same_windows(tmp_path, corpus, tokenizer_file):
    base = make(tmp_path, corpus, tokenizer_file, packed=True)
    base.setup("fit")
    parallel = make(tmp_path, corpus, tokenizer_file, packed=True, num_proc=2, cache_dir=str(tmp_path / "c2"))
    parallel.setup("fit")
    dynamic = make(tmp_path, corpus, tokenizer_file, packed=True, dynamic_encode=True, cache_dir=str(tmp_path / "c3"))
    dynamic.setup("fit")
    assert dynamic.datasets["train"].tokens.data.column_names == ["length"]  # no ids, no second copy of the text
    reuse = make(tmp_path, corpus, tokenizer_file, packed=True, num_proc=1, cache_dir=str(tmp_path / "c2"))
    reuse.setup("fit")
    assert reuse.datasets["train"].tokens.from_cache  # the cache key does not depend on num_proc
    a, b, c = (dm.datasets["train"] for dm in (base, parallel, dynamic))
    assert len(a) == len(b) == len(c) > 20
    for i in range(len(a)):
        for key in ("x", "y", "positions", "doc_ids"):
            assert torch.equal(a[i][key], b[i][key]) and torch.equal(a[i][key], c[i][key])
    static, dynamic = (make(tmp_path, corpus, tokenizer_file, dynamic_encode=d, cache_dir=str(tmp_path / "c3"))
                       for d in (False, True))
    static.setup("validate"), dynamic.setup("validate")
    a, c = static.datasets["val"], dynamic.datasets["val"]
    assert len(a) == len(c) and all(torch.equal(a[i]["x"], c[i]["x"]) and torch.equal(a[i]["y"], c[i]["y"])
                                    for i in range(len(a)))


# ------------------------------------------------------------------------------------------ loaders

def test_batches(tmp_path, corpus, tokenizer_file):
    dm = make(tmp_path, corpus, tokenizer_file, packed=True)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert sorted(batch) == ["doc_ids", "positions", "x", "y"]
    assert all(v.dtype == torch.long and v.shape == (4, 16) for v in batch.values())
    padded = make(tmp_path, corpus, tokenizer_file)
    padded.setup("validate")
    batch = next(iter(padded.val_dataloader()))
    assert sorted(batch) == ["x", "y"] and batch["x"].shape == (4, 16)
    starts = torch.from_numpy(padded.datasets["val"].starts[:4])
    assert torch.equal(batch["x"][:, 0] == 1, starts == 0)  # a window at a document start begins with <sos>
    first = padded.datasets["val"][0]
    assert torch.equal(batch["x"][0], first["x"])  # not shuffled


def epoch_batches(loader, epoch, limit=None):
    loader.sampler.set_epoch(epoch)
    out = []
    for i, batch in enumerate(loader):
        if limit is not None and i == limit:
            break
        out.append(batch["x"])
    return out


@pytest.mark.parametrize("num_workers", [0, 2])
def test_mid_epoch_resume_yields_exactly_the_remaining_batches(tmp_path, corpus, tokenizer_file, num_workers):
    dm = make(tmp_path, corpus, tokenizer_file, num_workers=num_workers)
    reference = dm.train_dataloader()
    epoch0, epoch1 = epoch_batches(reference, 0), epoch_batches(reference, 1)
    assert len(epoch0) > 6 and any(not torch.equal(a, b) for a, b in zip(epoch0, epoch1))

    interrupted = make(tmp_path, corpus, tokenizer_file, num_workers=num_workers).train_dataloader()
    interrupted.sampler.set_epoch(0)
    iterator = iter(interrupted)
    seen = [next(iterator)["x"] for _ in range(5)]
    state = interrupted.state_dict()
    del iterator

    resumed = make(tmp_path, corpus, tokenizer_file, num_workers=num_workers).train_dataloader()
    resumed.load_state_dict(state)
    rest = [batch["x"] for batch in resumed]
    assert len(seen) + len(rest) == len(epoch0)
    assert all(torch.equal(a, b) for a, b in zip(seen + rest, epoch0))
    next_epoch = epoch_batches(resumed, 1)
    assert len(next_epoch) == len(epoch1) and all(torch.equal(a, b) for a, b in zip(next_epoch, epoch1))


class Recorder(L.LightningModule):
    """Records the first tokens of each training batch."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.seen = []

    def training_step(self, batch, batch_idx):
        self.seen.append((self.current_epoch, batch["x"][:, :4].clone()))
        return (self.weight * batch["x"].float().mean()).sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


def fit(tmp_path, dm, name, ckpt_path=None, callbacks=()):
    model = Recorder()
    trainer = L.Trainer(max_epochs=2, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=str(tmp_path / name), callbacks=list(callbacks),
                        enable_checkpointing=bool(callbacks), num_sanity_val_steps=0, limit_val_batches=0)
    trainer.fit(model, datamodule=dm, ckpt_path=ckpt_path)
    return model.seen


def test_lightning_resume_from_mid_epoch_checkpoint(tmp_path, corpus, tokenizer_file):
    kwargs = dict(batch_size=8, seq_len=32)
    checkpoints = L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=3,
                                                      save_top_k=-1, filename="{step}")
    full = fit(tmp_path, make(tmp_path, corpus, tokenizer_file, **kwargs), "full", callbacks=[checkpoints])
    steps_per_epoch = sum(1 for epoch, _ in full if epoch == 0)
    assert steps_per_epoch > 3
    resumed = fit(tmp_path, make(tmp_path, corpus, tokenizer_file, **kwargs), "resumed",
                  ckpt_path=str(tmp_path / "ckpt" / "step=3.ckpt"))
    assert len(resumed) == len(full) - 3
    assert all(e1 == e2 and torch.equal(a, b) for (e1, a), (e2, b) in zip(resumed, full[3:]))
    loaded = XLabDataModule.load_from_checkpoint(str(tmp_path / "ckpt" / "step=3.ckpt"))
    assert loaded.tokenizer_path == tokenizer_file and loaded.hparams.batch_size == 8


class WidthRecorder(Recorder):
    def training_step(self, batch, batch_idx):
        self.seen.append((self.global_step, {name: value.clone() for name, value in batch.items()}))
        return (self.weight * batch["x"].float().mean()).sum()


def warmup_fit(tmp_path, dm, name, ckpt_path=None, callbacks=()):
    model = WidthRecorder()
    trainer = L.Trainer(max_steps=9, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=str(tmp_path / name), callbacks=list(callbacks),
                        enable_checkpointing=bool(callbacks), num_sanity_val_steps=0, limit_val_batches=0)
    trainer.fit(model, datamodule=dm, ckpt_path=ckpt_path)
    return model.seen


def test_seq_len_warmup_cuts_exactly_the_stated_windows_and_resumes_exactly(tmp_path, corpus, tokenizer_file):
    kwargs = dict(batch_size=4, seq_len=32)
    plain = warmup_fit(tmp_path, make(tmp_path, corpus, tokenizer_file, **kwargs), "plain")
    checkpoints = L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=3,
                                                      save_top_k=-1, filename="{step}")
    warm = dict(kwargs, seq_len_warmup=6, seq_len_start=8)
    full = warmup_fit(tmp_path, make(tmp_path, corpus, tokenizer_file, **warm), "warm", callbacks=[checkpoints])
    # start 8, growing by (32 - 8) / 6 = 4 tokens a step, in stages of 8: 8 8 16 16 24 24, then 32
    assert [batch["x"].size(1) for _, batch in full] == [8, 8, 16, 16, 24, 24, 32, 32, 32]
    assert [step for step, _ in full] == list(range(9))
    for (_, cut), (_, whole) in zip(full, plain):  # the same windows, cut: x, y (and any other tensor) alike
        assert cut.keys() == whole.keys()
        n = cut["x"].size(1)
        assert all(torch.equal(cut[name], whole[name][:, :n]) for name in cut)
    resumed = warmup_fit(tmp_path, make(tmp_path, corpus, tokenizer_file, **warm), "resumed",
                         ckpt_path=str(tmp_path / "ckpt" / "step=3.ckpt"))
    assert [step for step, _ in resumed] == list(range(3, 9))
    assert all(torch.equal(a[name], b[name]) for (_, a), (_, b) in zip(resumed, full[3:]) for name in a)
    with pytest.raises(ValueError, match="seq_len_start=40"):
        make(tmp_path, corpus, tokenizer_file, seq_len=32, seq_len_warmup=4, seq_len_start=40)
    with pytest.raises(ValueError, match="seq_len_warmup=-1"):
        make(tmp_path, corpus, tokenizer_file, seq_len_warmup=-1)


# ------------------------------------------------------------------------------------------ splits in stages

def test_missing_and_empty_splits(tmp_path, corpus, tokenizer_file):
    dm = make(tmp_path, corpus, tokenizer_file, splits={"train": 0})
    dm.setup("fit")  # training without validation
    assert dm.val_dataloader() == []
    with pytest.raises(ValueError, match=r"split 'test' is needed for 'test' but splits configures only \['train'\]"):
        dm.setup("test")
    empty = make(tmp_path, corpus, tokenizer_file, splits={"train": 0, "val": 0.001})
    with pytest.raises(ValueError, match="split 'val' is empty"):
        empty.setup("fit")


def test_held_out_file_as_validation(tmp_path, corpus, tokenizer_file):
    held = tmp_path / "held.txt"
    held.write_text("a lazy dog\nthe quick fox\n")
    dm = make(tmp_path, corpus, tokenizer_file, splits={"train": 1.0, "val": str(held)})
    dm.setup("fit")
    assert dm.split_report == {"documents": 120, "empty": 0, "train": 120, "unused": 0, "val": 2}
    assert len(dm.datasets["val"]) == 2
    tok = dm.tokenizer
    assert dm.datasets["val"][0]["y"].tolist()[:len(tok.encode("a lazy dog")) + 1] == tok.encode("a lazy dog") + [2]


# ------------------------------------------------------------------------------------------ stats, validation

def test_compute_stats_exact_on_a_small_split(tmp_path, corpus, tokenizer_file):
    dm = make(tmp_path, corpus, tokenizer_file)
    stats = dm.compute_stats("val")
    texts = dm.texts()["val"]["text"]
    lengths = [len(ids) for ids in dm.tokenizer.encode(texts)]
    split = stats["split"]
    assert split["documents"] == 6 and split["characters"] == sum(map(len, texts))
    assert split["tokens"] == sum(lengths) and not split["tokens_estimated"]
    assert split["chars_per_token"] == round(sum(map(len, texts)) / sum(lengths), 4)
    assert split["text_length"]["max"] == max(map(len, texts)) and split["token_length"]["min"] == min(lengths)
    vocab = stats["vocabulary"]
    assert vocab["total"] == NUM_TOKENS and vocab["special"] == 4 + 3 and vocab["byte_tokens"] == 256
    assert vocab["special"] + vocab["learned"] + vocab["single_characters"] + vocab["byte_tokens"] == NUM_TOKENS
    sampled = dm.compute_stats("train", sample_size=20)["split"]
    assert sampled["tokens_estimated"] and sampled["sampled_documents"] == 20 and sampled["documents"] == 108
    train_tokens = sum(len(ids) for ids in dm.tokenizer.encode(dm.texts()["train"]["text"]))
    assert abs(sampled["tokens"] - train_tokens) < 0.2 * train_tokens
    with pytest.raises(ValueError, match="split 'nope' is not configured"):
        dm.compute_stats("nope")


def test_validate_data_lists_unusable_documents(tmp_path, tokenizer_file):
    path = tmp_path / "mixed.txt"
    unsplittable = "x" * 5000
    spaced = "word " * 1500
    path.write_text(f"fine text\n\n{unsplittable}\n{spaced}\n")
    dm = XLabDataModule(locations=str(path), splits={"train": 0}, tokenizer_path=tokenizer_file, num_tokens=NUM_TOKENS)
    rows = list(csv.DictReader(io.StringIO(dm.validate_data(dump_dir=str(tmp_path / "dump")))))
    assert [(r["source"], r["index"], r["reason"], r["characters"]) for r in rows] == [
        ("locations", "1", "empty", "0"), ("locations", "2", "hard_split", "5000")]
    assert (tmp_path / "dump" / "locations-2.txt").read_text() == unsplittable
    in_split = list(csv.DictReader(io.StringIO(dm.validate_data("train"))))
    assert [(r["source"], r["index"], r["reason"]) for r in in_split] == [("train", "1", "hard_split")]


# ------------------------------------------------------------------------------------------ streamed data

@pytest.fixture(scope="module")
def streamed(tmp_path_factory, corpus):
    """The corpus' 120 documents in 4 JSONL files, opened with streaming: true."""
    root = tmp_path_factory.mktemp("streamed")
    with open(corpus) as f:
        lines = f.read().splitlines()
    for k in range(4):
        (root / f"part-{k}.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in lines[k * 30:k * 30 + 30]))
    return {"path": "json", "data_files": str(root / "*.jsonl"), "streaming": True}


def make_streamed(tmp_path, streamed, tokenizer_file, **kwargs):
    args = dict(splits={"train": 0.8, "val": 0.2}, shuffle_buffer=8, seq_len=32, batch_size=8)
    return make(tmp_path, streamed, tokenizer_file, **{**args, **kwargs})


class StreamRecorder(Recorder):
    """Records every training batch's targets and the first validation batch of each validation run."""

    def __init__(self):
        super().__init__()
        self.targets, self.validated = [], []

    def training_step(self, batch, batch_idx):
        self.targets.append((self.current_epoch, batch["y"].clone()))
        return super().training_step(batch, batch_idx)

    def validation_step(self, batch, batch_idx):
        if batch_idx == 0:
            self.validated.append(batch["x"].clone())


def streamed_fit(tmp_path, dm, name, ckpt_path=None, callbacks=(), **trainer_args):
    model = StreamRecorder()
    args = dict(max_steps=30, val_check_interval=5, check_val_every_n_epoch=None, limit_val_batches=2)
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=str(tmp_path / name), callbacks=list(callbacks),
                        enable_checkpointing=bool(callbacks), num_sanity_val_steps=0, **{**args, **trainer_args})
    trainer.fit(model, datamodule=dm, ckpt_path=ckpt_path)
    return model


def test_streamed_fit_stops_at_max_steps_and_resumes_on_exactly_the_next_batches(tmp_path, streamed, tokenizer_file):
    full = streamed_fit(tmp_path, make_streamed(tmp_path, streamed, tokenizer_file), "full")
    assert len(full.targets) == 30
    train = make_streamed(tmp_path, streamed, tokenizer_file).texts()["train"]
    pass_targets = sum(len(ids) + 1 for ids in make(tmp_path, streamed, tokenizer_file).tokenizer.encode(
        [t for t in train.head(1000)]))
    assert sum(int((y != 3).sum()) for _, y in full.targets) > pass_targets  # the run crossed into a second pass
    assert len(full.validated) == 6 and all(torch.equal(v, full.validated[0]) for v in full.validated)

    checkpoints = L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=12,
                                                      save_top_k=-1, filename="{step}")
    first = streamed_fit(tmp_path, make_streamed(tmp_path, streamed, tokenizer_file), "first", max_steps=12,
                         callbacks=[checkpoints])
    resumed = streamed_fit(tmp_path, make_streamed(tmp_path, streamed, tokenizer_file), "resumed",
                           ckpt_path=str(tmp_path / "ckpt" / "step=12.ckpt"))
    assert len(first.targets) == 12 and len(resumed.targets) == 18
    assert all(torch.equal(a, b) for (_, a), (_, b) in zip(first.targets + resumed.targets, full.targets))


def test_streamed_epochs_on_one_process_are_passes(tmp_path, streamed, tokenizer_file):
    dm = make_streamed(tmp_path, streamed, tokenizer_file, packed=True)
    model = streamed_fit(tmp_path, dm, "epochs", max_steps=-1, max_epochs=2, limit_val_batches=0)
    tokenizer, train = dm.tokenizer, dm.texts()["train"]
    expected = Counter(t for ids in tokenizer.encode(train.head(1000)) for t in ids) + Counter({2: len(train.head(1000))})
    epochs = [[y for e, y in model.targets if e == epoch] for epoch in (0, 1)]
    for batches in epochs:  # every token of every train document once as a target per epoch
        assert Counter(t for y in batches for t in y.flatten().tolist() if t != 3) == expected
    assert not all(torch.equal(a, b) for a, b in zip(*epochs))  # reshuffled


def test_streamed_runs_in_parallel_need_max_steps(tmp_path, streamed, tokenizer_file):
    dm = make_streamed(tmp_path, streamed, tokenizer_file)
    dm.trainer = SimpleNamespace(max_steps=-1, world_size=2, global_rank=1, current_epoch=0)
    with pytest.raises(ValueError, match="a run on 2 processes must end at trainer.max_steps"):
        dm.train_dataloader()
    dm.trainer = SimpleNamespace(max_steps=100, world_size=2, global_rank=1, current_epoch=0, limit_val_batches=1.0)
    assert dm.train_dataloader().dataset.rank == 1
    with pytest.warns(UserWarning, match="the val split is streamed: every val run reads all of it"):
        dm.val_dataloader()


def test_streamed_compute_stats_estimates_from_the_head(tmp_path, streamed, tokenizer_file, corpus):
    dm = make_streamed(tmp_path, streamed, tokenizer_file)
    split = dm.compute_stats("val", sample_size=5)["split"]
    with open(corpus) as f:
        val = [t for t in f.read().splitlines() if dm.texts()["val"].contains(t)][:5]
    tokens = sum(len(ids) for ids in dm.tokenizer.encode(val))
    assert split["documents"] is None and split["tokens"] is None and split["sampled_documents"] == 5
    assert split["chars_per_token"] == round(sum(map(len, val)) / tokens, 4)
    assert split["text_length"]["max"] == max(map(len, val)) and "first 5 documents" in split["note"]
    whole = dm.compute_stats("val", sample_size=1000)["split"]  # fewer documents than that: exact totals
    with open(corpus) as f:
        val = [t for t in f.read().splitlines() if dm.texts()["val"].contains(t)]
    assert (whole["documents"], whole["characters"], whole["tokens_estimated"]) == (len(val), sum(map(len, val)), False)
    assert whole["tokens"] == sum(len(ids) for ids in dm.tokenizer.encode(val))


@pytest.mark.parametrize("streaming", [False, True])
def test_tokenizer_trains_on_a_bounded_sample_spread_over_the_split(tmp_path, corpus, streamed, tokenizer_file,
                                                                    monkeypatch, streaming):
    fed, stand_in = [], open(tokenizer_file, "rb").read()

    def train(self, texts, num_tokens, save_path):
        fed.append(list(texts))
        return Tokenizer(stand_in, path=str(save_path))

    monkeypatch.setattr(TokenizerTrainer, "train", train)
    with open(corpus) as f:
        lines = f.read().splitlines()
    budget = sum(len(t) for t in lines) // 4
    for seed in (1, 1, 2):
        dm = XLabDataModule(locations=streamed if streaming else corpus, splits={"train": 0.9, "val": 0.1},
                            num_tokens=NUM_TOKENS, tokenizer_path=str(tmp_path / f"new-{len(fed)}.model"), seed=seed,
                            tokenizer_sample_bytes=budget, cache_dir=str(tmp_path / "cache"))
        dm.tokenizer
    assert all(0 < sum(len(t.encode()) for t in texts) <= budget for texts in fed)
    assert fed[0] == fed[1] and fed[0] != fed[2]  # a seed gives one sample
    where = sorted(lines.index(t) for t in fed[0])
    assert where[0] < 20 and where[-1] >= 100  # spread over the corpus, not its head


def test_streamed_prepare_trains_the_tokenizer_and_encodes_nothing(tmp_path, streamed, count_encodes):
    path = tmp_path / "streamed.model"
    dm = make_streamed(tmp_path, streamed, str(path), tokenizer_train_args={"model_type": "char"})
    dm.prepare_data()
    assert path.is_file() and count_encodes == []  # nothing encoded up front
    assert dm.tokenizer.decode(dm.tokenizer.encode("lazy fox")) == "lazy fox"
    assert not (tmp_path / "cache").exists() or not list((tmp_path / "cache").glob("ids-*"))


def test_validate_data_reads_a_streamed_source_and_split(tmp_path, tokenizer_file):
    unsplittable, spaced = "x" * 5000, "word " * 1500
    path = tmp_path / "mixed.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in ["fine text", "", unsplittable, spaced]))
    dm = XLabDataModule(locations={"path": "json", "data_files": str(path), "streaming": True}, splits={"train": 0},
                        tokenizer_path=tokenizer_file, num_tokens=NUM_TOKENS)
    rows = list(csv.DictReader(io.StringIO(dm.validate_data())))
    assert [(r["source"], r["index"], r["reason"], r["characters"]) for r in rows] == [
        ("locations", "1", "empty", "0"), ("locations", "2", "hard_split", "5000")]
    in_split = list(csv.DictReader(io.StringIO(dm.validate_data("train"))))  # the split has no empty documents
    assert [(r["source"], r["index"], r["reason"]) for r in in_split] == [("train", "1", "hard_split")]
