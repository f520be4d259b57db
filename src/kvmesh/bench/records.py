"""One request's timings as a client saw them (or as the simulator predicts them). Pure."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class RequestRecord:
    session: int
    turn: int
    start_s: float  # relative to the run's start
    ok: bool = False
    error: str | None = None
    status: int | None = None
    ttft_s: float | None = None
    e2e_s: float | None = None
    itl_s: list[float] = field(default_factory=list)
    prompt_tokens: int | None = None
    output_tokens: int = 0
    cached_tokens: int | None = None
    text: str = ""
    retry_after: str | None = None  # the Retry-After header of a refusal (429, 503)

    @property
    def tpot_s(self) -> float | None:
        if self.ttft_s is None or self.e2e_s is None or self.output_tokens < 2:
            return None
        return (self.e2e_s - self.ttft_s) / (self.output_tokens - 1)

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("text")
        if d["retry_after"] is None:
            d.pop("retry_after")
        d["tpot_s"] = self.tpot_s
        return d
