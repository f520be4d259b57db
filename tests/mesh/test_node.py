"""Mesh nodes in one process over real loopback sockets: fetches, checksums, stale entries,
membership, the handshake, and a bounded protocol fuzz. The engine side is a dict of blocks."""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import random
import resource
import socket
import struct
import time

import msgspec
import pytest

from kvmesh.engine.kv_events import BlocksRemoved, BlocksStored, KVEventBatch, KVSnapshot
from kvmesh.mesh import fetcher, handshake, wire
from kvmesh.mesh.membership import Membership, State
from kvmesh.mesh.node import MeshConfig, MeshNode
from tests.server_process import free_port

BLOCK = 4096
SECRET = b"0123456789abcdef-test"


class DictBlocks:
    """LocalBlocks over a dict: what an engine would export, numbered like KV events."""

    def __init__(self):
        self.block_bytes = BLOCK
        self.blocks: dict[bytes, bytes] = {}
        self.seq = 0
        self.node: MeshNode | None = None

    def put(self, keys: list[bytes]) -> None:
        for k in keys:
            self.blocks[k] = (k * (BLOCK // len(k) + 1))[:BLOCK]
        self._publish(BlocksStored("host", keys))

    def drop(self, keys: list[bytes]) -> None:
        for k in keys:
            self.blocks.pop(k, None)
        self._publish(BlocksRemoved("host", keys))

    def _publish(self, event) -> None:
        self.seq += 1
        assert self.node is not None
        self.node.publish(KVEventBatch(self.node.me.node_id, self.seq, time.time(), [event]))

    def snapshot(self) -> concurrent.futures.Future:
        fut: concurrent.futures.Future = concurrent.futures.Future()
        fut.set_result(KVSnapshot("x", self.seq, {"host": list(self.blocks)}))
        return fut

    def hottest(self, limit: int) -> concurrent.futures.Future:
        return _done(list(reversed(self.blocks))[:limit])

    def adopt(self, blocks) -> concurrent.futures.Future:
        for key, payload in blocks:
            self.blocks[key] = bytes(payload)
        self._publish(BlocksStored("host", [key for key, _ in blocks]))
        return _done(len(blocks))

    def export(self, keys) -> concurrent.futures.Future:
        out = []
        for k in keys:
            if k not in self.blocks:
                break
            data = self.blocks[k]
            out.append(data)
        fut: concurrent.futures.Future = concurrent.futures.Future()
        fut.set_result(out)
        return fut


def _done(value) -> concurrent.futures.Future:
    fut: concurrent.futures.Future = concurrent.futures.Future()
    fut.set_result(value)
    return fut


def _node(seeds=(), secret=SECRET, **kw) -> tuple[MeshNode, DictBlocks]:
    local = DictBlocks()
    port = free_port()
    timing = dict(probe_interval_s=0.1, suspect_after_s=0.5, dead_after_s=1.5,
                  fetch_stall_timeout_s=2.0)
    cfg = MeshConfig("127.0.0.1", port, secret, tuple(f"127.0.0.1:{p}" for p in seeds),
                     **{**timing, **kw})
    node = MeshNode(cfg, local)
    local.node = node
    node.start()
    return node, local


def _wait(pred, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.05)
    raise AssertionError("timed out")


def _port(node: MeshNode) -> int:
    return node.config.port


KEYS = [os.urandom(16) for _ in range(64)]


@pytest.fixture
def pair():
    a, la = _node()
    b, lb = _node(seeds=[_port(a)])
    yield a, la, b, lb
    b.stop(handoff=False)
    a.stop(handoff=False)


def _fetch(node: MeshNode, holder: str, keys) -> list[bytes | None]:
    futs = node.request(holder, keys)
    return [f.result(timeout=10) for f in futs]


def test_fetch_streams_verified_blocks_and_stops_at_the_first_missing(pair):
    a, la, b, _ = pair
    la.put(KEYS[:40])
    _wait(lambda: b.holders(KEYS[39]) == [a.me.node_id])
    got = _fetch(b, a.me.node_id, KEYS[:40])
    assert got == [la.blocks[k] for k in KEYS[:40]]
    # A stale entry: A dropped block 10 after B's directory listed it. The run stops there.
    la.blocks.pop(KEYS[10])
    got = _fetch(b, a.me.node_id, KEYS[:20])
    assert got[:10] == [la.blocks[k] for k in KEYS[:10]] and got[10:] == [None] * 10
    assert b.stats.blocks_in == 50 and a.stats.blocks_out == 50
    # Removals reach the directory; a resync follows a gap.
    la.drop(KEYS[:5])
    _wait(lambda: not b.holders(KEYS[0]))
    assert b.holders(KEYS[5]) == [a.me.node_id]


class CorruptingNode(MeshNode):
    """Flips a byte of every block after its digest was taken: damage in transit."""

    async def _send_block(self, link, header, data):
        await link.send(header, bytes([data[0] ^ 1]) + data[1:])


def test_blocks_that_fail_their_checksum_are_never_used():
    local = DictBlocks()
    a = CorruptingNode(MeshConfig("127.0.0.1", free_port(), SECRET, probe_interval_s=0.1),
                       local)
    local.node = a
    a.start()
    b, _ = _node(seeds=[_port(a)])
    try:
        local.put(KEYS[:4])
        _wait(lambda: b.holders(KEYS[3]))
        assert _fetch(b, a.me.node_id, KEYS[:4]) == [None] * 4
        assert b.stats.checksum_failures >= 1 and b.stats.blocks_in == 0  # one per burst
    finally:
        b.stop(handoff=False)
        a.stop(handoff=False)


def _holder_and_fetcher(cls, stall_s: float, **attrs):
    """A holder node of class `cls` (with `attrs` set on it) and a node that fetches from
    it with a stall timeout of `stall_s`."""
    local = DictBlocks()
    a = cls(MeshConfig("127.0.0.1", free_port(), SECRET, probe_interval_s=0.1), local)
    for name, value in attrs.items():
        setattr(a, name, value)
    local.node = a
    a.start()
    b, _ = _node(seeds=[_port(a)])
    b._fetcher._stall_s = stall_s
    return a, local, b


class SlowNode(MeshNode):
    """Sends each block `delay` seconds after the last; goes silent from block `stall_at`."""

    delay = 0.25
    stall_at = 10**9

    async def _send_block(self, link, header, data):
        await asyncio.sleep(self.delay if header.index < self.stall_at else 3600)
        await link.send(header, data)


def _timed_fetch_of_twelve(a, local, b) -> tuple[list, float]:
    """`a` holds twelve blocks; `b` fetches them once it knows: the blocks and the seconds."""
    local.put(KEYS[:12])
    _wait(lambda: b.holders(KEYS[11]))
    start = time.monotonic()
    got = _fetch(b, a.me.node_id, KEYS[:12])
    return got, time.monotonic() - start


@pytest.mark.parametrize("stall_at", [None, 6])
def test_a_fetch_times_out_on_a_stall_not_on_a_length_within_the_cap(stall_at):
    """Stall timeout 1 s: twelve blocks 0.25 s apart (3 s in all) arrive in full; a holder
    that goes silent after six gives six blocks and six misses, about 1 s after the last."""
    a, local, b = _holder_and_fetcher(SlowNode, stall_s=1.0, stall_at=stall_at or 10**9)
    try:
        got, took = _timed_fetch_of_twelve(a, local, b)
        n = stall_at or 12
        assert got[:n] == [local.blocks[k] for k in KEYS[:n]]
        assert got[n:] == [None] * (12 - n)
        assert b.stats.fetch_timeouts == (1 if stall_at else 0)
        assert took > 2.5 if not stall_at else 1.0 < took - 0.25 * n < 3.0
    finally:
        b.stop(handoff=False)
        a.stop(handoff=False)


def test_a_fetch_that_keeps_streaming_still_ends_at_its_age_cap(monkeypatch):
    """Blocks 0.25 s apart never stall a 1 s timeout, but a fetch older than the cap (1.6 s
    here, 35 s in service) ends: the blocks in by then are used, the rest are misses."""
    monkeypatch.setattr(fetcher, "FETCH_CAP_S", 1.6)
    a, local, b = _holder_and_fetcher(SlowNode, stall_s=1.0)
    try:
        got, took = _timed_fetch_of_twelve(a, local, b)
        n = sum(g is not None for g in got)
        assert 3 <= n <= 9 and got[n:] == [None] * (12 - n)
        assert got[:n] == [local.blocks[k] for k in KEYS[:n]]
        assert b.stats.fetch_timeouts == 1 and took < 2.8
    finally:
        b.stop(handoff=False)
        a.stop(handoff=False)


def test_fetched_blocks_are_received_into_the_buffers_given(pair):
    """A block with a buffer (a host slot, in the engine) is received into it and resolves
    to that very buffer; one without gets the link's own."""
    a, la, b, _ = pair
    la.put(KEYS[:6])
    _wait(lambda: b.holders(KEYS[5]) == [a.me.node_id])
    intos = [memoryview(bytearray(BLOCK)) if i % 2 == 0 else None for i in range(6)]
    futs = b.request(a.me.node_id, KEYS[:6], intos=intos)
    got = [f.result(timeout=10) for f in futs]
    for i, (payload, into) in enumerate(zip(got, intos, strict=True)):
        assert bytes(payload) == la.blocks[KEYS[i]]
        assert (payload is into) == (i % 2 == 0)


class SplitNode(MeshNode):
    """Sends block `stall_at` in two halves, `pause` seconds apart; the rest whole."""

    stall_at = 1
    pause = 2.0

    async def _send_block(self, link, header, data):
        if header.index != self.stall_at:
            await link.send(header, data)
            return
        half = len(data) // 2
        held: list = []
        link.post = held.append  # control frames posted meanwhile follow the whole block
        link._transport.write(wire.encode(header, len(data)) + data[:half])
        await asyncio.sleep(self.pause)
        link._transport.write(data[half:])
        del link.post
        for msg in held:
            link.post(msg)


def test_a_block_stalled_mid_payload_never_writes_into_its_buffer_after_the_miss():
    """The fetch times out while block 1 is half received into its buffer (a reserved host
    slot that is reused once the read fails). The rest of that payload, arriving later, must
    go elsewhere; the link stays in step and serves the next fetch."""
    a, local, b = _holder_and_fetcher(SplitNode, stall_s=0.5)
    try:
        local.put(KEYS[:3])
        _wait(lambda: b.holders(KEYS[2]))
        intos = [memoryview(bytearray(b"\xab" * BLOCK)) for _ in range(3)]
        futs = b.request(a.me.node_id, KEYS[:3], intos=intos)
        got = [f.result(timeout=10) for f in futs]
        assert got[0] is intos[0] and bytes(got[0]) == local.blocks[KEYS[0]]
        assert got[1:] == [None, None] and b.stats.fetch_timeouts == 1
        at_miss = bytes(intos[1])
        assert at_miss[BLOCK // 2:] == b"\xab" * (BLOCK // 2)  # the second half never came
        time.sleep(a.pause)  # the second half arrives now
        a.stall_at = -1
        again = b.request(a.me.node_id, KEYS[:3])
        assert [bytes(f.result(timeout=10)) for f in again] == [local.blocks[k] for k in KEYS[:3]]
        assert bytes(intos[1]) == at_miss and bytes(intos[2]) == b"\xab" * BLOCK
    finally:
        b.stop(handoff=False)
        a.stop(handoff=False)


def test_graceful_leave_hands_blocks_to_the_members_that_stay():
    # patient failure detection: a member that looks slow under a loaded CPU must not be
    # dropped (and its link with it) just before the hand-off this test checks
    slow = dict(suspect_after_s=3.0, dead_after_s=8.0)
    a, la = _node(**slow)
    b, lb = _node(seeds=[_port(a)], **slow)
    c, lc = _node(seeds=[_port(b)], **slow)
    try:
        # every member alive in every view and linked: the handoff spreads over both
        _wait(lambda: all(len(n.membership.live()) == 2 and len(n._out) == 2
                          for n in (a, b, c)))
        la.put(KEYS[:24])
        _wait(lambda: c.holders(KEYS[23]) == [a.me.node_id])
        _wait(lambda: len(a._out) == 2)
        a.stop()  # hands its 24 blocks over, then leaves
        assert a.stats.blocks_given == 24
        # adoption is counted on receipt and stored in batches: wait for the stored blocks
        _wait(lambda: len(lb.blocks) + len(lc.blocks) == 24)
        assert b.stats.blocks_adopted + c.stats.blocks_adopted == 24
        assert lb.blocks.keys().isdisjoint(lc.blocks)  # each block to one member
        assert len(lb.blocks) > 0 and len(lc.blocks) > 0  # spread by rendezvous hashing
        for k in KEYS[:24]:
            assert (lb.blocks.get(k) or lc.blocks.get(k)) == la.blocks[k]
        # What B adopted is in C's directory now: still a peer hit, from B.
        given_b = [k for k in KEYS[:24] if k in lb.blocks]
        _wait(lambda: all(c.holders(k) == [b.me.node_id] for k in given_b))
        assert _fetch(c, b.me.node_id, given_b) == [la.blocks[k] for k in given_b]
    finally:
        for n in (a, b, c):
            n.stop(handoff=False)


def test_gossip_spreads_membership_and_a_death_is_noticed():
    a, _ = _node()
    b, _ = _node(seeds=[_port(a)])
    c, _ = _node(seeds=[_port(b)])
    nodes = [a, b, c]
    try:
        _wait(lambda: all(len(n.membership.live()) == 2 and len(n._out) == 2 for n in nodes))
        c.stop()
        start = time.monotonic()
        _wait(lambda: c.me.node_id not in a.membership.entries, timeout=10)
        assert time.monotonic() - start < 5  # dead_after_s 1.5 s plus a probe
        for n in (a, b):
            n.membership.check_integrity()
            n.directory.check_integrity()
    finally:
        for n in nodes:
            n.stop(handoff=False)


def test_wrong_secret_gets_nothing():
    a, la = _node()
    la.put(KEYS[:4])
    intruder, _ = _node(seeds=[_port(a)], secret=b"not-the-secret-at-all")
    try:
        _wait(lambda: intruder.stats.handshakes_refused >= 1)
        time.sleep(0.5)
        assert not intruder.membership.entries and not intruder.directory.nodes()
        assert not a.membership.entries  # never admitted
        # A raw client that skips the proof is cut off after the challenge.
        with socket.create_connection(("127.0.0.1", _port(a)), timeout=5) as s:
            s.sendall(wire.encode(wire.Hello(wire.PROTOCOL_VERSION, handshake.nonce())))
            _read_frame(s)  # the challenge
            s.sendall(wire.encode(wire.Proof(b"\0" * 32, wire.Member("evil", "1.2.3.4:1"))))
            assert s.recv(1 << 16) == b""  # closed: no welcome, no member list
        _wait(lambda: a.stats.handshakes_refused >= 1)
    finally:
        intruder.stop(handoff=False)
        a.stop(handoff=False)


def _read_frame(s: socket.socket) -> wire.Message:
    prefix = _recv_exactly(s, wire.PREFIX.size)
    n, payload = wire.PREFIX.unpack(prefix)
    return wire.decode(_recv_exactly(s, n), payload)


def _recv_exactly(s: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = s.recv(n - len(buf))
        if not chunk:
            raise ConnectionError("closed")
        buf += chunk
    return buf


def _fuzz_frames(rng: random.Random, replay: list[bytes]) -> bytes:
    kind = rng.randrange(6)
    if kind == 0:
        return rng.randbytes(rng.randrange(1, 200))
    if kind == 1:  # an oversized header or payload announced
        return struct.pack("<II", rng.choice([1 << 31, wire.MAX_HANDSHAKE_BYTES + 1]),
                           rng.randrange(1 << 32))
    if kind == 2:  # truncated valid frame
        frame = wire.encode(wire.Hello(wire.PROTOCOL_VERSION, handshake.nonce()))
        return frame[:rng.randrange(1, len(frame))]
    if kind == 3:  # a replayed recorded frame
        return rng.choice(replay)
    if kind == 4:  # a frame that is valid msgpack but the wrong message
        return wire.encode(wire.Fetch(1, [b"k" * 16]))
    return wire.encode(wire.Hello(99, b"x"))  # another protocol version


def test_protocol_fuzz_closes_only_the_offending_connection(pair):
    a, la, b, _ = pair
    la.put(KEYS[:8])
    _wait(lambda: b.holders(KEYS[7]))
    rng = random.Random(7)
    replay = [wire.encode(wire.Hello(wire.PROTOCOL_VERSION, handshake.nonce())),
              wire.encode(wire.Proof(os.urandom(32), wire.Member("r", "127.0.0.1:1")))]
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    deadline = time.monotonic() + 20
    for _ in range(300):
        if time.monotonic() > deadline:
            break
        with socket.create_connection(("127.0.0.1", _port(a)), timeout=5) as s:
            s.settimeout(5)
            try:
                s.sendall(_fuzz_frames(rng, replay))
                s.shutdown(socket.SHUT_WR)
                while s.recv(1 << 16):  # the node answers or closes; it never hangs
                    pass
            except (ConnectionResetError, BrokenPipeError):
                pass
    grown_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before
    assert grown_kb < 64 * 1024  # nothing announced-but-unsent was allocated
    assert a.stats.bad_frames > 0
    # The legitimate link is untouched.
    assert _fetch(b, a.me.node_id, KEYS[:8]) == [la.blocks[k] for k in KEYS[:8]]
    assert not a._inbound - {link for link in a._inbound if link.authenticated}


def _authenticated_socket(port: int, name: str) -> socket.socket:
    """A raw client that knows the secret and completes the handshake by hand."""
    s = socket.create_connection(("127.0.0.1", port), timeout=5)
    mine = handshake.nonce()
    s.sendall(wire.encode(wire.Hello(wire.PROTOCOL_VERSION, mine)))
    challenge = _read_frame(s)
    assert isinstance(challenge, wire.Challenge)
    s.sendall(wire.encode(wire.Proof(handshake.mac(SECRET, b"D", mine, challenge.nonce),
                                     wire.Member(name, f"127.0.0.1:{free_port()}"))))
    assert isinstance(_read_frame(s), wire.Welcome)
    return s


def _authenticated_garbage(rng: random.Random) -> bytes:
    kind = rng.randrange(7)
    if kind == 0:
        return rng.randbytes(rng.randrange(1, 400))
    if kind == 1:  # sizes past the authenticated bounds
        return struct.pack("<II", wire.MAX_HEADER_BYTES + 1, 0) if rng.random() < 0.5 \
            else struct.pack("<II", 8, wire.MAX_PAYLOAD_BYTES + 1)
    if kind == 2:  # a payload on a message that carries none
        return wire.encode(wire.Ping(1, []), 16) + b"x" * 16
    if kind == 3:  # directory data that is not a batch
        return wire.encode(wire.Directory(rng.random() < 0.5, rng.randbytes(40)))
    if kind == 4:  # too many keys in one fetch
        return wire.encode(wire.Fetch(1, [b"k" * 16] * (wire.MAX_KEYS_PER_FETCH + 1)))
    if kind == 5:  # a gift whose digest is wrong: dropped, counted
        return wire.encode(wire.Give(b"g" * 16, 12345), BLOCK) + b"\0" * BLOCK
    frame = wire.encode(wire.Fetch(2, [os.urandom(16) for _ in range(8)]))  # unknown keys
    return frame[:rng.randrange(1, len(frame))]  # ... cut short


def test_fuzz_after_the_handshake_closes_only_that_connection(pair):
    """A member that turns hostile (it has the secret) sends garbage after the handshake:
    its connection closes, nothing it sent is kept, and the real member is unaffected."""
    a, la, b, _ = pair
    la.put(KEYS[:8])
    _wait(lambda: b.holders(KEYS[7]))
    rng = random.Random(11)
    deadline = time.monotonic() + 20
    for i in range(60):
        if time.monotonic() > deadline:
            break
        s = _authenticated_socket(_port(a), f"fuzz{i}")
        with s:
            try:
                s.sendall(_authenticated_garbage(rng))
                s.shutdown(socket.SHUT_WR)
                while s.recv(1 << 16):  # answered or closed; never a hang
                    pass
            except (ConnectionResetError, BrokenPipeError):
                pass
    assert a.stats.bad_frames > 0 and a.stats.blocks_adopted == 0
    assert b"g" * 16 not in la.blocks
    assert _fetch(b, a.me.node_id, KEYS[:8]) == [la.blocks[k] for k in KEYS[:8]]
    with a.lock:
        a.membership.check_integrity()
        a.directory.check_integrity()


def test_membership_suspects_before_it_buries_and_restarts_replace():
    now = [0.0]
    me = wire.Member("me", "h:1")
    m = Membership(me, clock=lambda: now[0], suspect_after_s=1.0, dead_after_s=3.0)
    new, replaced = m.learn([wire.Member("p1", "h:2"), wire.Member("p2", "h:3"), me])
    assert [x.node_id for x in new] == ["p1", "p2"] and replaced == []
    now[0] = 1.5
    m.heard("p2")
    assert m.tick() == [] and m.state("p1") is State.SUSPECT and m.state("p2") is State.ALIVE
    assert not m.rumor_dead("p2")  # heard lately: a rumor does not kill it
    now[0] = 3.2
    assert m.tick() == ["p1"] and m.state("p1") is State.DEAD
    assert m.learn([wire.Member("p1", "h:2")]) == ([], [])  # no resurrection
    _, replaced = m.learn([wire.Member("p2-new", "h:3")])  # p2 restarted
    assert replaced == ["p2"] and m.state("p2-new") is State.ALIVE
    m.check_integrity()


def test_silent_sockets_are_capped_and_members_keep_their_links(pair):
    """Sockets that never finish a handshake: beyond MAX_UNAUTHENTICATED they are closed at
    once, the rest after the handshake timeout; the member already linked is untouched."""
    from kvmesh.mesh.inbound import MAX_UNAUTHENTICATED

    a, la, b, _ = pair
    la.put(KEYS[:4])
    _wait(lambda: b.holders(KEYS[3]))
    socks = [socket.create_connection(("127.0.0.1", _port(a)), timeout=5)
             for _ in range(MAX_UNAUTHENTICATED + 8)]
    try:
        closed = 0
        for s in socks[-8:]:  # the last ones found no slot
            s.settimeout(5)
            closed += s.recv(1) == b""
        assert closed == 8
        assert sum(not link.authenticated for link in a._inbound) == MAX_UNAUTHENTICATED
        assert _fetch(b, a.me.node_id, KEYS[:4]) == [la.blocks[k] for k in KEYS[:4]]
    finally:
        for s in socks:
            s.close()


def test_membership_vouching_tombstone_expiry_and_revival():
    """SWIM's indirect evidence: a member another member heard lately stays suspect, not
    dead; tombstones expire; its own link revives a member buried by mistake."""
    now = [0.0]
    me = wire.Member("me", "h:1")
    m = Membership(me, clock=lambda: now[0], suspect_after_s=1.0, dead_after_s=3.0,
                   tombstone_ttl_s=10.0)
    m.learn([wire.Member("p1", "h:2"), wire.Member("p2", "h:3")])
    now[0] = 2.5
    m.heard("p2")
    m.vouch(["p1", "unknown"])  # p2's answer: it heard p1 lately (our link to p1 is bad)
    now[0] = 3.2
    assert m.tick() == [] and m.state("p1") is State.SUSPECT  # vouched: not dead yet
    assert m.fresh() == ["p2"]
    now[0] = 3.6  # the vouch is older than suspect_after_s now
    assert m.tick() == ["p1"] and "p1" in m.tombstones
    assert m.learn([wire.Member("p1", "h:2")]) == ([], [])  # gossip does not resurrect
    assert m.revive(wire.Member("p1", "h:2")) == []  # its own link does
    assert m.state("p1") is State.ALIVE and "p1" not in m.tombstones
    now[0] = 10.0
    assert sorted(m.tick()) == ["p1", "p2"]  # both silent since 3.6 and 2.5
    now[0] = 19.9
    m.tick()
    assert set(m.tombstones) == {"p1", "p2"}  # buried at 10.0, kept for 10 s
    now[0] = 20.1
    m.tick()
    assert not m.tombstones  # expired: gossip may introduce them again
    m.check_integrity()


def test_wire_bounds():
    with pytest.raises(wire.FrameError):
        wire.check_sizes(wire.MAX_HANDSHAKE_BYTES + 1, 0, authenticated=False)
    with pytest.raises(wire.FrameError):
        wire.check_sizes(10, 1, authenticated=False)
    with pytest.raises(wire.FrameError):
        wire.check_sizes(10, wire.MAX_PAYLOAD_BYTES + 1, authenticated=True)
    frame = wire.encode(wire.Fetch(1, [b"k" * 16] * (wire.MAX_KEYS_PER_FETCH + 1)))
    with pytest.raises(wire.FrameError):
        wire.decode(frame[wire.PREFIX.size:], 0)
    with pytest.raises(wire.FrameError):
        wire.decode(msgspec.msgpack.encode({"x": 1}), 0)
