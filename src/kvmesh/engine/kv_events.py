"""The KV-event wire schema (msgspec, MessagePack): what an instance publishes for the router.

An instance publishes one `KVEventBatch` per outbox drain on its ZeroMQ PUB socket
(`kvmesh serve --kv-events-port`). Consumers keep, per instance, the set of block keys each
medium holds:

- `BlocksStored(medium, keys)`: `medium` now holds `keys`;
- `BlocksRemoved(medium, keys)`: it no longer does;
- `MediumCleared(medium)`: it dropped everything.

Media are "device", "host" and "disk". Keys are the 16-byte block keys of `kvmesh.hashing`
(the tenant's cache salt is folded in, so they reveal no prompt text). `seq` counts batches
from 1 for each `instance_id` (a fresh random id per process start). A consumer that sees
a new `instance_id` or a gap in `seq` fetches a `KVSnapshot` (`GET /kv/snapshot` on the
instance, MessagePack) and applies the batches after its `seq`. Applying a batch is a set
operation, so a batch applied on top of a snapshot that already reflects it is harmless.

Pure: msgspec only, no sockets.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import msgspec

from kvmesh.engine.events import AllCleared, BlockEvent, BlockRemoved, BlockStored

SCHEMA_VERSION = 1


class BlocksStored(msgspec.Struct, tag="stored", array_like=True, frozen=True):
    medium: str
    keys: list[bytes]


class BlocksRemoved(msgspec.Struct, tag="removed", array_like=True, frozen=True):
    medium: str
    keys: list[bytes]


class MediumCleared(msgspec.Struct, tag="cleared", array_like=True, frozen=True):
    medium: str


WireEvent = BlocksStored | BlocksRemoved | MediumCleared


class KVEventBatch(msgspec.Struct, frozen=True):
    instance_id: str
    seq: int
    ts: float
    events: list[WireEvent]
    version: int = SCHEMA_VERSION


class KVSnapshot(msgspec.Struct, frozen=True):
    """Everything an instance holds, as of batch `seq` (every batch up to it reflected)."""

    instance_id: str
    seq: int
    media: dict[str, list[bytes]]
    version: int = SCHEMA_VERSION


def to_wire(events: Sequence[BlockEvent]) -> list[WireEvent]:
    """Outbox events as wire events, runs of one kind and medium folded into one."""
    out: list[WireEvent] = []
    for ev in events:
        if isinstance(ev, AllCleared):
            out.append(MediumCleared(ev.medium))
            continue
        kind = BlocksStored if isinstance(ev, BlockStored) else BlocksRemoved
        last = out[-1] if out else None
        if type(last) is kind and last.medium == ev.medium:
            last.keys.append(ev.key)
        else:
            out.append(kind(ev.medium, [ev.key]))
    return out


def split_snapshot(snap: KVSnapshot, max_keys: int) -> list[KVSnapshot]:
    """`snap` as parts of at most `max_keys` keys each (at least one part), all with its
    instance and seq: the first stands for the snapshot, the rest add to it."""
    if max_keys < 1:
        raise ValueError("max_keys must be >= 1")
    parts: list[dict[str, list[bytes]]] = []
    current: dict[str, list[bytes]] = {}
    count = 0
    for medium, keys in snap.media.items():
        current.setdefault(medium, [])
        start = 0
        while True:
            take = keys[start:start + max_keys - count]
            current[medium].extend(take)
            count += len(take)
            start += len(take)
            if start >= len(keys):
                break
            parts.append(current)
            current, count = {medium: []}, 0
    parts.append(current)
    return [KVSnapshot(snap.instance_id, snap.seq, media, snap.version) for media in parts]


class KeySets:
    """Per medium, the keys one instance holds, kept from batches and snapshots."""

    def __init__(self) -> None:
        self.media: dict[str, set[bytes]] = {}

    def apply(self, events: Iterable[WireEvent]) -> None:
        for ev in events:
            if isinstance(ev, MediumCleared):
                self.media.pop(ev.medium, None)
            elif isinstance(ev, BlocksStored):
                self.media.setdefault(ev.medium, set()).update(ev.keys)
            else:
                self.media.get(ev.medium, set()).difference_update(ev.keys)

    def reset(self, snapshot: KVSnapshot) -> None:
        self.media = {m: set(keys) for m, keys in snapshot.media.items()}

    def holds(self, key: bytes) -> bool:
        return any(key in keys for keys in self.media.values())

    def num_blocks(self) -> int:
        return sum(len(k) for k in self.media.values())


__all__ = ["BlockRemoved", "BlocksRemoved", "BlocksStored", "KVEventBatch", "KVSnapshot",
           "KeySets", "MediumCleared", "split_snapshot", "to_wire"]
