"""What the engine core hands an executor each step, and what it gets back. Pure types.

A batch is self-contained: the executor needs nothing else from the core to run it. The
torch executor (`TorchExecutor`) is the model runner, sampler and block mover; the
simulator brings a cost-model executor that only advances a virtual clock.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

from kvmesh.hashing import BlockKey
from kvmesh.types import SamplingParams

BlockCopy = tuple[int, BlockKey]  # (device block id, key)


@dataclass(frozen=True, slots=True)
class SeqWork:
    """One sequence's slice of a step: feed `token_ids` at positions `start`.. onwards.

    The lists are the core's own (no copies on the hot path): valid during `execute`,
    never to be changed; an executor that keeps a batch copies what it keeps. The whole
    block table is sent each step (a reference, not new block ids only): the executor
    needs no state to follow a sequence.
    """

    request_id: str
    token_ids: list[int]
    start: int
    block_table: list[int]
    is_sampling: bool
    params: SamplingParams
    seed: int | None  # seeds the sequence's generator when the executor first sees it
    prompt_token_ids: list[int]  # for penalties: read, never changed
    all_token_ids: list[int]  # prompt then outputs so far
    num_spec: int = 0  # the last `num_spec` of `token_ids` are a draft: logits for each

    @property
    def output_token_ids(self) -> list[int]:
        return self.all_token_ids[len(self.prompt_token_ids) :]


@dataclass(frozen=True, slots=True)
class ExecuteBatch:
    """One step's work, in order: save `stores` (device blocks leaving the device, whose
    bytes this step may overwrite), copy `loads` in (host -> device), then run `seqs`.
    `finished_ids` are sequences gone since the last batch (drop their state)."""

    seqs: tuple[SeqWork, ...] = ()
    stores: tuple[BlockCopy, ...] = ()
    loads: tuple[BlockCopy, ...] = ()
    finished_ids: tuple[str, ...] = ()

    @property
    def num_tokens(self) -> int:
        return sum(len(s.token_ids) for s in self.seqs)


@dataclass(frozen=True, slots=True)
class ExecuteResult:
    """Sampled token per sampling sequence, and its logprobs entry when asked for."""

    sampled: dict[str, int] = field(default_factory=dict)
    logprobs: dict[str, Any] = field(default_factory=dict)
    verified: dict[str, list[int]] = field(default_factory=dict)  # speculative sequences


class Executor(Protocol):
    def execute(self, batch: ExecuteBatch) -> ExecuteResult:
        """Run one batch. An exception fails the batch's sequences, not the engine."""
        ...


class RunExecutor(Executor, Protocol):
    """An executor that can also run several decode steps of one batch at once (the
    simulator's cost model: each step's cost still counted one by one)."""

    def plan_run(self, batch: ExecuteBatch, max_steps: int, growth: list[int],
                 until_s: float) -> int:
        """How many of the `max_steps` decode steps of `batch` to run: those that start
        before `until_s` (one at least). `growth[j]`: blocks step j allocates, each of
        which may evict one (a store at that step)."""
        ...

    def sample_run(self, batch: ExecuteBatch, num_steps: int) -> dict[str, list[int]]:
        """The tokens each sequence samples over `num_steps` steps, in order."""
        ...

    def execute_run(self, batch: ExecuteBatch, num_steps: int,
                    stores: dict[int, tuple[BlockCopy, ...]]) -> None:
        """Run the steps: step j first saves `stores[j]` (step 0's are the batch's)."""
        ...
