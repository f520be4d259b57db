"""Which peer holds which block: a per-peer copy of each peer's own block sets. Pure.

Each peer pushes its KV events (the `kvmesh.engine.kv_events` schema the router reads) to
every member over the authenticated link: a snapshot when the link opens, then batches. A
lookup is local (zero round trips). A stale entry costs one wasted fetch (the holder
answers that it no longer holds the block), never a wrong block: the fetched bytes are
checked against their key's checksum. Entries from a dead or restarted peer are dropped.
"""

from __future__ import annotations

from collections.abc import Sequence

from kvmesh.engine.kv_events import KeySets, KVEventBatch, KVSnapshot

# What a peer can hand out: its device cache (copied out between steps), host and disk.
SERVABLE = ("device", "host", "disk")


class Directory:
    def __init__(self) -> None:
        self._sets: dict[str, KeySets] = {}
        self._seq: dict[str, int] = {}
        self.num_gaps = 0

    def reset(self, node_id: str, snap: KVSnapshot) -> None:
        sets = KeySets()
        sets.reset(snap)
        self._sets[node_id] = sets
        self._seq[node_id] = snap.seq

    def apply(self, node_id: str, batch: KVEventBatch) -> bool:
        """Apply one batch; False if it is out of order (the link is then resynced)."""
        seq = self._seq.get(node_id)
        if seq is None or batch.seq != seq + 1:
            if seq is not None and batch.seq <= seq:
                return True  # already reflected by the snapshot
            self.num_gaps += 1
            return False
        self._sets[node_id].apply(batch.events)
        self._seq[node_id] = batch.seq
        return True

    def forget(self, node_id: str) -> None:
        self._sets.pop(node_id, None)
        self._seq.pop(node_id, None)

    def holders(self, key: bytes) -> list[str]:
        return [n for n, sets in self._sets.items()
                if any(key in sets.media.get(m, ()) for m in SERVABLE)]

    def holds(self, node_id: str, key: bytes) -> bool:
        sets = self._sets.get(node_id)
        return sets is not None and any(key in sets.media.get(m, ()) for m in SERVABLE)

    def run_length(self, node_id: str, keys: Sequence[bytes]) -> int:
        n = 0
        while n < len(keys) and self.holds(node_id, keys[n]):
            n += 1
        return n

    def nodes(self) -> list[str]:
        return list(self._sets)

    def num_blocks(self, node_id: str) -> int:
        sets = self._sets.get(node_id)
        return sets.num_blocks() if sets is not None else 0

    def check_integrity(self) -> None:
        assert set(self._sets) == set(self._seq)
