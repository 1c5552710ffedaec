"""The XLab tokenizer as a Hugging Face ``tokenizers`` pipeline (``tokenizer.json``): same ids, same text.

XLab's tokenizer is SentencePiece BPE (byte fallback, identity normalization, no dummy prefix) behind a reversible
escaping layer (``xlabml.tokenizer``: ``ESCAPE`` -> ``ESCAPE ESCAPE``, ``▁`` -> ``ESCAPE u``). The pipeline
reproduces both halves with stock components, so any tool that reads ``tokenizer.json`` (transformers, vLLM,
TGI) needs no custom code:

- normalizer: ``Replace(E, EE)``, ``Replace(▁, Eu)`` (the escaping; run in this order they are the
  per-character substitution, as in ``xlabml.tokenizer._substitute``), then ``Replace(" ", ▁)`` (SentencePiece's
  whitespace symbol);
- model: BPE over the whole text (SentencePiece does not split it either), the merges of every vocabulary piece in
  score order, byte fallback to the ``<0xNN>`` pieces;
- decoder: ``ByteFallback``, ``Fuse`` (one string), then four replacements that undo both layers. In the fused
  string of a real encoding there is no space (SentencePiece wrote ``▁``) and every ``E`` starts a pair ``EE`` or
  ``Eu``. ``Replace(EE, "E ")`` pairs the escape characters left to right as ``unescape``'s scan does, marking a
  literal ``E`` with the (free) space after it; ``Replace(▁, " ")`` restores the spaces, which cannot create a new
  ``"E "`` because no ``E`` is followed by ``▁``; ``Replace(Eu, ▁)`` restores the meta symbols (every remaining
  ``E`` starts a pair, so ``Eu`` matches only real pairs); ``Replace("E ", E)`` drops the markers.

``<sos>`` is prepended by the post-processor (``add_special_tokens=True``, as ``xlab-infer`` does), ``<sos>``,
``<eos>``, ``<pad>`` and ``<unk>`` are the special tokens and decode to nothing with ``skip_special_tokens=True``
(XLab decodes them to ''), and text such as ``"<eos>"`` is encoded as text (``split_special_tokens``), never as
the special id (a raw ``tokenizers.Tokenizer`` needs ``encode_special_tokens = True`` for that, which
``tokenizer.json`` cannot store). Two differences remain, both on id sequences no text encodes to (a sampled
continuation may be one): a run of byte pieces that is not valid UTF-8 decodes to one U+FFFD per byte of the whole
run (``tokenizers``' ``ByteFallback``), where XLab replaces only the invalid bytes; and an ``E`` that starts no pair,
directly before a space, is dropped (XLab keeps it).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from xlabml.tokenizer import ESCAPE as E
from xlabml.tokenizer import META, Tokenizer

from . import require

SPECIAL_TOKENS = {"unk_token": "<unk>", "bos_token": "<sos>", "eos_token": "<eos>", "pad_token": "<pad>"}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model")


def vocabulary(tokenizer: Tokenizer) -> tuple[list[str], list[float], list[str]]:
    """Pieces, scores and kinds (``normal``, ``byte``, ``control``, ``unknown``, ``unused``) by id."""
    sp = tokenizer._sp
    pieces, scores, kinds = [], [], []
    for i in range(len(tokenizer)):
        pieces.append(sp.id_to_piece(i))
        scores.append(sp.get_score(i))
        kinds.append("unknown" if sp.is_unknown(i) else "control" if sp.is_control(i) else "byte" if sp.is_byte(i)
                     else "unused" if sp.is_unused(i) else "normal")
    return pieces, scores, kinds


def _merges(pieces: list[str], scores: list[float], kinds: list[str]) -> list[tuple[str, str]]:
    """BPE merges equivalent to SentencePiece's encoding: every split of every normal piece into two normal pieces,
    ranked by the merged piece's score (SentencePiece merges the best-scoring adjacent pair first)."""
    normal = {p: i for i, (p, k) in enumerate(zip(pieces, kinds)) if k == "normal"}
    ranked = sorted((i for i, k in enumerate(kinds) if k == "normal" and len(pieces[i]) > 1),
                    key=lambda i: (-scores[i], i))
    merges = []
    for i in ranked:
        piece = pieces[i]
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in normal and right in normal:
                merges.append((left, right))
    return merges


def build(tokenizer: Tokenizer):
    """The ``tokenizers.Tokenizer`` giving the same ids as ``tokenizer.encode`` and, skipping special tokens, the
    same text as ``tokenizer.decode`` (see the module docstring)."""
    tk = require("tokenizers", "hf")
    from tokenizers import AddedToken, decoders, models, normalizers, processors

    pieces, scores, kinds = vocabulary(tokenizer)
    vocab = {piece: i for i, piece in enumerate(pieces)}
    if len(vocab) != len(pieces):
        raise ValueError(f"tokenizer {tokenizer.path} has repeated pieces; it cannot be exported")
    model = models.BPE(vocab=vocab, merges=_merges(pieces, scores, kinds), unk_token=tokenizer.unk_token,
                       byte_fallback=True, fuse_unk=False)
    hf = tk.Tokenizer(model)
    hf.normalizer = normalizers.Sequence([
        normalizers.Replace(E, E + E), normalizers.Replace(META, E + "u"), normalizers.Replace(" ", META)])
    hf.decoder = decoders.Sequence([
        decoders.ByteFallback(), decoders.Fuse(), decoders.Replace(E + E, E + " "), decoders.Replace(META, " "),
        decoders.Replace(E + "u", META), decoders.Replace(E + " ", E)])
    sos = tokenizer.sos_token
    hf.post_processor = processors.TemplateProcessing(
        single=f"{sos} $A", pair=f"{sos} $A $B", special_tokens=[(sos, tokenizer.sos_id)])
    hf.add_special_tokens([AddedToken(p, special=True, normalized=False)
                           for p, k in zip(pieces, kinds) if k in ("control", "unknown")])
    return hf


def save(tokenizer: Tokenizer, directory: str | os.PathLike, model_max_length: int | None = None) -> None:
    """Write the files ``AutoTokenizer.from_pretrained(directory)`` loads (``tokenizer.json``,
    ``tokenizer_config.json``, ``special_tokens_map.json``) plus the SentencePiece model itself
    (``tokenizer.model``, for tools that read SentencePiece, and to re-import the tokenizer)."""
    directory = Path(directory)
    build(tokenizer).save(str(directory / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **SPECIAL_TOKENS,
        "add_bos_token": True,
        "add_eos_token": False,
        "split_special_tokens": True,  # "<eos>" in a text is text, as for XLab's tokenizer
        "clean_up_tokenization_spaces": False,
        "model_input_names": ["input_ids", "attention_mask"],
        "xlab_tokenizer_hash": tokenizer.content_hash,
    }
    if model_max_length is not None:
        config["model_max_length"] = model_max_length
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    (directory / "special_tokens_map.json").write_text(json.dumps(SPECIAL_TOKENS, indent=2) + "\n")
    (directory / "tokenizer.model").write_bytes(tokenizer.model_proto)


def find_xlab_tokenizer(directory: str | os.PathLike) -> Tokenizer | None:
    """The XLab tokenizer saved in a Hugging Face directory (its ``tokenizer.model``), or None when there is none or
    it is another kind of SentencePiece model (e.g. Llama's, whose ids 0-3 are not XLab's special tokens)."""
    path = Path(directory) / "tokenizer.model"
    if not path.is_file():
        return None
    try:
        return Tokenizer.load(path)
    except ValueError:
        return None
