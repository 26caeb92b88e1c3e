"""Decoded text as tokens arrive: incremental detokenization and stop strings.

Tokens are decoded as a whole each time (a byte-level BPE token can be half of a UTF-8
character, and SentencePiece spacing depends on neighbours), and only the settled part is
released: never a trailing replacement character (an unfinished character) and never a tail
that could still become a stop string. What the caller streams is therefore exactly the final
text, piece by piece.
"""

from __future__ import annotations


def _decoder(tokenizer):
    """ids -> text, special tokens skipped, exactly as `tokenizer.decode(ids, skip_special_tokens=True)`.

    A fast tokenizer without the clean-up pass decodes through its Rust backend directly:
    transformers' `decode` first converts the ids to Python objects one by one, which cost more
    than the decoding itself (about 4x, once per row per decode step).
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None and not getattr(tokenizer, "clean_up_tokenization_spaces", True):
        return lambda ids: backend.decode(ids, skip_special_tokens=True)
    return lambda ids: tokenizer.decode(ids, skip_special_tokens=True)


class TextTracker:
    """One row's generated text. `add(token)` returns the newly settled text."""

    def __init__(self, tokenizer, stop: tuple[str, ...] = ()):
        self._decode = _decoder(tokenizer)
        self._stop = stop
        self._ids: list[int] = []
        self._released = 0           # characters of the text already returned
        self.text = ""               # the text so far (cut before a stop string once one is found)
        self.stopped = False         # a stop string was found; the text ends before it

    def add(self, token_id: int) -> str:
        self._ids.append(token_id)
        text = self._decode(self._ids)
        start = max(0, self._released - max((len(s) for s in self._stop), default=0))
        hits = [i for i in (text.find(s, start) for s in self._stop) if i >= 0]
        if hits:
            self.text, self.stopped = text[:min(hits)], True
            return self._release(len(self.text))
        self.text = text
        settled = len(text)
        while settled > self._released and text[settled - 1] == "\ufffd":
            settled -= 1  # an unfinished UTF-8 sequence: wait for its next bytes
        settled -= self._stop_prefix_length(text[:settled])
        return self._release(settled)

    def finish(self) -> str:
        """Everything not yet released (the text is final: no more tokens will come)."""
        return self._release(len(self.text))

    def _stop_prefix_length(self, text: str) -> int:
        """Length of the longest end of `text` that begins some stop string."""
        longest = 0
        for stop in self._stop:
            for n in range(min(len(stop) - 1, len(text)), longest, -1):
                if text.endswith(stop[:n]):
                    longest = n
                    break
        return longest

    def _release(self, end: int) -> str:
        end = max(end, self._released)
        piece, self._released = self.text[self._released:end], end
        return piece
