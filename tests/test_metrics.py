"""Bits per byte: token_bytes counts exactly the UTF-8 bytes of the decoded targets."""
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from interop_support import train_tokenizer

from xlabml.metrics import bits_per_byte, target_bytes, token_bytes
from xlabml.tokenizer import ESCAPE, META


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return train_tokenizer(tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="module")
def sizes(tokenizer):
    return token_bytes(tokenizer, n_vocab=len(tokenizer) + 5)


@settings(max_examples=500, deadline=None)
@given(st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters=[ESCAPE, META])))
def test_bytes_of_the_tokens_are_the_bytes_of_the_text(tokenizer, sizes, text):
    ids = torch.tensor(tokenizer.encode(text), dtype=torch.long)
    assert int(sizes[ids].sum()) == len(text.encode("utf-8"))


def test_specials_count_nothing_and_escaped_pairs_count_their_character(tokenizer, sizes):
    assert sizes[:4].tolist() == [0, 0, 0, 0] and sizes[len(tokenizer):].tolist() == [0] * 5
    assert set(sizes[4:260].tolist()) == {1}  # byte pieces
    for text in (ESCAPE * 2, META + "x", f"a{ESCAPE}u"):
        ids = tokenizer.encode(text)
        assert int(sizes[ids].sum()) >= len(text.encode("utf-8"))


def test_bits_per_byte_of_a_batch(tokenizer, sizes):
    texts = ["def f(x):\n    return x\n", "print('hi')"]
    rows = [tokenizer.encode(t) + [tokenizer.eos_id] for t in texts]
    width = max(map(len, rows))
    targets = torch.full((2, width), tokenizer.pad_id)
    for i, row in enumerate(rows):
        targets[i, :len(row)] = torch.tensor(row)
    n_bytes = target_bytes(targets, sizes, ignore_index=tokenizer.pad_id)
    assert int(n_bytes) == sum(len(t.encode()) for t in texts)  # <eos> and pads add none
    assert bits_per_byte(torch.tensor(100.0), n_bytes) == pytest.approx(100 / math.log(2) / int(n_bytes))
    with pytest.raises(ValueError, match="over 0.0 bytes"):
        bits_per_byte(1.0, 0)
