"""Routing policies, in a registry. Pure: no sockets, no asyncio, no clock.

A policy sees one request (its session and prompt) and each instance's load, and names the
instance. The simulator runs these; the proxy will run the same objects.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True, slots=True)
class InstanceLoad:
    num_running: int
    num_waiting: int
    kv_usage: float  # fraction of device KV blocks in use


@dataclass(frozen=True, slots=True)
class RouteRequest:
    session_id: str | None
    prompt_ids: Sequence[int]


class RoutePolicy(Protocol):
    def choose(self, request: RouteRequest, loads: Sequence[InstanceLoad]) -> int: ...


class RoundRobin:
    def __init__(self) -> None:
        self._next = 0

    def choose(self, request: RouteRequest, loads: Sequence[InstanceLoad]) -> int:
        i = self._next % len(loads)
        self._next = i + 1
        return i


class LeastLoad:
    """The instance with the fewest queued and running requests; KV usage breaks ties,
    then the lowest index."""

    def choose(self, request: RouteRequest, loads: Sequence[InstanceLoad]) -> int:
        return min(range(len(loads)),
                   key=lambda i: (loads[i].num_waiting + loads[i].num_running,
                                  loads[i].kv_usage, i))


class Sticky:
    """Every request of a session goes to one instance (picked by least load on its first
    request); requests without a session are routed by least load."""

    def __init__(self) -> None:
        self._home: dict[str, int] = {}
        self._fallback = LeastLoad()

    def choose(self, request: RouteRequest, loads: Sequence[InstanceLoad]) -> int:
        sid = request.session_id
        home = self._home.get(sid) if sid is not None else None
        if home is None or home >= len(loads):
            home = self._fallback.choose(request, loads)
            if sid is not None:
                self._home[sid] = home
        return home


ROUTE_POLICIES: dict[str, Callable[[], RoutePolicy]] = {
    "round_robin": RoundRobin,
    "least_load": LeastLoad,
    "session": Sticky,
}


def make_route_policy(name: str) -> RoutePolicy:
    try:
        return ROUTE_POLICIES[name]()
    except KeyError:
        raise ValueError(
            f"unknown routing policy {name!r}; choose from {', '.join(ROUTE_POLICIES)}"
        ) from None
