"""Weight-only quantization of linear layers: int8 and int4 with per-group scales.

Profiles (`--quantization`):

- `none`: float weights, the exact path.
- `int8`: every linear (lm_head included) as symmetric int8, one scale per group of 32
  weights along K (the layout of GGUF's Q8_0).
- `int4`: linears as affine int4, a scale and a minimum per group of 32 (GGUF's Q4_1);
  lm_head stays int8, since logits are the most sensitive.
- `auto`: the int4 profile where it reproduces a layer's weights to float rounding
  (re-quantizing a model converted from a Q4_1/Q8_0 GGUF recovers the file's own grid
  exactly), float elsewhere. So the default model reads about 0.6 bytes per weight with the
  float32 model's outputs (with float32 inputs, below), and a model with float weights
  keeps the exact path.

Activations and accumulation stay float32: the kernel (kernels/quant_linear.c) converts
weights on load and serves batches of up to 64 rows (256 with AVX2 alone, where it keeps
up with torch's matmul that far); larger batches dequantize the layer to float32 and use
torch's matmul. Or, with int8 inputs (`--quant-activations int8`,
float32 compute, AVX2 and up), int4 layers round their inputs to int8 per group of
32 and multiply as integers (kernels/quant_a8.c, llama.cpp's Q4 x Q8 arithmetic: see
`round_activations`), with float16 scales; that kernel serves every batch size, so a
token's result never depends on its batch.

A bf16 model on a CPU with native bf16 keeps both: the packed ints for decode batches of
up to BF16_KERNEL_ROWS rows (float32 accumulation, so no less exact than bf16's own
matmul; more rows when the fused decode layer runs, model/fused.py) and
a bf16 copy packed for oneDNN for larger batches, where bf16 dot products are faster
than any float32 kernel (`quant_dense.attach_dense`); its int4 layers also get the
bf16-pair layout of kernels/quant_bf16.c (`quant_dense.bf16_pairs`), and on a CPU with AMX
its int8 layers (the lm_head) run batches above their kernel's rows, up to 32, on the tiles
(kernels/quant_i8amx.c: the exact int8 weights, float32 sums) rather than on the dense
copy. That is about 3.4 bytes per weight instead of bf16's 2 (int4 layers; 3.1 for int8
ones), and a decode step reads 0.75 of them (1.125).
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from kvmesh.model.cpu_kernels import load as load_kernels

log = logging.getLogger(__name__)

PROFILES = ("none", "auto", "int8", "int4")
GROUP = 32
COLS = 16
BF16_KERNEL_ROWS = 8  # bf16 models: the quantized kernel up to here, bf16 dense above
# an int8 lm_head on a CPU with AMX: from 5 rows the tiles (kernels/quant_i8amx.c; past 32
# rows the dense bf16 copy) beat the float32 int8 kernel, which is bound by converting the
# weights to float (Xeon, default model, in a decode step: 5 rows 3.25 -> 2.81 ms on the
# dense copy; a 9-row verify step of speculative decoding 14.8 ms with the head on the
# dense copy, 12.9 on the tiles, benchmarks/verify_step.py)
BF16_HEAD_KERNEL_ROWS_AMX = 4
EXACT_RTOL = 1e-6  # `auto`: reconstruction error allowed, relative to the layer's max |w|


@dataclass(frozen=True)
class Quantized:
    """A packed weight: q in the kernel's column-block layout, scales [N/16][K/G][16]."""

    q: torch.Tensor
    scale: torch.Tensor
    min: torch.Tensor | None
    bits: int
    group: int
    n: int
    k: int

    @property
    def nbytes(self) -> int:
        extra = 0 if self.min is None else self.min.numel() * 4
        return self.q.numel() + self.scale.numel() * 4 + extra


def quantize(weight: torch.Tensor, bits: int, group: int = GROUP) -> Quantized:
    """int8: symmetric, scale = max|w| / 127. int4: affine, q in 0..15 over [min, max]."""
    n, k = weight.shape
    if n % COLS or k % group or group % 4:
        raise ValueError(f"cannot quantize a {n}x{k} weight in groups of {group}")
    w = weight.detach().float().reshape(n, k // group, group)
    if bits == 8:
        scale = w.abs().amax(-1) / 127
        q = torch.round(w / torch.where(scale > 0, scale, 1)[..., None]).clamp_(-127, 127)
        low = None
    elif bits == 4:
        low, high = w.amin(-1), w.amax(-1)
        scale = (high - low) / 15
        safe = torch.where(scale > 0, scale, 1)[..., None]
        q = torch.round((w - low[..., None]) / safe).clamp_(0, 15)
    else:
        raise ValueError(f"bits must be 8 or 4, got {bits}")
    return Quantized(_pack_q(q.reshape(n, k).to(torch.int16), bits), _blocks(scale),
                     None if low is None else _blocks(low), bits, group, n, k)


def _blocks(per_group: torch.Tensor) -> torch.Tensor:
    """[N, G] -> [N/16][G][16] contiguous float32."""
    n, groups = per_group.shape
    return per_group.reshape(n // COLS, COLS, groups).transpose(1, 2).contiguous().float()


def _pack_q(q: torch.Tensor, bits: int) -> torch.Tensor:
    n, k = q.shape
    cols = q.reshape(n // COLS, COLS, k).transpose(1, 2)  # [N/16][K][16]
    if bits == 8:
        return cols.to(torch.int8).contiguous().view(torch.uint8)
    pairs = cols.reshape(n // COLS, k // 2, 2, COLS)
    return (pairs[:, :, 0] | (pairs[:, :, 1] << 4)).to(torch.uint8).contiguous()


def dequantize(qw: Quantized) -> torch.Tensor:
    """The float32 weight [N, K]: the native kernel where it is built, else torch ops."""
    lib = load_kernels()
    if lib is not None:
        w = torch.empty((qw.n, qw.k), dtype=torch.float32)
        rc = lib.quant_dequantize_f32(qw.q.data_ptr(), qw.scale.data_ptr(),
                                      None if qw.min is None else qw.min.data_ptr(),
                                      qw.n, qw.k, qw.group, qw.bits, w.data_ptr())
        if rc != 0:
            raise RuntimeError(f"dequantize kernel rejected its inputs (code {rc})")
        return w
    return dequantize_rows(qw, torch.arange(qw.n))


def dequantize_rows(qw: Quantized, rows: torch.Tensor) -> torch.Tensor:
    """Output rows `rows` (int64 indices) of the float32 weight, [len(rows), K], with torch
    ops: `dequantize`'s values for those rows without building the whole matrix (and,
    over every row, its path where the native kernels are missing)."""
    nb, lane = rows // COLS, rows % COLS  # a row's column block and its lane in it
    if qw.bits == 8:
        q = qw.q.view(torch.int8).reshape(qw.n // COLS, qw.k, COLS)[nb, :, lane].float()
    else:
        b = qw.q.reshape(qw.n // COLS, qw.k // 2, COLS)[nb, :, lane]
        q = torch.stack((b & 15, b >> 4), dim=2).reshape(len(rows), qw.k).float()
    w = q * qw.scale[nb, :, lane].repeat_interleave(qw.group, dim=1)
    if qw.min is not None:
        w = w + qw.min[nb, :, lane].repeat_interleave(qw.group, dim=1)
    return w


class QuantLinear(nn.Module):
    """y = x W^T + b with a Quantized W.

    float32 activations: the native kernel for decode-sized batches, W dequantized for
    larger ones. bfloat16 activations (a bf16 model on a CPU with native bf16, see
    `quant_dense.attach_dense`): batches of at most `kernel_rows` rows go to the packed
    ints, which read a fraction of the bytes (the bf16-pair kernel where the layer has
    `bf16_pairs`, else the float32 one); larger ones, which are compute-bound, go to the
    AMX tiles (int8 layers, up to `amx_rows`) or `dense`, a bf16 copy of W packed for
    oneDNN."""

    def __init__(self, qw: Quantized, bias: torch.Tensor | None):
        super().__init__()
        self.qw = qw
        self.bias = None if bias is None else bias.detach().float().contiguous()
        self.out_features, self.in_features = qw.n, qw.k
        self.lib = load_kernels()
        self.max_rows = self.lib.quant_linear_max_rows() if self.lib is not None else 0
        self.dense: nn.Module | None = None
        self.kernel_rows = self.max_rows
        # bf16 models with native bf16: int4 as bf16 pairs (kernels/quant_bf16.c)
        self.bf16_pairs: tuple[torch.Tensor, torch.Tensor] | None = None
        # int4 with inputs rounded to int8 (kernels/quant_a8.c): float16 scales and
        # minimums, see `round_inputs_to_int8`
        self.fp16_scales: tuple[torch.Tensor, torch.Tensor | None] | None = None
        # bf16 inputs: the kernel's float32 output is returned as is, not rounded to bf16
        # (the lm_head: logits 16-32 apart by 0.125 in bf16 tie where float32 does not)
        self.float_out = False
        # bf16 models on AMX: int8 batches above kernel_rows and up to here run on the
        # tiles (kernels/quant_i8amx.c) instead of the dense copy (attach_dense)
        self.amx_rows = 0

    @property
    def a8(self) -> bool:
        return self.fp16_scales is not None

    def round_inputs_to_int8(self) -> bool:
        """Switch this int4 layer to int8 inputs (kernels/quant_a8.c), where its scales and
        minimums fit float16 (to 2^-10 relative: exact for a Q4_1 GGUF's, stored so), which
        the kernel streams; the float32 copies (`weight()`) take the same values. Returns
        whether it switched."""
        qw = self.qw
        if qw.bits != 4 or qw.group != GROUP:
            raise ValueError("int8 inputs are for int4 layers in groups of 32")
        if not int8_activations_available():
            raise ValueError("int8 inputs need the native CPU kernels with AVX2")
        scale16 = qw.scale.half().contiguous()
        min16 = None if qw.min is None else qw.min.half().contiguous()
        if not _fits(qw.scale, scale16) or (qw.min is not None and min16 is not None
                                            and not _fits(qw.min, min16)):
            return False
        self.qw = dataclasses.replace(qw, scale=scale16.float(),
                                      min=None if min16 is None else min16.float())
        self.fp16_scales = (scale16, min16)
        return True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, self.in_features)
        rows = x2.shape[0]
        if x2.dtype != torch.float32 and (self.dense is None or x2.dtype != torch.bfloat16):
            raise ValueError("quantized linears take float32 activations (bfloat16 only "
                             "with a dense copy, see attach_dense)")
        if rows == 0:
            y = x2.new_empty((0, self.out_features))
        elif self.dense is not None and x2.dtype == torch.bfloat16:
            if rows > self.kernel_rows:
                tiles = self._amx_kernel(x2) if rows <= self.amx_rows else None
                y = self.dense(x2) if tiles is None else tiles
            else:
                y = self._bf16_kernel(x2.float().contiguous())
                y = y if self.float_out else y.to(torch.bfloat16)
        elif rows > self.max_rows and not self.a8:  # the int8-input kernel takes any batch
            y = F.linear(x2, self.weight(), self.bias)
        else:
            y = self._kernel(x2.contiguous())
        return y.reshape(*shape[:-1], self.out_features)

    def _kernel(self, x: torch.Tensor) -> torch.Tensor:
        qw, lib = self.qw, self.lib
        assert lib is not None
        y = torch.empty((x.shape[0], qw.n), dtype=torch.float32)
        if self.fp16_scales is not None:
            scale16, min16 = self.fp16_scales
            rc = lib.quant_linear_i4a8(
                x.data_ptr(), x.shape[0], x.stride(0), qw.q.data_ptr(), scale16.data_ptr(),
                None if min16 is None else min16.data_ptr(),
                None if self.bias is None else self.bias.data_ptr(),
                qw.n, qw.k, qw.group, y.data_ptr(), y.stride(0))
            if rc != 0:
                raise RuntimeError(f"int8-input linear kernel rejected its inputs (code {rc})")
            return y
        rc = lib.quant_linear_f32(
            x.data_ptr(), x.shape[0], x.stride(0), qw.q.data_ptr(), qw.scale.data_ptr(),
            None if qw.min is None else qw.min.data_ptr(),
            None if self.bias is None else self.bias.data_ptr(),
            qw.n, qw.k, qw.group, qw.bits, y.data_ptr(), y.stride(0))
        if rc != 0:
            raise RuntimeError(f"quantized linear kernel rejected its inputs (code {rc})")
        return y

    def _bf16_kernel(self, x: torch.Tensor) -> torch.Tensor:
        """A bf16 model's small batch: the bf16-pair kernel where the layer has it (inputs
        rounded to bf16, float32 accumulation), else the float32 one."""
        assert self.lib is not None
        if self.bf16_pairs is None or x.shape[0] > self.lib.quant_i4bf16_max_rows():
            return self._kernel(x)
        qw, lib = self.qw, self.lib
        pairs, min128 = self.bf16_pairs
        y = torch.empty((x.shape[0], qw.n), dtype=torch.float32)
        rc = lib.quant_linear_i4bf16(
            x.data_ptr(), x.shape[0], x.stride(0), pairs.data_ptr(), qw.scale.data_ptr(),
            min128.data_ptr(), None if qw.min is None else qw.min.data_ptr(),
            None if self.bias is None else self.bias.data_ptr(),
            qw.n, qw.k, qw.group, y.data_ptr(), y.stride(0))
        if rc != 0:
            raise RuntimeError(f"bf16-pair linear kernel rejected its inputs (code {rc})")
        return y

    def _amx_kernel(self, x: torch.Tensor) -> torch.Tensor | None:
        """An int8 layer's batch on AMX tiles (kernels/quant_i8amx.c: bf16 inputs, exact
        weights, float32 sums), float32 for the head and bf16 otherwise; None where the
        kernel declines (AMX turned off since), for the dense copy to take it."""
        qw, lib = self.qw, self.lib
        assert lib is not None
        xf = x.float().contiguous()
        y = torch.empty((xf.shape[0], qw.n), dtype=torch.float32)
        rc = lib.quant_linear_i8amx(
            xf.data_ptr(), xf.shape[0], xf.stride(0), qw.q.data_ptr(), qw.scale.data_ptr(),
            None if self.bias is None else self.bias.data_ptr(), qw.n, qw.k, qw.group,
            y.data_ptr(), y.stride(0))
        if rc == 3:
            return None
        if rc != 0:
            raise RuntimeError(f"int8 AMX linear kernel rejected its inputs (code {rc})")
        return y if self.float_out else y.to(torch.bfloat16)

    def weight(self) -> torch.Tensor:
        """The float32 weight, rebuilt for a large batch (not kept: that is the point)."""
        return dequantize(self.qw)


def _is_exact(weight: torch.Tensor, qw: Quantized) -> bool:
    w = weight.detach().float()
    err = (dequantize(qw) - w).abs().max().item()
    return err <= EXACT_RTOL * max(w.abs().max().item(), 1e-30)


def _choose(weight: torch.Tensor, profile: str, is_head: bool) -> Quantized | None:
    """The packed weight for one layer under `profile`, or None to keep it float."""
    n, k = weight.shape
    if n % COLS or k % GROUP:
        return None
    bits = 8 if profile == "int8" or is_head else 4
    if profile != "auto":
        return quantize(weight, bits)
    for candidate in ((8,) if is_head else (4, 8)):
        qw = quantize(weight, candidate)
        if _is_exact(weight, qw):
            return qw
    return None


def _fits(t: torch.Tensor, half: torch.Tensor) -> bool:
    """float16 holds `t` to 2^-10 relative (no overflow, no subnormal loss)."""
    return bool(((half.float() - t).abs() <= t.abs() * 2**-10).all())


def round_activations(x: torch.Tensor, group: int = GROUP) -> torch.Tensor:
    """x [rows, K] as an int8-activation layer sees it (kernels/quant_a8.c, the same float32
    steps): per row and group, d = max|x| / 127, and round(x * (127 / max|x|)) * d."""
    rows, k = x.shape
    g = x.float().reshape(rows, k // group, group)
    amax = g.abs().amax(-1, keepdim=True)
    q = torch.round(g * torch.where(amax > 0, 127 / amax, 0)).clamp_(-127, 127)
    return (q * (amax / 127)).reshape(rows, k)


def int8_activations_available() -> bool:
    """Whether the kernels run int4 x int8 dot products here (AVX2 and up)."""
    lib = load_kernels()
    return lib is not None and bool(lib.quant_a8_available())


def quantize_model(model: nn.Module, profile: str, int8_activations: bool = False) -> str:
    """Swap the model's nn.Linear layers for QuantLinear under `profile`, in place; with
    `int8_activations`, int4 layers round their inputs to int8 (kernels/quant_a8.c).
    Returns a summary for logs and the model's cache identity, e.g. "int4a8x210+int8x1"."""
    if profile not in PROFILES:
        raise ValueError(f"quantization must be one of {PROFILES}, got {profile!r}")
    counts: dict[str, int] = {}
    if profile == "none":
        return "none"
    int8_activations = int8_activations and int8_activations_available()
    head = getattr(model, "lm_head", None)
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if not isinstance(child, nn.Linear):
                continue
            qw = _choose(child.weight, profile, child is head)
            label = "float" if qw is None else f"int{qw.bits}"
            if qw is not None:
                layer = QuantLinear(qw, child.bias)
                layer.float_out = child is head  # logits: no bf16 rounding (no false ties)
                if (int8_activations and qw.bits == 4 and qw.group == GROUP
                        and layer.round_inputs_to_int8()):
                    label += "a8"
                setattr(parent, name, layer)
            counts[label] = counts.get(label, 0) + 1
    summary = "+".join(f"{label}x{n}" for label, n in sorted(counts.items()))
    if load_kernels() is None and any(label != "float" for label in counts):
        log.warning("quantized linears without native kernels dequantize on every call")
    return summary if any(label != "float" for label in counts) else "none"


def linear_weight_bytes(model: nn.Module) -> int:
    """Bytes of linear-layer weights one decode step streams (lm_head included): packed
    ints and scales for quantized layers (not their dense bf16 copies, which only larger
    batches read), the weight of float and oneDNN-packed ones (model/packed.py)."""
    modules = list(model.modules())
    dense = {id(m.dense) for m in modules if isinstance(m, QuantLinear)}
    total = 0
    for module in modules:
        if isinstance(module, QuantLinear) and module.fp16_scales is not None:
            total += module.qw.q.numel() + sum(
                t.numel() * 2 for t in module.fp16_scales if t is not None)
        elif isinstance(module, QuantLinear):
            total += module.qw.nbytes
        elif isinstance(module, nn.Linear):
            total += module.weight.numel() * module.weight.element_size()
        elif id(module) not in dense:
            packed = getattr(module, "packed", None)
            if isinstance(packed, torch.Tensor):
                total += packed.numel() * packed.element_size()
    return total
