"""Instruction tuning: chat files checked row by row, the exact targets of padded and packed windows (replies and
their <eos> only), caching, the xlab command with conf/extra/sft.yaml, and a tiny model that learns to reverse
words through the chat template."""
import json
import random

import datasets
import lightning as L
import numpy as np
import pytest
import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from xlabml import inference
from xlabml.chat import _CHAT_SUFFIX, render_chat, template_of
from xlabml.datamodules import XLabDataModule
from xlabml.datasets import TokenDataset
from xlabml.models import XLabModel
from xlabml.posttrain.records import load_examples, normalize_chat
from xlabml.posttrain.sft import ChatSequenceDataset, _EncodeChats
from xlabml.tokenizer import Tokenizer, TokenizerTrainer

LETTERS = "abcdef"


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok") / "chars.model"
    return TokenizerTrainer({"model_type": "char", "num_threads": 1}).train([LETTERS * 4 + " .?"], 300, path)


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def datamodule(tmp_path, tokenizer, locations, **overrides):
    args = dict(locations=locations, splits={"train": 1.0}, num_tokens=len(tokenizer), tokenizer_path=tokenizer.path,
                seq_len=16, format="chat", cache_dir=str(tmp_path / "cache"), batch_size=4)
    return XLabDataModule(**{**args, **overrides})


# ------------------------------------------------------------------------------------------------ targets


def expected_document(tokenizer, messages):
    """The framed document and which of its tokens are targets, computed from the layout (not the template)."""
    role_ids = {role: len(tokenizer) - 3 + i for i, role in enumerate(("system", "user", "assistant"))}
    tokens, targets = [tokenizer.sos_id], [False]
    for role, content in messages:
        ids = tokenizer.encode(content)
        tokens += [role_ids[role], *ids]
        targets += [False] + [role == "assistant"] * len(ids)
        if role == "assistant":
            tokens.append(tokenizer.eos_id)
            targets.append(True)
    if messages[-1][0] != "assistant":  # the document's own <eos>, after a message that is no reply
        tokens.append(tokenizer.eos_id)
        targets.append(False)
    return tokens, targets


def chat_dataset(tokenizer, chats, seq_len, packed):
    texts = [json.dumps(normalize_chat({"messages": [{"role": r, "content": c} for r, c in chat]}, "test"))
             for chat in chats]
    encoded = _EncodeChats(tokenizer.model_proto)(texts)
    features = datasets.Features({"ids": datasets.List(datasets.Value("int32")),
                                  "trained": datasets.List(datasets.Value("int8"))})
    tokens = TokenDataset.from_ids(datasets.Dataset.from_dict(encoded, features=features))
    return ChatSequenceDataset(tokens, seq_len, seq_len, packed=packed)


def check_windows(tokenizer, chats, seq_len, packed):
    dataset = chat_dataset(tokenizer, chats, seq_len, packed)
    pad = tokenizer.pad_id
    documents = [expected_document(tokenizer, chat) for chat in chats]
    if packed:
        stream = [t for tokens, _ in documents for t in tokens]
        trained = [f for _, flags in documents for f in flags]
        owner = [d for d, (tokens, _) in enumerate(documents) for _ in tokens]
        windows = [(stream, trained, start) for start in range(0, len(stream) - 1, seq_len)]
    else:
        windows = [(tokens, flags, start) for tokens, flags in documents for start in range(0, len(tokens) - 1, seq_len)]
    assert len(dataset) == len(windows)
    for index, (tokens, flags, start) in enumerate(windows):
        item = dataset[index]
        x = tokens[start:start + seq_len]
        y = [t if f else pad for t, f in zip(tokens[start + 1:start + seq_len + 1], flags[start + 1:])]
        assert item["x"].tolist() == x + [pad] * (seq_len - len(x))
        assert item["y"].tolist() == y + [pad] * (seq_len - len(y))
        if packed:  # attention stays inside each chat: document ids follow the chats, from 0 in each window
            ids = [owner[start + k] - owner[start] for k in range(len(x))]
            assert item["doc_ids"].tolist()[:len(x)] == ids
    collected = [t for i in range(len(dataset)) for t in dataset[i]["y"].tolist() if t != pad]
    replies = [t for chat in chats for role, content in chat if role == "assistant"
               for t in tokenizer.encode(content) + [tokenizer.eos_id]]
    assert collected == replies  # every reply token and reply <eos> once, nothing else


def test_targets_of_a_given_chat(tokenizer):
    chat = [("system", "be.."), ("user", "abc?"), ("assistant", "cba"), ("user", "<|assistant|>"),
            ("assistant", "fed cba"), ("user", "bye")]
    for packed in (False, True):
        check_windows(tokenizer, [chat, [("user", "a"), ("assistant", "b")]], 8, packed)
    tokens, flags = expected_document(tokenizer, chat)
    assert [tokenizer.decode([t]) if f else "." for t, f in zip(tokens, flags)] == (
        ["."] * 12 + list("cba") + ["", "."] + ["."] * len(tokenizer.encode("<|assistant|>")) + ["."]
        + list("fed cba") + ["", "."] + ["."] * 3 + ["."])


MESSAGE = st.tuples(st.sampled_from(["system", "user", "assistant"]),
                    st.lists(st.sampled_from(list(LETTERS) + [" ", "<|user|>", "\n"]), max_size=6).map("".join))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.lists(MESSAGE, min_size=1, max_size=5).filter(
    lambda chat: any(role == "assistant" for role, _ in chat)
    and all(content for role, content in chat if role == "assistant")), min_size=1, max_size=4),
    st.integers(3, 12), st.booleans())
def test_exactly_the_replies_are_trained(tokenizer, chats, seq_len, packed):
    check_windows(tokenizer, chats, seq_len, packed)


# ------------------------------------------------------------------------------------------- files, errors


def test_chat_files_in_every_row_form(tokenizer, tmp_path):
    rows = [{"messages": [{"role": "user", "content": "ab"}, {"role": "assistant", "content": "ba"}]},
            {"prompt": "cd", "response": "dc", "system": "be."},
            {"prompt": [{"role": "user", "content": "ef"}], "completion": [{"role": "assistant", "content": "fe"}]}]
    dm = datamodule(tmp_path, tokenizer, write_jsonl(tmp_path / "c.jsonl", rows))
    dm.prepare_data()
    dm.setup("fit")
    data = dm.datasets["train"]
    assert len(data) == 3
    targets = [tokenizer.decode([t for t in data[i]["y"].tolist() if t != tokenizer.pad_id]) for i in range(3)]
    assert targets == ["ba", "dc", "fe"]
    inputs = [data[i]["x"].tolist() for i in range(3)]
    assert inputs[1][:len(render_chat([("system", "be."), ("user", "cd")], tokenizer))] == render_chat(
        [("system", "be."), ("user", "cd")], tokenizer)
    again = datamodule(tmp_path, tokenizer, str(tmp_path / "c.jsonl"))
    again.setup("fit")
    assert again.datasets["train"].tokens.from_cache  # encoded once, cached under the tokenizer's hash
    assert [again.datasets["train"][i]["y"].tolist() for i in range(3)] == [data[i]["y"].tolist() for i in range(3)]


def test_prompt_response_rows_are_plain_text_without_a_template(tokenizer, tmp_path):
    plain = Tokenizer(tokenizer.model_proto[:-len(_CHAT_SUFFIX)])  # as trained before the role tokens
    plain.save(tmp_path / "plain.model")
    assert template_of(plain) is None
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "ab=", "response": "ba"}])
    dm = datamodule(tmp_path, plain, path, num_tokens=len(plain))
    dm.setup("fit")
    item = dm.datasets["train"][0]
    document = [plain.sos_id, *plain.encode("ab="), *plain.encode("ba"), plain.eos_id]
    assert item["x"].tolist()[:len(document) - 1] == document[:-1]
    assert [t for t in item["y"].tolist() if t != plain.pad_id] == [*plain.encode("ba"), plain.eos_id]
    messages = write_jsonl(tmp_path / "m.jsonl", [{"messages": [{"role": "user", "content": "a"},
                                                                {"role": "assistant", "content": "b"}]}])
    with pytest.raises(ValueError, match="has no chat tokens .*add-chat-tokens"):
        datamodule(tmp_path, plain, messages, num_tokens=len(plain)).setup("fit")


@pytest.mark.parametrize("rows, match", [
    ([{"messages": [{"role": "user", "content": "hi"}]}], r"c.jsonl row 1: a chat has no assistant message"),
    ([{"prompt": "a", "response": "b"}, {"prompt": "a", "response": ""}], r"row 2: 'response' is empty"),
    ([{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": ""}]}],
     r"row 1: a chat's assistant message 1 is empty"),
    ([{"messages": [{"role": "robot", "content": "a"}]}], r"row 1: message 0 has role 'robot'"),
    ([{"prompt": "a", "response": "b", "system": 3}], r"row 1: 'system' is 3; expected a string"),
    ([{"question": "a", "answer": "b"}], r"chat rows need columns 'messages', or 'prompt' and 'response'.*"
                                         r"\['question', 'answer'\]"),
])
def test_bad_chat_rows_give_one_clear_error(tokenizer, tmp_path, rows, match):
    dm = datamodule(tmp_path, tokenizer, write_jsonl(tmp_path / "c.jsonl", rows))
    with pytest.raises(ValueError, match=match):
        dm.prepare_data()


def test_bad_sources_and_settings(tokenizer, tmp_path):
    (tmp_path / "c.txt").write_text("just text\n")
    with pytest.raises(ValueError, match="a text file holds no chat records"):
        load_examples(str(tmp_path / "c.txt"), "chat")
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        load_examples(str(tmp_path / "missing.jsonl"), "chat")
    path = write_jsonl(tmp_path / "c.jsonl", [{"conversations": [{"role": "user", "content": "a"},
                                                                 {"role": "assistant", "content": "b"}]}])
    with pytest.raises(ValueError, match="cannot be streamed"):
        load_examples({"path": path, "streaming": True}, "chat")
    with pytest.raises(ValueError, match="columns maps 'messages' to 'turns', which is not a column"):
        load_examples({"path": path, "columns": {"messages": "turns"}}, "chat")
    loaded = load_examples({"path": path, "columns": {"messages": "conversations"}}, "chat")
    assert json.loads(loaded[0]["text"]) == {"messages": [["user", "a"], ["assistant", "b"]]}
    for options, match in [(dict(format="chats"), "format='chats': expected one of"),
                            (dict(dynamic_encode=True), "dynamic_encode applies to text only"),
                            (dict(format="preference", packed=True), "packed applies to text and chat data"),
                            (dict(format="preference", packed=False, seq_len_warmup=10),
                             "seq_len_warmup applies to text and chat data"),
                            (dict(segments=True), "segments: true cuts each split's token stream"),
                            (dict(format="text", segments=True, seq_len_warmup=10),
                             "seq_len_warmup cuts batches short")]:
        with pytest.raises(ValueError, match=match):
            datamodule(tmp_path, tokenizer, path, **options)
    missing = datamodule(tmp_path, tokenizer, path, tokenizer_path=str(tmp_path / "none.model"))
    with pytest.raises(FileNotFoundError, match="none.model not found: format='chat' fine-tunes a pretrained model"):
        missing.prepare_data()


# --------------------------------------------------------------------------------------------- xlab command


def test_xlab_fit_with_the_sft_overlay(tokenizer, tmp_path, monkeypatch):
    from pathlib import Path

    from xlabml.checkpoints import load_checkpoint
    from xlabml.cli import main

    repo = Path(__file__).resolve().parent.parent
    rows = [{"prompt": w, "response": w[::-1]} for w in ("abc", "bcd", "cde", "def", "fab", "eab", "dab", "cab")]
    path = write_jsonl(tmp_path / "chats.jsonl", rows * 4)
    tiny = {"trainer": {"max_steps": 3, "val_check_interval": 3, "limit_val_batches": 1, "log_every_n_steps": 1,
                        "enable_progress_bar": False, "enable_model_summary": False, "num_sanity_val_steps": 0},
            "data": {"num_tokens": len(tokenizer), "tokenizer_path": tokenizer.path, "seq_len": 16,
                     "batch_size": 4, "num_proc": 1, "cache_dir": str(tmp_path / "cache")},
            "model": {"d_model": 32, "n_layers": 1, "n_heads": 2, "d_ff": 64}}
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(tiny))
    monkeypatch.chdir(tmp_path)
    main(["fit", "-c", str(repo / "conf" / "extra" / "sft.yaml"), "-c", "tiny.yaml", "--data.locations", path])
    loaded = load_checkpoint(tmp_path / "logs" / "version_0" / "checkpoints" / "last.ckpt")
    assert loaded.data_hparams["format"] == "chat" and loaded.data_hparams["packed"] is True
    assert template_of(loaded).role_ids["assistant"] == len(tokenizer) - 1  # the template travels with it
    # ... and a server prompts the instruction-tuned model through it (a base model gets plain text: test_chat)
    from xlabml.chat import chat_template
    from xlabml.serve.chat import render_chat as serve_chat

    messages = [("system", "be."), ("developer", "ab"), ("user", "abc")]
    assert chat_template(loaded) is not None and chat_template(loaded.path) is not None
    prompt = serve_chat(messages, loaded.tokenizer, loaded)
    assert prompt.ids == render_chat(messages, tokenizer) and prompt.ids[-1] == len(tokenizer) - 1
    assert (prompt.stop, prompt.strip) == ([], False)


# ------------------------------------------------------------------------------------------------ learning


@pytest.mark.slow
def test_tiny_model_learns_to_reverse_words(tokenizer, tmp_path):
    """A 2-layer, 64-wide model instruction-tuned for 200 steps (packed windows of 64 tokens, ~6 chats each) on
    ~1,200 chats "WORD" → "DROW" (3-4 letters of a-f) answers >= 90% of 60 held-out words exactly (greedy, stopping
    at its <eos>). Measured: 100% (seed 0, as here; seeds 1 and 2: 93% and 100%); 10-25 s on one CPU thread."""
    rng = random.Random(0)
    words = sorted({"".join(rng.choice(LETTERS) for _ in range(rng.randint(3, 4))) for _ in range(5000)})
    rng.shuffle(words)
    held_out, train = words[:60], words[60:]
    path = write_jsonl(tmp_path / "reverse.jsonl", [{"prompt": w, "response": w[::-1]} for w in train])
    dm = datamodule(tmp_path, tokenizer, path, seq_len=64, packed=True, batch_size=16)
    L.seed_everything(0)
    model = XLabModel(len(tokenizer), 64, d_model=64, n_layers=2, n_heads=4, d_ff=256, dropout=0.0, position="rope",
                      optimizer=lambda params: torch.optim.AdamW(params, lr=3e-3, weight_decay=0.0))
    trainer = L.Trainer(max_steps=200, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, accelerator="cpu", limit_val_batches=0)
    trainer.fit(model, dm)
    prompts = [torch.tensor(render_chat([{"role": "user", "content": w}], tokenizer)) for w in held_out]
    replies = inference.greedy_search(model.eval(), prompts, 8, 64, eos_class=tokenizer.eos_id)
    accuracy = np.mean([tokenizer.decode(r.tolist()) == w[::-1] for w, r in zip(held_out, replies)])
    assert accuracy >= 0.9, accuracy
