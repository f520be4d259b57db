"""Draft-model speculation: a smaller model with the target's vocabulary drafts greedily.

`ModelDrafter` is a `drafter.Drafter`. It runs the draft model through its own
`ModelRunner`, on a small paged KV cache of its own (block ids from a private free list,
`max_seqs` sequences' worth), so drafting takes the same native decode and prefill
kernels as the target. Per sequence it remembers which tokens its cache holds. Each
step it feeds what changed since (the target's accepted tokens; after a rejection, the
cache is cut back to the longest common prefix, so rolled-back KV is simply overwritten),
then decodes up to k tokens greedily, all drafting sequences batched together.

A long backlog (a new sequence's prompt) is fed `chunk_tokens` at a time, one chunk per
step, and that sequence drafts nothing until it has caught up: the batch never waits on
one request's draft prefill for more than a chunk. Where the cache is full, the least
recently drafted sequences that are not drafting now give up their blocks.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from kvmesh.config import EngineConfig
from kvmesh.engine.batch import SeqWork
from kvmesh.engine.drafter import DraftWant
from kvmesh.engine.model_runner import ModelRunner
from kvmesh.engine.setup import LoadedModel
from kvmesh.model.cpu_kernels import select_kernels
from kvmesh.model.loader import load_model
from kvmesh.model.registry import resolve_model
from kvmesh.model.tokenizer import Tokenizer
from kvmesh.types import SamplingParams

log = logging.getLogger(__name__)
_GREEDY = SamplingParams(temperature=0.0)
_PROBE = "Speculative decoding needs one vocabulary: {\"a\": [1, 2]} 日本語 ü\n\tdef f(x):"


@dataclass
class _DraftSeq:
    tokens: list[int] = field(default_factory=list)  # whose KV the draft cache holds
    table: list[int] = field(default_factory=list)  # its blocks, in order


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


class ModelDrafter:
    def __init__(self, runner: ModelRunner, num_blocks: int, chunk_tokens: int):
        if chunk_tokens < 1:
            raise ValueError("chunk_tokens must be >= 1")
        self.runner = runner
        self.block_size = runner.block_size
        self.chunk_tokens = chunk_tokens
        self._free = list(range(num_blocks - 1, -1, -1))
        self._seqs: OrderedDict[str, _DraftSeq] = OrderedDict()  # least recent first
        self.num_blocks = num_blocks

    # the Drafter protocol ------------------------------------------------------------------

    def propose(self, wants: Sequence[DraftWant]) -> list[list[int]]:
        drafts: list[list[int]] = [[] for _ in wants]
        busy = {w.seq_id for w in wants}
        first: list[tuple[int, SeqWork]] = []  # (want index, catch-up work) of drafting ones
        feed_only: list[SeqWork] = []  # catching up on a long backlog: no draft this step
        for i, w in enumerate(wants):
            work = self._catch_up(w, busy)
            if work is None:
                continue
            if work.is_sampling:
                first.append((i, work))
            else:
                feed_only.append(work)
        if not first and not feed_only:
            return drafts
        tokens = self._run([w for _, w in first] + feed_only)
        live = list(zip((i for i, _ in first), tokens, strict=True))
        for i, token in live:
            drafts[i].append(token)
        for _ in range(max((wants[i].max_tokens for i, _ in live), default=0) - 1):
            live = [(i, t) for i, t in live if len(drafts[i]) < wants[i].max_tokens]
            if not live:
                break
            rows = [self._decode_work(wants[i], drafts[i]) for i, _ in live]
            for (i, _), token in zip(live, self._run(rows), strict=True):
                drafts[i].append(token)
        for i, _ in first:
            # the cache now holds the sequence and all but the last drafted token
            self._seqs[wants[i].seq_id].tokens = list(wants[i].tokens) + drafts[i][:-1]
        return drafts

    def forget(self, seq_ids: Iterable[str]) -> None:
        for seq_id in seq_ids:
            seq = self._seqs.pop(seq_id, None)
            if seq is not None:
                self._free.extend(reversed(seq.table))

    # internals -----------------------------------------------------------------------------

    def _catch_up(self, w: DraftWant, busy: set[str]) -> SeqWork | None:
        """The work that brings `w`'s draft cache up to its tokens (sampling where it ends
        on the last one, so the sequence drafts this step), or None where there is no
        room for it."""
        seq = self._seqs.pop(w.seq_id, None) or _DraftSeq()
        self._seqs[w.seq_id] = seq  # most recent last
        n = len(w.tokens)
        start = min(_common_prefix(seq.tokens, w.tokens), n - 1)
        end = min(n, start + self.chunk_tokens)
        ready = end == n
        need = -(-(n + w.max_tokens - 1 if ready else end) // self.block_size)
        if not self._reserve(seq, need, busy):
            return None
        del seq.tokens[start:]
        if not ready:
            seq.tokens.extend(w.tokens[start:end])
        return self._work(w.seq_id, list(w.tokens[start:end]), start, seq.table, ready)

    def _reserve(self, seq: _DraftSeq, blocks: int, busy: set[str]) -> bool:
        """Grow `seq`'s table to `blocks`, freeing idle sequences' blocks if need be."""
        short = blocks - len(seq.table)
        while short > len(self._free):
            idle = next((s for s in self._seqs if s not in busy), None)
            if idle is None:
                return False
            self.forget((idle,))
        for _ in range(max(0, short)):
            seq.table.append(self._free.pop())
        return True

    def _decode_work(self, w: DraftWant, draft: list[int]) -> SeqWork:
        return self._work(w.seq_id, [draft[-1]], len(w.tokens) + len(draft) - 1,
                          self._seqs[w.seq_id].table, True)

    @staticmethod
    def _work(seq_id: str, tokens: list[int], start: int, table: list[int],
              sampling: bool) -> SeqWork:
        return SeqWork(seq_id, tokens, start, table, sampling, _GREEDY, None, [], [])

    def _run(self, rows: list[SeqWork]) -> list[int]:
        """One draft-model step; the greedy next token of each sampling row, in order."""
        logits, owner = self.runner.execute(rows)
        picks = logits.argmax(dim=-1).tolist() if len(owner) else []
        by_row = dict(zip(owner, picks, strict=True))
        return [by_row[r] for r in range(len(rows)) if rows[r].is_sampling]

    def check_integrity(self) -> None:
        held = [b for s in self._seqs.values() for b in s.table]
        if len(held) != len(set(held)) or set(held) & set(self._free):
            raise AssertionError("a draft block is held twice")
        if len(held) + len(self._free) != self.num_blocks:
            raise AssertionError("draft blocks leaked")


def same_vocabulary(a: Tokenizer, b: Tokenizer) -> bool:
    """Whether two tokenizers agree (size, and the ids of a probe text)."""
    return a.vocab_size == b.vocab_size and a.encode(_PROBE) == b.encode(_PROBE)


def build_model_drafter(config: EngineConfig, target: LoadedModel,
                        progress: bool = True) -> ModelDrafter:
    """Load `--speculative-model` as the target runs (device, dtype, KV dtype) and give it a
    KV cache for `speculative_max_seqs` sequences of the target's longest length."""
    sched, cache = config.scheduler, config.cache
    assert sched.speculative_model is not None
    resolved = resolve_model(sched.speculative_model, progress=progress)
    draft, quantization = load_model(resolved.path, target.dtype, target.device,
                                     target.max_model_len, sched.speculative_quantization)
    if draft.arch.vocab_size != target.model.arch.vocab_size or not same_vocabulary(
            Tokenizer(resolved.path), target.tokenizer):
        raise ValueError(f"the draft model {sched.speculative_model!r} does not share the "
                         f"target's vocabulary ({draft.arch.vocab_size} vs "
                         f"{target.model.arch.vocab_size} tokens, or other ids)")
    kernels = select_kernels(config.model.attention_backend, target.dtype, target.kv_dtype,
                             target.device, draft.arch.head_dim)
    per_seq = -(-(target.max_model_len + sched.num_speculative_tokens) // cache.block_size)
    num_blocks = per_seq * sched.speculative_max_seqs
    runner = ModelRunner(draft, num_blocks, cache.block_size, target.kv_dtype, target.device,
                         *kernels)
    log.info("draft model %s (%s, quantization %s): %d KV blocks, %.0f MiB at most",
             resolved.name, str(target.dtype).replace("torch.", ""), quantization, num_blocks,
             num_blocks * runner.block_bytes / 2**20)
    return ModelDrafter(runner, num_blocks, sched.max_num_batched_tokens)
