"""Preference tuning (DPO): the loss against its formula on a hand-computed example, preference data (exact
windows, errors naming the file and row), the frozen reference across a resume, the xlab command with
conf/extra/dpo.yaml, and a tiny model whose preference margin grows on a toy task."""
import json
import math
import random
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml

from xlabml.chat import render_chat
from xlabml.datamodules import XLabDataModule
from xlabml.models import XLabModel
from xlabml.posttrain.dpo import DPO, REFERENCE_KEY, dpo_loss, sequence_logps
from xlabml.posttrain.records import load_examples
from xlabml.tokenizer import TokenizerTrainer

LETTERS = "abcdef"
REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok") / "chars.model"
    return TokenizerTrainer({"model_type": "char", "num_threads": 1}).train([LETTERS * 4 + " .?"], 300, path)


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def datamodule(tmp_path, tokenizer, locations, **overrides):
    args = dict(locations=locations, splits={"train": 1.0}, num_tokens=len(tokenizer), tokenizer_path=tokenizer.path,
                seq_len=16, format="preference", packed=False, cache_dir=str(tmp_path / "cache"), batch_size=4)
    return XLabDataModule(**{**args, **overrides})


# ---------------------------------------------------------------------------------------------------- loss


def constant_model(log_probs, pad_index=3):
    """An XLabModel whose logits are `log_probs` at every position: every weight 0, the head's bias the table."""
    model = XLabModel(len(log_probs), 8, d_model=8, n_layers=1, n_heads=2, d_ff=16, dropout=0.0, pad_index=pad_index)
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        model.model.head.bias.copy_(torch.tensor(log_probs))
    return model


def test_loss_on_a_hand_computed_example():
    # vocabulary of 8; policy and reference put fixed probabilities on every token, whatever the input
    policy_p = [0.05, 0.05, 0.2, 0.05, 0.05, 0.4, 0.1, 0.1]
    reference_p = [0.05, 0.05, 0.1, 0.05, 0.05, 0.2, 0.3, 0.2]
    policy, reference = constant_model([math.log(p) for p in policy_p]), constant_model(
        [math.log(p) for p in reference_p])
    pad = 3
    # one pair: prompt <sos> 4; chosen response 5 <eos>; rejected response 6 7 <eos>; y = pad outside responses
    batch = {"chosen_x": torch.tensor([[1, 4, 5, pad, pad]]), "chosen_y": torch.tensor([[pad, 5, 2, pad, pad]]),
             "rejected_x": torch.tensor([[1, 4, 6, 7, pad]]), "rejected_y": torch.tensor([[pad, 6, 7, 2, pad]])}
    beta = 0.5
    objective = DPO(beta=beta)
    objective.set_reference(reference.model)
    loss = objective.step(policy, batch, "val")

    pc, pr = math.log(0.4) + math.log(0.2), math.log(0.1) + math.log(0.1) + math.log(0.2)  # policy log π(y|x)
    rc, rr = math.log(0.2) + math.log(0.1), math.log(0.3) + math.log(0.2) + math.log(0.1)  # reference
    margin = beta * ((pc - rc) - (pr - rr))  # = 0.5 * (log 4 - log 1/3) = 0.5 log 12
    expected = -math.log(1 / (1 + math.exp(-margin)))
    assert margin == pytest.approx(0.5 * math.log(12), rel=1e-12)
    assert loss.item() == pytest.approx(expected, rel=1e-6)  # = log(1 + 1/sqrt(12)) = 0.25379...
    assert expected == pytest.approx(math.log(1 + 12 ** -0.5), rel=1e-12)

    logps = sequence_logps(policy, batch["chosen_x"], batch["chosen_y"], pad)
    assert logps.tolist() == pytest.approx([pc], rel=1e-6)
    losses, chosen, rejected = dpo_loss(torch.tensor([pc]), torch.tensor([pr]), torch.tensor([rc]),
                                        torch.tensor([rr]), beta)
    assert chosen.item() == pytest.approx(beta * (pc - rc), rel=1e-6)
    assert rejected.item() == pytest.approx(beta * (pr - rr), rel=1e-6)
    assert losses.item() == pytest.approx(expected, rel=1e-6)
    # policy == reference: every reward 0, the loss log 2
    same = DPO(beta=beta)
    same.set_reference(policy.model)
    assert same.step(policy, batch, "val").item() == pytest.approx(math.log(2), rel=1e-6)


def test_dpo_settings_and_batches_are_checked():
    for beta in (0, -1, "0.1", True):
        with pytest.raises(ValueError, match=f"DPO beta={beta!r}: expected a number > 0"):
            DPO(beta=beta)
    model = constant_model([0.0] * 8)
    with pytest.raises(ValueError, match=r"needs batches of preference pairs .*lacks \['chosen_x'"):
        DPO().step(model, {"x": torch.zeros(1, 4, dtype=torch.long), "y": torch.zeros(1, 4, dtype=torch.long)},
                   "val")
    with pytest.raises(ValueError, match="preference pairs .*need model.objective: xlabml.posttrain.dpo.DPO"):
        model._step({"chosen_x": torch.zeros(1, 4, dtype=torch.long)}, "val")


# ---------------------------------------------------------------------------------------------------- data


def test_preference_windows_hold_exactly_the_responses(tokenizer, tmp_path):
    rows = [{"prompt": "ab", "chosen": "ba", "rejected": "abab"},
            {"prompt": [{"role": "user", "content": "cd"}], "chosen": [{"role": "assistant", "content": "dc"}],
             "rejected": [{"role": "assistant", "content": "c"}], "system": "be."},
            {"chosen": [{"role": "user", "content": "ef"}, {"role": "assistant", "content": "fe"}],
             "rejected": [{"role": "user", "content": "ef"}, {"role": "assistant", "content": "ef"}]}]
    dm = datamodule(tmp_path, tokenizer, write_jsonl(tmp_path / "p.jsonl", rows))
    dm.prepare_data()
    dm.setup("fit")
    data = dm.datasets["train"]
    assert len(data) == 3 and data.dropped == 0
    pad, eos = tokenizer.pad_id, tokenizer.eos_id
    prompts = [[("user", "ab")], [("system", "be."), ("user", "cd")], [("user", "ef")]]
    responses = [("ba", "abab"), ("dc", "c"), ("fe", "ef")]
    for index, (prompt, pair) in enumerate(zip(prompts, responses)):
        item = data[index]
        head = render_chat(prompt, tokenizer)  # ... <|assistant|>
        for side, response in zip(("chosen", "rejected"), pair):
            body = tokenizer.encode(response) + [eos]
            sequence = head + body
            assert item[f"{side}_x"].tolist() == (sequence + [pad] * (17 - len(sequence)))[:16]
            assert item[f"{side}_y"].tolist() == [pad] * (len(head) - 1) + body + [pad] * (17 - len(sequence))


def test_pairs_longer_than_a_window_are_left_out(tokenizer, tmp_path):
    rows = [{"prompt": "ab", "chosen": "ba", "rejected": "b"}, {"prompt": "abcdef" * 3, "chosen": "a", "rejected": "b"}]
    dm = datamodule(tmp_path, tokenizer, write_jsonl(tmp_path / "p.jsonl", rows))
    with pytest.warns(UserWarning, match="1 of 2 preference pairs are longer than data.seq_len=16"):
        dm.setup("fit")
    assert dm.datasets["train"].rows.tolist() == [0]
    only_long = datamodule(tmp_path, tokenizer, write_jsonl(tmp_path / "q.jsonl", rows[1:]))
    with pytest.raises(ValueError, match="none of its 1 preference pairs fits data.seq_len=16"):
        only_long.setup("fit")


@pytest.mark.parametrize("rows, match", [
    ([{"prompt": "a", "chosen": "b", "rejected": "c"}, {"prompt": "a", "chosen": "b", "rejected": ""}],
     r"p.jsonl row 2: 'rejected' is empty; every response needs text"),
    ([{"prompt": "a", "chosen": "", "rejected": "c"}], r"p.jsonl row 1: 'chosen' is empty"),
    ([{"prompt": "a", "chosen": [{"role": "assistant", "content": ""}], "rejected": "c"}],
     r"row 1: 'chosen''s assistant message 0 is empty"),
    ([{"prompt": "a", "chosen": "b", "rejected": "b"}], r"row 1: 'chosen' and 'rejected' are the same response"),
    ([{"prompt": "a", "chosen": "b", "rejected": None}], r"row 1: 'rejected' is missing"),
    ([{"prompt": "a", "chosen": [{"role": "user", "content": "b"}], "rejected": "c"}],
     r"row 1: 'chosen' has no assistant message"),
    ([{"chosen": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}],
       "rejected": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "c"}]}],
     r"row 1: 'prompt' is missing and 'chosen' and 'rejected' share no prompt message"),
    ([{"prompt": "a", "response": "b"}], r"preference rows need columns 'prompt', 'chosen' and 'rejected'"),
])
def test_bad_preference_rows_give_one_clear_error(tmp_path, rows, match):
    with pytest.raises(ValueError, match=match):
        load_examples(write_jsonl(tmp_path / "p.jsonl", rows), "preference")


# ------------------------------------------------------------------------------------------ reference, resume


def pairs(words):
    """The toy preference task: answer a word with its reverse (chosen), not with the word itself (rejected)."""
    return [{"prompt": w, "chosen": w[::-1], "rejected": w} for w in words if w != w[::-1]]


def tiny_model(seed, n_vocab, lr=3e-3, beta=0.1, seq_len=16):
    torch.manual_seed(seed)
    return XLabModel(n_vocab, seq_len, d_model=32, n_layers=1, n_heads=2, d_ff=64, dropout=0.0, position="rope",
                     objective=DPO(beta=beta),
                     optimizer=lambda params: torch.optim.AdamW(params, lr=lr, weight_decay=0.0))


def trainer(tmp_path, max_steps, **kwargs):
    return L.Trainer(max_steps=max_steps, logger=False, enable_progress_bar=False, enable_model_summary=False,
                     accelerator="cpu", limit_val_batches=0, default_root_dir=tmp_path, **kwargs)


def test_reference_is_the_initial_weights_and_survives_a_resume(tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", pairs(["abc", "bcd", "cde", "def", "fab", "eab", "dab", "cab"]))
    model = tiny_model(0, len(tokenizer))
    initial = {k: v.clone() for k, v in model.model.state_dict().items()}
    checkpoint = L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    trainer(tmp_path, 3, callbacks=[checkpoint]).fit(model, datamodule(tmp_path, tokenizer, path))
    moved = model.model.state_dict()
    assert any(not torch.equal(moved[k], initial[k]) for k in initial)  # the policy trained ...
    reference = model.objective.reference.state_dict()
    assert all(torch.equal(reference[k], initial[k]) for k in initial)  # ... the reference did not
    assert not any(p.requires_grad for p in model.objective.reference.parameters())
    saved = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=False)
    assert all(torch.equal(saved[REFERENCE_KEY][k], initial[k]) for k in initial)
    assert not any(k.startswith("objective") or "reference" in k for k in saved["state_dict"])

    resumed = tiny_model(1, len(tokenizer))  # other initial weights: the resumed run must not take them
    trainer(tmp_path, 5).fit(resumed, datamodule(tmp_path, tokenizer, path), ckpt_path=tmp_path / "ckpt" / "last.ckpt")
    assert resumed.global_step == 5
    reference = resumed.objective.reference.state_dict()
    assert all(torch.equal(reference[k], initial[k]) for k in initial)
    # the checkpoint is a plain model checkpoint for everything else
    plain = XLabModel.load_from_checkpoint(tmp_path / "ckpt" / "last.ckpt")
    assert plain.objective is None


def test_reference_is_the_model_init_from_starts_from(tokenizer, tmp_path):
    from interop_support import make_checkpoint

    arch = dict(n_vocab=len(tokenizer), max_len=16, d_model=32, n_layers=1, n_heads=2, d_ff=64, position="rope")
    ckpt, base = make_checkpoint(tmp_path / "sft.ckpt", tokenizer.path, seed=3, **arch)
    model = XLabModel(**arch, dropout=0.0, init_from=str(ckpt), objective=DPO(beta=0.1),
                      optimizer=lambda params: torch.optim.AdamW(params, lr=3e-3, weight_decay=0.0))
    path = write_jsonl(tmp_path / "p.jsonl", pairs(["abc", "bcd", "cde", "def"]))
    trainer(tmp_path, 2, enable_checkpointing=False).fit(model, datamodule(tmp_path, tokenizer, path))
    expected = base.model.state_dict()
    reference = model.objective.reference.state_dict()
    assert all(torch.equal(reference[k], expected[k]) for k in expected)  # the checkpoint's weights, not the init
    assert any(not torch.equal(model.model.state_dict()[k], expected[k]) for k in expected)


# ------------------------------------------------------------------------------------------------ command


def test_xlab_fit_with_the_dpo_overlay(tokenizer, tmp_path, monkeypatch):
    from xlabml.cli import main

    words = ["abc", "bcd", "cde", "def", "fab", "eab", "dab", "cab"]
    path = write_jsonl(tmp_path / "pairs.jsonl", pairs(words) * 4)
    tiny = {"trainer": {"max_steps": 3, "val_check_interval": 3, "limit_val_batches": 1, "log_every_n_steps": 1,
                        "enable_progress_bar": False, "enable_model_summary": False, "num_sanity_val_steps": 0,
                        "logger": {"class_path": "lightning.pytorch.loggers.CSVLogger",
                                   "init_args": {"save_dir": "logs", "name": ""}}},
            "data": {"num_tokens": len(tokenizer), "tokenizer_path": tokenizer.path, "seq_len": 16,
                     "batch_size": 4, "num_proc": 1, "cache_dir": str(tmp_path / "cache")},
            "model": {"d_model": 32, "n_layers": 1, "n_heads": 2, "d_ff": 64}}
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(tiny))
    monkeypatch.chdir(tmp_path)
    main(["fit", "-c", str(REPO / "conf" / "extra" / "dpo.yaml"), "-c", "tiny.yaml", "--data.locations", path])
    version = tmp_path / "logs" / "version_0"
    saved = torch.load(version / "checkpoints" / "last.ckpt", weights_only=False)
    assert REFERENCE_KEY in saved and saved["hyper_parameters"].get("objective") is None
    logged = (version / "metrics.csv").read_text().splitlines()[0].split(",")
    for name in ("train_loss", "train_acc", "train_rewards/margin", "train_rewards/chosen", "train_rewards/rejected",
                 "train_logps/chosen", "train_logps/rejected", "val_loss", "val_acc", "val_rewards/margin"):
        assert name in logged, (name, logged)


# ------------------------------------------------------------------------------------------------ learning


def held_out_margins(model, data, pad):
    """Each held-out pair's policy log-probability margin (chosen minus rejected) and reward margin."""
    batch = {k: torch.stack([data[i][k] for i in range(len(data))]) for k in data[0]}
    training = model.training
    with torch.no_grad():
        policy = [sequence_logps(model.eval(), batch[f"{s}_x"], batch[f"{s}_y"], pad) for s in ("chosen", "rejected")]
        reference = [sequence_logps(model.objective.reference, batch[f"{s}_x"], batch[f"{s}_y"], pad)
                     for s in ("chosen", "rejected")]
    model.train(training)
    return policy[0] - policy[1], (policy[0] - reference[0]) - (policy[1] - reference[1])


def test_preference_margin_grows_on_a_toy_task(tokenizer, tmp_path):
    """A 1-layer, 32-wide model trained with DPO (beta 0.1) for 100 steps of 16 pairs, on ~1,100 pairs "WORD" →
    chosen "WORD" (an echo), rejected a random word of the same length, prefers the chosen response more than its
    reference does (a positive reward margin) on >= 90% of 60 held-out pairs, and its held-out log-probability
    margin, chosen minus rejected, grows by >= 10 nats on average. Measured: 100% and 25 nats (seed 0, as here;
    seeds 1 and 2, with another draw of rejected words: 97% and 100%, 26 nats); 5-10 s on one CPU thread."""
    rng = random.Random(0)
    words = sorted({"".join(rng.choice(LETTERS) for _ in range(rng.randint(3, 4))) for _ in range(5000)})
    rng.shuffle(words)

    def echo_pairs(words):
        rows = []
        for word in words:
            other = word
            while other == word:
                other = "".join(rng.choice(LETTERS) for _ in word)
            rows.append({"prompt": word, "chosen": word, "rejected": other})
        return rows

    held = datamodule(tmp_path, tokenizer, write_jsonl(tmp_path / "held.jsonl", echo_pairs(words[:60])))
    held.setup("fit")
    held_out = held.datasets["train"]
    train = write_jsonl(tmp_path / "train.jsonl", echo_pairs(words[60:]))
    L.seed_everything(0)
    model = tiny_model(0, len(tokenizer), lr=3e-3, beta=0.1)
    model.objective.set_reference(model.model)  # as the first batch would: the initial weights
    before, _ = held_out_margins(model, held_out, tokenizer.pad_id)
    trainer(tmp_path, 100).fit(model, datamodule(tmp_path, tokenizer, train, batch_size=16))
    after, rewards = held_out_margins(model, held_out, tokenizer.pad_id)
    accuracy = (rewards > 0).float().mean().item()
    assert accuracy >= 0.9, accuracy
    assert (after - before).mean().item() >= 10.0, (after - before).mean().item()


@pytest.mark.parametrize("extra", [{}, {"logit_softcap": 5.0}, {"head_qk": 8}, {"d_embedding": 16}])
def test_reference_logps_in_chunks_equal_the_plain_ones(extra):
    torch.manual_seed(0)
    model = XLabModel(n_vocab=50, max_len=12, d_model=32, n_layers=2, n_heads=4, d_ff=64, pad_index=3,
                      position="rope", **extra).model.eval()
    x = torch.randint(4, 50, (3, 12))
    y = torch.randint(4, 50, (3, 12))
    y[0, :5] = 3  # prompt positions and padding are not targets
    y[2, 9:] = 3
    calls = []
    head = model.head.forward
    model.head.forward = lambda h: calls.append(h.shape[0]) or head(h)
    with torch.no_grad():
        plain = sequence_logps(model, x, y, 3)
        n_plain = len(calls)
        chunked = sequence_logps(model, x, y, 3, chunk_size=7)
    assert torch.allclose(chunked, plain, rtol=1e-5, atol=1e-5)
    if "head_qk" in extra:  # its logits are more than the head's: the plain path
        assert len(calls) == 2 * n_plain
    else:  # 36 tokens: chunks of 7, 7, 7, 7, 7, 1
        assert calls[n_plain:] == [7, 7, 7, 7, 7, 1]
    # with gradients (the policy's pass) the logits stay whole, for the backward
    chunked_grad = sequence_logps(model, x, y, 3, chunk_size=7)
    assert chunked_grad.requires_grad and torch.allclose(chunked_grad.detach(), plain, rtol=1e-5, atol=1e-5)
