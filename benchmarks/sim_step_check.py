"""How well the cost model prices the steps of real runs: the fidelity workloads on the
real server (each run in a fresh process, its steps recorded as `kvmesh profile` records
them) driven by a `kvmesh bench` client process, and the cost model's price for each
recorded step.

`sim_fidelity.py` compares what users see (TTFT, TPOT, throughput); near capacity a small
error in step cost grows into a large one in queueing delay. This splits the two: a ratio
near 1 here with a large fidelity error points at what the simulator leaves out (CPU
contention from the HTTP front end, arrival processing), a ratio far from 1 at the cost
model's form or the profile's coverage.

    python benchmarks/sim_step_check.py [--cost-model FILE] [--workloads ...] [--levels ...]

Rates come from `benchmarks/results/sim_fidelity.json` (the same loads it ran).
Writes benchmarks/results/sim_step_check.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import multiprocessing
import sys
import tempfile
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
from common import RESULTS, save  # noqa: E402
from sim_fidelity import WORKLOADS, add_run_args  # noqa: E402

from kvmesh.bench.profile import recorded_server, run_bench  # noqa: E402
from kvmesh.bench.workload import WorkloadConfig  # noqa: E402
from kvmesh.config import (  # noqa: E402
    CacheConfig,
    EngineConfig,
    ModelConfig,
    SchedulerConfig,
    TierConfig,
)
from kvmesh.sim import cost_model as cm  # noqa: E402


def check(cost: cm.CostModel, samples: list[tuple[cm.StepFeatures, float]]) -> dict[str, Any]:
    """Modelled over measured time, all steps and split by kind (decode-only or not)."""
    out: dict[str, Any] = {"steps": len(samples)}
    kinds = {"all": lambda f: True, "decode": lambda f: f.num_prefill_seqs == 0,
             "prefill": lambda f: f.num_prefill_seqs > 0}
    for kind, keep in kinds.items():
        part = [(f, t) for f, t in samples if keep(f)]
        real = sum(t for _, t in part)
        model = sum(cost.step_s(f) for f, _ in part)
        out[kind] = {"steps": len(part), "real_s": real, "model_s": model,
                     "ratio": model / real if real else None,
                     "mean_seqs": sum(f.num_seqs for f, _ in part) / max(1, len(part))}
    return out


def recorded_run(args: argparse.Namespace,
                 w: WorkloadConfig) -> list[tuple[cm.StepFeatures, float]]:
    """One real run of `w` on a fresh server; its recorded steps."""
    with tempfile.TemporaryDirectory(prefix="kvmesh-stepcheck-") as tmp:
        config = EngineConfig(ModelConfig(dtype=args.dtype),
                              CacheConfig(num_blocks=args.num_blocks),
                              SchedulerConfig(),
                              TierConfig(host_bytes=args.host_bytes,
                                         disk_path=str(Path(tmp) / "disk"),
                                         disk_bytes=args.disk_bytes))
        with recorded_server(config) as (port, rec, _):
            rec.is_recording = True
            run_bench(port, w.cli_args(), Path(tmp) / "bench.json")  # seed included
            rec.is_recording = False
    return rec.samples


def isolated(fn: Callable[..., Any], *args: Any) -> Any:
    """`fn(*args)` in a fresh process: each real run starts cold, and what one server
    leaves in memory does not pile up here."""
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=1, mp_context=ctx) as pool:
        return pool.submit(fn, *args).result()


def rates() -> dict[tuple[str, str], float]:
    doc = json.loads((RESULTS / "sim_fidelity.json").read_text())
    return {(r["workload"], r["load"]): r["rate_sessions_per_s"]
            for r in doc["figures"]["table"]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cost-model", type=Path, default=RESULTS / "sim_cost_model.json")
    add_run_args(ap)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    cost = cm.load(str(args.cost_model))
    known = rates()
    rows = []
    for name in args.workloads.split(","):
        for level in args.levels.split(","):
            w = dataclasses.replace(WORKLOADS[name], rate=known[(name, level)], seed=1)
            runs = [check(cost, isolated(recorded_run, args, w)) for _ in range(args.repeats)]
            ratios = [r["all"]["ratio"] for r in runs]
            row = {"workload": name, "load": level, "rate_sessions_per_s": w.rate,
                   "ratio": sum(ratios) / len(ratios),
                   "ratio_spread": max(ratios) - min(ratios), "runs": runs}
            print(name, level, [{k: round(r[k]["ratio"] or 0, 3)
                                 for k in ("all", "decode", "prefill")} for r in runs],
                  flush=True)
            rows.append(row)
    figures: dict[str, Any] = {
        "step_cost_err_max": max(abs(r["ratio"] - 1) for r in rows),
        "step_cost_err_mean": sum(abs(r["ratio"] - 1) for r in rows) / len(rows),
        "ratio_spread_max": max(r["ratio_spread"] for r in rows),
        "table": rows}
    config = {"cost_model": str(args.cost_model), "dtype": args.dtype,
              "workloads": args.workloads,
              "levels": args.levels, "num_blocks": args.num_blocks,
              "host_bytes": args.host_bytes, "disk_bytes": args.disk_bytes,
              "repeats": args.repeats}
    notes = {"ratio": "the cost model's total for the recorded steps over their measured "
                      "periods (start to next start, while busy), as `kvmesh profile` "
                      "measures them; 1 is exact. ratio is the mean over repeats, "
                      "ratio_spread (max - min) across them: this machine's noise"}
    print("wrote", save("sim_step_check", config, figures, notes))


if __name__ == "__main__":
    main()
