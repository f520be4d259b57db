"""Engine start-up: resolve the model, pick device and dtypes, size the KV cache."""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from kvmesh.config import EngineConfig
from kvmesh.engine.events import EventOutbox
from kvmesh.engine.model_runner import kv_block_bytes
from kvmesh.kvstore.disk import DiskTier
from kvmesh.kvstore.host import HostTier
from kvmesh.kvstore.store import TieredStore
from kvmesh.model import cpu_isa
from kvmesh.model.llama import LlamaForCausalLM
from kvmesh.model.loader import TORCH_DTYPES, load_model, read_config
from kvmesh.model.quant import int8_activations_available
from kvmesh.model.registry import resolve_model
from kvmesh.model.tokenizer import Tokenizer

log = logging.getLogger(__name__)


@dataclass
class LoadedModel:
    name: str
    path: Path
    model_id: str
    model: LlamaForCausalLM
    tokenizer: Tokenizer
    device: torch.device
    dtype: torch.dtype
    kv_dtype: torch.dtype
    kv_dtype_name: str
    max_model_len: int
    num_blocks: int
    eos_token_ids: frozenset[int]
    quantization: str = "none"


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device cuda was asked for, but CUDA is not available")
    return device


def auto_dtype(device: torch.device) -> tuple[str, str]:
    """What `dtype auto` picks on `device`, and why (logged at startup)."""
    if device.type == "cuda":
        return "bfloat16", "CUDA device"
    isa = cpu_isa.level()
    if cpu_isa.has_fast_bf16(isa):
        return "bfloat16", f"CPU ISA {isa}: native bf16 dot products"
    return "float32", f"CPU ISA {isa}: no native bf16, torch's bf16 matmuls would be slow"


def pick_dtype(name: str, device: torch.device) -> tuple[str, torch.dtype]:
    if name == "auto":
        name, why = auto_dtype(device)
        log.info("dtype auto -> %s (%s); --dtype float32 is the exact reference path",
                 name, why)
    return name, TORCH_DTYPES[name]


def int8_activations(name: str, dtype: torch.dtype, device: torch.device) -> bool:
    """What `quant_activations` means here. Only float32 compute on the CPU has int4
    linears to round the inputs of; elsewhere the setting changes nothing."""
    if name == "float32" or device.type != "cpu" or dtype != torch.float32:
        return False
    if not int8_activations_available():
        raise ValueError("quant_activations=int8 needs the native CPU kernels with AVX2 "
                         f"(CPU ISA level {cpu_isa.level()}, or no C compiler)")
    return True


def _model_id(name: str, path: Path, quantization: str = "none") -> str:
    """Identity for block keys: the weights, and how they are quantized (quantized KV is not
    interchangeable with float KV, and the disk tier outlives the process)."""
    digest = hashlib.sha256((path / "config.json").read_bytes())
    if quantization != "none":
        digest.update(f"quantization:{quantization}".encode())
    for weights in sorted(path.glob("*.safetensors")):
        digest.update(f"{weights.name}:{weights.stat().st_size}".encode())
    return f"{name}:{digest.hexdigest()[:16]}"


def _eos_ids(path: Path, tokenizer: Tokenizer, config_eos: tuple[int, ...]) -> frozenset[int]:
    ids = set(config_eos)
    gen = path / "generation_config.json"
    if gen.is_file():
        import json

        value = json.loads(gen.read_text()).get("eos_token_id")
        ids.update([value] if isinstance(value, int) else (value or []))
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return frozenset(ids)


def load_engine_model(config: EngineConfig, progress: bool = True) -> LoadedModel:
    mc, cc = config.model, config.cache
    if mc.num_threads:
        torch.set_num_threads(mc.num_threads)
    resolved = resolve_model(mc.model, progress=progress)
    device = pick_device(mc.device)
    dtype_name, dtype = pick_dtype(mc.dtype, device)
    kv_name, kv_dtype = pick_dtype(dtype_name if cc.kv_dtype == "auto" else cc.kv_dtype, device)
    arch_max = int(read_config(resolved.path).get("max_position_embeddings", 4096))
    max_len = mc.max_model_len or arch_max
    if max_len > arch_max:
        log.warning(
            "max_model_len %d exceeds the model's %d; quality may degrade", max_len, arch_max
        )
    model, quantization = load_model(resolved.path, dtype, device, max_len, mc.quantization,
                                     int8_activations(mc.quant_activations, dtype, device))
    if mc.quantization != "none":
        log.info("quantization %s -> %s%s", mc.quantization, quantization,
                 " (int4 layers take int8 inputs)" if "a8" in quantization else "")
    block_bytes = kv_block_bytes(model.arch, cc.block_size, kv_dtype)
    num_blocks = cc.num_blocks or max(1, cc.kv_cache_memory_bytes // block_bytes)
    if num_blocks * cc.block_size < max_len:
        # A longer sequence could never hold all its blocks at once: it would preempt
        # itself forever. Refuse such prompts up front (HTTP 400) instead.
        log.warning("max_model_len %d capped to %d: the KV cache holds %d blocks of %d tokens",
                    max_len, num_blocks * cc.block_size, num_blocks, cc.block_size)
        max_len = num_blocks * cc.block_size
    if device.type == "cpu":
        _warn_if_over_memory(num_blocks * block_bytes)
    tokenizer = Tokenizer(resolved.path)
    return LoadedModel(
        resolved.name,
        resolved.path,
        _model_id(resolved.name, resolved.path, quantization),
        model,
        tokenizer,
        device,
        dtype,
        kv_dtype,
        kv_name,
        max_len,
        num_blocks,
        _eos_ids(resolved.path, tokenizer, model.arch.eos_token_ids),
        quantization,
    )


def available_memory_bytes() -> int | None:
    """The kernel's MemAvailable, or None where /proc/meminfo does not say."""
    try:
        with open("/proc/meminfo") as f:
            info = dict(line.split(":", 1) for line in f)
        return int(info["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return None


def _warn_if_over_memory(pool_bytes: int) -> None:
    """The CPU pool's pages are mapped as blocks fill (model_runner.lazy_zeros), so a pool
    larger than the free memory would not fail at startup: say so now."""
    available = available_memory_bytes()
    if available is not None and pool_bytes > available:
        log.warning("the KV cache (%d MiB) exceeds the memory available now (%d MiB): once "
                    "it fills, the OS may kill this process; lower --kv-cache-memory-bytes",
                    pool_bytes >> 20, available >> 20)


def build_store(config: EngineConfig, block_bytes: int,
                outbox: EventOutbox | None = None) -> TieredStore | None:
    """Host memory over the disk tier, as configured (None: no tiers below the device)."""
    tiers = config.tiers
    if not tiers.is_enabled or not config.cache.enable_prefix_caching:
        return None
    host = HostTier(tiers.host_bytes, block_bytes, tiers.host_policy, outbox=outbox)
    sources = ([DiskTier(Path(tiers.disk_path), tiers.disk_bytes, block_bytes, tiers.disk_policy,
                         tiers.io_threads, tiers.fsync, outbox)] if tiers.disk_path else [])
    return TieredStore(tiers, host, sources, config.cache.block_size)
