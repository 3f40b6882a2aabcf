"""Incremental detokenization: token ids in, text pieces out, never half a character, never half a stop string.

Two things make streaming text harder than `decode(ids)` at the end:

1. **A token is not a character.** Byte-level BPE (GPT-2, SmolLM2, Phi-4) splits a multi-byte UTF-8 character
   across tokens, and decoding a lone piece gives U+FFFD; SentencePiece (Phi-3) drops the leading space of the
   first token of whatever it decodes. Both are handled by decoding a small *window* of recent tokens twice:

       prefix = decode(ids[prefix_offset:read_offset])      text already emitted from that window
       full   = decode(ids[prefix_offset:])                 the same window plus the new tokens
       new    = full[len(prefix):]                          unless `full` ends in U+FFFD (a character in flight)

   Both decodes start at the same token, so whatever the decoder does at a window's start cancels out; once a
   piece is complete the window slides forward, keeping each step O(window) instead of O(sequence).

2. **A stop string can arrive in pieces** ("<|" then "end|>", or "\n\nUser" over three tokens). Text that could
   still be the beginning of a stop string is held back; when a stop string completes, the text is cut exactly
   where it starts and nothing of it is ever emitted. A held-back tail is released as soon as it stops matching.

The concatenation of all pieces returned by `push` and `finish` is exactly `text`; special tokens are skipped.
"""
from __future__ import annotations

from typing import Protocol, Sequence

REPLACEMENT = "\ufffd"


class _Decoder(Protocol):
    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str: ...


class IncrementalDetokenizer:
    """Text of one generated sequence, released piece by piece.

    push(token_id) -> str: the text that became safe to show (often "").
    finish() -> str: the rest (held-back characters and stop-string prefixes that never completed).
    `stopped` turns True when a stop string completes; `text` is then cut right before it.
    """

    def __init__(self, tokenizer: _Decoder, stop: Sequence[str] = ()) -> None:
        self.tokenizer = tokenizer
        self.stop = [s for s in stop if s]
        self.ids: list[int] = []
        self.prefix_offset = 0      # window start: first token whose text is re-decoded each step
        self.read_offset = 0        # tokens before this are already turned into self.text
        self.text = ""              # decoded so far (complete characters only, cut at a stop string)
        self.emitted = 0            # characters of self.text handed out
        self.stopped = False

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def push(self, token_id: int) -> str:
        if self.stopped:
            return ""
        self.ids.append(int(token_id))
        window = self.ids[self.prefix_offset:]
        prefix = self._decode(window[: self.read_offset - self.prefix_offset])
        full = self._decode(window)
        if len(full) > len(prefix) and not full.endswith(REPLACEMENT):
            self.text += full[len(prefix):]
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        return self._release(final=False)

    def finish(self) -> str:
        """Flush: decode any tokens still in flight (a truncated character stays U+FFFD) and release the rest."""
        if not self.stopped and self.read_offset < len(self.ids):
            window = self.ids[self.prefix_offset:]
            prefix = self._decode(window[: self.read_offset - self.prefix_offset])
            self.text += self._decode(window)[len(prefix):]
            self.read_offset = len(self.ids)
        return self._release(final=True)

    def _release(self, final: bool) -> str:
        if self.stopped:
            return ""
        end = len(self.text)
        if self.stop:
            # A match cannot start before `emitted`: any earlier start would have been held back (see below).
            hits = [i for i in (self.text.find(s, self.emitted) for s in self.stop) if i >= 0]
            if hits:
                cut = min(hits)
                self.text, self.stopped = self.text[:cut], True
                piece, self.emitted = self.text[self.emitted:], cut
                return piece
            if not final:
                end -= self._held_back()
        piece, self.emitted = self.text[self.emitted:end], max(self.emitted, end)
        return piece

    def _held_back(self) -> int:
        """Length of the longest unemitted suffix of `text` that is a proper prefix of some stop string."""
        tail = self.text[self.emitted:]
        best = 0
        for s in self.stop:
            for k in range(min(len(s) - 1, len(tail)), best, -1):
                if tail.endswith(s[:k]):
                    best = k
                    break
        return best
