"""Speculative decoding (prompt lookup): greedy output is token for token that of plain
decoding, batched and one at a time, in float32; drafts respect stops and budgets; the
drafter and the speculator's back-off on their own."""

from __future__ import annotations

import random

import pytest

from kvmesh import LLM, SamplingParams
from kvmesh.engine.drafter import NgramIndex


def _repetitive(n: int, seed: int) -> list[list[int]]:
    """Prompts that repeat a phrase, so prompt lookup has something to draft."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        phrase = [rng.randrange(3, 512) for _ in range(rng.randrange(3, 9))]
        out.append([t for _ in range(rng.randrange(3, 7)) for t in phrase]
                   + [rng.randrange(3, 512) for _ in range(rng.randrange(0, 5))])
    return out


@pytest.fixture(scope="module")
def pair(tiny_llama):
    common = dict(dtype="float32", block_size=4, num_blocks=1024)
    plain = LLM(str(tiny_llama), **common)
    spec = LLM(str(tiny_llama), speculative_method="ngram", num_speculative_tokens=4,
               speculative_max_seqs=32, **common)
    return plain, spec


def test_greedy_output_is_identical_with_speculation_batched_and_alone(pair):
    plain, spec = pair
    prompts = _repetitive(24, seed=1)
    params = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)
    want = [o.token_ids for o in plain.generate(prompts, params)]
    assert [o.token_ids for o in spec.generate(prompts, params)] == want
    for p, w in zip(prompts[:6], want[:6], strict=True):
        assert spec.generate([p], params)[0].token_ids == w
    s = spec.engine.core.speculator
    assert s.num_drafted > 0 and s.num_accepted > 0  # it did speculate, and it paid
    spec.engine.core.scheduler.check_integrity()
    assert spec.engine.pool.num_free_blocks == spec.engine.pool.num_blocks


def test_drafts_respect_max_tokens_stop_tokens_and_eos(pair):
    plain, spec = pair
    prompts = _repetitive(8, seed=2)
    for params in (SamplingParams(temperature=0.0, max_tokens=7, ignore_eos=True),
                   SamplingParams(temperature=0.0, max_tokens=30)):
        want = [(o.token_ids, o.finish_reason) for o in plain.generate(prompts, params)]
        got = [(o.token_ids, o.finish_reason) for o in spec.generate(prompts, params)]
        assert got == want
    first = plain.generate(prompts[:1], SamplingParams(temperature=0.0, max_tokens=20,
                                                       ignore_eos=True))[0].token_ids
    stop = SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True,
                          stop_token_ids=(first[5],))
    assert spec.generate(prompts[:1], stop)[0].token_ids == \
        plain.generate(prompts[:1], stop)[0].token_ids


def test_sampled_requests_speculate_and_seeded_ones_stay_repeatable(pair):
    plain, spec = pair
    s = spec.engine.core.speculator
    prompts = _repetitive(4, seed=3)
    greedy = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    want = [o.token_ids for o in plain.generate(prompts, greedy)]
    before = s.num_drafted
    # top_k=1 puts all the mass on the argmax: rejection sampling must then accept
    # exactly the draft tokens greedy would, and replace the first wrong one by it
    one = SamplingParams(temperature=0.7, top_k=1, max_tokens=24, ignore_eos=True)
    assert [o.token_ids for o in spec.generate(prompts, one)] == want
    assert s.num_drafted > before  # rejection sampling ran
    seeded = SamplingParams(temperature=0.8, seed=3, max_tokens=24, ignore_eos=True)
    before = s.num_drafted
    a = [o.token_ids for o in spec.generate(prompts, seeded)]
    assert [o.token_ids for o in spec.generate(prompts[:1], seeded)] == a[:1]
    assert s.num_drafted == before  # seeded sampling is not speculated: it repeats


def test_stop_strings_on_accepted_draft_tokens_and_aborts(pair):
    plain, spec = pair
    prompts = _repetitive(6, seed=4)
    greedy = SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True)
    for p, out in zip(prompts, plain.generate(prompts, greedy), strict=True):
        if len(out.text) < 12:
            continue
        stop = SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True,
                              stop=(out.text[8:11],))
        want = plain.generate([p], stop)[0]
        got = spec.generate([p], stop)[0]
        assert (got.text, got.finish_reason) == (want.text, want.finish_reason)
    engine = spec.engine
    engine.add_request("gone", prompts[0], greedy)
    for _ in range(6):
        engine.step()
    engine.abort_request("gone")
    assert "gone" not in engine.core.speculator.drafter._indexes  # type: ignore[attr-defined]
    engine.core.scheduler.check_integrity()


def test_ngram_index_drafts_what_followed_the_last_match():
    idx = NgramIndex(max_n=3)
    seq = [1, 2, 3, 4, 5, 9, 2, 3]
    assert idx.propose(seq, 3) == [4, 5, 9]  # "2 3" was followed by 4 5 9
    seq += [7]
    assert idx.propose(seq, 2) == []  # 7 never occurred before
    seq += [1, 2]
    assert idx.propose(seq, 2) == [3, 4]  # "1 2" (longest match) at the start
    assert NgramIndex().propose([5], 4) == [] and idx.propose(seq, 0) == []
    with pytest.raises(ValueError):
        NgramIndex(max_n=0)


@pytest.mark.slow
def test_default_model_greedy_is_identical_with_speculation_on_20_prompts():
    texts = ["The committee met on Tuesday to review the budget for roads and schools.",
             "def add(a, b):\n    return a + b\n\ndef sub(a, b):\n    return a - b\n",
             "Our office is closed on Monday; urgent requests go to the support team."]
    asks = ["Repeat this exactly: {}", "Copy this text, then say done: {}",
            "Fix any typos and return the text: {}", "Summarise in one line: {}"]
    chat = "<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n"
    prompts = [chat.format(a.format(t)) for a in asks for t in texts]
    prompts += [chat.format(q) for q in ("What is a prime number?", "Name three rivers.",
                                         "Write a haiku about rain.", "Why is the sea salty?",
                                         "Give two tips for learning to cook.",
                                         "What does a CPU do?", "Tell me about owls.",
                                         "How do plants drink water?")]
    assert len(prompts) == 20
    params = SamplingParams(temperature=0.0, max_tokens=64)
    plain = LLM("smollm2-135m-instruct", dtype="float32")
    want = [o.token_ids for o in plain.generate(prompts, params)]
    del plain
    spec = LLM("smollm2-135m-instruct", dtype="float32", speculative_method="ngram")
    assert [o.token_ids for o in spec.generate(prompts, params)] == want
    assert [spec.generate([p], params)[0].token_ids for p in prompts] == want
    assert spec.engine.core.speculator.num_accepted > 0


@pytest.mark.parametrize("params", [SamplingParams(temperature=0.8),
                                    SamplingParams(temperature=1.2, top_k=4, top_p=0.9)],
                         ids=["plain", "top-k-p"])
def test_rejection_sampling_keeps_the_target_distribution(params):
    """Each verified token follows the target's (filtered) distribution whatever the
    draft: the first token's frequencies over many seeded draws, and the second's given
    that the first drafted token was accepted; a draft outside the filtered support is
    never accepted."""
    import torch

    from kvmesh.engine.sampler import _filter, verify_draft

    gen = torch.Generator().manual_seed(0)
    logits = torch.tensor([[2.0, 1.5, 1.0, 0.2, -1.0, 0.0], [0.1, 1.0, 0.5, 2.0, -2.0, 0.3],
                           [0.0] * 6])
    target = [_filter(row / params.temperature, params).softmax(-1) for row in logits]
    for draft in ([1, 3], [4, 0]):  # draft 4 is outside top-k 4
        first = torch.zeros(6)
        second = torch.zeros(6)
        n = 20000
        for _ in range(n):
            out = verify_draft(logits, draft, params, gen)
            first[out[0]] += 1
            if out[0] == draft[0]:
                second[out[1]] += 1
        assert (first / n - target[0]).abs().max() < 4 * (0.25 / n) ** 0.5  # 4 sigma
        if target[0][draft[0]] == 0:
            assert first[draft[0]] == 0
        else:
            m = float(second.sum())
            assert (second / m - target[1]).abs().max() < 4 * (0.25 / m) ** 0.5


class _Echo:
    """A drafter that always proposes as many tokens as it may (the ones at the start of
    the sequence): what is accepted is the test's to say."""

    def propose(self, wants):
        return [list(w.tokens[:w.max_tokens]) for w in wants]

    def forget(self, seq_ids):
        pass


def test_draft_length_adapts_to_what_is_accepted():
    from kvmesh.config import SchedulerConfig
    from kvmesh.engine.speculation import START_LENGTH, Speculator
    from tests.builders import make_request

    k = 8
    spec = Speculator(SchedulerConfig(num_speculative_tokens=k), 10_000, drafter=_Echo())
    req = make_request("r", 40, max_tokens=1000)
    req.num_computed_tokens = req.num_tokens - 1  # decoding: one token pending

    def step(accept: int | None = None) -> int:
        spec.draft([req])
        n = len(req.spec_token_ids)
        if n:
            spec.observe("r", n, n if accept is None else accept)
        return n

    assert step() == min(k, START_LENGTH)  # whole: the next may be twice as long
    assert step() == k and step() == k  # capped at k
    assert step(accept=2) == k  # cut short after 2 of k...
    assert step() == 3  # ...so the next holds 2 + 1, and grows again when it is whole
    assert step() == 6 and step() == k
    assert step(accept=0) == k  # wholly rejected: a back-off of 2 plain steps
    assert step() == 0 and step() == 0
    assert step() == 1  # then a one-token probe, doubling while it is accepted
    assert step() == 2 and step() == 4
    short = Speculator(SchedulerConfig(num_speculative_tokens=2), 10_000, drafter=_Echo())
    short.draft([req])
    assert len(req.spec_token_ids) == 2  # never past k, from the first draft on


def test_backing_off_sequences_still_draft_from_a_strong_match():
    """After a wholly rejected draft a sequence waits, but prompt lookup still drafts where
    its longest n-gram matches (the output repeating a passage); a shorter match does not.
    The index honours the minimum match it is asked for."""
    from kvmesh.config import SchedulerConfig
    from kvmesh.engine.drafter import NgramDrafter
    from kvmesh.engine.speculation import START_LENGTH, Speculator
    from tests.builders import make_request

    idx = NgramIndex(max_n=3)
    seq = [1, 2, 3, 4, 5, 9, 7, 3]
    assert idx.propose(seq, 2) == [4, 5] and idx.propose(seq, 2, min_n=2) == []
    spec = Speculator(SchedulerConfig(num_speculative_tokens=8), 10_000, NgramDrafter())
    req = make_request("r", 0, max_tokens=1000)
    req.token_ids[:] = [11, 12, 13, 14, 15, 16, 17, 13]

    def draft(*new: int) -> list[int]:
        req.token_ids.extend(new)
        req.num_computed_tokens = req.num_tokens - 1  # decoding: one token pending
        spec.draft([req])
        return req.spec_token_ids

    assert draft() == [14, 15, 16, 17][:START_LENGTH]  # a 1-token match, not backing off
    spec.observe("r", len(req.spec_token_ids), 0)  # wholly rejected: backing off
    assert draft(12) == []  # a 1-token match waits
    assert draft(13, 14) == [15, 16, 17, 13][:START_LENGTH]  # "12 13 14": drafts anyway
