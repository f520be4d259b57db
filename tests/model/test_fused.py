"""The native fused decode layer against the torch layers it replaces."""

from __future__ import annotations

import shutil

import pytest

from kvmesh import LLM, SamplingParams
from tests.builders import build_grid_model, build_tiny_model

pytestmark = pytest.mark.skipif(shutil.which("cc") is None, reason="no C compiler")


def _run(model_dir, monkeypatch, fused: bool, **kw):
    monkeypatch.setenv("KVMESH_FUSED_DECODE", "1" if fused else "0")
    llm = LLM(str(model_dir), dtype="float32", block_size=8, num_blocks=256,
              max_num_batched_tokens=64, **kw)
    assert (llm.engine.loaded.model.fused is not None) == fused
    # Ragged lengths, block boundaries crossed, prefill chunks mixed with decodes (those
    # steps take the torch path) and pure decode steps (the fused one).
    prompts = [[(7 * i + j) % 400 + 3 for j in range(3 + 29 * i)] for i in range(6)]
    params = SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True, logprobs=0)
    return llm.generate(prompts, params)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_fused_decode_matches_torch_layers(tmp_path, monkeypatch, arch):
    model_dir = build_grid_model(tmp_path, arch)
    fused = _run(model_dir, monkeypatch, True)
    plain = _run(model_dir, monkeypatch, False)
    for a, b in zip(fused, plain, strict=True):
        assert a.token_ids == b.token_ids
        steps = zip(a.outputs[0].logprobs, b.outputs[0].logprobs, a.token_ids, strict=True)
        assert max(abs(x[t] - y[t]) for x, y, t in steps) < 1e-3


def test_fused_path_only_where_it_applies(tmp_path, tiny_qwen3, monkeypatch):
    monkeypatch.setenv("KVMESH_FUSED_DECODE", "1")
    plain = build_tiny_model(tmp_path / "plain", "llama")
    assert LLM(str(plain), dtype="float32", quantization="none", block_size=8,
               num_blocks=64).engine.loaded.model.fused is None  # float weights
    grid = build_grid_model(tmp_path / "grid", "llama")
    llm = LLM(str(grid), dtype="float32", quantization="int8", block_size=8, num_blocks=64)
    assert llm.engine.loaded.model.fused is not None
    qwen3 = LLM(str(tiny_qwen3), dtype="float32", quantization="int8", block_size=8,
                num_blocks=64)
    assert qwen3.engine.loaded.model.fused is None  # q/k norms: the torch path
