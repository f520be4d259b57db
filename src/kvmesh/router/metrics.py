"""The router's Prometheus metrics (its own registry)."""

from __future__ import annotations

import contextlib
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge


class RouterMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("kvmesh_router_requests", "Requests answered, by instance "
                                "and status", ["instance", "status"], registry=r)
        self.retries = Counter("kvmesh_router_retries", "Attempts that failed over to "
                               "another instance before the first byte", registry=r)
        self.broken_streams = Counter("kvmesh_router_broken_streams", "Streams ended with "
                                      "an error event after the first byte", registry=r)
        self.predicted_hit_tokens = Counter(
            "kvmesh_router_predicted_hit_tokens", "Prompt tokens the chosen instance held, "
            "by the router's KV index", registry=r)
        self.healthy = Gauge("kvmesh_router_healthy_instances", "Instances in rotation",
                             registry=r)
        self.in_flight = Gauge("kvmesh_router_in_flight", "Requests in flight, by instance",
                               ["instance"], registry=r)
        self.kv_index_blocks = Gauge("kvmesh_router_kv_index_blocks", "Blocks the KV index "
                                     "holds for each instance", ["instance"], registry=r)
        self.resyncs = Gauge("kvmesh_router_kv_resyncs", "KV index resyncs (gaps or restarts)",
                             registry=r)

    def bind(self, router: Any) -> None:
        ups = router.upstreams
        self.healthy.set_function(lambda: len(ups.healthy()))
        self.resyncs.set_function(lambda: router.state.kv.num_resyncs)
        for inst in ups.instances:
            self.instance_changed(router, inst, True)
        ups.on_change = lambda inst, joined: self.instance_changed(router, inst, joined)

    def instance_changed(self, router: Any, inst: Any, joined: bool) -> None:
        """Per-instance series for an instance that joins, and none for one forgotten."""
        if joined:
            self.in_flight.labels(inst.url).set_function(_counter(inst))
            self.kv_index_blocks.labels(inst.url).set_function(
                _index_size(router.state.kv, inst.number))
            return
        for gauge in (self.in_flight, self.kv_index_blocks):
            with contextlib.suppress(KeyError):
                gauge.remove(inst.url)


def _counter(inst: Any) -> Any:
    return lambda: inst.num_in_flight


def _index_size(kv: Any, number: int) -> Any:
    return lambda: kv.num_blocks(number)
