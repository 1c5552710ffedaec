"""The chat template: role tokens in the tokenizer, exact rendering and targets, reversibility kept, the chat
tokenizer of an older tokenizer, and a base model's weights carried over to its larger vocabulary."""
import hashlib

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from xlabml import chat
from xlabml.chat import (ROLE_TOKENS, ChatTemplate, add_chat_tokens, chat_template, check_messages, extends,
                         make_chat_tokenizer, render_chat, render_plain, template_of)
from xlabml.corpus import iter_builtin_texts
from xlabml.init_from import load_initial_weights
from xlabml.models import XLabModel
from xlabml.tokenizer import CHAT_TOKENS, ESCAPE, META, Tokenizer, TokenizerTrainer

ROLE_TEXT = list(CHAT_TOKENS) + ["<|", "|>", "<sos>", "<eos>", "user", "assistant", ESCAPE, META, " ", "\n", "a"]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    # the corpus spells the role tokens as text: they must stay text
    texts = [*list(iter_builtin_texts("python-topics"))[:20], " ".join(CHAT_TOKENS) * 50]
    tokenizer = TokenizerTrainer({"num_threads": 1}).train(iter(texts), 500,
                                                          tmp_path_factory.mktemp("tok") / "chat.model")
    tokenizer.num_threads = 1
    return tokenizer


@pytest.fixture(scope="module")
def old(tokenizer):
    """A tokenizer as XLab trained them before the role tokens were reserved: the same without its last three."""
    return Tokenizer(tokenizer.model_proto[:-len(chat._CHAT_SUFFIX)])


def test_trained_tokenizers_end_with_the_role_tokens(tokenizer):
    assert len(tokenizer) == 500
    assert [tokenizer.get_token(i) for i in range(497, 500)] == list(CHAT_TOKENS)
    template = template_of(tokenizer)
    assert template.role_ids == {"system": 497, "user": 498, "assistant": 499}
    assert template.stop_ids == (tokenizer.eos_id, 497, 498, 499)
    assert tokenizer.decode([tokenizer.sos_id, 498, *tokenizer.encode("hi"), 499, tokenizer.eos_id]) == "hi"


@settings(max_examples=400, deadline=None)
@given(st.lists(st.sampled_from(ROLE_TEXT) | st.text(max_size=3), max_size=12).map("".join))
def test_text_spelling_role_tokens_stays_text(tokenizer, old, text):
    ids = tokenizer.encode(text)
    assert not set(ids) & set(range(497, 500))  # only the template puts role tokens in a sequence
    assert tokenizer.decode(ids) == text
    assert ids == old.encode(text)  # the reserved tokens change no encoding


@settings(max_examples=300, deadline=None)
@given(st.text(st.characters(blacklist_categories=("Cs",))))
def test_round_trip_all_unicode_with_chat_tokens(tokenizer, text):
    assert tokenizer.decode(tokenizer.encode(text)) == text


def test_render_layout_and_targets_exactly(tokenizer):
    e, sos, eos = tokenizer.encode, tokenizer.sos_id, tokenizer.eos_id
    system, user, assistant = 497, 498, 499
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say <|assistant|> hi"},
                {"role": "assistant", "content": "hi"}, ("user", "again"), ("assistant", "hi hi")]
    rendered = ChatTemplate(tokenizer).render(messages)
    expected = ([sos, system, *e("Be brief."), user, *e("Say <|assistant|> hi"), assistant, *e("hi"), eos, user,
                 *e("again"), assistant, *e("hi hi"), eos])
    assert rendered.ids == expected
    trained = [i for i, t in enumerate(rendered.targets) if t]
    first = 4 + len(e("Be brief.")) + len(e("Say <|assistant|> hi"))  # after <|assistant|>
    second = first + len(e("hi")) + 1 + 1 + len(e("again")) + 1
    assert trained == [*range(first, first + len(e("hi")) + 1), *range(second, second + len(e("hi hi")) + 1)]
    assert [rendered.ids[i] for i in trained] == [*e("hi"), eos, *e("hi hi"), eos]
    prompt = render_chat(messages[:2], tokenizer)  # the prompt for the first reply ends with <|assistant|>
    assert prompt == expected[:first]
    assert tokenizer.decode(prompt) == "Be brief.Say <|assistant|> hi"


def test_message_checks_one_line_each(tokenizer):
    assert check_messages([{"role": "developer", "content": "x", "name": None, "tool_calls": None}]) == [("system",
                                                                                                         "x")]
    for messages, match in [
        ([], "non-empty list of messages"),
        ("hello", "non-empty list of messages"),
        ([{"role": "tool", "content": "x"}], "message 0 has role 'tool'; expected one of"),
        ([{"role": "user"}], "message 0 needs 'role' and 'content'"),
        ([{"role": "user", "content": ["a"]}], "message 0 .user. has content"),
        ([("user", "a"), {"role": "user", "content": "b", "tool_calls": [1]}], "message 1 has keys .'tool_calls'."),
        ([42], "message 0 is 42"),
    ]:
        with pytest.raises(ValueError, match=match):
            render_chat(messages, tokenizer)


def test_tokenizer_without_role_tokens(old):
    assert template_of(old) is None
    with pytest.raises(ValueError, match="has no chat tokens .*manage.py add-chat-tokens"):
        render_chat([("user", "hi")], old)
    plain = render_plain(old, "Q: 2+2? A:", " 4")
    assert plain.ids == [old.sos_id, *old.encode("Q: 2+2? A:"), *old.encode(" 4"), old.eos_id]
    assert [i for i, t in enumerate(plain.targets) if t] == list(range(len(plain.ids) - len(old.encode(" 4")) - 1,
                                                                       len(plain.ids)))


def test_add_chat_tokens_to_an_older_tokenizer(tokenizer, old, tmp_path):
    assert len(old) == 497 and template_of(old) is None
    (tmp_path / "old.model").write_bytes(old.model_proto)
    made = make_chat_tokenizer(tmp_path / "old.model", tmp_path / "new.model")
    assert made.model_proto == tokenizer.model_proto  # the same bytes as the trainer makes: appended pieces
    assert made.content_hash != old.content_hash and made.path == str(tmp_path / "new.model")
    assert Tokenizer.load(tmp_path / "new.model").content_hash == made.content_hash
    assert template_of(tmp_path / "new.model").role_ids == {"system": 497, "user": 498, "assistant": 499}
    assert extends(made, old.content_hash) and extends(made, made.content_hash)
    assert not extends(made, "0" * 16) and not extends(old, made.content_hash) and not extends(made, None)
    assert hashlib.sha256(made.model_proto[:len(old.model_proto)]).hexdigest()[:16] == old.content_hash
    with pytest.raises(FileExistsError, match="refusing to overwrite"):
        make_chat_tokenizer(tmp_path / "old.model", tmp_path / "new.model")
    with pytest.raises(ValueError, match="already has .* it is a chat tokenizer as it is"):
        add_chat_tokens(made)
    with pytest.raises(ValueError, match="'<sos>' is already in the vocabulary"):
        old.with_control_tokens(["<sos>"])


def test_manage_add_chat_tokens(old, tmp_path, capsys):
    from xlabml.manage import main

    (tmp_path / "old.model").write_bytes(old.model_proto)
    main(["add-chat-tokens", str(tmp_path / "old.model"), str(tmp_path / "chat.model")])
    out = capsys.readouterr().out
    assert "500 tokens" in out and "assistant 499" in out and "data.num_tokens >= 500" in out
    with pytest.raises(SystemExit) as exit:
        main(["add-chat-tokens", str(tmp_path / "chat.model"), str(tmp_path / "again.model")])
    assert exit.value.code == 1
    assert "already has" in capsys.readouterr().err and not (tmp_path / "again.model").exists()


def test_template_of_a_checkpoint(tokenizer, old, tmp_path):
    from interop_support import make_checkpoint

    (tmp_path / "old.model").write_bytes(old.model_proto)
    chat_ckpt, _ = make_checkpoint(tmp_path / "chat.ckpt", tokenizer.path)
    plain_ckpt, _ = make_checkpoint(tmp_path / "plain.ckpt", tmp_path / "old.model")
    assert template_of(chat_ckpt).role_ids["assistant"] == 499
    assert template_of(str(plain_ckpt)) is None
    # a base model (trained on text) has role tokens it never learned: it is prompted with plain text
    assert chat_template(chat_ckpt) is None and chat_template(str(plain_ckpt)) is None

    class Loaded:  # what xlabml.checkpoints.load_checkpoint returns holds the tokenizer
        def __init__(self, tokenizer):
            self.tokenizer = tokenizer

    assert template_of(Loaded(tokenizer)).tokenizer is tokenizer and template_of(Loaded(None)) is None


def test_base_model_weights_carry_over_to_the_chat_vocabulary(old, tmp_path):
    from interop_support import make_checkpoint

    (tmp_path / "old.model").write_bytes(old.model_proto)
    ckpt, base = make_checkpoint(tmp_path / "base.ckpt", tmp_path / "old.model", n_vocab=497)
    model = XLabModel(n_vocab=500, max_len=64, d_model=32, n_layers=2, n_heads=4, d_ff=64, dropout=0.0)
    copied = load_initial_weights(model, ckpt)
    assert "embedding.weight" in copied and "head.weight" in copied
    for name in ("embedding.weight", "head.weight", "head.bias"):
        source, target = base.model.state_dict()[name], model.model.state_dict()[name]
        assert torch.equal(target[:497], source)
        assert torch.allclose(target[497:], source.mean(dim=0).expand_as(target[497:]), atol=1e-6)
    for name, weights in base.model.state_dict().items():
        if name not in ("embedding.weight", "head.weight", "head.bias"):
            assert torch.equal(model.model.state_dict()[name], weights), name
    ids = torch.tensor([[1, 5, 9, 200]])  # the base's ids mean the same: the same logits for them
    with torch.no_grad():
        assert torch.allclose(model.eval()(ids)[..., :497], base.eval()(ids), atol=1e-5)
    smaller = XLabModel(n_vocab=400, max_len=64, d_model=32, n_layers=2, n_heads=4, d_ff=64, dropout=0.0)
    with pytest.raises(ValueError, match=r"embedding.weight has shape \(497, 32\) .* but \(400, 32\)"):
        load_initial_weights(smaller, ckpt)
    larger = XLabModel(n_vocab=504, max_len=64, d_model=32, n_layers=2, n_heads=4, d_ff=64, dropout=0.0)
    with pytest.raises(ValueError, match=r"embedding.weight has shape \(497, 32\) .* but \(504, 32\)"):
        load_initial_weights(larger, ckpt)  # more rows than the chat tokens: another tokenizer
    wider = XLabModel(n_vocab=500, max_len=64, d_model=48, n_layers=2, n_heads=4, d_ff=64, dropout=0.0)
    with pytest.raises(ValueError, match="has shape"):
        load_initial_weights(wider, ckpt)


def test_role_tokens_constant():
    assert ROLE_TOKENS == {"system": "<|system|>", "user": "<|user|>", "assistant": "<|assistant|>"}
