"""The seams of the core, on a real (tiny) model: a new KV source plugged in from outside
`store.py`, and block events that account for every store and removal, in order."""

from __future__ import annotations

import time
from concurrent.futures import Future

import pytest

from kvmesh import LLM
from kvmesh.hashing import BlockKey
from kvmesh.kvstore import store as store_module
from kvmesh.kvstore.virtual import VirtualSource
from tests.engine.core_driver import EventMirror
from tests.kvstore.test_engine_tiers import G, prompts, reference_tokens, tiered


@pytest.fixture(scope="module")
def expected(tiny_llama):
    return reference_tokens(tiny_llama)


class DictSource(VirtualSource):
    """A toy source: blocks held in a dict, each read already done. Counts its reads.
    (The no-op `poll`/`drain`/`close` of the `Source` interface come from VirtualSource.)"""

    def __init__(self, blocks: dict[BlockKey, bytes], corrupt: bool = False,
                 stalled: bool | str = False):
        super().__init__("toy", blocks, time.monotonic)
        self.blocks = blocks
        self.reads = 0
        self.corrupt = corrupt
        self.stalled = stalled

    def read(self, key: BlockKey) -> Future:  # type: ignore[override]
        self.reads += 1
        fut: Future = Future()
        if not self.stalled or (self.stalled == "half" and self.reads % 2):
            fut.set_result(None if self.corrupt else self.blocks[key])  # None: a lost block
        return fut

    def write(self, key: BlockKey, payload: bytes) -> None:
        raise AssertionError("a read-only source is never written")


def _blocks_of(llm: LLM) -> dict[BlockKey, bytes]:
    """Every block an instance computed, as bytes (its device cache handed to host memory)."""
    llm.close()
    store = llm.engine.store
    assert store is not None
    return {key: store.host.payload(key) for key in store.host.list_keys()}  # type: ignore[misc]


def test_toy_source_serves_hits_with_identical_tokens(tiny_llama, expected):
    first = tiered(tiny_llama)
    assert [o.token_ids for o in first.generate(prompts(6), G)] == expected
    blocks = _blocks_of(first)
    assert len(blocks) >= 6 * 24
    second = tiered(tiny_llama)  # empty device and host: only the toy source has the KV
    toy = DictSource(blocks)
    second.engine.store.add_source(toy)
    outs = second.generate(prompts(6), G)
    assert [o.token_ids for o in outs] == expected
    assert [o.num_cached_tokens for o in outs] == [96] * 6
    assert toy.reads >= 6 * 24 and toy.stats.hit_blocks == 6 * 24
    assert second.engine.store.host.stats.hit_blocks == 0
    second.engine.core.check_integrity()


@pytest.mark.parametrize("failure", ["corrupt", "stalled", "half"])
def test_lost_or_stalled_source_blocks_are_recomputed(tiny_llama, expected, failure,
                                                      monkeypatch):
    monkeypatch.setattr(store_module, "FETCH_TIMEOUT_S", 0.3)
    monkeypatch.setattr(store_module, "READ_CAP_S", 0.6)  # "half": it answers, drops some
    first = tiered(tiny_llama)
    first.generate(prompts(6), G)
    second = tiered(tiny_llama)
    toy = DictSource(_blocks_of(first), corrupt=failure == "corrupt",
                     stalled={"stalled": True, "half": "half"}.get(failure, False))
    second.engine.store.add_source(toy)
    start = time.monotonic()
    outs = second.generate(prompts(6), G)
    assert time.monotonic() - start < 30  # waited out the stalled reads once, not forever
    assert [o.token_ids for o in outs] == expected
    assert toy.reads > 0
    if failure != "half":
        assert toy.stats.hit_blocks == 0 and all(o.num_cached_tokens == 0 for o in outs)


def test_block_events_account_for_every_store_and_removal(tiny_llama, expected):
    llm = tiered(tiny_llama, host_blocks=50)  # small host memory: it evicts too
    mirror = EventMirror()
    llm.engine.core.outbox.subscribe(mirror)
    for seed in range(3):
        llm.generate(prompts(6, seed=seed), G)
    llm.engine.core.outbox.drain()
    assert mirror.errors == [] and mirror.count > 6 * 3 * 25
    device = {key for _, key in llm.engine.pool.cached_blocks()}
    assert mirror.held["device"] == device
    assert mirror.held["host"] == set(llm.engine.store.host.list_keys())
    assert llm.engine.store.host.stats.evictions > 0


def test_failed_load_publishes_nothing_and_leaks_no_pin(tiny_llama, expected, monkeypatch):
    llm = tiered(tiny_llama)
    assert [o.token_ids for o in llm.generate(prompts(6), G)] == expected  # 0 now in host
    host = llm.engine.store.host
    real = host.copy_out
    calls = []

    def broken(key, dst):
        calls.append(key)
        if len(calls) == 3:
            raise OSError("DMA error")
        return real(key, dst)

    monkeypatch.setattr(host, "copy_out", broken)
    with pytest.raises(RuntimeError, match="DMA error"):
        llm.generate(prompts(1), G)
    assert len(calls) == 3 and host.num_pinned == 0  # the tried load and the untried ones
    monkeypatch.setattr(host, "copy_out", real)
    again = llm.generate(prompts(1), G)[0]  # nothing half-loaded was published
    assert again.token_ids == expected[0] and again.num_cached_tokens == 96
    llm.engine.core.check_integrity()
