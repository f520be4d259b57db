"""The torch executor: block mover, model runner and sampler behind the core's Executor.

Keeps the one piece of per-sequence state the core does not: each seeded sequence's
random generator, made when the sequence is first seen and dropped when it finishes.
"""

from __future__ import annotations

import torch

from kvmesh.engine.batch import BlockCopy, ExecuteBatch, ExecuteResult, SeqWork
from kvmesh.engine.model_runner import ModelRunner
from kvmesh.engine.sampler import SamplingRow, sample
from kvmesh.kvstore.store import TieredStore


class TorchExecutor:
    def __init__(self, runner: ModelRunner, store: TieredStore | None = None):
        self.runner = runner
        self.store = store
        self._generators: dict[str, torch.Generator] = {}

    def execute(self, batch: ExecuteBatch) -> ExecuteResult:
        for seq_id in batch.finished_ids:
            self._generators.pop(seq_id, None)
        self._move_blocks(batch.stores, batch.loads)
        if not batch.seqs:
            return ExecuteResult()
        logits, positions = self.runner.execute(batch.seqs)
        chosen = [batch.seqs[i] for i in positions]
        rows = [SamplingRow(s.params, s.prompt_token_ids, s.output_token_ids, self._generator(s))
                for s in chosen]
        tokens, logprobs = sample(logits, rows)
        ids = [s.request_id for s in chosen]
        return ExecuteResult(dict(zip(ids, tokens, strict=True)),
                             dict(zip(ids, logprobs, strict=True)))

    def _generator(self, seq: SeqWork) -> torch.Generator | None:
        if seq.seed is None:
            return None
        gen = self._generators.get(seq.request_id)
        if gen is None:
            gen = torch.Generator(device=self.runner.device).manual_seed(seq.seed)
            self._generators[seq.request_id] = gen
        return gen

    def _move_blocks(self, stores: tuple[BlockCopy, ...], loads: tuple[BlockCopy, ...]) -> None:
        """Before the step writes any block: save the leaving blocks, then copy in loaded
        ones."""
        if self.store is None:
            return
        self.store.move(stores, loads, self.runner.block)
        if loads and self.runner.device.type == "cuda":
            # The copies from pinned slots were asynchronous: finish them before those
            # slots can be reused (the stream is otherwise idle at the start of a step).
            torch.cuda.current_stream(self.runner.device).synchronize()
