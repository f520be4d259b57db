"""The native CPU decode-attention kernel against gather + SDPA, and inside the engine."""

from __future__ import annotations

import os
import shutil

import pytest
import torch
import torch.nn.functional as F

from kvmesh import LLM, SamplingParams
from kvmesh.model import cpu_isa, cpu_kernels
from kvmesh.model.attention import DecodeGroup, _decode
from tests.builders import build_tiny_model

pytestmark = pytest.mark.skipif(shutil.which("cc") is None, reason="no C compiler")

CPU = torch.device("cpu")


def _case(dtype, heads, kv_heads, dim, block_size, lengths, seed):
    """A shuffled 3-layer paged cache, block tables and queries for one decode batch."""
    gen = torch.Generator().manual_seed(seed)
    width = max(-(-n // block_size) for n in lengths)
    num_blocks = len(lengths) * width + 5
    kv = torch.randn(num_blocks, 3, 2, block_size, kv_heads, dim, generator=gen).to(dtype)
    order = torch.randperm(num_blocks, generator=gen)
    tables = order[: len(lengths) * width].view(len(lengths), width).contiguous()
    q = torch.randn(len(lengths), heads + 2 * kv_heads, dim, generator=gen).to(dtype)[:, :heads]
    return kv[:, 1, 0], kv[:, 1, 1], tables, torch.tensor(lengths), q


def _reference(q, k_cache, v_cache, tables, lengths, scale):
    """Gather + masked SDPA in float32."""
    span = torch.arange(tables.shape[1] * k_cache.shape[1])
    mask = (span[None] < lengths[:, None])[:, None, None, :]
    group = DecodeGroup(0, len(lengths), tables, mask, lengths)
    return _decode(q.float().contiguous(), k_cache.float(), v_cache.float(), group, scale)


@pytest.mark.parametrize(
    ("dtype", "tol"), [(torch.bfloat16, 2e-2), (torch.float16, 2e-3), (torch.float32, 1e-5)]
)
@pytest.mark.parametrize(
    ("heads", "kv_heads", "dim", "block_size"),
    [(9, 3, 64, 16), (4, 4, 32, 8), (8, 2, 128, 16), (6, 2, 48, 4)],
)
def test_kernel_matches_sdpa(dtype, tol, heads, kv_heads, dim, block_size):
    lengths = [1, block_size, block_size + 1, 3 * block_size, 97, 250]
    k_cache, v_cache, tables, lens, q = _case(dtype, heads, kv_heads, dim, block_size,
                                               lengths, seed=dim + heads)
    kernel = cpu_kernels.decode_kernel(dtype, CPU)
    assert kernel is not None
    scale = dim**-0.5
    out = kernel(q, k_cache, v_cache, tables, lens, scale)
    ref = _reference(q, k_cache, v_cache, tables, lens, scale)
    assert out.dtype == dtype and out.shape == (len(lengths), heads, dim)
    torch.testing.assert_close(out.float(), ref, atol=tol, rtol=tol)


@pytest.mark.parametrize("level", cpu_isa.LEVELS)
def test_float32_kernel_at_each_level(level, monkeypatch):
    """The float32 cache at every level this CPU can build (the 8-float paths with AVX and
    up, plain loops without; head dims on and off a multiple of 32), against SDPA."""
    if level not in cpu_isa.runnable_levels():
        pytest.skip(f"this CPU's richest level is {cpu_isa.native_level()}")
    monkeypatch.setenv(cpu_isa.ENV, level)
    for heads, kv_heads, dim in ((9, 3, 64), (4, 2, 256), (6, 2, 48)):
        lengths = [1, 16, 17, 97, 250]
        k_cache, v_cache, tables, lens, q = _case(torch.float32, heads, kv_heads, dim, 16,
                                                   lengths, seed=dim)
        kernel = cpu_kernels.decode_kernel(torch.float32, CPU)
        assert kernel is not None
        out = kernel(q, k_cache, v_cache, tables, lens, dim**-0.5)
        ref = _reference(q, k_cache, v_cache, tables, lens, dim**-0.5)
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_kernel_rejects_bad_inputs():
    kernel = cpu_kernels.decode_kernel(torch.bfloat16, CPU)
    assert kernel is not None
    k_cache, v_cache, tables, lens, q = _case(torch.bfloat16, 4, 2, 64, 16, [20, 30], seed=1)
    with pytest.raises(ValueError, match="int64"):
        kernel(q, k_cache, v_cache, tables.int(), lens, 0.1)
    with pytest.raises(ValueError, match="query"):
        kernel(q.float(), k_cache, v_cache, tables, lens, 0.1)
    with pytest.raises(RuntimeError, match="rejected"):  # longer than the block table covers
        kernel(q, k_cache, v_cache, tables, torch.tensor([20, 10_000]), 0.1)


def test_broken_compiler_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("KVMESH_CACHE_DIR", str(tmp_path))
    with pytest.raises(RuntimeError, match="compiling"):
        cpu_kernels.build(compiler="false")


def test_native_backend_in_the_engine(tmp_path):
    """Same greedy tokens with the kernels and with SDPA (float32: rounding-level gaps only);
    bfloat16 logprobs are no further from float32 than SDPA's. Mixed prefill + decode steps,
    chunked prefills after a cached prefix and ragged lengths included."""
    model_dir = build_tiny_model(tmp_path, "llama", head_dim=64)  # a prefill-kernel size
    prompts = [[(7 * i + j) % 500 + 3 for j in range(5 + 23 * i)] for i in range(6)]
    prompts.append(prompts[-1] + prompts[2])  # a cached prefix, then chunks after it
    params = SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True, logprobs=1)
    outs = {}
    for dtype in ("float32", "bfloat16"):
        for backend in ("native", "sdpa"):
            llm = LLM(str(model_dir), device="cpu", dtype=dtype, block_size=8, num_blocks=256,
                      attention_backend=backend, max_num_batched_tokens=64)
            runner = llm.engine.runner
            assert (runner.decode_kernel is not None) == (backend == "native")
            if backend == "native" and dtype == "bfloat16":
                has_prefill = cpu_kernels.prefill_kernel(torch.bfloat16, CPU, 64) is not None
                assert (runner.prefill_kernel is not None) == has_prefill
            outs[dtype, backend] = llm.generate(prompts, params)
    for a, b in zip(outs["float32", "native"], outs["float32", "sdpa"], strict=True):
        assert a.token_ids == b.token_ids
    auto = LLM(str(model_dir), device="cpu", dtype="bfloat16", block_size=8, num_blocks=256)
    assert auto.engine.runner.decode_kernel is not None
    native = _logprob_error(outs["bfloat16", "native"], outs["float32", "sdpa"])
    sdpa = _logprob_error(outs["bfloat16", "sdpa"], outs["float32", "sdpa"])
    assert native[1] >= 3 * len(prompts) and sdpa[1] >= 3 * len(prompts)  # decodes compared
    assert native[0] <= 1.5 * sdpa[0] + 0.01, (native, sdpa)  # no worse than bf16 SDPA


def _logprob_error(outs, reference) -> tuple[float, int]:
    """Mean |logprob gap| to the reference over the positions where the tokens agree."""
    total, count = 0.0, 0
    for ra, rb in zip(outs, reference, strict=True):
        a, b = ra.outputs[0], rb.outputs[0]
        assert a.logprobs is not None and b.logprobs is not None
        for i, (x, y) in enumerate(zip(a.token_ids, b.token_ids, strict=True)):
            if x != y:
                break
            total += abs(a.logprobs[i][x] - b.logprobs[i][y])
            count += 1
    return total / max(count, 1), count


def _prefill_reference(q, k_cache, v_cache, tables, segments, scale):
    """Per segment: gather its context from the cache, causal SDPA offset by the prefix."""
    out = torch.zeros(q.shape, dtype=torch.float32)
    for table, (start, length, context) in zip(tables, segments.tolist(), strict=True):
        keys = k_cache[table].flatten(0, 1)[:context].transpose(0, 1).float()
        values = v_cache[table].flatten(0, 1)[:context].transpose(0, 1).float()
        query = q[start : start + length].transpose(0, 1).float()
        rows = torch.arange(length).unsqueeze(1) + (context - length)
        mask = torch.arange(context).unsqueeze(0) <= rows
        res = F.scaled_dot_product_attention(query.unsqueeze(0), keys.unsqueeze(0),
                                             values.unsqueeze(0), attn_mask=mask, scale=scale,
                                             enable_gqa=True)
        out[start : start + length] = res.squeeze(0).transpose(0, 1)
    return out


@pytest.mark.parametrize("tiles", [True, False])  # AMX tiles where the CPU has them
@pytest.mark.parametrize(("heads", "kv_heads", "dim", "block_size"),
                         [(9, 3, 64, 16), (8, 2, 128, 16), (4, 4, 64, 8), (6, 1, 128, 32)])
def test_prefill_kernel_matches_sdpa(heads, kv_heads, dim, block_size, tiles):
    kernel = cpu_kernels.prefill_kernel(torch.bfloat16, CPU, dim)
    assert (kernel is not None) == (cpu_isa.level() == "avx512_bf16")  # this CPU's path
    if kernel is None:
        pytest.skip(f"the bf16 prefill kernel needs AVX-512 BF16; ISA level {cpu_isa.level()}")
    lib = cpu_kernels.load()
    kernel.use_tiles = tiles
    on_tiles = tiles and block_size % 16 == 0 and bool(lib.paged_verify_available())
    calls = lib.paged_verify_calls()
    # (chunk length, context): whole prompts, chunks after a cached prefix, ragged tails.
    shapes = [(1, 1), (17, 17), (40, 200), (16, 16), (100, 100), (5, 77), (33, 64)]
    gen = torch.Generator().manual_seed(dim + heads)
    width = max(-(-ctx // block_size) for _, ctx in shapes)
    num_blocks = len(shapes) * width + 3
    kv = torch.randn(num_blocks, 2, 2, block_size, kv_heads, dim, generator=gen)
    kv = kv.to(torch.bfloat16)
    tables = torch.randperm(num_blocks, generator=gen)[: len(shapes) * width].view(
        len(shapes), width).contiguous()
    rows, start = [], 3  # three leading rows stand for decode tokens, untouched here
    for i, (length, context) in enumerate(shapes):
        rows.append((start, length, context))
        start += length
        # slots past the context hold stale values: NaN must never reach the output
        used = -(-context // block_size)
        kv[tables[i, used:], 1] = float("nan")
        kv[tables[i, used - 1], 1, :, context - (used - 1) * block_size:] = float("nan")
    segments = torch.tensor(rows)
    q = torch.randn(start, heads + 2 * kv_heads, dim, generator=gen).to(torch.bfloat16)
    q = q[:, :heads]
    out = torch.full(q.shape, 7.0, dtype=torch.bfloat16)
    scale = dim**-0.5
    kernel(q, kv[:, 1, 0], kv[:, 1, 1], tables, segments, out, scale)
    ref = _prefill_reference(q, kv[:, 1, 0], kv[:, 1, 1], tables, segments, scale)
    assert torch.all(out[:3] == 7.0)  # rows outside the segments are left alone
    torch.testing.assert_close(out[3:].float(), ref[3:], atol=2e-2, rtol=2e-2)
    # one tile call per segment where the tiles take it, none elsewhere
    assert lib.paged_verify_calls() - calls == (len(shapes) if on_tiles else 0)
    with pytest.raises(ValueError, match="outside q"):
        bad = segments.clone()
        bad[-1, 1] += 1  # the last segment one row past q
        kernel(q, kv[:, 1, 0], kv[:, 1, 1], tables, bad, out, scale)
    with pytest.raises(RuntimeError, match="rejected"):  # context beyond the block table
        bad = segments.clone()
        bad[0, 2] = width * block_size + 1
        kernel(q, kv[:, 1, 0], kv[:, 1, 1], tables, bad, out, scale)


@pytest.mark.parametrize("bias", [False, True])
def test_small_linear_matches_f_linear(bias):
    gen = torch.Generator().manual_seed(3)
    weight = torch.randn(96, 70, generator=gen).to(torch.bfloat16)
    b = torch.randn(96, generator=gen).to(torch.bfloat16) if bias else None
    kernel = cpu_kernels.small_linear(weight, b)
    assert (kernel is not None) == (cpu_isa.level() == "avx512_bf16")  # this CPU's path
    if kernel is None:
        pytest.skip(f"the bf16 linear kernel needs AVX-512 BF16; ISA level {cpu_isa.level()}")
    for rows in (1, 5, 16):
        x = torch.randn(rows, 140, generator=gen).to(torch.bfloat16)[:, ::2]  # strided rows
        ref = F.linear(x.float(), weight.float(), None if b is None else b.float())
        out = kernel(x)
        assert out.shape == (rows, 96) and out.dtype == torch.bfloat16
        torch.testing.assert_close(out.float(), ref, atol=3e-2, rtol=1e-2)
    assert cpu_kernels.small_linear(torch.randn(10, 64).to(torch.bfloat16), None) is None


def test_packed_linear_uses_small_kernel_for_decode_batches():
    from kvmesh.model.packed import can_pack, pack_linears

    # oneDNN packing is torch's path: it follows the CPU itself, not KVMESH_CPU_ISA.
    assert can_pack(torch.bfloat16, CPU) == cpu_isa.has_fast_bf16_native()
    if not can_pack(torch.bfloat16, CPU):
        pytest.skip("bf16 weight packing is only taken with native bf16 (AVX512_BF16/AMX)")
    gen = torch.Generator().manual_seed(4)
    model = torch.nn.Sequential(torch.nn.Linear(64, 32)).to(torch.bfloat16)
    ref_model = torch.nn.Sequential(torch.nn.Linear(64, 32)).to(torch.bfloat16)
    ref_model.load_state_dict(model.state_dict())
    assert pack_linears(model) == 1
    packed = model[0]
    assert (packed.small is not None) == (cpu_isa.level() == "avx512_bf16")
    if packed.small is None:
        pytest.skip(f"the bf16 linear kernel needs AVX-512 BF16; ISA level {cpu_isa.level()}")
    for rows in (2, 16, 40):  # 40 rows: the oneDNN path, bitwise equal to F.linear
        x = torch.randn(rows, 64, generator=gen).to(torch.bfloat16)
        if rows > 16:
            assert torch.equal(packed(x), ref_model(x))
        else:
            torch.testing.assert_close(packed(x).float(), ref_model(x).float(),
                                       atol=3e-2, rtol=1e-2)


def test_a_new_build_prunes_older_ones(tmp_path, monkeypatch):
    monkeypatch.setenv("KVMESH_CACHE_DIR", str(tmp_path))
    stale = tmp_path / "kernels" / "attention-0000000000000000.so"
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"old build")
    os.utime(stale, (1, 1))  # builds touched recently (another ISA level) are kept
    recent = tmp_path / "kernels" / "attention-1111111111111111.so"
    recent.write_bytes(b"another level, built a moment ago")
    other = tmp_path / "kernels" / "unrelated.txt"
    other.write_text("kept")
    built = cpu_kernels.build()
    assert built.exists() and built.parent == stale.parent
    assert not stale.exists() and other.exists() and recent.exists()
    assert cpu_kernels.build() == built  # cached: not rebuilt, not pruned
