"""The torch executor: block mover, model runner and sampler behind the core's Executor.

Keeps the per-sequence state the core does not: each seeded sequence's random generator
and each constrained sequence's grammar matcher, made when the sequence is first sampled
and dropped when it finishes.
"""

from __future__ import annotations

import numpy as np
import torch

from kvmesh.engine.batch import BlockCopy, ExecuteBatch, ExecuteResult, SeqWork
from kvmesh.engine.model_runner import ModelRunner
from kvmesh.engine.sampler import SamplingRow, sample, verify_draft
from kvmesh.engine.structured import Grammars, Matcher, steer_to_close
from kvmesh.kvstore.store import TieredStore


class TorchExecutor:
    def __init__(self, runner: ModelRunner, store: TieredStore | None = None,
                 grammars: Grammars | None = None, eos_token_ids: frozenset[int] = frozenset()):
        self.runner = runner
        self.store = store
        self.grammars = grammars
        self._generators: dict[str, torch.Generator] = {}
        self._matchers: dict[str, Matcher] = {}
        self._eos_ids = sorted(eos_token_ids)

    def execute(self, batch: ExecuteBatch) -> ExecuteResult:
        for seq_id in batch.finished_ids:
            self._generators.pop(seq_id, None)
            self._matchers.pop(seq_id, None)
        self._move_blocks(batch.stores, batch.loads)
        if not batch.seqs:
            return ExecuteResult()
        logits, positions = self.runner.execute(batch.seqs)
        plain = [r for r, i in enumerate(positions) if not batch.seqs[i].num_spec]
        verified = self._verify(logits, positions, batch.seqs)
        if len(plain) < len(positions):
            logits = logits[plain]
        chosen = [batch.seqs[positions[r]] for r in plain]
        rows = [SamplingRow(s.params, s.prompt_token_ids, s.output_token_ids, self._generator(s),
                            self._allowed(s))
                for s in chosen]
        tokens, logprobs = sample(logits, rows) if rows else ([], [])
        ids = [s.request_id for s in chosen]
        return ExecuteResult(dict(zip(ids, tokens, strict=True)),
                             dict(zip(ids, logprobs, strict=True)), verified)

    def _verify(self, logits: torch.Tensor, positions: list[int],
                seqs: tuple[SeqWork, ...]) -> dict[str, list[int]]:
        """Each drafted sequence's accepted draft and the token after it."""
        out: dict[str, list[int]] = {}
        r = 0
        while r < len(positions):
            s = seqs[positions[r]]
            if s.num_spec:
                draft = s.token_ids[len(s.token_ids) - s.num_spec:]
                out[s.request_id] = verify_draft(logits[r:r + s.num_spec + 1], draft,
                                                 s.params, self._generator(s))
                r += s.num_spec + 1
            else:
                r += 1
        return out

    def _generator(self, seq: SeqWork) -> torch.Generator | None:
        if seq.seed is None:
            return None
        gen = self._generators.get(seq.request_id)
        if gen is None:
            gen = torch.Generator(device=self.runner.device).manual_seed(seq.seed)
            self._generators[seq.request_id] = gen
        return gen

    def _allowed(self, seq: SeqWork) -> np.ndarray | None:
        """The grammar's bitmask for a constrained sequence's next token (None: free)."""
        spec = seq.params.structured
        if spec is None:
            return None
        m = self._matchers.get(seq.request_id)
        if m is None:
            if self.grammars is None:
                raise RuntimeError("structured output needs the executor's grammars")
            m = self._matchers[seq.request_id] = self.grammars.matcher(spec)
        m.follow(seq.output_token_ids)
        if m.failed is None:
            allowed = m.allowed()
            if self.grammars is not None and m.should_close(seq.params.max_tokens):
                return steer_to_close(allowed, self.grammars.closers(), m.in_string)
            return allowed
        # Not reachable with masked sampling; should it happen, end the sequence.
        words = np.zeros(self.grammars.mask_words if self.grammars else 0, dtype=np.uint32)
        for t in self._eos_ids:
            words[t // 32] |= np.uint32(1 << (t % 32))
        return words.view(np.int32)

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
