"""What the scheduler hands the engine core each step. Pure types."""

from __future__ import annotations

from dataclasses import dataclass

from kvmesh.hashing import BlockKey


@dataclass(frozen=True)
class ScheduledSeq:
    request_id: str
    num_computed_tokens: int
    num_new_tokens: int
    is_sampling: bool
    num_spec: int = 0  # drafted tokens among the new ones (verified by this step)


@dataclass(frozen=True)
class SchedulerOutput:
    seqs: tuple[ScheduledSeq, ...]
    preempted_ids: tuple[str, ...]
    loads: tuple[tuple[int, BlockKey], ...] = ()  # device block <- host-tier block, first

    @property
    def num_batched_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.seqs)

    @property
    def is_empty(self) -> bool:
        return not self.seqs
