"""A bf16 model's extra forms of its quantized layers (model/quant.py): the bf16-pair layout
of int4 weights for kernels/quant_bf16.c, and a dense bf16 copy for batches above the
packed kernels' rows, with the AMX tiles' rows for int8 layers (kernels/quant_i8amx.c).
Only CPUs with native bf16 get them (model/loader.py)."""

from __future__ import annotations

import torch
from torch import nn

from kvmesh.model import cpu_isa
from kvmesh.model.cpu_kernels import load as load_kernels
from kvmesh.model.quant import (
    BF16_HEAD_KERNEL_ROWS_AMX,
    BF16_KERNEL_ROWS,
    COLS,
    Quantized,
    QuantLinear,
)


def bf16_pairs(qw: Quantized) -> tuple[torch.Tensor, torch.Tensor]:
    """An int4 weight in quant_bf16.c's layout: [N/16][K/8][16] uint32 lanes whose nibble i
    is q[k + 2i] and nibble 4 + i is q[k + 2i + 1], and min - 128 scale per group."""
    if qw.bits != 4 or qw.min is None or qw.group % 8:
        raise ValueError("bf16 pairs are for affine int4 in groups of a multiple of 8")
    nb = qw.n // COLS
    packed = qw.q.reshape(nb, qw.k // 2, COLS)
    lanes = torch.empty((nb, qw.k // 8, COLS), dtype=torch.int32)
    shifts = 4 * torch.arange(4).reshape(1, 1, 4, 1)
    step = max(1, (1 << 22) // (qw.k * COLS))  # column blocks at a time: bounded temporaries
    for start in range(0, nb, step):
        b = packed[start:start + step].to(torch.int64)
        q = torch.stack((b & 15, b >> 4), dim=2).reshape(b.shape[0], qw.k // 8, 4, 2, COLS)
        lanes[start:start + step] = (
            (q[:, :, :, 0] << shifts) | (q[:, :, :, 1] << (shifts + 16))).sum(2).to(torch.int32)
    return lanes, (qw.min - 128 * qw.scale).contiguous()


def attach_dense(model: nn.Module, dense_factory, kernel_rows: int = BF16_KERNEL_ROWS) -> int:
    """Give every QuantLinear of a bf16 model its dense copy for large batches:
    `dense_factory(weight_bf16, bias_bf16)` builds it; int4 layers also get their bf16-pair
    form where the kernels have it, int8 ones the rows the AMX tiles take from them (0
    without tiles). Returns how many."""
    count = 0
    lib = load_kernels()
    pairs = lib is not None and bool(lib.quant_i4bf16_available())
    tile_rows = lib.quant_i8amx_max_rows() if lib is not None else 0
    head_rows = BF16_HEAD_KERNEL_ROWS_AMX if cpu_isa.has_amx() else kernel_rows
    for module in model.modules():
        if isinstance(module, QuantLinear):
            bias = None if module.bias is None else module.bias.to(torch.bfloat16)
            module.dense = dense_factory(module.weight().to(torch.bfloat16), bias)
            rows = min(kernel_rows, head_rows) if module.float_out else kernel_rows
            module.kernel_rows = min(rows, module.max_rows)
            if (module.qw.bits == 8 and module.qw.min is None and module.qw.k % 32 == 0
                    and module.qw.group % 32 == 0):
                module.amx_rows = tile_rows
            if pairs and module.qw.bits == 4 and module.qw.group % 8 == 0:
                module.bf16_pairs = bf16_pairs(module.qw)
            count += 1
    return count
