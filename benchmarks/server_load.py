"""64 concurrent streaming clients against `kvmesh serve` (default model) while a separate
thread polls /health every 50 ms; reports completions and /health latency percentiles.

    python benchmarks/server_load.py [--clients 64] [--output-len 64]
Writes benchmarks/results/server_load.json.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import threading
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT))
from common import save  # noqa: E402
from tests.server_process import serve  # noqa: E402

from kvmesh.bench.client import Endpoint  # noqa: E402
from kvmesh.bench.datasets import random_dataset  # noqa: E402
from kvmesh.bench.metrics import SLO, percentile, summarize  # noqa: E402
from kvmesh.bench.runner import LoadProfile, run_load  # noqa: E402


def poll_health(url: str, stop: threading.Event, out: list[float]) -> None:
    with httpx.Client(timeout=10) as client:
        while not stop.is_set():
            start = time.perf_counter()
            ok = client.get(url + "/health").status_code == 200
            out.append((time.perf_counter() - start) if ok else float("inf"))
            stop.wait(0.05)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--clients", type=int, default=64)
    ap.add_argument("--input-len", type=int, default=100)
    ap.add_argument("--output-len", type=int, default=64)
    ap.add_argument("--dtype", default="auto")
    args = ap.parse_args()
    tmp = Path("/tmp")
    with serve(["--dtype", args.dtype, "--max-num-seqs", str(args.clients)], tmp) as server:
        ep = Endpoint(server.url, None, "chat")
        sessions = random_dataset(args.clients, args.input_len, args.output_len, 0.2, seed=1)
        stop = threading.Event()
        health: list[float] = []
        poller = threading.Thread(target=poll_health, args=(server.url, stop, health))
        poller.start()
        records, duration = asyncio.run(run_load(ep, sessions, LoadProfile(
            concurrency=args.clients, ignore_eos=True), show_progress=False))
        stop.set()
        poller.join()
    summary = summarize(records, duration, SLO())
    figures = {
        "clients": args.clients, "completed": summary["completed"],
        "failed": summary["failed"],
        "health_p50_ms": percentile(health, 50) * 1000,
        "health_p99_ms": percentile(health, 99) * 1000,
        "health_max_ms": max(health) * 1000, "health_samples": len(health),
        "output_tok_per_s": summary["output_tok_per_s"], "duration_s": duration,
        "ttft_s": summary["ttft_s"], "tpot_s": summary["tpot_s"], "itl_s": summary["itl_s"],
    }
    print(figures)
    cfg = {"model": "smollm2-135m-instruct", "dtype": args.dtype, "input_words": args.input_len,
           "output_tokens": args.output_len, "api": "chat, streaming"}
    notes = {"health": "a separate thread with its own connection polls /health every 50 ms "
                       "for the whole run"}
    print("wrote", save("server_load", cfg, figures, notes))


if __name__ == "__main__":
    main()
