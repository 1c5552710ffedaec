"""KV cache compression at inference: int8 storage, attention sinks + window (StreamingLLM) and eviction by
cumulative attention (H2O), each against a reference, composed with every strategy and batch, and from the CLI."""
import math

import pytest
import torch

from xlabml import infer_cli, inference
from xlabml.attention import Int8LayerKVCache
from xlabml.layers import Decoder
from xlabml.models import XLabModel
from xlabml.tokenizer import TokenizerTrainer

V, BLOCK = 40, 16


def make(seed=0, **kwargs):
    torch.manual_seed(seed)
    config = dict(d_model=32, n_layers=2, n_heads=4, d_ff=64, dropout=0.0, position='rope', n_kv_heads=2) | kwargs
    model = Decoder(V, BLOCK, **config).eval()
    with torch.no_grad():  # sharper than at initialisation: what a token sees shows in its logits
        for block in model.blocks:
            block.attn.qkv.weight.mul_(4.0)
        model.head.weight.mul_(10.0)
    return model


def tokens(*shape, seed=1):
    return torch.randint(0, V, shape, generator=torch.Generator().manual_seed(seed))


def decode(model, x, prompt_len, **options):
    """Logits (b, t, v) of x: the prompt in one forward, then one token at a time, through a cache with options."""
    cache = model.init_cache(x.size(0), **options)
    out = [model(x[:, :prompt_len], cache=cache, input_pos=torch.arange(prompt_len))]
    for i in range(prompt_len, x.size(1)):
        out.append(model(x[:, i:i + 1], cache=cache, input_pos=torch.tensor([i])))
    return torch.cat(out, 1), cache


def cache_bytes(cache):
    return sum(b.numel() * b.element_size() for b in cache.buffers())


# ----------------------------------------------------------------------------------------------------- int8

def test_int8_quantization_is_per_token_and_head_absmax():
    x = torch.randn(2, 3, 5, 8) * torch.tensor([0.01, 1.0, 100.0])[None, :, None, None]
    x[0, 0, 0] = 0.0  # an all-zero token stays zero
    q, scale = Int8LayerKVCache.quantize(x)
    assert q.dtype == torch.int8 and scale.shape == (2, 3, 5, 1)
    torch.testing.assert_close(scale, x.abs().amax(-1, keepdim=True) / 127)
    assert (q.abs().amax(-1)[scale[..., 0] > 0] == 127).all()  # every scale is used to the full range
    assert ((q.float() * scale - x).abs() <= scale / 2 + 1e-7).all()  # round to nearest
    assert (q[0, 0, 0] == 0).all()


def test_int8_cache_logits_are_close_and_the_cache_is_smaller():
    model = make()
    x = tokens(3, 40)  # past BLOCK: the exact window prefills again, through the int8 cache too
    full, fp_cache = decode(model, x[:, :BLOCK], 5)
    q8, q8_cache = decode(model, x[:, :BLOCK], 5, kv_dtype='int8')
    err = (q8 - full).abs().max().item()
    assert 0 < err < 0.05 * full.abs().max().item()  # lossy, and slightly
    head_dim, layers, heads = 8, 2, 2
    assert cache_bytes(fp_cache) - fp_cache.doc_ids.numel() * 8 == 2 * layers * 3 * heads * BLOCK * head_dim * 4
    assert cache_bytes(q8_cache) - q8_cache.doc_ids.numel() * 8 == 2 * layers * 3 * heads * BLOCK * (head_dim + 4)
    got = inference.greedy_search(model, x[0, :5], 30, BLOCK, kv_dtype='int8')
    assert got.tolist() == inference.greedy_search(model, x[0, :5], 30, BLOCK).tolist()  # greedy unchanged here


# ---------------------------------------------------------------------------------------- sinks + window

@pytest.mark.parametrize('position', ['rope', 'alibi'])
def test_sinks_and_window_equal_a_forward_over_the_kept_tokens(position):
    # one layer: a cached key depends on its token alone, so each step is one forward over the sinks and the
    # recent tokens, numbered 0, 1, ... by their place in the cache
    model = make(position=position, n_layers=1)
    sinks, window = 3, 6
    x = tokens(2, 40)
    got, cache = decode(model, x, 5, sink_tokens=sinks, window=window)
    for i in range(5, 40):
        kept = list(range(min(sinks, i - window))) + list(range(max(0, i - window), i + 1))
        expected = model(x[:, kept])[:, -1]
        torch.testing.assert_close(got[:, i], expected, atol=1e-5, rtol=0)
    held = sorted(cache.layers[0].index[0, 0].tolist())
    assert held == [0, 1, 2] + list(range(40 - window, 40)) and cache.budget == sinks + window


def test_sinks_and_window_bound_the_cache_of_every_layer():
    model = make(n_layers=3, registers=2)
    x = tokens(2, 50)
    _, cache = decode(model, x, 9, sink_tokens=2, window=5)
    for layer in cache.layers:
        for row in range(2):
            for head in range(2):
                assert sorted(layer.index[row, head].tolist()) == [0, 1] + list(range(45, 50))
    assert cache_bytes(cache) == cache_bytes(model.init_cache(2, sink_tokens=2, window=5))  # never grows


# -------------------------------------------------------------------------------------------------------- H2O

@torch.no_grad()
def h2o_reference(model, x, prompt_len, sinks, window, budget):
    """One layer, no positions: the layer computed op by op with a Python set of kept tokens per key/value head,
    scores summed over the group's query heads and the steps. Returns the logits (t, v) and the kept sets."""
    block, attn = model.blocks[0], model.blocks[0].attn
    h, g, d = attn.n_heads, attn.n_kv_heads, attn.head_dim
    emb = model.embedding(x[None])[0] * model.embedding_scale  # t c
    q, k, v = attn.qkv(block.norm1(emb)).split((h * d, g * d, g * d), -1)
    q, k, v = q.view(-1, h, d), k.view(-1, g, d), v.view(-1, g, d)
    kept, score = [[] for _ in range(g)], [dict() for _ in range(g)]
    logits = []
    for n in range(prompt_len, len(x) + 1):  # n tokens in: the new ones are prompt (first) or one token
        new = list(range(0, n)) if n == prompt_len else [n - 1]
        outs = torch.zeros(len(new), h, d)
        for kv in range(g):
            candidates = kept[kv] + new
            for j in new:
                score[kv].setdefault(j, 0.0)
            for a, i in enumerate(new):
                visible = [j for j in candidates if j <= i]
                for head in range(kv * h // g, (kv + 1) * h // g):
                    w = torch.softmax(torch.stack([q[i, head] @ k[j, kv] for j in visible]) / math.sqrt(d), 0)
                    outs[a, head] = sum(wj * v[j, kv] for wj, j in zip(w, visible))
                    for wj, j in zip(w, visible):
                        score[kv][j] += float(wj)
            always = [j for j in candidates if j < sinks or j >= n - window]
            others = sorted((j for j in candidates if j not in always), key=lambda j: -score[kv][j])
            kept[kv] = sorted(always + others[:budget - len(always)])
        hidden = emb[new[-1]] + attn.proj(outs[-1].reshape(-1))
        hidden = hidden + block.ffn(block.norm2(hidden))
        logits.append(model.head(model.norm(hidden)))
    return torch.stack(logits), kept


@pytest.mark.parametrize('sinks,window,budget', [(0, 3, 8), (2, 2, 7)], ids=str)
def test_h2o_keeps_the_heavy_hitters_of_a_reference(sinks, window, budget):
    model = make(position='none', n_layers=1)
    x = tokens(1, 30)
    got, cache = decode(model, x, 11, kv_budget=budget, window=window, sink_tokens=sinks)
    expected, kept = h2o_reference(model, x[0], 11, sinks, window, budget)
    torch.testing.assert_close(got[0, 10:], expected, atol=1e-5, rtol=0)
    for head in range(2):
        assert sorted(cache.layers[0].index[0, head].tolist()) == kept[head]


# ------------------------------------------------------------------------------ every strategy and batch

OPTIONS = {'int8': dict(kv_dtype='int8'), 'sinks': dict(sink_tokens=2, window=6), 'h2o': dict(kv_budget=8),
           'h2o-int8-sinks': dict(kv_budget=10, sink_tokens=2, kv_dtype='int8')}


@pytest.mark.parametrize('option', OPTIONS)
def test_options_compose_with_every_strategy_and_batch(option):
    model = make(position='alibi' if option == 'h2o' else 'rope').double()
    options = OPTIONS[option]
    prompts = [tokens(1, 3, seed=3)[0], tokens(1, BLOCK + 4, seed=4)[0], tokens(1, 9, seed=5)[0]]
    n = 3 * BLOCK
    batched = inference.greedy_search(model, prompts, n, BLOCK, **options)
    for p, out in zip(prompts, batched):
        assert out.tolist() == inference.greedy_search(model, p, n, BLOCK, **options).tolist()
    alone = inference.sample(model, prompts[1], n, BLOCK, generator=torch.Generator().manual_seed(1), **options)
    streamed = inference.generate_stream(model, prompts[1], n, BLOCK, generator=torch.Generator().manual_seed(1),
                                         **options)
    assert list(streamed) == alone.tolist()
    sampled = [inference.sample(model, prompts, n, BLOCK, generator=torch.Generator().manual_seed(1), **options)
               for _ in range(2)]
    assert [r.tolist() for r in sampled[0]] == [r.tolist() for r in sampled[1]]  # a cache reused is emptied
    beams = inference.beam_search(model, prompts, 3, 20, BLOCK, **options)
    for p, out in zip(prompts, beams):
        assert out.tolist() == inference.beam_search(model, p, 3, 20, BLOCK, **options).tolist()


@pytest.mark.parametrize('option', ['sinks', 'h2o'])
def test_bounded_caches_never_prefill_again(option):
    model = make()
    calls = []
    model.register_forward_pre_hook(lambda module, args: calls.append(args[0].shape[1]))
    inference.greedy_search(model, tokens(1, 5)[0], 6 * BLOCK, BLOCK, **OPTIONS[option])
    assert calls[0] == 5 and set(calls[1:]) == {1} and len(calls) == 6 * BLOCK  # one token per step, ever
    calls.clear()
    inference.greedy_search(model, tokens(1, 5)[0], 3 * BLOCK, BLOCK)
    assert max(calls[1:]) == BLOCK  # the exact window prefills the block again


def test_compression_errors_name_the_problem():
    model = make()
    for kwargs, match in ((dict(sink_tokens=4), 'needs window'), (dict(kv_budget=4, window=3, sink_tokens=2),
                                                                   'exceed kv_budget=4'),
                          (dict(kv_dtype='int4'), "kv_dtype='int4'"), (dict(window=0), 'window=0')):
        with pytest.raises(ValueError, match=match):
            inference.greedy_search(model, tokens(1, 4)[0], 3, BLOCK, **kwargs)
    with pytest.raises(ValueError, match='relative positions'):
        inference.greedy_search(make(position='learned'), tokens(1, 4)[0], 3, BLOCK, window=4)


# --------------------------------------------------------------------------------------------------------- CLI

@pytest.fixture(scope='module')
def checkpoint(tmp_path_factory):
    tmp = tmp_path_factory.mktemp('infer')
    words = 'to be or not to be that is the question whether tis nobler in the mind to suffer'.split()
    texts = [' '.join(words[(i * 7 + j * 3) % len(words)] for j in range(12)) for i in range(200)]
    tokenizer = TokenizerTrainer().train(texts, 300, tmp / 'tok.model')
    torch.manual_seed(0)
    model = XLabModel(300, 24, d_model=32, n_layers=2, n_heads=4, d_ff=64, dropout=0.0, position='rope')
    path = tmp / 'model.ckpt'
    torch.save({'state_dict': model.state_dict(), 'hyper_parameters': dict(model.hparams),
                'datamodule_hyper_parameters': {'tokenizer_path': tokenizer.path, 'seq_len': 24, 'num_tokens': 300},
                'pytorch-lightning_version': '2.6.6',
                'XLabDataModule': {'tokenizer_hash': tokenizer.content_hash, 'tokenizer_path': tokenizer.path}}, path)
    return path, tokenizer, model.eval()


@pytest.mark.parametrize('flags,options', [(['--kv-dtype', 'int8'], dict(kv_dtype='int8')),
                                           (['--sink-tokens', '2', '--window', '8'], dict(sink_tokens=2, window=8)),
                                           (['--kv-budget', '12'], dict(kv_budget=12))], ids=str)
def test_cli_flags_equal_the_library(checkpoint, capsys, flags, options):
    path, tok, model = checkpoint
    infer_cli.main([str(path), 'to be', '-g', '-l', '60', '--no-stream', *flags])
    out = capsys.readouterr().out
    ids = [tok[tok.sos_token]] + tok.encode('to be')
    new = inference.greedy_search(model, torch.tensor(ids), 60, 24, eos_class=tok[tok.eos_token],
                                  exclude_classes=[tok[tok.sos_token], tok[tok.pad_token]], **options)
    assert out == infer_cli.escape_control(tok.decode(ids + new.tolist())) + '\n'
    with pytest.raises(SystemExit) as exit:
        infer_cli.main([str(path), 'to be', '--sink-tokens', '2'])
    assert exit.value.code == 1 and 'needs window' in capsys.readouterr().err


def test_score_is_generation_fed_the_text():
    model = make().double()
    x = tokens(2, 3 * BLOCK)
    nll = inference.score(model, x, BLOCK)
    assert nll.shape == (2, 3 * BLOCK - 1)
    with torch.no_grad():
        for i in (1, BLOCK, 2 * BLOCK + 5):  # the window slides exactly: the last BLOCK tokens, at 0, 1, ...
            logits = model(x[:, max(0, i - BLOCK):i])[:, -1]
            expected = -torch.log_softmax(logits, -1).gather(1, x[:, i:i + 1])[:, 0]
            torch.testing.assert_close(nll[:, i - 1], expected.float(), atol=1e-5, rtol=0)
    sinks = inference.score(model, x, BLOCK, sink_tokens=2, window=6)
    logits, _ = decode(model, x[:, :-1], 1, sink_tokens=2, window=6)
    expected = -torch.log_softmax(logits, -1).gather(2, x[:, 1:, None])[..., 0]
    torch.testing.assert_close(sinks, expected.float(), atol=1e-5, rtol=0)
    assert (sinks - nll).abs().max() > 1e-3
