"""The real default model matches transformers (loaded from the same GGUF) token for token."""

from __future__ import annotations

import shutil

import pytest
import torch

from kvmesh import LLM, SamplingParams
from kvmesh.model import cpu_isa, cpu_kernels
from tests.reference import hf_greedy, load_hf
from tests.texts import varied_prompts

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def llm():
    """The exact path: float32 (the GGUF's int4 grid, float32 inputs)."""
    return LLM(dtype="float32")


@pytest.fixture(scope="module")
def prompts(llm) -> list[list[int]]:
    tok = llm.get_tokenizer()
    ids = [tok.encode(p) for p in varied_prompts()]
    lengths = sorted(len(p) for p in ids)
    assert len(ids) >= 20 and lengths[0] >= 10 and 1500 <= lengths[-1] <= 2000, lengths
    return ids


def test_default_model_matches_transformers(llm, prompts, default_gguf):
    # The default attention path: on the CPU, the native kernel wherever a C compiler
    # exists; on CUDA (where auto picks it), torch's SDPA.
    native = llm.engine.runner.decode_kernel is not None
    on_cpu = llm.engine.loaded.device.type == "cpu"
    assert native == (on_cpu and cpu_kernels.load() is not None)
    assert llm.engine.warmup_s > 0  # the startup warm-up ran, and changes no token below
    hf = load_hf(default_gguf.parent, gguf_file=default_gguf.name)
    expected = hf_greedy(hf, prompts, max_new_tokens=64, eos=2)
    params = SamplingParams(temperature=0.0, max_tokens=64)
    batched = llm.generate(prompts, params)
    assert [o.token_ids for o in batched] == expected
    llm.engine.kv.reset_prefix_cache()
    single = [llm.generate([p], params)[0] for p in prompts]
    assert [o.token_ids for o in single] == expected
    assert all(o.num_cached_tokens == 0 for o in single)


@pytest.mark.parametrize("int8_inputs", [False, True], ids=["exact", "int8-inputs"])
def test_prefix_cache_hit_is_identical(llm, prompts, int8_inputs):
    """On the exact path, and with int8 inputs to the int4 layers (AVX2 and up), whose
    kernel gives a token the same result in any batch."""
    if int8_inputs and (shutil.which("cc") is None or cpu_isa.level() == "generic"):
        pytest.skip(f"int8 inputs need AVX2 and a C compiler (ISA level {cpu_isa.level()})")
    if int8_inputs:
        llm = LLM(device="cpu", dtype="float32", quant_activations="int8")
    tok = llm.get_tokenizer()
    shared = [t for p in prompts for t in p][:1000]
    assert len(shared) == 1000
    first = shared + tok.encode(" Question one: what is this text about?")
    second = shared + tok.encode(" Summarise the above in one sentence.")
    params = SamplingParams(temperature=0.0, max_tokens=32)
    llm.engine.kv.reset_prefix_cache()
    cold = llm.generate([second], params)[0]
    llm.engine.kv.reset_prefix_cache()
    llm.generate([first], params)
    warm = llm.generate([second], params)[0]
    assert cold.num_cached_tokens == 0
    assert warm.num_cached_tokens >= 900
    assert warm.token_ids == cold.token_ids


def test_chat_template_and_eos(llm):
    out = llm.chat(
        [{"role": "user", "content": "What is the capital of France?"}],
        SamplingParams(temperature=0.0, max_tokens=64),
    )[0]
    assert "Paris" in out.text
    assert out.finish_reason == "stop"
    tok = llm.get_tokenizer()
    assert tok.decode(out.prompt_token_ids[:3], skip_special_tokens=False).startswith(
        "<|im_start|>system"
    )


@pytest.mark.skipif(not cpu_isa.has_fast_bf16(), reason="bf16 is the default only with "
                    "native bf16 dot products (AVX-512 BF16 or AMX)")
@pytest.mark.parametrize("quantization", ["auto", "none"])
def test_bf16_default_logits_are_not_rounded_to_bf16(default_gguf, quantization):
    """The default on a CPU with native bf16 (bf16 + int4): the first token's logprobs for
    a chat prompt (with the template's system prompt) stay within 0.15 of transformers'
    float32, and its two near-equal leaders stay apart (float32 gap 0.08). Rounded to bf16,
    logits of 16-32 are 0.125 apart: those two tied and greedy took the wrong one. Alone,
    the quantized head's kernel gives float32 logits; in a batch of 12 (above its kernel's
    rows: the dense bf16 copy) the leaders are recomputed in float32 (model/logits.py), so
    every copy gets the lone request's token and the same gap between the leaders (rounded
    to bf16, the copies answered 'L', not 'The'). Unquantized (`none`), the head is a bf16
    matmul (oneDNN-packed) at any batch: its leaders are recomputed alone too."""
    llm = LLM(quantization=quantization)
    assert llm.engine.loaded.dtype == torch.bfloat16
    tok = llm.get_tokenizer()
    prompt = tok.encode(tok.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}]))
    params = SamplingParams(temperature=0.0, max_tokens=1, logprobs=5)
    alone = llm.generate([prompt], params)[0].outputs[0]
    batch = [o.outputs[0] for o in llm.generate([prompt] * 12, params)]
    hf = load_hf(default_gguf.parent, gguf_file=default_gguf.name)
    with torch.no_grad():
        ref = hf(torch.tensor([prompt])).logits[0, -1].float().log_softmax(-1)
    top2 = ref.topk(2).indices.tolist()
    single = _logprobs(alone)
    for t in top2:
        assert t in single and abs(single[t] - float(ref[t])) < 0.15, (t, single, float(ref[t]))
    assert single[top2[0]] != single[top2[1]]
    gap = single[top2[0]] - single[top2[1]]
    for out in batch:  # the leaders' logits in float32: their gap is the lone request's;
        got = _logprobs(out)  # the normaliser sums bf16 values further down (< 0.02)
        assert out.token_ids == alone.token_ids
        assert all(t in got and abs(got[t] - single[t]) < 0.02 for t in top2), (got, single)
        assert abs((got[top2[0]] - got[top2[1]]) - gap) < 1e-4, (got, single)


def _logprobs(out) -> dict[int, float]:
    return {int(k): float(getattr(v, "logprob", v)) for k, v in out.logprobs[0].items()}
