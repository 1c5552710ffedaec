"""xlabml.quantize: weight-only quantization as a transformation. Per-row (int8) and per-group (int4) errors stay
within half a step; quantized layers compute exactly with their dequantized weights (float64) and within the
bfloat16 kernels' rounding on a CPU; a quantized model's logits and greedy choices stay close to the float
model's; exports store the quantized values bitwise and load through the one loader at about a quarter of the
size; packing and compile compose with it."""
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from xlabml import inference, packed
from xlabml.checkpoints import export_checkpoint, load_checkpoint
from xlabml.layers import Decoder
from xlabml.quantize import (
    Int4Linear, Int8Embedding, Int8Linear, pack_nibbles, quantize, quantize_int4, quantize_int8, unpack_nibbles,
)

from interop_support import make_checkpoint, train_tokenizer


def sharp_decoder(seed=0, n_vocab=64, dtype=torch.float32, **kwargs):
    """A tiny decoder whose logits spread over several units (greedy choices are rarely near ties)."""
    torch.manual_seed(seed)
    arch = {"d_model": 64, "n_layers": 2, "n_heads": 4, "d_ff": 128, "dropout": 0.0, **kwargs}
    model = Decoder(n_vocab, 32, **arch).to(dtype).eval()
    with torch.no_grad():
        for block in model.blocks:
            block.attn.qkv.weight.mul_(4.0)
        model.head.weight.mul_(10.0)
    return model


def quantized_modules(model):
    return [m for m in model.modules() if isinstance(m, (Int8Linear, Int8Embedding, Int4Linear))]


# ---------------------------------------------------------------------------------------------------------------
# the quantizers


matrices = st.tuples(st.integers(1, 12), st.integers(1, 40), st.floats(1e-6, 1e3), st.integers(0, 2 ** 31 - 1),
                     st.sampled_from([torch.float32, torch.bfloat16, torch.float64]), st.booleans())


@settings(max_examples=60, deadline=None)
@given(matrices)
def test_int8_error_is_at_most_half_a_step_per_weight(args):
    n, k, magnitude, seed, dtype, zero_row = args
    w = (torch.randn(n, k, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * magnitude).to(dtype)
    if zero_row:
        w[0] = 0
    q, s = quantize_int8(w)
    assert q.dtype == torch.int8 and s.dtype == dtype and q.shape == w.shape and s.shape == (n,)
    assert int(q.abs().max()) <= 127
    step = s.double()[:, None]
    error = (w.double() - q.double() * step).abs()
    assert bool((error <= step / 2 * (1 + 1e-6)).all()), float((error / step).max())
    # the largest weight of a non-zero row takes (nearly) the full range: the scale is not wasted
    nonzero = w.double().abs().amax(-1) > 0
    assert bool((q.abs().amax(-1)[nonzero] >= 126).all())


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 8), st.integers(1, 4), st.sampled_from([32, 64, 128]), st.floats(1e-4, 1e2),
       st.integers(0, 2 ** 31 - 1))
def test_int4_error_is_at_most_half_a_step_and_nibbles_round_trip(n, groups, group_size, magnitude, seed):
    w = torch.randn(n, groups * group_size, generator=torch.Generator().manual_seed(seed)) * magnitude
    q, s, z = quantize_int4(w, group_size)
    assert q.dtype == torch.uint8 and int(q.max()) <= 15 and s.shape == z.shape == (n, groups)
    assert torch.equal(unpack_nibbles(pack_nibbles(q)), q)
    assert pack_nibbles(q).shape == (n, groups * group_size // 2)
    deq = ((q.double().view(n, groups, group_size) - 8) * s.double()[..., None] + z.double()[..., None]).view(n, -1)
    step = s.double().repeat_interleave(group_size, dim=1)
    assert bool(((w.double() - deq).abs() <= step / 2 * (1 + 1e-5) + 1e-12).all())


# ---------------------------------------------------------------------------------------------------------------
# layers


def test_float64_model_computes_exactly_with_its_dequantized_weights():
    # float64 takes the plain path: the quantized model is the float model with weights q * s, to rounding
    model = sharp_decoder(dtype=torch.float64, tie_embeddings=True)
    quantized = quantize(copy.deepcopy(model), "int8")
    assert quantized.head.weight is quantized.embedding.weight  # tied: one int8 matrix serves both
    assert quantized.head.scale is quantized.embedding.scale
    reference = copy.deepcopy(model)
    with torch.no_grad():
        for name, module in quantized.named_modules():
            if isinstance(module, (Int8Linear, Int8Embedding)):
                reference.get_submodule(name).weight.copy_(module.dequantized())
    x = torch.randint(0, 64, (2, 20))
    with torch.inference_mode():
        torch.testing.assert_close(quantized(x), reference(x), atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("n_in", [16, 48, 40, 1368 // 8])  # rows a multiple of 16, and rows padded for the kernel
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_int8_kernel_within_bfloat16_rounding(n_in, bias, dtype):
    torch.manual_seed(0)
    linear = nn.Linear(n_in, 72, bias=bias).to(dtype)
    layer = Int8Linear.from_linear(linear)
    x = torch.randn(3, 5, n_in, dtype=dtype)
    with torch.inference_mode():
        y = layer(x)
        w = layer.dequantized().double()
        exact = F.linear(x.double(), w, None if linear.bias is None else linear.bias.double())
    assert y.dtype == dtype and y.shape == (3, 5, 72)
    # inputs and output rounded to bfloat16 (2^-8 relative each), products summed in float32
    bound = 2 ** -7 * (x.double().abs() @ w.abs().T) + 2 ** -8 * exact.abs() + 1e-6
    assert bool(((y.double() - exact).abs() <= bound).all())


@pytest.mark.parametrize("group_size", [32, 64])
def test_cpu_int4_kernel_within_bfloat16_rounding(group_size):
    torch.manual_seed(0)
    linear = nn.Linear(128, 48)
    layer = Int4Linear.from_linear(linear, group_size)
    x = torch.randn(4, 128)
    with torch.inference_mode():
        y = layer(x)
        w = layer.dequantized().double()
        exact = F.linear(x.double(), w, linear.bias.double())
    # scales and offsets rounded to bfloat16 too: a few steps of 2^-8 on each product
    bound = 2 ** -5 * (x.double().abs() @ w.abs().T) + 2 ** -8 * exact.abs() + 1e-5
    assert bool(((y.double() - exact).abs() <= bound).all())


def test_autograd_flows_to_the_input_through_the_plain_path():
    layer = Int8Linear.from_linear(nn.Linear(16, 8))
    x = torch.randn(2, 16, requires_grad=True)
    layer(x).sum().backward()
    expected = (layer.weight.float() * layer.scale[:, None]).sum(0)
    torch.testing.assert_close(x.grad, expected.expand(2, -1))
    assert not layer.weight.requires_grad and not layer.scale.requires_grad


# ---------------------------------------------------------------------------------------------------------------
# the transformation on a model


def test_quantize_swaps_plain_linears_and_embeddings_and_leaves_the_rest():
    model = sharp_decoder(bias=True)
    norms = {name: m for name, m in model.named_modules() if isinstance(m, nn.LayerNorm)}
    linears = sum(type(m) is nn.Linear for m in model.modules())
    assert quantize(model, "int8") is model
    assert not any(type(m) in (nn.Linear, nn.Embedding) for m in model.modules())
    assert len(quantized_modules(model)) == linears + 1  # every linear, and the embedding
    assert all(model.get_submodule(name) is norm for name, norm in norms.items())  # the very same modules
    state = model.state_dict()
    assert state["blocks.0.attn.qkv.weight"].dtype == torch.int8 and "blocks.0.attn.qkv.scale" in state
    assert state["blocks.0.attn.qkv.bias"].dtype == torch.float32
    before = {k: v.clone() for k, v in state.items()}
    quantize(model, "int8")  # nothing plain left: unchanged
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_int4_where_the_groups_divide_the_rows_else_int8():
    model = quantize(sharp_decoder(d_ff=96), "int4", group_size=32)  # ffn.proj rows: 96, qkv rows: 64
    assert isinstance(model.blocks[0].attn.qkv, Int4Linear) and isinstance(model.blocks[0].ffn.proj, Int4Linear)
    assert isinstance(model.embedding, Int8Embedding)
    model = quantize(sharp_decoder(d_ff=96), "int4", group_size=64)
    assert isinstance(model.blocks[0].attn.qkv, Int4Linear) and isinstance(model.blocks[0].ffn.proj, Int8Linear)
    tied = quantize(sharp_decoder(tie_embeddings=True), "int4", group_size=32)
    assert isinstance(tied.head, Int8Linear) and tied.head.weight is tied.embedding.weight


def test_bad_arguments_are_one_clear_error():
    with pytest.raises(ValueError, match="unknown quantization scheme 'int3'; expected one of int8, int4"):
        quantize(sharp_decoder(), "int3")
    with pytest.raises(ValueError, match="group_size=48"):
        quantize(sharp_decoder(), "int4", group_size=48)
    with pytest.raises(ValueError, match="applies to int4 only"):
        quantize(sharp_decoder(), "int8", group_size=32)
    with pytest.raises(TypeError, match="Int8Linear.from_linear"):
        quantize(nn.Linear(4, 4))


@pytest.mark.parametrize("scheme,bound", [("int8", 0.02), ("int4", 0.12)])
def test_quantized_logits_close_to_float(scheme, bound):
    # bound: the RMS of the logit error relative to the logits' RMS (int8 steps are 1/254 of a row's range,
    # int4's 1/30 of a group's; measured 0.004 and 0.04 on this model)
    model = sharp_decoder(seed=3)
    quantized = quantize(copy.deepcopy(model), scheme, **({"group_size": 32} if scheme == "int4" else {}))
    x = torch.randint(0, 64, (4, 32), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        reference, logits = model(x), quantized(x)
    relative = float((logits - reference).pow(2).mean().sqrt() / reference.pow(2).mean().sqrt())
    assert relative < bound, relative


def test_greedy_choices_mostly_unchanged():
    # teacher-forced along the float model's greedy continuations: the int8 model picks the same next token at
    # nearly every step (random models have near-ties: measured 96-99%), and only where the float model's two
    # best logits are closer than twice the int8 model's largest logit error there (a near-tie)
    model = sharp_decoder(seed=1)
    quantized = quantize(copy.deepcopy(model), "int8")
    agree = total = 0
    for seed in range(6):
        p = torch.randint(0, 64, (5,), generator=torch.Generator().manual_seed(seed))
        out = inference.greedy_search(model, p, 24, 32)
        with torch.inference_mode():
            reference, logits = model(torch.cat((p, out))[None])[0], quantized(torch.cat((p, out))[None])[0]
        same = reference.argmax(-1) == logits.argmax(-1)
        top2 = reference.topk(2).values
        gap, error = top2[:, 0] - top2[:, 1], (reference - logits).abs().amax(-1)
        assert bool((gap[~same] < 2 * error[~same]).all())
        agree, total = agree + int(same.sum()), total + len(same)
    assert agree / total >= 0.95, agree / total


def test_generation_with_packing_and_a_partly_quantized_model(monkeypatch):
    # packing swaps only the linears quantization left plain; the KV cache keeps the activations' dtype
    monkeypatch.setattr(packed, "MIN_PACKED_NUMEL", 0)
    model = sharp_decoder(seed=2)
    quantize(model.blocks[0], "int8")
    with torch.inference_mode(), packed.prepacked(model):
        swapped = [m for m in model.modules() if isinstance(m, packed.PackedLinear)]
        assert len(swapped) == (5 if packed.supported() else 0)  # block 1's four linears and the head
        assert all(type(m) is Int8Linear for m in model.blocks[0].modules() if "Linear" in type(m).__name__)
    p = torch.randint(0, 64, (6,))
    out = inference.greedy_search(model, p, 10, 32)
    with torch.inference_mode():  # equals recomputing without a cache
        seq = p
        for _ in range(10):
            seq = torch.cat((seq, model(seq[None])[0, -1].argmax()[None]))
    assert torch.equal(out, seq[6:])


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_bfloat16_model_quantized_either_way_generates_as_without_a_cache(scheme):
    # --dtype bf16 --quantize: a bfloat16 model quantized, or a quantized model cast to bfloat16, keeps bfloat16
    # scales and activations (its KV cache too), and its cached greedy output equals recomputing without a cache
    extra = {"group_size": 32} if scheme == "int4" else {}
    for model in (quantize(sharp_decoder(seed=5, dtype=torch.bfloat16), scheme, **extra),
                  quantize(sharp_decoder(seed=5), scheme, **extra).to(torch.bfloat16)):
        assert {m.scale.dtype for m in quantized_modules(model)} == {torch.bfloat16}
        assert model.init_cache(1, max_len=32, dtype=torch.bfloat16) is not None
        p = torch.randint(0, 64, (6,), generator=torch.Generator().manual_seed(5))
        out = inference.greedy_search(model, p, 10, 32)
        with torch.inference_mode():
            seq = p
            for _ in range(10):
                logits = model(seq[None])[0, -1]
                assert logits.dtype == torch.bfloat16
                seq = torch.cat((seq, logits.float().argmax()[None]))
        assert torch.equal(out, seq[6:])


@pytest.mark.slow
def test_compiled_decode_step_equals_eager():
    model = quantize(sharp_decoder(seed=4), "int8")
    p = torch.randint(0, 64, (5,))
    eager = inference.greedy_search(model, p, 12, 32)
    assert torch.equal(inference.greedy_search(model, p, 12, 32, compile=True), eager)
    inference.release_caches(model)


# ---------------------------------------------------------------------------------------------------------------
# exports


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return train_tokenizer(tmp_path_factory.mktemp("quant-tokenizer"))


@pytest.mark.parametrize("fmt", ["ckpt", "safetensors"])
@pytest.mark.parametrize("tied", [False, True])
def test_quantized_export_round_trips_bitwise_through_the_loader(tmp_path, tokenizer, fmt, tied):
    ckpt, model = make_checkpoint(tmp_path / "m.ckpt", tokenizer.path, d_model=64, d_ff=256, tie_embeddings=tied)
    path, written = export_checkpoint(ckpt, tmp_path / "exports", fmt, quantize="int8")
    assert written and path.name.startswith("m-int8-")
    expected = quantize(copy.deepcopy(model), "int8").state_dict()
    loaded = load_checkpoint(path, "cpu", tokenizer=tokenizer.path)
    assert loaded.quantization == {"scheme": "int8"}
    state = loaded.model.state_dict()
    assert state.keys() == expected.keys()
    for name, value in expected.items():
        assert state[name].dtype == value.dtype and torch.equal(state[name], value), name
    if tied:
        assert loaded.model.model.head.weight is loaded.model.model.embedding.weight
    x = torch.randint(0, 700, (1, 12))
    with torch.inference_mode():
        torch.testing.assert_close(loaded.model.eval()(x), quantize(copy.deepcopy(model), "int8").eval()(x),
                                   atol=0, rtol=0)
    # a float export of the same checkpoint, for the size: int8 matrices are a quarter of float32 ones
    plain, _ = export_checkpoint(ckpt, tmp_path / "exports", fmt)
    size = lambda p: p.stat().st_size + (p.with_suffix(".json").stat().st_size if fmt == "safetensors" else 0)  # noqa: E731
    assert 0.25 < size(path) / size(plain) < 0.3, size(path) / size(plain)


def test_int4_export_round_trips_and_is_smaller(tmp_path, tokenizer):
    ckpt, model = make_checkpoint(tmp_path / "m.ckpt", tokenizer.path, d_model=64, d_ff=256)
    path, _ = export_checkpoint(ckpt, tmp_path, "ckpt", quantize="int4", group_size=32)
    loaded = load_checkpoint(path, "cpu", tokenizer=False)
    assert loaded.quantization == {"scheme": "int4", "group_size": 32}
    expected = quantize(copy.deepcopy(model), "int4", group_size=32).state_dict()
    assert all(torch.equal(loaded.model.state_dict()[k], v) for k, v in expected.items())
    assert isinstance(loaded.model.model.blocks[0].ffn.fc, Int4Linear)
    int8, _ = export_checkpoint(ckpt, tmp_path, "ckpt", quantize="int8")
    # matrices at half a byte plus a float32 scale and offset per 32 weights (a quarter byte), against int8's one
    # byte: 0.75 of the linears' bytes; the embedding is int8 in both
    assert path.stat().st_size < 0.85 * int8.stat().st_size


def test_export_refuses_requantizing_and_loader_refuses_unknown_schemes(tmp_path, tokenizer):
    ckpt, _ = make_checkpoint(tmp_path / "m.ckpt", tokenizer.path)
    path, _ = export_checkpoint(ckpt, tmp_path, quantize="int8")
    with pytest.raises(ValueError, match="quantized already"):
        export_checkpoint(path, tmp_path / "again", quantize="int8")
    again, _ = export_checkpoint(path, tmp_path / "again")  # exported as it is, it stays quantized
    assert load_checkpoint(again, "cpu", tokenizer=False).quantization == {"scheme": "int8"}
    bad = tmp_path / "bad.ckpt"
    torch.save({**torch.load(path, weights_only=True), "quantization": {"scheme": "int2"}}, bad)
    with pytest.raises(ValueError, match=r"bad.ckpt records a quantization this xlabml cannot apply"):
        load_checkpoint(bad, "cpu", tokenizer=False)
    with pytest.raises(ValueError, match="unknown quantization scheme 'fp8'"):
        export_checkpoint(ckpt, tmp_path / "x", quantize="fp8")
    assert not (tmp_path / "x").exists()


def test_manage_and_infer_command_lines(tmp_path, tokenizer, capsys):
    from xlabml import infer_cli
    from xlabml.manage import main as manage

    ckpt, model = make_checkpoint(tmp_path / "m.ckpt", tokenizer.path, d_model=64, d_ff=256)
    manage(["export-checkpoint", str(ckpt), "-o", str(tmp_path / "out"), "--quantize", "int8"])
    out = capsys.readouterr().out
    (path,) = (tmp_path / "out").glob("m-int8-*.ckpt")
    assert out.startswith(f"exported {path} (")
    with pytest.raises(SystemExit):
        manage(["export-checkpoint", str(ckpt), "-o", str(tmp_path / "out2"), "--group-size", "32"])
    assert "--group-size 32 applies to --quantize int4 only" in capsys.readouterr().err
    # infer.py: --quantize on the float checkpoint equals the quantized export, and both equal the library
    ids = [tokenizer.sos_id] + tokenizer.encode("def main")
    excluded = [tokenizer.sos_id, tokenizer.pad_id, *range(len(tokenizer), 720)]
    new = inference.greedy_search(quantize(copy.deepcopy(model), "int8"), torch.tensor(ids), 12, 64,
                                  eos_class=tokenizer.eos_id, exclude_classes=excluded)
    expected = infer_cli.escape_control(tokenizer.decode(ids + new.tolist())) + "\n"
    for argv in ([str(ckpt), "def main", "--quantize", "int8"], [str(path), "def main"],
                 [str(path), "def main", "--quantize", "int8"]):
        infer_cli.main([*argv, "-g", "-l", "12", "--no-stream"])
        assert capsys.readouterr().out == expected
    with pytest.raises(SystemExit):
        infer_cli.main([str(path), "def main", "--quantize", "int4"])
    assert "holds int8 weights; --quantize int4 needs its float checkpoint" in capsys.readouterr().err


def test_lora_adapters_are_merged_before_quantizing(tmp_path, tokenizer):
    # a LoRA run's checkpoint holds adapters over a base it names: quantizing it would drop the adapters, so the
    # export asks for merge-lora first; a file recording both is refused by the loader, naming it
    ckpt, _ = make_checkpoint(tmp_path / "m.ckpt", tokenizer.path)
    lora = tmp_path / "adapters.ckpt"
    torch.save({**torch.load(ckpt, weights_only=True), "lora_base": {"path": str(ckpt), "hash": "0" * 16}}, lora)
    with pytest.raises(ValueError, match=r"adapters.ckpt holds LoRA adapters; merge them first \(./manage.py "
                                         "merge-lora\\), then export the merged model quantized"):
        export_checkpoint(lora, tmp_path / "out", quantize="int8")
    assert not (tmp_path / "out").exists()
    path, _ = export_checkpoint(ckpt, tmp_path, quantize="int8")
    both = tmp_path / "both.ckpt"
    torch.save({**torch.load(path, weights_only=True), "lora_base": {"path": str(ckpt), "hash": "0" * 16}}, both)
    with pytest.raises(ValueError, match="both.ckpt records both LoRA adapters and quantized weights"):
        load_checkpoint(both, "cpu", tokenizer=False)
