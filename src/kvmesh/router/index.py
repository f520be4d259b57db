"""What the router believes each instance holds. Pure: no sockets, no clock.

- `PrefixIndex` (the `prefix` policy): the router's own, approximate record of the prompts
  it routed, as chained hashes of fixed-size text chunks, per instance, LRU-bounded. It
  needs nothing from the instance, so it works in front of any OpenAI-compatible server;
  it cannot see evictions, so it is right only while the instance's cache is larger than
  what the router remembers for it.
- `KVIndex` (the `kv` policy): exact block keys per instance, fed by the instances' KV
  events (`kvmesh.engine.kv_events`), with per-instance sequence tracking: a gap or a new
  incarnation asks for a snapshot, and the instance counts as holding nothing until then.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field

import xxhash

from kvmesh.engine.kv_events import KeySets, KVEventBatch, KVSnapshot

CHUNK_CHARS = 64  # text per prefix-index entry: finer finds more, costs more memory


def text_chunk_hashes(text: str, chunk_chars: int = CHUNK_CHARS) -> list[int]:
    """Chained 64-bit hashes of each full `chunk_chars` chunk of `text` (a prefix match of
    k chunks means the first k * chunk_chars characters are equal)."""
    raw = text.encode("utf-8", "surrogatepass")
    out: list[int] = []
    h = 0
    for start in range(0, len(raw) - chunk_chars + 1, chunk_chars):
        h = xxhash.xxh3_64_intdigest(raw[start : start + chunk_chars], seed=h)
        out.append(h)
    return out


class PrefixIndex:
    """Per instance, the chunk hashes of prompts routed there (most recent `capacity`)."""

    def __init__(self, capacity_chunks: int = 200_000):
        if capacity_chunks < 1:
            raise ValueError("capacity_chunks must be >= 1")
        self.capacity = capacity_chunks
        self._chunks: dict[int, OrderedDict[int, None]] = {}

    def match(self, instance: int, hashes: Sequence[int]) -> int:
        """How many leading chunks of a prompt the instance is believed to hold."""
        held = self._chunks.get(instance)
        if not held:
            return 0
        n = 0
        for h in hashes:
            if h not in held:
                break
            n += 1
        return n

    def insert(self, instance: int, hashes: Sequence[int]) -> None:
        held = self._chunks.setdefault(instance, OrderedDict())
        for h in hashes:
            held[h] = None
            held.move_to_end(h)
        while len(held) > self.capacity:
            held.popitem(last=False)

    def forget(self, instance: int) -> None:
        """The instance restarted or left: it holds nothing we routed."""
        self._chunks.pop(instance, None)

    def check_integrity(self) -> None:
        for held in self._chunks.values():
            assert len(held) <= self.capacity


@dataclass
class _Feed:
    instance_id: str | None = None
    seq: int = 0
    is_synced: bool = False
    keys: KeySets = field(default_factory=KeySets)
    pending: list[KVEventBatch] = field(default_factory=list)  # while awaiting a snapshot


class KVIndex:
    """Exact per-instance block keys from KV events. `apply` returns True when the caller
    must fetch a snapshot for that instance (a gap, or a new incarnation)."""

    MAX_PENDING = 10_000  # batches held while a snapshot is on its way

    def __init__(self) -> None:
        self._feeds: dict[int, _Feed] = {}
        self.num_resyncs = 0

    def apply(self, instance: int, batch: KVEventBatch) -> bool:
        feed = self._feeds.setdefault(instance, _Feed())
        if not feed.is_synced:
            if len(feed.pending) < self.MAX_PENDING:
                feed.pending.append(batch)
            return False
        if batch.instance_id != feed.instance_id or batch.seq != feed.seq + 1:
            if batch.instance_id == feed.instance_id and batch.seq <= feed.seq:
                return False  # already reflected (a duplicate or one from a snapshot)
            self._desync(feed, batch)
            return True
        feed.keys.apply(batch.events)
        feed.seq = batch.seq
        return False

    def _desync(self, feed: _Feed, batch: KVEventBatch) -> None:
        feed.is_synced = False
        feed.keys = KeySets()
        feed.pending = [batch]
        self.num_resyncs += 1

    def needs_snapshot(self, instance: int) -> bool:
        feed = self._feeds.get(instance)
        return feed is None or not feed.is_synced

    def reset(self, instance: int, snapshot: KVSnapshot) -> bool:
        """A snapshot arrived: it, then the held batches after its `seq` of its incarnation.
        True if those batches have a gap (fetch another snapshot)."""
        feed = self._feeds.setdefault(instance, _Feed())
        feed.keys.reset(snapshot)
        feed.instance_id, feed.seq, feed.is_synced = snapshot.instance_id, snapshot.seq, True
        pending, feed.pending = feed.pending, []
        for batch in sorted(pending, key=lambda b: b.seq):
            is_newer = batch.instance_id == snapshot.instance_id and batch.seq > feed.seq
            if is_newer and self.apply(instance, batch):
                return True
        return False

    def forget(self, instance: int) -> None:
        self._feeds.pop(instance, None)

    def match(self, instance: int, keys: Sequence[bytes]) -> int:
        """Leading blocks of `keys` the instance holds in any medium."""
        feed = self._feeds.get(instance)
        if feed is None or not feed.is_synced:
            return 0
        n = 0
        for key in keys:
            if not feed.keys.holds(key):
                break
            n += 1
        return n

    def num_blocks(self, instance: int) -> int:
        feed = self._feeds.get(instance)
        return feed.keys.num_blocks() if feed is not None else 0

    def check_integrity(self) -> None:
        for feed in self._feeds.values():
            assert feed.seq >= 0
            assert feed.is_synced or not feed.keys.media, "unsynced feed holds keys"
            assert not (feed.is_synced and feed.pending), "synced feed holds batches"
            assert len(feed.pending) <= self.MAX_PENDING
