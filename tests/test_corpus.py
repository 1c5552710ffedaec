import hashlib
import socket

import pytest

from xlabml.corpus import BUILTIN_CORPORA, iter_builtin_texts, load_builtin_corpus


def _digest(texts):
    h = hashlib.sha256()
    for text in texts:
        h.update(text.encode("utf-8", "surrogatepass"))
        h.update(b"\0")
    return h.hexdigest()


@pytest.fixture(scope="module")
def docs():
    return list(iter_builtin_texts("python-docs"))


def test_registry_names():
    assert set(BUILTIN_CORPORA) == {"python-docs", "python-topics"}


def test_topics_are_the_bundled_pydoc_topics():
    from pydoc_data.topics import topics

    texts = list(iter_builtin_texts("python-topics"))
    assert len(texts) == len(topics) >= 70
    assert texts == [topics[k] for k in sorted(topics)]
    assert sum(map(len, texts)) > 400_000


def test_python_docs_size_and_content(docs):
    n_topics = len(list(iter_builtin_texts("python-topics")))
    assert docs[:n_topics] == list(iter_builtin_texts("python-topics"))
    modules = [d.split("\n", 1)[0] for d in docs[n_topics:]]
    assert len(modules) > 200
    for name in ["Module json", "Module collections", "Module os", "Module re", "Module email.message"]:
        assert name in modules
    assert not any(m.startswith(("Module this", "Module antigravity", "Module tkinter", "Module idlelib"))
                   for m in modules)
    assert all(d.strip() for d in docs)  # one non-empty document per row
    assert sum(map(len, docs)) > 1_500_000
    assert not any(" at 0x" in d for d in docs)  # no memory addresses leak into the text


def test_deterministic_across_runs(docs):
    # The docstrings come from a fresh isolated interpreter each call (new hash seed each time).
    assert _digest(iter_builtin_texts("python-docs")) == _digest(docs)


def test_unknown_name_lists_valid_names():
    with pytest.raises(ValueError, match=r"'nope'.*python-docs.*python-topics"):
        load_builtin_corpus("nope")
    with pytest.raises(ValueError, match="python-docs"):
        iter_builtin_texts("wikipedia")


def test_load_builtin_corpus_offline_and_cached(tmp_path, monkeypatch, docs):
    def no_network(*args, **kwargs):
        raise AssertionError("the built-in corpus must not touch the network")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    ds = load_builtin_corpus("python-docs", cache_dir=str(tmp_path))
    assert ds.column_names == ["text"]
    assert ds.num_rows == len(docs)
    assert ds["text"] == docs
    assert ds.cache_files and str(tmp_path) in ds.cache_files[0]["filename"]
    again = load_builtin_corpus("python-docs", cache_dir=str(tmp_path))
    assert again._fingerprint == ds._fingerprint
    assert again.cache_files == ds.cache_files
    topics = load_builtin_corpus("python-topics", cache_dir=str(tmp_path))
    assert topics.num_rows == len(list(iter_builtin_texts("python-topics")))
