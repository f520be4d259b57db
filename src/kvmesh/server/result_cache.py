"""A bounded cache of finished results for deterministic requests. Pure: no I/O.

A request is deterministic when it is greedy (temperature 0) or carries a seed: the same
prompt and parameters give the same tokens, so a repeat can be answered from the cache,
at once, with the very deltas the first answer streamed. The key holds everything that
shapes the answer: the tenant and cache salt (tenants never share entries), the endpoint,
the model name, every prompt's tokens and every sampling parameter, and the logprob and
tool settings. Entries are evicted least recently used, so the cache's byte estimate never
exceeds its bound; an entry larger than the whole bound is not kept.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable, Sequence
from dataclasses import dataclass

from kvmesh.types import RequestDelta

ENTRY_OVERHEAD = 256  # bytes counted per entry, beside its deltas
DELTA_OVERHEAD = 96  # bytes counted per delta


def delta_bytes(delta: RequestDelta) -> int:
    """The estimate of one delta's size that the bound is kept in."""
    size = DELTA_OVERHEAD + len(delta.new_text.encode()) + 8 * len(delta.new_token_ids)
    if delta.logprobs:
        size += sum(16 * len(entry) for entry in delta.logprobs)
    return size


@dataclass(frozen=True)
class CachedResult:
    """Each prompt's deltas, in the order they were streamed."""

    deltas: tuple[tuple[RequestDelta, ...], ...]
    num_bytes: int


def make_result(deltas: Sequence[Sequence[RequestDelta]]) -> CachedResult:
    frozen = tuple(tuple(d) for d in deltas)
    size = ENTRY_OVERHEAD + sum(delta_bytes(d) for ds in frozen for d in ds)
    return CachedResult(frozen, size)


class ResultCache:
    def __init__(self, capacity_bytes: int):
        if capacity_bytes < 0:
            raise ValueError(f"result cache bytes must be >= 0, got {capacity_bytes}")
        self.capacity_bytes = capacity_bytes
        self.num_bytes = 0
        self.hits = 0
        self.misses = 0
        self.evictions = 0
        self._entries: OrderedDict[Hashable, CachedResult] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: Hashable) -> CachedResult | None:
        entry = self._entries.get(key)
        if entry is None:
            self.misses += 1
            return None
        self._entries.move_to_end(key)
        self.hits += 1
        return entry

    def put(self, key: Hashable, result: CachedResult) -> bool:
        """Keep a result (replacing any under the key). False if it cannot fit at all."""
        old = self._entries.pop(key, None)
        if old is not None:
            self.num_bytes -= old.num_bytes
        if result.num_bytes > self.capacity_bytes:
            return False
        while self.num_bytes + result.num_bytes > self.capacity_bytes:
            _, evicted = self._entries.popitem(last=False)
            self.num_bytes -= evicted.num_bytes
            self.evictions += 1
        self._entries[key] = result
        self.num_bytes += result.num_bytes
        return True

    def check_integrity(self) -> None:
        total = sum(e.num_bytes for e in self._entries.values())
        assert total == self.num_bytes, f"byte count {self.num_bytes} != entries' {total}"
        assert self.num_bytes <= self.capacity_bytes, "over the byte bound"
        for entry in self._entries.values():
            assert entry.num_bytes == make_result(entry.deltas).num_bytes, "stale size"
