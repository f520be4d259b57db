"""Per-tier statistics and the interface the scheduler sees. No torch."""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

from kvmesh.hashing import BlockKey

LOAD_BUCKETS_S = (0.0001, 0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0)


@dataclass
class TierStats:
    """Cumulative counters for one tier (mutated on the engine thread only)."""

    name: str
    capacity_bytes: int = 0
    used_bytes: int = 0
    num_blocks: int = 0
    hit_blocks: int = 0
    miss_blocks: int = 0
    hit_tokens: int = 0
    miss_tokens: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    evictions: int = 0
    checksum_failures: int = 0
    write_errors: int = 0
    dropped_writes: int = 0
    is_disabled: bool = False
    load_bucket_counts: list[int] = field(default_factory=lambda: [0] * len(LOAD_BUCKETS_S))
    load_count: int = 0
    load_sum_s: float = 0.0

    def observe_load(self, seconds: float) -> None:
        i = bisect.bisect_left(LOAD_BUCKETS_S, seconds)
        if i < len(self.load_bucket_counts):
            self.load_bucket_counts[i] += 1
        self.load_count += 1
        self.load_sum_s += seconds


class ExternalCache(Protocol):
    """What the scheduler may ask of the tiers below the device (host staging area).

    All calls are cheap index lookups made on the engine thread.
    """

    def num_ready(self, keys: Sequence[BlockKey]) -> int:
        """How many leading `keys` sit in host memory, ready to copy to the device."""
        ...

    def is_loading(self, keys: Sequence[BlockKey]) -> bool:
        """Whether a prefetch for one of the leading `keys` is still in flight."""
        ...

    def pin(self, keys: Sequence[BlockKey]) -> None:
        """Keep these host blocks until they are loaded (they are about to be copied)."""
        ...

    def prefetch(self, keys: Sequence[BlockKey]) -> int:
        """Start async reads for leading keys found only on disk; returns how many."""
        ...
