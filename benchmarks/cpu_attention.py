"""Paged decode attention on the CPU against the memory it reads: where a decode step's
attention time goes at many streams.

Runs kvmesh's native decode kernel (`PagedDecodeKernel`, kernels/paged_decode.c) as one
decode step of the default model would: `--layers` layers of `--seqs` sequences of
`--context` tokens, 9 query heads over 3 KV heads of 64 dims, blocks of 16 tokens. Three
layouts of the same bytes, rounds interleaved:

- `cold_shuffled`: every sequence has its own blocks, in a random order, and every layer
  its own cache (what a long-running server's pool looks like): the KV streams from DRAM;
- `cold_sequential`: the same, with each sequence's blocks in ascending order (a fresh
  pool);
- `hot`: every sequence reads the same blocks (a few hundred KB per layer, cache-resident):
  the kernel's arithmetic alone.

Reports ms per step, the KV bytes read per step and their rate, and that rate over the
machine's streaming read bandwidth (a large tensor sum). The gap between `hot` and `cold`
is time spent waiting on memory that prefetching did not hide.

    python benchmarks/cpu_attention.py [--seqs 64] [--context 220] [--rounds 5]

Writes benchmarks/results/cpu_attention_<cpu kind>.json. bfloat16 is measured where the
CPU has AVX-512 BF16 (elsewhere bf16 is not a dtype kvmesh picks), float32 everywhere.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import cpu_kind, read_gbps, save  # noqa: E402

HEADS, KV_HEADS, DIM, BLOCK = 9, 3, 64, 16  # the default model (SmolLM2-135M)
LAYOUTS = ("cold_shuffled", "cold_sequential", "hot")


def build(layout: str, dtype, seqs: int, context: int, layers: int, gen) -> tuple:
    """(per-layer (k, v) caches, block tables, lengths, queries) for one layout."""
    import torch

    per_seq = -(-context // BLOCK)
    blocks = per_seq * (1 if layout == "hot" else seqs)
    caches = [tuple(torch.randn(blocks, BLOCK, KV_HEADS, DIM, generator=gen).to(dtype)
                    for _ in range(2)) for _ in range(layers)]
    if layout == "hot":
        tables = torch.arange(per_seq).repeat(seqs, 1)
    elif layout == "cold_sequential":
        tables = torch.arange(blocks).view(seqs, per_seq)
    else:
        tables = torch.randperm(blocks, generator=gen).view(seqs, per_seq)
    lengths = torch.full((seqs,), context, dtype=torch.int64)
    q = torch.randn(seqs, HEADS, DIM, generator=gen).to(dtype)
    return caches, tables.contiguous().to(torch.int64), lengths, q


def step_s(kernel, case: tuple, iters: int) -> float:
    """Mean seconds of one step (every layer once) over `iters` steps, after a warm-up."""
    caches, tables, lengths, q = case

    def step() -> None:
        for k, v in caches:
            kernel(q, k, v, tables, lengths, DIM**-0.5)

    step()
    start = time.perf_counter()
    for _ in range(iters):
        step()
    return (time.perf_counter() - start) / iters


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seqs", type=int, default=64)
    ap.add_argument("--context", type=int, default=220)
    ap.add_argument("--layers", type=int, default=30)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--iters", type=int, default=5)
    args = ap.parse_args()
    import torch

    from kvmesh.model import cpu_isa, cpu_kernels

    dtypes = [torch.float32]
    if cpu_isa.level() == "avx512_bf16":
        dtypes.insert(0, torch.bfloat16)
    read = read_gbps()
    gen = torch.Generator().manual_seed(0)
    figures: dict = {**cpu_isa.describe(), "memory_read_gbps": read, "threads":
                     torch.get_num_threads(), "by_dtype": {}}
    for dtype in dtypes:
        kernel = cpu_kernels.decode_kernel(dtype, torch.device("cpu"))
        if kernel is None:
            print(f"no native decode kernel for {dtype}: skipped", flush=True)
            continue
        name = str(dtype).removeprefix("torch.")
        kv_bytes = (2 * args.seqs * args.context * KV_HEADS * DIM * dtype.itemsize
                    * args.layers)
        times: dict[str, list[float]] = {layout: [] for layout in LAYOUTS}
        for _ in range(args.rounds):
            for layout in LAYOUTS:  # built per round: no layout keeps the others' cache
                case = build(layout, dtype, args.seqs, args.context, args.layers, gen)
                times[layout].append(step_s(kernel, case, args.iters))
                del case
        per: dict = {}
        for layout, ts in times.items():
            best = min(ts)
            per[layout] = {"ms_best": best * 1e3, "ms_median": statistics.median(ts) * 1e3,
                           "ms_rounds": [t * 1e3 for t in ts],
                           "kv_gbps": kv_bytes / best / 1e9,
                           "kv_gbps_over_read": kv_bytes / best / 1e9 / read}
            print(f"{name} {layout}: {best * 1e3:.2f} ms/step (median "
                  f"{per[layout]['ms_median']:.2f}), {per[layout]['kv_gbps']:.1f} GB/s of "
                  f"KV = {per[layout]['kv_gbps_over_read']:.2f} x read bandwidth", flush=True)
        figures["by_dtype"][name] = {"kv_bytes_per_step": kv_bytes, **per,
                                     "memory_floor_ms": kv_bytes / read / 1e6}
    config = {"seqs": args.seqs, "context": args.context, "layers": args.layers,
              "heads": HEADS, "kv_heads": KV_HEADS, "head_dim": DIM, "block_size": BLOCK,
              "rounds": args.rounds, "iters": args.iters}
    notes = {"method": "PagedDecodeKernel per layer, one query token per sequence; best "
                       "and median of rounds, each the mean of `iters` steps",
             "memory_floor_ms": "KV bytes per step / memory_read_gbps: the time a step "
                                "could take if attention streamed its KV at the machine's "
                                "read bandwidth"}
    print(save(f"cpu_attention_{cpu_kind(follow_switch=False)}", config, figures, notes))


if __name__ == "__main__":
    main()
