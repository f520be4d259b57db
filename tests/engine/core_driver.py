"""Drives the pure EngineCore with a fake executor, a fake clock and byte-less tiers.

Imports nothing but kvmesh's pure modules: the purity test runs it in a subprocess with
torch, numpy, asyncio, socket and threading blocked. Requests share prefixes (device,
host and disk hits), some have n = 2, some are aborted, some end on a "stop string"
(`core.finish`), and the device pool is small enough to preempt.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

from kvmesh.config import CacheConfig, SchedulerConfig, TierConfig
from kvmesh.engine.batch import ExecuteBatch, ExecuteResult
from kvmesh.engine.core import EngineCore, ModelIdentity
from kvmesh.engine.events import AllCleared, BlockEvent, BlockRemoved, BlockStored, EventOutbox
from kvmesh.kvstore.store import TieredStore
from kvmesh.kvstore.virtual import VirtualHostTier, VirtualSource
from kvmesh.types import SamplingParams

EOS, STOP_TOKEN, VOCAB = 2, 11, 64


class FakeClock:
    def __init__(self) -> None:
        self.t = 0.0

    def now(self) -> float:
        return self.t

    def sleep(self, seconds: float) -> None:
        self.t += seconds


class FakeExecutor:
    """Costs 1 ms + 20 us per token; the next token is a function of the sequence so far."""

    def __init__(self, clock: FakeClock, store: TieredStore | None):
        self.clock = clock
        self.store = store
        self.batches = 0
        self.stores = 0
        self.loads = 0

    def execute(self, batch: ExecuteBatch) -> ExecuteResult:
        self.batches += 1
        self.stores += len(batch.stores)
        self.loads += len(batch.loads)
        if self.store is not None:
            self.store.move(batch.stores, batch.loads, lambda block_id: None)
        self.clock.t += 0.001 + 0.00002 * batch.num_tokens
        sampled = {}
        for seq in batch.seqs:
            assert seq.block_table and seq.token_ids
            if seq.is_sampling:
                n = len(seq.all_token_ids)
                sampled[seq.request_id] = (sum(seq.all_token_ids[-3:]) * 31 + n) % VOCAB
        return ExecuteResult(sampled)


class EventMirror:
    """Replays block events into per-medium key sets."""

    def __init__(self) -> None:
        self.held: dict[str, set] = {}
        self.count = 0
        self.errors: list[str] = []

    def __call__(self, events: Sequence[BlockEvent]) -> None:
        for ev in events:
            self.count += 1
            keys = self.held.setdefault(ev.medium, set())
            if isinstance(ev, BlockStored):
                if ev.key in keys:
                    self.errors.append(f"stored twice: {ev}")
                keys.add(ev.key)
            elif isinstance(ev, BlockRemoved):
                if ev.key not in keys:
                    self.errors.append(f"removed before stored: {ev}")
                keys.discard(ev.key)
            elif isinstance(ev, AllCleared):
                keys.clear()


def build(seed: int = 0) -> tuple[EngineCore, FakeExecutor, FakeClock, EventMirror]:
    clock = FakeClock()
    outbox = EventOutbox()
    mirror = EventMirror()
    outbox.subscribe(mirror)
    host = VirtualHostTier(24, 4096, outbox=outbox)
    disk = VirtualSource("disk", (), clock.now, latency_s=0.003, writable=True)
    store = TieredStore(TierConfig(host_bytes=24 * 4096), host, [disk], 4, clock.now)
    core = EngineCore(SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=64),
                      CacheConfig(block_size=4), ModelIdentity("fake", "f32", 256,
                                                               frozenset({EOS})),
                      num_blocks=40, store=store, outbox=outbox, clock=clock)
    return core, FakeExecutor(clock, store), clock, mirror


def drive(num_requests: int = 80, max_steps: int = 3000, seed: int = 0) -> dict:
    core, executor, clock, mirror = build(seed)
    rng = random.Random(seed)
    prefixes = [[rng.randrange(3, VOCAB) for _ in range(rng.randrange(16, 60))]
                for _ in range(10)]
    arrivals = sorted(rng.uniform(0, 0.6) for _ in range(num_requests))
    finished: dict[str, int] = {}
    expected: dict[str, int] = {}
    aborts: dict[str, int] = {}  # request -> the step it is aborted at
    steps = 0
    while steps < max_steps and (arrivals or core.has_unfinished()):
        while arrivals and arrivals[0] <= clock.now():
            arrivals.pop(0)
            i = len(expected)
            tail = [rng.randrange(3, VOCAB) for _ in range(rng.randrange(1, 40))]
            prompt = rng.choice(prefixes) + tail
            params = SamplingParams(n=2 if i % 5 == 0 else 1, temperature=0,
                                    max_tokens=rng.randrange(1, 24), seed=i)
            seq_ids = core.add(f"r{i}", prompt, params)
            expected[f"r{i}"] = len(seq_ids)
            if i % 9 == 4:
                aborts[f"r{i}"] = steps + 3
        for rid in [r for r, at in aborts.items() if at <= steps]:
            del aborts[rid]
            finished.update((seq_id, -1) for seq_id in core.abort(rid))
        if not core.has_unfinished():
            clock.sleep(0.001)
            continue
        for u in core.step(executor):
            if u.token_id == STOP_TOKEN and u.finish_reason is None:
                core.finish(u.seq_id, "stop", "<stop>")
                finished[u.seq_id] = 1
            elif u.finish_reason is not None:
                finished[u.seq_id] = 1
        steps += 1
        core.outbox.drain()
        core.check_integrity()
        _check_mirror(core, mirror)
    host, disk = core.store.all_stats() if core.store else (None, None)
    return {
        "steps": steps, "sequences": sum(expected.values()), "finished": len(finished),
        "events": mirror.count, "event_errors": mirror.errors[:5],
        "device_hit_tokens": core.kv.num_hit_tokens, "host_hits": host.hit_blocks,
        "disk_hits": disk.hit_blocks, "stores": executor.stores, "loads": executor.loads,
        "preemptions": core.scheduler.num_preemptions, "unfinished": core.has_unfinished(),
        "virtual_s": clock.now(),
    }


def _check_mirror(core: EngineCore, mirror: EventMirror) -> None:
    device = {key for _, key in core.pool.cached_blocks()}
    assert mirror.held.get("device", set()) == device, "device events disagree with the pool"
    host = set(core.store.host.list_keys()) if core.store else set()
    assert mirror.held.get("host", set()) == host, "host events disagree with the host index"
