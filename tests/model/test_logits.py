"""Float32 logits near the top where a head computes in bf16 (model/logits.py)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from kvmesh.model.logits import MARGIN, exact_near_top
from kvmesh.model.packed import PackedLinear, can_pack, pack_linears
from kvmesh.model.quant import QuantLinear, dequantize, dequantize_rows, quantize


def test_dequantize_rows_are_the_rows_of_the_whole_weight():
    gen = torch.Generator().manual_seed(0)
    idx = torch.tensor([0, 5, 17, 95, 17, 48])
    for bits in (8, 4):
        qw = quantize(torch.randn(96, 64, generator=gen), bits)
        got, want = dequantize_rows(qw, idx), dequantize(qw)[idx]
        assert got.shape == (len(idx), 64)
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


def _tied_head(vocab: int = 512, k: int = 64) -> tuple[nn.Linear, torch.Tensor, int, int]:
    """A bf16 head and an input whose two leading logits (about 20.00 and 20.06, the larger
    at the higher index) round to the same bf16 value, 20.0 (the grid there is 0.125)."""
    gen = torch.Generator().manual_seed(1)
    head = nn.Linear(k, vocab, bias=False).to(torch.bfloat16)
    x = torch.zeros(1, k, dtype=torch.bfloat16)
    x[0, :2] = 1.0
    with torch.no_grad():
        head.weight.copy_((torch.randn(vocab, k, generator=gen) * 0.5).to(torch.bfloat16))
        head.weight[:, :2] = 0.0
        lo, hi = 100, 300
        head.weight[lo, :2] = torch.tensor([12.0, 8.0])  # 20.0
        head.weight[hi, :2] = torch.tensor([12.0, 8.0625])  # 20.0625, exact in bf16
    return head, x, lo, hi


def test_ties_from_bf16_rounding_are_broken_by_float32():
    head, x, lo, hi = _tied_head()
    with torch.no_grad():
        rounded = head(x)
        exact = x.float() @ head.weight.float().t()
        out = exact_near_top(head, x, rounded)
    assert rounded[0, lo] == rounded[0, hi]  # the tie this module is for
    assert int(rounded.float().argmax()) == lo  # greedy on bf16: the wrong (first) one
    assert int(out.argmax()) == hi == int(exact.argmax())
    assert out[0, hi] == exact[0, hi] and out[0, lo] == exact[0, lo]
    assert out.dtype == torch.float32


def test_only_logits_near_the_top_change():
    gen = torch.Generator().manual_seed(2)
    head = nn.Linear(64, 1024, bias=True).to(torch.bfloat16)
    x = torch.randn(5, 64, generator=gen).to(torch.bfloat16)
    with torch.no_grad():
        rounded = head(x).float()
        exact = x.float() @ head.weight.float().t() + head.bias.float()
        out = exact_near_top(head, x, head(x))
    top = rounded.amax(-1, keepdim=True)
    near = rounded >= top - MARGIN * (top.abs() + 1)
    assert near.sum(-1).min() >= 1
    torch.testing.assert_close(out[near], exact[near], rtol=0, atol=1e-5)
    assert torch.equal(out[~near], rounded[~near])
    assert torch.equal(out.argmax(-1), exact.argmax(-1))


def test_quantized_head_above_its_kernel_rows_gets_its_own_weights_float32():
    """A quantized head's batches above its kernel's rows run on its dense bf16 copy; the
    leaders come back as float32 dot products with the dequantized weights, the kernel's."""
    gen = torch.Generator().manual_seed(3)
    qw = quantize(torch.randn(256, 64, generator=gen) * 0.2, 8)
    head = QuantLinear(qw, None)
    head.dense = nn.Linear(64, 256, bias=False).to(torch.bfloat16)
    with torch.no_grad():
        head.dense.weight.copy_(dequantize(qw).to(torch.bfloat16))
    head.kernel_rows = 2
    x = torch.randn(6, 64, generator=gen).to(torch.bfloat16)
    with torch.no_grad():
        rounded = head.forward(x)
        out = exact_near_top(head, x, rounded)
    assert rounded.dtype == torch.bfloat16  # 6 rows > kernel_rows: the dense copy
    exact = x.float() @ dequantize(qw).t()
    assert torch.equal(out.argmax(-1), exact.argmax(-1))
    rows = torch.arange(6)
    torch.testing.assert_close(out[rows, exact.argmax(-1)], exact.max(-1).values,
                               rtol=0, atol=1e-5)


def _torch_leaders(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    out = logits.float()
    top = out.amax(dim=-1, keepdim=True)
    r, t = torch.nonzero(out >= top - MARGIN * (top.abs() + 1), as_tuple=True)
    return out, r, t


def test_native_search_finds_the_same_leaders_as_torch(monkeypatch):
    """kernels/near_top.c (where the kernels build) against the torch ops it replaces,
    rows of uneven length included; with more leaders than its buffer it hands over to
    the torch ops."""
    from kvmesh.model import cpu_kernels, logits

    gen = torch.Generator().manual_seed(4)
    for shape in ((64, 49152), (3, 1000), (1, 7)):
        x = (torch.randn(*shape, generator=gen) * 4).to(torch.bfloat16)
        x[0, -1] = x[0].max() + 0.01  # a leader in the tail past the last 16
        want = _torch_leaders(x)
        got = logits._leaders(x)
        assert torch.equal(got[0], want[0])
        assert torch.equal(got[1], want[1]) and torch.equal(got[2], want[2])
    flat = torch.full((2, 64), 3.0, dtype=torch.bfloat16)  # every logit a leader
    monkeypatch.setattr(logits, "MAX_LEADERS", 16)
    got = logits._leaders(flat)
    assert len(got[1]) == 128 and torch.equal(got[0], flat.float())
    assert cpu_kernels.load() is None or cpu_kernels.load().near_top_bf16 is not None


@pytest.mark.skipif(not can_pack(torch.bfloat16, torch.device("cpu")),
                    reason="bf16 weights are packed for oneDNN only where the CPU has native "
                    "bf16 (AVX512_BF16 or AMX)")
def test_packed_head_keeps_its_weight_for_the_leaders():
    """Where bf16 linears are packed for oneDNN (pack_linears), the lm_head keeps its plain
    weight (the embedding's, where tied) so its leaders can be recomputed."""
    head, x, lo, hi = _tied_head()
    model = nn.Module()
    model.lm_head = head
    assert pack_linears(model) == 1
    packed = model.lm_head
    assert isinstance(packed, PackedLinear) and packed.source_weight is not None
    assert packed.source_weight.data_ptr() == head.weight.data_ptr()  # shared, not a copy
    with torch.no_grad():
        rounded = packed(x)
        out = exact_near_top(packed, x, rounded)
    assert rounded[0, lo] == rounded[0, hi] and int(rounded.float().argmax()) == lo
    assert int(out.argmax()) == hi


def test_many_leaders_are_recomputed_in_chunks(monkeypatch):
    """A flat row makes every logit a leader: recomputed CHUNK at a time, all of them."""
    from kvmesh.model import logits

    head = nn.Linear(16, 4096, bias=False).to(torch.bfloat16)
    with torch.no_grad():
        head.weight.zero_()
    x = torch.ones(3, 16, dtype=torch.bfloat16)
    monkeypatch.setattr(logits, "CHUNK", 1000)
    with torch.no_grad():
        out = exact_near_top(head, x, head(x) + 1)  # every logit 1.0 in bf16, 0.0 exactly
    assert torch.equal(out, torch.zeros(3, 4096))
