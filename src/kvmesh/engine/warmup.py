"""A warm-up pass at startup, so the first request does not pay one-time setup.

A fresh process's first forward pass is slow: the CPU backends create their matmul
primitives, the allocator maps its arenas, the native kernels set up their per-thread
state (AMX tile permission and buffers), CUDA creates its handles. On the default model
on 2 vCPUs the first 100-word prompt took 27-76 ms more than the next ones (170 ms in a
slower hour), and -3 to +22 ms more after this pass, which itself takes about 0.07 s. The
engine pays that before it takes requests: two short sequences run a prefill step
(chunks of two sequences, the op-by-op path) and two decode steps (the fused path, one
and two rows), straight through the executor.

A draft model's runner (`--speculative-method draft`) is not warmed: the first
speculative request still pays its setup. The pass goes around the engine core: no
request, no prefix-cache entry, no tier store, no event and no metric comes of it. It
writes the KV of the first few free blocks, which the pool hands out later as it does any
free block (their contents are never read before a sequence writes them).
"""

from __future__ import annotations

import gc
import logging
import time

from kvmesh.engine.batch import ExecuteBatch, Executor, SeqWork
from kvmesh.engine.kv_cache_manager import cdiv
from kvmesh.types import SamplingParams

log = logging.getLogger(__name__)

WARMUP_TOKENS = 32  # the longer sequence's prompt; the other has half
_IDS = ("kvmesh-warmup-0", "kvmesh-warmup-1")


def warmup_lengths(block_size: int, num_blocks: int, max_model_len: int) -> list[int]:
    """Prompt lengths of the warm-up sequences that fit the pool and the context (each
    with room for two decoded tokens: the first sequence decodes twice); [] when none
    fits."""
    lengths = []
    free = num_blocks * block_size
    for n in (WARMUP_TOKENS, WARMUP_TOKENS // 2):
        n = min(n, max_model_len - 2, free - 2)
        if n < 1:
            break
        lengths.append(n)
        free -= cdiv(n + 2, block_size) * block_size
    return lengths


def warm_up(executor: Executor, block_size: int, num_blocks: int, max_model_len: int,
            vocab_size: int) -> float:
    """Run the warm-up steps; seconds taken (0.0 when nothing fits)."""
    lengths = warmup_lengths(block_size, num_blocks, max_model_len)
    if not lengths:
        return 0.0
    start = time.perf_counter()
    params = SamplingParams(max_tokens=2, temperature=0.0)
    seqs, next_block = [], 0
    for seq_id, n in zip(_IDS, lengths, strict=False):
        tokens = [(7919 * i + 1) % vocab_size for i in range(n)]  # any ids will do
        used = cdiv(n + 2, block_size)
        table = list(range(next_block, next_block + used))
        next_block += used
        seqs.append(SeqWork(seq_id, tokens, 0, table, True, params, None, tokens, tokens))
    sampled = executor.execute(ExecuteBatch(seqs=tuple(seqs))).sampled
    done = {s.request_id: [*s.token_ids, sampled.get(s.request_id, 0)] for s in seqs}
    for rows in (seqs[:1], seqs):  # one row, then every sequence
        work = []
        for s in rows:
            ids = done[s.request_id]
            work.append(SeqWork(s.request_id, ids[-1:], len(ids) - 1, s.block_table, True,
                                params, None, s.prompt_token_ids, ids))
        for seq_id, token in executor.execute(ExecuteBatch(seqs=tuple(work))).sampled.items():
            done[seq_id].append(token)
    executor.execute(ExecuteBatch(finished_ids=tuple(s.request_id for s in seqs)))
    elapsed = time.perf_counter() - start
    log.info("warm-up pass: %.2f s", elapsed)
    return elapsed


def freeze_startup_heap() -> int:
    """Move every object alive now (the model, the libraries, the app: some 200k+) out of
    the garbage collector's reach, after one collection; returns how many were frozen.

    A long-running server allocates steadily (deltas, stream chunks), and every so often
    Python runs a full collection, which walks every tracked object: about 0.1 s here for
    a loaded default model, on the engine's critical path (the GIL), as a stall in some
    request's TTFT or token stream. Frozen objects are never walked again; what the
    server allocates later is collected as before. For a process that keeps its engine
    for life (the server): objects frozen here that later become cyclic garbage are not
    reclaimed.
    """
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()
