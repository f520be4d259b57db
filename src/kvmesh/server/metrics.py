"""Prometheus metrics, named like vLLM's with a `kvmesh:` prefix."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

from kvmesh.engine.async_engine import EngineStats
from kvmesh.kvstore.tier import LOAD_BUCKETS_S, TierStats
from kvmesh.types import TenantClass

TIER_COUNTERS = ("hit_blocks", "miss_blocks", "hit_tokens", "miss_tokens", "bytes_in",
                 "bytes_out", "evictions", "checksum_failures", "write_errors", "dropped_writes")
TIER_GAUGES = ("used_bytes", "capacity_bytes", "num_blocks")
SPEC_COUNTERS = {  # speculative decoding (0 with it off)
    "num_draft_tokens": "Draft tokens proposed.",
    "num_accepted_tokens": "Draft tokens accepted.",
}
SPEC_GAUGES = {
    "acceptance_rate": "Accepted / proposed draft tokens, so far.",
    "tokens_per_step": "Tokens a verifying sequence got per step (accepted + 1), so far.",
}


class _EngineStatsCollector:
    """A collector that reads the engine's stats (and the served name) at scrape."""

    def __init__(self, stats: Callable[[], EngineStats | None], model: Callable[[], str]):
        self._stats = stats
        self._model = model


class SpecCollector(_EngineStatsCollector):
    """Speculative decoding's counters (kvmesh:spec_decode_*_total), read at scrape."""

    def collect(self):
        s = self._stats()
        for name, text in SPEC_COUNTERS.items():
            fam = CounterMetricFamily(f"kvmesh:spec_decode_{name}", text, labels=["model_name"])
            fam.add_metric([self._model()], float(getattr(s, f"spec_{name}", 0) if s else 0))
            yield fam


class TierCollector(_EngineStatsCollector):
    """Exposes every KV tier's counters as kvmesh:kv_tier_* with a `tier` label."""

    def collect(self):
        s = self._stats()
        tiers: tuple[TierStats, ...] = s.tiers if s else ()
        labels = ["model_name", "tier"]
        for name in TIER_COUNTERS:
            fam = CounterMetricFamily(f"kvmesh:kv_tier_{name}", f"KV tier {name}.", labels=labels)
            for t in tiers:
                fam.add_metric([self._model(), t.name], getattr(t, name))
            yield fam
        for name in (*TIER_GAUGES, "is_disabled"):
            gauge = GaugeMetricFamily(f"kvmesh:kv_tier_{name}", f"KV tier {name}.",
                                      labels=labels)
            for t in tiers:
                gauge.add_metric([self._model(), t.name], float(getattr(t, name)))
            yield gauge
        hist = HistogramMetricFamily("kvmesh:kv_tier_load_seconds", "Block load latency.",
                                     labels=labels)
        for t in tiers:
            cumulative, buckets = 0, []
            for bound, count in zip(LOAD_BUCKETS_S, t.load_bucket_counts, strict=True):
                cumulative += count
                buckets.append((str(bound), cumulative))
            buckets.append(("+Inf", t.load_count))
            hist.add_metric([self._model(), t.name], buckets, t.load_sum_s)
        yield hist

class ResultCacheCollector:
    """The result cache's hits, misses, evictions, bytes and entries, at scrape."""

    def __init__(self, cache: Any):
        self._cache = cache

    def collect(self):
        c = self._cache
        for name in ("hits", "misses", "evictions"):
            yield CounterMetricFamily(f"kvmesh:result_cache_{name}",
                                      f"Result cache {name}.", value=getattr(c, name))
        yield GaugeMetricFamily("kvmesh:result_cache_bytes", "Result cache size (estimate).",
                                value=c.num_bytes)
        yield GaugeMetricFamily("kvmesh:result_cache_capacity_bytes",
                                "Result cache bound.", value=c.capacity_bytes)
        yield GaugeMetricFamily("kvmesh:result_cache_entries", "Results cached.",
                                value=len(c))


class MeshCollector:
    """The mesh node's counters as kvmesh:mesh_*_total and members by state, at scrape."""

    def __init__(self, view: Callable[[], dict | None]):
        self._view = view

    def collect(self):
        view = self._view()
        if view is None:
            return
        members = GaugeMetricFamily("kvmesh:mesh_members", "Mesh members by state.",
                                    labels=["state"])
        for state in ("alive", "suspect"):
            members.add_metric([state], sum(m["state"] == state for m in view["members"]))
        yield members
        for name, value in view["stats"].items():
            yield CounterMetricFamily(f"kvmesh:mesh_{name}", f"Mesh {name}.", value=value)


LATENCY_BUCKETS = (
    0.001,
    0.005,
    0.01,
    0.02,
    0.04,
    0.06,
    0.08,
    0.1,
    0.25,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
    20.0,
    40.0,
    80.0,
    160.0,
)


class ServerMetrics:
    def __init__(self, model_name: str):
        self.registry = CollectorRegistry()
        labels = ["model_name"]
        r = self.registry

        def hist(name: str, doc: str) -> Histogram:
            return Histogram(f"kvmesh:{name}", doc, labels, registry=r, buckets=LATENCY_BUCKETS)

        def count(name: str, doc: str) -> Counter:
            return Counter(f"kvmesh:{name}", doc, labels, registry=r)

        self.ttft = hist("time_to_first_token_seconds", "Time to first token.")
        self.itl = hist("inter_token_latency_seconds", "Time between output tokens.")
        self.e2e = hist("e2e_request_latency_seconds", "End-to-end request latency.")
        self.queue = hist("request_queue_time_seconds", "Time waiting before first scheduled.")
        self.prefix_queries = count(
            "prefix_cache_queries", "Prompt tokens looked up in the prefix cache."
        )
        self.prefix_hits = count("prefix_cache_hits", "Prompt tokens found in the prefix cache.")
        self.prompt_tokens = count("prompt_tokens", "Prompt tokens processed.")
        self.generation_tokens = count("generation_tokens", "Tokens generated.")
        self.requests = Counter(
            "kvmesh:request_success",
            "Finished requests by reason.",
            ["model_name", "finished_reason"],
            registry=r,
        )
        self.rejected = count("request_rejected", "Requests refused with 429.")
        tenant = ["model_name", "tenant"]
        self.tenant_requests = Counter(
            "kvmesh:tenant_requests", "Finished requests, per tenant.", tenant, registry=r)
        self.tenant_slo_met = Counter(
            "kvmesh:tenant_slo_met", "Finished requests that met their tenant's SLO: slo=ttft, "
            "tpot, or all (goodput). Attainment: divide by kvmesh:tenant_requests.",
            [*tenant, "slo"], registry=r)
        self.tenant_rejected = Counter(
            "kvmesh:tenant_rejected", "Requests refused with 429, per tenant, by reason: "
            "queue_full, slo (admission control) or rate_limit.", [*tenant, "reason"],
            registry=r)
        self.running = Gauge("kvmesh:num_requests_running", "Requests running.", labels, registry=r)
        self.waiting = Gauge("kvmesh:num_requests_waiting", "Requests waiting.", labels, registry=r)
        self.kv_usage = Gauge(
            "kvmesh:kv_cache_usage_perc", "Fraction of KV blocks in use (0-1).", labels, registry=r
        )
        self.preemptions = Gauge(
            "kvmesh:num_preemptions", "Preemptions so far.", labels, registry=r
        )
        self.spec = {name: Gauge(f"kvmesh:spec_decode_{name}", text, labels, registry=r)
                     for name, text in SPEC_GAUGES.items()}
        self.model_name = model_name

    def on_refused(self, tenant: str | None, exc: Any) -> None:
        """A request refused before it ran (an APIError): 429s are counted."""
        if exc.status != 429:
            return
        self.rejected.labels(self.model_name).inc()
        if tenant is not None:
            self.tenant_rejected.labels(self.model_name, tenant, exc.reason or "queue_full").inc()

    def bind(self, stats: Callable[[], EngineStats | None]) -> None:
        """Read gauges from the engine at scrape time."""
        m = self.model_name

        def field(name: str) -> Callable[[], float]:
            return lambda: float(getattr(stats(), name, 0.0) or 0.0)

        self.registry.register(TierCollector(stats, lambda: self.model_name))
        self.registry.register(SpecCollector(stats, lambda: self.model_name))
        self.running.labels(m).set_function(field("num_running"))
        self.waiting.labels(m).set_function(field("num_waiting"))
        self.kv_usage.labels(m).set_function(field("kv_cache_usage"))
        self.preemptions.labels(m).set_function(field("num_preemptions"))
        for name, gauge in self.spec.items():
            gauge.labels(m).set_function(field(f"spec_{name}"))


class RequestTimer:
    """Per-request latency bookkeeping; feeds the histograms as deltas arrive, and on
    finish, the tenant's SLO counters."""

    def __init__(self, metrics: ServerMetrics, start: float, tenant: TenantClass | None = None,
                 num_choices: int = 1):
        self.m = metrics
        self.start = start
        self.last: float | None = None
        self.first: float | None = None
        self.num_tokens = 0
        self.name = metrics.model_name
        self.tenant = tenant
        self.num_choices = num_choices

    def on_tokens(self, now: float, num_tokens: int, first_of_request: bool) -> None:
        if num_tokens == 0:
            return
        self.num_tokens += num_tokens
        if self.last is None:
            self.first = now
            self.m.ttft.labels(self.name).observe(now - self.start)
        elif not first_of_request:
            self.m.itl.labels(self.name).observe(now - self.last)
        self.last = now
        self.m.generation_tokens.labels(self.name).inc(num_tokens)

    def on_prompt(self, num_prompt: int, num_cached: int, queue_s: float | None) -> None:
        n = self.name
        self.m.prompt_tokens.labels(n).inc(num_prompt)
        self.m.prefix_queries.labels(n).inc(num_prompt)
        self.m.prefix_hits.labels(n).inc(num_cached)
        if queue_s is not None:
            self.m.queue.labels(n).observe(queue_s)

    def on_finish(self, now: float, reason: str) -> None:
        self.m.e2e.labels(self.name).observe(now - self.start)
        self.m.requests.labels(self.name, reason).inc()
        if self.tenant is not None:
            if reason in ("abort", "error"):  # counted, and it met no SLO
                self.m.tenant_requests.labels(self.name, self.tenant.name).inc()
            else:
                self._count_slos(now, self.tenant)

    def _count_slos(self, now: float, t: TenantClass) -> None:
        ttft = self.first - self.start if self.first is not None else math.inf
        per_choice = self.num_tokens / self.num_choices
        tpot = (now - (self.first or now)) / (per_choice - 1) if per_choice > 1 else 0.0
        met = {"ttft": t.ttft_slo_s is None or ttft <= t.ttft_slo_s,
               "tpot": t.tpot_slo_s is None or tpot <= t.tpot_slo_s}
        met["all"] = all(met.values())
        self.m.tenant_requests.labels(self.name, t.name).inc()
        for slo, ok in met.items():
            if ok:
                self.m.tenant_slo_met.labels(self.name, t.name, slo).inc()
