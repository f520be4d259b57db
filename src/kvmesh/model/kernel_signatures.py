"""ctypes signatures of the native kernels' entry points beyond decode and prefill
attention (cpu_kernels.py sets those): the quantized linears, verify attention, the logits
helper and the bf16 RMSNorm and rope (model/native_ops.py)."""

from __future__ import annotations

import ctypes

_I64, _PTR = ctypes.c_int64, ctypes.c_void_p


def native_signatures(lib: ctypes.CDLL) -> None:
    """Argument and result types of every entry point named in the module docstring."""
    lib.kernels_set_prefetch.argtypes = [_I64]
    lib.kernels_set_prefetch.restype = _I64
    lib.quant_linear_f32.argtypes = [_PTR, _I64, _I64, _PTR, _PTR, _PTR, _PTR,
                                     _I64, _I64, _I64, _I64, _PTR, _I64]
    lib.quant_linear_f32.restype = ctypes.c_int
    lib.quant_dequantize_f32.argtypes = [_PTR, _PTR, _PTR, _I64, _I64, _I64, _I64, _PTR]
    lib.quant_dequantize_f32.restype = ctypes.c_int
    lib.quant_linear_max_rows.restype = ctypes.c_int
    lib.quant_linear_i4bf16.argtypes = [_PTR, _I64, _I64, _PTR, _PTR, _PTR, _PTR, _PTR,
                                        _I64, _I64, _I64, _PTR, _I64]
    lib.quant_linear_i4bf16.restype = ctypes.c_int
    lib.quant_i4bf16_available.restype = ctypes.c_int
    lib.quant_i4bf16_max_rows.restype = ctypes.c_int
    lib.quant_i4bf16_use_amx.argtypes = [ctypes.c_int]
    lib.quant_i4bf16_use_amx.restype = ctypes.c_int
    lib.quant_i4bf16_amx_built.restype = ctypes.c_int
    lib.quant_i4bf16_use_pipe.argtypes = [ctypes.c_int]
    lib.quant_i4bf16_use_pipe.restype = ctypes.c_int
    lib.quant_i4bf16_amx_calls.restype = ctypes.c_int64
    lib.quant_linear_i8amx.argtypes = [_PTR, _I64, _I64, _PTR, _PTR, _PTR,
                                       _I64, _I64, _I64, _PTR, _I64]
    lib.quant_linear_i8amx.restype = ctypes.c_int
    lib.quant_i8amx_max_rows.restype = ctypes.c_int
    lib.paged_verify_bf16.argtypes = [_PTR, _I64, _PTR, _PTR, _I64, _PTR, _I64, _I64, _I64,
                                      _PTR, _I64, _I64, _I64, _I64, ctypes.c_float]
    lib.paged_verify_bf16.restype = ctypes.c_int
    lib.paged_verify_available.restype = ctypes.c_int
    lib.paged_verify_calls.restype = ctypes.c_int64
    lib.quant_linear_set_batch_rows.argtypes = [ctypes.c_int]
    lib.quant_linear_set_batch_rows.restype = ctypes.c_int
    lib.quant_i4bf16_set_amx_min_rows.argtypes = [ctypes.c_int]
    lib.quant_i4bf16_set_amx_min_rows.restype = ctypes.c_int
    lib.quant_i4bf16_set_deq_min_rows.argtypes = [ctypes.c_int]
    lib.quant_i4bf16_set_deq_min_rows.restype = ctypes.c_int
    lib.quant_i4bf16_deq_min_rows.restype = ctypes.c_int
    lib.decode_layer_set_verify_min_rows.argtypes = [ctypes.c_int]
    lib.decode_layer_set_verify_min_rows.restype = ctypes.c_int
    lib.quant_linear_i4a8.argtypes = [_PTR, _I64, _I64, _PTR, _PTR, _PTR, _PTR,
                                      _I64, _I64, _I64, _PTR, _I64]
    lib.quant_linear_i4a8.restype = ctypes.c_int
    lib.quant_a8_available.restype = ctypes.c_int
    lib.near_top_bf16.argtypes = [_PTR, _I64, _I64, ctypes.c_float, _PTR, _PTR, _I64]
    lib.near_top_bf16.restype = ctypes.c_int64
    lib.rmsnorm_bf16.argtypes = [_PTR, _I64, _I64, _PTR, ctypes.c_float, _PTR]
    lib.rmsnorm_bf16.restype = ctypes.c_int
    lib.rope_bf16.argtypes = [_PTR, _I64, _I64, _I64, _I64, _PTR, _PTR, _PTR]
    lib.rope_bf16.restype = ctypes.c_int
