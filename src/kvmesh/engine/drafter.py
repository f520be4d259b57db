"""Prompt-lookup (n-gram) drafting for speculative decoding. Pure: no torch.

A sequence's draft is what followed the most recent earlier occurrence of its last n
tokens (the longest n that occurred), up to k tokens. The index is kept per sequence and
grows with it: O(max_n) work per new token, a dict lookup per draft.
"""

from __future__ import annotations

from collections.abc import Sequence


class NgramIndex:
    """Where each n-gram (1 <= n <= max_n) of a sequence last ended, the sequence's own
    final n-grams excluded (they are what is looked up)."""

    def __init__(self, max_n: int = 3, min_n: int = 1):
        if not 1 <= min_n <= max_n:
            raise ValueError(f"need 1 <= min_n <= max_n, got {min_n}, {max_n}")
        self.max_n, self.min_n = max_n, min_n
        self._ends: dict[tuple[int, ...], int] = {}
        self._indexed = 0  # n-grams ending at positions < this are in the index

    def _catch_up(self, tokens: Sequence[int]) -> None:
        last = len(tokens) - 1  # the final position stays out: it is the query
        for end in range(max(self._indexed, 1), last + 1):
            for n in range(1, min(self.max_n, end) + 1):
                self._ends[tuple(tokens[end - n:end])] = end
        self._indexed = max(self._indexed, last + 1)

    def propose(self, tokens: Sequence[int], k: int) -> list[int]:
        """Up to `k` tokens that followed the longest earlier match of the sequence's end."""
        if k <= 0 or len(tokens) < 2:
            return []
        self._catch_up(tokens)
        for n in range(min(self.max_n, len(tokens) - 1), self.min_n - 1, -1):
            end = self._ends.get(tuple(tokens[len(tokens) - n:]))
            if end is not None:
                return list(tokens[end:end + k])
        return []
