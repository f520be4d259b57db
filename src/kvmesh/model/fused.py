"""The native decode path: one C call per decoder layer (kernels/decode_layer.c).

Taken for pure decode steps (one new token per sequence, no prefill chunk) of models whose
layer linears are all quantized (model/quant.py), with the native decode attention kernel
and no q/k norms (Qwen3 keeps the torch path). It runs the same steps as
`DecoderLayer.forward` in the same order; what it removes is some 30 small tensor ops and
five foreign calls per layer, which at one stream cost more than streaming the weights.
float32 models match the torch path to float rounding. bf16 models (a CPU with native
bf16) keep the residual stream in float32 across the layers, round K, V and q to bf16 for
the bf16 cache and attention, and int4 linears round their inputs to bf16 (bf16 dot
products, float32 accumulation): no less exact than bf16's own path, which rounds after
every op. int4 layers with int8 inputs (model/quant.py) call the same int8-input kernel as
their torch path. `KVMESH_FUSED_DECODE=0` turns it off (for A/B runs).
"""

from __future__ import annotations

import ctypes
import os
from typing import TYPE_CHECKING

import torch

from kvmesh.model.cpu_kernels import load as load_kernels
from kvmesh.model.quant import QuantLinear

if TYPE_CHECKING:
    from kvmesh.model.attention import AttentionMetadata
    from kvmesh.model.layers import RMSNorm, RotaryEmbedding
    from kvmesh.model.llama import DecoderLayer, LlamaForCausalLM

_P, _I64 = ctypes.c_void_p, ctypes.c_int64
BF16_FUSED_ROWS = 16  # bf16 models: measured on AVX-512 BF16, dense bf16 wins above it


class _QLinear(ctypes.Structure):
    _fields_ = [("q", _P), ("scale", _P), ("min", _P), ("bias", _P),
                ("n", _I64), ("k", _I64), ("group", _I64), ("bits", _I64),
                ("pairs", _P), ("min128", _P), ("scale16", _P), ("min16", _P)]


class _Layer(ctypes.Structure):
    _fields_ = [("qkv", _QLinear), ("o", _QLinear), ("gate_up", _QLinear), ("down", _QLinear),
                ("ln1", _P), ("ln2", _P), ("eps", ctypes.c_float), ("hidden", _I64),
                ("heads", _I64), ("kv_heads", _I64), ("dim", _I64), ("inter", _I64)]


class _Step(ctypes.Structure):
    _fields_ = [("seqs", _I64), ("cos", _P), ("sin", _P), ("slot_blocks", _P),
                ("slot_offsets", _P), ("tables", _P), ("lengths", _P), ("table_width", _I64),
                ("block_size", _I64), ("block_stride", _I64), ("scale", ctypes.c_float),
                ("kv_bf16", _I64)]


def _qlinear(layer: QuantLinear) -> _QLinear:
    qw = layer.qw
    ptr = lambda t: None if t is None else t.data_ptr()  # noqa: E731
    pairs = layer.bf16_pairs
    return _QLinear(qw.q.data_ptr(), qw.scale.data_ptr(), ptr(qw.min), ptr(layer.bias),
                    qw.n, qw.k, qw.group, qw.bits, *(ptr(t) for t in pairs or (None, None)),
                    *(ptr(t) for t in layer.fp16_scales or (None, None)))


def _layer(layer: DecoderLayer, keep: list[torch.Tensor]) -> _Layer | None:
    """The C view of one layer, or None where it does not apply. float32 copies of bf16
    norm weights go to `keep`, which must live as long as the view."""
    attn, mlp = layer.self_attn, layer.mlp
    linears: list[torch.nn.Module] = [attn.qkv_proj, attn.o_proj, mlp.gate_up_proj,
                                      mlp.down_proj]
    quantized = [m for m in linears if isinstance(m, QuantLinear)]
    if attn.q_norm is not None or len(quantized) != len(linears):
        return None
    norms: tuple[RMSNorm, RMSNorm] = (layer.input_layernorm, layer.post_attention_layernorm)
    weights = [n.weight.detach().float().contiguous() for n in norms]
    keep.extend(weights)
    return _Layer(*(_qlinear(m) for m in quantized), weights[0].data_ptr(),
                  weights[1].data_ptr(), norms[0].eps, norms[0].weight.numel(),
                  attn.num_heads, attn.num_kv_heads, attn.head_dim, mlp.intermediate)


class FusedDecoder:
    """Runs every decoder layer of a pure decode step natively. Holds raw pointers into the
    model's parameters: the model must outlive it and its weights must not be replaced."""

    def __init__(self, lib: ctypes.CDLL, layers: list[_Layer], scale: float,
                 dtype: torch.dtype, keep: list[torch.Tensor]):
        self.fn = lib.decode_layer_f32
        self.fn.argtypes = [_P, _P, _P, _P, _P, _P]
        self.fn.restype = ctypes.c_int
        lib.decode_layer_scratch.argtypes = [_P, _I64]
        lib.decode_layer_scratch.restype = _I64
        self.scratch_floats = lib.decode_layer_scratch
        self.layers = layers
        self.scale = scale
        self.dtype = dtype  # the model's: float32, or bfloat16 with a bf16 KV cache
        self._keep = keep
        # the most sequences a step may have: the kernel's batch limit; a bf16 model's
        # larger batches do better on its dense bf16 copies (model/quant.py)
        limit = lib.quant_linear_max_rows()
        # 64 where every linear is int4 with bf16 pairs and those run on AMX tiles
        pairs = all(q.pairs for c in layers
                    for q in (c.qkv, c.o, c.gate_up, c.down))
        bf16_rows = max(BF16_FUSED_ROWS, lib.quant_i4bf16_max_rows() if pairs else 0)
        self.max_rows = min(limit, bf16_rows) if dtype == torch.bfloat16 else limit

    @classmethod
    def build(cls, model: LlamaForCausalLM) -> FusedDecoder | None:
        """The fused path for `model`, or None where it does not apply."""
        if os.environ.get("KVMESH_FUSED_DECODE", "1") == "0":
            return None
        lib = load_kernels()
        dtype = next(model.parameters()).dtype
        if lib is None or dtype not in (torch.float32, torch.bfloat16):
            return None
        decoder: list[DecoderLayer] = list(model.layers)  # type: ignore[arg-type]
        keep: list[torch.Tensor] = []
        layers = [_layer(layer, keep) for layer in decoder]
        ready = [c for c in layers if c is not None]
        if not ready or len(ready) != len(layers):
            return None
        return cls(lib, ready, decoder[0].self_attn.scale, dtype, keep)

    def rows_with(self, decode_kernel: object, kv_dtype: torch.dtype) -> int:
        """The most decode sequences a step runs here with this attention kernel and KV
        dtype: `max_rows`, or 0 where `can_run` always refuses (no native decode kernel,
        a KV dtype other than the model's). `kvmesh profile` saves it for the simulator."""
        return self.max_rows if decode_kernel is not None and kv_dtype == self.dtype else 0

    def can_run(self, meta: AttentionMetadata, num_tokens: int,
                kv_caches: list[tuple[torch.Tensor, torch.Tensor]]) -> bool:
        k, v = kv_caches[0]
        if (num_tokens > self.rows_with(meta.decode_kernel, k.dtype)
                or meta.num_decodes != num_tokens or meta.prefills
                or meta.prefill_batch is not None or len(meta.decode_groups) != 1):
            return False
        _, _, heads, dim = k.shape
        index = (meta.slot_blocks, meta.slot_offsets, meta.decode_groups[0].block_tables,
                 meta.decode_groups[0].lengths)
        return (k.stride()[1:] == (heads * dim, dim, 1) and v.stride() == k.stride()
                and all(t.dtype == torch.int64 and t.is_contiguous() for t in index))

    def run(self, x: torch.Tensor, positions: torch.Tensor, rotary: RotaryEmbedding,
            meta: AttentionMetadata, kv_caches: list[tuple[torch.Tensor, torch.Tensor]]
            ) -> torch.Tensor:
        """x [S, hidden] in the model's dtype; returns the layers' output in it."""
        group = meta.decode_groups[0]
        cos, sin = rotary.cos[positions].contiguous(), rotary.sin[positions].contiguous()
        k0 = kv_caches[0][0]
        step = _Step(x.shape[0], cos.data_ptr(), sin.data_ptr(), meta.slot_blocks.data_ptr(),
                     meta.slot_offsets.data_ptr(), group.block_tables.data_ptr(),
                     group.lengths.data_ptr(), group.block_tables.shape[1], k0.shape[1],
                     k0.stride(0), self.scale, int(self.dtype == torch.bfloat16))
        scratch = torch.empty(self.scratch_floats(ctypes.byref(self.layers[0]), x.shape[0]),
                              dtype=torch.float32)
        x = x.float().contiguous()
        for layer, (k, v) in zip(self.layers, kv_caches, strict=True):
            rc = self.fn(ctypes.byref(layer), ctypes.byref(step), x.data_ptr(), k.data_ptr(),
                         v.data_ptr(), scratch.data_ptr())
            if rc != 0:
                raise RuntimeError(f"fused decode layer rejected its inputs (code {rc})")
        return x.to(self.dtype)
