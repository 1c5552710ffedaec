"""load_initial_weights: warm starts from an XLab checkpoint or a Hugging Face directory, whole or by role, with
one clear error on a shape mismatch."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from interop_support import TINY, make_checkpoint

from xlabml.init_from import load_initial_weights
from xlabml.checkpoints import CheckpointWarning, export_checkpoint
from xlabml.models import XLabModel


def _snapshot(model):
    return {k: v.clone() for k, v in model.model.state_dict().items()}


def test_whole_model_from_a_checkpoint_and_an_export(tmp_path):
    ckpt, source = make_checkpoint(tmp_path / "a.ckpt", "tok.model", seed=1)  # no tokenizer: weights only
    with pytest.warns(CheckpointWarning, match="records no tokenizer hash"):
        slim, _ = export_checkpoint(ckpt, tmp_path / "exports", format="safetensors")
    for path in (ckpt, slim):
        model = XLabModel(**TINY)
        copied = load_initial_weights(model, path)
        assert set(copied) == set(model.model.state_dict())
        for key, value in source.model.state_dict().items():
            assert torch.equal(model.model.state_dict()[key], value), key


@settings(max_examples=8, deadline=None)
@given(st.sampled_from([["embedding"], ["head"], ["final_norm"], ["blocks.1"], ["blocks.0.attn", "embedding"],
                        ["position"]]))
def test_only_copies_the_selected_roles(tmp_path_factory, only):
    tmp = tmp_path_factory.mktemp("only")
    ckpt, source = make_checkpoint(tmp / "a.ckpt", "tok.model", seed=2, position="learned")
    model = XLabModel(**{**TINY, "position": "learned"})
    before = _snapshot(model)
    copied = load_initial_weights(model, ckpt, only=only)
    prefixes = [{"embedding": "embedding.", "head": "head.", "final_norm": "norm.", "position": "position."}
                .get(o, o + ".") for o in only]
    for key, value in model.model.state_dict().items():
        chosen = any(key.startswith(p) for p in prefixes)
        assert (key in copied) == chosen
        assert torch.equal(value, source.model.state_dict()[key] if chosen else before[key]), key


def test_embedding_from_a_hugging_face_directory(tmp_path):
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(vocab_size=TINY["n_vocab"], hidden_size=32, intermediate_size=48,
                                      num_hidden_layers=1, num_attention_heads=4, rms_norm_eps=1e-5)
    hf = transformers.LlamaForCausalLM(config)
    hf.save_pretrained(tmp_path / "hf")
    model = XLabModel(**TINY)  # another architecture altogether: only the embedding table is shared
    before = _snapshot(model)
    assert load_initial_weights(model, tmp_path / "hf", only=["embedding"]) == ["embedding.weight"]
    assert torch.equal(model.model.embedding.weight, hf.model.embed_tokens.weight)
    assert torch.equal(model.model.head.weight, before["head.weight"])


def test_mismatches_are_one_clear_error_and_change_nothing(tmp_path):
    ckpt, _ = make_checkpoint(tmp_path / "a.ckpt", "tok.model", seed=3)
    model = XLabModel(**{**TINY, "n_vocab": TINY["n_vocab"] + 8})
    before = _snapshot(model)
    with pytest.raises(ValueError, match=r"embedding.weight has shape \(720, 32\) in .* but \(728, 32\) in the model"):
        load_initial_weights(model, ckpt, only=["embedding", "blocks"])
    with pytest.raises(ValueError, match="selects no weight of the model; roles: embedding"):
        load_initial_weights(model, ckpt, only=["embeddings"])
    with pytest.raises(ValueError, match="has no 'position.embedding.weight'"):
        load_initial_weights(XLabModel(**{**TINY, "position": "learned"}), ckpt, only=["position"])
    with pytest.raises(FileNotFoundError, match="init_from: .*missing.ckpt not found"):
        load_initial_weights(model, tmp_path / "missing.ckpt")
    for key, value in model.model.state_dict().items():
        assert torch.equal(value, before[key]), key
