"""Llama-family decoder (Llama 2/3, SmolLM2, TinyLlama, Mistral, Qwen2, Qwen3) over paged KV.

Parameters are fused (qkv, gate_up) for speed; `load_hf_state` maps Hugging Face names.
The forward pass calls submodules' `forward` directly: no hooks are used, and skipping
`Module.__call__` saves about 3 us per call, some 250 calls per decode step.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from kvmesh.model.arch import ModelArch
from kvmesh.model.attention import AttentionMetadata, paged_attention
from kvmesh.model.layers import RMSNorm, RotaryEmbedding, apply_rope
from kvmesh.model.logits import exact_near_top

if TYPE_CHECKING:
    from kvmesh.model.fused import FusedDecoder

KVCaches = list[tuple[torch.Tensor, torch.Tensor]]


class Attention(nn.Module):
    def __init__(self, arch: ModelArch):
        super().__init__()
        self.num_heads = arch.num_heads
        self.num_kv_heads = arch.num_kv_heads
        self.head_dim = arch.head_dim
        self.q_size = arch.num_heads * arch.head_dim
        self.kv_size = arch.kv_dim
        self.scale = arch.head_dim**-0.5
        out = self.q_size + 2 * self.kv_size
        self.qkv_proj = nn.Linear(arch.hidden_size, out, bias=arch.attention_bias)
        self.o_proj = nn.Linear(self.q_size, arch.hidden_size, bias=False)
        self.q_norm = RMSNorm(arch.head_dim, arch.rms_norm_eps) if arch.qk_norm else None
        self.k_norm = RMSNorm(arch.head_dim, arch.rms_norm_eps) if arch.qk_norm else None
        self.native: Any = None  # model/native_ops.NativeOps on a bf16 CPU model

    def forward(self, x, cos, sin, cache, meta: AttentionMetadata) -> torch.Tensor:
        n = x.shape[0]
        qk, v = self.qkv_proj.forward(x).split([self.q_size + self.kv_size, self.kv_size], dim=-1)
        qk = qk.view(n, self.num_heads + self.num_kv_heads, self.head_dim)
        v = v.view(n, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None and self.k_norm is not None:
            q, k = qk.split([self.num_heads, self.num_kv_heads], dim=1)
            qk = torch.cat((self.q_norm.forward(q), self.k_norm.forward(k)), dim=1)
        rotated = None if self.native is None else self.native.rope(qk, cos, sin)
        rotated = apply_rope(qk, cos, sin) if rotated is None else rotated
        q, k = rotated.split([self.num_heads, self.num_kv_heads], dim=1)
        out = paged_attention(q, k, v, cache[0], cache[1], meta, self.scale)
        return self.o_proj.forward(out.reshape(n, self.q_size))


class MLP(nn.Module):
    def __init__(self, arch: ModelArch):
        super().__init__()
        self.intermediate = arch.intermediate_size
        self.gate_up_proj = nn.Linear(arch.hidden_size, 2 * arch.intermediate_size, bias=False)
        self.down_proj = nn.Linear(arch.intermediate_size, arch.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj.forward(x).split(self.intermediate, dim=-1)
        return self.down_proj.forward(F.silu(gate) * up)


class DecoderLayer(nn.Module):
    def __init__(self, arch: ModelArch):
        super().__init__()
        self.input_layernorm = RMSNorm(arch.hidden_size, arch.rms_norm_eps)
        self.self_attn = Attention(arch)
        self.post_attention_layernorm = RMSNorm(arch.hidden_size, arch.rms_norm_eps)
        self.mlp = MLP(arch)

    def forward(self, x, cos, sin, cache, meta: AttentionMetadata) -> torch.Tensor:
        x = x + self.self_attn.forward(self.input_layernorm.forward(x), cos, sin, cache, meta)
        return x + self.mlp.forward(self.post_attention_layernorm.forward(x))


class LlamaForCausalLM(nn.Module):
    def __init__(self, arch: ModelArch, max_len: int, rotary: RotaryEmbedding | None = None):
        super().__init__()
        self.arch = arch
        self.embed_tokens = nn.Embedding(arch.vocab_size, arch.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(arch) for _ in range(arch.num_layers))
        self.norm = RMSNorm(arch.hidden_size, arch.rms_norm_eps)
        self.lm_head = nn.Linear(arch.hidden_size, arch.vocab_size, bias=False)
        if arch.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.rotary = RotaryEmbedding(arch, max_len) if rotary is None else rotary
        self.fused: FusedDecoder | None = None  # the native decode path (model/fused.py)

    @torch.inference_mode()
    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        meta: AttentionMetadata,
        kv_caches: KVCaches,
        logits_indices: torch.Tensor,
    ) -> torch.Tensor:
        """Run a flat batch of tokens; return float32 logits at `logits_indices`."""
        x = self.embed_tokens.forward(input_ids)
        if self.fused is not None and self.fused.can_run(meta, x.shape[0], kv_caches):
            x = self.fused.run(x, positions, self.rotary, meta, kv_caches)
        else:
            cos, sin = self.rotary(positions, x.dtype)
            for layer, cache in zip(self.layers, kv_caches, strict=True):
                x = layer.forward(x, cos, sin, cache, meta)
        x = self.norm.forward(x[logits_indices])
        logits = self.lm_head.forward(x)
        if logits.dtype == torch.float32:
            return logits
        return exact_near_top(self.lm_head, x, logits)  # no ties from bf16 rounding

    def load_hf_state(self, tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy Hugging Face-named weights in, fusing q/k/v and gate/up."""
        params = dict(self.named_parameters())
        seen: set[str] = set()
        for name, tensor in tensors:
            for target, offset in _hf_target(name, self.arch):
                if target is None:
                    continue
                if target not in params:
                    raise ValueError(f"unexpected weight {name!r} in checkpoint")
                dst = params[target].data
                rows = tensor.shape[0]
                view = dst[offset : offset + rows] if offset is not None else dst
                if view.shape != tensor.shape:
                    raise ValueError(
                        f"weight {name!r} has shape {tuple(tensor.shape)}, "
                        f"expected {tuple(view.shape)}"
                    )
                view.copy_(tensor)
                seen.add(target)
        missing = (
            set(params) - seen - ({"lm_head.weight"} if self.arch.tie_word_embeddings else set())
        )
        if missing:
            raise ValueError(f"checkpoint is missing weights: {sorted(missing)[:5]}")


def _hf_target(name: str, arch: ModelArch) -> list[tuple[str | None, int | None]]:
    """Our parameter name (and row offset into a fused weight) for one HF weight name."""
    if name in ("model.embed_tokens.weight", "model.norm.weight"):
        return [(name.removeprefix("model."), None)]
    if name == "lm_head.weight":
        return [(None if arch.tie_word_embeddings else name, None)]
    if not name.startswith("model.layers.") or "rotary_emb" in name:
        return [(None, None)]
    rest = name.removeprefix("model.")
    q, kv, inter = arch.num_heads * arch.head_dim, arch.kv_dim, arch.intermediate_size
    fused = {
        "self_attn.q_proj.": ("self_attn.qkv_proj.", 0),
        "self_attn.k_proj.": ("self_attn.qkv_proj.", q),
        "self_attn.v_proj.": ("self_attn.qkv_proj.", q + kv),
        "mlp.gate_proj.": ("mlp.gate_up_proj.", 0),
        "mlp.up_proj.": ("mlp.gate_up_proj.", inter),
    }
    for part, (new, offset) in fused.items():
        if part in rest:
            return [(rest.replace(part, new), offset)]
    return [(rest, None)]
