"""The int4 linear kernels of bf16 models, by batch rows: AVX-512 BF16 against AMX tiles.

(AMX is timed twice: as it runs, and with one row tile not pipelined over the groups,
`amx_unpiped`, the path before amx_pipe21. From 17 rows both AMX modes time the
dequantizing path of kernels/quant_deq_amx.c, which has no such variant.)

Times `QuantLinear` on the bf16-pair kernel (kernels/quant_bf16.c) for the default model's
layer shapes (qkv 960x576, o 576x576, gate_up 3072x576, down 576x1536), random int4
weights in groups of 32, at 1 to 64 rows, with the AMX tile path off and (where this CPU
has it) on, in the same run, rounds interleaved; best and median of `--rounds` per point,
each the mean of `--iters` calls (L2/L3-hot: the weights stay in cache, so this measures
the kernel's arithmetic, not the memory). Also the oneDNN bf16 matmul that larger batches
of a torch-path layer take, and each row count's cost relative to one row.

    python benchmarks/cpu_kernels.py [--rounds 5] [--iters 200]

Writes benchmarks/results/cpu_kernels.json. Needs a CPU with AVX-512 BF16 (the kernel
does not exist elsewhere); says so and exits 0 otherwise.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import save  # noqa: E402

SHAPES = {"qkv": (960, 576), "o": (576, 576), "gate_up": (3072, 576), "down": (576, 1536)}
ROWS = (1, 2, 3, 4, 8, 16, 32, 64)


def _time_us(fn, iters: int) -> float:
    fn()
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    return (time.perf_counter() - start) / iters * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--iters", type=int, default=200)
    args = ap.parse_args()
    import torch

    from kvmesh.model import cpu_isa, cpu_kernels
    from kvmesh.model.quant import QuantLinear, quantize
    from kvmesh.model.quant_dense import bf16_pairs

    lib = cpu_kernels.load()
    if lib is None or not lib.quant_i4bf16_available():
        print(f"no bf16-pair kernel at ISA level {cpu_isa.level()}: nothing to measure")
        return
    amx = lib.quant_i4bf16_use_amx(1) == 1
    modes = ["avx512", "amx", "amx_unpiped"] if amx else ["avx512"]
    gen = torch.Generator().manual_seed(0)
    samples: dict[str, dict[str, dict[int, list[float]]]] = {}
    for name, (n, k) in SHAPES.items():
        layer = QuantLinear(quantize(torch.randn(n, k, generator=gen) * 0.05, 4), None)
        layer.bf16_pairs = bf16_pairs(layer.qw)
        dense = torch.nn.Linear(k, n, bias=False).to(torch.bfloat16)
        with torch.no_grad():
            dense.weight.copy_(layer.weight().to(torch.bfloat16))
        per = samples[name] = {m: {r: [] for r in ROWS} for m in [*modes, "onednn_bf16"]}
        for _ in range(args.rounds):
            for rows in ROWS:
                x = torch.randn(rows, k, generator=gen)
                for mode in modes:
                    lib.quant_i4bf16_use_amx(int(mode.startswith("amx")))
                    lib.quant_i4bf16_use_pipe(int(mode != "amx_unpiped"))
                    if rows > lib.quant_i4bf16_max_rows():
                        continue
                    per[mode][rows].append(_time_us(partial(layer._bf16_kernel, x), args.iters))
                xb = x.bfloat16()
                with torch.no_grad():
                    per["onednn_bf16"][rows].append(_time_us(partial(dense, xb), args.iters))
        lib.quant_i4bf16_use_amx(int(amx))
        lib.quant_i4bf16_use_pipe(1)
        best = {m: {r: round(min(v), 1) for r, v in d.items() if v} for m, d in per.items()}
        print(name, best, flush=True)
    figures: dict = {**cpu_isa.describe(), "amx": amx, "us_best": {}, "us_median": {},
                     "vs_one_row": {}}
    for name, per in samples.items():
        figures["us_best"][name] = {m: {str(r): min(v) for r, v in d.items() if v}
                                    for m, d in per.items()}
        figures["us_median"][name] = {m: {str(r): statistics.median(v) for r, v in d.items()
                                          if v} for m, d in per.items()}
        one = min(per["avx512"][1])
        figures["vs_one_row"][name] = {m: {str(r): min(v) / one for r, v in d.items() if v}
                                       for m, d in per.items()}
    config = {"shapes": SHAPES, "rows": ROWS, "rounds": args.rounds, "iters": args.iters,
              "group": 32, "threads": torch.get_num_threads()}
    notes = {"method": "QuantLinear._bf16_kernel (inputs rounded to bf16, float32 sums) "
                       "with the AMX path off and on via quant_i4bf16_use_amx, the same "
                       "weights and inputs; amx_unpiped: the AMX path with one row tile "
                       "run as the two-tile path runs (quant_i4bf16_use_pipe(0)); "
                       "onednn_bf16 is torch's bf16 Linear on the "
                       "dequantized weight; weights stay in cache across calls",
             "vs_one_row": "best time at R rows / best AVX-512 time at 1 row"}
    print(save("cpu_kernels", config, figures, notes))


if __name__ == "__main__":
    main()
