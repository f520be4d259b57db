"""The KV pool's pages are mapped just ahead of the block pool's high water mark (the first
reserve at startup, the rest in the background), without touching what the engine wrote."""

from __future__ import annotations

import ctypes
import mmap
import os
import sys
import time

import pytest
import torch

from kvmesh.engine.prefault import Prefaulter


class _Pool:
    high_water = 0


def _resident_bytes(t: torch.Tensor) -> int:
    """Bytes of `t`'s pages that are resident (mincore(2)): this tensor's only."""
    page = os.sysconf("SC_PAGE_SIZE")
    nbytes = t.numel() * t.element_size()
    pages = -(-nbytes // page)
    vec = (ctypes.c_ubyte * pages)()
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    assert libc.mincore(ctypes.c_void_p(t.data_ptr()), ctypes.c_size_t(nbytes), vec) == 0
    return sum(b & 1 for b in vec) * page


def _wait(cond, timeout=60.0) -> None:
    end = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < end, "timed out"
        time.sleep(0.02)


@pytest.mark.skipif(sys.platform != "linux", reason="MADV_POPULATE_WRITE is Linux-only")
def test_pages_are_mapped_ahead_of_the_high_water_mark_only():
    mib = 1 << 20
    # fresh anonymous pages (what lazy_zeros' calloc gives for a new large pool; in a
    # long-lived process calloc may reuse freed heap, so the test maps its own)
    area = mmap.mmap(-1, 96 * mib)
    kv = torch.frombuffer(area, dtype=torch.float32).view(96, 2, mib // 8)  # 96 x 1 MiB
    kv[0].fill_(1.5)  # the engine's data, written before and during the prefault
    pool = _Pool()
    assert _resident_bytes(kv) <= 4 * mib  # calloc'd: what was written (huge pages: 2 MiB)
    pre = Prefaulter(kv, pool, reserve_bytes=16 * mib, nice=False)
    if not pre.start():
        pytest.skip("madvise(MADV_POPULATE_WRITE) is refused here (Linux < 5.14?)")
    try:
        assert pre.mapped == 16  # the first reserve: mapped before start() returns
        time.sleep(0.2)
        assert pre.mapped == 16  # no further than the reserve above high water 0
        resident = _resident_bytes(kv)
        assert 14 * mib <= resident <= 21 * mib, resident  # 16 blocks, huge-page slack
        kv[20].fill_(2.5)
        pool.high_water = 80
        _wait(lambda: pre.mapped == 96)  # capped at the pool's size
        pre.thread.join(5)
        assert not pre.thread.is_alive()  # everything mapped: the thread is done
        assert bool((kv[0] == 1.5).all()) and bool((kv[20] == 2.5).all())
        assert float(kv[1:20].abs().sum()) == 0.0 and float(kv[21:].abs().sum()) == 0.0
        assert _resident_bytes(kv) >= 95 * mib
    finally:
        pre.stop()
