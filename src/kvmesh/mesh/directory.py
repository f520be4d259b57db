"""Which peer holds which block: a per-peer copy of each peer's own block sets. Pure.

Each peer pushes its KV events (the `kvmesh.engine.kv_events` schema the router reads) to
every member over the authenticated link: a snapshot when the link opens, then batches. A
lookup is local (zero round trips). A stale entry costs one wasted fetch (the holder
answers that it no longer holds the block), never a wrong block: the fetched bytes are
checked against their key's checksum. Entries from a dead or restarted peer are dropped.
"""

from __future__ import annotations

from kvmesh.engine.kv_events import (
    BlocksStored,
    KeySets,
    KVEventBatch,
    KVSnapshot,
    MediumCleared,
)

# What a peer can hand out: its device cache (copied out between steps), host and disk.
SERVABLE = ("device", "host", "disk")


class Directory:
    """Per peer, its block sets by medium (as its events say); and an inverted index
    key -> holders, so a lookup costs the same with 3 peers or 1,000."""

    def __init__(self) -> None:
        self._sets: dict[str, KeySets] = {}
        self._seq: dict[str, int] = {}
        self._holders: dict[bytes, Held] = {}  # one holder: its id; more: a tuple
        self.num_gaps = 0

    def reset(self, node_id: str, snap: KVSnapshot) -> None:
        old = self._sets.get(node_id)
        sets = KeySets()
        sets.reset(snap)
        self._sets[node_id] = sets
        self._seq[node_id] = snap.seq
        touched = _servable(sets) | (_servable(old) if old is not None else set())
        self._reindex(node_id, sets, touched)

    def extend(self, node_id: str, part: KVSnapshot) -> bool:
        """A later part of the snapshot `reset` began: its keys join the peer's sets.
        False (and nothing done) if it belongs to another snapshot than the one held."""
        if self._seq.get(node_id) != part.seq:
            return False
        sets = self._sets[node_id]
        sets.apply([BlocksStored(m, keys) for m, keys in part.media.items()])
        self._reindex(node_id, sets, {k for keys in part.media.values() for k in keys})
        return True

    def apply(self, node_id: str, batch: KVEventBatch) -> bool:
        """Apply one batch; False if it is out of order (the link is then resynced)."""
        seq = self._seq.get(node_id)
        if seq is None or batch.seq != seq + 1:
            if seq is not None and batch.seq <= seq:
                return True  # already reflected by the snapshot
            self.num_gaps += 1
            return False
        sets = self._sets[node_id]
        touched: set[bytes] = set()
        for ev in batch.events:
            if isinstance(ev, MediumCleared):
                touched |= sets.media.get(ev.medium, set())
            else:
                touched.update(ev.keys)
        sets.apply(batch.events)
        self._seq[node_id] = batch.seq
        self._reindex(node_id, sets, touched)
        return True

    def forget(self, node_id: str) -> None:
        sets = self._sets.pop(node_id, None)
        self._seq.pop(node_id, None)
        if sets is not None:
            for key in _servable(sets):
                self._unlist(node_id, key)

    def holders(self, key: bytes) -> list[str]:
        return _ids(self._holders.get(key))

    def nodes(self) -> list[str]:
        return list(self._sets)

    def num_blocks(self, node_id: str) -> int:
        sets = self._sets.get(node_id)
        return sets.num_blocks() if sets is not None else 0

    def _reindex(self, node_id: str, sets: KeySets, keys: set[bytes]) -> None:
        servable = [sets.media.get(m, set()) for m in SERVABLE]
        for key in keys:
            if any(key in media for media in servable):
                held = _ids(self._holders.get(key))
                if node_id not in held:
                    self._holders[key] = (*held, node_id) if held else node_id
            else:
                self._unlist(node_id, key)

    def _unlist(self, node_id: str, key: bytes) -> None:
        held = _ids(self._holders.get(key))
        if node_id in held:
            rest = [n for n in held if n != node_id]
            if not rest:
                del self._holders[key]
            else:
                self._holders[key] = rest[0] if len(rest) == 1 else tuple(rest)

    def check_integrity(self) -> None:
        assert set(self._sets) == set(self._seq)
        servable = {n: _servable(s) for n, s in self._sets.items()}
        listed = sum(len(_ids(h)) for h in self._holders.values())
        assert listed == sum(len(keys) for keys in servable.values()), "index drift"
        for key, value in self._holders.items():
            held = _ids(value)
            assert held and len(set(held)) == len(held)
            assert isinstance(value, str) or len(value) > 1
            assert all(key in servable[n] for n in held), "stale index entry"


Held = str | tuple[str, ...]


def _ids(held: Held | None) -> list[str]:
    if held is None:
        return []
    return [held] if isinstance(held, str) else list(held)


def _servable(sets: KeySets) -> set[bytes]:
    out: set[bytes] = set()
    for m in SERVABLE:
        out |= sets.media.get(m, set())
    return out
