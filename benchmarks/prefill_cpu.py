"""Prefill on the CPU for bf16 models: the AMX tiles for prefill attention and the native
RMSNorm and rope (model/native_ops.py) against the paths they replace, same process, same run.

Two parts:
- `ops`: each op on a 512-token chunk of the default model's shapes (RMSNorm over 576,
  rope over 12 heads of 64 on the strided q/k view), the median of `--calls` calls, native
  and torch, and the native op's bytes moved per second;
- `prefill`: the default model (`make serve`'s settings, bf16 where the CPU has native
  bf16) prefilling fresh random prompts (no cache hits) in two workloads, `short` (8
  prompts of 480 tokens) and `long` (one of 4,000 tokens), `--rounds` rounds with the sides
  interleaved: `served` (as served: tiles and native ops), `vector_attention` (prefill
  attention with AVX-512 BF16 dot products, kernels/paged_prefill.c), `torch_ops`
  (torch's RMSNorm and rope) and `neither` (both: the path before either). Prefill
  tokens/s per side, median and spread, and each side's ratio to `served`.

    python benchmarks/prefill_cpu.py [--rounds 5]

Writes prefill_cpu.json and prefill_cpu_<cpu kind>.json (a forced ISA level or
KVMESH_AMX=0: only the latter). On a CPU without native bf16 the default model runs
float32, which neither path touches: the prefill part then says so and measures nothing.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import cpu_kind, matmul_gflops, random_prompts, save_by_cpu  # noqa: E402


def _median_us(fn, calls: int) -> float:
    fn()
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e6 * statistics.median(times)


def op_figures(calls: int) -> dict:
    import torch
    import torch.nn.functional as F

    from kvmesh.model.layers import apply_rope
    from kvmesh.model.native_ops import native_ops

    ops = native_ops()
    if ops is None:
        return {"skipped": "no native kernels here"}
    g = torch.Generator().manual_seed(0)
    x = torch.randn(512, 576, generator=g).bfloat16()
    w = torch.rand(576, generator=g).bfloat16()
    qkv = torch.randn(512, 960, generator=g).bfloat16()
    qk = qkv[:, :768].view(512, 12, 64)
    cos = torch.randn(512, 1, 64, generator=g).bfloat16()
    cases = {
        "rmsnorm_512x576": (lambda: ops.rmsnorm(x, w, 1e-5),
                            lambda: F.rms_norm(x, (576,), w, 1e-5), 2 * x.numel() * 2),
        "rope_512x12x64": (lambda: ops.rope(qk, cos, cos), lambda: apply_rope(qk, cos, cos),
                           2 * qk.numel() * 2 + 2 * cos.numel() * 2),
    }
    out = {}
    for name, (native, torch_op, moved) in cases.items():
        n_us, t_us = _median_us(native, calls), _median_us(torch_op, calls)
        out[name] = {"native_us": n_us, "torch_us": t_us, "speedup": t_us / n_us,
                     "native_gb_per_s": moved / n_us / 1e3}
        print(name, f"native {n_us:.0f} us, torch {t_us:.0f} us ({t_us / n_us:.2f}x)")
    return out


WORKLOADS = {"short": (8, 480), "long": (1, 4000)}  # prompts, tokens each
SIDES = {"served": (True, True), "vector_attention": (False, True), "torch_ops": (True, False),
         "neither": (False, False)}


def prefill_figures(rounds: int) -> tuple[dict, dict]:
    from kvmesh import LLM, SamplingParams
    from kvmesh.bench.profile import model_shape
    from kvmesh.model.native_ops import native_ops

    llm = LLM()
    loaded = llm.engine.loaded
    config = {"dtype": str(loaded.dtype).replace("torch.", ""),
              "quantization": loaded.quantization, "workloads": WORKLOADS}
    shape = model_shape(llm.engine)  # per token, the layers' linears (no lm_head)
    linear_flop = 2 * (shape.num_params - shape.hidden_size * shape.vocab_size)
    layers = [m for m in loaded.model.modules() if hasattr(m, "native")]
    kernel = llm.engine.runner.prefill_kernel
    ops = native_ops()
    if ops is None or kernel is None or not any(m.native is not None for m in layers):
        return config, {"skipped": f"neither path applies here ({config['dtype']} model)"}
    params = SamplingParams(temperature=0.0, max_tokens=1)
    seed = iter(range(1, 1 << 30))

    def run(workload: str, side: str) -> float:
        kernel.use_tiles, native = SIDES[side]
        for m in layers:
            m.native = ops if native else None
        prompts, tokens = WORKLOADS[workload]
        batch = random_prompts(prompts, tokens, next(seed))
        start = time.perf_counter()
        llm.generate(batch, params)
        return prompts * tokens / (time.perf_counter() - start)

    figures: dict = {}
    for workload in WORKLOADS:
        run(workload, "served")  # warm-up
        rates: dict[str, list[float]] = {side: [] for side in SIDES}
        for _ in range(rounds):
            for side in SIDES:
                rates[side].append(run(workload, side))
        fig: dict = {side: {"prefill_tok_per_s": statistics.median(v),
                            "spread": [min(v), max(v)], "runs": v} for side, v in rates.items()}
        served = fig["served"]["prefill_tok_per_s"]
        for side in SIDES:
            fig[side]["vs_served"] = fig[side]["prefill_tok_per_s"] / served
        fig["speedup_vs_vector_attention"] = 1 / fig["vector_attention"]["vs_served"]
        fig["speedup_vs_torch_ops"] = 1 / fig["torch_ops"]["vs_served"]
        fig["speedup_vs_neither"] = 1 / fig["neither"]["vs_served"]
        fig["served_linear_gflop_per_s"] = served * linear_flop / 1e9
        figures[workload] = fig
        print(workload, {side: f"{f['prefill_tok_per_s']:.0f} tok/s" for side, f in
                         fig.items() if isinstance(f, dict)},
              f"tiles {fig['speedup_vs_vector_attention']:.2f}x, native ops "
              f"{fig['speedup_vs_torch_ops']:.2f}x, both {fig['speedup_vs_neither']:.2f}x")
    kernel.use_tiles = True
    for m in layers:
        m.native = ops
    # the bound for the linears: a 2048^3 bf16 matmul in torch on this CPU
    figures["bf16_matmul_gflops"] = matmul_gflops("bfloat16")
    return config, figures


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--calls", type=int, default=200)
    args = ap.parse_args()
    figures = {"ops": op_figures(args.calls)}
    config, figures["prefill"] = prefill_figures(args.rounds)
    config.update(model="smollm2-135m-instruct", rounds=args.rounds, calls=args.calls,
                  cpu=cpu_kind())
    notes = {"sides": "served: prefill attention on the AMX tiles (kernels/paged_verify.c) "
                      "where the CPU has them, RMSNorm and rope from kernels/rows_bf16.c; "
                      "vector_attention: kernels/paged_prefill.c for attention; torch_ops: "
                      "F.rms_norm and layers.apply_rope; neither: both of those. Same "
                      "process, rounds interleaved",
             "prefill": "make serve's settings (LLM()), chunked prefill of 512-token steps, "
                        "fresh random prompts each round",
             "bound": "served_linear_gflop_per_s: the layers' linear FLOPs per token (no "
                      "attention, no lm_head) times served tok/s, against bf16_matmul_gflops"}
    print(*save_by_cpu("prefill_cpu", config, figures, notes), sep="\n")


if __name__ == "__main__":
    main()
