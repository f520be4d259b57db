"""On-disk block format: a fixed header with the key and a checksum, then the raw bytes.

    magic "KVMB" | version u16 | reserved u16 | key 16B | payload_len u64 | xxh3_64 u64
"""

from __future__ import annotations

import struct

import xxhash

from kvmesh.hashing import BlockKey

MAGIC = b"KVMB"
VERSION = 1
HEADER = struct.Struct("<4sHH16sQQ")
HEADER_BYTES = HEADER.size


class CorruptBlockError(ValueError):
    """A block file is truncated, mislabelled or fails its checksum."""


def encode_header(key: BlockKey, payload: bytes | memoryview) -> bytes:
    return HEADER.pack(MAGIC, VERSION, 0, key, len(payload), xxhash.xxh3_64_intdigest(payload))


def decode(key: BlockKey, blob: bytes, expected_len: int) -> memoryview:
    """Verify a whole file's bytes and return its payload. Raises CorruptBlockError."""
    if len(blob) < HEADER_BYTES:
        raise CorruptBlockError("truncated header")
    magic, version, _, stored_key, length, digest = HEADER.unpack_from(blob)
    if magic != MAGIC or version != VERSION:
        raise CorruptBlockError("bad magic or version")
    if stored_key != key:
        raise CorruptBlockError("key mismatch")
    if length != expected_len or len(blob) != HEADER_BYTES + length:
        raise CorruptBlockError(f"length {len(blob) - HEADER_BYTES}, expected {expected_len}")
    payload = memoryview(blob)[HEADER_BYTES:]
    if xxhash.xxh3_64_intdigest(payload) != digest:
        raise CorruptBlockError("checksum mismatch")
    return payload
