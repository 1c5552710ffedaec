import contextlib
import copy
import math
import re

import pytest
import torch

from xlabml.layers import (
    ALiBiPosition, ATTENTIONS, Decoder, FEED_FORWARDS, NORMS, POSITIONS, RotaryPosition, apply_rotary,
    swiglu_hidden,
)

V, L = 53, 48
POSITION_TYPES = ['sinusoidal', 'learned', 'rope', 'alibi', 'none']


# the training-recipe variants (issue 15): each on the modern block
CAPACITY = {
    'moe': dict(position='rope', norm='rmsnorm', ffn='moe', n_experts=4, moe_top_k=2),
    'moe-top1-alibi': dict(position='alibi', ffn='moe', n_experts=3, moe_top_k=1),
    'sgu': dict(position='rope', norm='rmsnorm', ffn='sgu'),
    'relu2': dict(position='rope', norm='rmsnorm', ffn='relu2'),
    'value-embeds': dict(position='rope', value_embeddings=1),
    'value-embeds-gqa-window': dict(position='alibi', n_kv_heads=2, value_embeddings=1, sliding_window=5),
    'unet-skips': dict(position='rope', unet_skips=True, n_layers=3),
    'sgu-window-parallel': dict(ffn='sgu', sliding_window=5, parallel_residual=True),
    'head-qk': dict(position='rope', head_qk=16),
    'head-qk-window': dict(position='rope', head_qk=8, sliding_window=4),
    'd-embedding': dict(position='rope', d_embedding=16),
    'd-embedding-tied': dict(d_embedding=48, tie_embeddings=True),
    'softcap': dict(position='rope', logit_softcap=3.0),
    'all': dict(position='rope', ffn='sgu', head_qk=8, d_embedding=16, logit_softcap=10.0),
}
VARIANTS = {
    **{f'position={p}': dict(position=p) for p in POSITION_TYPES},
    'rope-partial': dict(position='rope', rope_fraction=0.5, rope_base=500.0),
    'rmsnorm-swiglu-gqa': dict(position='rope', norm='rmsnorm', ffn='swiglu', n_kv_heads=2),
    'mqa-relu': dict(n_kv_heads=1, ffn='relu'),
    'postnorm': dict(prenorm=False, final_norm=False),
    'parallel': dict(parallel_residual=True),
    'postnorm-parallel': dict(prenorm=False, parallel_residual=True),
    'window': dict(sliding_window=4),
    'window-alibi': dict(sliding_window=5, position='alibi'),
    'qk-norm-nobias-tied': dict(qk_norm=True, bias=False, tie_embeddings=True),
    'naive': dict(attention='naive', position='alibi', n_kv_heads=2),
    **{f'capacity-{name}': kwargs for name, kwargs in CAPACITY.items()},
}


def make(seed=0, **kwargs):
    torch.manual_seed(seed)
    config = dict(d_model=32, n_layers=2, n_heads=4, d_ff=64, dropout=0.0) | kwargs
    return Decoder(V, L, **config).eval()


def tokens(*shape, seed=1):
    return torch.randint(0, V, shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize('variant', VARIANTS)
def test_causal(variant):
    model = make(**VARIANTS[variant])
    x = tokens(2, 16)
    logits = model(x)
    for t in (0, 5, 11):
        changed = x.clone()
        changed[:, t + 1:] = (changed[:, t + 1:] + 1) % V
        assert torch.allclose(model(changed)[:, :t + 1], logits[:, :t + 1], atol=1e-6)
        assert not torch.allclose(model(changed)[:, t + 1:], logits[:, t + 1:], atol=1e-3)


@pytest.mark.parametrize('variant', VARIANTS)
def test_packed_equals_alone(variant):
    model = make(**VARIANTS[variant])
    lengths = [5, 9, 2, 8]
    docs = [tokens(1, n, seed=10 + i) for i, n in enumerate(lengths)]
    x = torch.cat(docs, dim=1)  # 1 x 24
    positions = torch.cat([torch.arange(n) for n in lengths])[None]
    doc_ids = torch.cat([torch.full((n,), i) for i, n in enumerate(lengths)])[None]
    packed = model(x, positions=positions, doc_ids=doc_ids)
    start = 0
    for doc, n in zip(docs, lengths):
        alone = model(doc)
        assert (packed[:, start:start + n] - alone).abs().max() <= 1e-5
        start += n


def decode_in_steps(model, x, prompt_len, **cache_kwargs):
    cache = model.init_cache(x.size(0), **cache_kwargs)
    outputs = [model(x[:, :prompt_len], cache=cache, input_pos=torch.arange(prompt_len))]
    for i in range(prompt_len, x.size(1)):
        outputs.append(model(x[:, i:i + 1], cache=cache, input_pos=torch.tensor([i])))
    return torch.cat(outputs, dim=1)


CACHE_VARIANTS = {
    **{f'{p}-{kv}': dict(position=p, n_kv_heads=kv) for p in POSITION_TYPES[:4] for kv in (4, 2, 1)},
    **{f'{p}-window': dict(position=p, sliding_window=3, n_kv_heads=2) for p in POSITION_TYPES[:4]},
    'rope-partial-qknorm': dict(position='rope', rope_fraction=0.25, qk_norm=True),
    'postnorm-parallel-naive': dict(prenorm=False, parallel_residual=True, attention='naive'),
    **{f'capacity-{name}': kwargs for name, kwargs in CAPACITY.items()},
}


@pytest.mark.parametrize('static', [False, True], ids=['dynamic', 'static'])
@pytest.mark.parametrize('variant', CACHE_VARIANTS)
def test_cache_prefill_decode_equals_full_forward(variant, static):
    model = make(**CACHE_VARIANTS[variant])
    x = tokens(3, 20)
    full = model(x)
    stepped = decode_in_steps(model, x, prompt_len=7, static=static)  # prompt longer than the window
    assert (stepped - full).abs().max() <= 1e-4


def test_cache_chunked_prefill_and_last_only():
    model = make(position='rope', sliding_window=6, n_kv_heads=2)
    x = tokens(2, 20)
    full = model(x)
    cache = model.init_cache(2, max_len=32)
    first = model(x[:, :8], cache=cache, input_pos=torch.arange(8))
    second = model(x[:, 8:15], cache=cache, input_pos=torch.arange(8, 15))  # a chunk after a chunk
    last = model(x[:, 15:16], cache=cache, input_pos=torch.tensor([15]), last_only=True)
    assert (torch.cat([first, second, last], 1) - full[:, :16]).abs().max() <= 1e-4
    assert last.shape == (2, 1, V)
    assert torch.allclose(model(x, last_only=True), full[:, -1:], atol=1e-6)


@pytest.mark.parametrize('position', POSITION_TYPES[:4])
def test_cache_left_padded_batch_equals_each_row_alone(position):
    model = make(position=position, n_kv_heads=2)
    prompts = [tokens(1, n, seed=20 + n)[0] for n in (3, 7, 5)]
    width, steps = 7, 4
    x = torch.zeros(3, width, dtype=torch.long)
    doc_ids = torch.full((3, width), -1)
    positions = torch.zeros(3, width, dtype=torch.long)
    for row, prompt in enumerate(prompts):
        n = len(prompt)
        x[row, width - n:] = prompt
        doc_ids[row, width - n:] = 0
        positions[row, width - n:] = torch.arange(n)
    continuation = tokens(3, steps, seed=5)
    cache = model.init_cache(3)
    outputs = [model(x, positions=positions, doc_ids=doc_ids, cache=cache, input_pos=torch.arange(width))[:, -1:]]
    lengths = torch.tensor([len(p) for p in prompts])
    for i in range(steps):
        slot = width + i
        outputs.append(model(continuation[:, i:i + 1], positions=(lengths + i)[:, None],
                             doc_ids=torch.zeros(3, 1, dtype=torch.long), cache=cache,
                             input_pos=torch.tensor([slot])))
    batched = torch.cat(outputs, dim=1)  # 3 x (1 + steps) x V
    for row, prompt in enumerate(prompts):
        alone = model(torch.cat([prompt, continuation[row]])[None])[0, len(prompt) - 1:]
        assert (batched[row] - alone).abs().max() <= 1e-4


def test_cache_reorder_and_reset():
    model = make(position='rope', n_kv_heads=2)
    x = tokens(2, 10)
    cache = model.init_cache(2)
    model(x[:, :6], cache=cache, input_pos=torch.arange(6))
    cache.reorder(torch.tensor([1, 1, 0]))  # beam search: rows may repeat, the batch may grow
    assert cache.batch_size == 3 and cache.layers[0].k.shape[0] == 3
    rows = x[[1, 1, 0]]
    step = model(rows[:, 6:7], cache=cache, input_pos=torch.tensor([6]))
    assert (step - model(rows[:, :7])[:, -1:]).abs().max() <= 1e-4
    cache.reset()
    assert all(layer.k.abs().sum() == 0 for layer in cache.layers)
    assert 'k' not in model.state_dict() and not any('cache' in k for k in model.state_dict())
    assert cache.state_dict() == {}  # non-persistent buffers: never in a checkpoint


def test_cache_errors_name_the_problem():
    model = make()
    cache = model.init_cache(2, max_len=8)
    with pytest.raises(ValueError, match='input_pos'):
        model(tokens(2, 3), cache=cache)
    with pytest.raises(ValueError, match='cache holds 2'):
        model(tokens(3, 3), cache=cache, input_pos=torch.arange(3))
    with pytest.raises(ValueError, match='max_len=8'):
        model(tokens(2, 3), cache=cache, input_pos=torch.arange(7, 10))


def test_gqa_with_all_heads_is_mha_and_grouping_repeats_kv_heads():
    mha = make(n_kv_heads=None)
    same = make(n_kv_heads=4)
    same.load_state_dict(mha.state_dict())
    x = tokens(2, 12)
    assert torch.equal(mha(x), same(x))
    # a GQA model equals the MHA model whose key/value heads are copies of the shared ones
    gqa = make(n_kv_heads=2, seed=3)
    expanded = make(n_kv_heads=4)
    state = gqa.state_dict()
    d = 8
    for name in [k for k in state if k.endswith('attn.qkv.weight') or k.endswith('attn.qkv.bias')]:
        q, k, v = state[name].split([32, 16, 16])
        k = k.unflatten(0, (2, d)).repeat_interleave(2, 0).flatten(0, 1)
        v = v.unflatten(0, (2, d)).repeat_interleave(2, 0).flatten(0, 1)
        state[name] = torch.cat([q, k, v])
    expanded.load_state_dict(state)
    assert (gqa(x) - expanded(x)).abs().max() <= 1e-5


def test_rope_is_relative():
    rope = RotaryPosition(head_dim=16, rope_fraction=0.5)
    q, k = torch.randn(2, 4, 10, 16), torch.randn(2, 4, 10, 16)
    positions = torch.arange(10).expand(2, 10)
    scores = []
    for shift in (0, 37):
        cos, sin = rope.rotary(positions + shift)
        scores.append(apply_rotary(q, cos, sin) @ apply_rotary(k, cos, sin).transpose(-2, -1))
    assert (scores[0] - scores[1]).abs().max() <= 1e-4
    assert torch.equal(apply_rotary(q, cos, sin)[..., 8:], q[..., 8:])  # partial: last half untouched
    model = make(position='rope', attention='naive')
    for block in model.blocks:
        block.attn.keep_weights = True
    x = tokens(1, 12)
    model(x)
    weights = [b.attn.weights for b in model.blocks]
    shifted = model(x, positions=torch.arange(12)[None] + 100)
    assert (shifted - model(x)).abs().max() <= 1e-4
    assert all((w - b.attn.weights).abs().max() <= 1e-5 for w, b in zip(weights, model.blocks))


def test_naive_weights_and_backends_agree():
    for config in (dict(), dict(position='alibi', sliding_window=4, n_kv_heads=2)):
        naive, sdpa = make(attention='naive', **config), make(attention='sdpa', **config)
        sdpa.load_state_dict(naive.state_dict())
        x = tokens(2, 14)
        doc_ids = torch.tensor([[0] * 6 + [1] * 8, [0] * 14])
        naive.blocks[0].attn.keep_weights = True
        assert (naive(x, doc_ids=doc_ids) - sdpa(x, doc_ids=doc_ids)).abs().max() <= 1e-5
        w = naive.blocks[0].attn.weights  # b h t t
        assert w.shape == (2, 4, 14, 14)
        assert torch.allclose(w.sum(-1), torch.ones(2, 4, 14))
        assert w.triu(1).abs().max() == 0  # causal
        assert w[0, :, 6:, :6].abs().max() == 0  # document 1 never sees document 0


def test_alibi_slopes():
    assert torch.allclose(ALiBiPosition.make_slopes(8), 2.0 ** -torch.arange(1, 9.0))
    assert torch.allclose(ALiBiPosition.make_slopes(6)[:4], 2.0 ** -(2 * torch.arange(1, 5.0)))


def expected_parameters(d=32, n_layers=2, h=4, kv=4, f=64, ffn='gelu', norm='layernorm', bias=True,
                        position='sinusoidal', tied=False, qk_norm=False, final_norm=True):
    hd = d // h
    norm_params = (lambda n: 2 * n if bias else n) if norm == 'layernorm' else (lambda n: n)
    attn = d * (h + 2 * kv) * hd + h * hd * d + bias * ((h + 2 * kv) * hd + d) + qk_norm * 2 * norm_params(hd)
    hidden = swiglu_hidden(f) if ffn == 'swiglu' else f
    mlp = d * hidden * (2 if ffn == 'swiglu' else 1) + hidden * d + bias * (hidden * (2 if ffn == 'swiglu' else 1) + d)
    block = attn + mlp + 2 * norm_params(d)
    total = V * d + n_layers * block + final_norm * norm_params(d) + (0 if tied else V * d) + bias * V
    return total + (L * d if position == 'learned' else 0)


@pytest.mark.parametrize('config', [
    dict(),
    dict(position='learned', kv=2),
    dict(ffn='swiglu', norm='rmsnorm', bias=False, kv=1, tied=True),
    dict(qk_norm=True, final_norm=False, position='rope'),
], ids=str)
def test_parameter_count_matches_formula(config):
    kwargs = dict(n_kv_heads=config.get('kv'), ffn=config.get('ffn', 'gelu'), norm=config.get('norm', 'layernorm'),
                  bias=config.get('bias', True), position=config.get('position', 'sinusoidal'),
                  tie_embeddings=config.get('tied', False), qk_norm=config.get('qk_norm', False),
                  final_norm=config.get('final_norm', True))
    assert make(**kwargs).num_parameters() == expected_parameters(**config)
    assert swiglu_hidden(64) == 48 and swiglu_hidden(2048) == 1368


def test_init_is_scaled():
    torch.manual_seed(0)
    model = Decoder(V, L, d_model=256, n_layers=8, n_heads=4, d_ff=1024, dropout=0.0)
    block = model.blocks[3]
    assert abs(block.attn.qkv.weight.std().item() - 0.02) < 0.001
    assert abs(block.ffn.proj.weight.std().item() - 0.02 / 4) < 0.0003  # 0.02 / sqrt(2 * 8)
    assert abs(block.attn.proj.weight.std().item() - 0.02 / 4) < 0.0003
    assert block.ffn.fc.bias.abs().max() == 0 and model.head.bias.abs().max() == 0
    tied = Decoder(V, L, d_model=32, n_layers=1, n_heads=4, d_ff=64, tie_embeddings=True)
    assert tied.head.weight is tied.embedding.weight


@pytest.mark.parametrize('scale,expected', [(None, math.sqrt(32)), (1.0, 1.0), (2.5, 2.5)])
def test_embedding_scale_multiplies_the_token_embeddings(scale, expected):
    model = make(position='none', embedding_scale=scale)
    seen = []
    model.blocks[0].register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    x = tokens(2, 5)
    model(x)
    torch.testing.assert_close(seen[0], model.embedding(x) * expected, atol=0, rtol=0)
    with pytest.raises(ValueError, match="embedding_scale"):
        make(embedding_scale=0.0)


def test_unknown_names_list_valid_ones():
    for key, registry in (('position', POSITIONS), ('norm', NORMS), ('ffn', FEED_FORWARDS),
                          ('attention', ATTENTIONS)):
        with pytest.raises(ValueError, match=f"unknown {key} 'bogus'.*" + ', '.join(sorted(registry))):
            make(**{key: 'bogus'})
    with pytest.raises(ValueError, match='n_kv_heads=3'):
        make(n_kv_heads=3)
    with pytest.raises(ValueError, match='d_model=30'):
        make(d_model=30)


def test_flash_backend_missing_is_a_clear_error():
    import importlib.util
    if importlib.util.find_spec('flash_attn') is not None:
        pytest.skip('flash_attn is installed')
    with pytest.raises(ValueError, match="flash_attn"):
        make(attention='flash')


def test_activation_checkpointing_same_gradients():
    grads = []
    for ckpt in (False, True):
        model = make(activation_checkpointing=ckpt, position='rope').train()
        x = tokens(2, 12)
        model(x, doc_ids=torch.tensor([[0] * 5 + [1] * 7] * 2)).square().mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    assert torch.allclose(grads[0], grads[1], atol=1e-6)


def test_dropout_placement_defaults():
    model = Decoder(V, L, d_model=32, n_layers=1, n_heads=4, d_ff=64, dropout=0.1)
    block = model.blocks[0]
    assert block.attn.dropout == pytest.approx(0.1)  # attention probabilities
    assert isinstance(block.ffn.dropout, torch.nn.Dropout)  # feed-forward hidden
    assert isinstance(block.dropout, torch.nn.Identity)  # residual branches: off by default
    assert isinstance(model.embedding_dropout, torch.nn.Identity)
    x = tokens(2, 8)
    assert torch.equal(model.eval()(x), model(x))  # eval is deterministic
    assert math.isclose(model.embedding_scale, math.sqrt(32))


def cast_like(kind, model):
    """(model, context) computing as Lightning's or FSDP's ``kind`` of bf16 would: ``.to(bf16)``; ``bf16-true``
    (module cast, bf16 default dtype during forward); ``bf16-mixed`` (fp32 weights under autocast); FSDP's
    bf16 buffer casting (``buffer.data = buffer.to(bf16)``, which ignores ``_apply`` overrides)."""
    from lightning.pytorch.plugins.precision import HalfPrecision, MixedPrecision
    model = copy.deepcopy(model)
    if kind == 'to-bf16':
        return model.to(torch.bfloat16), contextlib.nullcontext()
    if kind == 'bf16-true':
        plugin = HalfPrecision('bf16-true')
        return plugin.convert_module(model), plugin.forward_context()
    if kind == 'bf16-mixed':
        return model, MixedPrecision('bf16-mixed', 'cpu').forward_context()
    for buffer in model.buffers():
        if buffer.is_floating_point():
            buffer.data = buffer.data.to(torch.bfloat16)
    return model, contextlib.nullcontext()


@pytest.mark.parametrize('kind', ['to-bf16', 'bf16-true', 'bf16-mixed', 'fsdp-bf16-buffers'])
@pytest.mark.parametrize('position', POSITION_TYPES)
def test_positions_do_not_depend_on_the_module_dtype(position, kind):
    torch.manual_seed(0)
    # 12 heads: ALiBi slopes that are not powers of two (those of 4 or 8 heads are exact in bf16)
    model = Decoder(V, 512, d_model=48, n_layers=1, n_heads=12, d_ff=64, dropout=0.0, position=position).eval()
    cast, context = cast_like(kind, model)
    p = torch.arange(512)[None]  # up to 511, where a bf16 inv_freq moved sinusoidal values by up to 0.7
    x = tokens(1, 512)
    with torch.no_grad(), context:
        pos = [cast.position.embed(p), cast.position.rotary(p), cast.position.bias(p[0], p[0])]
        logits = cast(x)
    with torch.no_grad():
        reference = [model.position.embed(p), model.position.rotary(p), model.position.bias(p[0], p[0])]
        full = model(x)
    for ours, theirs in zip(pos, reference):
        if position == 'learned' and ours is not None and kind in ('to-bf16', 'bf16-true'):
            theirs = theirs.to(torch.bfloat16)  # a learned table is a parameter: cast with the module
        assert (ours is None) == (theirs is None)
        if ours is None:
            continue
        for u, v in zip(*((ours, theirs) if isinstance(ours, tuple) else ((ours,), (theirs,)))):
            assert u.dtype == v.dtype and torch.equal(u, v)  # angles, embeddings, biases bit for bit
    assert logits.dtype == (torch.float32 if kind == 'fsdp-bf16-buffers' else torch.bfloat16)
    assert torch.isfinite(logits).all()
    assert ((logits.float() - full).norm() / full.norm()).item() < 0.02  # bf16 rounding, nothing more


# ------------------------------------------------------------------------------- training-recipe variants

def test_moe_routes_each_token_to_exactly_top_k_experts_and_its_aux_loss_is_the_switch_formula():
    from xlabml.layers import MoE
    torch.manual_seed(0)
    moe = MoE(16, 32, n_experts=5, moe_top_k=2).train()
    x = torch.randn(3, 7, 16)
    seen = {e: [] for e in range(5)}  # expert -> the token rows it was given
    hooks = [expert.register_forward_hook(lambda m, inp, out, e=e: seen[e].append(inp[0]))
             for e, expert in enumerate(moe.experts)]
    out = moe(x)
    for hook in hooks:
        hook.remove()
    flat = x.reshape(-1, 16)
    probs = torch.softmax(moe.router(flat), dim=-1)  # n e
    top, chosen = probs.topk(2, dim=-1)
    routed = torch.zeros(21, 5, dtype=torch.long)  # token x expert: times the token reached the expert
    for e, inputs in seen.items():
        for row in torch.cat(inputs) if inputs else []:
            routed[(flat == row).all(dim=1).nonzero().item(), e] += 1
    assert routed.sum(dim=1).tolist() == [2] * 21  # exactly top-k experts per token, each once
    assert routed.max() == 1
    assert torch.equal(routed.bool(), torch.zeros(21, 5, dtype=torch.bool).scatter_(1, chosen, True))  # the top-k
    # the output: the chosen experts' outputs weighted by their renormalised router probabilities
    weights = top / top.sum(dim=-1, keepdim=True)
    expected = torch.stack([sum(weights[i, j] * moe.experts[chosen[i, j]](flat[i:i + 1])[0] for j in range(2))
                            for i in range(21)])
    torch.testing.assert_close(out.reshape(-1, 16), expected, rtol=1e-5, atol=1e-6)
    # Switch's load-balancing loss: n_experts * sum_e (share of the n * k assignments to e) * (mean prob of e)
    share = routed.sum(dim=0).float() / (21 * 2)
    torch.testing.assert_close(moe.load, share)
    torch.testing.assert_close(moe.aux_loss, 5 * (share * probs.mean(dim=0)).sum())
    assert moe.aux_loss.requires_grad  # it trains the router
    moe.eval()
    moe(x)
    assert moe.aux_loss is None  # only in training
    with pytest.raises(ValueError, match='moe_top_k must be an int in 1..n_experts=4'):
        MoE(16, 32, n_experts=4, moe_top_k=5)
    with pytest.raises(ValueError, match='n_experts must be an int >= 2'):
        MoE(16, 32, n_experts=1)


def test_moe_balanced_router_gives_aux_loss_one():
    from xlabml.layers import MoE
    moe = MoE(8, 16, n_experts=4, moe_top_k=1).train()
    torch.nn.init.zeros_(moe.router.weight)  # uniform probabilities: P_e = 1/4
    moe(torch.randn(2, 6, 8))
    # ties go to expert 0 (every f_e share sums to 1), so the loss is n * sum f_e / n = 1 at any routing
    assert moe.aux_loss.item() == pytest.approx(1.0)


def test_d_embedding_head_qk_and_softcap_shapes_and_values():
    model = make(d_embedding=16, tie_embeddings=True)
    assert model.embedding.weight.shape == (V, 16) and model.head.weight is model.embedding.weight
    assert model.embedding_in.weight.shape == (32, 16) and model.embedding_out.weight.shape == (16, 32)
    assert make(d_embedding=32).embedding_in is None  # d_model itself: no projections
    capped, plain = make(logit_softcap=2.0), make()
    x = tokens(2, 12)
    torch.testing.assert_close(capped(x), 2.0 * torch.tanh(plain(x) / 2.0))  # same weights (same seed)
    # head-QK adds the copy scores of the visible context's tokens to the head's logits
    model = make(head_qk=8)
    base = make()
    base.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith('head_qk')})
    x = tokens(1, 6)
    h = model(x, return_hidden=True)  # b t c, after the final norm
    q, k = model.head_qk.q(h), model.head_qk.k(h)
    scores = (q @ k.transpose(1, 2) / 8).tril()  # causal: s <= t
    copy = torch.zeros(1, 6, V).scatter_add_(2, x[:, None, :].expand(1, 6, 6), scores)
    torch.testing.assert_close(model(x), base(x) + copy, rtol=1e-5, atol=1e-5)
    for kwargs, match in ((dict(head_qk=0), 'head_qk'), (dict(d_embedding=0), 'd_embedding'),
                          (dict(logit_softcap=-1.0), 'logit_softcap')):
        with pytest.raises(ValueError, match=match):
            make(**kwargs)


@pytest.mark.parametrize("stateful", [dict(ffn="sgu"), dict(head_qk=8)])
@pytest.mark.parametrize("option, message", [
    (dict(kv_share=2), "kv_share=2 is not supported with it"),
    (dict(layer_windows=["local", "global"], sliding_window=4), "layer_windows=['local', 'global'] is not supported"),
    (dict(memory_len=8), "memory_len=8 is not supported with it"),
    (dict(attention="linear"), "attention='linear' is not supported with it"),
])
def test_per_slot_state_refuses_the_memory_options_it_cannot_follow(stateful, option, message):
    """SGU and head-QK keep per-token state beside the KV cache, one cache layer per block: shared, windowed,
    segment-memory and linear-attention caches would leave it behind, so the combination is one clear error."""
    with pytest.raises(ValueError, match=re.escape(message)):
        Decoder(32, 16, d_model=16, n_layers=2, n_heads=2, d_ff=32, position="rope", **stateful, **option)


def test_relu2_mlp_is_squared_relu_between_two_linears():
    from xlabml.layers import ReLU2MLP
    torch.manual_seed(0)
    mlp = ReLU2MLP(8, 16)
    x = torch.randn(3, 5, 8)
    hidden = mlp.fc(x)
    assert (hidden < 0).any()  # the activation's negative side is exercised
    expected = mlp.proj(torch.where(hidden > 0, hidden * hidden, torch.zeros_like(hidden)))
    torch.testing.assert_close(mlp(x), expected, rtol=0, atol=0)
    assert sum(p.numel() for p in mlp.parameters()) == 8 * 16 + 16 + 16 * 8 + 8


def test_value_embeddings_add_each_tokens_vector_to_its_layers_values():
    """A table whose rows are all one vector c adds c to every value of its layers: the same model as one
    without value embeddings whose value bias is c larger in exactly those layers (table 0: layers 0 and 3)."""
    config = dict(position='rope', n_layers=4, n_kv_heads=2)
    ve = make(value_embeddings=2, **config)
    assert ve.value_layers == {0: 0, 3: 0, 1: 1, 2: 1}
    plain = make(**config)
    missing, unexpected = plain.load_state_dict(ve.state_dict(), strict=False)
    assert not missing and set(unexpected) == {'value_embeds.0.weight', 'value_embeds.1.weight'}
    c = torch.randn(ve.value_embeds[0].weight.shape[1], generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ve.value_embeds[0].weight.copy_(c.expand_as(ve.value_embeds[0].weight))
        ve.value_embeds[1].weight.zero_()
        for i in (0, 3):
            plain.blocks[i].attn.qkv.bias[-c.numel():] += c  # the v rows come last in qkv
    x = tokens(2, 12)
    torch.testing.assert_close(ve(x), plain(x), atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        ve.value_embeds[1].weight.normal_()  # the second table reaches the output
    assert (ve(x) - plain(x)).abs().max() > 1e-3


@pytest.mark.parametrize('kwargs, match', [
    (dict(value_embeddings=2), 'value_embeddings must be an integer in 0..1'),
    (dict(value_embeddings=True), 'value_embeddings must be an integer'),
    (dict(value_embeddings=1, kv_share=2, position='rope'), 'kv_share=2 is not supported'),
    (dict(value_embeddings=1, attention='linear', position='rope'), "attention='linear' is not supported"),
    (dict(value_embeddings=1, memory_len=4, position='rope'), 'memory_len=4 is not supported'),
])
def test_value_embeddings_refuse_what_they_cannot_serve(kwargs, match):
    with pytest.raises(ValueError, match=match):
        make(**kwargs)


def test_unet_skips_add_first_half_outputs_to_mirrored_second_half_inputs():
    model = make(position='rope', n_layers=4, unet_skips=True)
    with torch.no_grad():
        model.skip_weights.copy_(torch.tensor([0.5, -2.0]))
    x = tokens(2, 10)
    ctx, positions = model._context(x, None, None)
    ctx.rope = model.position.rotary(positions)
    h = model.embedding(x) * model.embedding_scale
    out0 = model.blocks[0](h, ctx)
    out1 = model.blocks[1](out0, ctx)
    out2 = model.blocks[2](out1 - 2.0 * out1, ctx)  # layer 2 gets layer 1's output (weight 1: pair 1, 2)
    out3 = model.blocks[3](out2 + 0.5 * out0, ctx)  # layer 3 gets layer 0's (weight 0: pair 0, 3)
    torch.testing.assert_close(model.hidden(x, positions, model._context(x, None, None)[0]), out3)
    with torch.no_grad():
        model.skip_weights.zero_()
    plain = make(position='rope', n_layers=4)
    plain.load_state_dict(model.state_dict(), strict=False)
    torch.testing.assert_close(model(x), plain(x), rtol=0, atol=0)
