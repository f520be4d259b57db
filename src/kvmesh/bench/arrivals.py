"""When each session starts: open-loop (Poisson with burstiness, or a trace's own times) or
all at once under a concurrency limit. Pure; shared by `kvmesh bench` and `kvmesh sim`."""

from __future__ import annotations

import random
from dataclasses import dataclass

from kvmesh.bench.datasets import Session

DEFAULT_MAX_DURATION_S = 3600.0  # a bench run stops sending after an hour unless told


@dataclass(frozen=True)
class LoadProfile:
    rate: float | None = None  # sessions/s; None: all at once (or trace times)
    burstiness: float = 1.0  # gamma shape: 1 is Poisson, < 1 burstier
    concurrency: int | None = None  # most sessions in flight
    use_trace_times: bool = False
    max_duration_s: float = DEFAULT_MAX_DURATION_S
    ignore_eos: bool = True
    seed: int = 0


def arrival_times(sessions: list[Session], profile: LoadProfile) -> list[float]:
    if profile.use_trace_times:
        return [s.arrival_s for s in sessions]
    if profile.rate is None:
        return [0.0] * len(sessions)
    if profile.rate <= 0 or profile.burstiness <= 0:
        raise ValueError("rate and burstiness must be positive")
    rng = random.Random(profile.seed)
    t, out = 0.0, []
    theta = 1.0 / (profile.rate * profile.burstiness)
    for _ in sessions:
        out.append(t)
        t += rng.gammavariate(profile.burstiness, theta)
    return out
