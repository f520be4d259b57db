"""Load a Hugging Face directory (config.json + safetensors, sharded or not) into our model."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open

from kvmesh.model.arch import ModelArch, parse_arch
from kvmesh.model.fused import FusedDecoder
from kvmesh.model.layers import RotaryEmbedding
from kvmesh.model.llama import LlamaForCausalLM
from kvmesh.model.packed import can_pack, pack_linears
from kvmesh.model.quant import quantize_model

TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def read_config(model_dir: Path) -> dict:
    path = model_dir / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{model_dir} has no config.json: not a Hugging Face model dir")
    return json.loads(path.read_text())


def load_arch(model_dir: Path) -> ModelArch:
    return parse_arch(read_config(model_dir))


def safetensors_files(model_dir: Path) -> list[Path]:
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [model_dir / n for n in names]
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{model_dir} has no .safetensors weights")
    return files


def iter_tensors(files: list[Path], dtype: torch.dtype) -> Iterator[tuple[str, torch.Tensor]]:
    for path in files:
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 - safe_open is not a dict
                yield name, f.get_tensor(name).to(dtype)


def build_model(arch: ModelArch, dtype: torch.dtype, device: torch.device, max_len: int):
    """An uninitialised model on `device` (weights are loaded next)."""
    with torch.device("meta"):
        model = LlamaForCausalLM(arch, max_len)
    model = model.to_empty(device=device).to(dtype)
    if arch.tie_word_embeddings:
        model.lm_head.weight = model.embed_tokens.weight

    model.rotary = RotaryEmbedding(arch, max_len).to(device)
    return model.eval()


def load_model(
    model_dir: Path, dtype: torch.dtype, device: torch.device, max_len: int,
    quantization: str = "none",
) -> tuple[LlamaForCausalLM, str]:
    """The model, and the quantization in force (a summary such as "int4x210+int8x1", or
    "none"). `quantization` applies to CPU float32 compute; `auto` elsewhere means none."""
    arch = load_arch(model_dir)
    model = build_model(arch, dtype, device, max_len)
    applied = "none"
    with torch.no_grad():
        model.load_hf_state(iter_tensors(safetensors_files(model_dir), dtype))
        if quantization != "none":
            if device.type != "cpu" or dtype != torch.float32:
                if quantization != "auto":
                    raise ValueError(f"quantization={quantization} needs the CPU and float32 "
                                     "compute (--dtype float32)")
            else:
                applied = quantize_model(model, quantization)
                model.fused = FusedDecoder.build(model) if applied != "none" else None
        if can_pack(dtype, device):
            pack_linears(model)
    return model, applied
