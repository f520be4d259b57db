"""Scheduling policies, picked by name from a registry. Pure Python.

A policy orders requests: a smaller `sort_key` runs first. Preemption picks its victim
among the running requests of the class the policy ranks last (`preempt_class`: the
largest), and within that class the one cheapest to bring back (the scheduler's cost).

A policy whose order changes as work is done (`fair`) also implements `UsageAware`: the
scheduler tells it when a request arrives, is scheduled for tokens, or finishes, and
re-sorts its queue before each admission.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Protocol, runtime_checkable

from kvmesh.config import SchedulerConfig
from kvmesh.engine.request import Request

SortKey = tuple[float, ...]


class SchedulingPolicy(Protocol):
    name: str

    def sort_key(self, req: Request) -> SortKey: ...

    def preempt_class(self, req: Request) -> SortKey: ...


@runtime_checkable
class UsageAware(Protocol):
    """A policy whose order depends on the work done so far."""

    def on_arrival(self, req: Request) -> None: ...

    def on_scheduled(self, req: Request, num_tokens: int) -> None: ...

    def on_finish(self, req: Request) -> None: ...


POLICIES: dict[str, Callable[[SchedulerConfig], SchedulingPolicy]] = {}


def register(name: str) -> Callable[[type], type]:
    def wrap(cls: type) -> type:
        POLICIES[name] = cls
        cls.name = name  # type: ignore[attr-defined]
        return cls

    return wrap


def make_policy(name: str, config: SchedulerConfig | None = None) -> SchedulingPolicy:
    if name not in POLICIES:
        raise ValueError(f"unknown scheduling policy {name!r}; choose from {sorted(POLICIES)}")
    return POLICIES[name](config or SchedulerConfig())


def tenant_name(req: Request) -> str:
    return req.tenant.name if req.tenant is not None else ""


@register("fcfs")
class FcfsPolicy:
    """First come, first served. One class: the victim is the cheapest to bring back."""

    name = "fcfs"

    def __init__(self, config: SchedulerConfig) -> None:
        pass

    def sort_key(self, req: Request) -> SortKey:
        return (req.arrival_time, req.arrival_seq)

    def preempt_class(self, req: Request) -> SortKey:
        return ()


@register("priority")
class PriorityPolicy:
    """Lower `priority` value first, then arrival; victims come from the least urgent
    class."""

    name = "priority"

    def __init__(self, config: SchedulerConfig) -> None:
        pass

    def sort_key(self, req: Request) -> SortKey:
        return (req.priority, req.arrival_time, req.arrival_seq)

    def preempt_class(self, req: Request) -> SortKey:
        return (req.priority,)


@register("edf")
class EdfPolicy:
    """Earliest deadline first: a request's deadline is its arrival plus its tenant's TTFT
    SLO, or plus `default_ttft_slo_s` for a request without one (so work with no SLO still
    ages to the front: no starvation). Running requests have had their first token, so
    preemption sees one class."""

    name = "edf"
    yields_to_tighter_slos = True  # later arrivals with tighter SLOs run first (admission)

    def __init__(self, config: SchedulerConfig) -> None:
        self.default_slo_s = config.default_ttft_slo_s

    def deadline(self, req: Request) -> float:
        slo = req.tenant.ttft_slo_s if req.tenant is not None else None
        return req.arrival_time + (self.default_slo_s if slo is None else slo)

    def sort_key(self, req: Request) -> SortKey:
        return (self.deadline(req), req.arrival_time, req.arrival_seq)

    def preempt_class(self, req: Request) -> SortKey:
        return ()


@register("fair")
class FairPolicy:
    """Fair sharing across tenants by a virtual token counter (start-time fair queuing).

    Each tenant's counter is the tokens scheduled for it (prefill and decode) over its
    weight; the tenant with the smallest counter goes first, arrival order within a tenant.
    A tenant that had nothing queued or running starts one token below the smallest
    counter among the active tenants: idle time banks no credit, one tenant's burst cannot
    starve another, and the newcomer goes next, as a new flow's first request does in
    start-time fair queuing (level with the busy tenant, every request of that tenant
    queued before it would rank first, and admission control would count them all as
    ahead of it). Victims come from the tenant with the largest counter. Counters are kept
    as whole tokens, so the order never depends on the order of additions."""

    name = "fair"

    def __init__(self, config: SchedulerConfig) -> None:
        self._served: dict[str, int] = {}  # tenant -> tokens scheduled (lifted when idle)
        self._weight: dict[str, float] = {}
        self._live: dict[str, int] = {}  # tenant -> requests queued or running

    def counter(self, tenant: str) -> float:
        return self._served.get(tenant, 0) / self._weight.get(tenant, 1.0)

    def sort_key(self, req: Request) -> SortKey:
        return (self.counter(tenant_name(req)), req.arrival_time, req.arrival_seq)

    def preempt_class(self, req: Request) -> SortKey:
        return (self.counter(tenant_name(req)),)

    def prefill_ahead(self, req: Request, work: Sequence[tuple[Request, int]],
                      chunk: int) -> int:
        """Prefill tokens (of `work`: requests and their unfinished prefill) that run before
        `req` starts. Its tenant's earlier requests all do, and they raise its counter to
        `target` first. Another tenant's work runs only until its counter passes `target`:
        the tokens that takes, plus the chunk that crosses (a tenant already above runs
        nothing first). Sorting by the current keys instead would count a tenant's whole
        queue, since all its requests share its counter."""
        me = tenant_name(req)
        own = 0
        others: dict[str, int] = {}
        for other, tokens in work:
            name = tenant_name(other)
            if name != me:
                others[name] = others.get(name, 0) + tokens
            elif (other.arrival_time, other.arrival_seq) < (req.arrival_time, req.arrival_seq):
                own += tokens
        target = self.counter(me) + own / self._weight.get(me, 1.0)
        for name, tokens in others.items():
            lead = target - self.counter(name)
            if lead >= 0:
                own += min(tokens, math.floor(lead * self._weight.get(name, 1.0)) + chunk)
        return own

    def on_arrival(self, req: Request) -> None:
        name = tenant_name(req)
        self._weight[name] = req.tenant.weight if req.tenant is not None else 1.0
        if not self._live.get(name):
            active = [self.counter(t) for t, n in self._live.items() if n]
            if active:
                floor = max(0, math.ceil(min(active) * self._weight[name]) - 1)
                self._served[name] = max(self._served.get(name, 0), floor)
        self._live[name] = self._live.get(name, 0) + 1

    def on_scheduled(self, req: Request, num_tokens: int) -> None:
        name = tenant_name(req)
        self._served[name] = self._served.get(name, 0) + num_tokens

    def on_finish(self, req: Request) -> None:
        name = tenant_name(req)
        self._live[name] = self._live.get(name, 0) - 1

    def check_integrity(self) -> None:
        assert all(n >= 0 for n in self._live.values()), "a tenant finished more than it sent"
        assert all(n >= 0 for n in self._served.values())
