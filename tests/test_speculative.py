"""xlabml.speculative: greedy output equal to the target's greedy token for token (under every window rule, past
block_size, with another draft architecture and vocabulary width); the acceptance rule emits exactly the target's
distribution (a fixed-seed chi-square over explicit distributions, and through whole generations of models whose
distributions are set by hand); exact accounting of drafted and accepted tokens; the command line's --draft."""
import pytest
import torch
from torch import nn

from xlabml import inference
from xlabml.layers import Decoder
from xlabml.speculative import (
    SpeculativeStats, accept_drafts, speculative_greedy_search, speculative_sample, speculative_stream,
)

V, BLOCK = 40, 16
# 0.999 quantiles of the chi-square distribution (scipy.stats.chi2.ppf(0.999, df)), for the fixed-seed tests
CHI2_999 = {8: 26.12, 63: 103.44}


def make_model(seed=0, n_vocab=V, **kwargs):
    """A tiny float64 decoder with sharp logits (as tests/test_inference.py's): no near-ties between candidates."""
    torch.manual_seed(seed)
    kwargs = {"d_model": 32, "n_layers": 2, "n_heads": 4, "d_ff": 64, "dropout": 0.0, **kwargs}
    model = Decoder(n_vocab, BLOCK, **kwargs).double()
    with torch.no_grad():
        for block in model.blocks:
            block.attn.qkv.weight.mul_(4.0)
        model.head.weight.mul_(10.0)
    return model


def prompt(n, seed=1):
    return torch.randint(0, V, (n,), generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------------------------------------------
# greedy: the target's output, token for token


@pytest.mark.parametrize("target_arch,window", [
    ({}, {}),  # sinusoidal: past block_size, an exact window re-prefilled per token
    ({}, {"context_keep": 8}),  # windows restart at 8 tokens; rounds go on past block_size
    ({"position": "rope"}, {"rolling": True}),  # the cache rolls past block_size
    ({"position": "rope", "sliding_window": 4}, {}),  # rolling is exact: reach 2 * 3 + 1 <= 16
    ({"position": "learned", "n_kv_heads": 2}, {"context_keep": 12}),
])
@pytest.mark.parametrize("draft_tokens", [1, 3, 6])
def test_greedy_equals_the_target_greedy(target_arch, window, draft_tokens):
    target = make_model(0, **target_arch)
    draft = make_model(5, d_model=16, n_layers=1, n_heads=2, d_ff=32, **target_arch)
    for n_prompt, length in ((1, 12), (4, 30), (20, 9)):  # short, past block_size, a prompt longer than it
        p = prompt(n_prompt, seed=n_prompt)
        expected = inference.greedy_search(target, p, length, BLOCK, **window)
        stats = SpeculativeStats()
        out = speculative_greedy_search(target, draft, p, length, BLOCK, draft_tokens=draft_tokens, stats=stats,
                                        **window)
        assert torch.equal(out, expected), (n_prompt, length)
        # accounting: every token comes from a round (its accepted drafts and one more) or a plain step
        assert stats.tokens == length == stats.accepted + stats.rounds + stats.plain_steps
        assert 0 <= stats.accepted <= stats.drafted <= draft_tokens * stats.rounds


def test_batches_options_and_eos_equal_the_target():
    target, draft = make_model(1), make_model(2, n_layers=1)
    prompts = [prompt(3, 1), prompt(7, 2), prompt(1, 3)]
    options = dict(exclude_classes=[0, 5, 7], repetition_penalty=1.3, eos_class=11, temperature=0.0)
    expected = inference.sample(target, prompts, 25, BLOCK, **options)
    assert all(torch.equal(a, b) for a, b in zip(speculative_sample(target, draft, prompts, 25, BLOCK, **options),
                                                 expected))
    assert any(len(e) < 25 for e in expected)  # <eos> stopped at least one row (the cut is tested)
    streamed = list(speculative_stream(target, draft, prompts[1], 25, BLOCK, **options))
    assert streamed == expected[1].tolist()
    assert speculative_greedy_search(target, draft, prompts[0], 0, BLOCK).shape == (0,)


def test_draft_with_another_vocabulary_width():
    # a model sized by num_tokens may have a few more or fewer classes than another with the same tokenizer
    target = make_model(3)
    for n_vocab in (V - 6, V + 9):
        draft = make_model(4, n_vocab=n_vocab, n_layers=1)
        p = prompt(5)
        assert torch.equal(speculative_greedy_search(target, draft, p, 20, BLOCK),
                           inference.greedy_search(target, p, 20, BLOCK))


def test_a_draft_equal_to_the_target_is_always_accepted():
    model = make_model(6)
    stats = SpeculativeStats()
    speculative_greedy_search(model, model, prompt(3), 12, BLOCK, draft_tokens=4, stats=stats)
    assert stats.accepted == stats.drafted > 0
    stats = SpeculativeStats()  # sampling: p == q, so min(1, p/q) = 1 for every draft
    speculative_sample(model, model, prompt(3), 12, BLOCK, draft_tokens=4, stats=stats, top_k=5,
                       generator=torch.Generator().manual_seed(0))
    assert stats.accepted == stats.drafted > 0 and stats.acceptance_rate == 1.0


def test_bad_arguments():
    target, draft = make_model(0), make_model(1)
    with pytest.raises(ValueError, match="draft_tokens=0; expected an integer >= 1"):
        speculative_greedy_search(target, draft, prompt(3), 5, BLOCK, draft_tokens=0)
    with pytest.raises(ValueError, match="rolling=True needs a target model whose positions are relative"):
        speculative_greedy_search(target, draft, prompt(3), 5, BLOCK, rolling=True)
    with pytest.raises(ValueError, match="speculative_stream takes one prompt"):
        next(speculative_stream(target, draft, prompt(3)[None], 5, BLOCK))


# ---------------------------------------------------------------------------------------------------------------
# sampling: the target's distribution, exactly


def test_acceptance_rule_emits_the_target_distribution():
    # Explicit distributions by absolute position t (p_t for the target, q_t for the draft, unrelated to each
    # other); 100k independent generations of 3 tokens, each by rounds of k = 2 drafts from q and the rule. Every
    # 3-token sequence must then have probability p_0(x0) p_1(x1) p_2(x2): a chi-square test over the 64 sequences
    # at a fixed seed, against the 0.999 quantile. The same statistic of the draft's own sequences fails it.
    generator = torch.Generator().manual_seed(0)
    v, k, n, rows, positions = 4, 2, 3, 100_000, 6
    p = torch.softmax(torch.randn(positions, v, generator=generator) * 1.5, -1).double()
    p[1, 2] = 0.0  # a class the target never emits at position 1
    p[1] /= p[1].sum()
    q = torch.softmax(torch.randn(positions, v, generator=generator) * 1.5, -1).double()
    out = torch.full((rows, n + k + 1), -1)
    at = torch.zeros(rows, dtype=torch.long)  # tokens emitted per row
    while bool((at < n).any()):
        index = (at < n).nonzero()[:, 0]  # the rows still short of n tokens
        t = at[index, None] + torch.arange(k + 1)  # rows k+1: absolute positions of this round
        drafted = torch.multinomial(q[t[:, :k]].view(-1, v), 1, generator=generator).view(-1, k)
        accepted, token = accept_drafts(p[t], q[t[:, :k]], drafted, generator)
        for i in range(k):
            keep = accepted > i
            out[index[keep], at[index[keep]] + i] = drafted[keep, i]
        out[index, at[index] + accepted] = token
        at[index] += accepted + 1
    sequences = out[:, :n]
    expected = torch.ones(1, dtype=torch.float64)
    for i in range(n):  # sequence x0 x1 x2 at index 16 x0 + 4 x1 + x2
        expected = (expected[:, None] * p[i]).flatten()
    expected = expected * rows
    code = (sequences * torch.tensor([v * v, v, 1])).sum(-1)
    observed = torch.bincount(code, minlength=v ** n).double()
    assert int(observed[expected == 0].sum()) == 0  # never a class of probability 0
    seen = expected > 0
    statistic = float(((observed - expected)[seen] ** 2 / expected[seen]).sum())
    assert statistic < CHI2_999[63], statistic
    drafts = torch.multinomial(q[:n].repeat(rows, 1), 1, generator=generator).view(rows, n)
    observed = torch.bincount((drafts * torch.tensor([v * v, v, 1])).sum(-1), minlength=v ** n).double()
    assert float(((observed - expected)[seen] ** 2 / expected[seen]).sum()) > 10 * CHI2_999[63]


class Bigram(nn.Module):
    """A model whose next-token logits are a fixed table row of the last token: a distribution set by hand, with
    the inference interface (it needs no cache)."""

    def __init__(self, logits: torch.Tensor):
        super().__init__()
        self.table = nn.Parameter(logits, requires_grad=False)

    def init_cache(self, batch_size, max_len=None, device=None, dtype=None):
        return None

    def forward(self, x, positions=None, doc_ids=None, cache=None, input_pos=None):
        return self.table[x]  # b t v


def test_whole_generations_follow_the_target_distribution():
    # two tokens after a fixed prompt, sampled with temperature 0.8 and top-k 3 from bigram tables: the pairs'
    # frequencies over 3000 speculative generations against the target's processed chain (chi-square, fixed seed)
    generator = torch.Generator().manual_seed(1)
    v = 4
    target = Bigram(torch.randn(v, v, generator=generator) * 2)
    draft = Bigram(torch.randn(v, v, generator=generator) * 2)
    options = dict(temperature=0.8, top_k=3)
    chooser = inference._Chooser([torch.tensor([0])], v, **options)
    chain = chooser.distribution(target.table.detach().double())  # v v: the processed next-token distribution
    expected = (chain[0][:, None] * chain).flatten() * 3000  # after token 0: x1 ~ chain[0], x2 ~ chain[x1]
    stats = SpeculativeStats()
    outputs = speculative_sample(target, draft, [torch.tensor([0])] * 3000, 2, 8, draft_tokens=2, stats=stats,
                                 generator=torch.Generator().manual_seed(2), **options)
    observed = torch.bincount(torch.stack(outputs) @ torch.tensor([v, 1]), minlength=v * v).double()
    seen = expected > 0
    assert int(observed[~seen].sum()) == 0  # top-k 3 of 4: the excluded class never appears
    assert float(((observed - expected)[seen] ** 2 / expected[seen]).sum()) < CHI2_999[8]
    assert 0 < stats.accepted < stats.drafted  # the rule was exercised both ways


# ---------------------------------------------------------------------------------------------------------------
# the command line


def test_infer_draft_option(tmp_path, capsys):
    from interop_support import make_checkpoint, train_tokenizer

    from xlabml import infer_cli
    from xlabml.checkpoints import load_checkpoint
    from xlabml.tokenizer import TokenizerTrainer

    tokenizer = train_tokenizer(tmp_path)
    target, _ = make_checkpoint(tmp_path / "target.ckpt", tokenizer.path, seed=0, n_layers=2)
    draft, _ = make_checkpoint(tmp_path / "draft.ckpt", tokenizer.path, seed=1, n_layers=1, d_model=16)

    def infer(*argv):
        try:
            infer_cli.main([str(a) for a in argv])
            code = 0
        except SystemExit as exit:
            code = exit.code
        captured = capsys.readouterr()
        return code, captured.out, captured.err

    plain = infer(target, "def main", "-g", "-l", 16, "--no-stream")
    assert plain[0] == 0
    assert infer(target, "def main", "-g", "-l", 16, "--no-stream", "--draft", draft, "--draft-tokens", 3) == plain
    assert infer(target, "def main", "-g", "-l", 16, "--stream", "--draft", draft) == plain
    # seeded sampling: reproducible, and the loaded models are the checkpoint's
    sampled = infer(target, "def main", "-l", 16, "-s", 3, "--draft", draft, "--no-stream")
    assert sampled[0] == 0 and sampled == infer(target, "def main", "-l", 16, "-s", 3, "--draft", draft, "--stream")
    assert load_checkpoint(draft, "cpu", tokenizer=tokenizer.path).model.hparams["d_model"] == 16
    # a draft trained with another tokenizer: one line naming both hashes, non-zero exit
    other = TokenizerTrainer({"num_threads": 1}).train(iter(["other text entirely"] * 50 + ["abc def"] * 50), 300,
                                                       tmp_path / "other.model")
    alien, _ = make_checkpoint(tmp_path / "alien.ckpt", other.path, seed=2, n_layers=1, d_model=16)
    code, out, err = infer(target, "def main", "--draft", alien)
    assert code == 1 and out == "" and err.count("\n") == 1
    assert other.content_hash in err and tokenizer.content_hash in err
    code, _, err = infer(target, "def main", "-b", "--draft", draft)
    assert code == 1 and "--draft works with sampling and greedy search, not beam search" in err
    # an int8 KV cache composes with a draft (the plain greedy's output with the same cache); caches that drop
    # tokens do not, with one line naming the flag
    assert (infer(target, "def main", "-g", "-l", 16, "--no-stream", "--kv-dtype", "int8", "--draft", draft)
            == infer(target, "def main", "-g", "-l", 16, "--no-stream", "--kv-dtype", "int8"))
    for flags in (("--window", 8), ("--sink-tokens", 2, "--window", 8), ("--kv-budget", 8)):
        code, out, err = infer(target, "def main", "--draft", draft, *flags)
        assert code == 1 and out == "" and err.count("\n") == 1 and flags[0] in err and "--kv-dtype" in err


@pytest.mark.parametrize("target_arch,window", [({}, {}), ({"position": "rope"}, {"rolling": True})])
def test_int8_kv_cache_greedy_equals_the_target_greedy_with_that_cache(target_arch, window):
    target = make_model(0, **target_arch)
    draft = make_model(5, d_model=16, n_layers=1, n_heads=2, d_ff=32, **target_arch)
    for n_prompt, length in ((1, 12), (4, 30)):  # the second runs past block_size
        p = prompt(n_prompt, seed=n_prompt)
        expected = inference.greedy_search(target, p, length, BLOCK, kv_dtype="int8", **window)
        stats = SpeculativeStats()
        out = speculative_greedy_search(target, draft, p, length, BLOCK, draft_tokens=3, stats=stats,
                                        kv_dtype="int8", **window)
        assert out.tolist() == expected.tolist() and stats.rounds > 0
    # both models generated from int8 caches (the borrowed caches are kept per model, keyed by their options)
    for model in (target, draft):
        keys = list(inference._caches[model])
        assert keys and all(dict(key[-1]) == {"kv_dtype": "int8"} for key in keys), keys
    with pytest.raises(ValueError, match="kv_dtype='int4'"):
        speculative_greedy_search(target, draft, prompt(3), 5, BLOCK, kv_dtype="int4")


@pytest.mark.slow
def test_compiled_draft_step_gives_the_same_output():
    # the draft's one-token steps compiled (a static cache, attention over every slot masked, rewound by index)
    target, draft = make_model(7), make_model(8, n_layers=1)
    p = prompt(4)
    expected = inference.greedy_search(target, p, 30, BLOCK)
    stats = SpeculativeStats()
    assert torch.equal(speculative_greedy_search(target, draft, p, 30, BLOCK, compile=True, stats=stats), expected)
    eager = SpeculativeStats()
    speculative_greedy_search(target, draft, p, 30, BLOCK, stats=eager)
    assert stats == eager  # the draft proposed the same tokens
    inference.release_caches(draft)
