"""`simulate`: a workload through N simulated instances, summarized like `kvmesh bench`
(the same JSON figures) plus per-tier hits and bytes moved."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

from kvmesh.bench.arrivals import arrival_times
from kvmesh.bench.datasets import Session
from kvmesh.bench.metrics import SLO, summarize
from kvmesh.router.policies import ROUTE_POLICIES
from kvmesh.sim.cost_model import CostModel
from kvmesh.sim.instance import FILLER_TOKENS, InstanceSpec, SimInstance
from kvmesh.sim.simulator import SimRun, Simulator
from kvmesh.sim.workload import SimSession


def _help(text: str, **kwargs: Any) -> Any:
    return field(metadata={"help": text}, **kwargs)


@dataclass(frozen=True)
class SimConfig:
    """The simulated fleet."""

    SECTION: ClassVar[str] = "sim"

    cost_model: str = _help("A `kvmesh profile` JSON file, or roofline:GPU:MODEL "
                            "(GPU: h100, h200, a100, l4).", default="roofline:h100:llama-3.1-8b")
    num_instances: int = _help("Instances behind the router.", default=1)
    route: str = _help(f"Routing policy: {', '.join(ROUTE_POLICIES)}.", default="round_robin")
    slo: str | None = _help("Goodput SLO, e.g. ttft_ms=500,tpot_ms=50.", default=None)

    def __post_init__(self) -> None:
        if self.num_instances < 1:
            raise ValueError(f"num_instances must be >= 1, got {self.num_instances}")
        if self.route not in ROUTE_POLICIES:
            raise ValueError(f"unknown route {self.route!r}; choose from {list(ROUTE_POLICIES)}")
        SLO.parse(self.slo)


def tier_figures(instances: Sequence[SimInstance]) -> dict[str, Any]:
    """Hits and bytes by tier, summed over instances (device hits are prefix-index hits)."""
    out: dict[str, Any] = {"device": {"hit_tokens": sum(i.core.kv.num_hit_tokens
                                                        for i in instances)}}
    queried = sum(i.core.kv.num_queried_tokens for i in instances)
    for inst in instances:
        for stats in inst.store.all_stats() if inst.store is not None else []:
            t = out.setdefault(stats.name, {"hit_tokens": 0, "miss_tokens": 0, "bytes_in": 0,
                                            "bytes_out": 0, "evictions": 0})
            t["hit_tokens"] += stats.hit_tokens
            t["miss_tokens"] += stats.miss_tokens
            t["bytes_in"] += stats.bytes_in
            t["bytes_out"] += stats.bytes_out
            t["evictions"] += stats.evictions
    for t in out.values():
        t["hit_rate"] = t["hit_tokens"] / queried if queried else None
    out["queried_tokens"] = queried
    return out


def summarize_run(run: SimRun, slo: SLO) -> dict[str, Any]:
    figures = summarize(run.records, run.duration_s, slo)
    figures["tiers"] = tier_figures(run.instances)
    figures["instances"] = [
        {"steps": i.core.num_steps, "busy_fraction": i.executor.busy_s / run.duration_s
         if run.duration_s else None, "preemptions": i.core.scheduler.num_preemptions,
         "num_blocks": i.num_blocks}
        for i in run.instances]
    figures["num_events"] = run.num_events
    figures["records"] = run.records  # RequestRecord objects: the caller serializes them
    return figures


def simulate(spec: InstanceSpec, cost: CostModel, config: SimConfig,
             sessions: Sequence[SimSession], starts: Sequence[float],
             concurrency: int | None = None, max_duration_s: float | None = None,
             on_progress: Callable[[int], None] | None = None,
             filler: tuple[int, ...] = FILLER_TOKENS) -> dict[str, Any]:
    sim = Simulator(spec, cost, config.num_instances, config.route,
                    max_duration_s, on_progress, filler)
    run = sim.run(sessions, starts, concurrency)
    return summarize_run(run, SLO.parse(config.slo))


def session_starts(sessions: Sequence[SimSession], text: Sequence[Session] | None,
                   profile: Any) -> list[float]:
    """Start times as `kvmesh bench` would draw them (the same seed, the same times)."""
    base = list(text) if text is not None else [Session([], s.arrival_s) for s in sessions]
    return arrival_times(base, profile)
