"""oneDNN-prepacked weights for bf16/fp16 linears on the CPU.

`F.linear` on bf16 reorders the weight into oneDNN's blocked layout on every call; packing
once makes small-batch decode matmuls 1.3-1.6x faster here, with bitwise-equal results.
float32 keeps the plain path (it matches the transformers reference op for op).

For bf16 decode batches (at most 16 rows) a second copy of each layer's weight, packed for
the native small-batch kernel (model/kernels/small_linear.c), streams faster still: about
1.3-1.8x over oneDNN at 16 rows on AVX-512 BF16. The copy costs the weights' size again, so
it is made only while the extra stays under SMALL_BATCH_EXTRA_BYTES (small models), and not
for lm_head (tied to the embedding; no gain at its size).
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from kvmesh.model import cpu_isa
from kvmesh.model.cpu_kernels import SmallLinear, small_linear

log = logging.getLogger(__name__)
SMALL_BATCH_EXTRA_BYTES = 1 << 30


class PackedLinear(nn.Module):
    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, batch_hint: int):
        super().__init__()
        self.packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), batch_hint)
        self.bias = bias
        self.out_features = weight.shape[0]
        self.small: SmallLinear | None = None  # set by pack_linears where it applies
        # the lm_head's plain weight (its embedding's where tied: no copy), for the float32
        # leaders of its bf16 logits (model/logits.py); None for the other layers
        self.source_weight: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.small is not None and x.dim() == 2 and x.shape[0] <= SmallLinear.MAX_ROWS:
            return self.small(x)
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")


def can_pack(dtype: torch.dtype, device: torch.device) -> bool:
    """bf16 packs only with native bf16 (AVX512_BF16 or AMX): elsewhere oneDNN's packed
    results differ from F.linear's and are no faster, so the plain path stays. torch follows
    the CPU itself here, not KVMESH_CPU_ISA. fp16 packs where pack_linears finds it
    bitwise-equal to F.linear."""
    native = cpu_isa.has_fast_bf16_native() if dtype == torch.bfloat16 else dtype == torch.float16
    return (device.type == "cpu" and native and torch.backends.mkldnn.is_available()
            and hasattr(torch.ops.mkldnn, "_linear_pointwise"))


def _attach_small(packed: PackedLinear, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    """Give `packed` the small-batch kernel if there is one and it agrees with F.linear."""
    kernel = small_linear(weight, bias)
    if kernel is None:
        return
    x = torch.randn(3, weight.shape[1], dtype=weight.dtype)
    ref = nn.functional.linear(x.float(), weight.float(), None if bias is None else bias.float())
    if (kernel(x).float() - ref).abs().max() > 2e-2 * ref.abs().max() + 1e-3:
        log.warning("small-batch linear kernel disagrees with F.linear; not used")
        return
    packed.small = kernel


def pack_linears(model: nn.Module, batch_hint: int = 16) -> int:
    """Replace every nn.Linear under `model` by a PackedLinear. Returns how many."""
    count = 0
    extra = sum(m.weight.numel() * m.weight.element_size()
                for n, m in model.named_modules() if isinstance(m, nn.Linear) and n != "lm_head")
    use_small = extra <= SMALL_BATCH_EXTRA_BYTES
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear):
                try:
                    packed = PackedLinear(child.weight, child.bias, batch_hint)
                    x = torch.randn(2, child.in_features, dtype=child.weight.dtype)
                    if not torch.equal(packed(x), nn.functional.linear(x, child.weight,
                                                                       child.bias)):
                        continue  # keep the plain path where results would differ
                except RuntimeError as exc:
                    log.info("weight packing unavailable: %s", exc)
                    return count
                if child is getattr(model, "lm_head", None):
                    packed.source_weight = child.weight.detach()
                elif use_small:
                    _attach_small(packed, child.weight, child.bias)
                setattr(parent, name, packed)
                count += 1
    return count
