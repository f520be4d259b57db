"""Named hardware and model shapes for roofline cost models. Pure data.

GPU figures are the vendors' published dense bf16 tensor-core rates (no sparsity), HBM
bandwidth, and host/peer links; model shapes are the published configs.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True)
class GpuSpec:
    name: str
    hbm_gbps: float  # HBM bandwidth, GB/s
    bf16_tflops: float  # dense bf16 tensor-core rate
    memory_gib: float
    pcie_gbps: float  # host <-> device, one direction
    nvlink_gbps: float  # device <-> device, one direction (0: none)
    nic_gbps: float  # node <-> node, per GPU (a 400 Gb/s NIC is 50 GB/s)


GPUS: dict[str, GpuSpec] = {
    "h100": GpuSpec("h100", 3350.0, 989.0, 80.0, 55.0, 450.0, 50.0),
    "h200": GpuSpec("h200", 4800.0, 989.0, 141.0, 55.0, 450.0, 50.0),
    "a100": GpuSpec("a100", 2039.0, 312.0, 80.0, 25.0, 300.0, 25.0),
    "l4": GpuSpec("l4", 300.0, 121.0, 24.0, 25.0, 0.0, 12.5),
}


@dataclass(frozen=True)
class ModelShape:
    """What the cost of a step depends on: a decoder-only transformer's shape."""

    name: str
    num_layers: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    max_model_len: int
    tie_embeddings: bool = False

    @property
    def num_params(self) -> int:
        """Weights read each step: attention, MLP (gated) and the lm_head."""
        h, kv = self.hidden_size, self.num_kv_heads * self.head_dim
        attn = h * self.num_heads * self.head_dim * 2 + h * kv * 2
        mlp = 3 * h * self.intermediate_size
        return self.num_layers * (attn + mlp) + h * self.vocab_size

    def kv_bytes_per_token(self, dtype_bytes: int = 2) -> int:
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * dtype_bytes

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


MODELS: dict[str, ModelShape] = {
    "smollm2-135m": ModelShape("smollm2-135m", 30, 576, 1536, 9, 3, 64, 49152, 8192, True),
    "llama-3.1-8b": ModelShape("llama-3.1-8b", 32, 4096, 14336, 32, 8, 128, 128256, 131072),
    "qwen2.5-32b": ModelShape("qwen2.5-32b", 64, 5120, 27648, 40, 8, 128, 152064, 131072),
    "llama-3.1-70b": ModelShape("llama-3.1-70b", 80, 8192, 28672, 64, 8, 128, 128256, 131072),
}


def gpu(name: str) -> GpuSpec:
    try:
        return GPUS[name.lower()]
    except KeyError:
        raise ValueError(f"unknown GPU {name!r}; known: {', '.join(GPUS)}") from None


def model_shape(name: str) -> ModelShape:
    try:
        return MODELS[name.lower()]
    except KeyError:
        raise ValueError(f"unknown model shape {name!r}; known: {', '.join(MODELS)}") from None
