"""Admission control: refuse early what cannot make its TTFT SLO. Pure Python.

The prediction is deliberately simple and measured, not modelled:

    predicted_ttft_s = (prefill tokens ahead + this request's uncached prompt tokens)
                       / measured prefill rate

"Ahead" is what the policy would run first: the waiting requests and unfinished running
prefills it orders before this one (a policy whose order moves as work is done, `fair`,
says itself: `prefill_ahead`). The prefill rate is prefill tokens
per second of step time, over recent steps that ran prefill (an exponentially weighted
ratio of sums, so a step under heavy decode load counts at the rate it really ran). Until
a first prefill step is measured there is no prediction and nothing is refused.

Under `edf`, work with a tighter TTFT SLO that arrives later still runs first. So for a
request with SLO S the rate is taken down by the recent share of prefill tokens that went
to tighter SLOs than S (`PrefillRate.share_tighter_than`): a loose-SLO request is admitted
only if its queue drains in time despite that traffic, rather than admitted, pushed back
to its deadline, and then (its deadline being due) run ahead of urgent work.

A request with the tightest SLO under `edf` counts only the tightest-SLO work ahead of it:
the scheduler sets its prefill aside from the step cap, so capped work ranked first runs
beside it rather than before it.

A request is refused only when waiting is what would break its SLO: with nothing ahead,
it is admitted even if its own prefill alone is too long (retrying would not help).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field


class QueueFullError(RuntimeError):
    """The engine refuses the request now (HTTP 429); retry after `retry_after_s`."""

    def __init__(self, message: str, retry_after_s: float | None = None):
        super().__init__(message)
        self.retry_after_s = retry_after_s


@dataclass
class PrefillRate:
    """Prefill tokens per second of step time, over recent prefill steps."""

    decay: float = 0.9  # weight of the past per observed step (a ~10-step memory)
    _tokens: float = 0.0
    _seconds: float = 0.0
    _by_slo: dict[float, float] = field(default_factory=dict)  # TTFT SLO (inf: none) -> tokens

    def observe(self, num_prefill_tokens: int, step_s: float,
                tokens_by_slo: Mapping[float, int] | None = None) -> None:
        """One step's prefill tokens and time; `tokens_by_slo` splits the tokens by their
        requests' TTFT SLO (math.inf for none)."""
        if num_prefill_tokens <= 0 or step_s <= 0:
            return
        self._tokens = self._tokens * self.decay + num_prefill_tokens
        self._seconds = self._seconds * self.decay + step_s
        by_slo = {slo: n * self.decay for slo, n in self._by_slo.items()}
        for slo, n in (tokens_by_slo or {}).items():
            by_slo[slo] = by_slo.get(slo, 0.0) + n
        self._by_slo = {slo: n for slo, n in by_slo.items() if n >= 1e-3}

    def share_tighter_than(self, slo_s: float) -> float:
        """The recent share of prefill tokens that went to requests with a TTFT SLO below
        `slo_s`."""
        if self._tokens <= 0:
            return 0.0
        return min(1.0, sum(n for s, n in self._by_slo.items() if s < slo_s) / self._tokens)

    @property
    def tokens_per_s(self) -> float | None:
        return self._tokens / self._seconds if self._seconds > 0 else None


def check_slo(num_tokens_ahead: int, num_own_tokens: int, ttft_slo_s: float | None,
              rate: PrefillRate, yield_to_tighter: bool = False) -> None:
    """Raise QueueFullError (with Retry-After) if the queue ahead would make this request
    miss its TTFT SLO. With `yield_to_tighter` (edf), the share of prefill that recent
    tighter-SLO work took is not counted as available to this request's queue."""
    tokens_per_s = rate.tokens_per_s
    if ttft_slo_s is None or tokens_per_s is None or num_tokens_ahead <= 0:
        return
    if yield_to_tighter:
        tokens_per_s *= max(0.05, 1.0 - rate.share_tighter_than(ttft_slo_s))
    predicted_s = (num_tokens_ahead + num_own_tokens) / tokens_per_s
    if predicted_s <= ttft_slo_s:
        return
    wait_s = max(1.0, math.ceil(predicted_s - ttft_slo_s))
    raise QueueFullError(
        f"predicted time to first token {predicted_s:.2f}s ({num_tokens_ahead} prefill "
        f"tokens queued ahead at {tokens_per_s:.0f} tok/s) exceeds the tenant's TTFT SLO "
        f"of {ttft_slo_s:g}s", retry_after_s=wait_s)
