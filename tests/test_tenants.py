"""The tenants file and rate limits: pure, with an explicit clock."""

from __future__ import annotations

import math

import pytest

from kvmesh.tenants import RateLimiter, Tenant, TenantTable, cache_salt

GOOD = """
tenants:
  chat:
    api_keys: [k-chat]
    priority: 0
    ttft_slo_s: 0.5
    weight: 2
    requests_per_min: 60
  batch:
    api_keys: [k-batch, k-batch-2]
    priority: 5
    tokens_per_min: 6000
    cache_salt: shared
"""


def test_load_and_lookup(tmp_path):
    path = tmp_path / "tenants.yaml"
    path.write_text(GOOD)
    table = TenantTable.load(path, extra_keys=("k-ops:ops",))
    assert table.is_enabled
    chat, batch = table.lookup("k-chat"), table.lookup(" k-batch-2 ")
    assert chat is not None and chat.ttft_slo_s == 0.5 and chat.request_class.weight == 2.0
    assert batch is not None and batch.priority == 5 and batch.salt == "shared"
    assert chat.salt == "chat" and table.lookup("k-ops").name == "ops"
    assert table.lookup("nope") is None
    assert cache_salt(None, "x") == "x"
    # no two (tenant, request) salts collide: "a" + "b:" is not "a:b" + ""
    assert cache_salt("a", "b:") != cache_salt("a:b", None)
    assert cache_salt("chat", None) != cache_salt("chat", "x")
    assert not TenantTable.from_keys(()).is_enabled


@pytest.mark.parametrize("text, message", [
    ("tenants: [a]", "expected a mapping"),
    ("tenants:\n  a:\n    ttft_slo: 1\n", "unknown keys"),
    ("tenants:\n  a:\n    priority: 1\n", "has no api_keys"),
    ("tenants:\n  a:\n    api_keys: [k]\n    requests_per_min: 0.5\n", ">= 1"),
    ("tenants:\n  a:\n    api_keys: [k]\n    ttft_slo_s: -1\n", "ttft_slo_s must be > 0"),
    ("tenants:\n  a:\n    api_keys: k\n", "api_keys must be a list"),
    ("tenants:\n  a:\n    api_keys: [k]\n    weight: 0\n", "weight must be > 0"),
    ("tenants:\n  a: {api_keys: [k]}\n  b: {api_keys: [k]}\n", "also another tenant"),
    ("tenants: {a: [", "cannot read tenants file"),
])
def test_bad_files_say_what_is_wrong(tmp_path, text, message):
    path = tmp_path / "t.yaml"
    path.write_text(text)
    with pytest.raises(ValueError, match=message):
        TenantTable.load(path)


def test_rate_limits_refill_and_report_the_wait():
    t = Tenant("t", requests_per_min=2, tokens_per_min=600)
    rl = RateLimiter()
    assert rl.admit(t, 100, now_s=0.0) is None
    assert rl.admit(t, 100, now_s=0.0) is None
    wait = rl.admit(t, 100, now_s=0.0)  # the third request in the same minute
    assert wait == pytest.approx(30.0)  # one request refills every 30 s
    assert rl.admit(t, 100, now_s=29.0) is not None
    assert rl.admit(t, 100, now_s=30.0) is None
    # tokens refill 10/s up to 600: 600 at t=60, 100 after this, 400 at t=90
    assert rl.admit(t, 500, now_s=60.0) is None
    assert rl.admit(t, 500, now_s=90.0) == pytest.approx(10.0)
    assert math.isinf(rl.admit(t, 601, now_s=1000.0))  # bigger than a minute's budget
    free = Tenant("free")
    assert all(rl.admit(free, 10**9, now_s=0.0) is None for _ in range(100))


def test_settling_refunds_unused_tokens_and_takes_what_was_used_beyond_the_charge():
    t = Tenant("t", tokens_per_min=600)  # 10 tokens/s
    rl = RateLimiter()
    assert rl.admit(t, 500, now_s=0.0) is None  # 100 left
    rl.settle(t, charged=500, used=200, now_s=0.0)  # 300 unused come back: 400
    assert rl.admit(t, 400, now_s=0.0) is None  # 0 left
    rl.settle(t, charged=400, used=400, now_s=0.0)  # used what it was charged
    assert rl.admit(t, 1, now_s=0.0) == pytest.approx(0.1)
    # no max_tokens: charged its prompt (10), used 310 with its output; 300 below zero
    rl.settle(t, charged=10, used=310, now_s=0.0)
    assert rl.admit(t, 100, now_s=0.0) == pytest.approx(40.0)  # refills from -300
    rl.settle(t, charged=10_000, used=0, now_s=100.0)  # a refund never tops the bucket up
    assert rl.admit(t, 600, now_s=100.0) is None
    assert rl.admit(t, 1, now_s=100.0) is not None
    rl.settle(Tenant("free"), charged=0, used=10**9, now_s=0.0)  # no token limit: no-op
