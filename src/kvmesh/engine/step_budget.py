"""How many prefill tokens one step may take, under the tenants' TTFT SLOs. Pure Python.

Once a tenant with a finite TTFT SLO has sent a request, the prefill tokens of a step are
capped at the measured prefill rate times the tightest such SLO times
`slo_step_fraction`: a request that arrives mid-step waits at most about that share of
its SLO for the step to end. Decodes are never capped, and neither is the prefill of a
request whose own SLO is the tightest (`is_tightest`): the next such request would queue
behind it anyway, so capping it would only delay it. Because the rate is measured over
whole steps (decodes included), the cap settles where a step with prefill lasts that share
of the SLO; it never falls below that share of the token budget, nor below one block.
Infinite SLOs are no constraint.

The same measured rate (`PrefillRate`, by SLO) is what admission control predicts with.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

from kvmesh.config import SchedulerConfig
from kvmesh.engine.admission import PrefillRate


class StepBudget:
    def __init__(self, config: SchedulerConfig, block_size: int):
        self.config = config
        self.block_size = block_size
        self.rate = PrefillRate()
        self.ttft_slos: dict[str, float] = {}  # tenant -> TTFT SLO, of tenants seen
        self.tightest = math.inf  # the least of them

    def note_tenant(self, tenant: str, ttft_slo_s: float | None) -> None:
        if ttft_slo_s is not None and math.isfinite(ttft_slo_s):
            self.ttft_slos[tenant] = ttft_slo_s
            self.tightest = min(self.ttft_slos.values())

    def is_tightest(self, ttft_slo_s: float | None) -> bool:
        """Whether a request with this TTFT SLO is as urgent as any tenant seen: its
        prefill is not capped."""
        return ttft_slo_s is not None and ttft_slo_s <= self.tightest < math.inf

    def observe(self, prefills: Iterable[tuple[int, float | None]], step_s: float) -> None:
        """A step's time and its prefill chunks, as (tokens, the tenant's TTFT SLO)."""
        by_slo: dict[float, int] = {}
        for tokens, slo in prefills:
            key = math.inf if slo is None else slo
            by_slo[key] = by_slo.get(key, 0) + tokens
        self.rate.observe(sum(by_slo.values()), step_s, by_slo)

    def prefill_cap(self) -> int:
        """Most prefill tokens in one step: the whole budget until a tenant with a TTFT SLO
        has been seen and a prefill step measured; never below one block, nor below
        `slo_step_fraction` of the budget (where decodes alone outlast the target, the
        measured rate would otherwise shrink the cap step after step)."""
        budget = self.config.max_num_batched_tokens
        tokens_per_s = self.rate.tokens_per_s
        if not self.ttft_slos or tokens_per_s is None or self.config.slo_step_fraction <= 0:
            return budget
        cap = tokens_per_s * self.tightest * self.config.slo_step_fraction
        floor = max(self.block_size, int(budget * self.config.slo_step_fraction))
        return min(budget, max(floor, int(cap)))


class StepRoom:
    """What is left of one step: its token budget, and of that, the prefill tokens that the
    SLO cap still allows the capped requests, and how many uncapped ones (the tightest
    SLO) are still waiting. Their chunks count against the cap when it is `shared`; else
    `Scheduler._room` set their tokens aside already."""

    __slots__ = ("capped", "closed", "shared", "tokens", "uncapped_waiting")

    def __init__(self, tokens: int, prefill_cap: int, uncapped_waiting: int, shared: bool):
        self.tokens = tokens
        self.capped = prefill_cap
        self.uncapped_waiting = uncapped_waiting
        self.shared = shared
        self.closed = False  # no more prefill this step

    def hold(self) -> None:
        """A capped prefill found the cap spent. Under a policy that keeps its order (the
        cap is `shared`: fcfs, priority, fair), nobody behind it goes this step either, so
        the cap never turns the policy's order around; under edf, tightest-SLO work
        behind it still may."""
        if self.shared:
            self.closed = True

    def for_prefill(self, uncapped: bool) -> int:
        if self.closed:
            return 0
        return self.tokens if uncapped else max(0, min(self.tokens, self.capped))

    def take(self, num_tokens: int, prefill: bool, uncapped: bool) -> None:
        self.tokens -= num_tokens
        if prefill and (self.shared or not uncapped):
            self.capped -= num_tokens
