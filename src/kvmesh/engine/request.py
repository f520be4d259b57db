"""A request's lifecycle state, owned by the scheduler. Pure Python."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from kvmesh.hashing import BlockKey, Namespace, hash_blocks
from kvmesh.types import FinishReason, SamplingParams, TenantClass


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"
    FINISHED = "finished"


@dataclass(eq=False)
class Request:
    """One sequence being generated. `token_ids` holds the prompt, then the outputs.

    The scheduler mutates it; the engine reads it between steps (same thread).
    """

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    namespace: Namespace
    arrival_time: float = 0.0
    priority: int = 0
    eos_token_ids: frozenset[int] = frozenset()
    arrival_seq: int = 0
    token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    num_cached_tokens: int | None = None
    num_external_cached_tokens: int = 0
    status: RequestStatus = RequestStatus.WAITING
    finish_reason: FinishReason | None = None
    stop_reason: str | int | None = None
    num_preemptions: int = 0
    first_scheduled_time: float | None = None
    block_keys: list[BlockKey] = field(default_factory=list)
    seed: int | None = None  # of this sequence's sampling generator
    tenant: TenantClass | None = None
    num_cached_hint: int = 0  # prompt tokens cached when queued (admission's estimate)
    spec_token_ids: list[int] = field(default_factory=list)  # this step's draft, unverified

    def __post_init__(self) -> None:
        if not self.token_ids:
            self.token_ids = list(self.prompt_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - len(self.prompt_token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[len(self.prompt_token_ids) :]

    @property
    def num_pending_tokens(self) -> int:
        """Tokens whose KV is not computed yet (1 for a decoding request)."""
        return len(self.token_ids) - self.num_computed_tokens

    @property
    def is_finished(self) -> bool:
        return self.status is RequestStatus.FINISHED

    def update_block_keys(self, block_size: int) -> list[BlockKey]:
        """Extend the chained keys to cover every full block of `token_ids`."""
        have = len(self.block_keys)
        if (have + 1) * block_size <= len(self.token_ids):
            parent = self.block_keys[-1] if self.block_keys else None
            self.block_keys.extend(
                hash_blocks(self.namespace, self.token_ids, block_size, parent, have * block_size)
            )
        return self.block_keys
