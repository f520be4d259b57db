"""Simulator fidelity: the same workloads on the real engine and in `kvmesh sim`.

1. `kvmesh profile` fits the cost model on this machine (or --cost-model FILE reuses one),
   with the same engine flags as the server: once before the real runs and once after
   (--profiles), their samples pooled into one fit (`kvmesh.sim.fit.merge_profiles`), so
   the model and the real runs sample the same stretch of time on a machine whose speed
   drifts (a shared VM here: 10-30% within the hour).
2. For each workload (random, shared-prefix, multi-turn) the simulator finds the capacity
   (every session at once; with the first profile), then each of three loads (light, near
   capacity, overloaded: fractions of that capacity, Poisson arrivals with a fixed seed)
   runs on a fresh `kvmesh serve` (one instance, host and disk tiers on, a small device
   cache so the tiers are used) driven by a `kvmesh bench` process, and in the simulator.
3. The table compares TTFT mean and p99, TPOT mean, output throughput and prefix-hit
   tokens; errors are relative (hits: percentage points of prompt tokens). Each real run
   is repeated (--real-repeats), in rounds over all the rows (not back to back), so a slow
   spell of the machine lands on one run of several rows rather than every run of one:
   errors are against their median, and their spread is the noise floor of this machine.

    python benchmarks/sim_fidelity.py [--cost-model FILE] [--profiles N]
Writes benchmarks/results/sim_fidelity.json (and sim_cost_model.json when it profiles).
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT))
from common import RESULTS, save  # noqa: E402
from tests.server_process import serve  # noqa: E402

from kvmesh.bench.profile import bench_process  # noqa: E402
from kvmesh.bench.workload import WorkloadConfig  # noqa: E402
from kvmesh.config import CacheConfig, SchedulerConfig, TierConfig  # noqa: E402
from kvmesh.sim import cost_model as cm  # noqa: E402
from kvmesh.sim.cli import run_sim  # noqa: E402
from kvmesh.sim.fit import merge_profiles  # noqa: E402
from kvmesh.sim.instance import InstanceSpec  # noqa: E402
from kvmesh.sim.run import SimConfig  # noqa: E402

WORKLOADS = {
    "random": WorkloadConfig(dataset="random", num_requests=48, input_len=128, output_len=64),
    "shared-prefix": WorkloadConfig(dataset="shared-prefix", num_requests=48, input_len=384,
                                    output_len=48, groups=4),
    "multiturn": WorkloadConfig(dataset="multiturn", num_requests=12, turns=4, input_len=256,
                                output_len=48),
}
LEVELS = {"light": 0.3, "near": 0.8, "over": 2.0}
METRICS = ("ttft_mean_s", "ttft_p99_s", "tpot_mean_s", "output_tok_per_s")


def engine_flags(args: argparse.Namespace, disk: Path) -> list[str]:
    return ["--dtype", args.dtype, "--num-blocks", str(args.num_blocks), "--host-bytes",
            str(args.host_bytes), "--disk-path", str(disk), "--disk-bytes",
            str(args.disk_bytes)]


def spec(args: argparse.Namespace) -> InstanceSpec:
    return InstanceSpec(SchedulerConfig(), CacheConfig(num_blocks=args.num_blocks),
                        TierConfig(host_bytes=args.host_bytes, disk_path="sim",
                                   disk_bytes=args.disk_bytes))


def profile(args: argparse.Namespace, out: Path) -> Path:
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [str(Path(sys.executable).parent / "kvmesh"), "profile", "--out", str(out),
               "--budget-s", str(args.profile_budget_s), *engine_flags(args, Path(tmp))]
        subprocess.run(cmd, check=True)
    return out


def merged(paths: list[Path]) -> Path:
    """The profiles' pooled fit, saved as sim_cost_model.json."""
    models = [cm.load(str(p)) for p in paths]
    out = RESULTS / "sim_cost_model.json"
    cm.save(merge_profiles([m for m in models if isinstance(m, cm.LinearCostModel)]), out)
    return out


def real(args: argparse.Namespace, w: WorkloadConfig) -> dict[str, Any]:
    """A `kvmesh bench` process against a fresh `kvmesh serve`, as users run them; the
    cost model's profile drives its server with `kvmesh bench` processes too."""
    with tempfile.TemporaryDirectory() as tmp, \
            serve(engine_flags(args, Path(tmp) / "disk"), Path(tmp)) as server:
        summary: dict[str, Any] = bench_process(server.port, w.cli_args(),
                                                Path(tmp) / "bench.json")["summary"]
    return summary


def simulated(cost: Path, args: argparse.Namespace, w: WorkloadConfig) -> dict[str, Any]:
    figures = run_sim(SimConfig(cost_model=str(cost)), w, spec(args), progress=False)
    figures.pop("records")
    return figures


def pick(s: dict[str, Any]) -> dict[str, Any]:
    return {"ttft_mean_s": s["ttft_s"]["mean"], "ttft_p99_s": s["ttft_s"]["p99"],
            "tpot_mean_s": s["tpot_s"]["mean"], "output_tok_per_s": s["output_tok_per_s"],
            "cached_token_ratio": s["cached_token_ratio"] or 0.0, "completed": s["completed"],
            "duration_s": s["duration_s"]}


def mean_of(runs: list[dict[str, Any]]) -> dict[str, Any]:
    return {k: sum(r[k] for r in runs) / len(runs) for k in runs[0]}


def median_of(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Per metric: one run on a moment the machine slowed by 15% turns a near-capacity
    load into an overload (3x the TTFT), and a mean would carry it."""
    return {k: statistics.median(r[k] for r in runs) for k in runs[0]}


def spread(runs: list[dict[str, Any]]) -> dict[str, float]:
    """How far apart repeated real runs are: (max - min) / mean, per metric."""
    m = mean_of(runs)
    return {k: (max(r[k] for r in runs) - min(r[k] for r in runs)) / m[k] for k in METRICS}


def errors(r: dict[str, Any], s: dict[str, Any]) -> dict[str, float]:
    rel = lambda k: abs(s[k] - r[k]) / r[k]  # noqa: E731
    return {"ttft_mean_err": rel("ttft_mean_s"), "ttft_p99_err": rel("ttft_p99_s"),
            "tpot_err": rel("tpot_mean_s"), "throughput_err": rel("output_tok_per_s"),
            "hit_tokens_err_pp": 100 * abs(s["cached_token_ratio"] - r["cached_token_ratio"])}


def capacity(cost: Path, args: argparse.Namespace, w: WorkloadConfig) -> float:
    """Sessions per second the simulated instance sustains with every session queued."""
    s = simulated(cost, args, dataclasses.replace(w, rate=None))
    return w.num_requests / s["duration_s"]


def compare(cost: Path, args: argparse.Namespace, name: str, level: str, w: WorkloadConfig,
            runs: list[dict[str, Any]]) -> dict[str, Any]:
    """A row of the table: the real runs' median against the simulator."""
    r, s = median_of(runs), pick(simulated(cost, args, w))
    row: dict[str, Any] = {
        "workload": name, "load": level, "rate_sessions_per_s": w.rate, "real": r,
        "real_runs": runs, "real_spread": spread(runs), "sim": s, **errors(r, s)}
    print(name, level, {k: round(v, 3) for k, v in errors(r, s).items()},
          "real spread", {k: round(v, 3) for k, v in row["real_spread"].items()}, flush=True)
    return row


def add_run_args(ap: argparse.ArgumentParser) -> None:
    """The instance and workload flags this benchmark and sim_step_check.py share."""
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--num-blocks", type=int, default=512)
    ap.add_argument("--host-bytes", type=int, default=256 * 2**20)
    ap.add_argument("--disk-bytes", type=int, default=2 * 2**30)
    ap.add_argument("--workloads", default=",".join(WORKLOADS))
    ap.add_argument("--levels", default=",".join(LEVELS))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cost-model", type=Path, default=None)
    add_run_args(ap)
    ap.add_argument("--profile-budget-s", type=float, default=240.0)
    ap.add_argument("--real-repeats", type=int, default=3)
    ap.add_argument("--profiles", type=int, default=2,
                    help="profiles to pool: the first before the real runs, the rest after "
                         "(not with --cost-model)")
    args = ap.parse_args()
    if args.profiles < 1 or args.real_repeats < 1:
        ap.error("--profiles and --real-repeats must be >= 1")
    with tempfile.TemporaryDirectory(prefix="sim-fidelity-") as tmp:
        profiles = [] if args.cost_model else [profile(args, Path(tmp) / "profile-0.json")]
        cost = args.cost_model or profiles[0]
        plan = [(name, level, dataclasses.replace(WORKLOADS[name], rate=cap * LEVELS[level],
                                                  seed=1))
                for name in args.workloads.split(",")
                for cap in [capacity(cost, args, WORKLOADS[name])]
                for level in args.levels.split(",")]
        reals: list[list[dict[str, Any]]] = [[] for _ in plan]
        for rnd in range(args.real_repeats):  # rounds over every row
            for i, (name, level, w) in enumerate(plan):
                reals[i].append(pick(real(args, w)))
                print(f"round {rnd + 1}: {name} {level} real", flush=True)
        if profiles:
            profiles += [profile(args, Path(tmp) / f"profile-{i}.json")
                         for i in range(1, args.profiles)]
            cost = merged(profiles)
    rows = [compare(cost, args, name, level, w, runs)
            for (name, level, w), runs in zip(plan, reals, strict=True)]
    keys = ("ttft_mean_err", "ttft_p99_err", "tpot_err", "throughput_err", "hit_tokens_err_pp")
    figures: dict[str, Any] = {f"{k}_max": max(row[k] for row in rows) for k in keys}
    figures["hit_tokens_err_max"] = figures.pop("hit_tokens_err_pp_max")
    figures["real_spread_max"] = {k: max(row["real_spread"][k] for row in rows)
                                  for k in METRICS}
    figures["table"] = rows
    config = {"model": "smollm2-135m-instruct", "cost_model": str(cost),
              "workloads": {k: dataclasses.asdict(v) for k, v in WORKLOADS.items()},
              "levels": LEVELS} | {k: v for k, v in vars(args).items() if k != "cost_model"}
    notes = {"targets": "TTFT mean and p99 within 10%; TPOT and throughput within 5%; "
                        "hit tokens within 2 percentage points",
             "hit_tokens_err_max": "percentage points of prompt tokens",
             "real": "the median of --real-repeats runs of the same workload and seed, run "
                     "in rounds over all rows; real_spread is (max - min) / mean across "
                     "them: the noise floor",
             "cost_model": "--profiles profiles pooled (one before the real runs, the rest "
                           "after); capacities (the rates) come from the first"}
    print("wrote", save("sim_fidelity", config, figures, notes))


if __name__ == "__main__":
    main()
