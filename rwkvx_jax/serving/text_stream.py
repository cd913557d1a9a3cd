"""Generated tokens to text deltas, cut at the first stop string.

Text goes out as soon as it can no longer become part of a stop string: a tail that is a prefix
of some stop string is held back until the next token decides. The deltas of one request
concatenate to the text of all its tokens up to (not including) the first stop string.
"""

from __future__ import annotations

from collections.abc import Sequence

from rwkvx_jax.tokenizer import StreamingDecoder, Tokenizer


class TextStream:
    """One request's text.

    Example:
      stream = TextStream(tokenizer, stop=["\\n\\nUser:"])
      delta = stream.push(token)   # "" while held back; stream.stopped once a stop is seen
      rest = stream.finish()
    """

    def __init__(self, tokenizer: Tokenizer, stop: Sequence[str] = ()):
        self._decoder = StreamingDecoder(tokenizer)
        self._stop = [s for s in stop if s]
        self._pending = ""
        self.stopped = False
        self.tokens = 0

    def push(self, token: int) -> str:
        """The text this token releases; after a stop string, always ""."""
        if self.stopped:
            return ""
        self.tokens += 1
        self._pending += self._decoder.push(token)
        return self._release(final=False)

    def finish(self) -> str:
        """The held-back rest at the end of the request (nothing past a stop string)."""
        if self.stopped:
            return ""
        self._pending += self._decoder.flush()
        return self._release(final=True)

    def _release(self, final: bool) -> str:
        text = self._pending
        cuts = [i for i in (text.find(s) for s in self._stop) if i >= 0]
        if cuts:
            self.stopped = True
            self._pending = ""
            return text[: min(cuts)]
        keep = 0 if final else self._held_back(text)
        self._pending = text[len(text) - keep :] if keep else ""
        return text[: len(text) - keep]

    def _held_back(self, text: str) -> int:
        """Length of the longest tail of `text` that begins some stop string."""
        longest = 0
        for stop in self._stop:
            for size in range(min(len(stop) - 1, len(text)), longest, -1):
                if text.endswith(stop[:size]):
                    longest = size
                    break
        return longest
