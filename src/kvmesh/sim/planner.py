"""`kvmesh plan`: the cheapest fleet that meets an SLO, found by simulating each candidate.

A candidate is an instance count, host and disk tier sizes per instance, a block size, a
routing policy and an eviction policy for the tiers. Its price per hour is

    instances * (instance_per_hour + host_gb * host_gb_per_hour + disk_gb * disk_gb_per_hour)

It meets the SLO when every request completed and its TTFT and TPOT p99 are within the
limits. Candidates are ranked: those that meet the SLO by price (then by goodput), then the
rest by how far they miss. The frontier is the set of candidates meeting the SLO that no
other beats on both price and throughput. Changing the block size keeps the device memory
(`num_blocks` scales inversely).
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from kvmesh.bench.metrics import SLO
from kvmesh.sim.cost_model import CostModel
from kvmesh.sim.instance import InstanceSpec
from kvmesh.sim.run import SimConfig, simulate
from kvmesh.sim.workload import SimSession

GB = 10**9


@dataclass(frozen=True)
class Prices:
    instance_per_hour: float
    host_gb_per_hour: float = 0.0
    disk_gb_per_hour: float = 0.0

    def per_hour(self, c: Candidate) -> float:
        per = (self.instance_per_hour + c.host_gb * self.host_gb_per_hour
               + c.disk_gb * self.disk_gb_per_hour)
        return c.num_instances * per


@dataclass(frozen=True)
class Candidate:
    num_instances: int
    host_gb: float
    disk_gb: float
    block_size: int
    route: str
    eviction: str = "lru"

    def spec(self, base: InstanceSpec) -> InstanceSpec:
        tiers = dataclasses.replace(
            base.tiers, host_bytes=int(self.host_gb * GB),
            disk_bytes=int(self.disk_gb * GB), host_policy=self.eviction,
            disk_policy=self.eviction,
            disk_path=(base.tiers.disk_path or "sim-disk") if self.disk_gb > 0 else None)
        blocks = base.cache.num_blocks  # the same device memory, in blocks of this size
        if blocks is not None:
            blocks = max(1, blocks * base.cache.block_size // self.block_size)
        cache = dataclasses.replace(base.cache, block_size=self.block_size, num_blocks=blocks)
        return InstanceSpec(base.scheduler, cache, tiers)


@dataclass(frozen=True)
class SearchSpace:
    instances: Sequence[int] = (1, 2, 4)
    host_gb: Sequence[float] = (0.0,)
    disk_gb: Sequence[float] = (0.0,)
    block_sizes: Sequence[int] = (16,)
    routes: Sequence[str] = ("round_robin",)
    evictions: Sequence[str] = ("lru",)

    def candidates(self) -> list[Candidate]:
        out = []
        for n, host, disk, bs, route, evict in itertools.product(
                self.instances, self.host_gb, self.disk_gb, self.block_sizes, self.routes,
                self.evictions):
            if disk > 0 and host <= 0:
                continue  # the disk tier needs a host tier to stage through
            if evict != self.evictions[0] and host <= 0:
                continue  # no tier, nothing to evict: the first policy stands for all
            out.append(Candidate(n, host, disk, bs, route, evict))
        return out


def meets(figures: dict[str, Any], slo: SLO) -> bool:
    if figures["failed"] or figures["completed"] == 0:
        return False
    checks = [(slo.ttft_ms, figures["ttft_s"]["p99"]), (slo.tpot_ms, figures["tpot_s"]["p99"])]
    return all(limit is None or (v is not None and v * 1000 <= limit) for limit, v in checks)


def _miss(figures: dict[str, Any], slo: SLO) -> float:
    """How far a candidate is from the SLO (ratio of the worst p99 to its limit)."""
    worst = 1.0 + figures["failed"]
    for limit, v in ((slo.ttft_ms, figures["ttft_s"]["p99"]),
                     (slo.tpot_ms, figures["tpot_s"]["p99"])):
        if limit is not None:
            worst = max(worst, (v or float("inf")) * 1000 / limit)
    return worst


class Workload(Protocol):
    """Sessions, their start times, and what the simulated model generates."""

    @property
    def sessions(self) -> Sequence[SimSession]: ...
    @property
    def starts(self) -> Sequence[float]: ...
    @property
    def filler(self) -> tuple[int, ...]: ...


def evaluate(c: Candidate, base: InstanceSpec, cost: CostModel, prices: Prices, slo: SLO,
             work: Workload, concurrency: int | None) -> dict[str, Any]:
    figures = simulate(c.spec(base), cost, SimConfig(num_instances=c.num_instances,
                                                     route=c.route), work.sessions,
                       work.starts, concurrency, filler=work.filler)
    figures.pop("records")
    price = prices.per_hour(c)
    tput = figures["output_tok_per_s"] or 0.0
    return {"candidate": dataclasses.asdict(c), "price_per_hour": price,
            "meets_slo": meets(figures, slo), "miss_ratio": _miss(figures, slo),
            "output_tok_per_s": tput, "tok_per_dollar": tput * 3600 / price if price else None,
            "goodput_req_per_s": figures["goodput_req_per_s"],
            "ttft_p99_s": figures["ttft_s"]["p99"], "tpot_p99_s": figures["tpot_s"]["p99"],
            "cached_token_ratio": figures["cached_token_ratio"],
            "completed": figures["completed"], "failed": figures["failed"]}


def rank(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return sorted(rows, key=lambda r: (not r["meets_slo"],
                                       r["price_per_hour"] if r["meets_slo"] else r["miss_ratio"],
                                       -(r["goodput_req_per_s"] or 0.0)))


def frontier(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows meeting the SLO that no other such row beats on both price (lower) and
    throughput (higher)."""
    by_price = sorted((r for r in rows if r["meets_slo"]),
                      key=lambda r: (r["price_per_hour"], -r["output_tok_per_s"]))
    out: list[dict[str, Any]] = []
    for row in by_price:
        if not out or row["output_tok_per_s"] > out[-1]["output_tok_per_s"]:
            out.append(row)
    return out


def plan(space: SearchSpace, base: InstanceSpec, cost: CostModel, prices: Prices, slo: SLO,
         work: Workload, concurrency: int | None = None,
         on_progress: Callable[[], None] | None = None) -> list[dict[str, Any]]:
    rows = []
    for c in space.candidates():
        rows.append(evaluate(c, base, cost, prices, slo, work, concurrency))
        if on_progress is not None:
            on_progress()
    return rank(rows)
