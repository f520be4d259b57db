"""Helpers shared by the benchmark scripts: physical limits and the results contract."""

from __future__ import annotations

import os
import random
import shlex
import sys
import time
from pathlib import Path
from typing import Any

from kvmesh.bench.report import result_doc, write_json

RESULTS = Path(__file__).resolve().parent / "results"


def random_prompts(conc: int, length: int, seed: int) -> list[list[int]]:
    """`conc` prompts of `length` random token ids (EOS-free range of the default vocab)."""
    rng = random.Random(seed)
    return [[rng.randrange(100, 40000) for _ in range(length)] for _ in range(conc)]


def prefill_tok_per_s(llm: Any, tokens: int = 2000, seed: int = 7) -> float:
    """Prefill rate of one `tokens`-long prompt through `LLM.generate` (one output token)."""
    from kvmesh import SamplingParams

    prompt = random_prompts(1, tokens, seed)
    start = time.perf_counter()
    llm.generate(prompt, SamplingParams(temperature=0.0, max_tokens=1))
    return tokens / (time.perf_counter() - start)


def matmul_gflops(dtype_name: str = "bfloat16", size: int = 2048, repeats: int = 8) -> float:
    import torch

    dtype = getattr(torch, dtype_name)
    a = torch.randn(size, size, dtype=dtype)
    b = torch.randn(size, size, dtype=dtype)
    a @ b
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return 2 * size**3 * repeats / (time.perf_counter() - start) / 1e9


def memcpy_gbps(size_bytes: int = 512 * 1024**2, repeats: int = 5) -> float:
    """Large tensor copy: bytes read + written counted once (like a memcpy figure)."""
    import torch

    src = torch.empty(size_bytes, dtype=torch.uint8).fill_(1)
    dst = torch.empty_like(src)
    dst.copy_(src)
    start = time.perf_counter()
    for _ in range(repeats):
        dst.copy_(src)
    return size_bytes * repeats / (time.perf_counter() - start) / 1e9


def read_gbps(size_bytes: int = 512 * 1024**2, repeats: int = 5) -> float:
    """Large tensor sum: the memory read bandwidth a streaming kernel can hope for."""
    import torch

    src = torch.ones(size_bytes // 4, dtype=torch.float32)
    src.sum()
    start = time.perf_counter()
    for _ in range(repeats):
        src.sum()
    return size_bytes * repeats / (time.perf_counter() - start) / 1e9


def cpu_kind(follow_switch: bool = True) -> str:
    """The CPU's native ISA level, with `_amx` where it has AMX tiles (`_amx_off` under
    KVMESH_AMX=0 when `follow_switch`): the suffix of each CPU kind's results file. A level
    forced lower (KVMESH_CPU_ISA) comes first, e.g. `avx2_on_avx512_bf16_amx`, so a forced
    run never overwrites the native one's file."""
    from kvmesh.model import cpu_isa
    from kvmesh.model.cpu_kernels import AMX_ENV

    amx = ""
    if cpu_isa.has_amx():
        off = follow_switch and os.environ.get(AMX_ENV, "1") == "0"
        amx = "_amx_off" if off else "_amx"
    native = cpu_isa.native_level()
    level = cpu_isa.level() if follow_switch else native
    return native + amx if level == native else f"{level}_on_{native}{amx}"


def save(name: str, config: dict[str, Any], figures: dict[str, Any],
         notes: dict[str, Any] | None = None) -> Path:
    command = shlex.join([Path(sys.executable).name, *sys.argv])
    path = RESULTS / f"{name}.json"
    write_json(path, result_doc(name, command, config, figures, notes))
    return path


def save_by_cpu(name: str, config: dict[str, Any], figures: dict[str, Any],
                notes: dict[str, Any] | None = None) -> list[Path]:
    """`<name>_<cpu kind>.json`, each CPU kind's latest run, and `<name>.json` too where
    this run took the CPU's own path: a run with a level forced lower (KVMESH_CPU_ISA) or
    AMX switched off writes only its kind's file, never the headline one."""
    kind = cpu_kind()
    paths = [save(f"{name}_{kind}", config, figures, notes)]
    if kind == cpu_kind(follow_switch=False):
        paths.insert(0, save(name, config, figures, notes))
    return paths
