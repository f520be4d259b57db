"""The startup warm-up pass: it runs the model, leaves no trace in the engine's state, and
changes no token."""

from __future__ import annotations

import pytest

from kvmesh import LLM, SamplingParams
from kvmesh.engine.batch import ExecuteBatch, ExecuteResult
from kvmesh.engine.warmup import WARMUP_TOKENS, warm_up, warmup_lengths
from tests.engine.test_engine import prompts

GREEDY = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)


class Spy:
    """The engine's real executor, with each batch it runs recorded."""

    def __init__(self, executor) -> None:
        self.executor = executor
        self.batches: list[ExecuteBatch] = []
        self.results: list[ExecuteResult] = []

    def execute(self, batch: ExecuteBatch) -> ExecuteResult:
        self.batches.append(batch)
        self.results.append(self.executor.execute(batch))
        return self.results[-1]


@pytest.mark.parametrize(("block_size", "num_blocks", "max_model_len"),
                         [(16, 512, 4096), (4, 3, 4096), (4, 1, 4096), (16, 512, 40),
                          (16, 512, 2), (4, 40, 4096)])
def test_warmup_lengths_fit_the_pool_and_the_context(block_size, num_blocks, max_model_len):
    lengths = warmup_lengths(block_size, num_blocks, max_model_len)
    blocks = sum(-(-(n + 2) // block_size) for n in lengths)
    assert blocks <= num_blocks
    assert all(1 <= n <= max_model_len - 2 for n in lengths)
    assert lengths[:1] == ([min(WARMUP_TOKENS, max_model_len - 2, block_size * num_blocks - 2)]
                           if min(max_model_len, block_size * num_blocks) > 2 else [])


def test_warmup_runs_prefill_and_decode_steps_and_leaves_no_state(tiny_llama):
    llm = LLM(str(tiny_llama), dtype="float32", block_size=4, num_blocks=96, warmup=False)
    engine = llm.engine
    spy = Spy(engine.executor)
    assert warm_up(spy, 4, 96, engine.max_model_len, 512) > 0
    kinds = [(len(b.seqs), [len(s.token_ids) for s in b.seqs]) for b in spy.batches]
    assert kinds == [(2, [WARMUP_TOKENS, WARMUP_TOKENS // 2]), (1, [1]), (2, [1, 1]), (0, [])]
    assert spy.batches[-1].finished_ids == ("kvmesh-warmup-0", "kvmesh-warmup-1")
    assert all(len(r.sampled) == len(b.seqs) for b, r in zip(spy.batches, spy.results, strict=True))
    tables = [s.block_table for s in spy.batches[0].seqs]
    assert not set(tables[0]) & set(tables[1])  # each sequence writes its own blocks
    assert engine.pool.num_free_blocks == 96 and engine.pool.high_water == 0
    assert not engine.executor._generators and not engine.executor._matchers
    written = {b for s in spy.batches[0].seqs for b in s.block_table}
    for block in range(96):  # KV written in the warm-up's blocks only
        assert bool(engine.runner.kv[block].any()) == (block in written), block
    assert engine.num_steps == 0 and not engine.has_unfinished_requests()
    engine.kv.check_integrity()
    engine.pool.check_integrity()


def test_warm_engine_gives_the_same_tokens_as_a_cold_one(tiny_llama):
    """The warm-up writes KV into free blocks that requests then take: their tokens (and
    prefix-cache hits) are those of an engine that never warmed up."""
    ps = prompts(6, seed=7, low=20, high=80)
    cold = LLM(str(tiny_llama), dtype="float32", block_size=4, num_blocks=96, warmup=False)
    warm = LLM(str(tiny_llama), dtype="float32", block_size=4, num_blocks=96)
    assert warm.engine.num_steps == 0 and warm.engine.pool.num_free_blocks == 96
    for _ in range(2):  # the second round hits the prefix cache
        a, b = cold.generate(ps, GREEDY), warm.generate(ps, GREEDY)
        assert [o.token_ids for o in a] == [o.token_ids for o in b]
        assert [o.num_cached_tokens for o in a] == [o.num_cached_tokens for o in b]
