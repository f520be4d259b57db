"""kvmesh on a CUDA device: decode and prefill throughput beside transformers on the same
GPU in the same run, the GPU's own limits (HBM copy bandwidth, bf16 matmul), and greedy
float32 token identity (kvmesh vs transformers, cold vs prefix-cache hit).

    python benchmarks/cuda_engine.py [--model DIR_OR_NAME] [--repeats 3]

Writes benchmarks/results/cuda_engine.json. The model defaults to the default model; any
Hugging Face directory of the same architecture works (throughput does not depend on the
weights' values: EOS is ignored).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from common import prefill_tok_per_s, random_prompts, save  # noqa: E402
from tests.reference import hf_greedy  # noqa: E402

PROMPT_LEN, OUTPUT_LEN = 128, 128
DEVICE = "cuda"  # --device cpu: a dry run of this script where no GPU is
DTYPE = "bfloat16"


def spread(runs: list[float]) -> dict:
    return {"median": statistics.median(runs), "min": min(runs), "max": max(runs), "runs": runs}


def sync(empty: bool = False) -> None:
    import torch

    if DEVICE != "cpu":
        torch.cuda.synchronize()
        if empty:
            torch.cuda.empty_cache()


def gpu_limits() -> dict:
    """Device-to-device copy (bytes read + written) and a bf16 matmul, timed with events."""
    import torch

    def timed(fn, repeats: int) -> float:
        fn()
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(repeats):
            fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / 1e3 / repeats

    src = torch.empty(2 * 1024**3, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    copy_s = timed(lambda: dst.copy_(src), 10)
    src = dst = torch.empty(0)
    n = 8192
    a = torch.randn(n, n, dtype=torch.bfloat16, device="cuda")
    b = torch.randn(n, n, dtype=torch.bfloat16, device="cuda")
    mm_s = timed(lambda: a @ b, 10)
    props = torch.cuda.get_device_properties(0)
    return {"gpu": props.name, "sms": props.multi_processor_count,
            "memory_gib": props.total_memory / 1024**3,
            "torch": torch.__version__, "cuda": torch.version.cuda,
            "copy_gbps_read_plus_write": 2 * 2 * 1024**3 / copy_s / 1e9,
            "bf16_matmul_tflops": 2 * n**3 / mm_s / 1e12}


def kvmesh_throughput(model: str, concs: list[int], repeats: int) -> dict:
    from kvmesh import LLM, SamplingParams

    llm = LLM(model, device=DEVICE, dtype=DTYPE, max_num_seqs=max(concs),
              max_num_batched_tokens=2048, enable_prefix_caching=False)
    params = SamplingParams(temperature=0.0, max_tokens=OUTPUT_LEN, ignore_eos=True)
    llm.generate(random_prompts(2, PROMPT_LEN, 99), SamplingParams(temperature=0, max_tokens=4))
    out: dict = {"decode_tok_per_s": {}}

    def once(conc: int) -> float:
        sync()
        start = time.perf_counter()
        res = llm.generate(random_prompts(conc, PROMPT_LEN, conc), params)
        return sum(len(r.token_ids) for r in res) / (time.perf_counter() - start)

    for conc in concs:
        once(conc)  # warm: allocator and kernel selection for this batch size
        out["decode_tok_per_s"][str(conc)] = spread([once(conc) for _ in range(repeats)])
        print(f"kvmesh conc={conc}: {out['decode_tok_per_s'][str(conc)]}", flush=True)
    prefill_tok_per_s(llm)  # warm
    out["prefill_tok_per_s_2k"] = spread([prefill_tok_per_s(llm) for _ in range(repeats)])
    out["weight_bytes"] = sum(p.numel() * p.element_size()
                              for p in llm.engine.runner.model.parameters())
    out["num_blocks"] = llm.engine.loaded.num_blocks
    llm.close()
    return out


def hf_model(model_dir: Path, dtype: str):
    import torch
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(
        str(model_dir), dtype=getattr(torch, dtype), attn_implementation="sdpa").to(DEVICE).eval()


def hf_throughput(model_dir: Path, concs: list[int], repeats: int) -> dict:
    import torch

    model = hf_model(model_dir, DTYPE)
    out: dict = {"decode_tok_per_s": {}}

    def once(conc: int) -> float:
        ids = torch.tensor(random_prompts(conc, PROMPT_LEN, conc), device=DEVICE)
        sync()
        start = time.perf_counter()
        with torch.inference_mode():
            gen = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                 max_new_tokens=OUTPUT_LEN, min_new_tokens=OUTPUT_LEN,
                                 pad_token_id=2)
        sync()
        return (gen.shape[1] - PROMPT_LEN) * conc / (time.perf_counter() - start)

    for conc in concs:
        once(conc)
        out["decode_tok_per_s"][str(conc)] = spread([once(conc) for _ in range(repeats)])
        print(f"transformers conc={conc}: {out['decode_tok_per_s'][str(conc)]}", flush=True)
    return out


def identity(model: str, model_dir: Path) -> dict:
    """Greedy float32 on CUDA: kvmesh cold, kvmesh again (prefix hits), transformers."""
    from kvmesh import LLM, SamplingParams

    ps = [random_prompts(1, n, seed=n)[0] for n in (7, 33, 150, 420)]
    new = 24
    llm = LLM(model, device=DEVICE, dtype="float32", block_size=16)
    g = SamplingParams(temperature=0.0, max_tokens=new, ignore_eos=True)
    cold = [o.token_ids for o in llm.generate(ps, g)]
    again = llm.generate(ps, g)
    warm = [o.token_ids for o in again]
    hits = sum(o.num_cached_tokens for o in again)
    llm.close()
    ref_model = hf_model(model_dir, "float32")
    refs = hf_greedy(ref_model, ps, max_new_tokens=new, eos=None)
    del ref_model
    sync(empty=True)
    return {"prompts": len(ps), "new_tokens": new, "cold_equals_warm": cold == warm,
            "kvmesh_equals_transformers": cold == refs,
            "first_mismatch": [first_mismatch(c, r) for c, r in zip(cold, refs, strict=True)],
            "prefix_hit_tokens": hits}


def first_mismatch(a: list[int], b: list[int]) -> int | None:
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), None)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--concurrency", default="1,16,64")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cuda", help="cpu: a dry run of the script only")
    ap.add_argument("--dtype", default="bfloat16", help="throughput runs' dtype")
    args = ap.parse_args()
    import torch

    global DEVICE, DTYPE
    DEVICE, DTYPE = args.device, args.dtype
    if DEVICE != "cpu" and not torch.cuda.is_available():
        sys.exit("no CUDA device: this benchmark measures kvmesh's CUDA path")
    from kvmesh.model.registry import resolve_model

    model_dir = resolve_model(args.model).path
    concs = [int(c) for c in args.concurrency.split(",")]
    limits = gpu_limits() if DEVICE != "cpu" else {"copy_gbps_read_plus_write": 20.0}
    print(limits, flush=True)
    ident = identity(args.model, model_dir)
    print(ident, flush=True)
    kv = kvmesh_throughput(args.model, concs, args.repeats)
    hf = hf_throughput(model_dir, concs, args.repeats)
    # a weight stream reads at about the copy's total (read + write) HBM traffic rate
    floor_ms = kv["weight_bytes"] / (limits["copy_gbps_read_plus_write"] * 1e9) * 1e3
    step_ms = 1e3 * concs[0] / kv["decode_tok_per_s"][str(concs[0])]["median"]
    figures = {
        "kvmesh": kv, "transformers": hf, "gpu": limits, "identity_float32": ident,
        **{f"decode_ratio_vs_transformers_{c}": kv["decode_tok_per_s"][str(c)]["median"]
           / hf["decode_tok_per_s"][str(c)]["median"] for c in concs},
        "weight_read_floor_ms_per_step": floor_ms,
        f"step_ms_at_{concs[0]}": step_ms,
        "step_vs_floor": step_ms / floor_ms,
    }
    config = {"model": args.model, "prompt_len": PROMPT_LEN, "output_len": OUTPUT_LEN,
              "concurrency": concs, "repeats": args.repeats, "dtype": DTYPE,
              "transformers_attn": "sdpa"}
    if DEVICE == "cpu":
        print("dry run:", figures)
        return
    print("wrote", save("cuda_engine", config, figures), flush=True)


if __name__ == "__main__":
    main()
