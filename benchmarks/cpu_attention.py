"""Paged decode attention on the CPU against the memory it reads: where a decode step's
attention time goes at many streams.

Runs kvmesh's native decode kernel (`PagedDecodeKernel`, kernels/paged_decode.c) as one
decode step of the default model would: `--layers` layers of `--seqs` sequences of
`--context` tokens (194 by default: the mean context of `cpu_peers.py`'s 64-stream
rounds, 130 prompt tokens and 128 generated), 9 query heads over 3 KV heads of 64 dims,
blocks of 16 tokens, in a pool laid out as the engine's. Three layouts of the same bytes,
rounds interleaved:

- `cold_shuffled`: every sequence has its own blocks, in a random order (a long-running
  server's pool): the KV streams from memory;
- `cold_sequential`: the same, with each sequence's blocks in ascending order (a fresh
  pool);
- `hot`: every sequence reads the same blocks (5 MB for the step, cache-resident): the
  kernel's arithmetic alone.

Reports ms per step, the KV bytes read per step and their rate, and that rate over the
machine's streaming read bandwidth (a large tensor sum). The gap between `hot` and `cold`
is time spent waiting on memory that prefetching did not hide.

    python benchmarks/cpu_attention.py [--seqs 64] [--context 194] [--rounds 5]

Writes benchmarks/results/cpu_attention_<cpu kind>.json (`_as_<level>` added under a
KVMESH_CPU_ISA that forces a lower level). bfloat16 is measured where the
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
    """(per-layer (k, v) views, block tables, lengths, queries) for one layout. The cache
    is the engine's pool, allocated as it allocates it (`lazy_zeros`: the same pages) and
    laid out as it is: one tensor [blocks, layers, 2, block, kv_heads, dim], so a block's
    K and V for every layer sit together and a layer's views step over the other layers'
    bytes from block to block."""
    import torch

    from kvmesh.engine.model_runner import lazy_zeros

    per_seq = -(-context // BLOCK)
    blocks = per_seq * (1 if layout == "hot" else seqs)
    pool = lazy_zeros((blocks, layers, 2, BLOCK, KV_HEADS, DIM), dtype, torch.device("cpu"))
    for layer in range(layers):  # a layer at a time: no float32 copy of the whole pool
        pool[:, layer].copy_(torch.randn(blocks, 2, BLOCK, KV_HEADS, DIM, generator=gen))
    caches = [(pool[:, layer, 0], pool[:, layer, 1]) for layer in range(layers)]
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
    ap.add_argument("--context", type=int, default=194)
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
    if not figures["by_dtype"]:
        sys.exit("no native decode kernel could be built here: nothing measured, no file written")
    config = {"seqs": args.seqs, "context": args.context, "layers": args.layers,
              "heads": HEADS, "kv_heads": KV_HEADS, "head_dim": DIM, "block_size": BLOCK,
              "rounds": args.rounds, "iters": args.iters}
    notes = {"method": "PagedDecodeKernel per layer, one query token per sequence; best "
                       "and median of rounds, each the mean of `iters` steps",
             "memory_floor_ms": "KV bytes per step / memory_read_gbps: the time a step "
                                "could take if attention streamed its KV at the machine's "
                                "read bandwidth"}
    kind = cpu_kind(follow_switch=False)
    if cpu_isa.level() != cpu_isa.native_level():  # KVMESH_CPU_ISA forced a lower level
        kind += f"_as_{cpu_isa.level()}"
    print(save(f"cpu_attention_{kind}", config, figures, notes))


if __name__ == "__main__":
    main()
