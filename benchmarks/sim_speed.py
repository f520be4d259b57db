"""Simulator speed: the full Mooncake conversation trace (every request) on 8 instances with
host and disk tiers, timed on the wall clock.

Each instance: an H100 roofline cost model for a Llama-3.1-8B shape, the device KV cache
the GPU leaves after the weights, a 64 GiB host tier and a 1 TiB disk tier; round-robin
routing. The block size is 64 tokens (--block-size; the trace's own unit is 512). Runs
--repeats times and reports each wall time, then once at --slow-block-size for scale.

    python benchmarks/sim_speed.py [--repeats 2] [--block-size 64] [--slow-block-size 16]
Writes benchmarks/results/sim_speed.json.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
from common import save  # noqa: E402

from kvmesh.config import CacheConfig, SchedulerConfig, TierConfig  # noqa: E402
from kvmesh.sim.cost_model import roofline  # noqa: E402
from kvmesh.sim.instance import InstanceSpec  # noqa: E402
from kvmesh.sim.run import SimConfig, simulate  # noqa: E402
from kvmesh.sim.workload import mooncake_sessions  # noqa: E402

TRACE = ROOT.parent / "shared" / "traces" / "mooncake_conversation_trace.jsonl"
GIB = 2**30


def spec(block_size: int) -> InstanceSpec:
    return InstanceSpec(SchedulerConfig(max_num_seqs=256, max_num_batched_tokens=8192),
                        CacheConfig(block_size=block_size),
                        TierConfig(host_bytes=64 * GIB, disk_path="sim", disk_bytes=1024 * GIB))


def run(block_size: int, instances: int, trace: Path) -> dict[str, Any]:
    start = time.perf_counter()
    sessions = mooncake_sessions(trace)
    figures = simulate(spec(block_size), roofline("h100", "llama-3.1-8b"),
                       SimConfig(num_instances=instances), sessions,
                       [s.arrival_s for s in sessions])
    wall = time.perf_counter() - start
    figures.pop("records")
    tiers = figures["tiers"]
    return {"wall_s": wall, "num_requests": figures["num_requests"],
            "completed": figures["completed"], "simulated_s": figures["duration_s"],
            "steps": sum(i["steps"] for i in figures["instances"]),
            "events": figures["num_events"],
            "hit_tokens": {k: v["hit_tokens"] for k, v in tiers.items() if isinstance(v, dict)},
            "cached_token_ratio": figures["cached_token_ratio"],
            "ttft_p50_s": figures["ttft_s"]["p50"], "ttft_p99_s": figures["ttft_s"]["p99"]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--trace", type=Path, default=TRACE)
    ap.add_argument("--instances", type=int, default=8)
    ap.add_argument("--block-size", type=int, default=64)
    ap.add_argument("--slow-block-size", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    runs = [run(args.block_size, args.instances, args.trace) for _ in range(args.repeats)]
    for r in runs:
        print(f"block {args.block_size}: {r['wall_s']:.1f} s wall", flush=True)
    slow = run(args.slow_block_size, args.instances, args.trace) if args.slow_block_size else None
    if slow:
        print(f"block {args.slow_block_size}: {slow['wall_s']:.1f} s wall")
    walls = [r["wall_s"] for r in runs]
    figures = {"mooncake_full_trace_wall_s": max(walls), "wall_s_runs": walls,
               "num_requests": runs[0]["num_requests"], "run": runs[0],
               "same_results_across_repeats": all(
                   {k: v for k, v in r.items() if k != "wall_s"}
                   == {k: v for k, v in runs[0].items() if k != "wall_s"} for r in runs),
               f"block_{args.slow_block_size}": slow}
    config = {"trace": str(args.trace), "instances": args.instances,
              "block_size": args.block_size, "cost_model": "roofline:h100:llama-3.1-8b",
              "host_bytes": 64 * GIB, "disk_bytes": 1024 * GIB, "route": "round_robin",
              "max_num_seqs": 256, "max_num_batched_tokens": 8192}
    notes = {"mooncake_full_trace_wall_s": "the slowest of the repeats, on one core",
             "target": "under 60 s"}
    print("wrote", save("sim_speed", config, figures, notes))


if __name__ == "__main__":
    main()
