"""The engine with tiny random models: cache, preemption, sampling options, errors, abort."""

from __future__ import annotations

import json
import random

import pytest
import torch

from kvmesh import LLM, SamplingParams
from kvmesh.model.arch import UnsupportedModelError

GREEDY = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)


@pytest.fixture(scope="module")
def llm(tiny_llama):
    return LLM(str(tiny_llama), dtype="float32", block_size=4, num_blocks=512)


def prompts(n: int, seed: int = 0, low: int = 5, high: int = 60) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, 512) for _ in range(rng.randrange(low, high))] for _ in range(n)]


def test_tiny_block_budget_gives_identical_outputs(tiny_llama, llm):
    ps = prompts(8, seed=1)
    ample = [o.token_ids for o in llm.generate(ps, GREEDY)]
    tight = LLM(str(tiny_llama), dtype="float32", block_size=4, num_blocks=24,
                max_num_batched_tokens=32)
    outs = tight.generate(ps, GREEDY)
    assert [o.token_ids for o in outs] == ample
    assert tight.engine.scheduler.num_preemptions > 0
    assert tight.engine.pool.num_free_blocks == 24
    tight.engine.scheduler.check_integrity()


def test_prefix_cache_reports_cached_tokens(llm):
    shared = prompts(1, seed=2, low=40, high=41)[0]
    a, b = shared + [7, 8, 9], shared + [10, 11]
    first = llm.generate([a], GREEDY)[0]
    second = llm.generate([b], GREEDY)[0]
    assert first.num_cached_tokens == 0
    assert second.num_cached_tokens == 40
    llm.engine.kv.reset_prefix_cache()
    cold = llm.generate([b], GREEDY)[0]
    assert cold.num_cached_tokens == 0 and cold.token_ids == second.token_ids


def test_n_shares_prompt_blocks_and_seeds_reproduce(llm):
    p = prompts(1, seed=3, low=30, high=31)[0]
    params = SamplingParams(n=3, temperature=1.0, seed=42, max_tokens=12, ignore_eos=True)
    out = llm.generate([p], params)[0]
    again = llm.generate([p], params)[0]
    assert len(out.outputs) == 3 and all(len(o.token_ids) == 12 for o in out.outputs)
    assert [o.token_ids for o in out.outputs] == [o.token_ids for o in again.outputs]
    assert len({tuple(o.token_ids) for o in out.outputs}) > 1  # seed + index differ
    assert again.num_cached_tokens == 28  # 7 full blocks of the 30-token prompt


def test_sampling_options(llm):
    p = prompts(1, seed=4)[0]
    greedy = llm.generate([p], GREEDY)[0].token_ids
    topk1 = llm.generate(
        [p], SamplingParams(temperature=0.8, top_k=1, max_tokens=16, ignore_eos=True, seed=1)
    )[0].token_ids
    assert topk1 == greedy
    penal = llm.generate(
        [p],
        SamplingParams(
            temperature=0.0,
            max_tokens=16,
            ignore_eos=True,
            repetition_penalty=2.0,
            frequency_penalty=1.5,
        ),
    )[0]
    assert len(set(penal.token_ids)) >= len(set(greedy))
    assert penal.token_ids != greedy or len(set(greedy)) == 16
    lp = llm.generate(
        [p], SamplingParams(temperature=0.0, max_tokens=4, logprobs=3, ignore_eos=True)
    )[0].outputs[0]
    assert lp.logprobs is not None and len(lp.logprobs) == 4
    for tok, entry in zip(lp.token_ids, lp.logprobs, strict=True):
        assert tok in entry and len(entry) >= 3
        assert entry[tok] == pytest.approx(max(entry.values()))
        assert all(v <= 0 for v in entry.values())


def test_stop_token_ids_and_stop_strings(llm):
    p = prompts(1, seed=5)[0]
    full = llm.generate([p], GREEDY)[0]
    stop_tok = full.token_ids[5]
    out = llm.generate(
        [p],
        SamplingParams(temperature=0.0, max_tokens=16, stop_token_ids=[stop_tok], ignore_eos=True),
    )[0]
    assert out.finish_reason == "stop" and out.token_ids[-1] == stop_tok
    assert out.outputs[0].stop_reason == stop_tok
    text = full.text
    needle = text[len(text) // 2 : len(text) // 2 + 2]
    if needle.strip():
        cut = llm.generate(
            [p], SamplingParams(temperature=0.0, max_tokens=16, stop=[needle], ignore_eos=True)
        )[0]
        assert cut.finish_reason == "stop" and needle not in cut.text
        assert text.startswith(cut.text)


def test_chat_applies_template(llm):
    out = llm.chat([{"role": "user", "content": "hello"}], GREEDY)[0]
    tok = llm.get_tokenizer()
    rendered = tok.decode(out.prompt_token_ids, skip_special_tokens=False)
    assert rendered.startswith("<s>user\nhello</s>") and rendered.endswith("<s>assistant\n")


def test_bad_inputs_raise_clear_errors_and_engine_goes_on(llm, tmp_path):
    eng = llm.engine
    eng.add_request("ok", prompts(1, seed=6)[0], GREEDY)
    with pytest.raises(ValueError, match="max_model_len"):
        eng.add_request("long", [5] * (eng.max_model_len + 1), GREEDY)
    with pytest.raises(ValueError, match="vocabulary"):
        eng.add_request("oov", [10**6], GREEDY)
    with pytest.raises(ValueError, match="empty"):
        eng.add_request("empty", [], GREEDY)
    with pytest.raises(ValueError, match="temperature"):
        SamplingParams(temperature=-1)
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0)
    with pytest.raises(ValueError, match="max_tokens"):
        SamplingParams(max_tokens=0)
    with pytest.raises(ValueError, match="already in use"):
        eng.add_request("ok", [5, 6], GREEDY)
    done = []
    while eng.has_unfinished_requests():
        done += [d for d in eng.step() if d.finished]
    assert [d.request_id for d in done] == ["ok"] and done[0].finish_reason == "length"


def test_abort_mid_generation_frees_blocks(llm):
    eng = llm.engine
    free = eng.pool.num_free_blocks
    eng.add_request("x", prompts(1, seed=7, low=30, high=31)[0], GREEDY)
    eng.step()
    eng.step()
    assert eng.pool.num_free_blocks < free
    deltas = eng.abort_request("x")
    assert [d.finish_reason for d in deltas] == ["abort"]
    assert not eng.has_unfinished_requests() and eng.pool.num_free_blocks == free


def test_unknown_model_and_unsupported_architecture(tmp_path):
    with pytest.raises(FileNotFoundError, match="no-such-model"):
        LLM("no-such-model")
    cfg = {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedModelError, match="GPT2LMHeadModel"):
        LLM(str(tmp_path))
    with pytest.raises(TypeError, match="bogus"):
        LLM(str(tmp_path), bogus=1)


def test_bfloat16_packed_linears_change_no_token(tiny_llama, monkeypatch):
    import kvmesh.model.loader as loader
    from kvmesh.model.cpu_isa import has_fast_bf16_native
    from kvmesh.model.packed import PackedLinear, can_pack

    # The path this CPU should take: packed where bf16 is native, plain elsewhere.
    expected = 9 if has_fast_bf16_native() else 0
    assert can_pack(torch.bfloat16, torch.device("cpu")) == bool(expected)
    ps = prompts(4, seed=11, low=30, high=60)
    packed = LLM(str(tiny_llama), device="cpu", dtype="bfloat16", block_size=4, num_blocks=512)
    modules = packed.engine.loaded.model.modules()
    assert sum(isinstance(m, PackedLinear) for m in modules) == expected
    monkeypatch.setattr(loader, "can_pack", lambda *a: False)
    plain = LLM(str(tiny_llama), device="cpu", dtype="bfloat16", block_size=4, num_blocks=512)
    assert not any(isinstance(m, PackedLinear) for m in plain.engine.loaded.model.modules())
    assert [o.token_ids for o in packed.generate(ps, GREEDY)] == [
        o.token_ids for o in plain.generate(ps, GREEDY)]


def test_max_model_len_is_capped_by_the_kv_cache(tiny_llama):
    """A sequence longer than the whole cache could never run (it would preempt itself
    forever): such prompts are refused up front, and the largest one that fits runs."""
    small = LLM(str(tiny_llama), dtype="float32", block_size=4, num_blocks=10)
    eng = small.engine
    assert eng.max_model_len == 40  # 10 blocks of 4 tokens, under the model's 512
    with pytest.raises(ValueError, match="max_model_len"):
        eng.add_request("big", [5] * 38, SamplingParams(max_tokens=3))
    out = small.generate([[5] * 36], SamplingParams(temperature=0.0, max_tokens=4,
                                                    ignore_eos=True))
    assert len(out[0].outputs[0].token_ids) == 4


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_the_cpu_kv_pool_is_zeroed_aligned_and_costs_no_memory_until_used(dtype):
    """The pool comes from calloc: zero, page-aligned, and not resident until written."""
    from kvmesh.engine.model_runner import PAGE, lazy_zeros

    def resident_bytes() -> int:  # now, not the high-water mark
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * PAGE

    shape = (1024, 4, 2, 16, 8, 64)  # 1 GiB in float32
    before = resident_bytes()
    kv = lazy_zeros(shape, dtype, torch.device("cpu"))
    assert kv.shape == shape and kv.dtype == dtype and kv.is_contiguous()
    assert kv.data_ptr() % PAGE == 0
    assert resident_bytes() - before < kv.numel() * kv.element_size() // 16
    assert not kv[[0, 511, 1023]].any()
    kv[7] = 1.5
    assert float(kv[7].float().mean()) == 1.5 and not kv[6].any() and not kv[8].any()


def test_a_cpu_pool_over_the_available_memory_is_warned_about(caplog):
    from kvmesh.engine.setup import _warn_if_over_memory, available_memory_bytes

    available = available_memory_bytes()
    assert available is not None and available > 0
    with caplog.at_level("WARNING", logger="kvmesh.engine.setup"):
        _warn_if_over_memory(available // 4)
        assert not caplog.records
        _warn_if_over_memory(available * 4)
    assert "exceeds the memory available" in caplog.text
