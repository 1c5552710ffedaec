"""Inference: the KV-cached strategies against plain recompute references, token for token."""
import functools
import itertools
import math

import pytest
import torch
from torch import nn

from xlabml import inference
from xlabml.layers import Decoder

V, BLOCK = 40, 16


@pytest.fixture(autouse=True)
def one_thread():
    # tiny models: a second thread only adds synchronisation (and contention on a shared machine)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_model(seed=0, n_vocab=V, **kwargs):
    torch.manual_seed(seed)
    kwargs = {"d_model": 32, "n_layers": 2, "n_heads": 4, "d_ff": 64, "dropout": 0.1, **kwargs}
    # float64: the cached and the recomputed logits then agree far below any gap between two candidates
    return Decoder(n_vocab, BLOCK, **kwargs).double()


def prompt(n, seed=1, n_vocab=V):
    return torch.randint(0, n_vocab, (n,), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def reference_greedy(model, x, n, block_size, keep=None, eos=None):
    """No cache: recompute the whole window for every token (the window rule of xlabml.inference)."""
    keep, seq, out = block_size // 2 if keep is None else keep, x.tolist(), []
    start = max(0, len(seq) - block_size)
    while len(out) < n:
        if len(seq) - start > block_size:
            start = len(seq) - keep
        token = int(model.eval()(torch.tensor([seq[start:]]))[0, -1].argmax())
        if token == eos:
            break
        out.append(token)
        seq.append(token)
    return out


@torch.no_grad()
def reference_beam(model, x, width, n, eos=None, length_penalty=0.0):
    """Brute force, no cache: rank every continuation of every beam; of the best `width`, those ending in <eos>
    finish (score / length ** lp); the best `width` others stay open."""
    model.eval()
    beams, best = [((), 0.0)], (-math.inf, ())
    for t in range(n):
        candidates = []
        for tokens, score in beams:
            logp = torch.log_softmax(model(torch.cat([x, torch.tensor(tokens, dtype=torch.long)])[None])[0, -1], -1)
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
}


@pytest.mark.parametrize("variant", MODELS)
def test_greedy_equals_recompute_reference_past_block_size(variant):
    model = make_model(**MODELS[variant])
    x = prompt(5)
    expected = reference_greedy(model, x, 40, BLOCK)  # slides twice: at tokens 16 and 24 of the sequence
    got = inference.greedy_search(model.train(), x, 40, BLOCK)  # dropout 0.1: inference must switch it off
    assert got.dtype == torch.long and got.dim() == 1
    assert got.tolist() == expected
    assert model.training  # the caller's mode is restored


@pytest.mark.parametrize("keep", [1, 5, BLOCK])
def test_sliding_window_keep_and_long_prompt(keep):
    model = make_model(position="rope", n_kv_heads=2)
    for x in (prompt(3), prompt(BLOCK), prompt(BLOCK + 7, seed=2)):  # short, exactly full, longer than block
        expected = reference_greedy(model, x, 25, BLOCK, keep=keep)
        assert inference.greedy_search(model, x, 25, BLOCK, context_keep=keep).tolist() == expected


def test_batched_equals_per_prompt_and_stops_at_own_eos():
    model = make_model(position="rope", n_kv_heads=2)
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


@pytest.mark.parametrize("variant", ["sinusoidal", "rope-gqa", "alibi-mqa"])
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


def test_beam_search_batched_width_one_and_sliding():
    model = make_model(n_vocab=12, seed=4, position="rope", n_kv_heads=2)
    prompts = [prompt(2, seed=1, n_vocab=12), prompt(6, seed=2, n_vocab=12)]
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


def test_bfloat16_model_generates():
    model = make_model(position="rope").to(torch.bfloat16)
    out = inference.sample(model, [prompt(3), prompt(5)], 20, BLOCK, generator=torch.Generator().manual_seed(0))
    assert [len(o) for o in out] == [20, 20] and all(int(o.max()) < V for o in out)
    assert len(inference.beam_search(model, prompt(3), 2, 20, BLOCK)) == 20


def test_compiled_decode_step_equals_eager(monkeypatch):
    # the dynamo capture of the static-shape decode step, without inductor's minutes of C++ compilation
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="eager"))
    monkeypatch.setattr(inference, "_compiled", {})
    model = make_model(position="rope", n_kv_heads=2)
    for x in (prompt(4), [prompt(3), prompt(9)]):
        expected = inference.greedy_search(model, x, 30, BLOCK)
        got = inference.greedy_search(model, x, 30, BLOCK, compile=True)
        assert str(got) == str(expected)
