"""A perfectly reversible SentencePiece BPE tokenizer: ``decode(encode(s)) == s`` for every ``str``.

SentencePiece with byte fallback, identity normalization and no whitespace collapsing or dummy prefix already
round-trips every string except one whose text contains its meta symbol ``▁`` (U+2581): it uses ``▁`` for the
space, so a literal ``▁`` comes back as a space. Tested here over all of Unicode: spaces (leading, trailing,
repeated), tabs, newlines, ``\\r``, NUL and other control characters, emoji, CJK, combining marks, private-use
and non-characters, the empty string. Characters outside the vocabulary become byte tokens, so ``<unk>`` is never
produced.

The tokenizer therefore escapes text before SentencePiece sees it, with an escape character ``ESCAPE`` (U+E000, a
private-use character) and the per-character substitution

    ESCAPE -> ESCAPE ESCAPE        ▁ -> ESCAPE "u"        any other character -> itself

and unescapes decoded text with one left-to-right scan that replaces ``ESCAPE ESCAPE`` by ``ESCAPE`` and
``ESCAPE "u"`` by ``▁``. The substitution maps characters to a prefix code (no image is a prefix of another, and
both two-character images start with ESCAPE, which no other image does), so the left-to-right scan parses an
escaped string back into exactly the images it was made of: unescape(escape(s)) == s for every s. Escaped text
never contains ``▁``, which SentencePiece then round-trips. Text without ``ESCAPE`` and ``▁`` (nearly all real
text) skips both steps; for an ASCII string the check costs O(1) in CPython.

The escaped forms are visible in ``tokenize`` (pieces) and in the vocabulary, never in ``decode``'s output.
Decoding an arbitrary id sequence (a sampled continuation) leaves a dangling ``ESCAPE`` as it is.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import struct
from collections.abc import Iterable, Iterator, Sequence

import sentencepiece as spm

from xlabml.atomic import write_atomic

__all__ = ["Tokenizer", "TokenizerTrainer", "escape", "unescape", "split_text", "ESCAPE", "META", "CHAT_TOKENS"]

ESCAPE = "\ue000"
META = "\u2581"  # SentencePiece's whitespace meta symbol
_ESCAPE_TABLE = {ord(ESCAPE): ESCAPE + ESCAPE, ord(META): ESCAPE + "u"}
_UNESCAPE_TABLE = {ESCAPE + ESCAPE: ESCAPE, ESCAPE + "u": META}
_UNESCAPE_RE = re.compile(f"{ESCAPE}[{ESCAPE}u]")

_SPECIAL_TOKENS = ("<unk>", "<sos>", "<eos>", "<pad>")  # at ids 0, 1, 2, 3
# The chat template's role tokens (xlabml.chat): control tokens at the end of every trained vocabulary
CHAT_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>")


def escape(text: str) -> str:
    """Map ``text`` to a string without ``▁`` (see the module docstring); the identity on most text."""
    if ESCAPE in text or META in text:
        return _substitute(text)
    return text


def _substitute(text: str) -> str:
    # Equal to text.translate(_ESCAPE_TABLE), the per-character substitution, and 15x faster: the first replace
    # doubles every ESCAPE and leaves other characters alone; the second then maps every ▁ (all of them
    # original, the first step makes none) and adds ESCAPEs only as images of ▁.
    return text.replace(ESCAPE, ESCAPE + ESCAPE).replace(META, ESCAPE + "u")


def unescape(text: str) -> str:
    """Inverse of ``escape``: one left-to-right scan."""
    if ESCAPE in text:
        return _UNESCAPE_RE.sub(lambda m: _UNESCAPE_TABLE[m.group()], text)
    return text


# The batch forms inline the checks: this per-line Python work is all the escaping layer costs on real text,
# two O(1) checks on an ASCII line (bench/tokenizer.py measures it).
def _escape_batch(texts: Iterable[str]) -> list[str]:
    return [_substitute(t) if (ESCAPE in t or META in t) else t for t in texts]


def _unescape_batch(texts: Iterable[str]) -> list[str]:
    return [unescape(t) if ESCAPE in t else t for t in texts]


def _default_num_threads() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


class Tokenizer:
    """A trained tokenizer. Build it with ``Tokenizer.load`` or ``TokenizerTrainer.train``.

    Special tokens have fixed ids: ``<unk>`` 0, ``<sos>`` 1, ``<eos>`` 2, ``<pad>`` 3; all four decode to ''.
    A tokenizer trained by ``TokenizerTrainer`` ends with the chat template's role tokens ``CHAT_TOKENS`` (control
    tokens: never produced by ``encode``, decoded to ''; see ``xlabml.chat``); an older one gets them appended by
    ``xlabml.chat.add_chat_tokens``.

    Attributes:
        path: the model file it was loaded from or saved to (None when loaded from bytes).
        model_proto: the serialized SentencePiece model (bytes); ``content_hash`` is its identity.
        num_threads: threads used by the batch ``encode``/``decode`` (default, or set to None: the CPUs this
            process may use).
    """

    unk_token = "<unk>"
    sos_token = "<sos>"
    eos_token = "<eos>"
    pad_token = "<pad>"
    unk_id, sos_id, eos_id, pad_id = 0, 1, 2, 3

    def __init__(self, model_proto: bytes, path: str | None = None, num_threads: int | None = None):
        self.path = None if path is None else os.fspath(path)
        self.model_proto = bytes(model_proto)
        self.num_threads = num_threads
        where = self.path if self.path is not None else "the given bytes"
        self._sp = spm.SentencePieceProcessor()
        try:
            self._sp.LoadFromSerializedProto(self.model_proto)
        except Exception as e:  # noqa: BLE001 - the binding raises RuntimeError/OSError for a bad proto
            raise ValueError(f"{where} is not a valid SentencePiece model file ({e})") from None
        found = tuple(self._sp.id_to_piece(i) for i in range(min(4, self._sp.get_piece_size())))
        if found != _SPECIAL_TOKENS:
            raise ValueError(f"{where} is not an XLab tokenizer: ids 0-3 hold {list(found)}, "
                             f"expected {list(_SPECIAL_TOKENS)}")

    @classmethod
    def load(cls, path_or_bytes: str | os.PathLike | bytes, num_threads: int | None = None) -> Tokenizer:
        """Load a tokenizer from a model file path or from the model's bytes.

        Raises:
            FileNotFoundError: the path does not exist.
            ValueError: the file is not a SentencePiece model with XLab's special tokens (names the path).
        """
        if isinstance(path_or_bytes, (bytes, bytearray, memoryview)):
            return cls(bytes(path_or_bytes), num_threads=num_threads)
        path = os.fspath(path_or_bytes)
        try:
            with open(path, "rb") as f:
                proto = f.read()
        except FileNotFoundError:
            raise FileNotFoundError(f"tokenizer model file not found: {path}") from None
        except IsADirectoryError:
            raise ValueError(f"tokenizer model path is a directory, expected a file: {path}") from None
        return cls(proto, path=path, num_threads=num_threads)

    @property
    def content_hash(self) -> str:
        """16 hex digits of the SHA-256 of the model file's bytes: the tokenizer's identity, recorded in every
        checkpoint and export and checked wherever a model meets a tokenizer, and part of the data cache's key.
        Two files with the same content have the same hash wherever they are; a retrained tokenizer of the same
        size does not."""
        return hashlib.sha256(self.model_proto).hexdigest()[:16]

    @property
    def num_threads(self) -> int:
        return _default_num_threads() if self._num_threads is None else self._num_threads

    @num_threads.setter
    def num_threads(self, value: int | None) -> None:
        self._num_threads = None if value is None else int(value)

    def encode(self, text: str | Sequence[str]) -> list[int] | list[list[int]]:
        """Token ids of one text, or of each text in a list (multi-threaded, ``num_threads``)."""
        if isinstance(text, str):
            return self._sp.encode(escape(text))
        return self._sp.encode(_escape_batch(text), num_threads=self.num_threads)

    def decode(self, ids: Sequence[int] | Sequence[Sequence[int]]) -> str | list[str]:
        """Text of one id sequence, or of each sequence in a list (multi-threaded). Special ids decode to ''.
        Accepts lists, tuples, and arrays/tensors (via ``tolist``)."""
        if hasattr(ids, "tolist"):
            ids = ids.tolist()
        if len(ids) and not isinstance(ids[0], int) and isinstance(ids[0], Sequence | Iterable):
            batch = ids if isinstance(ids, list) and isinstance(ids[0], list) else [
                i.tolist() if hasattr(i, "tolist") else list(i) for i in ids]
            try:
                texts = self._sp.decode(batch, num_threads=self.num_threads)
            except IndexError:
                self._check_ids([i for seq in batch for i in seq])
                raise
            except TypeError:  # e.g. a list of tuples or arrays among lists
                batch = [i.tolist() if hasattr(i, "tolist") else list(i) for i in ids]
                texts = self._sp.decode(batch, num_threads=self.num_threads)
            return _unescape_batch(texts)
        ids = list(ids)
        try:
            return unescape(self._sp.decode(ids))
        except IndexError:
            self._check_ids(ids)
            raise

    def with_control_tokens(self, names: Sequence[str]) -> Tokenizer:
        """A new tokenizer: this one with control tokens ``names`` appended, at ids ``len(self)``, ``len(self) + 1``,
        ... (every existing id keeps its meaning, so a model trained with this tokenizer keeps working).

        A control token is never produced by ``encode`` (text that spells its name is encoded as text, so
        ``decode(encode(s)) == s`` still holds for every string and ``encode`` gives the same ids as before) and
        decodes to ''; only code that inserts its id explicitly (a chat template) puts it in a sequence. The new
        model file is this one's bytes followed by the new pieces (appending to a protobuf's repeated field), so
        its ``content_hash`` differs and ``model_proto.startswith(self.model_proto)``. The result has no
        ``path``: save it with ``save``.

        Raises:
            ValueError: a name is empty, repeated, or already a piece of the vocabulary.
        """
        names = list(names)
        for name in names:
            if not isinstance(name, str) or not name:
                raise ValueError(f"control token name {name!r}: expected a non-empty string")
            if name in self:
                raise ValueError(f"control token {name!r} is already in the vocabulary (id {self[name]})")
        if len(set(names)) != len(names):
            raise ValueError(f"control token names {names} repeat a name")
        return Tokenizer(self.model_proto + b"".join(map(_control_piece, names)), num_threads=self._num_threads)

    def save(self, path: str | os.PathLike) -> None:
        """Write the model file to ``path`` atomically (never overwriting) and make it this tokenizer's ``path``.

        Raises:
            FileExistsError: ``path`` exists.
        """
        path = os.fspath(path)
        if os.path.lexists(path):
            raise FileExistsError(f"tokenizer file already exists, refusing to overwrite it: {path}")
        write_atomic(path, self.model_proto)
        self.path = path

    def tokenize(self, text: str) -> list[str]:
        """The pieces ``encode`` would give, as strings (in escaped form: a space shows as ``▁``)."""
        return self._sp.encode(escape(text), out_type=str)

    def __getitem__(self, token: str) -> int:
        """Id of a vocabulary piece, e.g. ``tokenizer[tokenizer.eos_token]``; KeyError if it is not one."""
        index = self._sp.piece_to_id(token)
        if index == self.unk_id and token != self.unk_token:
            raise KeyError(f"{token!r} is not in the vocabulary")
        return index

    def __contains__(self, token: str) -> bool:
        return self._sp.piece_to_id(token) != self.unk_id or token == self.unk_token

    def get_token(self, index: int) -> str:
        """The vocabulary piece with id ``index``."""
        self._check_ids([index])
        return self._sp.id_to_piece(index)

    def __len__(self) -> int:
        return self._sp.get_piece_size()

    def _check_ids(self, ids: Iterable[int]) -> None:
        n = len(self)
        for i in ids:
            if not 0 <= i < n:
                raise IndexError(f"token id {i} is out of range: expected 0 <= id < {n}")

    # Pickle the model bytes, not the processor: datamodule workers and datasets' fingerprinting pickle the
    # tokenizer, and the bytes make a stable hash (the thread count only when set, not the machine's CPU count).
    def __getstate__(self) -> dict:
        return {"model_proto": self.model_proto, "path": self.path, "num_threads": self._num_threads}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["model_proto"], path=state["path"], num_threads=state["num_threads"])

    def __repr__(self) -> str:
        return f"Tokenizer(path={self.path!r}, num_tokens={len(self)})"


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _control_piece(name: str) -> bytes:
    """The protobuf record of one more ``ModelProto.pieces`` entry: a CONTROL piece (type 3) of score 0.

    Fields of ``SentencePiece``: piece (1, string), score (2, float), type (3, enum); the record is field 1 of
    ``ModelProto``. Parsers append a repeated field's records in the order read, wherever they are in the bytes.
    """
    data = name.encode("utf-8")
    body = b"\x0a" + _varint(len(data)) + data + b"\x15" + struct.pack("<f", 0.0) + b"\x18" + _varint(3)
    return b"\x0a" + _varint(len(body)) + body


class TokenizerTrainer:
    """Trains a reversible SentencePiece tokenizer.

    Args:
        train_args: SentencePiece trainer options (see ``spm_train --help``) applied on top of ``DEFAULT_ARGS``,
            e.g. ``{"model_type": "char"}``, ``{"character_coverage": 1.0}``, ``{"num_threads": 4}``,
            ``{"input_sentence_size": 1_000_000}`` (sample that many sentences from a large corpus: a sentence
            is one of the pieces of at most ``SENTENCE_BYTES`` that ``train`` cuts the texts into).
            The special-token options, ``vocab_size`` and the input/output options are owned by ``train`` and
            cannot be set here. Changing ``byte_fallback``, the normalization or the whitespace options gives up
            the round-trip guarantee.

    SentencePiece keeps every sentence it is given in memory (its training grows by 3 to 5 bytes per byte fed,
    bench/tokenizer_memory.py) and skips sentences longer than ``max_sentence_length``: what it is fed must be
    bounded by the caller (``XLabDataModule`` feeds a sample of ``tokenizer_sample_bytes``), and ``train`` cuts
    it into sentence-sized pieces.

    With ``model_type: char`` the vocabulary holds the special tokens, the 256 byte tokens and the corpus'
    most frequent characters, and ``num_tokens`` is an upper bound: a corpus with fewer distinct characters
    gives a smaller vocabulary (``len(tokenizer)``); a model sized by ``num_tokens`` just has unused rows.

    The last ids of every trained vocabulary are the chat template's role tokens (``CHAT_TOKENS``, control
    tokens), so a model pretrained with it can be instruction-tuned without changing its vocabulary; SentencePiece
    learns ``num_tokens - len(CHAT_TOKENS)`` pieces.
    """

    DEFAULT_ARGS = {
        "model_type": "bpe",
        "byte_fallback": True,  # any character outside the vocabulary becomes byte tokens: no <unk>
        "normalization_rule_name": "identity",
        "remove_extra_whitespaces": False,
        "add_dummy_prefix": False,
        "split_by_whitespace": True,  # pieces do not cross spaces (they may end with a newline)
        "allow_whitespace_only_pieces": True,  # runs of spaces (code indentation) become single pieces
        "max_sentence_length": 4192,  # bytes; longer texts are split by `train` (SENTENCE_BYTES), not dropped
        "minloglevel": 2,  # quiet: errors still raise
    }
    SENTENCE_BYTES = 512  # the longest piece of text given to SentencePiece as one "sentence"
    _OWNED_ARGS = frozenset({
        "vocab_size", "input", "input_format", "model_prefix", "model_writer", "sentence_iterator",
        "sentence_reader", "unk_id", "bos_id", "eos_id", "pad_id", "unk_piece", "bos_piece", "eos_piece",
        "pad_piece", "unk_surface", "control_symbols",
    })

    def __init__(self, train_args: dict | None = None):
        train_args = dict(train_args or {})
        owned = sorted(set(train_args) & self._OWNED_ARGS)
        if owned:
            raise ValueError(f"train_args may not set {owned}: the trainer fixes the vocabulary size (num_tokens), "
                             f"the input/output and the special tokens (ids 0-3: {list(_SPECIAL_TOKENS)})")
        self.train_args = train_args

    def train(self, texts: Iterable[str], num_tokens: int, save_path: str | os.PathLike) -> Tokenizer:
        """Train on ``texts`` (streamed once, e.g. a generator over a dataset) and save the model to ``save_path``.

        Texts are fed as pieces of at most ``SENTENCE_BYTES`` bytes, split preferably after a newline or before a space,
        so SentencePiece sees every character. Newlines inside a text are kept (they become tokens).

        Returns:
            the trained Tokenizer (its ``path`` is ``save_path``), ``CHAT_TOKENS`` at its last ids.
        Raises:
            FileExistsError: ``save_path`` exists (nothing is overwritten).
            ValueError: ``num_tokens`` is too small for the special, byte and required character tokens, or more
                than the texts can fill, or the texts are empty.
        """
        save_path = os.fspath(save_path)
        if os.path.exists(save_path):
            raise FileExistsError(f"tokenizer file already exists, refusing to overwrite it: {save_path}")
        reserved = len(_SPECIAL_TOKENS) + len(CHAT_TOKENS)
        if isinstance(num_tokens, bool) or not isinstance(num_tokens, int) or num_tokens <= reserved:
            raise ValueError(f"num_tokens must be an int > {reserved} (the special and chat tokens), got {num_tokens!r}")
        args = {**self.DEFAULT_ARGS, "num_threads": _default_num_threads(), **self.train_args}
        max_bytes = int(args["max_sentence_length"])
        stats = {"texts": 0}
        writer = io.BytesIO()
        try:
            spm.SentencePieceTrainer.train(
                sentence_iterator=self._sentences(texts, max_bytes, stats),
                model_writer=writer,
                vocab_size=num_tokens - len(CHAT_TOKENS),
                unk_id=0, bos_id=1, eos_id=2, pad_id=3,
                unk_piece=_SPECIAL_TOKENS[0], bos_piece=_SPECIAL_TOKENS[1],
                eos_piece=_SPECIAL_TOKENS[2], pad_piece=_SPECIAL_TOKENS[3],
                unk_surface="",
                **args,
            )
        except RuntimeError as e:
            raise self._explain(e, num_tokens, stats) from None
        tokenizer = Tokenizer(writer.getvalue()).with_control_tokens(CHAT_TOKENS)
        write_atomic(save_path, tokenizer.model_proto)  # complete or absent, never overwriting one made meanwhile
        tokenizer.path = save_path
        return tokenizer

    @classmethod
    def _sentences(cls, texts: Iterable[str], max_bytes: int, stats: dict) -> Iterator[str]:
        # Sentence-sized pieces, not whole documents: SentencePiece's sentence count (input_sentence_size) then
        # counts about as much text as its name says, and the learned vocabulary is the same (bench figures).
        max_bytes = min(max_bytes, cls.SENTENCE_BYTES)
        for text in texts:
            if not isinstance(text, str):
                raise TypeError(f"training texts must be str, got {type(text).__name__}")
            stats["texts"] += 1
            if text:
                yield from split_text(escape(text), max_bytes)

    @staticmethod
    def _explain(error: RuntimeError, num_tokens: int, stats: dict) -> Exception:
        message = str(error)
        if stats["texts"] == 0:
            return ValueError("no training texts: the iterable of texts was empty")
        if "Vocabulary size too high" in message:
            bound = re.search(r"<= (\d+)", message)
            limit = f" (at most {int(bound.group(1)) + len(CHAT_TOKENS)})" if bound else ""
            return ValueError(f"num_tokens={num_tokens} is more than the training texts can fill{limit}: "
                              f"use a smaller vocabulary or more text [SentencePiece: {message}]")
        if "Vocabulary size is smaller than required_chars" in message:
            return ValueError(f"num_tokens={num_tokens} is too small: it must hold the 4 special tokens, the 256 "
                              f"byte tokens, the required characters and the {len(CHAT_TOKENS)} chat tokens "
                              f"[SentencePiece: {message}]")
        return ValueError(f"tokenizer training failed: {message}")


def split_text(text: str, max_bytes: int) -> Iterator[str]:
    """Split ``text`` into pieces of at most ``max_bytes`` UTF-8 bytes whose concatenation is ``text``.

    A piece ends after the last newline, else before the last space, found in the second half of its window;
    otherwise at the last character boundary that fits.
    """
    if max_bytes < 4:
        raise ValueError(f"max_bytes must be >= 4 (the longest UTF-8 character), got {max_bytes}")
    if len(text) * 4 <= max_bytes:  # cheap: a character takes at most 4 bytes
        yield text
        return
    data = text.encode("utf-8")
    start, end = 0, len(data)
    while end - start > max_bytes:
        cut = start + max_bytes
        while data[cut] & 0xC0 == 0x80:  # never cut inside a character
            cut -= 1
        half = start + max_bytes // 2
        newline = data.rfind(b"\n", half, cut)
        space = data.rfind(b" ", half, cut)
        if newline >= 0:
            cut = newline + 1
        elif space > half:
            cut = space
        yield data[start:cut].decode("utf-8")
        start = cut
    if start < end:
        yield data[start:].decode("utf-8")
