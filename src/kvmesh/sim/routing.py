"""The router's own policies over simulated instances.

The `kv` index is fed by each instance's block events, as the real router's is by KV
events (the simulated tiers publish none, so it sees device blocks only); the `prefix`
index records routed prompts, over a 4-characters-per-token rendering of their token ids.
"""

from __future__ import annotations

from array import array
from collections.abc import Sequence

from kvmesh.engine.events import BlockEvent
from kvmesh.engine.kv_events import KVEventBatch, KVSnapshot, to_wire
from kvmesh.hashing import hash_blocks
from kvmesh.router.index import text_chunk_hashes
from kvmesh.router.policies import (
    InstanceLoad,
    RoutePolicy,
    RouteRequest,
    RouterState,
    RouteWeights,
    make_route_policy,
)
from kvmesh.sim.instance import SimInstance

NEEDS_KEYS = ("kv", "session")
CACHE_AWARE = ("kv", "prefix", "session")


class _Feed:
    def __init__(self, state: RouterState, number: int):
        self.state, self.number, self.seq = state, number, 0
        state.kv.reset(number, KVSnapshot(f"sim{number}", 0, {}))

    def __call__(self, events: Sequence[BlockEvent]) -> None:
        wire = to_wire(events)
        if wire:
            self.seq += 1
            self.state.kv.apply(self.number, KVEventBatch(f"sim{self.number}", self.seq, 0.0,
                                                          wire))


class SimRouter:
    def __init__(self, name: str, instances: Sequence[SimInstance],
                 weights: RouteWeights | None = None):
        self.name = name
        self.state = RouterState(weights or RouteWeights(), has_kv_events=True)
        self.policy: RoutePolicy = make_route_policy(name, self.state)
        self.reads_queue = name in CACHE_AWARE  # the others never read queued prefill
        self.namespace = instances[0].core.namespace(None)
        self.block_size = instances[0].block_size
        if name in NEEDS_KEYS:
            for inst in instances:
                inst.core.outbox.subscribe(_Feed(self.state, inst.index))

    def choose(self, session: str, prompt: Sequence[int], loads: Sequence[InstanceLoad]) -> int:
        keys = (hash_blocks(self.namespace, prompt[: len(prompt) - 1], self.block_size)
                if self.name in NEEDS_KEYS else [])
        text = (array("I", prompt).tobytes().decode("latin-1") if self.name == "prefix"
                else "")
        request = RouteRequest(session, prompt, len(prompt), keys, text_chunk_hashes(text),
                               self.block_size)
        return self.policy.choose(request, loads)
