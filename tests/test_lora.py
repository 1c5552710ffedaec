"""xlabml.lora: adapters as a transformation (identity at the start, only adapters train, merge exact to 1e-5, packing
composes), LoRA checkpoints (adapters + base reference, one-line errors for a missing or changed base), merge-lora,
a LoRA fit that learns, and an exactly resumable LoRA run through the xlab command."""
import math
import os
from functools import partial
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils.data import DataLoader

from interop_support import TINY, make_checkpoint, randomize

from xlabml import packed
from xlabml.checkpoints import CheckpointWarning, LORA_KEY, load_checkpoint, merge_lora_checkpoint, read_checkpoint
from xlabml.init_from import load_initial_weights
from xlabml.layers import Decoder
from xlabml.lora import (
    LoRALinear, adapter_keys, apply_lora, base_state_dict, lora_layers, merge_lora, trainable_parameters,
    weights_hash,
)
from xlabml.models import XLabModel

TEXT = ("To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer "
        "the slings and arrows of outrageous fortune, or to take arms against a sea of troubles.")
ALL = ["attn.qkv", "attn.proj", "ffn.fc", "ffn.proj", "head"]


def decoder(seed=0, **arch):
    torch.manual_seed(seed)
    return Decoder(**{**TINY, **arch}).eval()


def perturb_adapters(model, seed=1):
    """Random A and B making each update ``scaling * B A`` about a third of its base weight's scale (as after
    training: the adapters change every targeted layer's output, the activations keep their scale)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_a.copy_(torch.randn(layer.lora_a.shape, generator=generator) / layer.in_features ** 0.5)
            layer.lora_b.copy_(torch.randn(layer.lora_b.shape, generator=generator) / layer.rank ** 0.5
                               * layer.base.weight.std() / 3 * layer.in_features ** 0.5 / layer.scaling)


def char_batch():
    ids = torch.tensor([ord(c) for c in TEXT])
    starts = range(0, len(ids) - 33, 8)
    return {"x": torch.stack([ids[i:i + 32] for i in starts]), "y": torch.stack([ids[i + 1:i + 33] for i in starts])}


# ------------------------------------------------------------------------------------------- transformation


def test_wrapped_model_equals_the_base_and_only_adapters_train():
    model = randomize(decoder(), 0)
    x = torch.randint(0, TINY["n_vocab"], (2, 12))
    expected = model(x)
    plain_keys = list(model.state_dict())
    wrapped = apply_lora(model, rank=4, alpha=8)
    assert wrapped == [f"blocks.{i}.{t}" for i in range(2) for t in ("attn.qkv", "attn.proj", "ffn.fc", "ffn.proj")]
    assert torch.equal(model(x), expected)  # B = 0: exactly the base, bitwise
    # d_model 32, d_ff 64, qkv 32->96, proj 32->32, fc 32->64, proj 64->32: rank 4 * (128 + 64 + 96 + 96) per block
    assert trainable_parameters(model) == 2 * 4 * (128 + 64 + 96 + 96) == 3072
    assert {n for n, p in model.named_parameters() if p.requires_grad} == set(adapter_keys(model))
    # the base keeps the plain model's names; adapters add two entries per layer
    assert list(base_state_dict(model)) == plain_keys
    assert set(model.state_dict()) == set(plain_keys) | set(adapter_keys(model))


def test_optimizer_sees_only_the_adapters(tmp_path):
    base, _ = make_checkpoint(tmp_path / "base.ckpt", "tok.model", seed=1)
    model = XLabModel(**TINY, init_from=str(base), lora={"rank": 2, "targets": ["qkv", "head"]})
    optimizer = model.configure_optimizers()
    optimized = {id(p) for group in optimizer.param_groups for p in group["params"]}
    adapters = {id(p) for layer in lora_layers(model).values() for p in (layer.lora_a, layer.lora_b)}
    assert optimized == adapters
    assert sum(p.numel() for group in optimizer.param_groups for p in group["params"]) == \
        2 * 2 * (32 + 96) + 2 * (32 + TINY["n_vocab"])
    assert model.hparams["lora"] == {"rank": 2, "alpha": 16.0, "dropout": 0.0, "targets": ["qkv", "head"]}


VARIANTS = {
    "gelu": {},
    "modern": dict(position="rope", norm="rmsnorm", ffn="swiglu", n_kv_heads=2, tie_embeddings=True, bias=False),
    "relu-parallel": dict(ffn="relu", parallel_residual=True, qk_norm=True),
}


@settings(max_examples=12, deadline=None)
@given(variant=st.sampled_from(sorted(VARIANTS)), rank=st.integers(1, 8), alpha=st.floats(0.5, 64),
       targets=st.lists(st.sampled_from(ALL), min_size=1, max_size=5, unique=True), seed=st.integers(0, 2 ** 16))
def test_merged_logits_equal_unmerged(variant, rank, alpha, targets, seed):
    arch = VARIANTS[variant]
    if arch.get("tie_embeddings"):
        targets = [t for t in targets if t != "head"] or ["attn.qkv"]
    model = randomize(decoder(seed % 7, **arch), seed)
    apply_lora(model, rank=rank, alpha=alpha, targets=targets)
    perturb_adapters(model, seed)
    x = torch.randint(0, TINY["n_vocab"], (2, 16))
    with torch.no_grad():
        unmerged = model(x)
        assert not torch.allclose(unmerged, randomize(decoder(seed % 7, **arch), seed)(x), atol=1e-3)  # adapters act
        merge_lora(model)
        merged = model(x)
    assert not lora_layers(model) and all(type(m) is nn.Linear for n, m in model.named_modules() if n.endswith(
        tuple(targets)))
    torch.testing.assert_close(merged, unmerged, atol=1e-5, rtol=0)


def test_targets_by_path_end_and_one_line_errors():
    model = decoder()
    assert apply_lora(model, targets=["proj"]) == ["blocks.0.attn.proj", "blocks.0.ffn.proj", "blocks.1.attn.proj",
                                                   "blocks.1.ffn.proj"]
    assert apply_lora(decoder(), targets=["blocks.1.attn.qkv"]) == ["blocks.1.attn.qkv"]
    with pytest.raises(ValueError, match="has LoRA adapters already"):
        apply_lora(model)
    with pytest.raises(ValueError, match=r"^lora target 'attn' names Attention modules, not linear layers; the linear "
                                         r"layers are: attn.qkv, attn.proj, ffn.fc, ffn.proj, head$"):
        apply_lora(decoder(), targets=["attn"])
    with pytest.raises(ValueError, match=r"^lora target 'fc1' selects no linear layer"):
        apply_lora(decoder(), targets=["attn.qkv", "fc1"])
    with pytest.raises(ValueError, match="shares its weight with the token embedding"):
        apply_lora(decoder(tie_embeddings=True), targets=["head"])
    for bad, message in [({"rank": 0}, "lora.rank must be an integer >= 1, got 0"),
                         ({"alpha": -1}, "lora.alpha must be a number > 0, got -1"),
                         ({"dropout": 1.0}, r"lora.dropout must be in \[0, 1\), got 1.0"),
                         ({"targets": []}, "lora.targets must be a non-empty list")]:
        with pytest.raises(ValueError, match=message):
            apply_lora(decoder(), **bad)
    with pytest.raises(ValueError, match=r"model.lora: unknown keys \['r'\]; expected \['alpha', 'dropout', 'rank', "
                                         r"'targets'\]"):
        XLabModel(**TINY, init_from="base.ckpt", lora={"r": 4})
    with pytest.raises(ValueError, match="model.lora needs model.init_from"):
        XLabModel(**TINY, lora={"rank": 4})
    with pytest.raises(ValueError, match=r"model.lora needs the whole base model, but model.init_from.only="
                                         r"\['embedding'\] leaves the other weights random"):
        XLabModel(**TINY, lora={}, init_from={"path": "base.ckpt", "only": ["embedding"]})


def test_dropout_acts_on_the_adapter_input_only():
    base = nn.Linear(64, 64, bias=False)
    nn.init.zeros_(base.weight)  # the output is the update alone
    layer = LoRALinear(base, rank=64, alpha=64, dropout=0.5).train()
    with torch.no_grad():
        layer.lora_a.copy_(torch.eye(64))
        layer.lora_b.copy_(torch.eye(64))  # update = dropout(x), scaling 1
    x = torch.ones(8, 64)
    update = layer(x).detach()
    assert set(update.unique().tolist()) == {0.0, 2.0}  # each input dropped (0) or kept and rescaled (1 / 0.5)
    assert torch.equal(layer.eval()(x), x)  # no dropout in evaluation


def test_packing_packs_the_base_inside_the_adapter(monkeypatch):
    if not packed.supported():
        pytest.skip("this PyTorch build has no oneDNN linear packing")
    monkeypatch.setattr(packed, "MIN_PACKED_NUMEL", 0)
    model = randomize(decoder(), 3)
    apply_lora(model, rank=4)
    perturb_adapters(model)
    x = torch.randint(0, TINY["n_vocab"], (1, 9))
    with torch.inference_mode():
        expected = model(x)
        with packed.prepacked(model):
            ffn = model.blocks[0].ffn
            assert isinstance(ffn.fc, LoRALinear) and isinstance(ffn.fc.base, packed.PackedLinear)
            assert isinstance(ffn.act, nn.GELU)  # not fused: the activation follows the adapter's sum
            assert isinstance(model.head, packed.PackedLinear)  # untargeted linears pack as before
            assert sum(isinstance(m.base, packed.PackedLinear) for m in lora_layers(model).values()) == 8
            got = model(x)
            assert model.blocks[0].attn.qkv.base._packed is not None  # the packed path ran
    assert all(type(m.base) is nn.Linear for m in lora_layers(model).values())  # undone
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        merged = merge_lora(model)(x)
    torch.testing.assert_close(merged, expected, atol=1e-5, rtol=0)


def test_weights_hash_is_the_identity_of_the_weights():
    a, b = decoder(0).state_dict(), decoder(0).state_dict()
    assert weights_hash(a) == weights_hash(b) and len(weights_hash(a)) == 16
    b["head.bias"] = b["head.bias"].clone()
    b["head.bias"][0] += 1e-6
    assert weights_hash(a) != weights_hash(b)
    assert weights_hash({k: v.double() for k, v in a.items()}) != weights_hash(a)


def test_a_lora_fit_reduces_the_loss_below_the_unigram_entropy(tmp_path):
    torch.manual_seed(0)
    base = randomize(XLabModel(**TINY), 0)  # rich random features; the adapters must learn the task
    torch.save({"state_dict": base.state_dict(), "hyper_parameters": dict(base.hparams)}, tmp_path / "base.ckpt")
    model = XLabModel(**TINY, init_from=str(tmp_path / "base.ckpt"), lora={"rank": 8, "targets": ALL},
                      optimizer=partial(torch.optim.AdamW, lr=1e-2, weight_decay=0.0))
    with pytest.warns(CheckpointWarning, match="records no tokenizer hash"):
        model.apply_init_from()
    batch = char_batch()
    counts = torch.bincount(batch["y"].flatten()).float()
    p = counts[counts > 0] / counts.sum()
    unigram = float(-(p * p.log()).sum())  # the best loss without context
    optimizer = model.configure_optimizers()
    losses = []
    for _ in range(100):
        loss, _, _ = model.batch_loss(batch, accuracy=False)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[0] > math.log(TINY["n_vocab"]) - 0.5
    assert losses[-1] < 1.2 < unigram - 1.0, (losses[-1], unigram)
    # the base did not move
    assert weights_hash(base_state_dict(model.model)) == weights_hash(base.model.state_dict())


# ----------------------------------------------------------------------------------------------- checkpoints


@pytest.fixture
def lora_run(tmp_path):
    """A LoRA model on a saved base, its adapters perturbed, saved by a Lightning trainer: (model, checkpoint)."""
    import lightning as L

    base, _ = make_checkpoint(tmp_path / "base.ckpt", "tok.model", seed=4)
    model = XLabModel(**TINY, init_from=str(base), lora={"rank": 4, "targets": ["qkv", "ffn.fc", "head"]})
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    with pytest.warns(CheckpointWarning, match="records no tokenizer hash"):
        trainer.validate(model, DataLoader([char_batch()], batch_size=None), verbose=False)  # setup: init_from
    perturb_adapters(model)
    trainer.save_checkpoint(tmp_path / "adapters.ckpt")
    return model.eval(), tmp_path / "adapters.ckpt", base


def test_checkpoint_holds_the_adapters_and_the_base_reference(lora_run):
    model, path, base = lora_run
    checkpoint = read_checkpoint(path)
    assert sorted(checkpoint["state_dict"]) == sorted(adapter_keys(model))  # 'model.blocks.0.attn.qkv.lora_a', ...
    base_weights = {k.removeprefix("model."): v for k, v in read_checkpoint(base)["state_dict"].items()}
    assert checkpoint[LORA_KEY] == {"path": str(base.resolve()), "hash": weights_hash(base_weights)}
    loaded = load_checkpoint(path, tokenizer=False)
    assert loaded.lora_base == checkpoint[LORA_KEY]
    x = torch.randint(0, TINY["n_vocab"], (2, 10))
    with torch.no_grad():
        assert torch.equal(loaded.model.eval()(x), model(x))
        assert torch.equal(XLabModel.load_from_checkpoint(path).eval()(x), model(x))  # the public API too
        merged = load_checkpoint(path, tokenizer=False, merge_lora=True)
        assert not lora_layers(merged.model) and merged.hparams["lora"] is None
        torch.testing.assert_close(merged.model.eval()(x), model(x), atol=1e-5, rtol=0)


def test_missing_or_changed_base_is_one_clear_error(lora_run, tmp_path):
    model, path, base = lora_run
    moved = tmp_path / "elsewhere" / "base-moved.ckpt"
    moved.parent.mkdir()
    base.rename(moved)
    with pytest.raises(FileNotFoundError, match=rf"^{path} holds LoRA adapters whose base {base.resolve()} is not "
                                                r"found \(nor beside it\)"):
        load_checkpoint(path, tokenizer=False)
    x = torch.randint(0, TINY["n_vocab"], (1, 6))
    with torch.no_grad():  # told where it went, it loads
        assert torch.equal(load_checkpoint(path, tokenizer=False, base=moved).model.eval()(x), model(x))
    other, _ = make_checkpoint(base, "tok.model", seed=5)  # another model at the recorded path
    expected = read_checkpoint(path)[LORA_KEY]["hash"]
    actual = weights_hash({k.removeprefix("model."): v for k, v in read_checkpoint(base)["state_dict"].items()})
    with pytest.raises(ValueError) as error:
        load_checkpoint(path, tokenizer=False)
    assert str(error.value) == (f"{path}: LoRA base {base.resolve()} has weights hash {actual}, but the adapters were "
                                f"trained on weights with hash {expected}: not the same base model (changed, or "
                                "another file)")
    make_checkpoint(base, "tok.model", seed=4, d_model=64, n_heads=4)  # another architecture altogether
    with pytest.raises(ValueError, match=rf"^{path}: its LoRA base {base.resolve()} does not fit the adapters' model "
                                         r"\(init_from: .* has shape"):
        load_checkpoint(path, tokenizer=False)


def test_merge_lora_writes_a_plain_checkpoint_once(lora_run, tmp_path):
    model, path, base = lora_run
    x = torch.randint(0, TINY["n_vocab"], (2, 10))
    outputs = []
    for name in ("merged.ckpt", "merged.safetensors"):
        out = merge_lora_checkpoint(path, tmp_path / name)
        checkpoint = read_checkpoint(out)
        assert LORA_KEY not in checkpoint and checkpoint["hyper_parameters"]["lora"] is None
        assert not any(k.endswith(("lora_a", "lora_b")) for k in checkpoint["state_dict"])
        assert checkpoint["lora_merged"] == {"adapters": str(path), "base": str(base.resolve()),
                                             "base_hash": read_checkpoint(path)[LORA_KEY]["hash"]}
        outputs.append(load_checkpoint(out, tokenizer=False).model.eval())
    base.unlink()  # the merged checkpoints stand alone
    with torch.no_grad():
        expected = model(x)
        for merged in outputs:
            torch.testing.assert_close(merged(x), expected, atol=1e-5, rtol=0)
        # ... and a warm start from the adapters' checkpoint would have needed the base; from the merge it does not
        fresh = XLabModel(**TINY)
        load_initial_weights(fresh, tmp_path / "merged.ckpt")
        torch.testing.assert_close(fresh.eval()(x), expected, atol=1e-5, rtol=0)
    before = (tmp_path / "merged.ckpt").read_bytes()
    with pytest.raises(FileExistsError, match="merged.ckpt already exists; refusing to overwrite it"):
        merge_lora_checkpoint(path, tmp_path / "merged.ckpt")
    assert (tmp_path / "merged.ckpt").read_bytes() == before
    with pytest.raises(ValueError, match="holds no LoRA adapters"):
        merge_lora_checkpoint(tmp_path / "merged.ckpt", tmp_path / "again.ckpt")
    with pytest.raises(ValueError, match="expected a .ckpt or .safetensors file name"):
        merge_lora_checkpoint(path, tmp_path / "merged.bin")


def test_warm_start_from_a_lora_checkpoint_takes_the_merged_weights(lora_run):
    model, path, _ = lora_run
    fresh = XLabModel(**TINY)
    copied = load_initial_weights(fresh, path)
    assert "blocks.0.attn.qkv.weight" in copied and not any("lora" in k for k in copied)
    x = torch.randint(0, TINY["n_vocab"], (2, 10))
    with torch.no_grad():
        torch.testing.assert_close(fresh.eval()(x), model(x), atol=1e-5, rtol=0)


def test_a_bf16_model_restores_adapters_on_a_float32_base(lora_run):
    # Lightning's bf16-true casts the module before it restores a checkpoint: the base's identity is that of its
    # file's weights, not of the weights cast to the run's dtype
    model, path, base = lora_run
    checkpoint = read_checkpoint(path)
    resumed = XLabModel(**TINY, init_from=str(base), lora={"rank": 4, "targets": ["qkv", "ffn.fc", "head"]})
    resumed.to(torch.bfloat16).on_load_checkpoint(checkpoint)
    assert checkpoint[LORA_KEY] == resumed.lora_base
    resumed.load_state_dict(checkpoint["state_dict"])
    assert resumed.model.head.weight.dtype == torch.bfloat16
    assert torch.equal(resumed.model.head.weight, model.model.head.weight.to(torch.bfloat16))
    assert torch.equal(resumed.model.head.lora_b, model.model.head.lora_b.to(torch.bfloat16))


def test_saving_a_lora_model_without_its_base_is_refused(tmp_path):
    model = XLabModel(**TINY, init_from=str(tmp_path / "base.ckpt"), lora={})
    with pytest.raises(ValueError, match="refers to its base weights, but none were loaded"):
        model.on_save_checkpoint({"state_dict": model.state_dict()})


# ----------------------------------------------------------------------------------------- the xlab command


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """A tokenizer, an encoded-data cache and a data-only config shared by the command-line tests."""
    from xlabml.datamodules import XLabDataModule

    root = tmp_path_factory.mktemp("lora-data")
    config = {
        "trainer": {"max_steps": 4, "val_check_interval": 2, "limit_val_batches": 1, "num_sanity_val_steps": 0,
                    "log_every_n_steps": 1, "enable_progress_bar": False, "enable_model_summary": False},
        "data": {"locations": {"builtin": "python-topics"}, "num_tokens": 512, "seq_len": 32, "batch_size": 4,
                 "num_proc": 1, "tokenizer_path": str(root / "tokenizer.model"), "cache_dir": str(root / "cache")},
    }
    XLabDataModule(**config["data"]).prepare_data()
    (root / "data.yaml").write_text(yaml.safe_dump(config))
    return root


def _xlab(cwd, *args):
    from xlabml.cli import main

    previous, deterministic = os.getcwd(), torch.are_deterministic_algorithms_enabled()
    os.chdir(cwd)
    try:
        main(list(args))
    finally:
        os.chdir(previous)
        torch.use_deterministic_algorithms(deterministic)


@pytest.mark.slow
def test_lora_run_resumes_exactly_and_infer_reads_adapters_and_merge(data, tmp_path, capsys):
    from xlabml.infer_cli import main as infer
    from xlabml.interop import load_model
    from xlabml.manage import main as manage

    repo = Path(__file__).resolve().parent.parent
    _xlab(tmp_path, "fit", "-c", str(data / "data.yaml"), "--model.d_model", "32", "--model.n_layers", "1",
          "--model.n_heads", "2", "--model.d_ff", "64", "--trainer.logger.init_args.save_dir", "base")
    base = tmp_path / "base" / "version_0" / "checkpoints" / "last.ckpt"
    # 3 batches per epoch, 8 steps: the run crosses epochs, step 4 is mid-epoch; adapter dropout is on
    resume = {"trainer": {"max_steps": 8, "limit_train_batches": 3, "val_check_interval": 2, "callbacks": [
        {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
         "init_args": {"every_n_train_steps": 4, "save_top_k": -1, "filename": "step-{step}", "save_last": True}}]}}
    (tmp_path / "resume.yaml").write_text(yaml.safe_dump(resume))
    config = ["-c", str(data / "data.yaml"), "-c", str(repo / "conf" / "extra" / "lora.yaml"), "-c",
              str(tmp_path / "resume.yaml"), "--model.init_from", str(base), "--model.lora.rank", "4"]
    _xlab(tmp_path, "fit", *config)
    full = tmp_path / "logs" / "version_0" / "checkpoints"
    _xlab(tmp_path, "fit", *config, "--ckpt_path", str(full / "step-step=4.ckpt"))
    resumed = tmp_path / "logs" / "version_1" / "checkpoints" / "last.ckpt"
    a, b = read_checkpoint(full / "last.ckpt"), read_checkpoint(resumed)
    assert a["global_step"] == b["global_step"] == 8
    assert a["hyper_parameters"]["lora"] == {"rank": 4, "alpha": 16.0, "dropout": 0.05,
                                             "targets": ["attn.qkv", "attn.proj", "ffn.fc", "ffn.proj"]}
    # adapters only: 4 layers x (A, B); d_model 32, d_ff 64: rank 4 * (32+96 + 32+32 + 32+64 + 64+32) = 1536
    assert len(a["state_dict"]) == 8 and sum(t.numel() for t in a["state_dict"].values()) == 1536
    assert a[LORA_KEY] == b[LORA_KEY] and a[LORA_KEY]["path"] == str(base.resolve())
    for name, tensor in a["state_dict"].items():
        assert torch.equal(tensor, b["state_dict"][name]), name
    assert any(t.abs().sum() > 0 for k, t in a["state_dict"].items() if k.endswith("lora_b"))  # they trained
    moments = [(sa["exp_avg"], sb["exp_avg"]) for sa, sb in zip(a["optimizer_states"][0]["state"].values(),
                                                                b["optimizer_states"][0]["state"].values())]
    assert len(moments) == 8 and all(torch.equal(ma, mb) for ma, mb in moments)

    # infer.py reads the adapters' checkpoint and its merge alike
    manage(["merge-lora", str(full / "last.ckpt"), str(tmp_path / "merged.ckpt")])
    assert "merged" in capsys.readouterr().out
    texts = []
    for ckpt in (full / "last.ckpt", tmp_path / "merged.ckpt"):
        infer([str(ckpt), "The if statement", "-T", "0", "-l", "12", "--no-stream"])
        texts.append(capsys.readouterr().out)
    assert texts[0] == texts[1] and texts[0].startswith("The if statement")
    # other tools (export-hf, export-gguf, evaluate) get the merged plain model
    assert not lora_layers(load_model(str(full / "last.ckpt")).model)
