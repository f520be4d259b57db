"""The int8 kernel on AMX tiles (kernels/quant_i8amx.c): a bf16 model's int8 layers (the
lm_head above all) for batches above the float32 kernel's rows, such as a verify step of
speculative decoding. Where the CPU has no AMX (or Linux refuses the tile state) it says
so and declines, and the layer keeps its dense bf16 copy."""

from __future__ import annotations

import os
import shutil

import pytest
import torch
import torch.nn.functional as F

from kvmesh.model import cpu_isa, cpu_kernels
from kvmesh.model.quant import QuantLinear, dequantize, quantize
from kvmesh.model.quant_dense import attach_dense

HAS_CC = shutil.which("cc") is not None
pytestmark = pytest.mark.skipif(not HAS_CC, reason="no C compiler")


def _amx_on(lib) -> bool:
    """Turn the tiles on as the process would (KVMESH_AMX aside) and say if they are."""
    return lib.quant_i4bf16_use_amx(1) == 1


def _restore(lib) -> None:
    lib.quant_i4bf16_use_amx(int(os.environ.get(cpu_kernels.AMX_ENV, "1") != "0"))


def _run(lib, layer: QuantLinear, x: torch.Tensor) -> tuple[int, torch.Tensor]:
    qw = layer.qw
    y = torch.full((x.shape[0], qw.n), float("nan"))
    rc = lib.quant_linear_i8amx(
        x.data_ptr(), x.shape[0], x.stride(0), qw.q.data_ptr(), qw.scale.data_ptr(),
        None if layer.bias is None else layer.bias.data_ptr(), qw.n, qw.k, qw.group,
        y.data_ptr(), y.stride(0))
    return rc, y


def test_int8_tile_kernel_matches_f_linear_on_bf16_inputs():
    """On the tiles: F.linear on the dequantized weight and bf16-rounded inputs, to float32
    summation order, for 1 to 32 rows (two row tiles), groups of 32 and 64, with and without
    bias; a row's result does not depend on the batch it came in; shapes it does not take
    are refused. Without AMX it declines (code 3) and says it takes no rows."""
    lib = cpu_kernels.load()
    assert lib is not None
    amx_here = cpu_isa.level() == "avx512_bf16" and cpu_isa.has_amx()
    try:
        on = _amx_on(lib)
        assert on or not lib.quant_i4bf16_amx_built() or not amx_here or \
            lib.quant_i4bf16_use_amx(1) < 0
        gen = torch.Generator().manual_seed(7)
        layer = QuantLinear(quantize(torch.randn(64, 256, generator=gen) * 0.1, 8), None)
        if not on:
            assert lib.quant_i8amx_max_rows() == 0
            assert _run(lib, layer, torch.randn(5, 256))[0] == 3
            if amx_here:
                pytest.skip("AMX tile path not run: the compiler does not target AMX, or "
                            "Linux refused the tile state")
            return
        assert lib.quant_i8amx_max_rows() == 32
        for n, k, group, bias in ((64, 256, 32, True), (48, 96, 32, False),
                                  (32, 576, 64, True), (16, 32, 32, False)):
            w = torch.randn(n, k, generator=gen) * 0.1
            b = torch.randn(n, generator=gen) if bias else None
            layer = QuantLinear(quantize(w, 8, group=group), b)
            ref_w = dequantize(layer.qw).double()
            x = torch.randn(32, k + 44, generator=gen)[:, :k]  # rows strided
            rc, full = _run(lib, layer, x)
            assert rc == 0
            for rows in (1, 2, 3, 5, 9, 16, 17, 25, 32):
                rc, y = _run(lib, layer, x[:rows])
                assert rc == 0
                ref = F.linear(x[:rows].bfloat16().double(), ref_w,
                               None if b is None else b.double())
                torch.testing.assert_close(y.double(), ref, atol=1e-4, rtol=1e-5)
                assert torch.equal(y, full[:rows]), (n, k, rows)
        for rows, k, group in ((33, 256, 32), (4, 256, 16), (4, 240, 48)):
            layer = QuantLinear(quantize(torch.randn(16, k, generator=gen), 8, group=group),
                                None)
            assert _run(lib, layer, torch.randn(rows, k))[0] == 1
    finally:
        _restore(lib)


def test_bf16_model_int8_head_takes_the_tiles_above_its_kernel_rows():
    """A bf16 model's int8 head: up to kernel_rows the float32 kernel, then (with AMX) the
    tiles up to 32 rows, float32 logits equal to the kernel's sums to summation order;
    past 32 rows, or with AMX turned off, its dense bf16 copy (bf16 logits)."""
    lib = cpu_kernels.load()
    assert lib is not None
    gen = torch.Generator().manual_seed(5)

    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lm_head = torch.nn.Linear(64, 96, bias=False)

    model = Tiny()
    from kvmesh.model.quant import quantize_model

    quantize_model(model, "int8")
    head = model.lm_head
    assert isinstance(head, QuantLinear)
    try:
        on = _amx_on(lib)
        attach_dense(model, lambda w, b: (lambda x: F.linear(x, w, b)))
        assert head.amx_rows == (32 if on else 0)
        x = torch.randn(40, 64, generator=gen).bfloat16()
        rows = head.kernel_rows + 1
        out = head(x[:rows])
        ref = head._kernel(x[:rows].float())
        if on:
            assert out.dtype == torch.float32
            torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-5)
            assert head(x[:32]).dtype == torch.float32
            lib.quant_i4bf16_use_amx(0)  # turned off since: the dense copy takes it
            assert head(x[:rows]).dtype == torch.bfloat16
        else:
            assert out.dtype == torch.bfloat16
        assert head(x[:33]).dtype == torch.bfloat16  # past the tiles' rows
    finally:
        _restore(lib)
