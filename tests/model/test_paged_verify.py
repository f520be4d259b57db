"""Attention for a verify step's rows on AMX tiles (kernels/paged_verify.c) against a float64
reference and against paged_decode, and the fused decode layer taking it for a bf16 model
with speculation on. Where the CPU has no AMX it declines and paged_decode runs."""

from __future__ import annotations

import shutil

import pytest
import torch

from kvmesh import LLM, SamplingParams
from kvmesh.model import cpu_isa
from kvmesh.model.cpu_kernels import load as load_kernels
from tests.builders import build_grid_model

pytestmark = pytest.mark.skipif(shutil.which("cc") is None, reason="no C compiler")


def _case(heads, kv_heads, dim, bs, ctx, rows, seed):
    """A bf16 cache in scattered blocks, stale NaNs in every slot past the last row's
    length, and `rows` queries whose lengths run ctx + 1 .. ctx + rows."""
    gen = torch.Generator().manual_seed(seed)
    blocks = (ctx + rows + bs - 1) // bs
    k = torch.full((blocks + 3, bs, kv_heads, dim), float("nan")).bfloat16()
    v = torch.full_like(k, float("nan"))
    table = torch.randperm(blocks + 3, generator=gen)[:blocks]
    n = ctx + rows
    for t in range(n):
        k[table[t // bs], t % bs] = torch.randn(kv_heads, dim, generator=gen).bfloat16()
        v[table[t // bs], t % bs] = torch.randn(kv_heads, dim, generator=gen).bfloat16()
    q = (torch.randn(rows, heads * dim, generator=gen) * 2).bfloat16()
    return q, k, v, table.repeat(rows, 1).contiguous()


def _reference(q, k, v, table, ctx, heads, kv_heads, dim, bs, scale):
    rows, group = q.shape[0], heads // kv_heads
    n = ctx + rows
    idx = torch.arange(n)
    keys = k[table[0][idx // bs], idx % bs].double()  # [n, kv_heads, dim]
    vals = v[table[0][idx // bs], idx % bs].double()
    out = torch.empty(rows, heads, dim, dtype=torch.float64)
    for r in range(rows):
        length = ctx + 1 + r
        for h in range(heads):
            s = keys[:length, h // group] @ q[r, h * dim:(h + 1) * dim].double() * scale
            out[r, h] = torch.softmax(s, 0) @ vals[:length, h // group]
    return out.reshape(rows, heads * dim)


def _call(lib, fn, q, k, v, table, ctx, heads, kv_heads, dim, bs, scale, out):
    rows = q.shape[0]
    if fn == "verify":
        return lib.paged_verify_bf16(q.data_ptr(), heads * dim, k.data_ptr(), v.data_ptr(),
                                     k.stride(0), table.data_ptr(), table.shape[1], ctx + 1,
                                     rows, out.data_ptr(), heads, kv_heads, dim, bs, scale)
    lengths = torch.arange(ctx + 1, ctx + 1 + rows, dtype=torch.int64)
    return lib.paged_decode_bf16(q.data_ptr(), heads * dim, k.data_ptr(), v.data_ptr(),
                                 k.stride(0), table.data_ptr(), table.shape[1],
                                 lengths.data_ptr(), out.data_ptr(), rows, heads, kv_heads, dim,
                                 bs, scale)


def _amx(lib) -> bool:
    on = bool(lib.paged_verify_available())
    wanted = (cpu_isa.level() == "avx512_bf16" and cpu_isa.has_amx()
              and bool(lib.quant_i4bf16_amx_built()) and lib.quant_i4bf16_max_rows() == 64)
    assert on == wanted  # the path this CPU should take
    return on


@pytest.mark.parametrize("heads,kv_heads,dim,bs,ctx,rows", [
    (9, 3, 64, 16, 4, 9),      # the default model's heads; context inside one block
    (9, 3, 64, 16, 100, 2),    # one drafted token
    (8, 2, 128, 32, 70, 7),    # head dim 128, blocks of 32
    (4, 4, 64, 16, 33, 17),    # 17 query vectors: two tiles
    (12, 3, 64, 16, 250, 9),   # 36 query vectors: three tiles
    (2, 1, 64, 16, 0, 1),      # one row, one token
])
def test_verify_attention_matches_float64_and_paged_decode(heads, kv_heads, dim, bs, ctx,
                                                           rows):
    """Each row attends to its own length only (stale NaNs past it never reach the output);
    the result is the float64 softmax's to bf16 weights and output rounding, and the
    per-row decode kernel's to the same."""
    lib = load_kernels()
    assert lib is not None
    q, k, v, table = _case(heads, kv_heads, dim, bs, ctx, rows, seed=ctx + rows)
    scale = dim ** -0.5
    out = torch.full((rows, heads * dim), float("nan")).bfloat16()
    rc = _call(lib, "verify", q, k, v, table, ctx, heads, kv_heads, dim, bs, scale, out)
    if not _amx(lib):
        assert rc == 3
        pytest.skip("AMX off here (no tiles, not built for them, or KVMESH_AMX=0): verify "
                    "steps' attention stays on paged_decode")
    assert rc == 0
    ref = _reference(q, k, v, table, ctx, heads, kv_heads, dim, bs, scale)
    torch.testing.assert_close(out.double(), ref, atol=2e-2, rtol=2e-2)
    per_row = torch.empty_like(out)
    assert _call(lib, "decode", q, k, v, table, ctx, heads, kv_heads, dim, bs, scale,
                 per_row) == 0
    torch.testing.assert_close(out.float(), per_row.float(), atol=2e-2, rtol=2e-2)


def test_verify_attention_refuses_shapes_it_does_not_take():
    lib = load_kernels()
    assert lib is not None
    q, k, v, table = _case(4, 2, 64, 16, 10, 3, seed=1)
    out = torch.empty(3, 4 * 64).bfloat16()
    want = 0 if lib.paged_verify_available() else 3
    assert _call(lib, "verify", q, k, v, table, 10, 4, 2, 64, 16, 0.125, out) == want
    assert _call(lib, "verify", q, k, v, table, 10, 4, 2, 64, 8, 0.125, out) == 1  # block 8
    assert lib.paged_verify_bf16(q.data_ptr(), 4 * 96, k.data_ptr(), v.data_ptr(), 1,
                                 table.data_ptr(), table.shape[1], 11, 3, out.data_ptr(), 4, 2,
                                 96, 16, 0.125) == 1  # head dim 96
    assert lib.paged_verify_bf16(q.data_ptr(), 4 * 64, k.data_ptr(), v.data_ptr(),
                                 k.stride(0), table.data_ptr(), table.shape[1],
                                 table.shape[1] * 16, 3, out.data_ptr(), 4, 2, 64, 16,
                                 0.125) == 2  # lengths past the table


@pytest.mark.skipif(not cpu_isa.has_fast_bf16_native(),
                    reason="bf16 models are quantized (and fused) only with native bf16")
def test_bf16_speculation_runs_verify_rows_on_the_tiles(tmp_path, monkeypatch):
    """A bf16 model with prompt lookup: the fused layers send each verify step's rows to
    the tile kernel (where it runs here), and the greedy tokens stay those of plain bf16
    decoding but for rounding (the weights are bf16 in the tiles, float32 per row; and
    verify batches of 17 rows and up take the int4 linears' dequantizing path, whose bf16
    weights are the dense copy's, while plain decoding of 4 rows multiplies the exact
    nibbles)."""
    monkeypatch.setenv("KVMESH_FUSED_DECODE", "1")
    lib = load_kernels()
    assert lib is not None
    model_dir = build_grid_model(tmp_path, hidden_size=128, num_attention_heads=2,
                                 num_key_value_heads=1, head_dim=64)
    kw = dict(device="cpu", dtype="bfloat16", block_size=16, num_blocks=128)
    prompts = [[(5 * i + j) % 37 + 3 for j in range(20)] * 3 for i in range(4)]
    params = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)
    plain = [o.token_ids for o in LLM(str(model_dir), **kw).generate(prompts, params)]
    spec_llm = LLM(str(model_dir), **kw, speculative_method="ngram", num_speculative_tokens=6)
    before = lib.paged_verify_calls()
    spec = [o.token_ids for o in spec_llm.generate(prompts, params)]
    assert spec_llm.engine.core.speculator.num_verify_steps > 0
    assert (lib.paged_verify_calls() > before) == bool(lib.paged_verify_available())
    same = sum(a == b for s, p in zip(spec, plain, strict=True) for a, b in zip(s, p, strict=True))
    assert same >= 0.9 * sum(len(p) for p in plain)
