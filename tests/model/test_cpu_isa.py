"""ISA level selection: pure, from flag sets; and this CPU's own level."""

from __future__ import annotations

import pytest

from kvmesh.model import cpu_isa

AVX2 = frozenset({"sse4_2", "avx", "avx2", "fma", "f16c"})
AVX512 = AVX2 | {"avx512f", "avx512bw", "avx512vl", "avx512dq"}
AVX512_BF16 = AVX512 | {"avx512_bf16"}


@pytest.mark.parametrize(("flags", "expected"), [
    (frozenset({"sse2", "sse4_2"}), "generic"),
    (frozenset({"avx", "avx2"}), "generic"),  # AVX2 without FMA is not enough
    (AVX2, "avx2"),
    (AVX512, "avx512"),
    (AVX512_BF16, "avx512_bf16"),
    (AVX2 | {"avx512_bf16"}, "avx2"),  # bf16 dot products need AVX-512 F/BW/VL too
])
def test_native_level_from_flags(flags, expected):
    assert cpu_isa.native_level(flags) == expected


def test_forced_level_may_only_narrow(monkeypatch):
    assert cpu_isa.level(AVX512_BF16, forced="avx2") == "avx2"
    assert cpu_isa.level(AVX512_BF16, forced="native") == "avx512_bf16"
    assert cpu_isa.level(AVX2, forced="generic") == "generic"
    with pytest.raises(ValueError, match="more than this CPU has"):
        cpu_isa.level(AVX2, forced="avx512")
    with pytest.raises(ValueError, match="must be one of"):
        cpu_isa.level(AVX2, forced="sse9")
    monkeypatch.setenv(cpu_isa.ENV, "AVX2")
    assert cpu_isa.level(AVX512) == "avx2"


def test_fast_bf16_and_flags_per_level():
    assert [cpu_isa.has_fast_bf16(lv) for lv in cpu_isa.LEVELS] == [False, False, False, True]
    assert cpu_isa.compile_flags("avx2") == ["-mno-avx512f"]
    assert cpu_isa.compile_flags("avx512_bf16") == []
    assert cpu_isa.has_fast_bf16_native(AVX2 | {"amx_bf16"})
    assert not cpu_isa.has_fast_bf16_native(AVX512)


def test_this_cpu(monkeypatch):
    monkeypatch.delenv(cpu_isa.ENV, raising=False)
    flags = cpu_isa.cpu_flags()
    native = cpu_isa.native_level()
    assert cpu_isa.level() == native
    assert (native in ("avx2", "avx512", "avx512_bf16")) == ({"avx2", "fma", "f16c"} <= flags)
    assert (native == "avx512_bf16") == ({"avx512f", "avx512bw", "avx512vl", "avx512_bf16"}
                                         <= flags)
    info = cpu_isa.describe()
    assert info["cpu_isa"] == native and info["cpu_model"]
