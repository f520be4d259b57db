"""Who is in the mesh, and who is alive. Pure: no sockets, an injected clock.

Failure detection in the SWIM manner: every node probes its members every
`probe_interval_s` and gossips the member list on each probe and answer. A member not
heard from for `suspect_after_s` is suspect; after `dead_after_s` it is dead (its directory
entries are dropped and its death is gossiped) unless another member vouched for it within
`suspect_after_s`: every answer names the members its sender heard from lately, which is
SWIM's indirect probe riding on the probes that run anyway. So a slow member, or one whose
link to this node alone is broken, stays suspect instead of dying. A restarted member comes
back under a new node id at the same address; its old life is dead at once. Tombstones stop
gossip from resurrecting the dead, and expire after `tombstone_ttl_s`; direct contact (an
authenticated link from the member itself) revives a member declared dead by mistake.
"""

from __future__ import annotations

import enum
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from kvmesh.mesh.wire import Member

MAX_TOMBSTONES = 4096
TOMBSTONE_TTL_S = 60.0


class State(enum.Enum):
    ALIVE = "alive"
    SUSPECT = "suspect"
    DEAD = "dead"


@dataclass
class Entry:
    member: Member
    state: State
    last_heard: float


class Membership:
    def __init__(self, me: Member, clock: Callable[[], float] = time.monotonic,
                 suspect_after_s: float = 1.5, dead_after_s: float = 4.0,
                 tombstone_ttl_s: float = TOMBSTONE_TTL_S):
        if not 0 < suspect_after_s < dead_after_s:
            raise ValueError("need 0 < suspect_after_s < dead_after_s")
        self.me = me
        self.clock = clock
        self.suspect_after_s = suspect_after_s
        self.dead_after_s = dead_after_s
        self.tombstone_ttl_s = tombstone_ttl_s
        self.entries: dict[str, Entry] = {}
        self.tombstones: dict[str, float] = {}  # dead node id -> when; not readmitted by gossip
        self.vouched: dict[str, float] = {}  # node id -> when another member last heard it

    def learn(self, members: Iterable[Member]) -> tuple[list[Member], list[str]]:
        """Merge a gossiped list: (members new to us, node ids they replace: restarts)."""
        new, replaced = [], []
        for m in members:
            if m.node_id == self.me.node_id or m.node_id in self.tombstones \
                    or m.addr == self.me.addr:  # our own earlier life: it is gone
                continue
            if m.node_id in self.entries:
                continue
            for old in [e for e in self.entries.values() if e.member.addr == m.addr]:
                self._bury(old.member.node_id)
                replaced.append(old.member.node_id)
            # Heard of, not from: it must answer a probe before it counts as alive long.
            self.entries[m.node_id] = Entry(m, State.ALIVE, self.clock())
            new.append(m)
        return new, replaced

    def revive(self, member: Member) -> list[str]:
        """Direct contact from `member` (its own authenticated link): alive, even if it was
        declared dead. The node ids it replaces (earlier lives of its address)."""
        if member.node_id == self.me.node_id:
            return []
        self.tombstones.pop(member.node_id, None)
        _, replaced = self.learn([member])
        self.heard(member.node_id)
        return replaced

    def vouch(self, node_ids: Iterable[str]) -> None:
        """Another member heard from these lately (its answer to our probe says so)."""
        now = self.clock()
        for node_id in node_ids:
            if node_id in self.entries:
                self.vouched[node_id] = now

    def fresh(self) -> list[str]:
        """The members this node heard from within `suspect_after_s` (for its answers)."""
        now = self.clock()
        return [n for n, e in self.entries.items() if now - e.last_heard < self.suspect_after_s]

    def heard(self, node_id: str) -> bool:
        """A frame from `node_id`; False if it is not a member (dead to us, or unknown)."""
        entry = self.entries.get(node_id)
        if entry is None:
            return False
        entry.last_heard = self.clock()
        entry.state = State.ALIVE
        return True

    def silent_for(self, node_id: str) -> float:
        entry = self.entries.get(node_id)
        return self.clock() - entry.last_heard if entry is not None else float("inf")

    def rumor_dead(self, node_id: str) -> bool:
        """Another member declared `node_id` dead; believed unless we heard it lately."""
        entry = self.entries.get(node_id)
        if entry is None or self.clock() - entry.last_heard < self.suspect_after_s:
            return False
        self._bury(node_id)
        return True

    def leave(self, node_id: str) -> None:
        if node_id in self.entries:
            self._bury(node_id)

    def tick(self) -> list[str]:
        """Update states from silence; the node ids that just died."""
        now, died = self.clock(), []
        for node_id, entry in list(self.entries.items()):
            silent = now - entry.last_heard
            vouched = now - self.vouched.get(node_id, -1e18) < self.suspect_after_s
            if silent >= self.dead_after_s and not vouched:
                self._bury(node_id)
                died.append(node_id)
            elif silent >= self.suspect_after_s:
                entry.state = State.SUSPECT
        while self.tombstones:
            oldest, since = next(iter(self.tombstones.items()))
            if now - since < self.tombstone_ttl_s:
                break
            del self.tombstones[oldest]
        return died

    def _bury(self, node_id: str) -> None:
        self.entries.pop(node_id, None)
        self.vouched.pop(node_id, None)
        self.tombstones.pop(node_id, None)  # re-inserted last: the dict stays oldest first
        self.tombstones[node_id] = self.clock()
        if len(self.tombstones) > MAX_TOMBSTONES:
            self.tombstones.pop(next(iter(self.tombstones)))

    def members(self) -> list[Member]:
        """Everyone not dead, self included (what gossip carries)."""
        return [self.me, *(e.member for e in self.entries.values())]

    def live(self) -> list[Member]:
        return [e.member for e in self.entries.values() if e.state is State.ALIVE]

    def state(self, node_id: str) -> State:
        entry = self.entries.get(node_id)
        return entry.state if entry is not None else State.DEAD

    def recent_dead(self, n: int = 32) -> list[str]:
        return list(self.tombstones)[-n:]

    def check_integrity(self) -> None:
        assert self.me.node_id not in self.entries
        assert not set(self.entries) & set(self.tombstones), "a dead member is listed"
        assert set(self.vouched) <= set(self.entries)
        addrs = [e.member.addr for e in self.entries.values()]
        assert len(addrs) == len(set(addrs)), "two lives of one address"
