"""Host and disk tiers on real memory and real files: round trips, corruption, full disks."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from kvmesh.hashing import BlockKey
from kvmesh.kvstore.disk import DiskTier
from kvmesh.kvstore.host import HostTier

BLOCK = 4096


def k(i: int) -> BlockKey:
    return BlockKey(i.to_bytes(16, "little"))


def data(i: int) -> torch.Tensor:
    return torch.full((BLOCK,), i % 251, dtype=torch.uint8)


def test_host_tier_round_trip_eviction_and_spill():
    spilled = []
    host = HostTier(3 * BLOCK, BLOCK, "lru", pin_memory=False,
                    on_evict=lambda key, payload: spilled.append((key, payload())))
    for i in range(3):
        assert host.put(k(i), data(i))
    host.pin(k(0))
    assert host.put(k(3), data(3))  # evicts k(1): k(0) is pinned
    assert [key for key, _ in spilled] == [k(1)] and spilled[0][1] == data(1).numpy().tobytes()
    assert torch.equal(host.get(k(0)), data(0)) and k(1) not in host
    host.pin(k(2))
    host.pin(k(3))
    assert not host.put(k(4), data(4))  # every slot pinned: dropped, not corrupted
    assert host.stats.dropped_writes == 1
    host.check_integrity()


def test_disk_round_trip_and_restart_index(tmp_path):
    disk = DiskTier(tmp_path, 100 * BLOCK, BLOCK)
    for i in range(5):
        disk.write(k(i), data(i).numpy().tobytes())
    disk.drain()
    assert all(k(i) in disk for i in range(5))
    assert disk.read(k(3)).result() == data(3).numpy().tobytes()
    disk.close()
    again = DiskTier(tmp_path, 100 * BLOCK, BLOCK)
    assert again.stats.num_blocks == 5 and k(4) in again
    again.check_integrity()


def test_disk_capacity_evicts_files(tmp_path):
    disk = DiskTier(tmp_path, 3 * (BLOCK + 64), BLOCK)
    for i in range(6):
        disk.write(k(i), data(i).numpy().tobytes())
        disk.drain()
    disk.close()
    assert disk.stats.num_blocks <= 3 and disk.stats.evictions >= 3
    assert len(list(tmp_path.rglob("*.kvb"))) == disk.stats.num_blocks


@pytest.mark.parametrize("damage", ["flip", "truncate", "empty", "rename"])
def test_corrupt_files_are_misses_deleted_and_counted(tmp_path, damage):
    disk = DiskTier(tmp_path, 100 * BLOCK, BLOCK)
    disk.write(k(1), data(1).numpy().tobytes())
    disk.drain()
    path = next(tmp_path.rglob("*.kvb"))
    raw = bytearray(path.read_bytes())
    if damage == "flip":
        raw[-10] ^= 0xFF
        path.write_bytes(raw)
    elif damage == "truncate":
        path.write_bytes(raw[: len(raw) // 2])
    elif damage == "empty":
        path.write_bytes(b"")
    else:  # another block's file under this key's name
        disk.write(k(2), data(2).numpy().tobytes())
        disk.drain()
        other = next(p for p in tmp_path.rglob("*.kvb") if p != path)
        os.replace(other, path)
    assert disk.read(k(1)).result() is None
    disk.poll()
    assert disk.stats.checksum_failures == 1 and k(1) not in disk
    assert not path.exists()
    disk.check_integrity()


def test_unwritable_directory_disables_tier(tmp_path):
    if os.geteuid() == 0:
        target = "/proc/kvmesh-cannot-write-here"  # even root cannot create files in /proc
    else:
        (tmp_path / "ro").mkdir(mode=0o500)
        target = str(tmp_path / "ro" / "cache")
    disk = DiskTier(target, 100 * BLOCK, BLOCK)
    assert not disk.is_enabled and disk.stats.is_disabled
    disk.write(k(1), b"x" * BLOCK)  # ignored, no exception
    assert k(1) not in disk


def test_full_disk_disables_tier(tmp_path):
    """A real filesystem that fills up: a small tmpfs in a private mount namespace."""
    if sys.platform != "linux" or os.geteuid() != 0:
        pytest.skip("needs root on Linux for a private tmpfs")
    script = textwrap.dedent(f"""
        import subprocess, sys, torch
        sys.path.insert(0, {str(os.getcwd())!r})
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", {str(tmp_path)!r}],
                       check=True)
        print("MOUNTED", flush=True)
        from kvmesh.kvstore.disk import DiskTier
        disk = DiskTier({str(tmp_path)!r} + "/cache", 10**9, {BLOCK})
        for i in range(40):
            disk.write(i.to_bytes(16, "little"), bytes([i]) * {BLOCK})
        disk.drain()
        print("DISABLED", disk.stats.is_disabled, disk.stats.write_errors, disk.stats.bytes_in,
              disk.stats.num_blocks)
    """)
    r = subprocess.run(["unshare", "-m", sys.executable, "-c", script], capture_output=True,
                       text=True, timeout=120)
    if "MOUNTED" not in r.stdout:
        pytest.skip(f"cannot mount a private tmpfs here: {r.stderr[-200:]}")
    assert r.returncode == 0, r.stderr
    flag, errors, written, blocks = r.stdout.split("DISABLED")[1].split()
    assert flag == "True" and int(errors) >= 1 and 0 < int(written) < 40 * 4096
    assert int(blocks) == 0  # disabled: its index is cleared (an AllCleared event)
