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


def test_drafts_are_the_draft_models_greedy_continuation(other_draft):
    draft_llm = LLM(str(other_draft), **COMMON)
    engine = draft_llm.engine  # its model, on a KV cache of the drafter's own
    runner = ModelRunner(engine.loaded.model, 40, 4, torch.float32, torch.device("cpu"),
                         engine.runner.decode_kernel, engine.runner.prefill_kernel)
    drafter = ModelDrafter(runner, num_blocks=40, chunk_tokens=8)
    prompts = [p[:8] for p in _prompts(3, seed=3)]
    prompts[0] = prompts[0] + [7] * (30 - len(prompts[0]))  # a backlog of 30: 4 chunks
    params = SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True)
    want = [o.token_ids for o in draft_llm.generate(prompts, params)]
    got: list[list[int]] = [[] for _ in prompts]
    for _ in range(4):
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
    while drafter.propose([DraftWant("big", long[:100], 2)]) == [[]]:
        pass
    drafter.check_integrity()
    assert "big" in drafter._seqs and len(drafter._seqs) < 4
    assert drafter.propose([DraftWant("huge", list(range(3, 200)), 2)]) == [[]]  # no room
    drafter.forget(["s0", "s1", "s2", "big", "huge"])
    drafter.check_integrity()
    assert len(drafter._free) == 40


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
    plain = LLM("smollm2-135m-instruct", dtype="float32", quantization="none")
    want = [o.token_ids for o in plain.generate(prompts, params)]
    del plain
    spec = LLM("smollm2-135m-instruct", dtype="float32", quantization="none",
               speculative_method="draft", speculative_model="smollm2-135m-instruct",
               speculative_quantization="int4")
    assert [spec.generate([p], params)[0].token_ids for p in prompts] == want
    s = spec.engine.core.speculator
    assert s is not None and s.acceptance_rate > 0.7, s.acceptance_rate
