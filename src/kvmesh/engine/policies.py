"""Scheduling policies, picked by name from a registry. Pure Python.

A policy orders requests: a smaller `sort_key` runs first. The same order picks the
preemption victim: the running request the policy ranks last.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from kvmesh.engine.request import Request

SortKey = tuple[float, ...]


class SchedulingPolicy(Protocol):
    name: str

    def sort_key(self, req: Request) -> SortKey: ...


POLICIES: dict[str, Callable[[], SchedulingPolicy]] = {}


def register(name: str) -> Callable[[type], type]:
    def wrap(cls: type) -> type:
        POLICIES[name] = cls
        cls.name = name  # type: ignore[attr-defined]
        return cls

    return wrap


def make_policy(name: str) -> SchedulingPolicy:
    if name not in POLICIES:
        raise ValueError(f"unknown scheduling policy {name!r}; choose from {sorted(POLICIES)}")
    return POLICIES[name]()


@register("fcfs")
class FcfsPolicy:
    """First come, first served: arrival order; the latest arrival is preempted first."""

    name = "fcfs"

    def sort_key(self, req: Request) -> SortKey:
        return (req.arrival_time, req.arrival_seq)


@register("priority")
class PriorityPolicy:
    """Lower `priority` value first, then arrival; the least urgent is preempted first."""

    name = "priority"

    def sort_key(self, req: Request) -> SortKey:
        return (req.priority, req.arrival_time, req.arrival_seq)
