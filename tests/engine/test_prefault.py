"""The KV pool's pages are mapped just ahead of the block pool's high water mark, in the
background, without touching what the engine wrote."""

from __future__ import annotations

import sys
import time

import pytest
import torch

from kvmesh.engine.model_runner import lazy_zeros
from kvmesh.engine.prefault import Prefaulter


class _Pool:
    high_water = 0


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


def _wait(cond, timeout=20.0) -> None:
    end = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < end, "timed out"
        time.sleep(0.02)


@pytest.mark.skipif(sys.platform != "linux", reason="MADV_POPULATE_WRITE is Linux-only")
def test_pages_are_mapped_ahead_of_the_high_water_mark_only():
    mib = 1 << 20
    kv = lazy_zeros((96, 2, mib // 8), torch.float32, torch.device("cpu"))  # 96 x 1 MiB
    kv[0].fill_(1.5)  # the engine's data, written before and during the prefault
    pool = _Pool()
    rss0 = _rss_bytes()
    pre = Prefaulter(kv, pool, reserve_bytes=16 * mib)
    if not pre.start():
        pytest.skip("madvise is not available here")
    try:
        _wait(lambda: pre.mapped == 16)
        time.sleep(0.2)
        assert pre.mapped == 16  # no further than the reserve above high water 0
        grown = _rss_bytes() - rss0
        assert 12 * mib <= grown <= 40 * mib, grown
        kv[20].fill_(2.5)
        pool.high_water = 80
        _wait(lambda: pre.mapped == 96)  # capped at the pool's size
        pre.thread.join(5)
        assert not pre.thread.is_alive()  # everything mapped: the thread is done
        assert bool((kv[0] == 1.5).all()) and bool((kv[20] == 2.5).all())
        assert float(kv[1:20].abs().sum()) == 0.0 and float(kv[21:].abs().sum()) == 0.0
    finally:
        pre.stop()
