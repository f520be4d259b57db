"""Native RMSNorm and rope for bf16 models (model/native_ops.py) against torch's ops."""

from __future__ import annotations

import shutil

import pytest
import torch
import torch.nn.functional as F

from kvmesh import LLM, SamplingParams
from kvmesh.model.layers import RMSNorm, apply_rope
from kvmesh.model.llama import Attention
from kvmesh.model.native_ops import ENV, NativeOps, native_ops
from tests.builders import build_tiny_model

pytestmark = pytest.mark.skipif(shutil.which("cc") is None, reason="no C compiler")


@pytest.fixture(scope="module")
def ops():
    found = native_ops()
    assert found is not None  # a C compiler is here: the kernels build
    return found


def _tables(tokens: int, dim: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    pos = torch.randint(0, 4096, (tokens,), generator=g)
    inv = 1.0 / (10000 ** (torch.arange(0, dim, 2).float() / dim))
    freqs = pos[:, None].float() * inv[None]
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().bfloat16().unsqueeze(1), emb.sin().bfloat16().unsqueeze(1)


@pytest.mark.parametrize(("tokens", "heads", "kv_heads", "dim"),
                         [(1, 9, 3, 64), (37, 12, 4, 128), (513, 2, 1, 16), (0, 4, 2, 8)])
def test_rope_is_torch_bit_for_bit(ops, tokens, heads, kv_heads, dim):
    """On the strided q/k view that the attention layer passes (a split of qkv rows)."""
    g = torch.Generator().manual_seed(tokens + dim)
    qkv = (torch.randn(tokens, (heads + 2 * kv_heads) * dim, generator=g) * 4).bfloat16()
    qk = qkv[:, : (heads + kv_heads) * dim].view(tokens, heads + kv_heads, dim)
    cos, sin = _tables(tokens, dim, seed=dim)
    out = ops.rope(qk, cos, sin)
    assert out is not None and out.is_contiguous()
    assert torch.equal(out, apply_rope(qk, cos, sin))


@pytest.mark.parametrize("shape", [(1, 576), (560, 576), (33, 4, 64), (5, 100)])
def test_rmsnorm_matches_torch_to_a_bf16_step(ops, shape):
    g = torch.Generator().manual_seed(shape[0])
    x = (torch.randn(*shape, generator=g) * 3).bfloat16()
    w = (torch.rand(shape[-1], generator=g) + 0.5).bfloat16()
    out = ops.rmsnorm(x, w, 1e-5)
    ref = F.rms_norm(x, (shape[-1],), w, 1e-5)
    assert out is not None and out.shape == ref.shape and out.dtype == torch.bfloat16
    # the sums of squares may add up in another order: one bf16 step at most, rarely
    assert (out == ref).float().mean().item() >= 0.999
    assert torch.allclose(out.float(), ref.float(), rtol=2**-7, atol=0)


def test_declines_what_it_does_not_cover(ops):
    """float32, a mismatched weight, non-contiguous rows, odd head dims: None, and the
    layers then run torch's ops."""
    x = torch.randn(4, 8)
    assert ops.rmsnorm(x, torch.ones(8), 1e-6) is None
    assert ops.rmsnorm(x.bfloat16(), torch.ones(8), 1e-6) is None  # float32 weight
    assert ops.rmsnorm(x.bfloat16().t(), torch.ones(4).bfloat16(), 1e-6) is None
    cos, sin = _tables(4, 8, seed=0)
    assert ops.rope(torch.randn(4, 2, 8), cos.float(), sin.float()) is None
    assert ops.rope(torch.randn(4, 8, 2).bfloat16().transpose(1, 2), cos, sin) is None
    norm = RMSNorm(8, 1e-6)
    norm.native = ops
    assert torch.equal(norm.forward(x), RMSNorm(8, 1e-6).forward(x))  # float32: torch's


def _generate(model_dir, monkeypatch, native: bool):
    monkeypatch.setenv(ENV, "1" if native else "0")
    ran: list[str] = []  # native ops that returned a result (not declined)
    for name in ("rmsnorm", "rope"):
        original = getattr(NativeOps, name)

        def spy(self, *args, _original=original, _name=name):
            out = _original(self, *args)
            if out is not None:
                ran.append(_name)
            return out

        monkeypatch.setattr(NativeOps, name, spy)
    llm = LLM(str(model_dir), device="cpu", dtype="bfloat16", block_size=8, num_blocks=256,
              max_num_batched_tokens=64)
    model = llm.engine.loaded.model
    attached = [m.native is not None for m in model.modules()
                if isinstance(m, RMSNorm | Attention)]
    assert attached and all(attached) == native and any(attached) == native
    prompts = [[(5 * i + j) % 300 + 3 for j in range(4 + 41 * i)] for i in range(4)]
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True, logprobs=1)
    outs = llm.generate(prompts, params)
    assert ({"rmsnorm", "rope"} <= set(ran)) == native  # they ran, in the torch layers
    return outs


@pytest.mark.parametrize("family", ["llama", "qwen3"])  # qwen3: q/k norms, [T, H, D] rows
def test_bf16_model_serves_the_same_with_native_ops(tmp_path, monkeypatch, family):
    """A bf16 model end to end (chunked prefills through the torch layers): the native ops
    in every RMSNorm and attention layer give torch's tokens, and logprobs within bf16's
    rounding of torch's."""
    model_dir = build_tiny_model(tmp_path, family)
    native = _generate(model_dir, monkeypatch, True)
    plain = _generate(model_dir, monkeypatch, False)
    for a, b in zip(native, plain, strict=True):
        assert a.token_ids == b.token_ids
        steps = zip(a.outputs[0].logprobs, b.outputs[0].logprobs, a.token_ids, strict=True)
        assert max(abs(x[t] - y[t]) for x, y, t in steps) < 0.1
