"""The native fused decode layer against the torch layers it replaces."""

from __future__ import annotations

import os
import shutil

import pytest

from kvmesh import LLM, SamplingParams
from kvmesh.model import cpu_isa
from kvmesh.model.cpu_kernels import AMX_ENV
from kvmesh.model.cpu_kernels import load as load_kernels
from kvmesh.model.fused import BF16_FUSED_ROWS, FusedDecoder
from tests.builders import build_grid_model, build_tiny_model

pytestmark = pytest.mark.skipif(shutil.which("cc") is None, reason="no C compiler")


def _run(model_dir, monkeypatch, fused: bool, dtype: str = "float32", logprobs: int = 0,
         **kw):
    monkeypatch.setenv("KVMESH_FUSED_DECODE", "1" if fused else "0")
    llm = LLM(str(model_dir), device="cpu", dtype=dtype, block_size=8, num_blocks=256,
              max_num_batched_tokens=64, **kw)
    assert (llm.engine.loaded.model.fused is not None) == fused
    runs = _count_runs(monkeypatch)
    # Ragged lengths, block boundaries crossed, prefill chunks mixed with decodes (those
    # steps take the torch path) and pure decode steps (the fused one).
    prompts = [[(7 * i + j) % 400 + 3 for j in range(3 + 29 * i)] for i in range(6)]
    params = SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True,
                            logprobs=logprobs)
    outs = llm.generate(prompts, params)
    assert bool(runs) == fused  # the fused layers ran, in the steps they take
    return outs


def _count_runs(monkeypatch) -> list[int]:
    """Sequences of each fused step from now on."""
    runs: list[int] = []
    original = FusedDecoder.run

    def run(self, x, *args):
        runs.append(x.shape[0])
        return original(self, x, *args)

    monkeypatch.setattr(FusedDecoder, "run", run)
    return runs


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_fused_decode_matches_torch_layers(tmp_path, monkeypatch, arch):
    """float32 inputs to the int4 layers: the same products, so logprobs to float rounding."""
    model_dir = build_grid_model(tmp_path, arch)
    fused = _run(model_dir, monkeypatch, True, quant_activations="float32")
    plain = _run(model_dir, monkeypatch, False, quant_activations="float32")
    for a, b in zip(fused, plain, strict=True):
        assert a.token_ids == b.token_ids
        steps = zip(a.outputs[0].logprobs, b.outputs[0].logprobs, a.token_ids, strict=True)
        assert max(abs(x[t] - y[t]) for x, y, t in steps) < 1e-3


def _drift(outs, ref) -> tuple[int, float]:
    """Against float32 `ref`: how many leading tokens agree in all, and the mean |logprob|
    gap of the reference tokens over those positions."""
    agree, gaps = 0, []
    for o, r in zip(outs, ref, strict=True):
        for x, y, t, u in zip(o.outputs[0].logprobs, r.outputs[0].logprobs, o.token_ids,
                              r.token_ids, strict=True):
            gaps.append(abs(x.get(u, min(x.values())) - y[u]))
            if t != u:
                break
            agree += 1
    return agree, sum(gaps) / len(gaps)


@pytest.mark.skipif(not cpu_isa.has_fast_bf16_native(),
                    reason="bf16 models are quantized (and fused) only with native bf16")
@pytest.mark.parametrize("head_dim", [16, 64])  # 64: the bf16 dot-product score path
def test_fused_decode_bf16_is_no_worse_than_torch_bf16(tmp_path, monkeypatch, head_dim):
    """A bf16 model: the fused layers keep float32 inside and a bf16 KV cache; the torch
    layers of the same bf16 model (quantized linears, bf16 between ops) round after every
    op. Both drift from float32; the fused path no more."""
    shape = {"hidden_size": 128, "num_attention_heads": 2, "num_key_value_heads": 1,
             "head_dim": 64} if head_dim == 64 else {}
    model_dir = build_grid_model(tmp_path, **shape)
    ref = _run(model_dir, monkeypatch, False, quantization="none")
    logprobs = {"logprobs": 5}
    plain = _drift(_run(model_dir, monkeypatch, False, dtype="bfloat16", **logprobs), ref)
    fused = _drift(_run(model_dir, monkeypatch, True, dtype="bfloat16", **logprobs), ref)
    assert fused[0] >= plain[0] - 6  # leading tokens equal to float32's (of 180)
    assert fused[1] <= plain[1] + 0.05


@pytest.mark.skipif(not cpu_isa.has_fast_bf16_native(),
                    reason="bf16 models are quantized (and fused) only with native bf16")
def test_fused_decode_bf16_leaves_large_batches_to_dense_bf16(tmp_path, monkeypatch):
    """Up to 16 sequences (64 where the int4 kernel has AMX tiles) take the fused path;
    larger decode batches the torch layers with the dense bf16 copies."""
    monkeypatch.setenv("KVMESH_FUSED_DECODE", "1")
    lib = load_kernels()
    assert lib is not None
    amx = lib.quant_i4bf16_max_rows() == 64  # the tiles are on (16 rows without them)
    limit = 64 if amx else BF16_FUSED_ROWS
    wanted = (cpu_isa.has_amx() and bool(lib.quant_i4bf16_amx_built())
              and os.environ.get(AMX_ENV, "1") != "0")
    if wanted and not amx:
        pytest.skip("Linux refused the AMX tile state: the 64-row path cannot run here")
    assert amx == wanted
    llm = LLM(str(build_grid_model(tmp_path)), device="cpu", dtype="bfloat16", block_size=8,
              num_blocks=512, max_num_seqs=limit + 8, max_num_batched_tokens=512)
    runs = _count_runs(monkeypatch)
    prompts = [[(3 * i + j) % 300 + 3 for j in range(5)] for i in range(limit + 8)]
    outs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=6,
                                                ignore_eos=True))
    assert all(len(o.token_ids) == 6 for o in outs)
    assert not runs  # every decode step had more sequences than the fused limit
    llm.generate(prompts[:limit], SamplingParams(temperature=0.0, max_tokens=4,
                                                 ignore_eos=True))
    assert runs and max(runs) == limit


def test_fused_path_only_where_it_applies(tmp_path, tiny_qwen3, monkeypatch):
    monkeypatch.setenv("KVMESH_FUSED_DECODE", "1")
    plain = build_tiny_model(tmp_path / "plain", "llama")
    assert LLM(str(plain), device="cpu", dtype="float32", quantization="none", block_size=8,
               num_blocks=64).engine.loaded.model.fused is None  # float weights
    grid = build_grid_model(tmp_path / "grid", "llama")
    llm = LLM(str(grid), device="cpu", dtype="float32", quantization="int8", block_size=8,
              num_blocks=64)
    assert llm.engine.loaded.model.fused is not None
    qwen3 = LLM(str(tiny_qwen3), device="cpu", dtype="float32", quantization="int8", block_size=8,
                num_blocks=64)
    assert qwen3.engine.loaded.model.fused is None  # q/k norms: the torch path


def _recording(can_run, widths: list[int]):
    """`FusedDecoder.can_run` that also notes each step's decode count."""
    def wrapped(meta, num_tokens, kv_caches):
        widths.append(meta.num_decodes)
        return can_run(meta, num_tokens, kv_caches)
    return wrapped


def test_fused_decode_hands_batches_over_its_limit_to_torch(tmp_path, monkeypatch):
    """A decode step with more sequences than the fused kernel takes runs the torch layers
    (it used to reach the kernel and fail), with the same tokens as the unfused path."""
    model_dir = build_grid_model(tmp_path)
    limit = load_kernels().quant_linear_max_rows()  # 256 with AVX2 alone, else 64
    assert limit == (256 if cpu_isa.level() == "avx2" else 64)
    seqs = limit + 6
    outs = []
    for fused in (True, False):
        monkeypatch.setenv("KVMESH_FUSED_DECODE", "1" if fused else "0")
        # every prompt prefilled in one step, so the decode steps carry all `seqs`
        llm = LLM(str(model_dir), device="cpu", dtype="float32", block_size=8,
                  num_blocks=2 * seqs + 8, max_num_seqs=seqs, max_num_batched_tokens=5 * seqs)
        decoder = llm.engine.loaded.model.fused
        assert (decoder is not None) == fused
        widest: list[int] = []
        if decoder is not None:
            assert decoder.max_rows == limit
            monkeypatch.setattr(decoder, "can_run", _recording(decoder.can_run, widest))
        prompts = [[(3 * i + j) % 300 + 3 for j in range(5)] for i in range(seqs)]
        params = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
        outs.append([o.token_ids for o in llm.generate(prompts, params)])
        if decoder is not None:
            assert max(widest) == seqs  # a decode step over the limit was handed over
    assert outs[0] == outs[1] and all(len(t) == 4 for t in outs[0])
