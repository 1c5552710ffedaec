"""xlabml.serve.text and .chat: streamed text is whole characters that add up to the full text, stop strings
are cut across token boundaries and never sent, and chats render to the documented plain-text prompt."""
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from xlabml.serve.chat import FALLBACK_STOP, render_chat
from xlabml.serve.text import UNSETTLED, TextStream
from xlabml.tokenizer import ESCAPE, META, TokenizerTrainer

# characters the tokenizer never saw become UTF-8 byte tokens; ESCAPE and META exercise the escape layer
ALPHABET = "ab cd\n" + "é€日本🙂" + ESCAPE + META + "u"


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    texts = ["abc dab cab\nabba cd dc", "aab bba cc dd a b c d"] * 20
    return TokenizerTrainer().train(texts, 280, tmp_path_factory.mktemp("text") / "tok.model")


def stream(tokenizer, ids, stop=(), strip=False, eos=False):
    """The deltas a choice sends for `ids`, as the engine feeds them, and the TextStream."""
    text = TextStream(tokenizer, stop, strip)
    deltas = []
    for i in ids:
        deltas.append(text.add(i))
        if text.stopped:
            break
    deltas.append(text.finish())
    return [d for d in deltas if d], text


def reference(tokenizer, ids, stop=(), strip=False):
    """The text of the shortest prefix of `ids` whose settled text (all of it for all the ids; else without a
    trailing replacement character or escape, which the next id may change) holds a stop string, cut before it;
    with no stop string, all of it. Returns (text, tokens used, stopped)."""
    for k in range(1, len(ids) + 1):
        text = tokenizer.decode(ids[:k])
        text = text if k == len(ids) else text.rstrip(UNSETTLED)
        found = [text.find(s) for s in stop if s in text]
        if found:
            text = text[:min(found)]
            return (text.strip() if strip else text), k, True
    text = tokenizer.decode(ids)
    return (text.strip() if strip else text), len(ids), False


def test_byte_tokens_are_held_until_their_character_is_whole(tokenizer):
    ids = tokenizer.encode("a€b🙂")
    assert len(ids) > 6  # € and 🙂 are byte tokens: 3 and 4 of them
    deltas, text = stream(tokenizer, ids)
    assert deltas == ["a", "€", "b", "🙂"]
    assert text.text == "a€b🙂" and not text.stopped


def test_an_incomplete_character_at_the_end_is_sent_as_decoded(tokenizer):
    ids = tokenizer.encode("a€")[:-1]  # the last byte of € never comes
    deltas, _ = stream(tokenizer, ids)
    assert "".join(deltas) == tokenizer.decode(ids) and deltas[0] == "a"


def test_stop_string_across_tokens_is_cut_and_never_sent(tokenizer):
    ids = tokenizer.encode("abc dab cab")
    deltas, text = stream(tokenizer, ids, stop=["b c"])
    assert "".join(deltas) == "abc dab cab"[:"abc dab cab".index("b c")] == "abc da"
    assert text.stopped and all("b c" not in d for d in deltas)
    assert len(text.ids) == reference(tokenizer, ids, ["b c"])[1] < len(ids)  # generation stops right there


def test_strip_drops_whitespace_at_both_ends_only(tokenizer):
    ids = tokenizer.encode("  \n ab  cd \n\n")
    deltas, _ = stream(tokenizer, ids, strip=True)
    assert "".join(deltas) == "ab  cd"
    # a stop string that starts with whitespace still ends the text when the reply starts with it
    deltas, text = stream(tokenizer, tokenizer.encode("\nUser: ab"), stop=FALLBACK_STOP, strip=True)
    assert deltas == [] and text.stopped


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_streamed_text_is_the_reference(tokenizer, data):
    """For any text (token ids from encoding it, or any ids at all) and any stop strings: the deltas add up to
    the reference text, none contains a stop string, none ends inside a character that the full text
    completes, and exactly the tokens up to the stop string are used."""
    if data.draw(st.booleans()):
        ids = tokenizer.encode(data.draw(st.text(ALPHABET, max_size=30)))
    else:
        ids = data.draw(st.lists(st.integers(4, len(tokenizer) - 1), max_size=30))
    stop = data.draw(st.lists(st.text(ALPHABET, min_size=1, max_size=3), max_size=3))
    strip = data.draw(st.booleans())
    deltas, text = stream(tokenizer, ids, stop, strip)
    expected, used, stopped = reference(tokenizer, ids, stop, strip)
    assert "".join(deltas) == expected
    assert text.stopped == stopped and len(text.ids) == used
    sent = ""
    for delta in deltas:
        assert not any(s in delta for s in stop)
        sent += delta
        assert expected.startswith(sent)
    assert not (stopped and strip) or expected == expected.strip()


def test_empty_stop_string_is_refused(tokenizer):
    with pytest.raises(ValueError, match="empty stop string"):
        TextStream(tokenizer, ["a", ""])


def test_chat_fallback_renders_the_documented_prompt(tokenizer):
    messages = [("system", "be brief"), ("user", "ab"), ("assistant", "cd"), ("developer", "d"), ("user", "a b")]
    chat = render_chat(messages, tokenizer)
    text = "System: be brief\n\nUser: ab\n\nAssistant: cd\n\nSystem: d\n\nUser: a b\n\nAssistant:"
    assert chat.ids == [tokenizer[tokenizer.sos_token]] + tokenizer.encode(text)
    assert chat.stop == list(FALLBACK_STOP) and chat.strip
