"""Native RMSNorm and rotary embeddings for a bf16 model's torch path on the CPU.

Prefill chunks and mixed steps run the model op by op (model/llama.py); for bf16 tensors
torch's rms_norm and the five ops of `apply_rope` cost a 2-core Xeon 1.19x in prefill
tok/s on 480-token prompts (benchmarks/prefill_cpu.py; silu stays torch's: its vectorised
exp beat a native one). Qwen3's q/k norms see split views of q and k and keep torch's. `attach`
hands every RMSNorm and attention layer of a bf16 CPU model the native versions
(kernels/rows_bf16.c): rope is bit for bit torch's; RMSNorm is torch's fused arithmetic up
to the order of one sum, so a value may land one bf16 step away, rarely (one in 322,560 in
a test). float32 models keep torch's ops, the reference
path. `KVMESH_NATIVE_OPS=0` turns them off (A/B runs).
"""

from __future__ import annotations

import ctypes
import os

import torch
from torch import nn

from kvmesh.model.cpu_kernels import load as load_kernels

ENV = "KVMESH_NATIVE_OPS"


class NativeOps:
    def __init__(self, lib: ctypes.CDLL):  # signatures: model/kernel_signatures.py
        self._norm = lib.rmsnorm_bf16
        self._rope = lib.rope_bf16

    def rmsnorm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor | None:
        """RMSNorm over the last dim of bf16 `x` with a bf16 weight; None where it does
        not apply (the caller runs torch's)."""
        n = x.shape[-1]
        if (x.dtype != torch.bfloat16 or weight.dtype != torch.bfloat16 or x.device.type != "cpu"
                or not x.is_contiguous() or weight.shape != (n,) or not weight.is_contiguous()):
            return None
        out = torch.empty_like(x)
        if self._norm(x.data_ptr(), x.numel() // n if n else 0, n, weight.data_ptr(), eps,
                      out.data_ptr()) != 0:
            return None
        return out

    def rope(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor | None:
        """`apply_rope(x, cos, sin)` for bf16 x [T, H, D] (heads contiguous, any token
        stride) and cos, sin [T, 1, D] as RotaryEmbedding gives them; None where it does
        not apply."""
        if x.dim() != 3 or cos.dim() != 3:
            return None
        tokens, heads, dim = x.shape
        shaped = (tokens, 1, dim)
        if (x.dtype != torch.bfloat16 or x.device.type != "cpu" or x.stride()[1:] != (dim, 1)
                or cos.shape != shaped or sin.shape != shaped or cos.dtype != x.dtype
                or sin.dtype != x.dtype or not cos.is_contiguous() or not sin.is_contiguous()):
            return None
        out = torch.empty((tokens, heads, dim), dtype=x.dtype)
        if self._rope(x.data_ptr(), tokens, x.stride(0), heads, dim, cos.data_ptr(),
                      sin.data_ptr(), out.data_ptr()) != 0:
            return None
        return out


def native_ops() -> NativeOps | None:
    """The native ops, or None (no kernels here, or turned off)."""
    if os.environ.get(ENV, "1") == "0":
        return None
    lib = load_kernels()
    return None if lib is None else NativeOps(lib)


def attach(model: nn.Module) -> bool:
    """Give a bf16 CPU model's RMSNorm and attention layers the native ops (their `native`
    attribute); False where they do not apply."""
    param = next(model.parameters(), None)
    if param is None or param.dtype != torch.bfloat16 or param.device.type != "cpu":
        return False
    ops = native_ops()
    if ops is None:
        return False
    count = 0
    for module in model.modules():
        if hasattr(module, "native"):
            setattr(module, "native", ops)  # noqa: B010 - nn.Module types its attributes
            count += 1
    return count > 0
