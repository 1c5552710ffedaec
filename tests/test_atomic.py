"""Atomic writes: a file appears complete or not at all, a failure half way leaves the previous one, nothing is
overwritten unless asked; and the files XLab writes for users (tokenizer, validate_data dumps, a downloaded
tokenizer) survive a disk that fills up half way."""
import os
import resource
import stat
from contextlib import contextmanager

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from xlabml.atomic import atomic_path, write_atomic


@contextmanager
def disk_full_after(limit: int):
    """Every file write past `limit` bytes fails with EFBIG, as a full disk fails with ENOSPC (Python ignores
    SIGXFSZ, so the write raises instead of killing the process)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))


def test_write_creates_the_file_with_the_umask_and_leaves_nothing_else(tmp_path):
    target = tmp_path / "new" / "model.bin"  # the folder is created
    umask = os.umask(0o022)
    try:
        write_atomic(target, b"\x00\x01weights")
    finally:
        os.umask(umask)
    assert target.read_bytes() == b"\x00\x01weights"
    assert stat.S_IMODE(target.stat().st_mode) == 0o644  # not mkstemp's 0600: a team shares checkpoints
    assert os.listdir(target.parent) == ["model.bin"]
    write_atomic(tmp_path / "text.txt", "naïve ▁ text")
    assert (tmp_path / "text.txt").read_text(encoding="utf-8") == "naïve ▁ text"


def test_an_existing_target_is_refused_and_kept(tmp_path):
    target = tmp_path / "export.ckpt"
    target.write_bytes(b"precious")
    with pytest.raises(FileExistsError, match="export.ckpt already exists; refusing to overwrite it"):
        write_atomic(target, b"other")
    assert target.read_bytes() == b"precious" and os.listdir(tmp_path) == ["export.ckpt"]
    # a file appearing while we write (another process racing us) is not overwritten either: os.link refuses
    with pytest.raises(FileExistsError, match="refusing to overwrite"):
        with atomic_path(tmp_path / "raced.ckpt") as tmp:
            tmp.write_bytes(b"ours")
            (tmp_path / "raced.ckpt").write_bytes(b"theirs")
    assert (tmp_path / "raced.ckpt").read_bytes() == b"theirs"
    assert sorted(os.listdir(tmp_path)) == ["export.ckpt", "raced.ckpt"]


def test_overwrite_replaces_in_one_step(tmp_path):
    target = tmp_path / "last.ckpt"
    target.write_bytes(b"step 1")
    inode = target.stat().st_ino
    write_atomic(target, b"step 2", overwrite=True)
    assert target.read_bytes() == b"step 2" and os.listdir(tmp_path) == ["last.ckpt"]
    assert target.stat().st_ino != inode  # a new file renamed over the old: a reader (or mmap) of it is unaffected


@settings(max_examples=30, deadline=None)
@given(old=st.one_of(st.none(), st.binary(max_size=64)), new=st.binary(min_size=1, max_size=2048),
       cut=st.floats(0.0, 1.0), overwrite=st.booleans())
def test_a_writer_failing_half_way_leaves_the_previous_state(tmp_path_factory, old, new, cut, overwrite):
    folder = tmp_path_factory.mktemp("fail")
    target = folder / "file.bin"
    if old is not None:
        target.write_bytes(old)
    if old is not None and not overwrite:
        with pytest.raises(FileExistsError):
            write_atomic(target, new)
    else:
        with pytest.raises(OSError, match="No space left"):
            with atomic_path(target, overwrite=overwrite) as tmp, open(tmp, "wb") as f:
                f.write(new[: int(cut * len(new))])
                raise OSError(28, "No space left on device")
        with atomic_path(target, overwrite=overwrite) as tmp:  # and a later write goes through
            tmp.write_bytes(new)
        old = new
    assert (target.read_bytes() if target.exists() else None) == old
    assert os.listdir(folder) == (["file.bin"] if old is not None else [])


def test_a_full_disk_half_way_leaves_no_file(tmp_path):
    target = tmp_path / "big.bin"
    with pytest.raises(OSError, match="File too large"), disk_full_after(1000):
        write_atomic(target, b"x" * 5000)
    assert os.listdir(tmp_path) == []
    write_atomic(target, b"x" * 5000)  # nothing blocks the next try
    assert target.stat().st_size == 5000


# ----------------------------------------------------------------------------------- files XLab writes


WORDS = "the quick brown fox jumps over a lazy dog while seven wizards hex bold jumping zebras".split()
TEXTS = [" ".join(WORDS[(i * 7 + j * 3) % len(WORDS)] for j in range(12)) for i in range(200)]


def test_trained_tokenizer_is_never_left_truncated(tmp_path):
    from xlabml.tokenizer import Tokenizer, TokenizerTrainer

    path = tmp_path / "tok.model"
    with pytest.raises(OSError), disk_full_after(2000):  # a 300-token model is about 6 KB
        TokenizerTrainer().train(TEXTS, 300, path)
    assert os.listdir(tmp_path) == []  # before: a truncated tok.model, which blocked retraining and did not load
    tokenizer = TokenizerTrainer().train(TEXTS, 300, path)
    assert Tokenizer.load(path).model_proto == tokenizer.model_proto and len(tokenizer) == 300


def test_validate_data_dumps_are_complete_or_absent(tmp_path):
    from datasets import Dataset

    from xlabml.datamodules import XLabDataModule

    long_word = "x" * 5000  # longer than max_sentence_length with nowhere to split: listed as hard_split
    dm = XLabDataModule(num_tokens=300, tokenizer_path=str(tmp_path / "unused.model"))
    dm._texts = {"train": Dataset.from_dict({"text": ["fine text", long_word, "more fine text"]})}
    dumps = tmp_path / "dumps"
    with pytest.raises(OSError), disk_full_after(1000):
        dm.validate_data("train", str(dumps))
    assert os.listdir(dumps) == []  # before: a 1000-byte train-1.txt that the next run refused to overwrite
    report = dm.validate_data("train", str(dumps))
    assert "train,1,hard_split,5000,5000," in report
    assert (dumps / "train-1.txt").read_text(encoding="utf-8") == long_word and os.listdir(dumps) == ["train-1.txt"]


def test_download_is_atomic_and_never_overwrites(tmp_path, monkeypatch):
    import io
    import urllib.request

    from xlabml import datamodules

    payload = b"tokenizer bytes " * 100

    class Response(io.BytesIO):
        def __init__(self, fail: bool):
            super().__init__(payload)
            self.fail = fail

        def read(self, size=-1):
            if self.fail and self.tell() >= len(payload) // 2:
                raise ConnectionResetError("connection reset by peer")
            return super().read(min(size, 64) if size and size > 0 else 64)

    path = tmp_path / "tok" / "downloaded.model"
    monkeypatch.setattr(urllib.request, "urlopen", lambda url, timeout: Response(fail=True))
    with pytest.raises(ConnectionError, match="connection reset"):
        datamodules._download("http://example.invalid/t.model", str(path))
    assert os.listdir(path.parent) == []
    monkeypatch.setattr(urllib.request, "urlopen", lambda url, timeout: Response(fail=False))
    datamodules._download("http://example.invalid/t.model", str(path))
    assert path.read_bytes() == payload and os.listdir(path.parent) == ["downloaded.model"]
    with pytest.raises(FileExistsError, match="refusing to overwrite"):
        datamodules._download("http://example.invalid/t.model", str(path))
    assert path.read_bytes() == payload
