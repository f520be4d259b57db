"""The router's reading of a /mesh answer, and which discovered members it forgets (no
sockets)."""

from __future__ import annotations

import pytest

from kvmesh.router.upstreams import Instance, forget_after_s, forgettable, mesh_urls


def test_mesh_urls_lists_the_node_and_its_alive_members():
    view = {"me": {"http_url": "http://10.0.0.1:8000/"},
            "members": [{"http_url": "http://10.0.0.2:8000", "state": "alive"},
                        {"http_url": "http://10.0.0.3:8000", "state": "dead"},
                        {"http_url": "", "state": "alive"}, "junk",
                        {"http_url": "ftp://x", "state": "alive"}]}
    assert mesh_urls(view) == ["http://10.0.0.1:8000", "http://10.0.0.2:8000"]
    assert mesh_urls({}) == []
    assert mesh_urls({"me": {"http_url": "http://"}, "members": 5}) == []  # no host, no list
    with pytest.raises(ValueError):
        mesh_urls([1, 2])


def test_only_discovered_members_long_out_and_unlisted_are_forgotten():
    after = forget_after_s(5.0)
    assert after == 60.0 and forget_after_s(10.0) == 120.0
    seed = Instance(0, "http://s:1", is_healthy=False, last_change_s=0.0)
    gone = Instance(1, "http://g:1", discovered=True, last_change_s=0.0)
    listed = Instance(2, "http://l:1", discovered=True, last_change_s=0.0)
    recent = Instance(3, "http://r:1", discovered=True, last_change_s=50.0)
    healthy = Instance(4, "http://h:1", is_healthy=True, discovered=True, last_change_s=0.0)
    members = [seed, gone, listed, recent, healthy]
    assert forgettable(members, {"http://l:1"}, now=100.0, after_s=after) == [gone]
    assert forgettable(members, {"http://l:1"}, now=110.0, after_s=after) == [gone, recent]
    assert forgettable(members, set(), now=59.0, after_s=after) == []
