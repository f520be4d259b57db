"""CUDA paths: run where a GPU is present (skipped otherwise, see conftest)."""

from __future__ import annotations

import random

import pytest
import torch

from kvmesh import LLM, SamplingParams
from tests.builders import build_grid_model

pytestmark = pytest.mark.gpu
G = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)


def _prompts() -> list[list[int]]:
    rng = random.Random(0)
    return [[rng.randrange(3, 512) for _ in range(rng.randrange(10, 120))] for _ in range(6)]


def test_cuda_engine_matches_cpu(tiny_llama):
    cpu = LLM(str(tiny_llama), device="cpu", dtype="float32", block_size=8, num_blocks=256)
    gpu = LLM(str(tiny_llama), dtype="float32", device="cuda", block_size=8, num_blocks=256)
    assert [o.token_ids for o in gpu.generate(_prompts(), G)] == [
        o.token_ids for o in cpu.generate(_prompts(), G)]


def test_cuda_host_tier_is_pinned_and_hits_are_identical(tiny_llama, tmp_path):
    llm = LLM(str(tiny_llama), dtype="float32", device="cuda", block_size=4, num_blocks=40,
              host_bytes=400 * 2048, disk_path=str(tmp_path))
    assert llm.engine.store.host.is_pinned
    first = [o.token_ids for o in llm.generate(_prompts(), G)]
    again = llm.generate(_prompts(), G)
    assert [o.token_ids for o in again] == first
    assert llm.engine.store.host.stats.hit_blocks > 0
    torch.cuda.synchronize()
    llm.close()


def test_cuda_defaults_take_the_cuda_path(tmp_path):
    """Every default on a CUDA machine: bf16 compute and KV, torch attention, and no CPU
    quantization (int4/int8 are CPU kernels) even for weights on an int4 grid, which the
    CPU would take as int4; it generates."""
    llm = LLM(str(build_grid_model(tmp_path)), block_size=8, num_blocks=64)
    loaded = llm.engine.loaded
    assert loaded.device.type == "cuda"
    assert loaded.dtype == torch.bfloat16 and loaded.kv_dtype == torch.bfloat16
    assert loaded.quantization == "none"
    assert llm.engine.runner.decode_kernel is None and llm.engine.runner.prefill_kernel is None
    out = llm.generate(_prompts()[:2], G)
    assert [len(o.token_ids) for o in out] == [12, 12]
