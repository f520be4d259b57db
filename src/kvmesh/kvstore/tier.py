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


@dataclass(frozen=True)
class PrefixMatch:
    """Where the blocks of a prefix that the device lacks can come from, and how soon.

    `origins[i]` names the tier that holds block i ("host", or a source such as "disk");
    the match stops at the first block no tier holds. The first `num_ready` blocks sit in
    host memory now and can be copied to the device this step.
    """

    origins: tuple[str, ...] = ()
    num_ready: int = 0
    next_in_flight: bool = False  # the first block not ready was already being fetched
    num_started: int = 0  # fetches this lookup started
    eta_s: float = 0.0  # estimated time until every matched block is in host memory

    @property
    def num_blocks(self) -> int:
        return len(self.origins)


class Fetch(Protocol):
    """An asynchronous read (a concurrent.futures.Future fits): bytes, or None if lost.
    `result()` is only asked once `done()`: the store never waits on a read."""

    def done(self) -> bool: ...
    def result(self, timeout: float | None = None) -> bytes | None: ...


class Source(Protocol):
    """A place below host memory that blocks can be fetched from: the disk tier; a peer
    next. The store asks it by key, starts reads, and lands the bytes in host memory."""

    name: str
    writable: bool  # takes blocks spilled from host memory
    lands_in_place: bool  # reads with `read_into`: bytes written straight into host memory
    stats: TierStats

    @property
    def is_enabled(self) -> bool: ...
    def __contains__(self, key: object) -> bool: ...
    def read(self, key: BlockKey) -> Fetch: ...
    def read_into(self, key: BlockKey, into: object) -> Fetch:
        """A read that may write the block into `into` (a reserved host slot's writable
        bytes). It resolves to `into` itself (written in place), to other bytes (the store
        copies them in) or to None; once resolved, it never writes into `into` again."""
        ...
    def submit(self) -> None:
        """Send the reads started since the last call (a source that batches holds them
        until now, so one prefix goes out as one request)."""
        ...
    def write(self, key: BlockKey, payload: bytes) -> None: ...
    def poll(self) -> None: ...
    def drain(self, timeout: float = 30.0) -> None: ...
    def close(self) -> None: ...
    def check_integrity(self) -> None: ...


class ExternalCache(Protocol):
    """What the KV cache manager asks of the tiers below the device (engine thread)."""

    def lookup(self, keys: Sequence[BlockKey], fetch: bool = True,
               hold_head: bool = True) -> PrefixMatch:
        """Match the leading `keys` (one pass); with `fetch`, start reads for the blocks
        found only in a source, and hold the host-resident ones while they arrive (the
        leading ones only with `hold_head`)."""
        ...

    def pin(self, keys: Sequence[BlockKey]) -> None:
        """Keep these host blocks until they are loaded (they are about to be copied)."""
        ...
