"""Multi-turn chat on the default model, prefix caching on vs off, in the same run.

Two `kvmesh serve` processes (one with --no-enable-prefix-caching) get the same workload
from the `kvmesh bench` library: sessions whose history grows turn by turn.

    python benchmarks/prefix_cache_multiturn.py [--sessions 8 --turns 4]
Writes benchmarks/results/prefix_cache_multiturn.json.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT))
from common import save  # noqa: E402
from tests.server_process import serve  # noqa: E402

from kvmesh.bench.client import Endpoint  # noqa: E402
from kvmesh.bench.datasets import multiturn_dataset  # noqa: E402
from kvmesh.bench.metrics import SLO, summarize  # noqa: E402
from kvmesh.bench.runner import LoadProfile, run_load  # noqa: E402


def run(extra: list[str], args) -> dict:
    with serve(["--dtype", args.dtype, *extra], Path("/tmp")) as server:
        sessions = multiturn_dataset(args.sessions, args.turns, args.user_len, args.output_len,
                                     seed=3, system_len=args.system_len)
        records, duration = asyncio.run(run_load(
            Endpoint(server.url, None, "chat"), sessions,
            LoadProfile(concurrency=args.concurrency, ignore_eos=True), show_progress=False))
    return summarize(records, duration, SLO(ttft_ms=args.slo_ttft_ms))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sessions", type=int, default=8)
    ap.add_argument("--turns", type=int, default=4)
    ap.add_argument("--system-len", type=int, default=400)
    ap.add_argument("--user-len", type=int, default=60)
    ap.add_argument("--output-len", type=int, default=48)
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--slo-ttft-ms", type=float, default=1000.0)
    args = ap.parse_args()
    on = run([], args)
    off = run(["--no-enable-prefix-caching"], args)
    pick = lambda s: {"ttft_p50_s": s["ttft_s"]["p50"], "ttft_p99_s": s["ttft_s"]["p99"],  # noqa: E731
                      "ttft_mean_s": s["ttft_s"]["mean"], "completed": s["completed"],
                      "cached_token_ratio": s["cached_token_ratio"],
                      "goodput_req_per_s": s["goodput_req_per_s"],
                      "output_tok_per_s": s["output_tok_per_s"]}
    figures = {"caching_on": pick(on), "caching_off": pick(off),
               "ttft_p50_ratio_on_vs_off": on["ttft_s"]["p50"] / off["ttft_s"]["p50"],
               "ttft_p99_ratio_on_vs_off": on["ttft_s"]["p99"] / off["ttft_s"]["p99"]}
    print(figures)
    cfg = vars(args) | {"model": "smollm2-135m-instruct"}
    print("wrote", save("prefix_cache_multiturn", cfg, figures,
                        {"slo": f"goodput counts requests with TTFT <= {args.slo_ttft_ms} ms"}))


if __name__ == "__main__":
    main()
