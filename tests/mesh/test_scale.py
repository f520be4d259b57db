"""The mesh at scale, in one process: 32 nodes over loopback with the default timings. Checks
the figures docs/mesh.md gives for its directory and membership (messages per second per
node, directory memory per entry, lookup cost, how long a join and a leave take to be
known) and writes what it measured to the test log."""

from __future__ import annotations

import os
import time
import tracemalloc

import pytest

from kvmesh.engine.kv_events import KVSnapshot
from kvmesh.mesh.directory import Directory
from kvmesh.mesh.node import MeshConfig, MeshNode
from tests.mesh.nodes import SECRET, DictBlocks
from tests.server_process import free_ports

N = 32
BLOCKS_PER_NODE = 400
PROBE_S = 0.5  # MeshConfig's default


def _wait(pred, timeout: float) -> float:
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if pred():
            return time.monotonic() - start
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout} s")


def _frames_sent(nodes) -> int:
    links = [o.link for n in nodes for o in n._out.values()]
    links += [link for n in nodes for link in n._inbound]
    return sum(link.frames_sent for link in links)


@pytest.mark.timeout(240)
def test_32_peers_match_the_scale_note(capsys):
    ports = free_ports(N + 1)
    nodes, locals_ = [], []
    try:
        for i in range(N):  # each seeded with node 0 only: the rest is gossip
            local = DictBlocks()
            seeds = (f"127.0.0.1:{ports[0]}",) if i else ()
            node = MeshNode(MeshConfig("127.0.0.1", ports[i], SECRET, seeds), local)
            local.node = node
            node.start()
            nodes.append(node)
            locals_.append(local)
        formed = _wait(lambda: all(len(n._out) == N - 1 for n in nodes), 60)

        # Messages: every node probes every member each PROBE_S and answers theirs.
        before, start = _frames_sent(nodes), time.monotonic()
        time.sleep(4.0)
        per_node = (_frames_sent(nodes) - before) / (time.monotonic() - start) / N
        expected = 2 * (N - 1) / PROBE_S  # pings + acks sent per node per second
        assert 0.6 * expected < per_node < 1.3 * expected, (per_node, expected)

        # Directories: every node lists every other's blocks.
        for i, local in enumerate(locals_):
            local.put([i.to_bytes(4, "little") + os.urandom(12) for _ in range(BLOCKS_PER_NODE)])
        spread = _wait(lambda: all(n.directory.num_blocks(o.me.node_id) == BLOCKS_PER_NODE
                                   for n in nodes for o in nodes if o is not n), 60)
        keys = [k for local in locals_ for k in local.blocks]
        t0 = time.perf_counter()
        for k in keys:
            assert len(nodes[0].holders(k)) == (k not in locals_[0].blocks)
        lookup_us = (time.perf_counter() - t0) / len(keys) * 1e6

        # Memory per (key, holder) entry, from a directory built of the same sets.
        tracemalloc.start()
        snap0 = tracemalloc.take_snapshot()
        d = Directory()
        for i, local in enumerate(locals_):
            d.reset(str(i), KVSnapshot(str(i), 0, {"host": list(local.blocks)}))
        mine = [tracemalloc.Filter(True, "*kvmesh/mesh/directory.py"),
                tracemalloc.Filter(True, "*kvmesh/engine/kv_events.py")]  # not the nodes'
        grown = sum(s.size_diff for s in tracemalloc.take_snapshot().filter_traces(mine)
                    .compare_to(snap0.filter_traces(mine), "lineno"))
        tracemalloc.stop()
        bytes_per_entry = grown / (N * BLOCKS_PER_NODE)
        assert bytes_per_entry < 250  # docs/mesh.md: ~160 B (a set slot and an index entry)

        # A join: a new node seeded with one member is known to all within a few probes.
        local = DictBlocks()
        late = MeshNode(MeshConfig("127.0.0.1", ports[N], SECRET, (f"127.0.0.1:{ports[5]}",)),
                        local)
        local.node = late
        late.start()
        nodes.append(late)
        joined = _wait(lambda: all(late.me.node_id in n.membership.entries
                                   for n in nodes[:N]), 30)
        assert joined < 6 * PROBE_S * 1.2 + 2  # a few gossip rounds (loaded CI: slack)

        # A leave: every member drops the leaver at once (its Leave, not a timeout). A
        # member the leaver has no link to yet learns it from gossip (a rumor of death).
        _wait(lambda: all(len(n._out) == N for n in nodes), 30)
        gone = nodes.pop(3)
        gone.stop(handoff=False)
        left = _wait(lambda: all(gone.me.node_id not in n.membership.entries for n in nodes),
                     30)
        assert left < 1.0
        for n in nodes:
            n.membership.check_integrity()
            n.directory.check_integrity()
        with capsys.disabled():
            print(f"\nmesh of {N}: formed {formed:.1f} s; {per_node:.0f} frames/s sent per node "
                  f"(model {expected:.0f}); directory spread {spread:.1f} s; lookup "
                  f"{lookup_us:.1f} us/key; {bytes_per_entry:.0f} B per (key, holder); "
                  f"join known {joined:.1f} s; leave known {left:.2f} s")
    finally:
        for n in nodes:
            n.stop(handoff=False)

