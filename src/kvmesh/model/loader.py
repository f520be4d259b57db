"""Load a Hugging Face directory (config.json + safetensors, sharded or not) into our model."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from kvmesh.model.arch import ModelArch, parse_arch
from kvmesh.model.fused import FusedDecoder
from kvmesh.model.layers import RotaryEmbedding
from kvmesh.model.llama import LlamaForCausalLM
from kvmesh.model.native_ops import attach as attach_native_ops
from kvmesh.model.packed import PackedLinear, can_pack, pack_linears
from kvmesh.model.quant import quantize_model
from kvmesh.model.quant_dense import attach_dense

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


def _stores_float32(files: list[Path]) -> bool:
    """Whether the checkpoint's matrices are stored as float32 (its first one tells)."""
    with safe_open(str(files[0]), framework="pt") as f:
        for name in f.keys():  # noqa: SIM118 - safe_open is not a dict
            tensor = f.get_slice(name)
            if len(tensor.get_shape()) == 2:
                return bool(tensor.get_dtype() == "F32")
    return False


def iter_tensors(files: list[Path], dtype: torch.dtype) -> Iterator[tuple[str, torch.Tensor]]:
    for path in files:
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 - safe_open is not a dict
                yield name, f.get_tensor(name).to(dtype)


@contextmanager
def _empty_modules(dtype: torch.dtype, device: torch.device) -> Iterator[None]:
    """Modules built here get uninitialised parameters of `dtype` on `device`: their
    weights are loaded next. Not the meta device: there every op goes through torch's
    reference ops, whose first use imports torch._dynamo and sympy (over a second of each
    cold start)."""
    names = ("normal_", "uniform_", "kaiming_uniform_", "zeros_", "ones_")
    saved = {name: getattr(nn.init, name) for name in names}
    default = torch.get_default_dtype()
    try:
        for name in names:
            setattr(nn.init, name, lambda tensor, *args, **kwargs: tensor)
        torch.set_default_dtype(dtype)
        with torch.device(device):
            yield
    finally:
        torch.set_default_dtype(default)
        for name, fn in saved.items():
            setattr(nn.init, name, fn)


def build_model(arch: ModelArch, dtype: torch.dtype, device: torch.device, max_len: int):
    """An uninitialised model on `device` (weights are loaded next); rotary tables in
    float32 whatever the dtype."""
    rotary = RotaryEmbedding(arch, max_len).to(device)
    with _empty_modules(dtype, device):
        model = LlamaForCausalLM(arch, max_len, rotary)
    if arch.tie_word_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    return model.eval()


def load_model(
    model_dir: Path, dtype: torch.dtype, device: torch.device, max_len: int,
    quantization: str = "none", int8_activations: bool = False,
) -> tuple[LlamaForCausalLM, str]:
    """The model, and the quantization in force (a summary such as "int4x210+int8x1", or
    "none"). `quantization` applies on the CPU to float32 compute, and to bfloat16 where the
    CPU has native bf16 (model/quant.py); `auto` elsewhere means none. `int8_activations`
    rounds the inputs of float32 models' int4 layers to int8 (summary "int4a8x...")."""
    arch = load_arch(model_dir)
    files = safetensors_files(model_dir)
    # bf16: `auto` looks for grids only in float32 checkpoints (such as a converted GGUF);
    # a bf16 checkpoint loads as it is
    hybrid = (quantization != "none" and dtype == torch.bfloat16 and can_pack(dtype, device)
              and (quantization != "auto" or _stores_float32(files)))
    if quantization not in ("none", "auto") and not hybrid and (
            device.type != "cpu" or dtype != torch.float32):
        raise ValueError(f"quantization={quantization} needs the CPU and float32 compute "
                         "(--dtype float32), or bfloat16 on a CPU with native bf16")
    quantize = quantization != "none" and device.type == "cpu" and (
        dtype == torch.float32 or hybrid)
    # quantized layers are cut from float32 weights: bf16-rounded ones are off the grid
    load_dtype = torch.float32 if quantize else dtype
    model = build_model(arch, load_dtype, device, max_len)
    applied = "none"
    with torch.no_grad():
        model.load_hf_state(iter_tensors(files, load_dtype))
        if quantize:
            applied = quantize_model(model, quantization,
                                     int8_activations and dtype == torch.float32)
        if load_dtype != dtype:
            for param in model.parameters():  # the rest (norms, embeddings) in bf16
                param.data = param.data.to(dtype)
            attach_dense(model, lambda w, b: PackedLinear(w, b, 16))
        if applied != "none":
            model.fused = FusedDecoder.build(model)
        if can_pack(dtype, device):
            pack_linears(model)
        attach_native_ops(model)  # bf16 on the CPU: RMSNorm and rope for prefill steps
    return model, applied
