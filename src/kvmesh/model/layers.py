"""Building blocks: RMSNorm and rotary embeddings, numerically matching transformers."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from kvmesh.model.arch import ModelArch, RopeScaling


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps
        self.native: Any = None  # model/native_ops.NativeOps on a bf16 CPU model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.native is not None:
            out = self.native.rmsnorm(x, self.weight, self.eps)
            if out is not None:
                return out
        if x.dtype != torch.float32:  # one fused kernel (float32 inside, weight included)
            return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)
        h = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h  # op for op as transformers does: exact reference match


def _llama3_inv_freq(inv_freq: torch.Tensor, s: RopeScaling) -> torch.Tensor:
    low_wavelen = s.original_max_position_embeddings / s.low_freq_factor
    high_wavelen = s.original_max_position_embeddings / s.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / s.factor, inv_freq)
    smooth = (s.original_max_position_embeddings / wavelen - s.low_freq_factor) / (
        s.high_freq_factor - s.low_freq_factor
    )
    smoothed = (1 - smooth) * scaled / s.factor + smooth * scaled
    is_medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(is_medium, smoothed, scaled)


def rope_inv_freq(arch: ModelArch) -> torch.Tensor:
    exponents = torch.arange(0, arch.head_dim, 2, dtype=torch.int64).float() / arch.head_dim
    inv_freq = 1.0 / (arch.rope_theta**exponents)
    scaling = arch.rope_scaling
    if scaling is None:
        return inv_freq
    if scaling.kind == "llama3":
        return _llama3_inv_freq(inv_freq, scaling)
    return inv_freq / scaling.factor


class RotaryEmbedding(nn.Module):
    """cos/sin tables for every position up to `max_len`, looked up per token."""

    def __init__(self, arch: ModelArch, max_len: int):
        super().__init__()
        inv_freq = rope_inv_freq(arch)
        positions = torch.arange(max_len, dtype=torch.float32)
        freqs = positions[:, None] * inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        self.register_buffer("cos", emb.cos(), persistent=False)
        self.register_buffer("sin", emb.sin(), persistent=False)

    cos: torch.Tensor
    sin: torch.Tensor

    def forward(self, positions: torch.Tensor, dtype: torch.dtype):
        cos = self.cos[positions].to(dtype).unsqueeze(1)
        return cos, self.sin[positions].to(dtype).unsqueeze(1)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return x * cos + rotate_half(x) * sin
