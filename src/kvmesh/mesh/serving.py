"""Serving blocks to a peer: copies of the leading held blocks, streamed in order, for a
fetch (then Done) or for a hand-off on leave (`Give` frames)."""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Protocol

import xxhash

from kvmesh.mesh import wire
from kvmesh.mesh.link import Link
from kvmesh.mesh.stats import MeshStats

log = logging.getLogger(__name__)
EXPORT_CHUNK_BYTES = 8 << 20
MAX_FETCHES_PER_LINK = 4  # served at once; more wait in a queue of MAX_QUEUED_FETCHES
MAX_QUEUED_FETCHES = 512  # beyond it a fetch is refused at once (Done busy): a miss
Export = bytes | concurrent.futures.Future | None
SendBlock = Callable[[Link, wire.Block | wire.Give, bytes], Awaitable[None]]


class LocalBlocks(Protocol):
    """What the node needs of its own engine (every call runs on the engine thread)."""

    block_bytes: int

    def snapshot(self) -> concurrent.futures.Future:  # of KVSnapshot
        ...

    def export(self, keys: Sequence[bytes]) -> concurrent.futures.Future:
        """Copies of the leading held blocks (bytes, or a disk read's Future)."""
        ...

    def hottest(self, limit: int) -> concurrent.futures.Future:
        """Up to `limit` keys of held device and host blocks, most useful first (a list)."""
        ...

    def adopt(self, blocks: Sequence[tuple[bytes, bytes | bytearray | memoryview]]
              ) -> concurrent.futures.Future:
        """Keep blocks a leaving peer handed over, in host memory (how many were stored)."""
        ...


async def serve_fetches(link: Link, fetches: asyncio.Queue[wire.Fetch], local: LocalBlocks,
                        stats: MeshStats, send_block: SendBlock) -> None:
    """One of a link's fetch workers: serve queued fetches, one at a time, until it closes."""
    while not link.closed:
        msg = await fetches.get()
        await serve_fetch(link, msg, local, stats, send_block)


async def serve_fetch(link: Link, msg: wire.Fetch, local: LocalBlocks, stats: MeshStats,
                      send_block: SendBlock) -> None:
    """Stream what is held of `msg.keys`, stopping at the first block no longer held."""
    sent = 0
    try:
        sent = await stream_held(link, msg.keys, local, stats, send_block,
                                 lambda i, key, digest: wire.Block(msg.req, i, key, digest))
    except (OSError, ConnectionError):
        link.close()
    except Exception:  # noqa: BLE001 - the engine failed the export: a miss, not a dead worker
        log.exception("serving a fetch failed")
    finally:
        if not link.closed:
            try:
                await link.send(wire.Done(msg.req, sent))
            except (OSError, ConnectionError):
                link.close()


async def stream_held(link: Link, keys: Sequence[bytes], local: LocalBlocks, stats: MeshStats,
                      send_block: SendBlock,
                      header: Callable[[int, bytes, int], wire.Block | wire.Give]) -> int:
    """Send the leading held blocks of `keys` (exported a chunk at a time on the engine
    thread), each under `header(index, key, xxh3 digest)`; the number sent."""
    sent = 0
    chunk = max(1, EXPORT_CHUNK_BYTES // local.block_bytes)
    parts = [keys[i:i + chunk] for i in range(0, len(keys), chunk)]
    pending = local.export(parts[0]) if parts else None
    for n, part in enumerate(parts):
        assert pending is not None
        items: list[Export] = await asyncio.wrap_future(pending)
        whole = len(items) == len(part)
        # The next chunk is copied on the engine thread while this one is on the wire.
        pending = local.export(parts[n + 1]) if whole and n + 1 < len(parts) else None
        for key, item in zip(part, items, strict=False):
            data = await _resolve(item)
            if data is None:
                return sent
            await send_block(link, header(sent, key, xxhash.xxh3_64_intdigest(data)), data)
            sent += 1
            stats.blocks_out += 1
            stats.bytes_out += len(data)
        if not whole:
            return sent
    return sent


async def _resolve(item: Export) -> bytes | None:
    if isinstance(item, concurrent.futures.Future):
        try:
            return await asyncio.wrap_future(item)
        except Exception:  # noqa: BLE001 - a failed disk read ends the run
            return None
    return item
