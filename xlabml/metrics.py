"""Tokenizer-independent metrics: bits per byte.

A loss per token depends on the tokenizer (a larger vocabulary packs more text into a token); the loss per byte of
text does not, so models with different tokenizers compare on ``bpb = (summed NLL in nats / ln 2) / bytes``, the
bytes being those of the UTF-8 text the scored targets decode to. ``token_bytes`` gives each id's share of those
bytes once per tokenizer, so a batch's byte count is one gather and a sum (``target_bytes``).
"""
from __future__ import annotations

import math

import torch

from xlabml.tokenizer import META, unescape


def token_bytes(tokenizer, n_vocab: int | None = None) -> torch.Tensor:
    """UTF-8 bytes each id adds to decoded text: LongTensor (n_vocab,), default ``len(tokenizer)`` rows (rows past
    the tokenizer, which a model may have, count 0).

    Special tokens decode to nothing (0), byte pieces ``<0xNN>`` to one byte, other pieces to their text with
    SentencePiece's ``▁`` as a space and XLab's escaped pairs undone. For every text without U+E000 and U+2581 the
    sum over ``encode(text)`` is exactly ``len(text.encode())``; with them it is exact where each escaped pair
    (``U+E000 u`` for U+2581, ``U+E000 U+E000`` for U+E000) lies inside one piece, and 1 or 3 bytes more per pair
    split across two pieces.
    """
    sp = tokenizer._sp
    n = len(tokenizer)
    sizes = torch.zeros(max(n, n_vocab or 0), dtype=torch.long)
    for i in range(n):
        if sp.is_control(i) or sp.is_unknown(i) or sp.is_unused(i):
            continue
        if sp.is_byte(i):
            sizes[i] = 1
            continue
        piece = sp.id_to_piece(i).replace(META, " ")
        sizes[i] = len(unescape(piece).encode("utf-8"))
    return sizes


def target_bytes(targets: torch.Tensor, sizes: torch.Tensor, ignore_index: int | None = None) -> torch.Tensor:
    """Bytes of text the targets (any shape) decode to, skipping ``ignore_index``: a 0-dim LongTensor on their
    device (no host sync)."""
    valid = targets != ignore_index if ignore_index is not None else torch.ones_like(targets, dtype=torch.bool)
    sizes = sizes.to(targets.device)
    return sizes[targets.clamp(min=0, max=sizes.numel() - 1)].masked_fill(~valid, 0).sum()


def bits_per_byte(summed_nll: float | torch.Tensor, n_bytes: int | torch.Tensor) -> float:
    """Bits per byte from a summed negative log-likelihood in nats and the bytes it covers."""
    n_bytes = float(n_bytes)
    if n_bytes <= 0:
        raise ValueError(f"bits_per_byte over {n_bytes} bytes; expected a positive byte count")
    return float(summed_nll) / math.log(2) / n_bytes
