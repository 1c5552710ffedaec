"""Context extension: RoPE scaling (position interpolation, NTK, YaRN) and continued training of a checkpoint at
a longer max_len (weights copied by ``xlabml.init_from.load_initial_weights``)."""
import math

import pytest
import torch
import torch.nn.functional as F

from xlabml.init_from import load_initial_weights
from xlabml.layers import Decoder, RotaryPosition, rope_frequencies
from xlabml.models import XLabModel

V = 24


def make(max_len=16, seed=0, **kwargs):
    torch.manual_seed(seed)
    model = Decoder(V, max_len, d_model=32, n_layers=2, n_heads=4, d_ff=64, dropout=0.0, position='rope', **kwargs)
    with torch.no_grad():  # sharper than at initialisation: positions show in the logits
        for block in model.blocks:
            block.attn.qkv.weight.mul_(4.0)
    return model.eval()


def test_position_interpolation_is_the_model_at_positions_divided_by_the_scale():
    base, stretched = make(), make(max_len=64, rope_scaling='linear', rope_scale=4)
    stretched.load_state_dict(base.state_dict())
    x = torch.randint(0, V, (2, 12), generator=torch.Generator().manual_seed(1))
    slow = torch.arange(12)[None] * 4
    torch.testing.assert_close(stretched(x, positions=slow), base(x), atol=1e-5, rtol=0)
    assert (stretched(x) - base(x)).abs().max() > 1e-3


def test_ntk_and_yarn_frequencies():
    plain, _ = rope_frequencies(16, 10000.0)
    ntk, factor = rope_frequencies(16, 10000.0, 'ntk', 4.0, 16)
    assert factor == 1.0 and ntk[0] == plain[0]  # the highest frequency stays
    torch.testing.assert_close(ntk[-1], plain[-1] / 4)  # the lowest is interpolated
    assert ((ntk <= plain) & (ntk >= plain / 4 - 1e-12)).all()
    yarn, factor = rope_frequencies(16, 10000.0, 'yarn', 4.0, 256)
    fits = 256 * plain / (2 * math.pi)  # wavelengths of each frequency in the trained length
    assert torch.equal(yarn[fits >= 32], plain[fits >= 32]) and (fits >= 32).any()
    torch.testing.assert_close(yarn[fits <= 1], plain[fits <= 1] / 4)
    assert factor == pytest.approx(0.1 * math.log(4) + 1)
    cos, sin = RotaryPosition(16, rope_scaling='yarn', rope_scale=4, max_len=1024).rotary(torch.arange(5)[None])
    torch.testing.assert_close(cos ** 2 + sin ** 2, torch.full_like(cos, factor ** 2))


def test_rope_scaling_errors():
    with pytest.raises(ValueError, match="unknown rope_scaling 'dynamic'"):
        make(rope_scaling='dynamic', rope_scale=2)
    with pytest.raises(ValueError, match='rope_scale must be a number >= 1'):
        make(rope_scaling='linear', rope_scale=0.5)
    with pytest.raises(ValueError, match="position is 'alibi'"):
        Decoder(V, 8, d_model=32, n_layers=1, n_heads=4, d_ff=64, position='alibi', rope_scaling='linear')


def copy_batches(n, length, period=12, seed=0):
    """Sequences that repeat with a period longer than the short model's context: beyond the first period every
    token is the one `period` back, which only a model seeing that far can predict."""
    g = torch.Generator().manual_seed(seed)
    head = torch.randint(0, V, (n, period), generator=g)
    return head.repeat(1, length // period + 1)[:, :length + 1]


def train(model, length, steps, seed):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for step in range(steps):
        seq = copy_batches(16, length, seed=seed + step)
        loss = F.cross_entropy(model(seq[:, :-1]).flatten(0, 1), seq[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()


@torch.no_grad()
def long_loss(model, length=36):
    seq = copy_batches(64, length, seed=10_000)
    logits = model(seq[:, :-1])[:, 12:]  # targets that repeat an earlier token
    return F.cross_entropy(logits.flatten(0, 1), seq[:, 13:].flatten()).item()


def test_continued_training_at_a_longer_max_len_uses_the_longer_context(tmp_path):
    torch.manual_seed(0)
    short = XLabModel(V, 8, d_model=32, n_layers=2, n_heads=4, d_ff=64, dropout=0.0, position='rope')
    train(short.model.train(), 8, 60, seed=0)
    path = tmp_path / 'short.ckpt'
    torch.save({'state_dict': short.state_dict(), 'hyper_parameters': dict(short.hparams)}, path)
    before = long_loss(short.model.eval())
    assert before > 0.8 * math.log(V)  # it never saw a token 12 back: no better than chance

    # (no rope_scaling here: a model this small learns the 12-token offset far slower when interpolation squeezes
    # offsets together; bench/memory_variants.py measures the scalings on Tiny Shakespeare)
    long = XLabModel(V, 36, d_model=32, n_layers=2, n_heads=4, d_ff=64, dropout=0.0, position='rope')
    copied = load_initial_weights(long, path)
    assert len(copied) == len(long.model.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(long.model.parameters(), short.model.parameters()))
    train(long.model.train(), 36, 250, seed=1)
    assert long_loss(long.model.eval()) < 0.3 * before


@pytest.mark.slow
def test_init_from_continues_a_rope_checkpoint_at_a_longer_length(tmp_path, monkeypatch, capsys):
    import yaml

    from xlabml.checkpoints import read_checkpoint
    from xlabml.cli import main
    from xlabml.datamodules import XLabDataModule

    monkeypatch.chdir(tmp_path)
    data = {"locations": {"builtin": "python-topics"}, "num_tokens": 512, "seq_len": 16, "batch_size": 4,
            "num_proc": 1, "tokenizer_path": str(tmp_path / "tokenizer.model"), "cache_dir": str(tmp_path / "cache")}
    XLabDataModule(**data).prepare_data()
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({
        "trainer": {"max_steps": 2, "limit_val_batches": 1, "num_sanity_val_steps": 0, "enable_progress_bar": False,
                    "enable_model_summary": False},
        "data": data,
        "model": {"d_model": 32, "n_layers": 1, "n_heads": 2, "d_ff": 64}}))

    def fit(*args):
        try:
            main(["fit", "-c", str(config), *args])
        except SystemExit as exit:
            return exit.code
        return 0

    frozen = ["--model.optimizer", "torch.optim.SGD", "--model.optimizer.lr", "0.0"]  # the weights stay put
    assert fit("--model.position", "rope") == 0
    base = tmp_path / "logs" / "version_0" / "checkpoints" / "last.ckpt"
    assert fit("--model.init_from", str(base), "--data.seq_len", "64", "--model.rope_scaling", "linear",
               "--model.rope_scale", "4", *frozen) == 0
    longer = read_checkpoint(tmp_path / "logs" / "version_1" / "checkpoints" / "last.ckpt")
    hparams = longer["hyper_parameters"]
    assert (hparams["max_len"], hparams["position"], hparams["rope_scaling"], hparams["rope_scale"]) == (
        64, "rope", "linear", 4.0)
    start = read_checkpoint(base)["state_dict"]
    assert all(torch.equal(start[k], v) for k, v in longer["state_dict"].items())  # it started from the base
    # learned positions have no row for the new positions: one clear error, no run
    capsys.readouterr()
    assert fit("--model.position", "learned") == 0
    learned = tmp_path / "logs" / "version_2" / "checkpoints" / "last.ckpt"
    assert fit("--model.init_from", str(learned), "--data.seq_len", "64") == 1
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"xlab: error: data.seq_len=64 exceeds the model of model.init_from {learned} max_len=16")
    assert not (tmp_path / "logs" / "version_3").exists()
