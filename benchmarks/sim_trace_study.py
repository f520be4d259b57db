"""Mooncake trace study: prefix-hit rate against host and disk capacity per instance, and
against the number of instances, with the ceiling of an infinite cache.

Every point simulates the whole conversation trace (H100 roofline, Llama-3.1-8B shape,
round-robin routing, block size 64). The ceiling is computed from the trace itself: each
request's longest prefix of 512-token blocks seen in any earlier request.

    python benchmarks/sim_trace_study.py [--limit N]
Writes benchmarks/results/sim_trace_study.json and sim_trace_study.png.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
from common import RESULTS, save  # noqa: E402

from kvmesh.config import CacheConfig, SchedulerConfig, TierConfig  # noqa: E402
from kvmesh.sim.cost_model import roofline  # noqa: E402
from kvmesh.sim.instance import InstanceSpec  # noqa: E402
from kvmesh.sim.run import SimConfig, simulate  # noqa: E402
from kvmesh.sim.workload import MOONCAKE_BLOCK_TOKENS, mooncake_sessions  # noqa: E402

TRACE = ROOT.parent / "shared" / "traces" / "mooncake_conversation_trace.jsonl"
GB = 10**9
HOST_GB = (0, 16, 64, 256, 1024)
DISK_GB = (0, 256, 1024, 4096)
INSTANCES = (1, 2, 4, 8, 16)


def ceiling(trace: Path, limit: int | None) -> float:
    """Prompt tokens an infinite cache would serve (every earlier prefix kept)."""
    seen: set[tuple[int, ...]] = set()
    hit = total = 0
    with trace.open() as f:
        for i, line in enumerate(f):
            if limit is not None and i >= limit:
                break
            row = json.loads(line)
            ids, n = row["hash_ids"], row["input_length"]
            total += n
            full = min(len(ids), (n - 1) // MOONCAKE_BLOCK_TOKENS)  # never the last token
            k = 0
            while k < full and tuple(ids[: k + 1]) in seen:
                k += 1
            hit += k * MOONCAKE_BLOCK_TOKENS
            seen.update(tuple(ids[: j + 1]) for j in range(len(ids)))
    return hit / total


def point(trace: Path, limit: int | None, instances: int, host_gb: float,
          disk_gb: float) -> dict[str, Any]:
    sessions = mooncake_sessions(trace, limit)
    tiers = TierConfig(host_bytes=int(host_gb * GB),
                       disk_path="sim" if disk_gb else None, disk_bytes=int(disk_gb * GB))
    spec = InstanceSpec(SchedulerConfig(max_num_seqs=256, max_num_batched_tokens=8192),
                        CacheConfig(block_size=64), tiers)
    start = time.perf_counter()
    f = simulate(spec, roofline("h100", "llama-3.1-8b"), SimConfig(num_instances=instances),
                 sessions, [s.arrival_s for s in sessions])
    f.pop("records")
    by_tier = {k: v["hit_tokens"] for k, v in f["tiers"].items() if isinstance(v, dict)}
    out = {"instances": instances, "host_gb": host_gb, "disk_gb": disk_gb,
           "hit_rate": f["cached_token_ratio"], "hit_tokens": by_tier,
           "prompt_tokens": f["prompt_tokens"], "ttft_p50_s": f["ttft_s"]["p50"],
           "wall_s": time.perf_counter() - start}
    print(out, flush=True)
    return out


def plot(fig_data: dict[str, Any], ceil: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    ax = axes[0]
    for key, label, xs in (("host", "host tier only", "host_gb"),
                           ("disk", "64 GB host + disk tier", "disk_gb")):
        pts = fig_data[key]
        ax.plot([max(p[xs], 1) for p in pts], [p["hit_rate"] for p in pts], marker="o",
                label=f"{label} (x: {xs.replace('_gb', '')} GB)")
    ax.set_xscale("log")
    ax.set_xlabel("capacity per instance (GB; 0 drawn at 1)")
    ax.set_title("8 instances: hit rate vs tier capacity")
    ax = axes[1]
    pts = fig_data["instances"]
    ax.plot([p["instances"] for p in pts], [p["hit_rate"] for p in pts], marker="o",
            label="64 GB host + 1 TB disk each")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("instances (round-robin)")
    ax.set_title("hit rate vs instances")
    for ax in axes:
        ax.axhline(ceil, linestyle="--", color="grey", label=f"infinite cache {ceil:.1%}")
        ax.set_ylabel("prompt tokens served from cache")
        ax.set_ylim(0, max(ceil * 1.15, 0.05))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--trace", type=Path, default=TRACE)
    ap.add_argument("--limit", type=int, default=None, help="Only the first N requests.")
    args = ap.parse_args()
    ceil = ceiling(args.trace, args.limit)
    data = {
        "host": [point(args.trace, args.limit, 8, h, 0) for h in HOST_GB],
        "disk": [point(args.trace, args.limit, 8, 64, d) for d in DISK_GB],
        "instances": [point(args.trace, args.limit, n, 64, 1024) for n in INSTANCES],
    }
    png = RESULTS / "sim_trace_study.png"
    plot(data, ceil, png)
    figures = {"infinite_cache_hit_rate": ceil, **data, "plot": str(png.relative_to(ROOT))}
    config = {"trace": str(args.trace), "limit": args.limit, "block_size": 64,
              "cost_model": "roofline:h100:llama-3.1-8b", "route": "round_robin"}
    print("wrote", save("sim_trace_study", config, figures,
                        {"hit_rate": "prompt tokens served from any cache tier / prompt tokens"}))


if __name__ == "__main__":
    main()
