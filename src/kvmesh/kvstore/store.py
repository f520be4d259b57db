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
        for key in keys:
            if key in self.host or key in self._reads:
                continue
            if self.disk is None or key not in self.disk or not self.disk.is_enabled:
                break
            self._reads[key] = (self.disk.read(key), time.perf_counter())
            started += 1
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
        if self.disk is not None:
            self.disk.poll()

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
        if src is None:
            return False
        dst.reshape(-1).view(torch.uint8).copy_(src, non_blocking=self.host.is_pinned)
        tier = self.disk.stats if (self.disk and key in self._from_disk) else self.host.stats
        tier.hit_blocks += 1
        tier.hit_tokens += self.tokens_per_block
        self.host.stats.bytes_out += self.host.block_bytes
        self.host.stats.observe_load(time.perf_counter() - start)
        return True

    def record_misses(self, num_blocks: int) -> None:
        for stats in self.all_stats():
            stats.miss_blocks += num_blocks
            stats.miss_tokens += num_blocks * self.tokens_per_block

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
