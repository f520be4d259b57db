"""Mapping the CPU KV pool's pages just ahead of use, in the background.

The pool comes from calloc (`model_runner.lazy_zeros`): startup is instant, but each
page's first write faults in a zeroed page, some 2.5 ms per MiB on a VM. A request that
fills fresh blocks pays that on its critical path: a 4k-token peer or host hit loading
100-200 MB of KV into never-used blocks took 0.3-0.5 s more than into used ones.

The block pool hands out free blocks in id order until every block has been used once
(`BlockPool.high_water`), so the fresh blocks are always the ones just above the high
water mark. `Prefaulter` keeps `reserve_bytes` (`--prefault-bytes`) above it mapped, with
madvise(MADV_POPULATE_WRITE) on a low-priority thread: that maps pages without touching
their contents, so it is safe while the engine writes the same memory. The first reserve
is mapped at startup, before the engine takes requests: done in the background, it
competed for the CPU with the first requests of a fresh server (on 2 vCPUs the first five
prompts of a shared-prefix load took 0.35-0.70 s, against 0.23-0.45 s once the reserve
is mapped first). Resident memory
runs at most `reserve_bytes` ahead of what the pool has used. Linux (5.14+) and CPU pools
only; elsewhere, or if the call fails, it does nothing.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import mmap
import os
import sys
import threading
import time
import weakref
from typing import Any, Protocol

import torch

log = logging.getLogger(__name__)
MADV_POPULATE_WRITE = 23
PAGE = mmap.PAGESIZE
CHUNK_BYTES = 2 << 20  # per madvise call: short, so the thread holds the mm lock briefly
RESERVE_BYTES = 256 << 20
POLL_S = 0.05


class HasHighWater(Protocol):
    high_water: int


def _madvise() -> Any:
    if sys.platform != "linux":
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    fn.restype = ctypes.c_int
    return fn


class Prefaulter:
    """Keeps the KV tensor's blocks up to `pool.high_water` + reserve mapped."""

    def __init__(self, kv: torch.Tensor, pool: HasHighWater,
                 reserve_bytes: int = RESERVE_BYTES, nice: bool = True):
        self.block_bytes = kv[0].numel() * kv.element_size()
        self.num_blocks = kv.shape[0]
        self.base = kv.data_ptr()
        self.reserve_blocks = max(1, reserve_bytes // self.block_bytes)
        self.mapped = 0  # blocks [0, mapped) are mapped
        self._kv = weakref.ref(kv)
        self._pool = weakref.ref(pool)
        self._stop = threading.Event()
        self._fn = _madvise()
        self.nice = nice
        self.thread: threading.Thread | None = None

    def start(self) -> bool:
        """Map the first reserve now, then start the thread; False where the kernel
        refuses (probed on the first page)."""
        if self._fn is None or self.base % PAGE or self.num_blocks < 1:
            return False
        if self._fn(ctypes.c_void_p(self.base), ctypes.c_size_t(PAGE),
                    MADV_POPULATE_WRITE) != 0:
            log.info("madvise(MADV_POPULATE_WRITE) refused (errno %d): KV pages map on first "
                     "use", ctypes.get_errno())
            return False
        t0 = time.perf_counter()
        first = min(self.num_blocks, self.reserve_blocks)
        if not self._map(0, first):  # the first reserve now: see the module's docstring
            return False
        log.info("KV prefault: %d MiB mapped in %.2f s", first * self.block_bytes >> 20,
                 time.perf_counter() - t0)
        self.thread = threading.Thread(target=self._run, name="kv-prefault", daemon=True)
        self.thread.start()
        return True

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        if self.nice:
            with contextlib.suppress(OSError, AttributeError):  # this thread only (Linux)
                os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
        while not self._stop.is_set() and self.mapped < self.num_blocks:
            pool = self._pool()
            if pool is None or self._kv() is None:
                return  # the engine is gone
            want = min(self.num_blocks, pool.high_water + self.reserve_blocks)
            del pool
            if want <= self.mapped:
                self._stop.wait(POLL_S)
                continue
            if not self._map(self.mapped, want):
                return
        log.debug("KV prefault done: %d of %d blocks mapped", self.mapped, self.num_blocks)

    def _map(self, first: int, end: int) -> bool:
        """madvise blocks [first, end) chunk by chunk; False if the call is refused."""
        start = self.base + first * self.block_bytes
        stop = self.base + end * self.block_bytes
        while start < stop and not self._stop.is_set():
            kv = self._kv()  # held across the call: the memory cannot go away under it
            if kv is None:
                return False
            aligned = start - start % PAGE
            size = min(CHUNK_BYTES, stop - start) + (start - aligned)
            assert self._fn is not None
            if self._fn(ctypes.c_void_p(aligned), ctypes.c_size_t(size),
                        MADV_POPULATE_WRITE) != 0:
                log.debug("madvise(MADV_POPULATE_WRITE) refused (errno %d): KV pages map "
                          "on first use", ctypes.get_errno())
                return False
            del kv
            start += size - (start - aligned)
        self.mapped = end if start >= stop else (start - self.base) // self.block_bytes
        return True
