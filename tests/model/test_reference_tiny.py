"""Our Llama-family implementation matches transformers token for token (tiny random models)."""

from __future__ import annotations

import random
import shutil

import pytest

from kvmesh import LLM, SamplingParams
from tests.builders import build_tiny_model
from tests.reference import hf_greedy, load_hf


def _prompts(n: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, 512) for _ in range(rng.randrange(3, 150))] for _ in range(n)]


@pytest.mark.parametrize("backend", ["native", "sdpa"])
@pytest.mark.parametrize("family", ["llama", "qwen3", "qwen2"])
def test_tiny_model_matches_transformers(family, backend, tmp_path):
    if backend == "native" and shutil.which("cc") is None:
        pytest.skip("no C compiler")
    model_dir = build_tiny_model(tmp_path, family)
    prompts = _prompts(6, seed=len(family))
    expected = hf_greedy(load_hf(model_dir), prompts, max_new_tokens=24, eos=None)
    # native is a CPU kernel; sdpa runs on whatever device auto picks (CUDA where present)
    device = "cpu" if backend == "native" else "auto"
    llm = LLM(str(model_dir), device=device, dtype="float32", block_size=8, num_blocks=256,
              attention_backend=backend)
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    batched = [o.token_ids for o in llm.generate(prompts, params)]
    single = [llm.generate([p], params)[0].token_ids for p in prompts]
    assert batched == expected
    assert single == expected
