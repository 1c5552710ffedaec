"""xlabml.packed: oneDNN-packed linear weights for CPU inference give nn.Linear's results, stay in step with the
weights, and never reach autograd."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from xlabml import packed
from xlabml.layers import Decoder
from xlabml.packed import Linear, prepacked

pytestmark = pytest.mark.skipif(not packed.supported(), reason="this PyTorch build has no oneDNN linear packing")


@pytest.fixture(autouse=True)
def pack_any_size(monkeypatch):
    """The tests' matrices are small; pack them anyway (the size threshold has its own test)."""
    monkeypatch.setattr(packed, "MIN_PACKED_NUMEL", 0)


def make_linear(n_in=24, n_out=40, bias=True, seed=0):
    torch.manual_seed(seed)
    return Linear(n_in, n_out, bias=bias)


@settings(max_examples=25, deadline=None)
@given(rows=st.lists(st.integers(1, 9), min_size=0, max_size=2), n_in=st.integers(1, 70),
       n_out=st.integers(1, 70), bias=st.booleans())
def test_packed_equals_f_linear_for_any_shape(rows, n_in, n_out, bias):
    layer = make_linear(n_in, n_out, bias)
    x = torch.randn(*rows, n_in)
    with torch.inference_mode(), prepacked(layer):
        y = layer(x)
        assert layer._packed is not None  # the packed path ran
    assert y.shape == (*rows, n_out)
    torch.testing.assert_close(y, F.linear(x, layer.weight, layer.bias), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("activation", sorted(packed.ACTIVATIONS))
def test_fused_activation_equals_activation_after_linear(activation):
    layer = make_linear(64, 96)
    x = torch.randn(3, 5, 64)
    eager = {"gelu": F.gelu, "relu": F.relu}[activation]
    expected = eager(F.linear(x, layer.weight, layer.bias))
    with torch.inference_mode():
        with prepacked(layer):
            fused = layer(x, activation)
        plain = layer(x, activation)
    torch.testing.assert_close(fused, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(plain, expected, atol=0, rtol=0)


def test_small_matrices_stay_on_f_linear(monkeypatch):
    monkeypatch.setattr(packed, "MIN_PACKED_NUMEL", 24 * 40 + 1)
    layer = make_linear(24, 40)
    x = torch.randn(2, 24)
    with torch.inference_mode(), prepacked(layer):
        y = layer(x)
    assert layer._packed is None
    torch.testing.assert_close(y, F.linear(x, layer.weight, layer.bias), atol=0, rtol=0)


def test_same_state_dict_as_nn_linear():
    layer, plain = make_linear(), nn.Linear(24, 40)
    assert layer.state_dict().keys() == plain.state_dict().keys()
    plain.load_state_dict(layer.state_dict())
    x = torch.randn(3, 24)
    torch.testing.assert_close(layer(x), plain(x), atol=0, rtol=0)  # outside prepacked: exactly nn.Linear


def test_packed_copy_follows_in_place_weight_updates():
    layer = make_linear()
    x = torch.randn(2, 24)
    with torch.inference_mode(), prepacked(layer):
        before = layer(x)
    with torch.no_grad():
        layer.weight.mul_(-2.0)  # an optimizer step or load_state_dict writes in place like this
    with torch.inference_mode(), prepacked(layer):
        after = layer(x)
    torch.testing.assert_close(after - layer.bias, -2.0 * (before - layer.bias), atol=1e-5, rtol=1e-5)


def test_grad_enabled_bypasses_the_packed_copy():
    layer = make_linear()
    x = torch.randn(5, 24, requires_grad=True)
    with prepacked(layer):
        y = layer(x)
    y.sum().backward()
    assert layer._packed is None  # never packed: autograd needs the real weight
    torch.testing.assert_close(layer.weight.grad, torch.ones(5, 40).T @ x.detach())


def test_prepacked_restores_state_and_nests():
    layer = make_linear()
    with prepacked(layer):
        with prepacked(layer):
            assert layer.use_packed
        assert layer.use_packed
    assert not layer.use_packed
    with torch.inference_mode(), prepacked(layer):
        layer(torch.randn(1, 24))
    assert layer._packed is not None
    packed.release(layer)
    assert layer._packed is None


def test_other_dtype_input_falls_back():
    layer = make_linear()
    x = torch.randn(2, 24, dtype=torch.float64)
    with torch.inference_mode(), prepacked(layer):
        with pytest.raises(RuntimeError):  # what nn.Linear does with a float64 input and float32 weight
            layer(x)
    assert layer._packed is None


@pytest.mark.parametrize("dtype,atol", [(torch.float32, 1e-4), (torch.bfloat16, 0.15)])
def test_decoder_logits_unchanged_by_packing(dtype, atol):
    torch.manual_seed(0)
    model = Decoder(n_vocab=97, max_len=32, d_model=64, n_layers=2, n_heads=4, d_ff=128, dropout=0.0,
                    position='rope', n_kv_heads=2).eval().to(dtype)
    x = torch.randint(0, 97, (3, 20))
    with torch.inference_mode():
        reference = model(x).float()
        with prepacked(model):
            fast = model(x).float()
    assert all(m._packed is not None for m in model.modules() if isinstance(m, Linear))
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
    fast_greedy = inference.greedy_search(model, prompts, 40, 32)  # slides past block_size 32
    fast_stream = list(inference.generate_stream(model, prompts[0], 20, 32, temperature=0))
    assert all(m._packed is not None for m in model.modules() if isinstance(m, Linear))
    monkeypatch.setattr(packed, "_supported", False)  # the plain F.linear path
    packed.release(model)
    plain_greedy = inference.greedy_search(model, prompts, 40, 32)
    assert all(m._packed is None for m in model.modules() if isinstance(m, Linear))
    for fast, plain in zip(fast_greedy, plain_greedy):
        assert torch.equal(fast, plain)
    assert fast_stream == plain_greedy[0][:20].tolist()


def test_packed_module_still_deep_copies_and_pickles():
    import copy
    import io

    layer = make_linear()
    x = torch.randn(2, 24)
    with torch.inference_mode(), prepacked(layer):
        expected = layer(x)
    twin = copy.deepcopy(layer)  # EMA/SWA callbacks deep-copy models; the packed tensor has no storage to copy
    buffer = io.BytesIO()
    torch.save(layer, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert layer._packed is not None and twin._packed is None and loaded._packed is None
    for other in (twin, loaded):
        with torch.inference_mode(), prepacked(other):
            torch.testing.assert_close(other(x), expected, atol=0, rtol=0)
