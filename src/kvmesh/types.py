"""Plain data types shared by every layer. No torch, no I/O."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

FinishReason = Literal["stop", "length", "abort", "error"]
Prompt = str | Sequence[int]
StructuredKind = Literal["json", "json_schema", "regex", "choice", "grammar"]
STRUCTURED_KINDS: tuple[str, ...] = ("json", "json_schema", "regex", "choice", "grammar")


def _require(cond: bool, message: str) -> None:
    if not cond:
        raise ValueError(message)


@dataclass(frozen=True, slots=True)
class StructuredOutput:
    """A constraint on the output: JSON (any object), a JSON schema, a regex, one of
    several strings, or a Lark/GBNF grammar. `spec` is the schema as JSON text, the regex,
    the choices as a JSON list, or the grammar text ("" for plain JSON). Hashable: two
    requests with the same constraint share one compiled grammar."""

    kind: StructuredKind
    spec: str = ""

    def __post_init__(self) -> None:
        _require(self.kind in STRUCTURED_KINDS,
                 f"structured output kind must be one of {STRUCTURED_KINDS}, got {self.kind!r}")
        _require(self.kind == "json" or bool(self.spec), f"a {self.kind} constraint is empty")

    @property
    def is_json(self) -> bool:
        return self.kind in ("json", "json_schema")


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens and when to stop. Validated on construction (ValueError).

    temperature 0 means greedy. top_k None means no top-k cut. max_tokens None means
    "until the model's context is full".
    """

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int | None = None
    min_p: float = 0.0
    seed: int | None = None
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    max_tokens: int | None = 16
    min_tokens: int = 0
    ignore_eos: bool = False
    logprobs: int | None = None
    include_stop_str_in_output: bool = False
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias in [-100, 100])
    structured: StructuredOutput | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "logit_bias",
                           tuple(sorted((int(t), float(b)) for t, b in self.logit_bias)))
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        object.__setattr__(self, "stop", tuple(self.stop))
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))
        self._validate()

    def _validate(self) -> None:
        _require(
            isinstance(self.n, int) and 1 <= self.n <= 128, f"n must be in [1, 128], got {self.n}"
        )
        _require(
            math.isfinite(self.temperature) and 0.0 <= self.temperature <= 100.0,
            f"temperature must be in [0, 100], got {self.temperature}",
        )
        _require(0.0 < self.top_p <= 1.0, f"top_p must be in (0, 1], got {self.top_p}")
        _require(
            self.top_k is None or self.top_k >= 1, f"top_k must be >= 1 or None, got {self.top_k}"
        )
        _require(0.0 <= self.min_p <= 1.0, f"min_p must be in [0, 1], got {self.min_p}")
        _require(
            math.isfinite(self.repetition_penalty) and 0.0 < self.repetition_penalty <= 10.0,
            f"repetition_penalty must be in (0, 10], got {self.repetition_penalty}",
        )
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            _require(-2.0 <= value <= 2.0, f"{name} must be in [-2, 2], got {value}")
        _require(
            self.max_tokens is None or self.max_tokens >= 1,
            f"max_tokens must be >= 1, got {self.max_tokens}",
        )
        _require(self.min_tokens >= 0, f"min_tokens must be >= 0, got {self.min_tokens}")
        _require(
            self.logprobs is None or 0 <= self.logprobs <= 20,
            f"logprobs must be in [0, 20], got {self.logprobs}",
        )
        _require(all(s for s in self.stop), "stop strings must be non-empty")
        _require(all(t >= 0 for t in self.stop_token_ids), "stop_token_ids must be >= 0")
        for token, bias in self.logit_bias:
            _require(token >= 0, f"logit_bias token ids must be >= 0, got {token}")
            _require(math.isfinite(bias) and -100.0 <= bias <= 100.0,
                     f"logit_bias values must be in [-100, 100], got {bias}")
        _require(len(self.logit_bias) <= 300, "logit_bias may name at most 300 tokens")

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def has_penalties(self) -> bool:
        return (
            self.repetition_penalty != 1.0
            or self.presence_penalty != 0.0
            or self.frequency_penalty != 0.0
        )


@dataclass(frozen=True, slots=True)
class TenantClass:
    """What the scheduler knows of a request's tenant: its name (the `fair` policy's
    counter), its TTFT SLO (the `edf` deadline, admission control) and its fair share."""

    name: str
    ttft_slo_s: float | None = None
    weight: float = 1.0
    tpot_slo_s: float | None = None  # reported (SLO metrics), not scheduled on


TokenLogprobs = dict[int, float]


@dataclass
class CompletionOutput:
    """One generated sequence of a request (a request with n > 1 has n of them)."""

    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: FinishReason | None = None
    stop_reason: str | int | None = None
    logprobs: list[TokenLogprobs] | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    """The result of one request, in the shape vLLM users know.

    `text`, `token_ids` and `finish_reason` are those of the first completion.
    """

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    num_cached_tokens: int = 0

    @property
    def finished(self) -> bool:
        return all(o.finished for o in self.outputs)

    @property
    def text(self) -> str:
        return self.outputs[0].text

    @property
    def token_ids(self) -> list[int]:
        return self.outputs[0].token_ids

    @property
    def finish_reason(self) -> FinishReason | None:
        return self.outputs[0].finish_reason


@dataclass(frozen=True)
class RequestDelta:
    """What one engine step added to one sequence: streamed to API clients.

    `index` is the completion index within its parent request (0..n-1).
    """

    request_id: str
    index: int
    new_token_ids: tuple[int, ...]
    new_text: str
    finish_reason: FinishReason | None = None
    stop_reason: str | int | None = None
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0
    logprobs: tuple[TokenLogprobs, ...] | None = None
    error: str | None = None
    queue_time_s: float | None = None  # set on a sequence's first delta

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None
