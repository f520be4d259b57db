"""Which x86-64 instruction set the native CPU paths target, and what follows from it.

Pure (no torch): the kernel build, the `dtype auto` choice, weight packing, benchmarks and
tests all ask here, so "the path this CPU should take" has one definition.

Levels, richest first:

- `avx512_bf16`: AVX-512 (F, BW, VL) with BF16 dot products (Zen 4+, Cooper Lake, Sapphire
  Rapids with AMX). bfloat16 compute is fast here; the bf16 kernels are built.
- `avx512`: AVX-512 without BF16. float32 compute, 16-lane kernels.
- `avx2`: AVX2 + FMA + F16C (Haswell+, every Zen). float32 compute, 8-lane kernels; torch's
  bf16 matmuls fall back to a slow reference path here, so bf16 is not picked by default.
- `generic`: anything else; plain C, compiler-vectorised.

`KVMESH_CPU_ISA=<level>` selects a lower level than the CPU has (for example the AVX2
kernels on an AVX-512 machine, to test both there). Asking for a level the CPU lacks is a
`ValueError`: the kernels would die with an illegal instruction.
"""

from __future__ import annotations

import functools
import os
import platform
from pathlib import Path

LEVELS = ("generic", "avx2", "avx512", "avx512_bf16")
ENV = "KVMESH_CPU_ISA"
_REQUIRED = {
    "avx2": {"avx2", "fma", "f16c"},
    "avx512": {"avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl"},
    "avx512_bf16": {"avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_bf16"},
}
# Compiler flags per level: -march=native keeps tuning for the CPU at hand; the -mno-*
# switches take away what a lower level must not use.
_NARROWING = {
    "avx512_bf16": [],
    "avx512": ["-mno-avx512bf16"],
    "avx2": ["-mno-avx512f"],
    "generic": ["-mno-avx"],
}


@functools.cache
def _cpuinfo() -> dict[str, str]:
    """The first processor's fields in /proc/cpuinfo (empty where there is none)."""
    fields: dict[str, str] = {}
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return fields
    for line in text.splitlines():
        if not line.strip():
            break
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    return fields


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags from /proc/cpuinfo (empty where there is none)."""
    info = _cpuinfo()
    return frozenset((info.get("flags") or info.get("Features") or "").split())


def cpu_model() -> str:
    return _cpuinfo().get("model name") or platform.processor() or platform.machine()


def native_level(flags: frozenset[str] | None = None) -> str:
    """The richest level this CPU supports."""
    have = cpu_flags() if flags is None else flags
    if platform.machine() not in ("x86_64", "AMD64") and flags is None:
        return "generic"
    for level in reversed(LEVELS[1:]):
        if _REQUIRED[level] <= have:
            return level
    return "generic"


def runnable_levels(flags: frozenset[str] | None = None) -> tuple[str, ...]:
    """The levels this CPU can run: generic up to its native one."""
    return LEVELS[: LEVELS.index(native_level(flags)) + 1]


def level(flags: frozenset[str] | None = None, forced: str | None = None) -> str:
    """The level in force: `KVMESH_CPU_ISA` (or `forced`) if set, else the native one."""
    native = native_level(flags)
    wanted = forced if forced is not None else os.environ.get(ENV, "").strip().lower()
    if not wanted or wanted == "native":
        return native
    if wanted not in LEVELS:
        raise ValueError(f"{ENV} must be one of {('native', *LEVELS)}, got {wanted!r}")
    if wanted not in runnable_levels(flags):
        raise ValueError(
            f"{ENV}={wanted} asks for more than this CPU has (its richest level is {native})"
        )
    return wanted


def compile_flags(isa: str) -> list[str]:
    """Extra C compiler flags (after -march=native) that build for `isa`."""
    return list(_NARROWING[isa])


def has_fast_bf16(isa: str | None = None) -> bool:
    """Whether bfloat16 matmuls run natively (AVX512_BF16 or AMX) at this level."""
    return (level() if isa is None else isa) == "avx512_bf16"


def has_fast_bf16_native(flags: frozenset[str] | None = None) -> bool:
    """bfloat16 is fast on this CPU, whatever KVMESH_CPU_ISA says (torch's own kernels do
    not follow that switch): AVX512_BF16 or AMX-BF16."""
    have = cpu_flags() if flags is None else flags
    return "avx512_bf16" in have or "amx_bf16" in have


def has_amx(flags: frozenset[str] | None = None) -> bool:
    """The CPU has AMX tiles with bf16 products (Sapphire Rapids and later)."""
    return {"amx_tile", "amx_bf16"} <= (cpu_flags() if flags is None else flags)


def describe() -> dict[str, object]:
    """What benchmarks record about the CPU."""
    flags = cpu_flags()
    simd = sorted(f for f in flags if f.startswith(("avx", "amx", "fma", "f16c")))
    info = _cpuinfo()
    return {"cpu_model": cpu_model(), "cpu_family": info.get("cpu family"),
            "cpu_model_number": info.get("model"), "cpu_isa": level(),
            "cpu_native_isa": native_level(), "cpu_flags": simd}
