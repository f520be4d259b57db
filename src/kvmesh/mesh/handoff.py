"""Graceful leave: before a node goes, it hands its hottest blocks to the members that stay.

Each block goes to one member, chosen by rendezvous hashing of its key over the members
linked now (so the blocks spread evenly, and a member's share does not depend on the
order in which the others are listed). The receiver verifies each block's digest and
keeps it in its host tier; its KV events then tell every directory that it holds it, so
a prefix computed on the node that left is still a peer hit. Bounded by a byte budget and
a deadline; what does not fit is simply not handed over (lost, as without a hand-off).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping, Sequence

import xxhash

from kvmesh.mesh import wire
from kvmesh.mesh.link import Link, Payload
from kvmesh.mesh.serving import LocalBlocks, SendBlock, stream_held
from kvmesh.mesh.stats import MeshStats

log = logging.getLogger(__name__)
ADOPT_BATCH = 64


def assign(keys: Sequence[bytes], node_ids: Sequence[str]) -> dict[str, list[bytes]]:
    """Rendezvous hashing: each key to the member with the highest hash of (key, member)."""
    plan: dict[str, list[bytes]] = {n: [] for n in node_ids}
    if not node_ids:
        return plan
    salts = [n.encode() for n in node_ids]
    for key in keys:
        best = max(range(len(node_ids)), key=lambda i: xxhash.xxh3_64_intdigest(key + salts[i]))
        plan[node_ids[best]].append(key)
    return plan


async def hand_off(local: LocalBlocks, links: Mapping[str, Link], max_bytes: int,
                   timeout_s: float, stats: MeshStats, send_block: SendBlock) -> int:
    """Give the hottest held blocks, up to `max_bytes`, to the members of `links`; the
    number given. Stops at `timeout_s`."""
    if not links or max_bytes < local.block_bytes:
        return 0
    counts: list[int] = []
    try:
        async with asyncio.timeout(timeout_s):
            keys = await asyncio.wrap_future(local.hottest(max_bytes // local.block_bytes))
            plan = assign(keys, sorted(links))
            await asyncio.gather(*(_give(links[n], ks, local, stats, send_block, counts)
                                   for n, ks in plan.items() if ks))
    except TimeoutError:
        log.warning("hand-off cut short by its %.0f s budget", timeout_s)
    given = sum(counts)
    stats.blocks_given += given
    log.info("handed %d blocks to %d members before leaving", given, len(links))
    return given


async def _give(link: Link, keys: list[bytes], local: LocalBlocks, stats: MeshStats,
                send_block: SendBlock, counts: list[int]) -> None:
    sent = [0]

    def header(i: int, key: bytes, digest: int) -> wire.Give:
        sent[0] = i + 1  # counted as each is sent: a cut-short share still counts
        return wire.Give(key, digest)

    try:
        await stream_held(link, keys, local, stats, send_block, header)
    except (OSError, ConnectionError):
        pass  # that member went away: its share is lost
    except Exception:  # noqa: BLE001 - a failed export ends this share, not the leave
        log.exception("hand-off export failed")
    finally:
        counts.append(sent[0])


class Gifts:
    """The blocks a leaving member gives over one link: verified as they come, kept in
    batches (one hop to the engine thread per ADOPT_BATCH blocks, and at the end)."""

    def __init__(self, local: LocalBlocks, stats: MeshStats):
        self._local, self._stats = local, stats
        self._batch: list[tuple[bytes, Payload]] = []

    def accept(self, msg: wire.Give, payload: Payload) -> None:
        """Kept only if its length and digest check out."""
        if len(payload) != self._local.block_bytes \
                or xxhash.xxh3_64_intdigest(payload) != msg.digest:
            self._stats.checksum_failures += 1
            return
        self._stats.blocks_adopted += 1
        self._batch.append((msg.key, payload))
        if len(self._batch) >= ADOPT_BATCH:
            self.flush()

    def flush(self) -> None:
        if self._batch:
            self._local.adopt(self._batch)
            self._batch = []
