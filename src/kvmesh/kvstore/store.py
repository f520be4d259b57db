"""The tiered store below the device: host DRAM (hot) and disk (large), one engine thread.

Flow:
- `offload(key, block)`: a device block is being evicted (write-back, the default) or was
  just computed (write-through). Its bytes go to the host tier; a host eviction spills to
  disk in write-back mode; write-through writes disk at once.
- `prefetch(keys)`: on admission, start disk reads for the leading keys that are on disk
  but not in host memory; finished reads land in host memory in `poll()`.
- The scheduler asks `num_ready` / `is_loading` (ExternalCache) and pins what it will load;
  `load(key, dst)` copies host -> device and unpins.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from concurrent.futures import Future
from pathlib import Path

import torch

from kvmesh.config import TierConfig
from kvmesh.hashing import BlockKey
from kvmesh.kvstore.disk import DiskTier
from kvmesh.kvstore.host import HostTier
from kvmesh.kvstore.tier import TierStats

STAGE_TIMEOUT_S = 30.0


class TieredStore:
    def __init__(self, config: TierConfig, block_bytes: int, tokens_per_block: int):
        if config.disk_path and config.host_bytes <= 0:
            raise ValueError("the disk tier needs a host tier (host_bytes > 0) to stage reads")
        self.config = config
        self.tokens_per_block = tokens_per_block
        self.host = HostTier(config.host_bytes, block_bytes, config.host_policy,
                             on_evict=self._spill)
        self.disk = (DiskTier(Path(config.disk_path), config.disk_bytes, block_bytes,
                              config.disk_policy, config.io_threads, config.fsync)
                     if config.disk_path else None)
        self._reads: dict[BlockKey, tuple[Future, float]] = {}
        self._from_disk: set[BlockKey] = set()
        # Blocks read ahead for a waiting request stay pinned until it loads them (or for
        # STAGE_TIMEOUT_S, if it never does), so later reads cannot evict them first.
        self._staged: dict[BlockKey, float] = {}

    # writes ----------------------------------------------------------------------------

    def offload(self, key: BlockKey, block: torch.Tensor, cost: float = 1.0) -> None:
        """Copy a device block's bytes in (the caller may reuse `block` right after)."""
        self.host.put(key, block, cost)
        self._from_disk.discard(key)
        if self.config.write_through and self.disk is not None:
            view = self.host.get(key)
            if view is not None:
                self.disk.write(key, view.numpy().tobytes())

    def _spill(self, key: BlockKey, slot: torch.Tensor) -> None:
        self._from_disk.discard(key)
        if self.disk is not None and not self.config.write_through:
            self.disk.write(key, slot.numpy().tobytes())

    # reads -----------------------------------------------------------------------------

    def prefetch(self, keys: Sequence[BlockKey]) -> int:
        """Start disk reads for the leading keys not in host memory. Returns how many."""
        started = 0
        room = self.host.num_slots - self.host.num_pinned - len(self._reads)
        for key in keys:
            if key in self.host:
                self._stage(key)  # keep the head of the prefix while its tail is read
                continue
            if key in self._reads:
                continue
            if self.disk is None or key not in self.disk or not self.disk.is_enabled:
                break
            if room <= 0:
                break  # the rest of this prefix cannot be staged at once: it is recomputed
            self._reads[key] = (self.disk.read(key), time.perf_counter())
            started += 1
            room -= 1
        return started

    def poll(self) -> None:
        """Land finished disk reads in host memory (engine thread, before scheduling)."""
        if self.disk is not None:
            self.disk.poll()
        for key, (fut, start) in list(self._reads.items()):
            if not fut.done():
                continue
            del self._reads[key]
            payload = fut.result() if fut.exception() is None else None
            if payload is None:
                continue
            if self.disk is not None:
                self.disk.stats.observe_load(time.perf_counter() - start)
            if self.host.put(key, payload):
                self._from_disk.add(key)
                self._stage(key)
        self._expire_staged()
        if self.disk is not None:
            self.disk.poll()

    def _expire_staged(self) -> None:
        now = time.monotonic()
        for key, since in list(self._staged.items()):
            if now - since > STAGE_TIMEOUT_S:
                self._unstage(key)

    def _stage(self, key: BlockKey) -> None:
        if key not in self._staged:
            self.host.pin(key)
        self._staged[key] = time.monotonic()

    def _unstage(self, key: BlockKey) -> None:
        if self._staged.pop(key, None) is not None:
            self.host.unpin(key)

    def num_ready(self, keys: Sequence[BlockKey]) -> int:
        n = 0
        for key in keys:
            if key not in self.host:
                break
            n += 1
        return n

    def is_loading(self, keys: Sequence[BlockKey]) -> bool:
        for key in keys:
            if key in self._reads:
                return True
            if key not in self.host:
                return False
        return False

    def pin(self, keys: Sequence[BlockKey]) -> None:
        for key in keys:
            self.host.pin(key)

    def has_reads_in_flight(self) -> bool:
        return bool(self._reads)

    def load(self, key: BlockKey, dst: torch.Tensor) -> bool:
        """Copy a pinned host block into a device block, unpin it, and count the hit."""
        start = time.perf_counter()
        src = self.host.get(key)
        self.host.unpin(key)
        self._unstage(key)
        if src is None:
            return False
        dst.reshape(-1).view(torch.uint8).copy_(src, non_blocking=self.host.is_pinned)
        self.host.stats.bytes_out += self.host.block_bytes
        self.host.stats.observe_load(time.perf_counter() - start)
        return True

    def account(self, num_wanted: int, served: Sequence[BlockKey]) -> None:
        """Count one admission: `num_wanted` blocks the device lacked, `served` from here.

        A block is a host hit if it was in DRAM already, a disk hit if it was read from
        disk for this request; each tier's misses are the lookups that reached it and failed.
        """
        from_disk = sum(1 for k in served if k in self._from_disk)
        per_tier = [(self.host.stats, len(served) - from_disk, num_wanted)]
        if self.disk is not None:
            per_tier.append((self.disk.stats, from_disk, num_wanted - (len(served) - from_disk)))
        for stats, hits, lookups in per_tier:
            stats.hit_blocks += hits
            stats.hit_tokens += hits * self.tokens_per_block
            stats.miss_blocks += lookups - hits
            stats.miss_tokens += (lookups - hits) * self.tokens_per_block

    def all_stats(self) -> list[TierStats]:
        return [self.host.stats] + ([self.disk.stats] if self.disk else [])

    def persist(self) -> int:
        """Write every host block the disk lacks (on shutdown, so a restart starts warm)."""
        if self.disk is None or not self.disk.is_enabled:
            return 0
        written = 0
        for key, slot in list(self.host._slot_of.items()):
            if key not in self.disk:
                self.disk.write(key, self.host.slab[slot].numpy().tobytes())
                written += 1
        self.disk.drain()
        return written

    def close(self) -> None:
        if self.disk is not None:
            self.persist()
            self.disk.close()

    def check_integrity(self) -> None:
        self.host.check_integrity()
        if self.disk is not None:
            self.disk.check_integrity()
        assert self._from_disk <= set(self.host._slot_of), "disk-origin mark on a missing block"
