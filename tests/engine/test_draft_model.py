"""Draft-model speculation: greedy output is token for token that of plain decoding
(float32), whatever the draft; the drafter's proposals are the draft model's own greedy
continuation, long backlogs are fed in chunks, and a full draft cache gives up idle
sequences' blocks without leaking any."""

from __future__ import annotations

import random

import pytest
import torch

from kvmesh import LLM, SamplingParams
from kvmesh.config import SchedulerConfig
from kvmesh.engine.draft_model import ModelDrafter
from kvmesh.engine.drafter import DraftWant
from kvmesh.engine.model_runner import ModelRunner
from tests.builders import build_tiny_model

COMMON = dict(dtype="float32", block_size=4, num_blocks=1024)


def _prompts(n: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, 512) for _ in range(rng.randrange(4, 40))] for _ in range(n)]


@pytest.fixture(scope="module")
def other_draft(tmp_path_factory):
    """Another random model with the same tokenizer: one layer, other weights."""
    return build_tiny_model(tmp_path_factory.mktemp("tiny-draft"), "llama", seed=7,
                            num_hidden_layers=1)


@pytest.fixture(scope="module")
def plain(tiny_llama):
    return LLM(str(tiny_llama), **COMMON)


def _spec(target, draft, **kw) -> LLM:
    return LLM(str(target), speculative_method="draft", speculative_model=str(draft),
               num_speculative_tokens=4, speculative_max_seqs=32, **COMMON, **kw)


def test_greedy_output_is_identical_with_a_draft_model(plain, tiny_llama, other_draft):
    prompts = _prompts(20, seed=1)
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    want = [o.token_ids for o in plain.generate(prompts, params)]
    for draft in (tiny_llama, other_draft):
        spec = _spec(tiny_llama, draft)
        assert [o.token_ids for o in spec.generate(prompts, params)] == want
        for p, w in zip(prompts[:4], want[:4], strict=True):
            assert spec.generate([p], params)[0].token_ids == w
        s = spec.engine.core.speculator
        assert s is not None and s.num_drafted > 0
        drafter = s.drafter
        assert isinstance(drafter, ModelDrafter)
        drafter.check_integrity()
        assert not drafter._seqs  # finished sequences gave their draft blocks back
        if draft == tiny_llama:  # the target drafting for itself: nearly all accepted
            assert s.acceptance_rate > 0.9, s.acceptance_rate
        else:
            assert s.acceptance_rate < 0.9, s.acceptance_rate
        spec.engine.core.scheduler.check_integrity()


def test_sampled_requests_with_a_draft_follow_the_target(plain, tiny_llama, other_draft):
    """top_k=1 puts all the mass on the target's argmax: rejection sampling must accept
    exactly the draft tokens greedy would, whatever the draft proposed."""
    spec = _spec(tiny_llama, other_draft)
    prompts = _prompts(6, seed=2)
    greedy = SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True)
    one = SamplingParams(temperature=0.9, top_k=1, max_tokens=20, ignore_eos=True)
    want = [o.token_ids for o in plain.generate(prompts, greedy)]
    assert [o.token_ids for o in spec.generate(prompts, one)] == want
    assert spec.engine.core.speculator.num_drafted > 0  # type: ignore[union-attr]


def test_catch_up_in_chunks_and_a_full_draft_cache_in_the_engine(plain, tiny_llama):
    """Draft prefills fed 8 tokens a step, and a draft cache shared by more sequences than
    it holds: the target still gives plain decoding's tokens, and drafts still pay."""
    spec = LLM(str(tiny_llama), speculative_method="draft", speculative_model=str(tiny_llama),
               num_speculative_tokens=3, speculative_max_seqs=2, max_num_batched_tokens=8,
               **COMMON)
    prompts = _prompts(6, seed=5)
    params = SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True)
    want = [o.token_ids for o in plain.generate(prompts, params)]
    assert [o.token_ids for o in spec.generate(prompts, params)] == want
    s = spec.engine.core.speculator
    assert s is not None and s.num_drafted > 0 and s.acceptance_rate > 0.9
    assert isinstance(s.drafter, ModelDrafter)
    s.drafter.check_integrity()


class _Broken:
    def propose(self, wants):
        raise RuntimeError("draft model fell over")

    def forget(self, seq_ids):
        pass


def test_a_failing_drafter_costs_drafts_not_requests(plain, tiny_llama):
    spec = _spec(tiny_llama, tiny_llama)
    s = spec.engine.core.speculator
    assert s is not None
    s.drafter = _Broken()
    prompts = _prompts(3, seed=6)
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    want = [o.token_ids for o in plain.generate(prompts, params)]
    assert [o.token_ids for o in spec.generate(prompts, params)] == want
    assert s.max_seqs == 0  # three failures in a row: speculation turned off
    spec.engine.core.scheduler.check_integrity()


def test_drafts_are_the_draft_models_greedy_continuation(other_draft):
    draft_llm = LLM(str(other_draft), **COMMON)
    engine = draft_llm.engine  # its model, on a KV cache of the drafter's own
    runner = ModelRunner(engine.loaded.model, 40, 4, torch.float32, engine.loaded.device,
                         engine.runner.decode_kernel, engine.runner.prefill_kernel)
    drafter = ModelDrafter(runner, num_blocks=40, chunk_tokens=8)
    prompts = [p[:8] for p in _prompts(3, seed=3)]
    prompts[0] = prompts[0] + [7] * (30 - len(prompts[0]))  # a backlog of 30: 4 chunks
    # 8 tokens fed a step over all sequences, shortest backlog first: s1, s2, then s0's
    # four chunks (the last drafts)
    params = SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True)
    want = [o.token_ids for o in draft_llm.generate(prompts, params)]
    got: list[list[int]] = [[] for _ in prompts]
    for _ in range(6):
        wants = [DraftWant(f"s{i}", p, 5) for i, p in enumerate(prompts) if not got[i]]
        for w, d in zip(wants, drafter.propose(wants), strict=True):
            got[int(w.seq_id[1:])] = d
        drafter.check_integrity()
    assert got == want
    # after an accepted prefix and a rejection, the draft continues from the new tokens
    tokens = prompts[1] + want[1][:2] + [9]
    cont = draft_llm.generate([tokens], SamplingParams(temperature=0.0, max_tokens=3,
                                                       ignore_eos=True))[0].token_ids
    assert drafter.propose([DraftWant("s1", tokens, 3)]) == [cont]
    # the cache holds 40 blocks of 4 tokens: a long new sequence takes idle ones' blocks
    long = [t for p in _prompts(8, seed=4) for t in p]
    for _ in range(100 // 8 + 1):  # 8 tokens a step: 13 steps to catch up on 100
        got_big = drafter.propose([DraftWant("big", long[:100], 2)])
        if got_big != [[]]:
            break
    assert len(got_big[0]) == 2
    drafter.check_integrity()
    assert "big" in drafter._seqs and len(drafter._seqs) < 4
    drafter.forget(["s0", "s1", "s2", "big"])
    drafter.check_integrity()
    assert len(drafter._free) == 40
    # two sequences catching up at once that together need more than the cache (21 + 26
    # blocks of 40): the shorter goes first, the other gets no draft and keeps no blocks
    wide = ModelDrafter(runner, num_blocks=40, chunk_tokens=512)
    both = wide.propose([DraftWant("a", long[:100], 2), DraftWant("b", long[:80], 2)])
    assert both[0] == [] and len(both[1]) == 2
    wide.check_integrity()
    alone = wide.propose([DraftWant("a", long[:100], 2)])  # "b" idle now: it makes room
    assert len(alone[0]) == 2 and "b" not in wide._seqs
    wide.forget(["a"])
    wide.check_integrity()
    assert len(wide._free) == 40


def test_a_draft_with_another_vocabulary_or_no_model_is_refused(tiny_llama, default_model_dir):
    with pytest.raises(ValueError, match="vocabulary"):
        _spec(tiny_llama, default_model_dir)
    with pytest.raises(ValueError, match="go together"):
        SchedulerConfig(speculative_method="draft")
    with pytest.raises(ValueError, match="go together"):
        SchedulerConfig(speculative_method="ngram", speculative_model="x")


@pytest.mark.slow
def test_default_model_with_itself_in_int4_as_draft():
    """The exact float32 path drafting with its own model: the same tokens as plain."""
    chat = "<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n"
    prompts = [chat.format(q) for q in ("What is a prime number?", "Name three rivers.",
                                        "Repeat exactly: the cat sat on the mat.")]
    params = SamplingParams(temperature=0.0, max_tokens=40)
    plain = LLM("smollm2-135m-instruct", device="cpu", dtype="float32", quantization="none")
    want = [o.token_ids for o in plain.generate(prompts, params)]
    del plain
    spec = LLM("smollm2-135m-instruct", device="cpu", dtype="float32", quantization="none",
               speculative_method="draft", speculative_model="smollm2-135m-instruct",
               speculative_quantization="int4")
    assert [spec.generate([p], params)[0].token_ids for p in prompts] == want
    s = spec.engine.core.speculator
    assert s is not None and s.acceptance_rate > 0.7, s.acceptance_rate
