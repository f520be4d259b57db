"""The router's reading of a /mesh answer (no sockets)."""

from __future__ import annotations

import pytest

from kvmesh.router.upstreams import mesh_urls


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
