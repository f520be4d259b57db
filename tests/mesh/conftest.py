from __future__ import annotations

import pytest

from tests.mesh.nodes import make_pair


@pytest.fixture
def pair():
    """Two linked nodes, a and b (b seeded with a), with their dicts of blocks."""
    a, la, b, lb = make_pair()
    yield a, la, b, lb
    b.stop(handoff=False)
    a.stop(handoff=False)
