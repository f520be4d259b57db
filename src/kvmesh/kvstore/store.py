"""The tiered store below the device: host DRAM (the staging tier) over a list of sources.

Pure Python: no torch, no threads of its own. The host tier and every source own their
bytes; the store decides what moves where, on the engine thread, with an injected clock.

- `offload(key, block)`: a device block was evicted (write-back, the default) or was just
  computed (write-through). Its bytes go to host memory; a host eviction spills to the
  writable sources (the disk tier) in write-back mode; write-through writes them at once.
- `lookup(keys)`: one pass per request that matches a prefix across host memory and the
  sources (`PrefixMatch`), starts reads for what only a source holds, and holds the
  host-resident head while the tail arrives. Finished reads land in host memory in `poll()`.
- `load(key, dst)`: host -> device copy of a block the KV cache manager pinned.

A new source (a peer) plugs in with `add_source`, without changes here.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from kvmesh.config import TierConfig
from kvmesh.hashing import BlockKey
from kvmesh.kvstore.tier import Fetch, PrefixMatch, Source, TierStats

STAGE_TIMEOUT_S = 30.0
FETCH_TIMEOUT_S = 5.0  # a source silent this long: its pending reads are abandoned
READ_CAP_S = 30.0  # no read waits longer, even from a source that answers others
MAX_LOST = 1 << 16  # remembered lost blocks (a source that failed a read is not asked again)
HOST = "host"
SpillHook = Callable[[BlockKey, Callable[[], bytes | None]], None]


class StagingTier(Protocol):
    """Host memory as the store sees it (`HostTier`; a byte-less index in the simulator)."""

    stats: TierStats
    on_evict: SpillHook | None

    @property
    def num_slots(self) -> int: ...
    @property
    def num_pinned(self) -> int: ...
    @property
    def num_lent(self) -> int: ...
    def __contains__(self, key: object) -> bool: ...
    def put(self, key: BlockKey, data: Any, cost: float = 1.0) -> bool: ...
    def reserve(self) -> int | None: ...
    def landing(self, slot: int) -> Any: ...
    def commit(self, key: BlockKey, slot: int, data: Any = None, cost: float = 1.0) -> bool: ...
    def release(self, slot: int) -> None: ...
    def payload(self, key: BlockKey) -> bytes | None: ...
    def list_keys(self) -> list[BlockKey]: ...
    def copy_out(self, key: BlockKey, dst: Any) -> bool: ...
    def pin(self, key: BlockKey) -> None: ...
    def unpin(self, key: BlockKey) -> None: ...
    def check_integrity(self) -> None: ...


@dataclass(eq=False)
class _Read:
    """A read in flight: from `source`, since `start`; with `slot`, into that reserved host
    slot in place (through `into`, its landing buffer)."""

    fut: Fetch
    source: Source
    start: float
    slot: int | None = None
    into: Any = None


class TieredStore:
    def __init__(self, config: TierConfig, host: StagingTier, sources: Iterable[Source] = (),
                 tokens_per_block: int = 16, clock: Callable[[], float] = time.monotonic):
        self.config = config
        self.tokens_per_block = tokens_per_block
        self.clock = clock
        self.host = host
        host.on_evict = self._spill
        self.sources: list[Source] = list(sources)
        self._reads: dict[BlockKey, _Read] = {}
        # Abandoned in-place reads whose source may still write: slots freed once they end.
        self._orphans: list[_Read] = []
        self._origin: dict[BlockKey, str] = {}  # host blocks fetched from a source
        self._lost: dict[BlockKey, str] = {}  # key -> the source whose read failed or stalled
        self._progress: dict[str, float] = {}  # source -> when a read of it last completed
        # Blocks held for a waiting request stay pinned until it loads them (or for
        # STAGE_TIMEOUT_S, if it never does), so later reads cannot evict them first.
        self._staged: dict[BlockKey, float] = {}

    def add_source(self, source: Source) -> None:
        self.sources.append(source)

    @property
    def disk(self) -> Source | None:
        return next((s for s in self.sources if s.name == "disk"), None)

    # writes ----------------------------------------------------------------------------

    def offload(self, key: BlockKey, block: Any, cost: float = 1.0) -> None:
        """Copy a device block's bytes in (the caller may reuse `block` right after)."""
        if not self.host.put(key, block, cost):
            return
        self._origin.pop(key, None)
        self._lost.pop(key, None)
        if self.config.write_through:
            self._write_down(key, lambda: self.host.payload(key))

    def _spill(self, key: BlockKey, payload: Callable[[], bytes | None]) -> None:
        """Host memory evicts `key`; `payload()` reads its bytes before the slot is reused."""
        self._origin.pop(key, None)
        if not self.config.write_through:
            self._write_down(key, payload)

    def _write_down(self, key: BlockKey, payload: Callable[[], bytes | None]) -> None:
        for source in self.sources:
            if source.writable and source.is_enabled and key not in source:
                data = payload()
                if data is not None:
                    source.write(key, data)

    def move(self, stores: Iterable[tuple[int, BlockKey]], loads: Iterable[tuple[int, BlockKey]],
             block: Callable[[int], Any]) -> None:
        """An executor's block moves, before its step writes any block: save the device
        blocks leaving the device, then copy the loaded ones in. `block(id)` is a device
        block's bytes (None for a byte-less executor)."""
        loads = list(loads)
        done = 0
        try:
            for block_id, key in stores:
                self.offload(key, block(block_id))
            for block_id, key in loads:
                dst = block(block_id)
                done += 1  # from here on, `load` releases this key's pin itself
                if not self.load(key, dst):
                    raise RuntimeError(f"host tier lost pinned block {key.hex()[:12]}")
        finally:
            for _, key in loads[done:]:  # a failed step: release what it never loaded
                self.host.unpin(key)
                self._unstage(key)

    # reads -----------------------------------------------------------------------------

    def lookup(self, keys: Sequence[BlockKey], fetch: bool = True,
               hold_head: bool = True) -> PrefixMatch:
        """See `ExternalCache.lookup`. With `hold_head` off, the leading host-resident
        blocks are not held (the caller is about to pin the ones it takes). Every
        host-resident block of `keys` is pinned during the pass all the same, so a slot
        reserved for a read can evict none of them: not the head, and not a host block
        that follows a block still to be read."""
        held = [key for key in keys if key in self.host] if fetch else []
        for key in held:
            self.host.pin(key)
        try:
            return self._match(keys, fetch, hold_head)
        finally:
            for key in held:
                self.host.unpin(key)

    def _match(self, keys: Sequence[BlockKey], fetch: bool, hold_head: bool) -> PrefixMatch:
        origins: list[str] = []
        num_ready, next_in_flight, started, eta = 0, False, 0, 0.0
        room = self.host.num_slots - self.host.num_pinned - len(self._reads) - len(self._orphans)
        for key in keys:
            if key in self.host:
                leading = len(origins) == num_ready
                num_ready += leading
                origins.append(HOST)
                if fetch and (hold_head or not leading):
                    self._stage(key)  # keep the head of the prefix while its tail is read
                continue
            if len(origins) == num_ready:
                next_in_flight = key in self._reads
            read = self._reads.get(key)
            source = read.source if read is not None else self._source_of(key)
            if source is None:
                break
            if read is None and fetch:
                if room <= 0 or not self._start_read(key, source):
                    break  # the rest of this prefix cannot be staged at once: recomputed
                started += 1
                room -= 1
            origins.append(source.name)
            eta = max(eta, _mean_load_s(source.stats))
        if started:
            for source in self.sources:
                source.submit()
        return PrefixMatch(tuple(origins), num_ready, next_in_flight, started, eta)

    def _start_read(self, key: BlockKey, source: Source) -> bool:
        if not source.lands_in_place:
            self._reads[key] = _Read(source.read(key), source, self.clock())
            return True
        slot = self.host.reserve()  # the source writes the block straight into host memory
        if slot is None:
            return False
        into = self.host.landing(slot)
        self._reads[key] = _Read(source.read_into(key, into), source, self.clock(), slot, into)
        return True

    def _source_of(self, key: BlockKey) -> Source | None:
        lost = self._lost.get(key)
        return next((s for s in self.sources
                     if s.is_enabled and s.name != lost and key in s), None)

    def poll(self) -> None:
        """Land finished reads in host memory (engine thread, before scheduling)."""
        for source in self.sources:
            source.poll()
        now = self.clock()
        reads = list(self._reads.items())
        for _, read in reads:
            if read.fut.done():
                self._progress[read.source.name] = now
        for key, read in reads:
            if not read.fut.done():
                silent = now - max(read.start, self._progress.get(read.source.name, read.start))
                if silent <= FETCH_TIMEOUT_S and now - read.start <= READ_CAP_S:
                    continue  # pending, and the source still answers (a deep queue is fine)
            del self._reads[key]
            payload = _payload(read.fut) if read.fut.done() else None
            if payload is None:  # lost, corrupt or stalled: recomputed, never waited on again
                self._mark_lost(key, read.source.name)
                if not self._free_slot(read):
                    self._orphans.append(read)  # its source may still write into its slot
                continue
            read.source.stats.observe_load(self.clock() - read.start)
            if self._land(key, read, payload):
                self._origin[key] = read.source.name
            if key in self.host:  # landed, or stored meanwhile by another path
                self._stage(key)
        self._orphans = [read for read in self._orphans if not self._free_slot(read)]
        self._expire_staged()
        for source in self.sources:
            source.poll()

    def _land(self, key: BlockKey, read: _Read, payload: Any) -> bool:
        if read.slot is None:
            return self.host.put(key, payload)
        return self.host.commit(key, read.slot, None if payload is read.into else payload)

    def _free_slot(self, read: _Read) -> bool:
        """Free a failed read's reserved slot; False (kept) while its source may still
        write into it (the read was abandoned while pending: an orphan until it ends)."""
        if read.slot is None:
            return True
        if not read.fut.done():
            return False
        self.host.release(read.slot)
        return True

    def _mark_lost(self, key: BlockKey, source: str) -> None:
        if len(self._lost) >= MAX_LOST:
            self._lost.pop(next(iter(self._lost)))
        self._lost[key] = source

    def _expire_staged(self) -> None:
        now = self.clock()
        for key, since in list(self._staged.items()):
            if now - since > STAGE_TIMEOUT_S:
                self._unstage(key)

    def next_expiry_s(self) -> float:
        """When the oldest staged block's hold times out (inf: none staged)."""
        if not self._staged:
            return float("inf")
        return min(self._staged.values()) + STAGE_TIMEOUT_S

    def _stage(self, key: BlockKey) -> None:
        if key not in self._staged:
            self.host.pin(key)
        self._staged[key] = self.clock()

    def _unstage(self, key: BlockKey) -> None:
        if self._staged.pop(key, None) is not None:
            self.host.unpin(key)

    def pin(self, keys: Sequence[BlockKey]) -> None:
        for key in keys:
            self.host.pin(key)

    def has_reads_in_flight(self) -> bool:
        return bool(self._reads)

    def load(self, key: BlockKey, dst: Any) -> bool:
        """Copy a pinned host block into a device block, unpin it, and time the copy."""
        start = self.clock()
        try:
            ok = self.host.copy_out(key, dst)
        finally:
            self.host.unpin(key)
            self._unstage(key)
        if ok:
            self.host.stats.observe_load(self.clock() - start)
        return ok

    # accounting ------------------------------------------------------------------------

    def account(self, num_wanted: int, served: Sequence[BlockKey]) -> None:
        """Count one admission: `num_wanted` blocks the device lacked, `served` from here.

        A block is a host hit if it was in DRAM already, a source's hit if that source was
        read for it; each tier's misses are the lookups that reached it and failed.
        """
        origins = [self._origin.get(k, HOST) for k in served]
        lookups = num_wanted
        for stats in self.all_stats():
            hits = origins.count(stats.name)
            stats.hit_blocks += hits
            stats.hit_tokens += hits * self.tokens_per_block
            stats.miss_blocks += lookups - hits
            stats.miss_tokens += (lookups - hits) * self.tokens_per_block
            lookups -= hits

    def all_stats(self) -> list[TierStats]:
        return [self.host.stats] + [s.stats for s in self.sources]

    def persist(self) -> int:
        """Write every host block the writable sources lack (on shutdown: a warm restart)."""
        written = 0
        for source in self.sources:
            if not (source.writable and source.is_enabled):
                continue
            for key in self.host.list_keys():
                data = None if key in source else self.host.payload(key)
                if data is not None:
                    source.write(key, data)
                    written += 1
            source.drain()
        return written

    def close(self) -> None:
        self.persist()
        for source in self.sources:
            source.close()

    def check_integrity(self) -> None:
        self.host.check_integrity()
        for source in self.sources:
            source.check_integrity()
        assert all(k in self.host for k in self._origin), "fetched mark on a missing block"
        lent = sum(r.slot is not None for r in self._reads.values()) + len(self._orphans)
        assert self.host.num_lent == lent, f"{self.host.num_lent} host slots lent, {lent} reads"


def _payload(fut: Fetch) -> bytes | None:
    try:
        return fut.result()
    except Exception:  # noqa: BLE001 - a failed read is a miss
        return None


def _mean_load_s(stats: TierStats) -> float:
    return stats.load_sum_s / stats.load_count if stats.load_count else 0.0
