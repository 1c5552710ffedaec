"""manage.py export-checkpoint: slim, content-named, atomic, never overwriting, carrying the tokenizer's identity,
loadable by torch, Lightning and the loader."""
import hashlib
import json
import os
import re
import resource
from pathlib import Path

import pytest
import torch
import yaml

from xlabml.checkpoints import export_checkpoint, load_checkpoint
from xlabml.manage import main

REPO = Path(__file__).resolve().parent.parent


def _fit(root: Path, **model) -> Path:
    """Train a tiny model for 4 steps in `root`; returns its last.ckpt."""
    config = {
        "trainer": {"max_steps": 4, "val_check_interval": 2, "limit_val_batches": 1, "num_sanity_val_steps": 0,
                    "enable_progress_bar": False, "enable_model_summary": False},
        "data": {"locations": {"builtin": "python-topics"}, "num_tokens": 512, "seq_len": 32, "batch_size": 4,
                 "tokenizer_path": str(root.parent / "tokenizer.model"), "cache_dir": str(root.parent / "cache")},
        "model": {"d_model": 32, "n_layers": 1, "n_heads": 2, "d_ff": 64, **model},
    }
    (root / "tiny.yaml").write_text(yaml.safe_dump(config))
    from xlabml.cli import main as xlab

    cwd, deterministic = os.getcwd(), torch.are_deterministic_algorithms_enabled()
    os.chdir(root)
    try:
        xlab(["fit", "-c", "tiny.yaml"])
    finally:
        os.chdir(cwd)
        torch.use_deterministic_algorithms(deterministic)
    return root / "logs" / "version_0" / "checkpoints" / "last.ckpt"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    root = tmp_path_factory.mktemp("export") / "run"
    root.mkdir()
    return _fit(root)


def test_export_is_slim_content_named_and_loads_everywhere(checkpoint, tmp_path):
    path, written = export_checkpoint(checkpoint, tmp_path / "exports")
    assert written
    data = path.read_bytes()
    assert re.fullmatch(r"last-[0-9a-f]{8}\.ckpt", path.name)
    assert path.name == f"last-{hashlib.sha256(data).hexdigest()[:8]}.ckpt"
    # weights only, no AdamW moments: about a third of the training checkpoint
    ratio = path.stat().st_size / checkpoint.stat().st_size
    assert 0.25 < ratio < 0.40, ratio
    exported = torch.load(path, weights_only=True)
    assert "optimizer_states" not in exported and "loops" not in exported and "callbacks" not in exported
    training = torch.load(checkpoint, weights_only=True)
    assert exported["hyper_parameters"] == training["hyper_parameters"]
    assert exported["XLabDataModule"] == training["XLabDataModule"]  # the tokenizer's identity travels along
    (score,) = [s["current_score"] for s in training["callbacks"].values() if s.get("monitor") == "val_loss"]
    assert exported["metrics"] == {"val_loss": float(score)}
    for name, tensor in training["state_dict"].items():
        assert torch.equal(exported["state_dict"][name], tensor), name

    from xlabml.datamodules import XLabDataModule
    from xlabml.models import XLabModel

    model = XLabModel.load_from_checkpoint(path, map_location="cpu")
    assert model.hparams["n_vocab"] == 512 and model.hparams["max_len"] == 32
    for name, tensor in training["state_dict"].items():
        assert torch.equal(model.state_dict()[name], tensor), name
    tokenizer_path = XLabDataModule.load_from_checkpoint(path, map_location="cpu").tokenizer_path
    assert tokenizer_path == training["datamodule_hyper_parameters"]["tokenizer_path"]
    assert Path(tokenizer_path).is_file()


def test_export_never_overwrites(checkpoint, tmp_path, capsys):
    main(["export-checkpoint", str(checkpoint), "-o", str(tmp_path)])
    first = capsys.readouterr().out
    (path,) = tmp_path.iterdir()
    assert first.startswith(f"exported {path}")
    stat = path.stat()
    main(["export-checkpoint", str(checkpoint), "-o", str(tmp_path)])
    assert capsys.readouterr().out.strip() == f"{path} already exists with this content; nothing written"
    assert list(tmp_path.iterdir()) == [path] and path.stat().st_mtime_ns == stat.st_mtime_ns
    # A different file squatting on the name is left alone, and the export fails with one line.
    path.write_bytes(b"something else")
    path.with_suffix(".json").write_text("{}")  # (irrelevant for ckpt: only the main file counts)
    with pytest.raises(SystemExit) as exit:
        main(["export-checkpoint", str(checkpoint), "-o", str(tmp_path)])
    assert exit.value.code == 1
    err = capsys.readouterr().err.strip()
    assert err == f"xlab-manage: error: {path} exists with different content; refusing to overwrite it"
    assert path.read_bytes() == b"something else"


def test_safetensors_export_with_json_hyperparameters(checkpoint, tmp_path):
    path, written = export_checkpoint(checkpoint, tmp_path, format="safetensors")
    assert written and path.suffix == ".safetensors"
    sidecar = path.with_suffix(".json")
    meta = json.loads(sidecar.read_text())
    assert meta["hyper_parameters"]["n_vocab"] == 512
    assert meta["XLabDataModule"] == torch.load(checkpoint, weights_only=True)["XLabDataModule"]
    assert meta["datamodule_hyper_parameters"]["tokenizer_path"].endswith("tokenizer.model")
    from safetensors.torch import load_file

    tensors = load_file(str(path))
    training = torch.load(checkpoint, weights_only=True)["state_dict"]
    assert set(tensors) == set(training)
    model = load_checkpoint(path).model
    for name, tensor in training.items():
        assert torch.equal(model.state_dict()[name], tensor), name


@pytest.mark.slow
def test_tied_embeddings_survive_both_formats(tmp_path):
    root = tmp_path / "run"
    root.mkdir()
    ckpt = _fit(root, tie_embeddings=True, position="rope", norm="rmsnorm", ffn="swiglu", n_kv_heads=1)
    for format in ("ckpt", "safetensors"):
        path, _ = export_checkpoint(ckpt, tmp_path / "exports", format=format)
        model = load_checkpoint(path).model
        assert model.model.head.weight is model.model.embedding.weight
        assert torch.equal(model.model.embedding.weight,
                           torch.load(ckpt, weights_only=True)["state_dict"]["model.embedding.weight"])


def test_errors_are_one_line(tmp_path, capsys):
    not_a_checkpoint = tmp_path / "notes.ckpt"
    not_a_checkpoint.write_text("hello")
    for target, expected in ((tmp_path / "missing.ckpt", "not found"),
                             (not_a_checkpoint, "is not a loadable checkpoint")):
        with pytest.raises(SystemExit) as exit:
            main(["export-checkpoint", str(target), "-o", str(tmp_path / "out")])
        assert exit.value.code == 1
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and expected in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_ctrl_c_exits_130_without_a_traceback(tmp_path, capsys, monkeypatch):
    from xlabml import manage

    def interrupted(args):
        raise KeyboardInterrupt
    command = manage.COMMANDS["export-checkpoint"]
    monkeypatch.setitem(manage.COMMANDS, "export-checkpoint", command._replace(run=interrupted))
    with pytest.raises(SystemExit) as exit:
        main(["export-checkpoint", str(tmp_path / "any.ckpt"), "-o", str(tmp_path / "out")])
    assert exit.value.code == 130 and "Traceback" not in capsys.readouterr().err


def test_export_is_atomic_when_the_disk_fills_up(checkpoint, tmp_path):
    reference, _ = export_checkpoint(checkpoint, tmp_path / "reference")
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (reference.stat().st_size // 2, hard))  # writes past it fail
    try:
        with pytest.raises(OSError, match="File too large"):
            export_checkpoint(checkpoint, tmp_path / "out")
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    assert os.listdir(tmp_path / "out") == []  # before: a truncated export, which blocked the next one
    path, written = export_checkpoint(checkpoint, tmp_path / "out")
    assert written and path.read_bytes() == reference.read_bytes()


def test_export_refuses_a_checkpoint_whose_tokenizer_was_replaced(checkpoint, tmp_path, capsys):
    from xlabml.tokenizer import Tokenizer, TokenizerTrainer

    training = torch.load(checkpoint, weights_only=True)
    ours = Tokenizer.load(training["datamodule_hyper_parameters"]["tokenizer_path"])
    retrained = tmp_path / "tokenizer.model"  # the same path, retrained on other text
    TokenizerTrainer().train([f"{i} other words {i * 7}" for i in range(3000)], len(ours), retrained)
    training["datamodule_hyper_parameters"] = {**training["datamodule_hyper_parameters"],
                                               "tokenizer_path": str(retrained)}
    moved = tmp_path / "moved.ckpt"
    torch.save(training, moved)
    with pytest.raises(SystemExit) as exit:
        main(["export-checkpoint", str(moved), "-o", str(tmp_path / "out")])
    assert exit.value.code == 1
    other = Tokenizer.load(retrained)
    assert capsys.readouterr().err == (
        f"xlab-manage: error: tokenizer {retrained} (content hash {other.content_hash}) is not the model's "
        f"tokenizer: checkpoint {moved} was trained with {ours.path} (content hash {ours.content_hash})\n")
    assert not (tmp_path / "out").exists()
