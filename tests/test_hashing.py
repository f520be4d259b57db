from __future__ import annotations

import subprocess
import sys

import pytest

from kvmesh.hashing import hash_block, hash_blocks, make_namespace


def test_chained_keys_depend_on_prefix_and_namespace():
    ns = make_namespace("m", "float32", "bm")
    a = hash_blocks(ns, list(range(10)), 4)
    b = hash_blocks(ns, [99] + list(range(1, 10)), 4)
    assert len(a) == 2 and all(len(k) == 16 for k in a)
    assert a[0] != b[0] and a[1] != b[1]  # a change in block 0 changes every later key
    assert hash_blocks(make_namespace("m", "float32", "bm", "salt"), list(range(10)), 4) != a
    assert hash_blocks(make_namespace("m", "bfloat16", "bm"), list(range(10)), 4) != a


def test_incremental_hashing_equals_full():
    ns = make_namespace("m", "float32", "bm")
    ids = list(range(37))
    full = hash_blocks(ns, ids, 8)
    head = hash_blocks(ns, ids[:16], 8)
    tail = hash_blocks(ns, ids, 8, parent=head[-1], start=16)
    assert head + tail == full
    assert hash_block(None, ns, ids[:8]) == full[0]


def test_keys_are_stable_across_processes():
    code = (
        "from kvmesh.hashing import *;"
        "print(hash_blocks(make_namespace('m','f','l'), list(range(32)), 16)[1].hex())"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    here = hash_blocks(make_namespace("m", "f", "l"), list(range(32)), 16)[1].hex()
    assert out.stdout.strip() == here


def test_bad_arguments():
    ns = make_namespace("m", "f", "l")
    with pytest.raises(ValueError, match="block_size"):
        hash_blocks(ns, [1, 2], 0)
    with pytest.raises(ValueError, match="multiple"):
        hash_blocks(ns, [1, 2, 3], 2, start=1)
