"""The router's reading of a /mesh answer, and which discovered members it forgets (no
sockets)."""

from __future__ import annotations

import asyncio
import json

import aiohttp
import pytest

from kvmesh.router.policies import RouterState
from kvmesh.router.upstreams import Instance, Upstreams, forget_after_s, forgettable, mesh_urls


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


class _FakeMesh(Upstreams):
    """Upstreams whose GETs are answered from `answers` (URL → (status, JSON)); a URL not
    there fails as a dead server would."""

    answers: dict[str, tuple[int, object]]

    async def get(self, url, timeout):
        if url not in self.answers:
            raise aiohttp.ClientConnectionError(f"{url}: connection refused")
        status, body = self.answers[url]
        return status, json.dumps(body).encode()


def _load(instance_id: str) -> dict:
    return {"num_running": 0, "num_waiting": 0, "kv_usage": 0.0, "instance_id": instance_id}


def test_a_member_gone_long_enough_is_forgotten_and_found_again_when_it_returns():
    async def scenario():
        state = RouterState()
        ups = _FakeMesh(("http://s:1",), state, session=None, poll_interval_s=3600,
                        discover_interval_s=5.0)
        changes: list[tuple[str, bool]] = []
        ups.on_change = lambda inst, joined: changes.append((inst.url, joined))
        mesh = {"me": {"http_url": "http://s:1"},
                "members": [{"http_url": "http://m:1", "state": "alive"}]}
        ups.answers = {"http://s:1/load": (200, _load("S")), "http://s:1/mesh": (200, mesh),
                       "http://m:1/load": (200, _load("M"))}
        try:
            await ups.start()
            member = next(i for i in ups.instances if i.url == "http://m:1")
            assert member.is_healthy and member.discovered and changes == [("http://m:1", True)]
            del ups.answers["http://m:1/load"]  # it dies, and the mesh stops listing it
            ups.answers["http://s:1/mesh"] = (200, {"me": {"http_url": "http://s:1"}})
            await ups.probe(member)
            await ups.discover()
            assert member in ups.instances  # out of rotation, not yet for long
            member.last_change_s -= forget_after_s(5.0)
            await ups.discover()
            assert [i.url for i in ups.instances] == ["http://s:1"]
            assert member.number not in ups._polls and changes[-1] == ("http://m:1", False)
            ups.answers["http://m:1/load"] = (200, _load("M2"))  # back, listed again
            ups.answers["http://s:1/mesh"] = (200, mesh)
            added = await ups.discover()
            assert [i.url for i in added] == ["http://m:1"] and added[0].is_healthy
            assert added[0].number != member.number  # a new number: no stale index entries
            assert changes[-1] == ("http://m:1", True)
        finally:
            await ups.close()

    asyncio.run(scenario())


def test_queued_prefill_is_the_report_plus_what_was_sent_after_it_was_asked_for():
    async def scenario():
        ups = _FakeMesh(("http://a:1",), RouterState(), session=None, poll_interval_s=3600)
        inst = ups.instances[0]
        early = inst.add_prefill(500)  # sent before the probe: the report counts it
        ups.answers = {"http://a:1/load": (200, _load("A") | {"num_prefill_tokens": 800})}
        await ups.probe(inst)
        assert inst.is_healthy and inst.load().num_prefill_tokens == 800
        inst.drop_prefill(early, 500)  # its first byte: nothing left to drop
        assert inst.load().num_prefill_tokens == 800
        late = inst.add_prefill(300)  # sent after: on top of the report, until answered
        inst.add_prefill(0)
        assert inst.load().num_prefill_tokens == 1100
        inst.drop_prefill(late, 300)
        assert inst.load().num_prefill_tokens == 800 and not inst.sent_prefill
        unanswered = inst.add_prefill(200)  # a non-streamed answer: no byte until the end
        ups.answers["http://a:1/load"] = (200, _load("A") | {"num_prefill_tokens": 150})
        await ups.probe(inst)  # the next report has it (or its prefill is done)
        assert inst.load().num_prefill_tokens == 150
        inst.drop_prefill(unanswered, 200)
        assert inst.load().num_prefill_tokens == 150
        inst.add_prefill(400)
        ups.answers["http://a:1/load"] = (200, _load("A"))  # an engine that reports none
        await ups.probe(inst)
        assert inst.load().num_prefill_tokens == 0
        inst.add_prefill(70)  # ...but what the router sent since still counts
        assert inst.load().num_prefill_tokens == 70

    asyncio.run(scenario())


def test_a_lease_counts_its_prefill_until_the_first_byte_and_releases_once():
    from kvmesh.router.app import _Lease

    inst = Instance(0, "http://a:1")
    first, second = _Lease(inst, 300), _Lease(inst, -5)  # a hit above the estimate: 0
    assert inst.num_in_flight == 2 and inst.load().num_prefill_tokens == 300
    first.prefilled()
    assert inst.load().num_prefill_tokens == 0 and inst.num_in_flight == 2
    first.release()
    first.release()
    assert inst.num_in_flight == 1 and not inst.sent_prefill
    third = _Lease(inst, 120.7)
    assert inst.load().num_prefill_tokens == 120
    third.release()  # failed before its first byte: its prefill goes with it
    second.release()
    assert inst.num_in_flight == 0 and not inst.sent_prefill
