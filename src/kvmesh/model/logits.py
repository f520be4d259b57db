"""Float32 logits where the head computes in bf16.

A bf16 matmul accumulates in float32 but rounds its output to bf16: logits of 16 to 32
land on a grid 0.125 apart, so tokens whose logits differ by less tie, and greedy picks
whichever comes first in the vocabulary, not the larger. That is the case for the head of
an unquantized bf16 model and for a quantized head's dense bf16 copy (batches above its
kernel's rows), so a request's tokens could depend on how many others shared its step.

`exact_near_top` recomputes in float32, from the head's own weights, every logit close
enough to its row's maximum that rounding could have moved it past or below it: within
2^-6 (|max| + 1), several times the rounding error of either value (at most 2^-8 of it).
The greedy choice and the top of the distribution are then float32's; logits further
down keep their bf16 values (off by at most 2^-8 of themselves). For a head whose weights
are bf16 (unquantized, packed or not) the margin is a bound. A quantized head's dense copy
also rounds its weights to bf16, an error that is not bounded by the logit's size (it
grows with sum |x w|): the margin covers it in practice, not provably. On the CPU the
conversion to float32 and the search for the leaders are one native pass
(kernels/near_top.c, about 1 ms for 64 rows of 49k); elsewhere torch ops. The leaders are
recomputed CHUNK at a time, so a flat row (an untrained model) costs time, not memory.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from kvmesh.model.cpu_kernels import load
from kvmesh.model.packed import PackedLinear
from kvmesh.model.quant import QuantLinear, dequantize_rows

MARGIN = 2.0**-6
MAX_LEADERS = 1 << 16  # the native search's buffer; beyond it, torch ops find them
CHUNK = 4096  # leaders recomputed at a time: bounded temporaries


def _rows_and_bias(head: nn.Module) -> tuple[Callable[[torch.Tensor], torch.Tensor],
                                             torch.Tensor | None] | None:
    """(float32 weight rows by output index, bias) of a head, or None for other kinds."""
    if isinstance(head, QuantLinear):
        return (lambda idx: dequantize_rows(head.qw, idx)), head.bias
    if isinstance(head, nn.Linear):
        return (lambda idx: head.weight[idx].float()), head.bias
    if isinstance(head, PackedLinear) and head.source_weight is not None:
        weight = head.source_weight
        return (lambda idx: weight[idx].float()), head.bias
    return None


def exact_near_top(head: nn.Module, x: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """`logits` = head(x) in a reduced-precision dtype, as float32 with the logits near
    each row's maximum recomputed in float32 (x [R, K], logits [R, V])."""
    found = _rows_and_bias(head)
    if found is None or logits.numel() == 0:
        return logits.float()
    out, rows, cols = _leaders(logits)
    rows_of, bias = found
    for start in range(0, len(cols), CHUNK):
        r, t = rows[start:start + CHUNK], cols[start:start + CHUNK]
        exact = (x[r].float() * rows_of(t)).sum(-1)
        if bias is not None:
            exact += bias.float()[t]
        out[r, t] = exact
    return out


def _leaders(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(logits as float32, rows and columns of the logits near their row's maximum)."""
    lib = load() if logits.device.type == "cpu" else None
    if lib is not None and logits.dtype == torch.bfloat16 and logits.dim() == 2:
        src = logits.contiguous()
        out = torch.empty(src.shape, dtype=torch.float32)
        flat = torch.empty(MAX_LEADERS, dtype=torch.int64)
        n = lib.near_top_bf16(src.data_ptr(), src.shape[0], src.shape[1], MARGIN,
                              out.data_ptr(), flat.data_ptr(), MAX_LEADERS)
        if n >= 0:
            flat = flat[:n]
            return out, flat // src.shape[1], flat % src.shape[1]
    out = logits.float()
    top = out.amax(dim=-1, keepdim=True)
    r, t = torch.nonzero(out >= top - MARGIN * (top.abs() + 1), as_tuple=True)
    return out, r, t
