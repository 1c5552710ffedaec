"""A choice's text as its tokens come: what may be sent now, and where it ends.

Decoding a growing id sequence can end inside a character (a byte-fallback piece of a UTF-8 sequence not yet
complete, or the tokenizer's escape character before what it escapes): such a tail is held back until the
next token settles it, so every piece sent is valid text and the pieces add up to the whole. Stop strings are
looked for in the settled text, across token boundaries; a tail that could still grow into one is held back
too, and a stop string found ends the text before it: it is never sent.
"""
from __future__ import annotations

from collections.abc import Sequence

from xlabml.tokenizer import ESCAPE

UNSETTLED = "\ufffd" + ESCAPE  # a trailing replacement character or escape may change with the next token


class TextStream:
    """The text of one choice, fed one generated token at a time.

    Args:
        tokenizer: the model's ``Tokenizer``.
        stop: strings that end the text (not included in it); empty strings are not allowed.
        strip: drop whitespace at both ends of the text (a chat reply after a plain "Assistant:" prompt).

    ``add(token)`` returns the text that may be sent now; ``finish()`` the rest once generation ended.
    ``stopped`` becomes True when a stop string was found (the caller then ends the generation), and
    ``text`` is everything sent so far.
    """

    def __init__(self, tokenizer, stop: Sequence[str] = (), strip: bool = False):
        if any(not s for s in stop):
            raise ValueError("empty stop string; expected non-empty strings")
        self.tokenizer, self.stop, self.strip = tokenizer, tuple(stop), strip
        self.ids: list[int] = []
        self.text = ""  # sent so far
        self.stopped = False

    def add(self, token: int) -> str:
        """Appends a generated token (not <eos>); returns the newly settled text (maybe '')."""
        if self.stopped:
            raise RuntimeError("TextStream.add after a stop string ended the text")
        self.ids.append(token)
        return self._advance(final=False)

    def finish(self) -> str:
        """Generation ended (length, <eos>, or a stop string): returns the text not sent yet."""
        return "" if self.stopped else self._advance(final=True)

    def _advance(self, final: bool) -> str:
        text = self.tokenizer.decode(self.ids)
        if not final:
            text = text.rstrip(UNSETTLED)
        found = [i for i in (text.find(s) for s in self.stop) if i >= 0]
        if found:  # the earliest one ends the text; none starts in text already sent (a tail that could was held)
            text, self.stopped = text[:min(found)], True
        elif not final:  # a tail that may yet grow into a stop string waits for the next token
            text = text[:len(text) - max((_overlap(text, s) for s in self.stop), default=0)]
        if self.strip:  # trailing whitespace waits too: more text may follow it, or the end drops it
            text = text.strip()
        if len(text) <= len(self.text) or not text.startswith(self.text):
            return ""
        delta = text[len(self.text):]
        self.text = text
        return delta


def _overlap(text: str, stop: str) -> int:
    """The length of the longest end of `text` that begins `stop` (shorter than all of it)."""
    for n in range(min(len(stop) - 1, len(text)), 0, -1):
        if text.endswith(stop[:n]):
            return n
    return 0
