"""Native CPU kernels, compiled once with the system C compiler and loaded with ctypes.

`kernels/paged_decode.c` (decode attention, every dtype), `kernels/paged_prefill.c`
(causal prefill attention, bf16), `kernels/small_linear.c` (bf16 linears for decode-sized
batches; both need AVX-512 BF16), `kernels/quant_linear.c` (int8/int4 weight-only linears,
every ISA), `kernels/quant_bf16.c` (int4 linears of bf16 models, AVX-512 BF16) and
`kernels/decode_layer.c` (a whole decoder layer per call), `kernels/near_top.c` (bf16
logits to float32 with each row's leaders found, model/logits.py) and `kernels/rows_bf16.c`
(RMSNorm and rope for bf16 prefill steps, model/native_ops.py) are plain C with no torch headers,
so they build in about a second with `cc -O3 -march=native -fopenmp`, narrowed to the ISA
level that `cpu_isa` selects
(`KVMESH_CPU_ISA=avx2` builds the AVX2 variants on an AVX-512 machine). The shared object is
cached under `$KVMESH_CACHE_DIR/kernels/`, named by a hash of the sources, flags and CPU, and
built with
a temp file + rename so concurrent processes never see half a library. OpenMP resolves to
the libgomp torch already loaded, so the kernels share torch's thread pool settings.
Without a compiler, or on a build failure, every accessor here returns None and the model
keeps torch's paths (gather + SDPA, oneDNN), with one warning."""

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
import time
from importlib import resources
from pathlib import Path

import torch

from kvmesh.model import cpu_isa
from kvmesh.model.kernel_signatures import native_signatures
from kvmesh.model.registry import cache_dir

log = logging.getLogger(__name__)

SOURCES = ("vec_math.h", "paged_decode.c", "paged_prefill.c", "small_linear.c",
           "quant_linear.c", "quant_a8.c", "quant_bf16.c", "quant_deq_amx.c", "quant_i8amx.c",
           "decode_layer.c", "near_top.c", "paged_verify.c", "rows_bf16.c")
FLAGS = ["-O3", "-march=native", "-fopenmp", "-fPIC", "-shared", "-std=gnu11", "-Wno-psabi"]
_SYMBOLS = {
    torch.bfloat16: "paged_decode_bf16",
    torch.float16: "paged_decode_f16",
    torch.float32: "paged_decode_f32",
}
_I64, _PTR = ctypes.c_int64, ctypes.c_void_p
_ARGTYPES = [_PTR, _I64, _PTR, _PTR, _I64, _PTR, _I64, _PTR, _PTR,
             _I64, _I64, _I64, _I64, _I64, ctypes.c_float]
AMX_ENV = "KVMESH_AMX"  # "0": the kernels keep off the AMX tiles (int4/int8, verify/prefill)
PREFETCH_ENV = "KVMESH_PREFETCH"  # bytes the linears prefetch ahead of their weights; 0: off
DEFAULT_PREFETCH = 2048  # set at load (kv_prefetch_dist in quant_linear.c starts the same)
_lock = threading.Lock()
_loaded: dict[str, ctypes.CDLL | None] = {}


def _sources() -> dict[str, bytes]:
    files = resources.files("kvmesh.model.kernels")
    return {name: files.joinpath(name).read_bytes() for name in SOURCES}


def _compiler() -> str | None:
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and shutil.which(name):
            return name
    return None


def _cpu_signature() -> str:
    """What -march=native depends on: the CPU model and flags (not the host name, which
    changes with every container)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor() or platform.node()
    wanted = ("model name", "flags", "Features", "CPU part")
    return "|".join(sorted({ln for ln in lines if ln.split(":")[0].strip() in wanted}))


def build(compiler: str | None = None, isa: str | None = None) -> Path:
    """Compile the kernel library for `isa` (default: cpu_isa.level(), which follows
    KVMESH_CPU_ISA) if no cached build exists; return its path."""
    cc = compiler or _compiler()
    if cc is None:
        raise RuntimeError("no C compiler found (set CC, or install gcc)")
    flags = [*FLAGS, *cpu_isa.compile_flags(isa or cpu_isa.level())]
    sources = _sources()
    key = hashlib.sha256(
        b"".join(sources.values())
        + " ".join([cc, *flags, platform.machine(), _cpu_signature()]).encode()
    ).hexdigest()[:16]
    out_dir = cache_dir() / "kernels"
    target = out_dir / f"attention-{key}.so"
    if target.exists():
        os.utime(target)  # in use: pruning goes by the last use
        return target
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_dir) as tmp:
        c_files = []
        for name, text in sources.items():
            (Path(tmp) / name).write_bytes(text)
            if name.endswith(".c"):
                c_files.append(str(Path(tmp) / name))
        so_file = Path(tmp) / "kernel.so"
        proc = subprocess.run([cc, *flags, *c_files, "-o", str(so_file)],
                              capture_output=True, text=True, timeout=120)
        if proc.returncode != 0:
            raise RuntimeError(f"compiling the CPU kernels failed: {proc.stderr.strip()[-2000:]}")
        os.replace(so_file, target)
    prune_builds(out_dir, keep=target)
    return target


def prune_builds(out_dir: Path, keep: Path, keep_newer_than_s: float = 3600.0) -> int:
    """Delete older kernel builds (other sources or CPUs) beside `keep`. Builds touched in
    the last `keep_newer_than_s` stay (another ISA level built by this machine, or a
    process that is about to load one). Processes that loaded one keep their mapping; a
    host with another CPU sharing the directory rebuilds in about a second. Returns how
    many were removed."""
    removed = 0
    now = time.time()
    for old in out_dir.glob("attention-*.so"):
        try:
            recent = now - old.stat().st_mtime < keep_newer_than_s
        except OSError:
            continue
        if old != keep and not recent:
            old.unlink(missing_ok=True)
            removed += 1
    return removed


def load() -> ctypes.CDLL | None:
    """The kernel library for the ISA level in force (built on first use), or None."""
    isa = cpu_isa.level()
    with _lock:
        if isa not in _loaded:
            try:
                lib = ctypes.CDLL(str(build(isa=isa)))
                for symbol in (*_SYMBOLS.values(), "paged_prefill_bf16"):
                    fn = getattr(lib, symbol)
                    fn.argtypes, fn.restype = _ARGTYPES, ctypes.c_int
                lib.paged_prefill_available.restype = ctypes.c_int
                lib.small_linear_available.restype = ctypes.c_int
                lib.small_linear_pack_bf16.argtypes = [_PTR, _I64, _I64, _PTR]
                lib.small_linear_pack_bf16.restype = ctypes.c_int
                lib.small_linear_bf16.argtypes = [_PTR, _I64, _I64, _PTR, _PTR, _I64, _I64, _PTR]
                lib.small_linear_bf16.restype = ctypes.c_int
                native_signatures(lib)
                amx = _use_amx(lib, isa)
                _set_prefetch(lib)
                _loaded[isa] = lib
                log.info("native CPU kernels built for ISA level %s%s", isa,
                         " (int4 batches on AMX tiles)" if amx else "")
            except (RuntimeError, OSError, subprocess.SubprocessError) as exc:
                log.warning("native CPU kernels unavailable, using SDPA and oneDNN: %s", exc)
                _loaded[isa] = None
        return _loaded[isa]


def _use_amx(lib: ctypes.CDLL, isa: str) -> bool:
    """Turn the AMX tile path on unless KVMESH_AMX=0; say why where the CPU has AMX and
    the path stays off."""
    rc = lib.quant_i4bf16_use_amx(int(os.environ.get(AMX_ENV, "1") != "0"))
    if rc < 0:
        log.warning("Linux refused the AMX tile state (%s): int4 batches of bf16 models stay "
                    "on AVX-512", os.strerror(-rc))
    elif (rc == 0 and isa == "avx512_bf16" and cpu_isa.has_amx()
          and not lib.quant_i4bf16_amx_built()):
        log.info("this CPU has AMX, but the C compiler does not target it (needs GCC 11+ "
                 "or clang 12+): int4 batches of bf16 models stay on AVX-512")
    return rc == 1


def _set_prefetch(lib: ctypes.CDLL) -> None:
    """KVMESH_PREFETCH=N: the linears prefetch N bytes ahead of their weights (default 2048,
    0 off; for A/B runs, see benchmarks/decode_step.py)."""
    value = os.environ.get(PREFETCH_ENV)
    dist = DEFAULT_PREFETCH
    try:
        dist = DEFAULT_PREFETCH if value is None else max(0, int(value))
    except ValueError:
        log.warning("%s=%r is not a number of bytes: the default stays", PREFETCH_ENV, value)
    lib.kernels_set_prefetch(dist)


def _check_cache(k_cache: torch.Tensor, v_cache: torch.Tensor, dtype: torch.dtype) -> None:
    _, _, kv_heads, dim = k_cache.shape
    for cache in (k_cache, v_cache):
        if cache.stride()[1:] != (kv_heads * dim, dim, 1) or cache.dtype != dtype:
            raise ValueError("cache view must be [blocks, block, H, D], rows contiguous")


def _check_index(*tensors: torch.Tensor) -> None:
    for index in tensors:
        if index.dtype != torch.int64 or not index.is_contiguous():
            raise ValueError("block tables, lengths and segments must be contiguous int64")


def _check_query(q: torch.Tensor, dtype: torch.dtype) -> None:
    if q.stride(2) != 1 or q.stride(1) != q.shape[2] or q.dtype != dtype:
        raise ValueError("query must be [S, H, D] with contiguous heads")


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
        _check_query(q, self.dtype)
        _check_cache(k_cache, v_cache, self.dtype)
        _check_index(tables, lengths)
        if tables.shape[0] != num or lengths.shape != (num,):
            raise ValueError("one block table row and one length per query")
        out = torch.empty((num, heads, dim), dtype=q.dtype)
        rc = self.fn(q.data_ptr(), q.stride(0), k_cache.data_ptr(), v_cache.data_ptr(),
                     k_cache.stride(0), tables.data_ptr(), tables.shape[1], lengths.data_ptr(),
                     out.data_ptr(), num, heads, kv_heads, dim, block_size, scale)
        if rc != 0:
            raise RuntimeError("paged decode kernel rejected its inputs")
        return out


class PagedPrefillKernel:
    """Causal attention for prefill chunks whose K/V (prefix and chunk) are in the cache.

    Where the CPU has AMX, each chunk (one sequence's consecutive tokens) runs on the tiles
    (kernels/paged_verify.c, the verify kernel of speculative decoding; its attention
    weights are rounded to bf16, as flash attention does): one 4,000-token prompt prefilled
    at 1,916 tok/s there against 596 with the AVX-512 BF16 dot products of
    kernels/paged_prefill.c (`prefill_cpu.json`), which run elsewhere, and wherever the
    tiles decline (a shape, no memory, AMX off since) or `use_tiles` is False."""

    def __init__(self, lib: ctypes.CDLL):
        self.fn = lib.paged_prefill_bf16
        self.lib = lib
        self.dtype = torch.bfloat16
        self.use_tiles = True

    def __call__(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                 tables: torch.Tensor, segments: torch.Tensor, out: torch.Tensor,
                 scale: float) -> None:
        """q and out [T, Hq, D] (out contiguous); tables [S, W]; segments [S, 3] rows of
        (first token in q, chunk length, context length). Writes the segments' rows of out."""
        _, heads, dim = q.shape
        _, block_size, kv_heads, _ = k_cache.shape
        _check_query(q, self.dtype)
        _check_cache(k_cache, v_cache, self.dtype)
        _check_index(tables, segments)
        if not out.is_contiguous() or out.shape != q.shape or out.dtype != self.dtype:
            raise ValueError("out must be a contiguous tensor shaped like q")
        if segments.shape != (tables.shape[0], 3):
            raise ValueError("one block table row and one (start, length, context) per segment")
        segs = segments.tolist()
        if any(first < 0 or length < 1 or first + length > q.shape[0] or context < length
               for first, length, context in segs):
            raise ValueError("a segment lies outside q, or its context is shorter than it")
        if self.use_tiles and self._on_tiles(q, k_cache, v_cache, tables, segs, out, scale):
            return
        rc = self.fn(q.data_ptr(), q.stride(0), k_cache.data_ptr(), v_cache.data_ptr(),
                     k_cache.stride(0), tables.data_ptr(), tables.shape[1], segments.data_ptr(),
                     segments.shape[0], out.data_ptr(), heads, kv_heads, dim, block_size, scale)
        if rc != 0:
            raise RuntimeError(f"paged prefill kernel rejected its inputs (code {rc})")

    def _on_tiles(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                  tables: torch.Tensor, segs: list[list[int]], out: torch.Tensor,
                  scale: float) -> bool:
        """Each segment on the AMX tiles; False where they decline (not built or AMX off, a
        block size that is not a multiple of 16, no memory; they decline at the first
        segment but for memory): then the caller's kernel does every segment again."""
        _, heads, dim = q.shape
        _, block_size, kv_heads, _ = k_cache.shape
        if block_size % 16 or not self.lib.paged_verify_available():
            return False
        size = q.element_size()
        for s, (first, length, context) in enumerate(segs):
            rc = self.lib.paged_verify_bf16(
                q.data_ptr() + first * q.stride(0) * size, q.stride(0), k_cache.data_ptr(),
                v_cache.data_ptr(), k_cache.stride(0),
                tables.data_ptr() + s * tables.stride(0) * tables.element_size(),
                tables.shape[1], context - length + 1, length,
                out.data_ptr() + first * heads * dim * size, heads, kv_heads, dim, block_size,
                scale)
            if rc != 0:  # 2: a context past the table (the caller's kernel refuses it) or
                return False  # no memory (the caller's kernel needs little)
        return True


class SmallLinear:
    """y = x W^T + b for decode-sized batches (rows <= MAX_ROWS), bf16, from a packed copy of
    W that streams once per call (kernels/small_linear.c). Larger batches are not its job."""

    MAX_ROWS = 16

    def __init__(self, lib: ctypes.CDLL, weight: torch.Tensor, bias: torch.Tensor | None):
        n, k = weight.shape
        self.fn = lib.small_linear_bf16
        self.n, self.k = n, k
        self.packed = torch.empty(n * k, dtype=torch.bfloat16)
        w = weight.detach().contiguous()
        if lib.small_linear_pack_bf16(w.data_ptr(), n, k, self.packed.data_ptr()) != 0:
            raise ValueError(f"cannot pack a {n}x{k} weight")
        self.bias = None if bias is None else bias.detach().float().contiguous()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x = x.contiguous()
        rows = x.shape[0]
        out = torch.empty((rows, self.n), dtype=torch.bfloat16)
        bias = self.bias.data_ptr() if self.bias is not None else None
        if self.fn(x.data_ptr(), rows, self.k, self.packed.data_ptr(), bias, self.n, self.k,
                   out.data_ptr()) != 0:
            raise RuntimeError("small-batch linear kernel rejected its inputs")
        return out


def small_linear(weight: torch.Tensor, bias: torch.Tensor | None) -> SmallLinear | None:
    """The small-batch kernel for this bf16 CPU weight, or None where it does not apply."""
    n, k = weight.shape
    if weight.device.type != "cpu" or weight.dtype != torch.bfloat16 or n % 16 or k % 2:
        return None
    lib = load()
    if lib is None or not lib.small_linear_available():
        return None
    return SmallLinear(lib, weight, bias)


PREFILL_HEAD_DIMS = (64, 128)


def prefill_kernel(dtype: torch.dtype, device: torch.device,
                   head_dim: int) -> PagedPrefillKernel | None:
    """The native prefill kernel (bf16, head_dim 64/128, AVX-512 BF16 hosts), or None."""
    if device.type != "cpu" or dtype != torch.bfloat16 or head_dim not in PREFILL_HEAD_DIMS:
        return None
    lib = load()
    if lib is None or not lib.paged_prefill_available():
        return None
    return PagedPrefillKernel(lib)


def decode_kernel(dtype: torch.dtype, device: torch.device) -> PagedDecodeKernel | None:
    """The native decode kernel for this KV dtype on the CPU, or None (use SDPA)."""
    if device.type != "cpu" or dtype not in _SYMBOLS:
        return None
    lib = load()
    return PagedDecodeKernel(lib, dtype) if lib is not None else None


def select_kernels(backend: str, dtype: torch.dtype, kv_dtype: torch.dtype,
                   device: torch.device,
                   head_dim: int) -> tuple[PagedDecodeKernel | None, PagedPrefillKernel | None]:
    """Apply the `attention_backend` setting: (decode, prefill) kernels, None meaning SDPA.

    `auto` takes each kernel where it can be had; `native` requires the decode kernel and
    fails loudly without it (the prefill kernel covers bf16 only, SDPA does the rest).
    """
    decode = select_decode_kernel(backend, dtype, kv_dtype, device)
    if decode is None or kv_dtype != dtype:
        return decode, None
    return decode, prefill_kernel(dtype, device, head_dim)


def select_decode_kernel(backend: str, dtype: torch.dtype, kv_dtype: torch.dtype,
                         device: torch.device) -> PagedDecodeKernel | None:
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
