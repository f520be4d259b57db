"""Summaries of a run: percentiles, throughput and goodput under SLOs."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from kvmesh.bench.records import RequestRecord

PERCENTILES = (50, 90, 95, 99)


@dataclass(frozen=True)
class SLO:
    ttft_ms: float | None = None
    tpot_ms: float | None = None
    e2e_ms: float | None = None

    @classmethod
    def parse(cls, text: str | None) -> SLO:
        """'ttft_ms=500,tpot_ms=50' -> SLO. Raises ValueError on unknown keys."""
        if not text:
            return cls()
        values: dict[str, float] = {}
        for part in text.split(","):
            key, _, value = part.partition("=")
            if key.strip() not in ("ttft_ms", "tpot_ms", "e2e_ms") or not value:
                raise ValueError(f"bad SLO term {part!r}: use ttft_ms=, tpot_ms=, e2e_ms=")
            values[key.strip()] = float(value)
        return cls(**values)

    def met(self, r: RequestRecord) -> bool:
        if not r.ok:
            return False
        checks = [(self.ttft_ms, r.ttft_s), (self.tpot_ms, r.tpot_s), (self.e2e_ms, r.e2e_s)]
        return all(limit is None or (v is not None and v * 1000 <= limit) for limit, v in checks)


def percentile(values: list[float], p: float) -> float | None:
    if not values:
        return None
    s = sorted(values)
    k = (len(s) - 1) * p / 100
    lo, hi = math.floor(k), math.ceil(k)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def stats(values: list[float]) -> dict[str, float | None]:
    out: dict[str, float | None] = {"mean": sum(values) / len(values) if values else None}
    for p in PERCENTILES:
        out[f"p{p}"] = percentile(values, p)
    return out


def summarize(records: list[RequestRecord], duration_s: float, slo: SLO) -> dict[str, Any]:
    ok = [r for r in records if r.ok]
    out_tokens = sum(r.output_tokens for r in ok)
    prompt = sum(r.prompt_tokens or 0 for r in ok)
    cached = sum(r.cached_tokens or 0 for r in ok)
    return {
        "num_requests": len(records),
        "completed": len(ok),
        "failed": len(records) - len(ok),
        "duration_s": duration_s,
        "req_per_s": len(ok) / duration_s if duration_s else None,
        "output_tok_per_s": out_tokens / duration_s if duration_s else None,
        "goodput_req_per_s": sum(slo.met(r) for r in records) / duration_s if duration_s else None,
        "slo": {k: v for k, v in vars(slo).items() if v is not None},
        "slo_attainment": sum(slo.met(r) for r in records) / len(records) if records else None,
        "ttft_s": stats([r.ttft_s for r in ok if r.ttft_s is not None]),
        "tpot_s": stats([r.tpot_s for r in ok if r.tpot_s is not None]),
        "itl_s": stats([x for r in ok for x in r.itl_s]),
        "e2e_s": stats([r.e2e_s for r in ok if r.e2e_s is not None]),
        "prompt_tokens": prompt,
        "output_tokens": out_tokens,
        "cached_tokens": cached,
        "cached_token_ratio": cached / prompt if prompt else None,
        "errors": sorted({(r.error or "")[:200] for r in records if not r.ok})[:10],
    }
