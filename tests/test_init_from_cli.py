"""model.init_from through the xlab command: a new run from a checkpoint's weights (architecture from the checkpoint,
conflicts and wrong tokenizers one line), partial warm starts, Hugging Face sources, and fit --ckpt_path refusing
weights-only checkpoints."""
import os
from pathlib import Path

import pytest
import torch
import yaml

from xlabml.checkpoints import CheckpointWarning, export_checkpoint, load_checkpoint, read_checkpoint
from xlabml.cli import XLabCLI, main

NUM_TOKENS = 512
SEQ_LEN = 32
FROZEN = {"model": {"optimizer": {"class_path": "torch.optim.SGD", "init_args": {"lr": 0.0}}}}  # weights stay put


@pytest.fixture(autouse=True)
def restore_determinism():
    enabled = torch.are_deterministic_algorithms_enabled()
    yield
    torch.use_deterministic_algorithms(enabled)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """A tokenizer, an encoded-data cache and a config of data and trainer only (the model: conf/defaults.yaml)."""
    from xlabml.datamodules import XLabDataModule

    root = tmp_path_factory.mktemp("init-data")
    config = {
        "trainer": {"max_steps": 2, "val_check_interval": 2, "limit_val_batches": 1, "num_sanity_val_steps": 0,
                    "log_every_n_steps": 1, "enable_progress_bar": False, "enable_model_summary": False},
        "data": {"locations": {"builtin": "python-topics"}, "num_tokens": NUM_TOKENS, "seq_len": SEQ_LEN,
                 "batch_size": 4, "num_proc": 1, "tokenizer_path": str(root / "tokenizer.model"),
                 "cache_dir": str(root / "cache")},
    }
    XLabDataModule(**config["data"]).prepare_data()
    (root / "data.yaml").write_text(yaml.safe_dump(config))
    (root / "frozen.yaml").write_text(yaml.safe_dump(FROZEN))
    return root


@pytest.fixture
def run(tmp_path, monkeypatch, capsys):
    """Run ``xlab ARGS`` in-process from tmp_path; returns (exit code, stdout, stderr)."""
    monkeypatch.chdir(tmp_path)

    def _run(*args):
        code = 0
        try:
            main(list(args))
        except SystemExit as exit:
            code = exit.code if isinstance(exit.code, int) else 1
        out, err = capsys.readouterr()
        return code, out, err

    return _run


@pytest.fixture(scope="module")
def base(data, tmp_path_factory):
    """A 4-step run of a 1-layer model with dropout: the model fine-tuned from."""
    root = tmp_path_factory.mktemp("base")
    cwd = os.getcwd()
    os.chdir(root)
    try:
        main(["fit", "-c", str(data / "data.yaml"), "--trainer.max_steps", "4", "--model.d_model", "32",
              "--model.n_layers", "1", "--model.n_heads", "2", "--model.d_ff", "64", "--model.dropout", "0.1"])
    finally:
        os.chdir(cwd)
    return root / "logs" / "version_0" / "checkpoints" / "last.ckpt"


def _last_line(err: str) -> str:
    return err.strip().splitlines()[-1]


def _config(data):
    return ["-c", str(data / "data.yaml"), "-c", str(data / "frozen.yaml")]


def test_fine_tune_is_a_new_run_from_the_weights_and_outlives_them(run, data, base, tmp_path, recwarn):
    # conf/defaults.yaml's model (d_model 128, 4 layers) is not a setting of the user: the checkpoint's replaces it
    code, _, err = run("fit", *_config(data), "--model.init_from", str(base))
    assert code == 0, err
    assert not [w for w in recwarn if issubclass(w.category, CheckpointWarning)]
    last = tmp_path / "logs" / "version_0" / "checkpoints" / "last.ckpt"
    tuned, source = read_checkpoint(last), read_checkpoint(base)
    assert source["global_step"] == 4 and tuned["global_step"] == 2  # a new run: its own progress...
    assert tuned["optimizer_states"][0]["param_groups"][0]["lr"] == 0.0  # ... optimizer ...
    hparams = tuned["hyper_parameters"]
    assert (hparams["d_model"], hparams["n_layers"], hparams["n_heads"], hparams["d_ff"]) == (32, 1, 2, 64)
    assert hparams["dropout"] == 0.0 and source["hyper_parameters"]["dropout"] == 0.1  # a run setting: configured
    assert hparams["init_from"] == str(base)  # provenance
    assert tuned["state_dict"].keys() == source["state_dict"].keys()
    for name, tensor in source["state_dict"].items():  # lr 0: the weights are exactly the checkpoint's
        assert torch.equal(tuned["state_dict"][name], tensor), name
    # the fine-tuned checkpoint loads, and resumes, without the file it started from
    moved = base.with_name("moved.ckpt")
    base.rename(moved)
    try:
        loaded = load_checkpoint(last, tokenizer=False).model
        loaded.setup("validate")  # a model loaded from a checkpoint keeps its weights: init_from is not applied
        assert loaded.hparams["d_model"] == 32 and torch.equal(loaded.model.head.weight,
                                                                tuned["state_dict"]["model.head.weight"])
        code, _, err = run("fit", *_config(data), "--ckpt_path", str(last), "--trainer.max_steps", "3")
        assert code == 0, err  # init_from is not applied again on resume
        assert read_checkpoint(tmp_path / "logs" / "version_1" / "checkpoints" / "last.ckpt")["global_step"] == 3
    finally:
        moved.rename(base)


def test_finetune_overlay_trains_the_checkpoint_with_its_own_optimizer(run, data, base, tmp_path):
    repo = Path(__file__).resolve().parent.parent
    code, _, err = run("fit", "-c", str(data / "data.yaml"), "-c", str(repo / "conf" / "extra" / "finetune.yaml"),
                       "--model.init_from", str(base))
    assert code == 0, err
    tuned = read_checkpoint(tmp_path / "logs" / "version_0" / "checkpoints" / "last.ckpt")
    source = read_checkpoint(base)
    assert tuned["hyper_parameters"]["d_model"] == 32 and tuned["global_step"] == 2
    groups = tuned["optimizer_states"][0]["param_groups"]
    assert [(g["initial_lr"], g["weight_decay"]) for g in groups] == [(3e-4, 0.1), (3e-4, 0.0)]
    assert tuned["lr_schedulers"][0]["warmup_steps"] == 20 and 0 < groups[0]["lr"] < 3e-4  # warming up
    moved = [k for k, v in source["state_dict"].items() if not torch.equal(tuned["state_dict"][k], v)]
    assert moved and len(moved) == len(source["state_dict"])  # every weight took a step from the checkpoint's
    for key in moved:  # ... a small one: lr <= 3e-5 for two steps
        assert (tuned["state_dict"][key] - source["state_dict"][key]).abs().max() < 1e-4, key


def test_validate_from_init_from_equals_validate_of_the_checkpoint(run, data, base):
    losses = []
    for flag in ("--model.init_from", "--ckpt_path"):
        code, out, err = run("validate", "-c", str(data / "data.yaml"), flag, str(base), "--trainer.logger", "false")
        assert code == 0, err
        losses.append(next(line for line in out.splitlines() if "val_loss" in line))
    assert losses[0] == losses[1]


def test_conflicting_settings_are_one_line_errors(run, data, base, tmp_path):
    code, _, err = run("fit", *_config(data), "--model.init_from", str(base), "--model.d_model", "64")
    assert code == 1
    assert _last_line(err) == (f"xlab: error: model.init_from {base} has d_model=32 but model.d_model=64 is set: a run "
                               "starting from its weights keeps their architecture (drop the setting, or copy some "
                               "weights only with init_from.only)")
    conflicting = tmp_path / "arch.yaml"
    conflicting.write_text(yaml.safe_dump({"model": {"position": "rope"}}))
    code, _, err = run("fit", *_config(data), "-c", str(conflicting), "--model.init_from", str(base))
    assert code == 1 and "has position='sinusoidal' but model.position='rope' is set" in _last_line(err)
    code, _, err = run("fit", *_config(data), "--model.init_from", str(base), "--data.seq_len", str(2 * SEQ_LEN))
    assert code == 1
    assert _last_line(err) == (f"xlab: error: data.seq_len={2 * SEQ_LEN} exceeds the model of model.init_from {base} "
                               f"max_len={SEQ_LEN}")
    code, _, err = run("fit", *_config(data), "--model.init_from", str(tmp_path / "missing.ckpt"))
    assert code == 1 and _last_line(err) == (f"xlab: error: init_from: {tmp_path / 'missing.ckpt'} not found "
                                             "(expected an XLab checkpoint or a Hugging Face model directory)")
    assert not (tmp_path / "logs").exists()


def test_wrong_tokenizer_fails_before_anything_is_encoded(run, data, base, tmp_path):
    from xlabml.corpus import load_builtin_corpus
    from xlabml.tokenizer import Tokenizer, TokenizerTrainer

    ours = Tokenizer.load(data / "tokenizer.model")
    other = TokenizerTrainer().train(load_builtin_corpus("python-topics")["text"][30:], NUM_TOKENS,
                                     tmp_path / "other.model")
    assert len(other) == len(ours) and other.content_hash != ours.content_hash
    code, _, err = run("fit", *_config(data), "--model.init_from", str(base), "--data.tokenizer_path",
                       str(other.path), "--data.cache_dir", str(tmp_path / "cache"))
    assert code == 1
    assert _last_line(err) == (
        f"xlab: error: tokenizer {other.path} (content hash {other.content_hash}) is not the model's tokenizer: "
        f"the checkpoint was trained with {ours.path} (content hash {ours.content_hash})")
    assert not (tmp_path / "logs").exists() and not (tmp_path / "cache").exists()
    # blocks mean the same under any tokenizer: copying them only needs no check; the embedding does
    blocks = tmp_path / "blocks.yaml"
    blocks.write_text(yaml.safe_dump({"model": {"d_model": 32, "n_layers": 1, "n_heads": 2, "d_ff": 64,
                                                "init_from": {"path": str(base), "only": ["blocks"]}}}))
    other_data = ["--data.tokenizer_path", str(other.path), "--data.cache_dir", str(tmp_path / "cache")]
    code, _, err = run("fit", *_config(data), "-c", str(blocks), *other_data, "--trainer.max_steps", "1")
    assert code == 0, err
    tuned = read_checkpoint(tmp_path / "logs" / "version_0" / "checkpoints" / "last.ckpt")["state_dict"]
    source = read_checkpoint(base)["state_dict"]
    assert torch.equal(tuned["model.blocks.0.attn.qkv.weight"], source["model.blocks.0.attn.qkv.weight"])  # lr 0
    assert not torch.equal(tuned["model.embedding.weight"], source["model.embedding.weight"])
    code, _, err = run("fit", *_config(data), "-c", str(blocks), *other_data, "--model.init_from.only", "[embedding]")
    assert code == 1 and "is not the model's tokenizer" in _last_line(err)


def test_partial_warm_start_copies_the_selected_weights_into_the_configured_model(run, data, base, tmp_path):
    partial = tmp_path / "partial.yaml"
    partial.write_text(yaml.safe_dump({"model": {"d_model": 32, "n_layers": 2, "n_heads": 4, "d_ff": 48,
                                                 "init_from": {"path": str(base), "only": ["embedding"]}}}))
    code, _, err = run("fit", *_config(data), "-c", str(partial))
    assert code == 0, err
    tuned = read_checkpoint(tmp_path / "logs" / "version_0" / "checkpoints" / "last.ckpt")
    source = read_checkpoint(base)["state_dict"]
    assert tuned["hyper_parameters"]["n_layers"] == 2 and tuned["hyper_parameters"]["d_ff"] == 48  # configured
    assert torch.equal(tuned["state_dict"]["model.embedding.weight"], source["model.embedding.weight"])
    assert not torch.equal(tuned["state_dict"]["model.head.weight"], source["model.head.weight"])
    code, _, err = run("fit", *_config(data), "-c", str(partial), "--model.d_model", "48", "--model.n_heads", "4")
    assert code == 1
    assert _last_line(err) == (f"xlab: error: init_from: embedding.weight has shape ({NUM_TOKENS}, 32) in {base} but "
                               f"({NUM_TOKENS}, 48) in the model")


def test_weights_only_checkpoints_start_runs_but_do_not_resume(run, data, base, tmp_path):
    export, _ = export_checkpoint(base, tmp_path / "exports")
    code, _, err = run("fit", *_config(data), "--ckpt_path", str(export))
    assert code == 1
    assert _last_line(err) == (f"xlab: error: --ckpt_path {export} holds weights only (an export or an import: no "
                               "optimizer state nor progress), so fit cannot resume it; to start a new run from its "
                               f"weights use --model.init_from {export}")
    assert not (tmp_path / "logs").exists()
    instance = XLabCLI(args=["fit", *_config(data), "--model.init_from", str(export), "--trainer.max_steps", "0",
                             "--trainer.logger", "false"])
    assert instance.model.hparams["d_model"] == 32 and instance.model.init_from == (str(export), None)
    assert instance.model.init_from_done and torch.equal(instance.model.model.head.weight.detach(),
                                                         read_checkpoint(base)["state_dict"]["model.head.weight"])


def test_hugging_face_directory_gives_architecture_and_weights_with_a_warning(run, data, tmp_path):
    transformers = pytest.importorskip("transformers")
    from xlabml.interop.hf import import_hf

    config = transformers.LlamaConfig(vocab_size=NUM_TOKENS, hidden_size=32, intermediate_size=48,
                                      num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                                      max_position_embeddings=64, rms_norm_eps=1e-5)
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(config)
    hf.save_pretrained(tmp_path / "hf")
    with pytest.warns(CheckpointWarning) as record:
        code, _, err = run("fit", *_config(data), "--model.init_from", str(tmp_path / "hf"))
    assert code == 0, err
    assert [str(w.message) for w in record if issubclass(w.category, CheckpointWarning)] == [
        f"model.init_from {tmp_path / 'hf'} records no tokenizer hash (a Hugging Face model, or weights imported "
        f"without an XLab tokenizer): cannot check that the data's tokenizer {data / 'tokenizer.model'} is the one "
        "its weights were trained with"]
    tuned = read_checkpoint(tmp_path / "logs" / "version_0" / "checkpoints" / "last.ckpt")
    hparams = tuned["hyper_parameters"]
    assert (hparams["position"], hparams["norm"], hparams["ffn"], hparams["n_kv_heads"], hparams["max_len"]) == (
        "rope", "rmsnorm", "swiglu", 1, 64)
    assert torch.equal(tuned["state_dict"]["model.embedding.weight"], hf.model.embed_tokens.weight)
    assert torch.equal(tuned["state_dict"]["model.blocks.0.attn.proj.weight"],
                       hf.model.layers[0].self_attn.o_proj.weight)
    # imported without an XLab tokenizer: weights only, no tokenizer hash; a new run may start from it, not resume it
    imported, tokenizer, _ = import_hf(tmp_path / "hf", tmp_path / "imported.ckpt")
    assert tokenizer is None
    code, _, err = run("fit", *_config(data), "--ckpt_path", str(imported))
    assert code == 1 and "--model.init_from" in _last_line(err)
    with pytest.warns(CheckpointWarning, match=f"model.init_from {imported} records no tokenizer hash"):
        instance = XLabCLI(args=["fit", *_config(data), "--model.init_from", str(imported), "--trainer.max_steps",
                                 "0", "--trainer.logger", "false"])
    assert instance.model.hparams["position"] == "rope" and instance.model.hparams["d_model"] == 32
