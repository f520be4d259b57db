"""A workload as configuration: which dataset, how large, and how it arrives. Shared by
`kvmesh bench` (sent to a server) and `kvmesh sim` (replayed in the simulator). Pure."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, ClassVar

from kvmesh.bench import datasets as ds
from kvmesh.bench.arrivals import DEFAULT_MAX_DURATION_S, LoadProfile

DATASETS = ("random", "shared-prefix", "multiturn", "longdoc", "trace")


def _help(text: str, **kwargs: Any) -> Any:
    return field(metadata={"help": text}, **kwargs)


@dataclass(frozen=True)
class WorkloadConfig:
    """The requests to send and when."""

    SECTION: ClassVar[str] = "workload"

    dataset: str = _help(f"One of {', '.join(DATASETS)}.", default="random")
    num_requests: int = _help("Requests (sessions for multiturn; rows for a trace).",
                              default=32)
    input_len: int = _help("Prompt length in words (prefix/doc/system length).", default=128)
    output_len: int = _help("Output tokens per request (a cap, for traces).", default=64)
    turns: int = _help("Turns per multiturn session.", default=4)
    groups: int = _help("Prefix groups / distinct documents.", default=4)
    trace: str | None = _help("Trace file (.jsonl Mooncake, .csv Azure).", default=None)
    time_scale: float = _help("Multiply trace timestamps by this.", default=1.0)
    length_scale: float = _help("Multiply trace lengths by this.", default=1.0)
    rate: float | None = _help("Poisson arrival rate (sessions/s); unset: all at once, or "
                               "the trace's own times.", default=None)
    burstiness: float = _help("Gamma shape of inter-arrivals (1 = Poisson).", default=1.0)
    concurrency: int | None = _help("Most sessions in flight.", default=None)
    max_duration_s: float | None = _help(
        "Stop sending after this many seconds (unset: when every session is sent; a bench "
        "run stops at an hour).", default=None)
    seed: int = _help("Workload and arrival seed.", default=0)

    def __post_init__(self) -> None:
        if self.dataset not in DATASETS:
            raise ValueError(f"unknown dataset {self.dataset!r}; choose from {DATASETS}")
        if self.dataset == "trace" and not self.trace:
            raise ValueError("dataset trace needs a trace file (--trace FILE)")
        if self.num_requests < 1:
            raise ValueError("num_requests must be >= 1")

    def cli_args(self) -> list[str]:
        """The `kvmesh bench` flags that send this workload (unset fields left out)."""
        return [arg for f in fields(self) if (value := getattr(self, f.name)) is not None
                for arg in (f"--{f.name.replace('_', '-')}", str(value))]

    def profile(self, ignore_eos: bool = True) -> LoadProfile:
        return LoadProfile(rate=self.rate, burstiness=self.burstiness,
                           concurrency=self.concurrency,
                           use_trace_times=self.dataset == "trace" and self.rate is None,
                           max_duration_s=self.max_duration_s or DEFAULT_MAX_DURATION_S,
                           ignore_eos=ignore_eos,
                           seed=self.seed)

    def sessions(self) -> list[ds.Session]:
        """The text sessions `kvmesh bench` sends (the simulator tokenizes them)."""
        n, seed = self.num_requests, self.seed
        if self.dataset == "random":
            return ds.random_dataset(n, self.input_len, self.output_len, 0.3, seed)
        if self.dataset == "shared-prefix":
            return ds.shared_prefix_dataset(n, self.groups, self.input_len,
                                            max(8, self.input_len // 8), self.output_len, seed)
        if self.dataset == "multiturn":
            return ds.multiturn_dataset(n, self.turns, max(4, self.input_len // 4),
                                        self.output_len, seed, system_len=self.input_len)
        if self.dataset == "longdoc":
            return ds.longdoc_dataset(n, self.groups, self.input_len, 16, self.output_len, seed)
        assert self.trace is not None
        return ds.trace_dataset(Path(self.trace), n, self.time_scale, self.length_scale,
                                self.output_len, seed)
