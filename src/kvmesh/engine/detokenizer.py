"""Incremental detokenization with stop strings, for one output sequence.

Text is emitted only once it is stable: a token that ends inside a multi-byte character
waits for the next one, and while stop strings are set, the last few characters that could
still start a stop string are held back. Concatenated deltas always equal the final text.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol


class Decoder(Protocol):
    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str: ...


class IncrementalDetokenizer:
    def __init__(
        self,
        tokenizer: Decoder,
        stop: Sequence[str],
        include_stop: bool,
        context_ids: Sequence[int] = (),
    ):
        self.tokenizer = tokenizer
        self.stop = tuple(stop)
        self.include_stop = include_stop
        self.hold = max((len(s) for s in self.stop), default=1) - 1
        self.ids: list[int] = list(context_ids[-6:])
        self.prefix_offset = 0
        self.read_offset = len(self.ids)
        self.text = ""
        self.emitted = 0

    def _advance(self, token_id: int) -> None:
        self.ids.append(token_id)
        prefix = self.tokenizer.decode(self.ids[self.prefix_offset : self.read_offset])
        full = self.tokenizer.decode(self.ids[self.prefix_offset :])
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            self.text += full[len(prefix) :]
            self.prefix_offset = self.read_offset
            self.read_offset = len(self.ids)

    def _find_stop(self, searched_from: int) -> str | None:
        best: tuple[int, str] | None = None
        for s in self.stop:
            at = self.text.find(s, max(0, searched_from - len(s) + 1))
            if at >= 0 and (best is None or at < best[0]):
                best = (at, s)
        if best is None:
            return None
        at, s = best
        self.text = self.text[: at + len(s)] if self.include_stop else self.text[:at]
        return s

    def add(self, token_id: int) -> tuple[str, str | None]:
        """Feed one token. Returns (new stable text, the stop string hit or None)."""
        before = len(self.text)
        self._advance(token_id)
        hit = self._find_stop(before) if self.stop else None
        return self._emit(final=hit is not None), hit

    def _emit(self, final: bool) -> str:
        limit = len(self.text) if final else max(self.emitted, len(self.text) - self.hold)
        out = self.text[self.emitted : limit]
        self.emitted = limit
        return out

    def flush(self) -> str:
        """The held-back tail, once the sequence has finished."""
        return self._emit(final=True)
