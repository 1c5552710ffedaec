"""Inference: the KV-cached strategies against plain recompute references, token for token and logit for logit."""
import functools
import itertools
import math

import pytest
import torch
from torch import nn
from torch._dynamo.testing import CompileCounter

from xlabml import inference
from xlabml.layers import Decoder

V, BLOCK = 40, 16


def make_model(seed=0, n_vocab=V, **kwargs):
    torch.manual_seed(seed)
    kwargs = {"d_model": 32, "n_layers": 2, "n_heads": 4, "d_ff": 64, "dropout": 0.1, **kwargs}
    # float64: the cached and the recomputed logits then agree far below any gap between two candidates (to
    # 1e-6 where rotary angles are computed in float32 at positions that differ: a rolling cache's keep counting)
    model = Decoder(n_vocab, BLOCK, **kwargs).double()
    with torch.no_grad():  # sharper than at initialisation: what a token sees changes which token comes next
        for block in model.blocks:
            block.attn.qkv.weight.mul_(4.0)
        model.head.weight.mul_(10.0)
    return model


def prompt(n, seed=1, n_vocab=V):
    return torch.randint(0, n_vocab, (n,), generator=torch.Generator().manual_seed(seed))


def window_starts(prompt_len, total, block_size, keep=None):
    """The first token of the window the model sees when choosing token i, for i = prompt_len .. total - 1:
    the last `block_size` tokens (keep=None: nanoGPT's crop), or the window rule of `context_keep`."""
    starts, start = [], max(0, prompt_len - block_size)
    for n in range(prompt_len, total):  # n tokens so far
        if keep is None:
            start = max(0, n - block_size)
        elif n - start > block_size:
            start = n - keep
        starts.append(start)
    return starts


@torch.no_grad()
def reference_logits(model, seq, prompt_len, block_size, keep=None):
    """No cache: the logits (steps, v) for tokens prompt_len .. len(seq) - 1 of `seq`, each from a forward over
    its window alone, at positions 0, 1, ..."""
    model.eval()
    seq = torch.as_tensor(seq)
    return torch.stack([model(seq[None, start:n])[0, -1] for n, start in
                        zip(range(prompt_len, len(seq) + 1), window_starts(prompt_len, len(seq) + 1, block_size,
                                                                            keep))])


@torch.no_grad()
def reference_greedy(model, x, n, block_size, keep=None, eos=None, generator=None):
    """No cache: recompute the whole window for every token (the window rule of xlabml.inference); with a
    generator, sample instead (softmax, then the same inverse-CDF draw as xlabml.inference)."""
    seq, out = x.tolist(), []
    while len(out) < n:
        start = window_starts(len(x), len(seq) + 1, block_size, keep)[-1]
        logits = model.eval()(torch.tensor([seq[start:]]))[0, -1:].float()
        if generator is None:
            token = int(logits.argmax())
        else:
            token = int(inference._draw(torch.softmax(logits, -1), generator))
        if token == eos:
            break
        out.append(token)
        seq.append(token)
    return out


@torch.no_grad()
def reference_beam(model, x, width, n, eos=None, length_penalty=0.0, block_size=None):
    """Brute force, no cache: rank every continuation of every beam; of the best `width`, those ending in <eos>
    finish (score / length ** lp); the best `width` others stay open. Each beam's window is its last
    `block_size` tokens."""
    model.eval()
    beams, best = [((), 0.0)], (-math.inf, ())
    for t in range(n):
        candidates = []
        for tokens, score in beams:
            seq = torch.cat([x, torch.tensor(tokens, dtype=torch.long)])[-(block_size or len(x) + n):]
            logp = torch.log_softmax(model(seq[None])[0, -1], -1)
            candidates += [(score + float(logp[v]), tokens + (v,)) for v in range(len(logp))]
        candidates.sort(key=lambda c: -c[0])
        for score, tokens in candidates[:width]:
            if tokens[-1] == eos and score / (t + 1) ** length_penalty > best[0]:
                best = (score / (t + 1) ** length_penalty, tokens[:-1])
        beams = [c[::-1] for c in candidates if c[1][-1] != eos][:width]
    for tokens, score in beams:
        if score / n ** length_penalty > best[0]:
            best = (score / n ** length_penalty, tokens)
    return list(best[1])


MODELS = {
    "sinusoidal": {},
    "learned": {"position": "learned"},
    "rope-gqa": {"position": "rope", "n_kv_heads": 2},
    "alibi-mqa": {"position": "alibi", "n_kv_heads": 1},
    "none-rmsnorm-swiglu": {"position": "none", "norm": "rmsnorm", "ffn": "swiglu"},
    "rope-sliding-window": {"position": "rope", "sliding_window": 5},
    "alibi-sliding-window": {"position": "alibi", "sliding_window": 6, "n_kv_heads": 2},
    "learned-sliding-window": {"position": "learned", "sliding_window": 5},
    # the training-recipe variants (issue 15): token mixers with their own cache state, projections, a cap
    "rope-moe": {"position": "rope", "ffn": "moe", "n_experts": 4, "moe_top_k": 2},
    "rope-sgu": {"position": "rope", "ffn": "sgu"},
    "rope-sgu-sliding-window": {"position": "rope", "ffn": "sgu", "sliding_window": 5},
    "learned-head-qk": {"position": "learned", "head_qk": 8},
    "rope-head-qk-sliding-window": {"position": "rope", "head_qk": 8, "sliding_window": 5},
    "rope-d-embedding-softcap": {"position": "rope", "d_embedding": 16, "logit_softcap": 4.0},
}


@pytest.mark.parametrize("variant", MODELS)
def test_greedy_equals_recompute_reference_past_block_size(variant):
    model = make_model(**MODELS[variant])
    x = prompt(5)
    expected = reference_greedy(model, x, 40, BLOCK)  # the window slides at every token from the 17th on
    got = inference.greedy_search(model.train(), x, 40, BLOCK)  # dropout 0.1: inference must switch it off
    assert got.dtype == torch.long and got.dim() == 1
    assert got.tolist() == expected
    assert model.training  # the caller's mode is restored
    # sampling visits more of the vocabulary than greedy's loops, so its tokens tell windows apart
    expected = reference_greedy(model, x, 40, BLOCK, generator=torch.Generator().manual_seed(0))
    got = inference.sample(model, x, 40, BLOCK, generator=torch.Generator().manual_seed(0))
    assert got.tolist() == expected
    if not variant.startswith("rope-") or "sliding-window" not in variant:  # (a 5-token rotary window hides
        # most of the difference from its tokens)
        assert reference_greedy(model, x, 40, BLOCK, keep=BLOCK // 2, generator=torch.Generator().manual_seed(0)
                                ) != expected  # nanoGPT's crop and the old half-window restart sample differently


def cached_logits(model, prompts, continuations, block_size, keep=None, static=False, rolling=False,
                  rolled=None, compile=False):
    """The logits (b, steps + 1, v) xlabml.inference computes for each row while it is fed `continuations` (b,
    steps) after its prompt (teacher forcing: the same window bookkeeping as generation, no token choice).
    `rolled`, when given, is whether the cache must roll (else re-prefill) past block_size."""
    device = prompts[0].device
    with inference._eval_mode(model, pack=not compile), inference._borrowed_cache(
            model, len(prompts), block_size, device, static or bool(compile)) as cache:
        rows = inference._Rows(model, prompts, block_size, keep, continuations.shape[1], cache, compile, rolling)
        if rolled is not None:
            assert rows.rolling == rolled
        out = [rows.prefill()]
        for i in range(continuations.shape[1]):
            out.append(rows.step(continuations[:, i]))
    return torch.stack(out, dim=1)


# relative positions and a window whose reach through the layers fits in BLOCK: the cache rolls, exactly
ROLLS_EXACTLY = {"rope-sliding-window", "alibi-sliding-window", "rope-sgu-sliding-window",
                 "rope-head-qk-sliding-window"}


@pytest.mark.parametrize("static", [False, True], ids=["dynamic", "static"])
@pytest.mark.parametrize("variant", MODELS)
def test_logits_equal_recompute_reference_batched_left_padded(variant, static):
    model = make_model(**MODELS[variant])
    prompts = [prompt(3, seed=3), prompt(BLOCK, seed=4), prompt(BLOCK + 6, seed=5), prompt(1, seed=6)]
    continuations = torch.randint(0, V, (4, 30), generator=torch.Generator().manual_seed(7))
    got = cached_logits(model, prompts, continuations, BLOCK, static=static, rolled=variant in ROLLS_EXACTLY)
    assert got.dtype == torch.float64  # never below float32; a float64 model keeps its precision
    for row, p in enumerate(prompts):
        seq = torch.cat([p, continuations[row]])
        expected = reference_logits(model, seq, len(p), BLOCK)
        torch.testing.assert_close(got[row].double(), expected, atol=1e-6, rtol=0)
        if row == 0:  # a window cut anywhere else gives other logits: the comparison can tell
            wrong = reference_logits(model, seq, len(p), BLOCK, keep=BLOCK // 2)
            assert (wrong - expected).abs().max() > 1e-3


@pytest.mark.parametrize("variant", ["learned", "rope-gqa", "alibi-sliding-window"])
@pytest.mark.parametrize("keep", [1, 5, BLOCK])
def test_context_keep_restarts_the_window(variant, keep):
    # given, context_keep applies to absolute and relative positions alike
    model = make_model(**MODELS[variant])
    prompts = [prompt(3), prompt(BLOCK, seed=2), prompt(BLOCK + 7, seed=3)]  # short, exactly full, longer
    for x in prompts:
        expected = reference_greedy(model, x, 25, BLOCK, keep=keep)
        assert inference.greedy_search(model, x, 25, BLOCK, context_keep=keep).tolist() == expected
    continuations = torch.randint(0, V, (3, 24), generator=torch.Generator().manual_seed(8))
    got = cached_logits(model, prompts, continuations, BLOCK, keep=keep)
    for row, p in enumerate(prompts):
        expected = reference_logits(model, torch.cat([p, continuations[row]]), len(p), BLOCK, keep=keep)
        torch.testing.assert_close(got[row], expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize("variant", ["learned", "rope-gqa"])
def test_batched_equals_per_prompt_and_stops_at_own_eos(variant):
    model = make_model(**MODELS[variant])
    prompts = [prompt(3, seed=3), prompt(9, seed=4), prompt(BLOCK + 4, seed=5), prompt(1, seed=6)]
    alone = [reference_greedy(model, p, 30, BLOCK) for p in prompts]
    assert [o.tolist() for o in inference.greedy_search(model, prompts, 30, BLOCK)] == alone
    eos = alone[0][4]  # a token that ends row 0 after four tokens; other rows end at their own first one
    cut = [o[:o.index(eos)] if eos in o else o for o in alone]
    assert len(cut[0]) == 4
    got = inference.greedy_search(model, prompts, 30, BLOCK, eos_class=eos)
    assert isinstance(got, list) and [o.tolist() for o in got] == cut
    # a 2-D batch gives a list too
    square = torch.stack([prompt(6, seed=s) for s in (7, 8)])
    assert [o.tolist() for o in inference.greedy_search(model, square, 12, BLOCK)] == [
        reference_greedy(model, row, 12, BLOCK) for row in square]


def test_eos_stops_and_is_not_returned():
    model = make_model()
    x = prompt(4)
    full = reference_greedy(model, x, 20, BLOCK)
    eos = full[6]
    assert inference.greedy_search(model, x, 20, BLOCK, eos_class=eos).tolist() == full[:full.index(eos)]
    assert inference.greedy_search(model, x, 0, BLOCK).tolist() == []


@pytest.mark.parametrize("variant", ["sinusoidal", "rope-gqa", "alibi-mqa", "rope-sgu", "learned-head-qk"])
@pytest.mark.parametrize("length_penalty", [0.0, 1.0, -0.5])
def test_beam_search_equals_brute_force(variant, length_penalty):
    model = make_model(n_vocab=6, seed=3, **MODELS[variant])
    for seed in range(3):
        x = prompt(3, seed=seed, n_vocab=6)
        expected = reference_beam(model, x, 3, 6, eos=2, length_penalty=length_penalty)
        got = inference.beam_search(model, x, 3, 6, BLOCK, eos_class=2, length_penalty=length_penalty)
        assert got.tolist() == expected


def test_beam_search_wide_enough_is_exhaustive():
    model = make_model(n_vocab=4, seed=5, position="rope")
    x = prompt(2, n_vocab=4)
    with torch.no_grad():
        def logprob(seq):
            logp = torch.log_softmax(model.eval()(torch.cat([x, torch.tensor(seq)])[None])[0], -1)
            return sum(float(logp[len(x) - 1 + i, s]) for i, s in enumerate(seq))
        best = max(itertools.product(range(4), repeat=3), key=logprob)
    # width 4**2 keeps every prefix, so the search sees all 64 sequences
    assert inference.beam_search(model, x, 16, 3, BLOCK).tolist() == list(best)


@pytest.mark.parametrize("variant", ["sinusoidal", "rope-gqa", "rope-sliding-window", "rope-sgu-sliding-window",
                                     "rope-head-qk-sliding-window"])
def test_beam_search_past_block_size_equals_brute_force(variant):
    model = make_model(n_vocab=6, seed=4, **MODELS[variant])
    differs = []
    for seed in range(3):
        x = prompt(BLOCK - 2, seed=seed, n_vocab=6)  # the window slides from the third new token on
        for eos in (None, 2):
            expected = reference_beam(model, x, 3, 7, eos=eos, block_size=BLOCK)
            assert inference.beam_search(model, x, 3, 7, BLOCK, eos_class=eos).tolist() == expected
            differs.append(expected != reference_beam(model, x, 3, 7, eos=eos))
    # without the crop the search goes elsewhere (the windowed model never sees that far back anyway)
    assert any(differs) == ("sliding-window" not in variant)


def test_beam_search_batched_width_one_and_sliding():
    model = make_model(n_vocab=12, seed=4, position="rope", n_kv_heads=2)
    prompts = [prompt(2, seed=1, n_vocab=12), prompt(6, seed=2, n_vocab=12), prompt(BLOCK + 3, seed=3, n_vocab=12)]
    alone = [inference.beam_search(model, p, 3, 8, BLOCK, eos_class=1).tolist() for p in prompts]
    assert [b.tolist() for b in inference.beam_search(model, prompts, 3, 8, BLOCK, eos_class=1)] == alone
    assert alone[0] == reference_beam(model, prompts[0], 3, 8, eos=1)
    for p in prompts:  # width 1 is greedy, also past the block size
        assert inference.beam_search(model, p, 1, 30, BLOCK, eos_class=1).tolist() == reference_greedy(
            model, p, 30, BLOCK, eos=1)


def test_sampling_seeded_reproducible_and_greedy_limits():
    model = make_model(position="rope")
    x = prompt(4)

    def draw(seed, **kw):
        return inference.sample(model, x, 30, BLOCK, generator=torch.Generator().manual_seed(seed), **kw).tolist()

    assert draw(0) == draw(0)
    assert draw(0, top_k=5, top_p=0.9, min_p=0.05, repetition_penalty=1.2, temperature=0.8) == draw(
        0, top_k=5, top_p=0.9, min_p=0.05, repetition_penalty=1.2, temperature=0.8)
    assert draw(0) != draw(1)
    greedy = reference_greedy(model, x, 30, BLOCK)
    assert draw(0, top_k=1) == greedy
    assert draw(0, temperature=0) == greedy
    # the streaming form gives the same ids as the whole call
    stream = inference.generate_stream(model, x, 30, BLOCK, generator=torch.Generator().manual_seed(0), top_k=5)
    assert list(stream) == draw(0, top_k=5)
    assert list(inference.generate_stream(model, x, 30, BLOCK, eos_class=greedy[3], temperature=0)) == greedy[:3]


class FixedLogits(nn.Module):
    """A model whose next-token distribution is fixed (implements the forward + init_cache contract)."""

    class Cache:
        def __init__(self, batch_size, max_len):
            self.batch_size, self.max_len = batch_size, max_len

        def reorder(self, index):
            self.batch_size = len(index)

        def reset(self):
            pass

    def __init__(self, probs):
        super().__init__()
        self.logits = nn.Parameter(torch.tensor(probs).log())

    def init_cache(self, batch_size, max_len=None, device=None, dtype=None):
        return self.Cache(batch_size, max_len)

    def forward(self, x, positions=None, doc_ids=None, cache=None, input_pos=None):
        return self.logits.expand(*x.shape, -1)


PROBS = [0.4, 0.25, 0.15, 0.1, 0.05, 0.03, 0.02]


@pytest.mark.parametrize("kwargs, allowed", [
    ({}, set(range(7))),
    ({"top_k": 3}, {0, 1, 2}),
    ({"top_p": 0.7}, {0, 1, 2}),  # 0.4 + 0.25 < 0.7 <= 0.4 + 0.25 + 0.15
    ({"min_p": 0.3}, {0, 1, 2}),  # p >= 0.3 * 0.4
    ({"top_k": 4, "exclude_classes": [0, 2]}, {1, 3, 4, 5}),  # exclusion first, then the top 4
    ({"top_p": 0.5, "exclude_classes": [0]}, {1, 2}),  # renormalised: 0.42, 0.25, 0.17, ...
    ({"min_p": 0.45, "exclude_classes": [1], "temperature": 2.0}, {0, 2, 3}),  # p ** 0.5 >= 0.45 * 0.4 ** 0.5
])
def test_sampling_filters_never_emit_excluded_classes(kwargs, allowed):
    model = FixedLogits(PROBS)
    prompts = torch.zeros(64, 1, dtype=torch.long)
    out = torch.stack(inference.sample(model, prompts, 40, 8, generator=torch.Generator().manual_seed(0), **kwargs))
    assert set(out.unique().tolist()) == allowed  # never outside, and every allowed class appears
    if not kwargs:  # plain sampling follows the distribution
        assert abs((out == 0).float().mean().item() - 0.4) < 0.03


@pytest.mark.parametrize("peaked", [True, False])
def test_top_p_on_a_large_vocabulary(peaked):
    # a large vocabulary takes the CPU shortcut (top few hundred first) when the nucleus is inside them, and the
    # full sort when it is not; both keep exactly the nucleus
    n = 5000
    probs = torch.full((n,), 1.0)
    if peaked:
        probs[:10] = torch.arange(10, 0, -1) * 1000.0  # 10 classes hold 55000 / 59990 of the mass
    probs = (probs / probs.sum()).tolist()
    model = FixedLogits(probs)
    out = torch.stack(inference.sample(model, torch.zeros(64, 1, dtype=torch.long), 30, 8, top_p=0.6,
                                       generator=torch.Generator().manual_seed(0)))
    nucleus = set(range(5))  # mass before class 4: 0.567 < 0.6, before class 5: 0.667
    if peaked:
        assert set(out.unique().tolist()) == nucleus
    else:  # flat: 60% of the classes (not just the probed few hundred); which of the equals is up to the sort
        assert len(set(out.unique().tolist())) > 1000


def test_repetition_penalty_and_exclusion_in_greedy():
    model = FixedLogits(PROBS)
    x = torch.tensor([5])
    # a huge penalty on seen classes: greedy walks down the distribution, skipping the prompt's class
    assert inference.sample(model, x, 6, 8, temperature=0, repetition_penalty=1e6).tolist() == [0, 1, 2, 3, 4, 6]
    assert inference.greedy_search(model, x, 3, 8, exclude_classes=[0, 1]).tolist() == [2, 2, 2]
    assert inference.beam_search(model, x, 2, 3, 8, exclude_classes=[0]).tolist() == [1, 1, 1]


@pytest.mark.parametrize("call, message", [
    (lambda m, x: inference.greedy_search(m, x, -1, BLOCK), "output_length"),
    (lambda m, x: inference.greedy_search(m, x, 5, 0), "block_size"),
    (lambda m, x: inference.greedy_search(m, x[:0], 5, BLOCK), "empty"),
    (lambda m, x: inference.greedy_search(m, x[None, None], 5, BLOCK), "shape"),
    (lambda m, x: inference.sample(m, x, 5, BLOCK, top_p=0.0), "top_p"),
    (lambda m, x: inference.sample(m, x, 5, BLOCK, temperature=-1), "temperature"),
    (lambda m, x: inference.sample(m, x, 5, BLOCK, exclude_classes=range(V)), "exclude_classes"),
    (lambda m, x: inference.sample(m, x, 5, BLOCK, exclude_classes=[V]), "exclude_classes"),
    (lambda m, x: inference.beam_search(m, x, 0, 5, BLOCK), "beam_width"),
    (lambda m, x: inference.greedy_search(m, x, 5, BLOCK, context_keep=BLOCK + 1), "context_keep"),
])
def test_bad_arguments_raise_value_error(call, message):
    with pytest.raises(ValueError, match=message):
        call(make_model(), prompt(3))


def test_rolling_and_context_keep_exclude_each_other_and_absolute_positions_cannot_roll():
    with pytest.raises(ValueError, match="exclude each other"):
        inference.greedy_search(make_model(position="rope"), prompt(3), 5, BLOCK, context_keep=4, rolling=True)
    with pytest.raises(ValueError, match="absolute"):
        inference.greedy_search(make_model(), prompt(3), 5, BLOCK, rolling=True)


@pytest.mark.parametrize("variant", ["rope-gqa", "alibi-mqa", "none-rmsnorm-swiglu", "rope-sliding-window"])
def test_rolling_cache_is_the_model_with_a_block_size_window(variant):
    # rolling=True: every layer attends to the last BLOCK tokens, i.e. the model with sliding_window=BLOCK run
    # over the whole text (after the prompt's crop); with a window that reaches past BLOCK that is not the crop
    model = make_model(**MODELS[variant])
    twin = make_model(**{**MODELS[variant], "sliding_window": min(MODELS[variant].get("sliding_window", BLOCK),
                                                                  BLOCK)})
    prompts = [prompt(3, seed=3), prompt(BLOCK + 6, seed=5)]
    continuations = torch.randint(0, V, (2, 30), generator=torch.Generator().manual_seed(7))
    got = cached_logits(model, prompts, continuations, BLOCK, rolling=True, rolled=True)
    for row, p in enumerate(prompts):
        seq = torch.cat([p[-BLOCK:], continuations[row]])
        with torch.no_grad():
            expected = twin.eval()(seq[None])[0, len(p[-BLOCK:]) - 1:]
        torch.testing.assert_close(got[row], expected, atol=1e-6, rtol=0)
        crop = reference_logits(model, torch.cat([p, continuations[row]]), len(p), BLOCK)
        if variant not in ROLLS_EXACTLY:
            assert (crop - expected).abs().max() > 1e-3
    x = prompt(5)
    with torch.no_grad():
        seq = x.tolist()
        for _ in range(40):  # greedy over the windowed twin, uncached
            seq.append(int(twin(torch.tensor([seq]))[0, -1].argmax()))
    assert inference.greedy_search(model, x, 40, BLOCK, rolling=True).tolist() == seq[5:]
    assert list(inference.generate_stream(model, x, 40, BLOCK, temperature=0, rolling=True)) == seq[5:]


def test_cache_past_max_len_rolls_only_one_token_at_a_time_and_only_for_relative_positions():
    rope, learned = make_model(position="rope"), make_model(position="learned")
    x = prompt(BLOCK + 1)
    for model in (rope, learned):
        cache = model.init_cache(1)
        model(x[None, :BLOCK], cache=cache, input_pos=torch.arange(BLOCK))
        if model is learned:
            with pytest.raises(ValueError, match="absolute positions"):
                model(x[None, BLOCK:], cache=cache, input_pos=torch.tensor([BLOCK]))
    with pytest.raises(ValueError, match="one token at a time"):
        rope(x[None, :2], cache=rope.init_cache(1), input_pos=torch.arange(BLOCK - 1, BLOCK + 1))


def test_cache_allocated_once_reused_and_kept_out_of_the_model(monkeypatch):
    model = make_model(position="rope", n_kv_heads=2)
    keys, buffers = list(model.state_dict()), [b.data_ptr() for b in model.buffers()]
    made = []
    init_cache = model.init_cache
    monkeypatch.setattr(model, "init_cache", lambda *a, **k: made.append(a) or init_cache(*a, **k))
    for n, limit in ((BLOCK + 4, 12), (3, 5), (9, 30), (1, 40)):  # a long window first: no stale keys leak
        x = prompt(n, seed=n)
        assert inference.greedy_search(model, x, limit, BLOCK).tolist() == reference_greedy(model, x, limit, BLOCK)
    assert len(made) == 1
    prompts = [prompt(4, seed=1), prompt(BLOCK + 2, seed=2)]
    for _ in range(2):
        assert [o.tolist() for o in inference.greedy_search(model, prompts, 20, BLOCK)] == [
            reference_greedy(model, p, 20, BLOCK) for p in prompts]
    assert len(made) == 2  # one more for batch size 2
    for _ in range(2):  # beams: the prompt's batch (cached already) and its 3 beams'
        inference.beam_search(model, prompt(4), 3, 20, BLOCK)
    assert len(made) == 3 and [a[0] for a in made] == [1, 2, 3]
    assert list(model.state_dict()) == keys and [b.data_ptr() for b in model.buffers()] == buffers
    inference.release_caches(model)
    inference.greedy_search(model, prompt(3), 5, BLOCK)
    assert len(made) == 4


def test_interleaved_streams_do_not_share_a_cache():
    model = make_model(position="rope")
    x1, x2 = prompt(3, seed=1), prompt(7, seed=2)
    first = inference.generate_stream(model, x1, 30, BLOCK, temperature=0)
    second = inference.generate_stream(model, x2, 30, BLOCK, temperature=0)
    got1, got2 = [], []
    for a, b in zip(first, second):
        got1.append(a)
        got2.append(b)
    assert got1 == reference_greedy(model, x1, 30, BLOCK) and got2 == reference_greedy(model, x2, 30, BLOCK)


@pytest.mark.parametrize("position", ["rope", "alibi", "learned", "none", "sinusoidal"])
def test_bfloat16_model_logits_follow_float32_and_stay_float32(position, monkeypatch):
    from xlabml import packed
    monkeypatch.setattr(packed, "MIN_PACKED_NUMEL", 0)  # the test model's matrices are small: pack them anyway
    model = make_model(position=position).float()
    half = make_model(position=position).to(torch.bfloat16)
    prompts = [prompt(3, seed=3), prompt(BLOCK + 6, seed=5)]
    continuations = torch.randint(0, V, (2, 30), generator=torch.Generator().manual_seed(7))
    swapped = []
    forward = packed.PackedLinear.forward
    monkeypatch.setattr(packed.PackedLinear, "forward", lambda self, x: swapped.append(x.dtype) or forward(self, x))
    got = cached_logits(half, prompts, continuations, BLOCK)
    assert got.dtype == torch.float32  # chosen from in float32
    assert swapped and set(swapped) == {torch.bfloat16}  # the packed bfloat16 matmuls ran
    reference = cached_logits(model, prompts, continuations, BLOCK)
    scale = reference.abs().max()
    assert (got - reference).abs().max() <= 0.05 * scale
    assert (got.argmax(-1) == reference.argmax(-1)).float().mean() >= 0.9
    cache_dtypes = {e.cache.layers[0].k.dtype for e in inference._caches[half].values()}
    assert cache_dtypes == {torch.bfloat16}  # the KV cache in the model's dtype
    out = inference.sample(half, prompts, 20, BLOCK, generator=torch.Generator().manual_seed(0))
    assert [len(o) for o in out] == [20, 20]
    assert len(inference.beam_search(half, prompt(3), 2, 20, BLOCK)) == 20


def test_compiled_decode_step_compiles_once_for_any_prompt_and_limit(monkeypatch):
    # dynamo's capture of the static-shape decode step, counted, without inductor's C++ compilation
    counter = CompileCounter()
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend=counter))
    for variant in ("rope-gqa", "learned", "rope-sliding-window"):  # rolls past BLOCK / re-prefills / rolls
        model = make_model(**MODELS[variant])
        before = counter.frame_count
        for n, limit in ((3, 5), (9, 30), (BLOCK + 4, 12), (1, 40), (12, 3)):
            x = prompt(n, seed=n)
            expected = reference_greedy(model, x, limit, BLOCK)
            assert inference.greedy_search(model, x, limit, BLOCK, compile=True).tolist() == expected
        assert counter.frame_count - before == 1
        # sampling and streaming reuse it; another batch size is one more graph, padded or not
        x = prompt(6)
        assert inference.sample(model, x, 25, BLOCK, generator=torch.Generator().manual_seed(0), compile=True
                                ).tolist() == reference_greedy(model, x, 25, BLOCK,
                                                               generator=torch.Generator().manual_seed(0))
        assert list(inference.generate_stream(model, x, 25, BLOCK, temperature=0, compile=True)) == (
            reference_greedy(model, x, 25, BLOCK))
        for batch in ([prompt(4, seed=1), prompt(4, seed=2)], [prompt(3, seed=3), prompt(BLOCK + 2, seed=4)]):
            expected = [reference_greedy(model, p, 20, BLOCK) for p in batch]
            assert [o.tolist() for o in inference.greedy_search(model, batch, 20, BLOCK, compile=True)] == expected
        assert counter.frame_count - before == 2


@pytest.mark.slow
def test_inductor_compiled_decode_equals_eager_and_follows_weight_updates():
    # the real CPU path: inductor with frozen weights, which packs float32 matrices into copies; prompts and
    # lengths that keep the windows below BLOCK, where every step is a decode step
    model = make_model(position="rope", n_kv_heads=2).float()
    prompts = [prompt(4), prompt(2, seed=2)]
    continuations = torch.randint(0, V, (2, 10), generator=torch.Generator().manual_seed(7))
    for _ in range(2):
        eager = cached_logits(model, prompts, continuations, BLOCK)
        compiled = cached_logits(model, prompts, continuations, BLOCK, compile=True)
        torch.testing.assert_close(compiled, eager, atol=1e-4, rtol=1e-4)
        expected = inference.greedy_search(model, prompts, 12, BLOCK)
        got = inference.greedy_search(model, prompts, 12, BLOCK, compile=True)
        assert [o.tolist() for o in got] == [o.tolist() for o in expected]
        with torch.no_grad():  # an in-place update must not leave the frozen copies stale
            model.head.weight.mul_(-1.0)
            for block in model.blocks:
                block.ffn.fc.weight.mul_(0.5)
