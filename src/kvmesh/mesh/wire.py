"""The P2P wire format: length-prefixed frames of a msgspec header and raw bytes. Pure.

    frame = u32 header_len | u32 payload_len | header (MessagePack) | payload

The header is one of the tagged structs below; the payload is raw block bytes (only `Block`
carries one). Sizes are bounded before anything is allocated, tighter before the handshake.
"""

from __future__ import annotations

import struct

import msgspec

from kvmesh.engine.kv_events import KVEventBatch, KVSnapshot

PROTOCOL_VERSION = 1
PREFIX = struct.Struct("<II")
MAX_HEADER_BYTES = 16 << 20  # a directory snapshot part of SNAPSHOT_PART_KEYS keys fits
SNAPSHOT_FRAME_BYTES = MAX_HEADER_BYTES - (64 << 10)  # a bigger snapshot goes in parts
SNAPSHOT_PART_KEYS = 200_000  # keys per directory snapshot part (about 4-7 MB of header)
MAX_PAYLOAD_BYTES = 64 << 20  # one KV block
MAX_HANDSHAKE_BYTES = 1024  # before the peer proved the secret
MAX_KEYS_PER_FETCH = 4096


class FrameError(ValueError):
    """A frame that breaks the protocol: the connection is closed."""


class Member(msgspec.Struct, frozen=True, array_like=True):
    node_id: str  # fresh per process start: a restart is a new incarnation
    addr: str  # HOST:PORT of its P2P listener
    http_url: str = ""


class Hello(msgspec.Struct, tag="hello", array_like=True):
    version: int
    nonce: bytes


class Challenge(msgspec.Struct, tag="challenge", array_like=True):
    nonce: bytes
    mac: bytes  # the listener proves the secret first


class Proof(msgspec.Struct, tag="proof", array_like=True):
    mac: bytes
    member: Member


class Welcome(msgspec.Struct, tag="welcome", array_like=True):
    member: Member
    members: list[Member]


class Ping(msgspec.Struct, tag="ping", array_like=True):
    seq: int
    members: list[Member]  # gossip rides on every probe


class Ack(msgspec.Struct, tag="ack", array_like=True):
    seq: int
    members: list[Member]
    dead: list[str]  # node ids this side declared dead
    alive: list[str] = []  # node ids this side heard from lately: they are not dead


class Directory(msgspec.Struct, tag="dir", array_like=True):
    """The sender's KV-event batch or snapshot (kvmesh.engine.kv_events), as bytes. A
    snapshot too big for one header goes in parts (`kv_events.split_snapshot`): part 0
    replaces what the receiver held, parts 1.. add to it."""

    is_snapshot: bool
    data: bytes
    part: int = 0


class Resync(msgspec.Struct, tag="resync", array_like=True):
    """The receiver saw a gap in the sender's directory batches: send a snapshot."""

    seq: int


class Fetch(msgspec.Struct, tag="fetch", array_like=True):
    req: int
    keys: list[bytes]


class Block(msgspec.Struct, tag="block", array_like=True):
    req: int
    index: int
    key: bytes
    digest: int  # xxh3_64 of the payload, as the disk tier's files carry


class Done(msgspec.Struct, tag="done", array_like=True):
    req: int
    num_sent: int  # the run stopped here (the sender no longer holds the next block)
    busy: bool = False  # refused unserved: the holder had too many fetches in flight


class Give(msgspec.Struct, tag="give", array_like=True):
    """A block handed over by a member that is leaving (graceful leave); payload follows."""

    key: bytes
    digest: int


class Leave(msgspec.Struct, tag="leave", array_like=True):
    node_id: str


Message = (Hello | Challenge | Proof | Welcome | Ping | Ack | Directory | Resync | Fetch | Block
           | Done | Give | Leave)

_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(Message)


def encode(msg: Message, payload_len: int = 0) -> bytes:
    """The prefix and header of one frame; the caller sends `payload_len` bytes after."""
    header = _encoder.encode(msg)
    return PREFIX.pack(len(header), payload_len) + header


def check_sizes(header_len: int, payload_len: int, authenticated: bool) -> None:
    limit = MAX_HEADER_BYTES if authenticated else MAX_HANDSHAKE_BYTES
    if header_len == 0 or header_len > limit:
        raise FrameError(f"header of {header_len} bytes (limit {limit})")
    if payload_len > (MAX_PAYLOAD_BYTES if authenticated else 0):
        raise FrameError(f"payload of {payload_len} bytes")


def decode(header: bytes, payload_len: int) -> Message:
    try:
        msg = _decoder.decode(header)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise FrameError(f"undecodable header: {exc}") from None
    if payload_len and not isinstance(msg, Block | Give):
        raise FrameError(f"{type(msg).__name__} carries no payload")
    if isinstance(msg, Fetch) and len(msg.keys) > MAX_KEYS_PER_FETCH:
        raise FrameError(f"fetch of {len(msg.keys)} keys")
    if isinstance(msg, Directory) and (msg.part < 0 or (msg.part and not msg.is_snapshot)):
        raise FrameError(f"directory part {msg.part}")
    return msg


def decode_directory(msg: Directory) -> KVSnapshot | KVEventBatch:
    """The snapshot or event batch a `Directory` frame carries."""
    try:
        return msgspec.msgpack.decode(msg.data, type=KVSnapshot if msg.is_snapshot
                                      else KVEventBatch)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise FrameError(f"bad directory data: {exc}") from None
