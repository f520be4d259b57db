"""Draft-model speculation: a smaller model with the target's vocabulary drafts greedily.

`ModelDrafter` is a `drafter.Drafter`. It runs the draft model through its own
`ModelRunner`, on a paged KV cache of its own (block ids from a private free list,
`max_seqs` sequences' worth), so drafting takes the same native decode and prefill
kernels as the target. Per sequence it remembers which tokens its cache holds. Each
step it feeds what changed since (the target's accepted tokens; after a rejection, the
cache is cut back to the longest common prefix, so rolled-back KV is simply overwritten),
then decodes up to k tokens greedily, all drafting sequences batched together.

Catching up is bounded: each step feeds at most `chunk_tokens` tokens over all sequences,
the shortest backlogs first, and a sequence with a long one (a new prompt) drafts nothing
until it has caught up, so the batch never waits on draft prefills for more than a chunk.
Where the cache is full, the least recently drafted sequences that are not drafting now
give up their blocks. The cache holds `speculative_max_seqs` sequences of the longest
length, within a quarter of the bytes of the target's KV pool.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from kvmesh.config import EngineConfig
from kvmesh.engine.batch import SeqWork
from kvmesh.engine.drafter import DraftWant
from kvmesh.engine.model_runner import ModelRunner, kv_block_bytes
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
    if a[:n] == b[:n]:  # the usual case (no rejection since), compared in C
        return n
    i = 0
    while a[i] == b[i]:
        i += 1
    return i


class ModelDrafter:
    def __init__(self, runner: ModelRunner, num_blocks: int, chunk_tokens: int,
                 vocab_size: int | None = None):
        if chunk_tokens < 1:
            raise ValueError("chunk_tokens must be >= 1")
        self.runner = runner
        self.block_size = runner.block_size
        self.chunk_tokens = chunk_tokens
        self.vocab_size = vocab_size  # the target's: a padded draft vocabulary is cut to it
        self._free = list(range(num_blocks - 1, -1, -1))
        self._seqs: OrderedDict[str, _DraftSeq] = OrderedDict()  # least recent first
        self.num_blocks = num_blocks

    # the Drafter protocol ------------------------------------------------------------------

    def propose(self, wants: Sequence[DraftWant]) -> list[list[int]]:
        drafts: list[list[int]] = [[] for _ in wants]
        busy = {w.seq_id for w in wants}
        first: list[tuple[int, SeqWork]] = []  # (want index, catch-up work) of drafting ones
        feed_only: list[SeqWork] = []  # catching up on a long backlog: no draft this step
        budget = self.chunk_tokens  # tokens fed this step, shared: short backlogs first
        starts = [self._start(w) for w in wants]
        for i in sorted(range(len(wants)), key=lambda j: len(wants[j].tokens) - starts[j]):
            work = self._catch_up(wants[i], starts[i], busy, budget)
            if work is None:
                continue
            budget -= len(work.token_ids)
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
        for i, _ in first:  # the cache now holds all but the last drafted token too
            self._seqs[wants[i].seq_id].tokens.extend(drafts[i][:-1])
        return drafts

    def forget(self, seq_ids: Iterable[str]) -> None:
        for seq_id in seq_ids:
            seq = self._seqs.pop(seq_id, None)
            if seq is not None:
                self._free.extend(reversed(seq.table))

    # internals -----------------------------------------------------------------------------

    def _start(self, w: DraftWant) -> int:
        """Where feeding `w` starts: its tokens that the cache holds (the last one is fed
        again where it holds all: its logits give the first draft token)."""
        seq = self._seqs.get(w.seq_id)
        held = _common_prefix(seq.tokens, w.tokens) if seq is not None else 0
        return max(0, min(held, len(w.tokens) - 1))

    def _catch_up(self, w: DraftWant, start: int, busy: set[str],
                  budget: int) -> SeqWork | None:
        """The work that brings `w`'s draft cache up to its tokens from `start`, at most
        `budget` of them (sampling where it ends on the last one, so the sequence drafts
        this step), or None where there is no budget or no room for it."""
        if budget < 1 or len(w.tokens) < 1:
            return None
        seq = self._seqs.pop(w.seq_id, None) or _DraftSeq()
        self._seqs[w.seq_id] = seq  # most recent last
        n = len(w.tokens)
        end = min(n, start + budget)
        ready = end == n
        need = -(-(n + w.max_tokens - 1 if ready else end) // self.block_size)
        if not self._reserve(seq, need, busy):
            return None
        del seq.tokens[start:]
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
        if self.vocab_size is not None:
            logits = logits[:, :self.vocab_size]
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
    """Whether two tokenizers agree (size with added tokens, and the ids of a probe text).
    Embedding tables may be padded differently: the tokenizers decide."""
    return a.vocab_size == b.vocab_size and a.encode(_PROBE) == b.encode(_PROBE)


def draft_num_blocks(max_model_len: int, k: int, block_size: int, max_seqs: int,
                     block_bytes: int, budget_bytes: int) -> int:
    """Blocks for `max_seqs` drafting sequences of the longest length, within
    `budget_bytes` (but always one longest sequence's worth)."""
    per_seq = -(-(max_model_len + k) // block_size)
    return max(per_seq, min(per_seq * max_seqs, budget_bytes // block_bytes))


def build_model_drafter(config: EngineConfig, target: LoadedModel,
                        progress: bool = True) -> ModelDrafter:
    """Load `--speculative-model` as the target runs (device, dtype, KV dtype) and give it a
    KV cache for `speculative_max_seqs` sequences of the target's longest length, within a
    quarter of the target's KV pool bytes. Errors name the draft model."""
    name = config.scheduler.speculative_model
    try:
        return _build(config, target, progress)
    except (OSError, ValueError, RuntimeError, KeyError) as exc:
        raise ValueError(f"--speculative-model {name!r}: {exc}") from exc


def _build(config: EngineConfig, target: LoadedModel, progress: bool) -> ModelDrafter:
    sched, cache = config.scheduler, config.cache
    assert sched.speculative_model is not None
    resolved = resolve_model(sched.speculative_model, progress=progress)
    if not same_vocabulary(Tokenizer(resolved.path), target.tokenizer):
        raise ValueError("it does not share the target's vocabulary (the tokenizers differ)")
    draft, quantization = load_model(resolved.path, target.dtype, target.device,
                                     target.max_model_len, sched.speculative_quantization)
    if draft.arch.vocab_size < target.model.arch.vocab_size:
        # ids up to the target's (padded) table reach the draft's embedding
        raise ValueError(f"its {draft.arch.vocab_size}-row embedding is smaller than the "
                         f"target's {target.model.arch.vocab_size} rows")
    kernels = select_kernels(config.model.attention_backend, target.dtype, target.kv_dtype,
                             target.device, draft.arch.head_dim)
    seqs = min(sched.speculative_max_seqs, sched.max_num_seqs)
    block_bytes = kv_block_bytes(draft.arch, cache.block_size, target.kv_dtype)
    target_bytes = target.num_blocks * kv_block_bytes(target.model.arch, cache.block_size,
                                                      target.kv_dtype)
    num_blocks = draft_num_blocks(target.max_model_len, sched.num_speculative_tokens,
                                  cache.block_size, seqs, block_bytes, target_bytes // 4)
    runner = ModelRunner(draft, num_blocks, cache.block_size, target.kv_dtype, target.device,
                         *kernels)
    log.info("draft model %s (%s, quantization %s): %d KV blocks, %.0f MiB",
             resolved.name, str(target.dtype).replace("torch.", ""), quantization, num_blocks,
             num_blocks * block_bytes / 2**20)
    return ModelDrafter(runner, num_blocks, sched.max_num_batched_tokens,
                        target.model.arch.vocab_size)
