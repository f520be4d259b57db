"""The one block-key scheme, shared by the prefix cache, tiers, peers, router and simulator.

    key_i = xxh3_128(key_{i-1} || namespace || token_ids of block i)

Keys are 16-byte digests, stable across processes and machines (never Python's hash()).
The namespace folds in the model identity, the KV dtype and layout, and the tenant's cache
salt, so a block can only be matched by requests that would compute identical KV for it.
"""

from __future__ import annotations

import sys
from array import array
from collections.abc import Sequence
from typing import NewType

import xxhash

BlockKey = NewType("BlockKey", bytes)
Namespace = NewType("Namespace", bytes)

_ROOT = b"kvmesh-root-v1"


def make_namespace(
    model_id: str, kv_dtype: str, layout: str, cache_salt: str | None = None
) -> Namespace:
    """A 16-byte namespace digest. Every field must be a stable, portable string."""
    parts = [model_id, kv_dtype, layout, cache_salt or ""]
    h = xxhash.xxh3_128()
    for part in parts:
        raw = part.encode("utf-8")
        h.update(len(raw).to_bytes(4, "little"))
        h.update(raw)
    return Namespace(h.digest())


def _token_bytes(token_ids: Sequence[int]) -> bytes:
    packed = array("I", token_ids)
    if sys.byteorder != "little":
        packed.byteswap()
    return packed.tobytes()


def hash_block(parent: BlockKey | None, namespace: Namespace, token_ids: Sequence[int]) -> BlockKey:
    """Key of one block, chained on its parent's key (None for the first block)."""
    h = xxhash.xxh3_128(parent or _ROOT)
    h.update(namespace)
    h.update(_token_bytes(token_ids))
    return BlockKey(h.digest())


def hash_blocks(
    namespace: Namespace,
    token_ids: Sequence[int],
    block_size: int,
    parent: BlockKey | None = None,
    start: int = 0,
) -> list[BlockKey]:
    """Keys of the full blocks of `token_ids[start:]`; a trailing partial block gets none.

    `start` must be block-aligned and `parent` the key of the block before it.
    """
    if block_size <= 0:
        raise ValueError(f"block_size must be positive, got {block_size}")
    if start % block_size:
        raise ValueError(f"start {start} is not a multiple of block_size {block_size}")
    num_blocks = (len(token_ids) - start) // block_size
    if num_blocks <= 0:
        return []
    raw = memoryview(_token_bytes(token_ids[start : start + num_blocks * block_size]))
    stride = 4 * block_size  # one conversion for the whole run, then a slice per block
    keys: list[BlockKey] = []
    for i in range(num_blocks):
        h = xxhash.xxh3_128(parent or _ROOT)
        h.update(namespace)
        h.update(raw[i * stride : (i + 1) * stride])
        parent = BlockKey(h.digest())
        keys.append(parent)
    return keys
