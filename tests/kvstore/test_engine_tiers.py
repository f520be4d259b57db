"""The engine over host and disk tiers (tiny model): identical tokens, crash safety."""

from __future__ import annotations

import random
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from kvmesh import LLM, SamplingParams

G = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)


def prompts(n: int, length: int = 100, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, 512) for _ in range(length)] for _ in range(n)]


def reference_tokens(model) -> list[list[int]]:
    ref = LLM(str(model), dtype="float32", block_size=4, num_blocks=1024,
              enable_prefix_caching=False)
    return [o.token_ids for o in ref.generate(prompts(6), G)]


@pytest.fixture(scope="module")
def expected(tiny_llama):
    return reference_tokens(tiny_llama)


def tiered(model, disk=None, host_blocks=400, **kw) -> LLM:
    return LLM(str(model), dtype="float32", block_size=4, num_blocks=40,
               host_bytes=host_blocks * 2048, disk_path=str(disk) if disk else None,
               disk_bytes=10**8, **kw)


def test_host_hits_give_identical_tokens(tiny_llama, expected):
    llm = tiered(tiny_llama)
    assert [o.token_ids for o in llm.generate(prompts(6), G)] == expected
    again = llm.generate(prompts(6), G)
    assert [o.token_ids for o in again] == expected
    host = llm.engine.store.host.stats
    assert host.hit_blocks >= 6 * 20 and all(o.num_cached_tokens == 96 for o in again)
    llm.engine.store.check_integrity()
    llm.engine.scheduler.check_integrity()


@pytest.mark.parametrize("policy", ["lru", "s3fifo", "cost"])
def test_disk_hits_and_restart_give_identical_tokens(tiny_llama, expected, tmp_path, policy):
    llm = tiered(tiny_llama, tmp_path, host_blocks=60, host_policy=policy, disk_policy=policy)
    assert [o.token_ids for o in llm.generate(prompts(6), G)] == expected
    assert [o.token_ids for o in llm.generate(prompts(6), G)] == expected
    assert llm.engine.store.disk.stats.hit_blocks > 0
    llm.close()
    restarted = tiered(tiny_llama, tmp_path, host_blocks=200)
    outs = restarted.generate(prompts(6), G)
    assert [o.token_ids for o in outs] == expected
    assert [o.num_cached_tokens for o in outs] == [96] * 6
    assert restarted.engine.store.disk.stats.hit_blocks == 6 * 24
    restarted.close()


def test_write_through_and_corrupted_files(tiny_llama, expected, tmp_path):
    llm = tiered(tiny_llama, tmp_path, write_through=True)
    llm.generate(prompts(6), G)
    llm.close()
    files = sorted(tmp_path.rglob("*.kvb"))
    assert len(files) >= 6 * 24
    for f in files[::3]:
        raw = bytearray(f.read_bytes())
        raw[len(raw) // 2] ^= 0x5A
        f.write_bytes(raw)
    for f in files[1::7]:
        f.write_bytes(f.read_bytes()[:100])
    again = tiered(tiny_llama, tmp_path)
    assert [o.token_ids for o in again.generate(prompts(6), G)] == expected
    assert again.engine.store.disk.stats.checksum_failures > 0
    again.close()


CRASHER = """
import random, sys
from kvmesh import LLM, SamplingParams
llm = LLM(sys.argv[1], dtype="float32", block_size=4, num_blocks=64, host_bytes=64 * 2048,
          disk_path=sys.argv[2], disk_bytes=10**9, write_through=True, io_threads=4)
rng = random.Random(1)
print("READY", flush=True)
while True:
    llm.generate([[rng.randrange(3, 512) for _ in range(120)] for _ in range(8)],
                 SamplingParams(temperature=0.0, max_tokens=2, ignore_eos=True))
"""


def test_sigkill_during_heavy_writes_leaves_no_bad_block(tiny_llama, expected, tmp_path):
    proc = subprocess.Popen([sys.executable, "-c", textwrap.dedent(CRASHER), str(tiny_llama),
                             str(tmp_path)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "READY"
    deadline = time.monotonic() + 60
    while len(list(tmp_path.rglob("*.kvb"))) < 300 and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait(30)
    from kvmesh.kvstore.disk import DiskTier

    disk = DiskTier(tmp_path, 10**9, 2048)
    assert disk.stats.num_blocks >= 300
    assert not [p for p in tmp_path.rglob("*") if p.name.startswith(".tmp-")]
    keys = [key for key, _ in disk.index.items()]
    results = [disk.read(key).result() for key in keys]
    disk.poll()
    assert all(r is not None and len(r) == 2048 for r in results)  # every file is whole
    assert disk.stats.checksum_failures == 0
    disk.close()
    llm = tiered(tiny_llama, tmp_path)
    assert [o.token_ids for o in llm.generate(prompts(6), G)] == expected
    llm.close()


def test_tenant_salt_isolates_blocks_in_every_tier(tiny_llama, tmp_path):
    llm = tiered(tiny_llama, tmp_path, host_blocks=200)
    p = prompts(1, seed=9)
    llm.generate(p, G, cache_salt="alice")
    llm.engine.kv.reset_prefix_cache()  # alice's blocks now live in host DRAM only
    assert llm.generate(p, G, cache_salt="bob")[0].num_cached_tokens == 0
    assert llm.generate(p, G, cache_salt="alice")[0].num_cached_tokens == 96


def test_unusable_disk_tier_is_disabled_and_serving_goes_on(tiny_llama, expected):
    llm = tiered(tiny_llama, "/proc/kvmesh-no-disk-here", host_blocks=60)
    assert [o.token_ids for o in llm.generate(prompts(6), G)] == expected
    disk = llm.engine.store.disk
    assert disk.stats.is_disabled and "cannot use" in disk.disabled_reason
    llm.close()
