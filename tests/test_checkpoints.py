"""The one checkpoint loader: three formats, one set of rules (runtime overrides, flash fallback, tokenizer identity,
one-line errors), the public API on top of it, Lightning's restore checking the tokenizer for every stage, and
atomic Lightning checkpoints. A tiny model is trained once (2 steps) on the built-in corpus."""
import hashlib
import importlib.util
import io
import os
import resource
import shutil
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from lightning.pytorch import Callback, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint

from xlabml.checkpoints import (
    CheckpointWarning, LoadedCheckpoint, TokenizerMismatchError, XLabCheckpointIO, _target_device,
    export_checkpoint, load_checkpoint, load_datamodule, read_checkpoint, with_atomic_checkpoints,
)
from xlabml.datamodules import XLabDataModule
from xlabml.layers import NaiveKernel, SDPAKernel
from xlabml.models import XLabModel
from xlabml.tokenizer import Tokenizer, TokenizerTrainer

NUM_TOKENS, SEQ_LEN = 400, 16
MODEL = dict(d_model=32, n_layers=1, n_heads=2, d_ff=64, dropout=0.0)


def _data(tokenizer_path, cache, **kwargs) -> XLabDataModule:
    return XLabDataModule(locations={"builtin": "python-topics"}, num_tokens=NUM_TOKENS, tokenizer_path=str(tokenizer_path),
                          seq_len=SEQ_LEN, batch_size=4, cache_dir=str(cache), **kwargs)


def _trainer(root: Path, **kwargs) -> Trainer:
    defaults = dict(max_steps=2, logger=False, enable_progress_bar=False, enable_model_summary=False,
                    default_root_dir=root, val_check_interval=2, limit_val_batches=1, limit_test_batches=1,
                    limit_predict_batches=1, enable_checkpointing=False, plugins=[XLabCheckpointIO()])
    return Trainer(**{**defaults, **kwargs})


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A 2-step fit; its last.ckpt, both exports, the tokenizer and another tokenizer of the same size."""
    root = tmp_path_factory.mktemp("checkpoints")
    from xlabml.corpus import load_builtin_corpus

    texts = load_builtin_corpus("python-topics")["text"]
    tokenizer = TokenizerTrainer().train(texts[:40], NUM_TOKENS, root / "tok.model")
    other = TokenizerTrainer().train(texts[40:], NUM_TOKENS, root / "other.model")  # same size, other content
    torch.manual_seed(0)
    model = XLabModel(NUM_TOKENS, SEQ_LEN, **MODEL)
    trainer = _trainer(root, enable_checkpointing=True,
                       callbacks=[ModelCheckpoint(dirpath=root / "ckpts", monitor="val_loss", save_last=True)])
    trainer.fit(model, _data(tokenizer.path, root / "cache"))
    last = root / "ckpts" / "last.ckpt"
    exports = {fmt: export_checkpoint(last, root / "exports", fmt)[0] for fmt in ("ckpt", "safetensors")}
    return {"root": root, "last": last, "exports": exports, "tokenizer": tokenizer, "other": other}


def _variant(run, tmp_path, name="variant.ckpt", **changes) -> Path:
    """A copy of the training checkpoint with top-level keys changed (None: removed) or hparams updated."""
    checkpoint = torch.load(run["last"], weights_only=True)
    hparams = changes.pop("hparams", None)
    if hparams:
        checkpoint["hyper_parameters"] = {**checkpoint["hyper_parameters"], **hparams}
    for key, value in changes.items():
        if value is None:
            checkpoint.pop(key, None)
        else:
            checkpoint[key] = value
    path = tmp_path / name
    torch.save(checkpoint, path)
    return path


def _logits(model, seed=0):
    x = torch.randint(4, NUM_TOKENS, (2, SEQ_LEN), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model.eval()(x)


# ------------------------------------------------------------------------------------------ tokenizer identity


def test_content_hash_is_the_identity_of_the_model_file(run, tmp_path):
    tokenizer, other = run["tokenizer"], run["other"]
    assert tokenizer.content_hash == hashlib.sha256(Path(tokenizer.path).read_bytes()).hexdigest()[:16]
    copy = tmp_path / "elsewhere.model"
    shutil.copy(tokenizer.path, copy)
    assert Tokenizer.load(copy).content_hash == tokenizer.content_hash  # the content, not the path
    assert len(other) == len(tokenizer) and other.content_hash != tokenizer.content_hash


def test_training_checkpoint_records_the_tokenizer(run):
    checkpoint = torch.load(run["last"], weights_only=True)
    assert checkpoint["XLabDataModule"] == {"tokenizer_hash": run["tokenizer"].content_hash,
                                            "tokenizer_path": run["tokenizer"].path}


# ---------------------------------------------------------------------------------------------- formats


def test_three_formats_load_the_same_model_and_metadata(run):
    training = torch.load(run["last"], weights_only=True)
    (monitored,) = [s["current_score"] for s in training["callbacks"].values() if s.get("monitor") == "val_loss"]
    loaded = {fmt: load_checkpoint(path) for fmt, path in
              (("training", run["last"]), ("export", run["exports"]["ckpt"]),
               ("safetensors", run["exports"]["safetensors"]))}
    reference = _logits(loaded["training"].model)
    for fmt, result in loaded.items():
        assert isinstance(result, LoadedCheckpoint) and result.format == fmt
        for name, tensor in training["state_dict"].items():
            assert torch.equal(result.model.state_dict()[name], tensor), (fmt, name)
        assert torch.equal(_logits(result.model), reference)
        assert result.hparams == {k: v for k, v in training["hyper_parameters"].items() if not k.startswith("_")}
        assert result.data_hparams["tokenizer_path"] == run["tokenizer"].path
        assert result.tokenizer_path == run["tokenizer"].path
        assert result.tokenizer_hash == result.tokenizer.content_hash == run["tokenizer"].content_hash
        assert (result.global_step, result.epoch) == (2, 0)
        assert result.metrics == {"val_loss": pytest.approx(float(monitored))}
        assert result.lightning_version == training["pytorch-lightning_version"]
    no_tokenizer = load_checkpoint(run["exports"]["safetensors"], tokenizer=False)
    assert no_tokenizer.tokenizer is None and no_tokenizer.tokenizer_path == run["tokenizer"].path


def test_map_location_follows_lightnings_rules(run):
    for location in ("cpu", torch.device("cpu"), None, {"cpu": "cpu"}, lambda storage, loc: storage):
        assert load_checkpoint(run["last"], location, tokenizer=False).model.device == torch.device("cpu")
    # None: where it was saved, if that device exists here; a dict remaps saved locations; a function is asked
    assert _target_device(None, "cpu") == torch.device("cpu")
    assert _target_device(None, "cuda:1") == (torch.device("cuda:1") if torch.cuda.is_available() else
                                               torch.device("cpu"))
    assert _target_device({"cuda:0": "cpu"}, "cuda:0") == torch.device("cpu")
    assert _target_device(lambda storage, loc: storage.cpu(), "cuda:0") == torch.device("cpu")
    assert _target_device("cuda:3", "cpu") == torch.device("cuda:3")


def test_a_gpu_checkpoint_loads_on_the_cpu(run, tmp_path, monkeypatch):
    """Tensors saved from cuda:0 (torch records the storage location): every reader maps them where they can go."""
    checkpoint = torch.load(run["last"], weights_only=True)
    with monkeypatch.context() as patch:
        patch.setattr(torch.serialization, "location_tag", lambda storage: "cuda:0")
        torch.save(checkpoint, tmp_path / "gpu.ckpt")
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="CUDA"):
            torch.load(tmp_path / "gpu.ckpt", weights_only=True)  # what a plain torch.load does here
    expected = "cuda:0" if torch.cuda.is_available() else "cpu"
    assert str(load_checkpoint(tmp_path / "gpu.ckpt").model.device) == expected  # None: saved device if there
    assert str(load_checkpoint(tmp_path / "gpu.ckpt", "cpu").model.device) == "cpu"
    assert XLabCheckpointIO().load_checkpoint(tmp_path / "gpu.ckpt")["global_step"] == 2  # Lightning's resume


def test_errors_are_one_line_and_name_the_file(run, tmp_path):
    garbage = tmp_path / "garbage.ckpt"
    garbage.write_bytes(b"not a checkpoint at all")
    foreign = tmp_path / "foreign.ckpt"
    torch.save({"weights": torch.ones(2)}, foreign)
    other_model = tmp_path / "other_model.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": {"hidden": 3, "lr": 0.1}}, other_model)
    lonely = tmp_path / "lonely.safetensors"
    shutil.copy(run["exports"]["safetensors"], lonely)
    broken_json = tmp_path / "broken.safetensors"
    shutil.copy(run["exports"]["safetensors"], broken_json)
    broken_json.with_suffix(".json").write_text("{not json")
    cases = [
        (tmp_path / "missing.ckpt", FileNotFoundError, "missing.ckpt not found"),
        (tmp_path, ValueError, "is a directory, expected a .ckpt or .safetensors file"),
        (garbage, ValueError, "garbage.ckpt is not a loadable checkpoint"),
        (foreign, ValueError, "foreign.ckpt is not an XLab checkpoint: it has no 'state_dict'"),
        (_variant(run, tmp_path, name="no_hparams.ckpt", hyper_parameters=None), ValueError,
         "no_hparams.ckpt has no 'hyper_parameters': the model cannot be rebuilt from it"),
        (other_model, ValueError, "other_model.ckpt is not a checkpoint of XLabModel: hyperparameters ['hidden', "
                                  "'lr'] are not arguments of it"),
        (lonely, FileNotFoundError, "lonely.json not found: a safetensors export needs its JSON"),
        (broken_json, ValueError, "broken.safetensors is not a loadable safetensors export"),
        (_variant(run, tmp_path, hparams={"d_model": 64}), ValueError,
         "variant.ckpt: the weights do not fit the model its hyperparameters describe"),
    ]
    for path, error, message in cases:
        with pytest.raises(error) as info:
            load_checkpoint(path)
        text = str(info.value)
        assert message in text and "\n" not in text and len(text) < 500, text
    with pytest.raises(ValueError, match=r"unknown overrides \['n_layer'\]: expected arguments of XLabModel"):
        load_checkpoint(run["last"], overrides={"n_layer": 2})


# ------------------------------------------------------------------------------------ runtime overrides


def test_runtime_settings_are_overridable(run):
    reference = _logits(load_checkpoint(run["last"]).model)
    loaded = load_checkpoint(run["last"], overrides={"attention": "naive", "compile": True, "debug": True})
    assert all(isinstance(block.attn.kernel, NaiveKernel) for block in loaded.model.model.blocks)
    assert loaded.hparams["compile"] is True and loaded.hparams["debug"] is True
    torch.testing.assert_close(_logits(loaded.model), reference, rtol=1e-5, atol=1e-5)  # the same function


@pytest.mark.skipif(importlib.util.find_spec("flash_attn") is not None,
                    reason="flash_attn is installed: a flash checkpoint loads as it is")
@pytest.mark.parametrize("fmt", ["training", "ckpt", "safetensors"])
def test_flash_checkpoint_loads_without_flash_attn(run, tmp_path, fmt):
    flash = _variant(run, tmp_path, name="flash.ckpt", hparams={"attention": "flash"})
    if fmt != "training":
        flash = export_checkpoint(flash, tmp_path / "exports", fmt)[0]
    reference = _logits(load_checkpoint(run["last"]).model)
    with pytest.warns(CheckpointWarning, match="was trained with attention='flash' but the flash_attn package is "
                                               r"not installed here: using attention='sdpa' \(the same function\)"):
        loaded = load_checkpoint(flash)
    assert loaded.hparams["attention"] == "sdpa"
    assert all(isinstance(block.attn.kernel, SDPAKernel) for block in loaded.model.model.blocks)
    assert torch.equal(_logits(loaded.model), reference)
    with pytest.warns(CheckpointWarning):  # the README's public API: it raised "needs the flash_attn package"
        model = XLabModel.load_from_checkpoint(flash, map_location="cpu")
    assert torch.equal(_logits(model), reference)
    with pytest.raises(ValueError, match="attention='flash' needs the flash_attn package"):
        load_checkpoint(flash, overrides={"attention": "flash"})  # asked for explicitly: no silent fallback


# ------------------------------------------------------------------------------------ tokenizer checks


def test_a_different_tokenizer_of_the_same_size_is_refused(run, tmp_path):
    tokenizer, other = run["tokenizer"], run["other"]
    for given in (other.path, other):
        with pytest.raises(TokenizerMismatchError) as info:
            load_checkpoint(run["last"], tokenizer=given)
        assert str(info.value) == (
            f"tokenizer {other.path} (content hash {other.content_hash}) is not the model's tokenizer: checkpoint "
            f"{run['last']} was trained with {tokenizer.path} (content hash {tokenizer.content_hash})")
    # the tokenizer at the path the checkpoint names was replaced (retrained): refused too
    replaced = tmp_path / "tok.model"
    shutil.copy(other.path, replaced)
    data = {**torch.load(run["last"], weights_only=True)["datamodule_hyper_parameters"], "tokenizer_path": str(replaced)}
    with pytest.raises(TokenizerMismatchError, match=f"tokenizer {replaced} \\(content hash {other.content_hash}\\)"):
        load_checkpoint(_variant(run, tmp_path, datamodule_hyper_parameters=data))
    assert load_checkpoint(run["last"], tokenizer=tokenizer.path).tokenizer.content_hash == tokenizer.content_hash


def test_a_checkpoint_without_a_hash_loads_with_a_warning(run, tmp_path, recwarn):
    old = _variant(run, tmp_path, name="old.ckpt", XLabDataModule=None)
    loaded = load_checkpoint(old, tokenizer=run["other"].path)  # cannot be told apart: a warning, not an error
    warnings = [w for w in recwarn if issubclass(w.category, CheckpointWarning)]
    assert [str(w.message) for w in warnings] == [
        f"checkpoint {old} records no tokenizer hash (written by an older xlabml): cannot check that tokenizer "
        f"{run['other'].path} is the one it was trained with"]
    assert loaded.tokenizer_hash is None and loaded.tokenizer.path == run["other"].path
    recwarn.clear()
    load_checkpoint(old, tokenizer=False)  # no tokenizer involved: nothing to warn about
    assert not [w for w in recwarn if issubclass(w.category, CheckpointWarning)]


# --------------------------------------------------------------------------------------------- public API


def test_public_api_reads_every_format_with_the_same_rules(run, tmp_path, monkeypatch):
    training = torch.load(run["last"], weights_only=True)
    model = XLabModel.load_from_checkpoint(run["exports"]["safetensors"], map_location="cpu", dropout=0.0)
    for name, tensor in training["state_dict"].items():  # a safetensors export: Lightning's own loader cannot
        assert torch.equal(model.state_dict()[name], tensor), name
    as_bytes = io.BytesIO(run["last"].read_bytes())  # file objects and URLs, as Lightning reads them
    for source in (as_bytes, run["last"].as_uri()):
        model = XLabModel.load_from_checkpoint(source, map_location="cpu")
        assert torch.equal(model.state_dict()["model.head.weight"], training["state_dict"]["model.head.weight"])
    with pytest.raises(FileNotFoundError, match="checkpoint file:///nowhere/x.ckpt not found"):
        XLabModel.load_from_checkpoint("file:///nowhere/x.ckpt")
    with pytest.raises(ValueError, match="is a directory, expected a .ckpt or .safetensors file"):
        XLabModel.load_from_checkpoint(tmp_path)  # one line, not an IsADirectoryError traceback
    # The data module resolves a relative tokenizer path from the checkpoint's folder, as the loader does.
    moved = tmp_path / "moved"
    moved.mkdir()
    shutil.copy(run["tokenizer"].path, moved / "tok.model")
    data = {**training["datamodule_hyper_parameters"], "tokenizer_path": "tok.model"}
    ckpt = _variant(run, moved, datamodule_hyper_parameters=data)
    monkeypatch.chdir(tmp_path)
    datamodule = XLabDataModule.load_from_checkpoint(ckpt, map_location="cpu")
    assert datamodule.tokenizer_path == str(moved / "tok.model") and datamodule.hparams.seq_len == SEQ_LEN
    shutil.copy(run["other"].path, moved / "tok.model")  # replaced by a retrained tokenizer of the same size
    with pytest.raises(TokenizerMismatchError, match="is not the model's tokenizer"):
        XLabDataModule.load_from_checkpoint(ckpt)


def test_datamodule_checks_a_tokenizer_still_to_be_made_before_encoding(run, tmp_path):
    datamodule = _data(tmp_path / "tokenizers" / "new.model", tmp_path / "cache")
    datamodule.load_state_dict({"tokenizer_hash": run["tokenizer"].content_hash,
                                "tokenizer_path": run["tokenizer"].path})
    with pytest.raises(TokenizerMismatchError, match=f"trained with {run['tokenizer'].path}"):
        datamodule.prepare_data()  # trains a new tokenizer: not the checkpoint's
    assert not list((tmp_path / "cache").glob("ids-*"))  # nothing encoded with it


# ------------------------------------------------------------------------------- Lightning's own restore


class _CountSteps(Callback):
    def __init__(self):
        self.steps = 0

    def on_train_batch_start(self, *args):
        self.steps += 1


@pytest.mark.parametrize("stage", ["fit", "validate", "test", "predict"])
def test_lightning_checks_the_tokenizer_when_it_restores_a_checkpoint(run, stage, monkeypatch):
    """Without the CLI: Trainer.<stage>(ckpt_path=...) restores XLabDataModule's state, which checks."""
    model = XLabModel(NUM_TOKENS, SEQ_LEN, **MODEL)
    steps = _CountSteps()
    wrong = _data(run["other"].path, run["root"] / "cache")
    with pytest.raises(TokenizerMismatchError, match=f"tokenizer {run['other'].path} .* is not the model's"):
        getattr(_trainer(run["root"], callbacks=[steps], max_steps=4), stage)(model, datamodule=wrong,
                                                                              ckpt_path=run["last"])
    assert steps.steps == 0  # before any training step
    right = _data(run["tokenizer"].path, run["root"] / "cache")
    restored = []
    monkeypatch.setattr(right, "load_state_dict", lambda state: restored.append(state))
    getattr(_trainer(run["root"], max_steps=3), stage)(model, datamodule=right, ckpt_path=run["last"])
    assert restored == [{"tokenizer_hash": run["tokenizer"].content_hash, "tokenizer_path": run["tokenizer"].path}]


# ------------------------------------------------------------------------------------ atomic checkpoints


@contextmanager
def disk_full_after(limit: int):
    """File writes past `limit` bytes fail (EFBIG), as on a full disk."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))


def test_checkpoint_io_keeps_the_previous_file_when_a_save_fails(run, tmp_path, monkeypatch):
    checkpoint_io = XLabCheckpointIO()
    target = tmp_path / "last.ckpt"
    first = torch.load(run["last"], weights_only=True)
    checkpoint_io.save_checkpoint(first, target)
    before = target.read_bytes()
    second = {**first, "global_step": 4}
    real_save = torch.save

    def save_half_then_fail(obj, f, *args, **kwargs):  # a serialiser that dies half way through the file
        real_save(obj, f, *args, **kwargs)
        with open(f, "r+b") as file:
            file.truncate(len(before) // 2)
        raise RuntimeError("killed half way")

    monkeypatch.setattr(torch, "save", save_half_then_fail)
    with pytest.raises(RuntimeError, match="killed half way"):
        checkpoint_io.save_checkpoint(second, target)
    monkeypatch.undo()
    assert target.read_bytes() == before and os.listdir(tmp_path) == ["last.ckpt"]
    with pytest.raises(RuntimeError), disk_full_after(len(before) // 2):  # the disk fills up
        checkpoint_io.save_checkpoint(second, target)
    assert target.read_bytes() == before and os.listdir(tmp_path) == ["last.ckpt"]
    checkpoint_io.save_checkpoint(second, target)
    assert checkpoint_io.load_checkpoint(target)["global_step"] == 4 and os.listdir(tmp_path) == ["last.ckpt"]


def test_atomic_checkpoint_io_is_added_unless_one_is_configured():
    from lightning.fabric.plugins.environments import LightningEnvironment
    from lightning.pytorch.plugins.io import AsyncCheckpointIO, TorchCheckpointIO
    from lightning.pytorch.strategies import DDPStrategy

    assert [type(p) for p in with_atomic_checkpoints(None)] == [XLabCheckpointIO]
    environment = LightningEnvironment()
    plugins = with_atomic_checkpoints(environment)
    assert plugins[0] is environment and isinstance(plugins[1], XLabCheckpointIO) and len(plugins) == 2
    own = TorchCheckpointIO()
    assert with_atomic_checkpoints([own]) == [own]  # the user's explicit choice stays
    wrapper = AsyncCheckpointIO()
    assert with_atomic_checkpoints([wrapper]) == [wrapper] and isinstance(wrapper.checkpoint_io, XLabCheckpointIO)
    strategy = DDPStrategy(checkpoint_io=own)
    assert with_atomic_checkpoints(None, strategy) == []  # Lightning refuses a second CheckpointIO
    assert with_atomic_checkpoints(None, "ddp")[0].__class__ is XLabCheckpointIO


def test_read_checkpoint_is_what_lightning_reads(run):
    """XLabCheckpointIO loads through read_checkpoint: the same errors, and exports, for --ckpt_path."""
    checkpoint_io = XLabCheckpointIO()
    assert checkpoint_io.load_checkpoint(run["exports"]["safetensors"])["global_step"] == 2
    assert read_checkpoint(run["exports"]["ckpt"])["xlab_export"] == 1
    with pytest.raises(FileNotFoundError, match="checkpoint .*nothing.ckpt not found"):
        checkpoint_io.load_checkpoint(run["root"] / "nothing.ckpt")


def test_load_datamodule_of_an_export_warns_once_without_a_hash(run, tmp_path, recwarn):
    old = _variant(run, tmp_path, name="old.ckpt", XLabDataModule=None)
    datamodule = load_datamodule(old)
    assert datamodule.tokenizer_path == run["tokenizer"].path
    assert [str(w.message) for w in recwarn if issubclass(w.category, CheckpointWarning)] == [
        f"checkpoint {old} records no tokenizer hash (written by an older xlabml): its tokenizer "
        f"{run['tokenizer'].path} cannot be checked"]
