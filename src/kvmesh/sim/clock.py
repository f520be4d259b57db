"""A virtual clock: `now` is set by the simulator and advanced by the cost model."""

from __future__ import annotations


class VirtualClock:
    """Satisfies `kvmesh.engine.core.Clock`. `sleep` advances time instead of waiting."""

    def __init__(self, start_s: float = 0.0):
        self.t = start_s

    def now(self) -> float:
        return self.t

    def sleep(self, seconds: float) -> None:
        self.t += max(0.0, seconds)

    def advance_to(self, t: float) -> None:
        """Move forward to `t` (never backward: an instance busy past `t` stays there)."""
        if t > self.t:
            self.t = t
