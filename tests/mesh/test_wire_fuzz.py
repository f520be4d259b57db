"""The mesh protocol under hostile input (real loopback sockets): a wrong secret, garbage
before and after the handshake, silent sockets, and the wire format's bounds."""

from __future__ import annotations

import os
import random
import resource
import socket
import struct
import time

import msgspec
import pytest

from kvmesh.engine.kv_events import KVSnapshot, split_snapshot
from kvmesh.mesh import handshake, wire
from tests.mesh.nodes import (
    BLOCK,
    KEYS,
    SECRET,
    fetch_all,
    make_node,
    port_of,
    wait_until,
)
from tests.server_process import free_port


def test_wrong_secret_gets_nothing():
    a, la = make_node()
    la.put(KEYS[:4])
    intruder, _ = make_node(seeds=[port_of(a)], secret=b"not-the-secret-at-all")
    try:
        wait_until(lambda: intruder.stats.handshakes_refused >= 1)
        time.sleep(0.5)
        assert not intruder.membership.entries and not intruder.directory.nodes()
        assert not a.membership.entries  # never admitted
        # A raw client that skips the proof is cut off after the challenge.
        with socket.create_connection(("127.0.0.1", port_of(a)), timeout=5) as s:
            s.sendall(wire.encode(wire.Hello(wire.PROTOCOL_VERSION, handshake.nonce())))
            _read_frame(s)  # the challenge
            s.sendall(wire.encode(wire.Proof(b"\0" * 32, wire.Member("evil", "1.2.3.4:1"))))
            assert s.recv(1 << 16) == b""  # closed: no welcome, no member list
        wait_until(lambda: a.stats.handshakes_refused >= 1)
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
    wait_until(lambda: b.holders(KEYS[7]))
    rng = random.Random(7)
    replay = [wire.encode(wire.Hello(wire.PROTOCOL_VERSION, handshake.nonce())),
              wire.encode(wire.Proof(os.urandom(32), wire.Member("r", "127.0.0.1:1")))]
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    deadline = time.monotonic() + 20
    for _ in range(300):
        if time.monotonic() > deadline:
            break
        with socket.create_connection(("127.0.0.1", port_of(a)), timeout=5) as s:
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
    assert fetch_all(b, a.me.node_id, KEYS[:8]) == [la.blocks[k] for k in KEYS[:8]]
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
    wait_until(lambda: b.holders(KEYS[7]))
    rng = random.Random(11)
    deadline = time.monotonic() + 20
    for i in range(60):
        if time.monotonic() > deadline:
            break
        s = _authenticated_socket(port_of(a), f"fuzz{i}")
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
    assert fetch_all(b, a.me.node_id, KEYS[:8]) == [la.blocks[k] for k in KEYS[:8]]
    with a.lock:
        a.membership.check_integrity()
        a.directory.check_integrity()


def test_silent_sockets_are_capped_and_members_keep_their_links(pair):
    """Sockets that never finish a handshake: beyond MAX_UNAUTHENTICATED they are closed at
    once, the rest after the handshake timeout; the member already linked is untouched."""
    from kvmesh.mesh.inbound import MAX_UNAUTHENTICATED

    a, la, b, _ = pair
    la.put(KEYS[:4])
    wait_until(lambda: b.holders(KEYS[3]))
    socks = [socket.create_connection(("127.0.0.1", port_of(a)), timeout=5)
             for _ in range(MAX_UNAUTHENTICATED + 8)]
    try:
        closed = 0
        for s in socks[-8:]:  # the last ones found no slot
            s.settimeout(5)
            closed += s.recv(1) == b""
        assert closed == 8
        assert sum(not link.authenticated for link in a._inbound) == MAX_UNAUTHENTICATED
        assert fetch_all(b, a.me.node_id, KEYS[:4]) == [la.blocks[k] for k in KEYS[:4]]
    finally:
        for s in socks:
            s.close()


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
    for bad in (wire.Directory(True, b"", -1), wire.Directory(False, b"", 2)):
        with pytest.raises(wire.FrameError, match="directory part"):
            wire.decode(wire.encode(bad)[wire.PREFIX.size:], 0)
    # a directory frame from a sender without parts decodes as a whole snapshot (part 0)
    old = msgspec.msgpack.encode(["dir", True, b"x"])
    assert wire.decode(old, 0) == wire.Directory(True, b"x", 0)
    # a snapshot of the most keys a part holds fits a frame header, with room to spare
    part = KVSnapshot("i" * 32, 1, {"disk": [b"k" * 32] * wire.SNAPSHOT_PART_KEYS})
    frame = wire.encode(wire.Directory(True, msgspec.msgpack.encode(part)))
    assert len(frame) < wire.MAX_HEADER_BYTES // 2


def test_a_snapshot_splits_into_bounded_parts_that_add_up_to_it():
    snap = KVSnapshot("i", 5, {"host": [bytes([i]) for i in range(10)], "disk": [],
                               "device": [b"x", b"y", b"z"]})
    for size in (1, 3, 4, 13, 100):
        parts = split_snapshot(snap, size)
        assert len(parts) == max(1, -(-13 // size))
        assert all(p.seq == 5 and p.instance_id == "i" for p in parts)
        assert all(sum(map(len, p.media.values())) <= size for p in parts)
        joined: dict[str, list[bytes]] = {m: [] for m in snap.media}
        for p in parts:
            for m, keys in p.media.items():
                joined[m] += keys
        assert joined == snap.media
    assert split_snapshot(KVSnapshot("i", 1, {}), 4) == [KVSnapshot("i", 1, {})]
    with pytest.raises(ValueError):
        split_snapshot(snap, 0)
