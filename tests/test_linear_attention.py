"""Linear attention (attention='linear'): the chunked parallel form against the formula, recurrent decoding
against the parallel form token for token, and generation past block_size with a state that never grows."""
import pytest
import torch
import torch.nn.functional as F

from xlabml import inference
from xlabml.layers import Decoder
from xlabml.linear_attention import feature_map

V, BLOCK = 43, 16


def make(seed=0, chunk_size=5, **kwargs):
    torch.manual_seed(seed)
    config = dict(d_model=32, n_layers=2, n_heads=4, d_ff=64, dropout=0.0, attention='linear',
                  position='rope') | kwargs
    model = Decoder(V, BLOCK, **config).eval()
    for block in model.blocks:
        block.attn.chunk_size = chunk_size  # chunks shorter than the inputs: the running state is used
    return model


def tokens(*shape, seed=1):
    return torch.randint(0, V, shape, generator=torch.Generator().manual_seed(seed))


def formula(attn, x, positions):
    """One linear-attention layer straight from the paper's formula, one query at a time (no chunks, no state)."""
    b, t, _ = x.shape
    h, g, d = attn.n_heads, attn.n_kv_heads, attn.head_dim
    q, k, v = attn.qkv(x).split((h * d, g * d, g * d), -1)
    q = feature_map(q.view(b, t, h, d))
    k = feature_map(k.view(b, t, g, d)).repeat_interleave(h // g, 2)
    v = v.view(b, t, g, d).repeat_interleave(h // g, 2)
    angles = positions[..., None].float() * (10000.0 ** (-torch.arange(0, d, 2) / d))  # b t d/2

    def rotate(z):  # b t h d
        cos, sin = angles.cos()[:, :, None], angles.sin()[:, :, None]
        z1, z2 = z[..., :d // 2], z[..., d // 2:]
        return torch.cat((z1 * cos - z2 * sin, z2 * cos + z1 * sin), -1)

    rq, rk = rotate(q), rotate(k)
    out = torch.zeros(b, t, h, d)
    for i in range(t):
        num = torch.einsum('bhd,bjhd,bjhe->bhe', rq[:, i], rk[:, :i + 1], v[:, :i + 1])
        den = torch.einsum('bhd,bjhd->bh', q[:, i], k[:, :i + 1])
        out[:, i] = num / den[..., None]
    return attn.proj(attn.out_norm(out).reshape(b, t, h * d))


@pytest.mark.parametrize('n_kv_heads', [4, 2])
def test_chunked_parallel_form_is_the_formula(n_kv_heads):
    model = make(n_kv_heads=n_kv_heads, n_layers=1)
    attn = model.blocks[0].attn
    x = torch.randn(2, 13, 32)
    positions = torch.arange(13).expand(2, 13)
    ctx, _ = model._context(torch.zeros(2, 13, dtype=torch.long), None, None)
    ctx.rope = model.position.rotary(positions)
    torch.testing.assert_close(attn(x, ctx), formula(attn, x, positions), atol=1e-5, rtol=0)


MODELS = {'rope-gqa': dict(n_kv_heads=2), 'none': dict(position='none'),
          'sinusoidal-qknorm-swiglu': dict(position='sinusoidal', qk_norm=True, ffn='swiglu')}


@pytest.mark.parametrize('variant', MODELS)
def test_recurrent_decoding_equals_the_parallel_form(variant):
    model = make(**MODELS[variant])
    x = tokens(3, 3 * BLOCK)  # longer than max_len: a state has no window
    full = model(x)
    cache = model.init_cache(3)
    steps = [model(x[:, :7], cache=cache, input_pos=torch.arange(7))]
    for i in range(7, x.size(1)):
        steps.append(model(x[:, i:i + 1], cache=cache, input_pos=torch.tensor([i])))
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=0)
    assert [tuple(layer.s.shape) for layer in cache.layers] == [(3, model.n_kv_heads, 8, 8)] * 2


def test_packed_documents_and_padded_rows_stay_apart():
    model = make()
    x = tokens(1, 14)
    packed = model(x, positions=torch.cat([torch.arange(6), torch.arange(8)])[None],
                   doc_ids=torch.tensor([[0] * 6 + [1] * 8]))
    torch.testing.assert_close(packed[:, 6:], model(x[:, 6:]), atol=1e-5, rtol=0)
    torch.testing.assert_close(packed[:, :6], model(x[:, :6]), atol=1e-5, rtol=0)
    # a left-padded batch through generation: each row as if alone
    prompts = [tokens(1, 3, seed=3)[0], tokens(1, 9, seed=4)[0]]
    batched = inference.greedy_search(model, prompts, 20, BLOCK)
    for p, out in zip(prompts, batched):
        assert out.tolist() == inference.greedy_search(model, p, 20, BLOCK).tolist()


def test_generation_past_block_size_needs_no_window():
    model = make(position='rope').double()
    with torch.no_grad():
        for block in model.blocks:
            block.attn.qkv.weight.mul_(3.0)
        model.head.weight.mul_(10.0)
    prompt = tokens(1, 5)[0]
    got = inference.greedy_search(model, prompt, 3 * BLOCK, BLOCK)
    seq = prompt.tolist()
    for _ in range(3 * BLOCK):  # the whole text every time: no crop to the last BLOCK tokens
        seq.append(int(model(torch.tensor([seq]))[0, -1].argmax()))
    assert got.tolist() == seq[5:]
    whole = torch.tensor([seq])
    assert (model(whole)[0, -1] - model(whole[:, -BLOCK:])[0, -1]).abs().max() > 1e-3  # a window is another model
    sampled = inference.sample(model, prompt, 3 * BLOCK, BLOCK, generator=torch.Generator().manual_seed(0))
    seq = prompt.tolist()
    generator = torch.Generator().manual_seed(0)
    for _ in range(3 * BLOCK):
        probs = torch.softmax(model(torch.tensor([seq]))[0, -1:].float(), -1)
        seq.append(int(inference._draw(probs, generator)))
    assert sampled.tolist() == seq[5:]
    beams = inference.beam_search(model, prompt, 3, 2 * BLOCK, BLOCK)
    assert len(beams) == 2 * BLOCK


def test_linear_attention_trains():
    model = make().train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    x = tokens(4, 17)
    losses = []
    for _ in range(40):
        loss = F.cross_entropy(model(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten())
        losses.append(loss.item())
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert losses[-1] < 0.5 * losses[0]


def test_linear_attention_refuses_what_it_cannot_do():
    for kwargs, match in ((dict(position='alibi'), "not 'alibi'"), (dict(registers=2), 'registers=2'),
                          (dict(sliding_window=4), 'sliding_window=4'), (dict(kv_share=2), 'kv_share=2')):
        with pytest.raises(ValueError, match=match):
            make(**kwargs)
    with pytest.raises(ValueError, match='fixed-size state'):
        make().init_cache(1, kv_dtype='int8')


def test_a_linear_checkpoint_is_never_run_as_softmax_attention(tmp_path):
    from xlabml.checkpoints import load_checkpoint
    from xlabml.models import XLabModel
    model = XLabModel(V, BLOCK, d_model=32, n_layers=1, n_heads=4, d_ff=64, attention='linear', position='rope')
    path = tmp_path / 'linear.ckpt'
    torch.save({'state_dict': model.state_dict(), 'hyper_parameters': dict(model.hparams)}, path)
    loaded = load_checkpoint(path, tokenizer=False).model
    x = tokens(2, 9)
    torch.testing.assert_close(loaded.eval()(x), model.eval()(x))
    with pytest.raises(ValueError, match="attention='sdpa' is another layer"):
        load_checkpoint(path, overrides={'attention': 'sdpa'}, tokenizer=False)
