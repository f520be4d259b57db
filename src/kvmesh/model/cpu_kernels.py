"""Native CPU kernels, compiled once with the system C compiler and loaded with ctypes.

`kernels/paged_decode.c` is plain C (no torch headers), so it builds in about a second
with `cc -O3 -march=native -fopenmp`. The shared object is cached under
`$KVMESH_CACHE_DIR/kernels/`, named by a hash of the source, flags and machine, and built
with a temp file + rename so concurrent processes never see half a library. OpenMP
resolves to the libgomp torch already loaded, so the kernel shares torch's thread pool
settings. Without a compiler, or on a build failure, `decode_kernel()` returns None and
attention falls back to gather + SDPA.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from importlib import resources
from pathlib import Path

import torch

from kvmesh.model.registry import cache_dir

log = logging.getLogger(__name__)

SOURCE = "paged_decode.c"
FLAGS = ["-O3", "-march=native", "-fopenmp", "-fPIC", "-shared", "-std=gnu11"]
_SYMBOLS = {
    torch.bfloat16: "paged_decode_bf16",
    torch.float16: "paged_decode_f16",
    torch.float32: "paged_decode_f32",
}
_I64, _PTR = ctypes.c_int64, ctypes.c_void_p
_ARGTYPES = [_PTR, _I64, _PTR, _PTR, _I64, _PTR, _I64, _PTR, _PTR,
             _I64, _I64, _I64, _I64, _I64, ctypes.c_float]
_lock = threading.Lock()
_loaded: dict[str, ctypes.CDLL | None] = {}


def _source() -> bytes:
    return resources.files("kvmesh.model.kernels").joinpath(SOURCE).read_bytes()


def _compiler() -> str | None:
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and shutil.which(name):
            return name
    return None


def build(compiler: str | None = None) -> Path:
    """Compile the kernel library if no cached build exists; return its path."""
    cc = compiler or _compiler()
    if cc is None:
        raise RuntimeError("no C compiler found (set CC, or install gcc)")
    src = _source()
    key = hashlib.sha256(
        src + " ".join([cc, *FLAGS, platform.machine(), platform.node()]).encode()
    ).hexdigest()[:16]
    out_dir = cache_dir() / "kernels"
    target = out_dir / f"paged_decode-{key}.so"
    if target.exists():
        return target
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_dir) as tmp:
        c_file = Path(tmp) / SOURCE
        c_file.write_bytes(src)
        so_file = Path(tmp) / "kernel.so"
        proc = subprocess.run([cc, *FLAGS, str(c_file), "-o", str(so_file)],
                              capture_output=True, text=True, timeout=120)
        if proc.returncode != 0:
            raise RuntimeError(f"compiling {SOURCE} failed: {proc.stderr.strip()[-2000:]}")
        os.replace(so_file, target)
    return target


def _load() -> ctypes.CDLL | None:
    with _lock:
        if "lib" not in _loaded:
            try:
                lib = ctypes.CDLL(str(build()))
                for symbol in _SYMBOLS.values():
                    fn = getattr(lib, symbol)
                    fn.argtypes, fn.restype = _ARGTYPES, ctypes.c_int
                _loaded["lib"] = lib
            except (RuntimeError, OSError, subprocess.SubprocessError) as exc:
                log.warning("CPU decode-attention kernel unavailable, using SDPA: %s", exc)
                _loaded["lib"] = None
        return _loaded["lib"]


class PagedDecodeKernel:
    """Decode attention for one query token per sequence over a layer's paged K/V views."""

    def __init__(self, lib: ctypes.CDLL, dtype: torch.dtype):
        self.fn = getattr(lib, _SYMBOLS[dtype])
        self.dtype = dtype

    def __call__(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                 tables: torch.Tensor, lengths: torch.Tensor, scale: float) -> torch.Tensor:
        """q [S, Hq, D] (heads contiguous); k/v_cache [blocks, block, H, D] views whose
        rows are contiguous per block; tables [S, W] and lengths [S] int64, contiguous."""
        num, heads, dim = q.shape
        _, block_size, kv_heads, _ = k_cache.shape
        if q.stride(2) != 1 or q.stride(1) != dim or q.dtype != self.dtype:
            raise ValueError("query must be [S, H, D] with contiguous heads")
        for cache in (k_cache, v_cache):
            if cache.stride()[1:] != (kv_heads * dim, dim, 1) or cache.dtype != self.dtype:
                raise ValueError("cache view must be [blocks, block, H, D], rows contiguous")
        for index in (tables, lengths):
            if index.dtype != torch.int64 or not index.is_contiguous():
                raise ValueError("block tables and lengths must be contiguous int64")
        if tables.shape[0] != num or lengths.shape != (num,):
            raise ValueError("one block table row and one length per query")
        out = torch.empty((num, heads, dim), dtype=q.dtype)
        rc = self.fn(q.data_ptr(), q.stride(0), k_cache.data_ptr(), v_cache.data_ptr(),
                     k_cache.stride(0), tables.data_ptr(), tables.shape[1], lengths.data_ptr(),
                     out.data_ptr(), num, heads, kv_heads, dim, block_size, scale)
        if rc != 0:
            raise RuntimeError("paged decode kernel rejected its inputs")
        return out


def decode_kernel(dtype: torch.dtype, device: torch.device) -> PagedDecodeKernel | None:
    """The native decode kernel for this KV dtype on the CPU, or None (use SDPA)."""
    if device.type != "cpu" or dtype not in _SYMBOLS:
        return None
    lib = _load()
    return PagedDecodeKernel(lib, dtype) if lib is not None else None


def select_decode_kernel(backend: str, dtype: torch.dtype, kv_dtype: torch.dtype,
                         device: torch.device) -> PagedDecodeKernel | None:
    """Apply the `attention_backend` setting: None means gather + SDPA.

    `auto` takes the kernel where it can be had and SDPA elsewhere; `native` asks for the
    kernel and fails loudly when it cannot have it.
    """
    if backend == "sdpa":
        return None
    usable = device.type == "cpu" and dtype == kv_dtype and dtype in _SYMBOLS
    kernel = decode_kernel(dtype, device) if usable else None
    if kernel is None and backend == "native":
        raise ValueError(
            "attention_backend=native needs the CPU device, equal compute and KV dtypes, and "
            "a C compiler (see the log); use auto or sdpa"
        )
    return kernel
