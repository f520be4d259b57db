"""int4 layers with int8 inputs (kernels/quant_a8.c): the math it promises, batch
invariance, the `quant_activations` setting, and the paged decode split it runs beside."""

from __future__ import annotations

import shutil

import pytest
import torch
import torch.nn.functional as F

from kvmesh import LLM, SamplingParams
from kvmesh.model import cpu_isa, cpu_kernels
from kvmesh.model.quant import QuantLinear, quantize, round_activations
from tests.builders import build_grid_model

HAS_CC = shutil.which("cc") is not None
A8 = HAS_CC and cpu_isa.level() != "generic"  # the kernel needs AVX2
needs_a8 = pytest.mark.skipif(not A8, reason="the int8-input kernel needs AVX2 and a C "
                                             f"compiler (ISA level {cpu_isa.level()})")
needs_cc = pytest.mark.skipif(not HAS_CC, reason="no C compiler")


def _layer(n: int, k: int, seed: int, bias: bool = False) -> QuantLinear:
    gen = torch.Generator().manual_seed(seed)
    b = torch.randn(n, generator=gen) if bias else None
    layer = QuantLinear(quantize(torch.randn(n, k, generator=gen) * 0.05, 4), b)
    layer.round_inputs_to_int8()
    return layer


@needs_a8
@pytest.mark.parametrize(("n", "k", "bias"), [(48, 64, False), (96, 160, True),
                                              (64, 1536, False)])
@pytest.mark.parametrize("rows", [1, 3, 4, 5, 64, 300])
def test_kernel_is_rounded_inputs_times_the_weight(n, k, bias, rows):
    """y = round_activations(x) W^T (+ b), W the dequantized weight (float16 scales): to
    float rounding, for any batch, past one pass of rows (256) included."""
    layer = _layer(n, k, seed=n + k + rows, bias=bias)
    assert layer.a8
    x = torch.randn(rows, k, generator=torch.Generator().manual_seed(rows)) * 3
    x[0, :32] = 0.0  # an all-zero group: d = 0, no division by zero
    y = layer(x)
    ref = F.linear(round_activations(x).double(), layer.weight().double(),
                   None if layer.bias is None else layer.bias.double())
    assert (y.double() - ref).abs().max() <= 1e-5 * ref.abs().max()
    plain = F.linear(x, layer.weight(), layer.bias)  # the rounding is small, not nothing
    gap = ((y - plain).abs().max() / plain.abs().max()).item()
    assert 1e-6 < gap < 3e-2


@needs_a8
def test_a_row_gets_the_same_result_in_any_batch():
    """Bitwise: what makes a cached prefix and a recompute agree on this path."""
    layer = _layer(96, 576, seed=1)
    x = torch.randn(37, 576, generator=torch.Generator().manual_seed(2))
    batch = layer(x)
    for i in (0, 5, 36):
        assert torch.equal(layer(x[i:i + 1]), batch[i:i + 1])
    assert torch.equal(layer(x[4:9]), batch[4:9])


@needs_a8
def test_non_finite_inputs_give_non_finite_rows_only():
    layer = _layer(32, 64, seed=3)
    x = torch.randn(4, 64)
    x[1, 7] = float("inf")
    x[2, 40] = float("nan")
    y = layer(x)
    assert not torch.isfinite(y[1]).any() and y[2].isnan().all()
    assert torch.isfinite(y[0]).all() and torch.isfinite(y[3]).all()


@needs_a8
def test_only_int4_layers_in_groups_of_32_take_int8_inputs():
    layer = QuantLinear(quantize(torch.randn(32, 64), 8), None)
    with pytest.raises(ValueError, match="int4 layers"):
        layer.round_inputs_to_int8()


@needs_a8
def test_quant_activations_setting(tmp_path):
    """float32 (the default) keeps the exact products; int8 rounds the int4 layers' inputs;
    the two are different KV (different block keys)."""
    model_dir = build_grid_model(tmp_path)
    kw = {"device": "cpu", "dtype": "float32", "block_size": 8, "num_blocks": 64}
    plain = LLM(str(model_dir), quantization="none", quant_activations="int8", **kw)
    assert plain.engine.loaded.quantization == "none"  # no int4 layers: nothing to round
    auto = LLM(str(model_dir), quant_activations="int8", **kw)
    exact = LLM(str(model_dir), **kw)
    assert auto.engine.loaded.quantization.startswith("int4a8x")
    assert exact.engine.loaded.quantization.startswith("int4x")
    assert auto.engine.loaded.model_id != exact.engine.loaded.model_id
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    prompt = [[(3 * j) % 300 + 3 for j in range(20)]]
    assert len(auto.generate(prompt, params)[0].token_ids) == 8


def test_quant_activations_rejects_unknown_values(tmp_path):
    with pytest.raises(ValueError, match="quant_activations must be one of"):
        LLM(str(tmp_path), quant_activations="int4")


@needs_a8
def test_scales_that_float16_cannot_hold_keep_float_inputs():
    """A layer whose scales float16 would round badly (subnormal) keeps float32 inputs."""
    layer = QuantLinear(quantize(torch.randn(32, 64) * 1e-7, 4), None)
    assert not layer.round_inputs_to_int8() and not layer.a8


@needs_a8
def test_int8_inputs_where_the_kernel_cannot_run_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("KVMESH_CPU_ISA", "generic")
    lib = cpu_kernels.load()
    assert lib is not None and not lib.quant_a8_available()
    model_dir = build_grid_model(tmp_path)
    kw = {"device": "cpu", "dtype": "float32", "block_size": 8, "num_blocks": 64}
    with pytest.raises(ValueError, match="needs the native CPU kernels with AVX2"):
        LLM(str(model_dir), quant_activations="int8", **kw)


@needs_cc
def test_paged_decode_gives_a_sequence_the_same_output_in_any_batch():
    """The decode kernel splits a sequence into chunks of blocks by its length alone, so a
    long sequence decoded alone equals its row in a batch, bitwise."""
    lib = cpu_kernels.load()
    assert lib is not None
    gen = torch.Generator().manual_seed(7)
    heads, kv_heads, dim, bs = 9, 3, 64, 16
    lengths = [300, 5, 77, 1000]
    width = max(-(-n // bs) for n in lengths)
    kv = torch.randn(len(lengths) * width + 2, 2, bs, kv_heads, dim, generator=gen)
    k, v = kv[:, 0], kv[:, 1]
    tables = torch.randperm(kv.shape[0], generator=gen)[: len(lengths) * width]
    tables = tables.view(len(lengths), width).contiguous()
    q = torch.randn(len(lengths), heads, dim, generator=gen)

    def run(rows: list[int]) -> torch.Tensor:
        out = torch.empty(len(rows), heads, dim)
        qs, ts = q[rows].contiguous(), tables[rows].contiguous()
        lens = torch.tensor([lengths[r] for r in rows])
        rc = lib.paged_decode_f32(qs.data_ptr(), heads * dim, k.data_ptr(), v.data_ptr(),
                                  k.stride(0), ts.data_ptr(), width, lens.data_ptr(),
                                  out.data_ptr(), len(rows), heads, kv_heads, dim, bs,
                                  dim**-0.5)
        assert rc == 0
        return out

    batch = run([0, 1, 2, 3])
    for i in range(len(lengths)):
        assert torch.equal(run([i]), batch[i:i + 1])
