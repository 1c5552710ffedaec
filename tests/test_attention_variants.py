"""Architecture variants of attention that memory work needs: attention registers (LSWT), cross-layer KV sharing
(``kv_share``) and per-layer sliding windows (``layer_windows``), each against a reference computed by hand, in
training and with the KV cache."""
import math

import pytest
import torch
import torch.nn.functional as F

from xlabml.layers import Decoder

V, L = 41, 32


def make(seed=0, **kwargs):
    torch.manual_seed(seed)
    config = dict(d_model=32, n_layers=2, n_heads=4, d_ff=64, dropout=0.0) | kwargs
    return Decoder(V, L, **config).eval()


def tokens(*shape, seed=1):
    return torch.randint(0, V, shape, generator=torch.Generator().manual_seed(seed))


def decode_in_steps(model, x, prompt_len, **cache_kwargs):
    cache = model.init_cache(x.size(0), **cache_kwargs)
    outputs = [model(x[:, :prompt_len], cache=cache, input_pos=torch.arange(prompt_len))]
    for i in range(prompt_len, x.size(1)):
        outputs.append(model(x[:, i:i + 1], cache=cache, input_pos=torch.tensor([i])))
    return torch.cat(outputs, dim=1)


def attend(q, k, v, allowed):  # q: b h t d, k/v: b h s d, allowed: t s (or b 1 t s)
    scores = (q @ k.transpose(-2, -1)) / math.sqrt(q.size(-1))
    return scores.masked_fill(~allowed, float('-inf')).softmax(-1) @ v


def reference(model, x, windows=None, shared=False):
    """The decoder computed op by op (position 'none', pre-norm, GELU): each layer with its window, registers in
    front of its keys, and with ``shared`` odd layers attending to the keys and values of the layer below."""
    b, t = x.shape
    h = model.embedding(x) * model.embedding_scale
    i_, j_ = torch.arange(t)[:, None], torch.arange(t)[None]
    kv = None
    for n, block in enumerate(model.blocks):
        attn, d = block.attn, block.attn.head_dim
        y = block.norm1(h)
        heads = attn.n_heads
        if shared and n % 2:
            q = attn.qkv(y).view(b, t, heads, d).transpose(1, 2)
            k, v = kv
        else:
            q, k, v = attn.qkv(y).split((heads * d, attn.n_kv_heads * d, attn.n_kv_heads * d), -1)
            q = q.view(b, t, heads, d).transpose(1, 2)
            k = k.view(b, t, -1, d).transpose(1, 2).repeat_interleave(heads // attn.n_kv_heads, 1)
            v = v.view(b, t, -1, d).transpose(1, 2).repeat_interleave(heads // attn.n_kv_heads, 1)
            kv = k, v
        allowed = j_ <= i_
        window = (windows or [None] * len(model.blocks))[n]
        if window is not None:
            allowed = allowed & (i_ - j_ < window)
        if attn.registers is not None:
            rk, rv = (r.repeat_interleave(heads // attn.n_kv_heads, 0).expand(b, -1, -1, -1)
                      for r in attn.registers)
            k, v = torch.cat((rk, k), 2), torch.cat((rv, v), 2)
            allowed = torch.cat((torch.ones(t, rk.size(2), dtype=torch.bool), allowed), 1)
        out = attend(q, k, v, allowed).transpose(1, 2).reshape(b, t, -1)
        h = h + attn.proj(out)
        h = h + block.ffn(block.norm2(h))
    return model.head(model.norm(h))


# ------------------------------------------------------------------------------------------------- registers

def test_registers_are_keys_every_query_sees():
    model = make(position='none', registers=3, n_kv_heads=2)
    x = tokens(2, 12)
    torch.testing.assert_close(model(x), reference(model, x), atol=1e-5, rtol=0)
    plain = make(position='none', n_kv_heads=2)
    assert model.num_parameters() - plain.num_parameters() == 2 * 2 * 3 * 8 * 2  # 2 layers x (k, v) g n d
    naive = make(position='rope', registers=3, attention='naive')
    naive.blocks[0].attn.keep_weights = True
    naive(x)
    w = naive.blocks[0].attn.weights  # b h t 3+t
    assert w.shape == (2, 4, 12, 15)
    assert (w[..., :3] > 0).all()  # the first query sees the registers too, not only itself
    assert w[..., 3:].triu(1).abs().max() == 0  # the tokens stay causal
    torch.testing.assert_close(w.sum(-1), torch.ones(2, 4, 12))


def test_registers_get_gradients_and_keep_packing_and_cache_exact():
    model = make(position='rope', registers=2).train()
    x = tokens(2, 10)
    model(x).logsumexp(-1).mean().backward()
    assert all(b.attn.registers.grad.abs().sum() > 0 for b in model.blocks)
    model.eval()
    lengths = [4, 6]
    packed = model(x[:1], positions=torch.cat([torch.arange(n) for n in lengths])[None],
                   doc_ids=torch.tensor([[0] * 4 + [1] * 6]))
    torch.testing.assert_close(packed[:, 4:], model(x[:1, 4:]), atol=1e-5, rtol=0)
    for static in (False, True):
        torch.testing.assert_close(decode_in_steps(model, x, 4, static=static), model(x), atol=1e-5, rtol=0)


# --------------------------------------------------------------------------------------------------- kv share

def test_kv_share_layers_attend_to_the_keys_and_values_of_the_layer_below():
    model = make(position='none', kv_share=2, n_kv_heads=2)
    x = tokens(2, 12)
    torch.testing.assert_close(model(x), reference(model, x, shared=True), atol=1e-5, rtol=0)
    plain = make(position='none', n_kv_heads=2)
    assert plain.num_parameters() - model.num_parameters() == 2 * 2 * 8 * (32 + 1)  # layer 1: no k, v projection
    assert model.blocks[1].attn.k_norm is None and model.kv_stores == [0, None]


@pytest.mark.parametrize('config', [dict(position='rope', n_kv_heads=2), dict(position='alibi', registers=2),
                                    dict(position='learned', sliding_window=4)], ids=str)
def test_kv_share_cache_holds_one_layer_per_group_and_decodes_exactly(config):
    model = make(kv_share=2, n_layers=4, **config)
    x = tokens(3, 14)
    for static in (False, True):
        cache = model.init_cache(3, static=static)
        assert len(cache.layers) == 2
        torch.testing.assert_close(decode_in_steps(model, x, 5, static=static), model(x), atol=1e-5, rtol=0)


def test_kv_share_with_activation_checkpointing_same_gradients():
    grads = []
    for ckpt in (False, True):
        model = make(kv_share=2, position='rope', activation_checkpointing=ckpt).train()
        model(tokens(2, 9)).square().mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    torch.testing.assert_close(grads[0], grads[1], atol=1e-6, rtol=0)


# ---------------------------------------------------------------------------------------------- layer windows

def test_layer_windows_give_each_layer_its_window():
    model = make(position='none', layer_windows=['local', 'global'], sliding_window=3, n_layers=4)
    assert [b.attn.window for b in model.blocks] == [3, None, 3, None]
    x = tokens(2, 12)
    torch.testing.assert_close(model(x), reference(model, x, windows=[3, None, 3, None]), atol=1e-5, rtol=0)
    ints = make(position='none', layer_windows=[2, 5])
    torch.testing.assert_close(ints(x), reference(ints, x, windows=[2, 5]), atol=1e-5, rtol=0)
    assert ints.reach == 1 + 4 + 1 and model.reach is None


@pytest.mark.parametrize('position', ['rope', 'alibi', 'learned'])
def test_layer_windows_cache_keeps_only_the_window_of_local_layers(position):
    model = make(position=position, layer_windows=['local', 'global'], sliding_window=3, n_kv_heads=2)
    x = tokens(3, 20)
    for static in (False, True):
        cache = model.init_cache(3, static=static)
        assert cache.layers[0].k.shape[2] == 3 and cache.layers[1].k.shape[2] == L
        torch.testing.assert_close(decode_in_steps(model, x, 7, static=static), model(x), atol=1e-5, rtol=0)
    # chunks longer than the window, after a chunk
    cache = model.init_cache(3)
    parts = [model(x[:, :5], cache=cache, input_pos=torch.arange(5)),
             model(x[:, 5:13], cache=cache, input_pos=torch.arange(5, 13))]
    torch.testing.assert_close(torch.cat(parts, 1), model(x[:, :13]), atol=1e-5, rtol=0)


def test_layer_windows_errors_name_the_problem():
    with pytest.raises(ValueError, match="divides n_layers=2"):
        make(layer_windows=['local', 'global', 'local'], sliding_window=2)
    with pytest.raises(ValueError, match="sliding_window"):
        make(layer_windows=['local', 'global'])
    with pytest.raises(ValueError, match="entry 0"):
        make(layer_windows=[0, 'global'])
    with pytest.raises(ValueError, match="shares"):
        make(layer_windows=[2, 'global'], kv_share=2)
    with pytest.raises(ValueError, match="kv_share"):
        make(kv_share=0)


def test_registers_and_windows_train_through_the_loss():
    model = make(position='rope', registers=2, layer_windows=['local', 'local', 'global', 'global'],
                 sliding_window=4, kv_share=2, n_layers=4).train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    x = tokens(4, 16)
    first = None
    for _ in range(30):
        loss = F.cross_entropy(model(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten())
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.5 * first  # memorises a fixed batch


# ------------------------------------------------------------------------------- generation, every variant

# this branch's architecture variants (a memory model generates with its training context, memory + segment)
GENERATION_VARIANTS = {
    'registers': dict(position='rope', registers=2),
    'kv-share': dict(position='alibi', kv_share=2, n_kv_heads=2),
    'layer-windows': dict(position='rope', layer_windows=['local', 'global'], sliding_window=5),
    'rope-linear-scaling': dict(position='rope', rope_scaling='linear', rope_scale=4.0),
    'rope-ntk': dict(position='rope', rope_scaling='ntk', rope_scale=2.0),
    'rope-yarn': dict(position='rope', rope_scaling='yarn', rope_scale=4.0),
    'memory': dict(position='rope', memory_len=6),
}


@pytest.mark.parametrize('variant', GENERATION_VARIANTS)
def test_cached_generation_equals_recompute_for_every_variant(variant):
    from test_inference import cached_logits, make_model, prompt, reference_greedy, reference_logits

    from xlabml import inference
    model = make_model(**GENERATION_VARIANTS[variant])
    block = model.context_len  # what infer.py passes: max_len (+ memory_len)
    x = prompt(5)
    assert inference.greedy_search(model, x, 3 * block, block).tolist() == reference_greedy(model, x, 3 * block,
                                                                                              block)
    expected = reference_greedy(model, x, 3 * block, block, generator=torch.Generator().manual_seed(0))
    got = inference.sample(model, x, 3 * block, block, generator=torch.Generator().manual_seed(0))
    assert got.tolist() == expected
    prompts = [prompt(3, seed=3), prompt(block + 4, seed=4), prompt(1, seed=6)]
    continuations = torch.randint(0, model.head.out_features, (3, 2 * block),
                                  generator=torch.Generator().manual_seed(7))
    for static in (False, True):
        got = cached_logits(model, prompts, continuations, block, static=static)
        for row, p in enumerate(prompts):
            seq = torch.cat([p, continuations[row]])
            torch.testing.assert_close(got[row].double(), reference_logits(model, seq, len(p), block), atol=1e-6,
                                       rtol=0)


# ------------------------------------------------------------------------------------------------- export

MODERN = dict(position='rope', norm='rmsnorm', ffn='swiglu', bias=False, embedding_scale=1.0)


@pytest.mark.parametrize('variant', [dict(registers=2), dict(kv_share=2), dict(layer_windows=[3, None]),
                                     dict(attention='linear'), dict(rope_scaling='yarn', rope_scale=2.0)], ids=str)
def test_memory_variants_export_to_the_xlab_class_not_a_stock_one(tmp_path, variant):
    transformers = pytest.importorskip('transformers')
    from interop_support import make_checkpoint, train_tokenizer

    from xlabml.interop.hf import export_hf
    tokenizer = train_tokenizer(tmp_path)
    path, model = make_checkpoint(tmp_path / 'model.ckpt', tokenizer.path, **MODERN, **variant)
    outdir, cls, reasons = export_hf(path, tmp_path / 'hf')
    name = next(iter(variant)) if 'attention' not in variant else 'linear attention'
    assert cls == 'XLabForCausalLM' and any(name in why for why in reasons.values())
    hf = transformers.AutoModelForCausalLM.from_pretrained(outdir, trust_remote_code=True).eval()
    x = torch.randint(0, 700, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(hf(input_ids=x).logits, model(x), atol=1e-5, rtol=0)
