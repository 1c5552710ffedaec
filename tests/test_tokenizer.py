import pickle

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from xlabml.corpus import iter_builtin_texts
from xlabml.tokenizer import (_ESCAPE_TABLE, CHAT_TOKENS, ESCAPE, META, Tokenizer, TokenizerTrainer, escape,
                              split_text, unescape)

E, M = ESCAPE, META

# Text that makes the trainer merge the meta symbol's and the escape character's escaped forms into pieces.
SPECIAL_TEXT = (f"a{M}b {M}{M} {M}{M}{M} x{E}y {E}{E} {E}u {E}{E}u {M} tab\there\r\n" * 200)

TARGETED = [
    "", " ", "  ", "   ", " a", "a ", " a  b ", "\t", "\t\t x\t", "\n", "\n\n", "\r", "\r\n", "a\rb",
    "\x00", "a\x00b", "\x00\x00", "".join(map(chr, range(32))) + "\x7f\x85\xa0",
    M, M * 2, M * 3, M * 7, f" {M} ", f"{M} {M}", f"a{M}b",
    E, E * 2, E * 3, E * 5, E + "u", E * 2 + "u", E * 3 + "u", E + "uu", (E + "u") * 3, E + M, M + E, "u" + E,
    f"{E}{E}{M}{M}{E}u", "<U-2581>", "<U-2581><U-2581>", "\\u2581",
    "<unk>", "<sos>", "<eos>", "<pad>", "<0x41>", " \u2047 ",
    "😀", "👩\u200d👩\u200d👧", "🇺🇳", "中文字符，测试。", "日本語のテキスト", "한국어",
    "e\u0301", "\u0301", "A\u030a\u0323", "\ufeff", "\ufffd", "\ufffe\uffff", "\U0010ffff", "\U000e0001",
    "\u3000", "\u200b", "\u2028\u2029", "\uff21", "ﬁ", "  leading and trailing  ", "line one\nline two\n",
    "def f(x):\n    return x  # comment\n", "x" * 10_000, ("word " * 3000).strip(),
]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    texts = [SPECIAL_TEXT, *list(iter_builtin_texts("python-topics"))[:20]]
    path = tmp_path_factory.mktemp("tok") / "tokenizer.model"
    tokenizer = TokenizerTrainer({"num_threads": 2}).train(iter(texts), 700, path)
    tokenizer.num_threads = 2  # batch encode/decode threads
    return tokenizer


def test_special_pieces_get_merged(tokenizer):
    # The escaped forms are real vocabulary pieces, so the tests below exercise merged pieces, not only bytes.
    assert E in tokenizer and E + E in tokenizer and f" {E}{E}".replace(" ", M) in tokenizer
    assert tokenizer.tokenize(M) == [E, "u"]
    assert tokenizer.tokenize(E * 4 + "u") == [E + E] * 4 + ["u"]  # each E escapes to EE


@pytest.mark.parametrize("text", TARGETED, ids=range(len(TARGETED)))
def test_round_trip_targeted(tokenizer, text):
    ids = tokenizer.encode(text)
    assert tokenizer.unk_id not in ids
    assert tokenizer.decode(ids) == text


@settings(max_examples=2000, deadline=None)
@given(st.text(st.characters(blacklist_categories=("Cs",))))
def test_round_trip_all_unicode(tokenizer, text):
    assert tokenizer.decode(tokenizer.encode(text)) == text


@settings(max_examples=500, deadline=None)
@given(st.text(st.sampled_from([E, M, "u", " ", "\t", "\n", "\r", "\x00", "a", "\u2047", "é"]), max_size=40))
def test_round_trip_special_runs(tokenizer, text):
    assert tokenizer.decode(tokenizer.encode(text)) == text


@settings(max_examples=1000, deadline=None)
@given(st.text(st.sampled_from([E, M, "u", "x"])))
def test_escape_is_a_bijection(text):
    escaped = escape(text)
    assert M not in escaped
    assert unescape(escaped) == text
    assert escaped == "".join(escape(c) for c in text) == text.translate(_ESCAPE_TABLE)  # per character


def test_escaped_forms():
    assert escape(M) == E + "u"
    assert escape(E) == E + E
    assert escape(E + "u") == E + E + "u"
    assert unescape(E + E + "u") == E + "u"
    assert unescape(E + E + E + "u") == E + M
    assert escape("plain text") == "plain text"
    assert unescape(E) == E and unescape(E + "x") == E + "x"  # dangling escapes (sampled ids) stay as they are


def test_special_token_ids(tokenizer):
    names = [tokenizer.unk_token, tokenizer.sos_token, tokenizer.eos_token, tokenizer.pad_token]
    assert names == ["<unk>", "<sos>", "<eos>", "<pad>"]
    assert [tokenizer[n] for n in names] == [0, 1, 2, 3]
    assert [tokenizer.get_token(i) for i in range(4)] == names
    assert tokenizer.decode([0, 1, 2, 3]) == ""
    assert tokenizer.decode([1] + tokenizer.encode("hi there") + [2, 3, 3]) == "hi there"
    assert len(tokenizer) == 700
    with pytest.raises(KeyError, match="not-a-piece"):
        tokenizer["not-a-piece"]
    with pytest.raises(IndexError, match="700"):
        tokenizer.get_token(700)
    with pytest.raises(IndexError, match="-1"):
        tokenizer.decode([5, -1])


def test_batch_equals_single(tokenizer):
    texts = TARGETED[:60] + list(iter_builtin_texts("python-topics"))[:20]
    batch = tokenizer.encode(texts)
    assert batch == [tokenizer.encode(t) for t in texts]
    assert tokenizer.encode(tuple(texts)) == batch
    assert tokenizer.decode(batch) == texts
    assert tokenizer.decode([tuple(ids) for ids in batch]) == texts
    assert tokenizer.encode([]) == [] and tokenizer.decode([]) == ""


def test_tokenize_matches_encode(tokenizer):
    text = f"Hello  world {M}{E}\n"
    pieces = tokenizer.tokenize(text)
    assert [tokenizer[p] for p in pieces] == tokenizer.encode(text)
    assert "".join(pieces).replace(M, " ") == escape(text.replace(" ", "\0")).replace("\0", " ")


def test_load_save_pickle(tokenizer, tmp_path):
    loaded = Tokenizer.load(tokenizer.path)
    assert loaded.path == tokenizer.path
    with open(tokenizer.path, "rb") as f:
        assert loaded.model_proto == tokenizer.model_proto == f.read()
    from_bytes = Tokenizer.load(tokenizer.model_proto)
    assert from_bytes.path is None
    clone = pickle.loads(pickle.dumps(tokenizer))
    text = f"pickle {M} me"
    assert loaded.encode(text) == from_bytes.encode(text) == clone.encode(text) == tokenizer.encode(text)
    assert pickle.dumps(tokenizer) == pickle.dumps(clone)  # stable bytes, for datasets' fingerprints
    assert tokenizer.num_threads == 2 and clone.num_threads == 2  # the fixture set it; kept when pickled
    assert from_bytes.num_threads >= 1 and pickle.loads(pickle.dumps(from_bytes))._num_threads is None


def test_refuses_to_overwrite(tmp_path):
    path = tmp_path / "existing.model"
    path.write_bytes(b"keep me")
    with pytest.raises(FileExistsError, match="existing.model"):
        TokenizerTrainer().train(["some text"] * 10, 300, path)
    assert path.read_bytes() == b"keep me"


def test_missing_and_corrupt_files(tokenizer, tmp_path):
    missing = tmp_path / "missing.model"
    with pytest.raises(FileNotFoundError, match="missing.model"):
        Tokenizer.load(missing)
    for name, content in [("garbage.model", b"not a model"), ("truncated.model", tokenizer.model_proto[:500]),
                          ("empty.model", b"")]:
        path = tmp_path / name
        path.write_bytes(content)
        with pytest.raises(ValueError, match=name):
            Tokenizer.load(path)


def test_vocabulary_the_corpus_cannot_fill(tmp_path):
    with pytest.raises(ValueError, match="num_tokens=5000 is more than the training texts can fill"):
        TokenizerTrainer().train(["tiny corpus", "tiny text"], 5000, tmp_path / "a.model")
    with pytest.raises(ValueError, match="num_tokens=100 is too small"):
        TokenizerTrainer().train(["tiny corpus"], 100, tmp_path / "b.model")
    with pytest.raises(ValueError, match="no training texts"):
        TokenizerTrainer().train([], 300, tmp_path / "c.model")
    assert not any(tmp_path.iterdir())  # nothing saved on failure


def test_train_args_checked_and_passed_through(tmp_path):
    with pytest.raises(ValueError, match="pad_id"):
        TokenizerTrainer({"pad_id": 7})
    with pytest.raises(ValueError, match="vocab_size"):
        TokenizerTrainer({"vocab_size": 7})
    texts = list(iter_builtin_texts("python-topics"))[:3]
    tok = TokenizerTrainer({"max_sentencepiece_length": 2}).train(texts, 400, tmp_path / "a.model")
    assert max(len(tok.get_token(i)) for i in range(260, len(tok) - len(CHAT_TOKENS))) == 2


def test_long_line_is_split_not_dropped(tmp_path):
    # One line of 12,000 bytes without whitespace, far above max_sentence_length (4192): SentencePiece alone
    # would skip it. Its characters and merges are learned only if the trainer saw it.
    long_line = "ψω" * 3000
    texts = ["short text", long_line, *list(iter_builtin_texts("python-topics"))[:3]]
    assert not any("ψ" in t for t in texts[2:])
    tok = TokenizerTrainer().train(texts, 400, tmp_path / "long.model")
    assert "ψ" in tok and "ω" in tok and "ψω" in tok
    assert len(tok.encode("ψωψωψωψω")) <= 4
    assert tok.decode(tok.encode(long_line)) == long_line


def test_split_text():
    text = ("alpha beta\ngamma " * 500) + "ü€😀" * 300
    pieces = list(split_text(text, 100))
    assert "".join(pieces) == text
    assert all(0 < len(p.encode()) <= 100 for p in pieces)
    assert pieces[0].endswith("\n")  # newline preferred
    no_newline = list(split_text("word " * 100, 64))
    assert "".join(no_newline) == "word " * 100 and all(p.startswith(" ") for p in no_newline[1:])
    assert list(split_text("short", 100)) == ["short"]
    assert list(split_text("😀" * 50, 6)) == ["😀"] * 50  # hard cuts only between characters
    with pytest.raises(ValueError, match="max_bytes"):
        list(split_text("abc", 3))


def test_char_model(tmp_path):
    text = "hello world\n" * 20
    tok = TokenizerTrainer({"model_type": "char"}).train([text], 1000, tmp_path / "char.model")
    # num_tokens is an upper bound for char models: 4 special + 256 bytes + the distinct characters + 3 chat tokens.
    assert len(tok) == 4 + 256 + len(set(text)) + len(CHAT_TOKENS)
    assert tok.encode("hello") == [tok[c] for c in "hello"]
    for s in ["hello world", f"unseen {M}{E} 漢字 \x00", ""]:
        assert tok.decode(tok.encode(s)) == s


def test_trainer_is_fed_sentence_sized_pieces():
    # SentencePiece counts input_sentence_size in the strings it is given: whole documents would make it a
    # count of documents. Every piece is at most SENTENCE_BYTES long and the pieces rebuild each text.
    texts = [("A sentence about tokenizers. " * 40 + "\n") * 5, f"short {M} one", "", "x" * 2000]
    stats = {"texts": 0}
    pieces = list(TokenizerTrainer._sentences(texts, 4192, stats))
    assert stats["texts"] == 4 and all(0 < len(p.encode()) <= TokenizerTrainer.SENTENCE_BYTES for p in pieces)
    assert "".join(pieces) == "".join(escape(t) for t in texts)
    assert pieces[1].startswith(" ") and pieces[0].endswith("about")  # cut before a space, not inside a word
