"""xlabml.packed: packing as a transformation of a built model. Packed linears give nn.Linear's results, stay in
step with the weights, never reach autograd, leave the state dict and the model's structure as they were once
undone, and leave modules of any other type alone."""
import copy
import io

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from xlabml import packed
from xlabml.layers import Decoder, GELUMLP, ReLUMLP
from xlabml.packed import PackedLinear, pack, prepacked

pytestmark = pytest.mark.skipif(not packed.supported(), reason="this PyTorch build has no oneDNN linear packing")


@pytest.fixture(autouse=True)
def pack_any_size(monkeypatch):
    """The tests' matrices are small; pack them anyway (the size threshold has its own test)."""
    monkeypatch.setattr(packed, "MIN_PACKED_NUMEL", 0)


def make_linear(n_in=24, n_out=40, bias=True, seed=0):
    torch.manual_seed(seed)
    return nn.Linear(n_in, n_out, bias=bias)


def packed_layers(model):
    return [m for m in model.modules() if isinstance(m, PackedLinear)]


@settings(max_examples=25, deadline=None)
@given(rows=st.lists(st.integers(1, 9), min_size=0, max_size=2), n_in=st.integers(1, 70),
       n_out=st.integers(1, 70), bias=st.booleans())
def test_packed_equals_f_linear_for_any_shape(rows, n_in, n_out, bias):
    model = nn.Sequential(make_linear(n_in, n_out, bias))
    x = torch.randn(*rows, n_in)
    with torch.inference_mode(), prepacked(model):
        y = model(x)
        (layer,) = packed_layers(model)
        assert layer._packed is not None  # the packed path ran
    assert type(model[0]) is nn.Linear  # undone
    assert y.shape == (*rows, n_out)
    torch.testing.assert_close(y, F.linear(x, model[0].weight, model[0].bias), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("ffn_cls", [GELUMLP, ReLUMLP])
def test_ffn_activation_fused_into_the_packed_matmul_and_restored(ffn_cls):
    torch.manual_seed(0)
    ffn = ffn_cls(64, 96).eval()
    fc, act = ffn.fc, ffn.act
    x = torch.randn(3, 5, 64)
    with torch.inference_mode():
        expected = ffn(x)
        with prepacked(ffn):
            assert isinstance(ffn.fc, PackedLinear) and isinstance(ffn.act, nn.Identity)  # fused
            assert ffn.fc.post_op == {GELUMLP: "gelu", ReLUMLP: "relu"}[ffn_cls]
            fused = ffn(x)
    assert ffn.fc is fc and ffn.act is act  # the very same modules are back
    torch.testing.assert_close(fused, expected, atol=1e-5, rtol=1e-5)


def test_fused_activation_still_applies_where_packing_does_not():
    layer = make_linear(16, 32).double()
    stand_in = PackedLinear(layer, nn.GELU())
    x = torch.randn(2, 16, dtype=torch.float64)
    with torch.inference_mode():  # float64 never packs: the stand-in must apply the GELU itself
        y = stand_in(x)
    assert stand_in._packed is None
    torch.testing.assert_close(y, F.gelu(layer(x)).detach(), atol=0, rtol=0)
    with pytest.raises(ValueError, match="cannot be fused"):
        PackedLinear(layer, nn.SiLU())


def test_small_matrices_stay_plain(monkeypatch):
    monkeypatch.setattr(packed, "MIN_PACKED_NUMEL", 24 * 40 + 1)
    model = nn.Sequential(make_linear(24, 40), nn.GELU(), make_linear(40, 40))
    with prepacked(model):
        assert [type(m) for m in model] == [nn.Linear, nn.GELU, PackedLinear]


def test_state_dict_keys_unchanged_and_old_checkpoints_load():
    torch.manual_seed(0)
    model = Decoder(n_vocab=17, max_len=8, d_model=16, n_layers=1, n_heads=2, d_ff=32, dropout=0.0)
    expected = [  # the keys of checkpoints written before packing became a transformation
        "embedding.weight", "blocks.0.norm1.weight", "blocks.0.norm1.bias", "blocks.0.attn.qkv.weight",
        "blocks.0.attn.qkv.bias", "blocks.0.attn.proj.weight", "blocks.0.attn.proj.bias", "blocks.0.norm2.weight",
        "blocks.0.norm2.bias", "blocks.0.ffn.fc.weight", "blocks.0.ffn.fc.bias", "blocks.0.ffn.proj.weight",
        "blocks.0.ffn.proj.bias", "norm.weight", "norm.bias", "head.weight", "head.bias"]
    assert list(model.state_dict()) == expected
    with prepacked(model):
        assert len(packed_layers(model)) == 5
        assert list(model.state_dict()) == expected
        state = model.state_dict()
    twin = Decoder(n_vocab=17, max_len=8, d_model=16, n_layers=1, n_heads=2, d_ff=32, dropout=0.0)
    twin.load_state_dict(state)
    x = torch.randint(0, 17, (2, 5))
    torch.testing.assert_close(twin(x), model(x), atol=0, rtol=0)


def test_packed_copy_follows_in_place_weight_updates():
    model = nn.Sequential(make_linear())
    x = torch.randn(2, 24)
    with torch.inference_mode(), prepacked(model):
        before = model(x)
    bias = model[0].bias.detach()
    with torch.no_grad():
        model[0].weight.mul_(-2.0)  # an optimizer step or load_state_dict writes in place like this
    with torch.inference_mode(), prepacked(model):
        after = model(x)
        with torch.no_grad():  # ...also while packed
            model[0].weight.mul_(-1.0)
        again = model(x)
    torch.testing.assert_close(after - bias, -2.0 * (before - bias), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(again - bias, 2.0 * (before - bias), atol=1e-5, rtol=1e-5)


def test_grad_enabled_bypasses_the_packed_copy():
    model = nn.Sequential(make_linear())
    x = torch.randn(5, 24, requires_grad=True)
    with prepacked(model):
        y = model(x)
        assert model[0]._packed is None  # never packed: autograd needs the real weight
    y.sum().backward()
    layer = model[0]
    torch.testing.assert_close(layer.weight.grad, torch.ones(5, 40).T @ x.detach())


def test_pack_undo_nests_and_packed_copies_persist_until_released():
    model = nn.Sequential(make_linear(), nn.ReLU())
    layer = model[0]
    with prepacked(model):
        stand_in = model[0]
        with prepacked(model):  # nothing left to pack
            assert model[0] is stand_in
        assert model[0] is stand_in
        with torch.inference_mode():
            model(torch.randn(1, 24))
        copy_ = packed.packed_weight(layer.weight, torch.float32)
    assert model[0] is layer
    assert packed.packed_weight(layer.weight, torch.float32) is copy_  # kept for the next call
    packed.release(model)
    assert packed._copies.get(layer.weight) is None
    packing = pack(model)
    assert len(packing) == 1
    packing.undo()
    packing.undo()  # twice is harmless
    assert model[0] is layer


class Int8Linear(nn.Linear):
    """Stands for another transformation's linear type (a quantized layer): packing must leave it alone."""


class LoRA(nn.Module):
    """A LoRA-style wrapper: a base linear plus a low-rank update."""

    def __init__(self, base, rank=2):
        super().__init__()
        self.base = base
        self.down, self.up = nn.Linear(base.in_features, rank, bias=False), nn.Linear(rank, base.out_features,
                                                                                      bias=False)
        nn.init.normal_(self.up.weight)

    def forward(self, x):
        return self.base(x) + self.up(self.down(x))


def test_composes_with_transformations_that_swap_linears():
    torch.manual_seed(0)
    model = nn.Sequential(LoRA(nn.Linear(24, 40)), nn.GELU(), Int8Linear(40, 40))
    x = torch.randn(3, 24)
    with torch.inference_mode():
        expected = model(x)
        with prepacked(model):
            assert type(model[2]) is Int8Linear  # not a plain nn.Linear: untouched
            assert [type(m) for m in (model[0].base, model[0].down, model[0].up)] == [PackedLinear] * 3
            got = model(x)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    # undo refuses to restore over another transformation applied after packing
    packing = pack(model)
    model[0].base = LoRA(model[0].base)
    with pytest.raises(RuntimeError, match="reverse order"):
        packing.undo()


def test_bare_linear_is_refused():
    with pytest.raises(TypeError, match="PackedLinear"):
        pack(make_linear())


def test_other_dtype_input_falls_back():
    model = nn.Sequential(make_linear())
    x = torch.randn(2, 24, dtype=torch.float64)
    with torch.inference_mode(), prepacked(model):
        with pytest.raises(RuntimeError):  # what nn.Linear does with a float64 input and float32 weight
            model(x)
        assert model[0]._packed is None


@pytest.mark.parametrize("dtype,atol", [(torch.float32, 1e-4), (torch.bfloat16, 0.15)])
@pytest.mark.parametrize("ffn", ["gelu", "swiglu"])
def test_decoder_logits_unchanged_by_packing(dtype, atol, ffn):
    torch.manual_seed(0)
    model = Decoder(n_vocab=97, max_len=32, d_model=64, n_layers=2, n_heads=4, d_ff=128, dropout=0.0,
                    position='rope', n_kv_heads=2, ffn=ffn).eval().to(dtype)
    x = torch.randint(0, 97, (3, 20))
    with torch.inference_mode():
        reference = model(x).float()
        with prepacked(model):
            assert len(packed_layers(model)) == 2 * 4 + 1
            fast = model(x).float()
            assert all(m._packed is not None for m in packed_layers(model))
    torch.testing.assert_close(fast, reference, atol=atol, rtol=0)


def test_support_probe_leaves_the_global_rng_alone(monkeypatch):
    monkeypatch.setattr(packed, "_supported", None)  # as in a fresh process
    torch.manual_seed(0)
    expected = torch.rand(4)
    torch.manual_seed(0)
    assert packed.supported()
    torch.testing.assert_close(torch.rand(4), expected, atol=0, rtol=0)


def test_generation_with_packed_weights_matches_plain_weights(monkeypatch):
    from xlabml import inference
    torch.manual_seed(1)
    model = Decoder(n_vocab=97, max_len=32, d_model=64, n_layers=2, n_heads=4, d_ff=256, dropout=0.0).eval()
    prompts = [torch.randint(0, 97, (n,)) for n in (5, 9, 3)]
    used = []
    forward = PackedLinear.forward
    monkeypatch.setattr(PackedLinear, "forward", lambda self, x: used.append(self) or forward(self, x))
    fast_greedy = inference.greedy_search(model, prompts, 40, 32)  # slides past block_size 32
    fast_stream = list(inference.generate_stream(model, prompts[0], 20, 32, temperature=0))
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert len(linears) == 2 * 4 + 1
    assert {id(m.weight) for m in used} == {id(m.weight) for m in linears}  # every linear ran packed,
    assert len({id(m) for m in used}) == 2 * len(linears)  # with fresh stand-ins in each call
    assert not packed_layers(model)  # undone after each call
    used.clear()
    monkeypatch.setattr(packed, "_supported", False)  # the plain F.linear path
    plain_greedy = inference.greedy_search(model, prompts, 40, 32)
    assert not used
    for fast, plain in zip(fast_greedy, plain_greedy):
        assert torch.equal(fast, plain)
    assert fast_stream == plain_greedy[0][:20].tolist()


def test_packed_model_still_deep_copies_and_pickles():
    model = nn.Sequential(make_linear())
    x = torch.randn(2, 24)
    with torch.inference_mode(), prepacked(model):
        expected = model(x)
        # EMA/SWA callbacks deep-copy models; the packed tensor has no storage to copy
        twin = copy.deepcopy(model)
        buffer = io.BytesIO()
        torch.save(model, buffer)
        assert model[0]._packed is not None and twin[0]._packed is None
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert loaded[0]._packed is None
    for other in (twin, loaded, copy.deepcopy(model)):
        with torch.inference_mode():
            torch.testing.assert_close(other(x), expected, atol=1e-5, rtol=1e-5)
