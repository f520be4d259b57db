"""The routing gain in the simulator: `benchmarks/router.py`'s workload over many seeds.

The real benchmark runs each policy on three model instances for about 6 minutes, so it
can afford a few repeats of one workload; the simulator runs the same policies, the same
engine scheduler and KV cache code and the same kind of sessions in a fraction of a second
each, over many seeds, which is what choosing the cost function's weights needs. Step
times come from a `kvmesh profile` cost model (default: results/sim_cost_model.json),
multiplied by `--slowdown` (the real benchmark's instances run one thread each, three to
a 2-core machine).

    python benchmarks/router_sim.py [--seeds 24] [--weights -:1,512:0] [--workload light]

Its default workload is router.py's `light` preset (router.py's own default is
`pressure`): that is where the weights were chosen and what router_sim.json holds.

Each `--weights` entry is `load_cost_tokens:queue_weight` for `kv` and `prefix` (`-`: the
policy's default, 256 for kv and 512 for prefix); the ratios are against round_robin on
the same seed. Writes results/router_sim.json (`--name` for another workload's file).
"""

from __future__ import annotations

import argparse
import statistics
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
from common import RESULTS, save  # noqa: E402

from kvmesh.bench.metrics import percentile  # noqa: E402
from kvmesh.bench.runner import LoadProfile  # noqa: E402
from kvmesh.config import CacheConfig, SchedulerConfig, TierConfig  # noqa: E402
from kvmesh.model.registry import resolve_model  # noqa: E402
from kvmesh.model.tokenizer import Tokenizer  # noqa: E402
from kvmesh.router.policies import RouteWeights  # noqa: E402
from kvmesh.sim import cost_model  # noqa: E402
from kvmesh.sim.instance import InstanceSpec  # noqa: E402
from kvmesh.sim.run import session_starts  # noqa: E402
from kvmesh.sim.simulator import Simulator  # noqa: E402
from kvmesh.sim.workload import from_bench  # noqa: E402
from router import add_workload_args, sessions, workload_args  # noqa: E402


def slowed(model: Any, factor: float) -> Any:
    coef = {k: v * factor for k, v in model.coefficients.items()}
    return replace(model, coefficients=coef)


def one_run(policy: str, weights: RouteWeights, args: argparse.Namespace, seed: int,
            cost: Any, tok: Tokenizer) -> dict[str, Any]:
    text = sessions(args.sessions, args.turns, args.groups, args.output_len, seed,
                    args.think_s, args.system_words)
    work = from_bench(text, tok)
    starts = session_starts(work, text, LoadProfile(rate=args.rate, seed=seed))
    spec = InstanceSpec(SchedulerConfig(), CacheConfig(num_blocks=args.num_blocks or None),
                        TierConfig())
    sim = Simulator(spec, cost, 3, policy, weights=weights)
    run = sim.run(work, starts)
    ok = [r for r in run.records if r.ok]
    ttft = [r.ttft_s for r in ok if r.ttft_s is not None]
    return {"hit_tokens": sum(r.cached_tokens or 0 for r in ok),
            "ttft_p50_s": percentile(ttft, 50), "ttft_p99_s": percentile(ttft, 99),
            "completed": len(ok)}


def parse_weights(spec: str) -> list[RouteWeights]:
    """`load_cost_tokens:queue_weight`, comma-separated; `-` for the policy's default."""
    out = []
    for item in spec.split(","):
        load, _, queue = item.partition(":")
        out.append(RouteWeights(load_cost_tokens=None if load == "-" else float(load),
                                queue_weight=float(queue or 1.0)))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=24)
    ap.add_argument("--weights", default="-:1,512:0,512:1,256:1,128:1,384:1")
    ap.add_argument("--policies", default="kv,prefix")
    ap.add_argument("--cost-model", default=str(RESULTS / "sim_cost_model.json"))
    ap.add_argument("--slowdown", type=float, default=2.5)
    add_workload_args(ap)
    ap.set_defaults(workload="light")
    ap.add_argument("--name", default="router_sim", help="results file name")
    args = workload_args(ap.parse_args())
    cost = slowed(cost_model.load(args.cost_model), args.slowdown)
    tok = Tokenizer(resolve_model("smollm2-135m-instruct", progress=False).path)
    seeds = range(1, args.seeds + 1)
    base = {s: one_run("round_robin", RouteWeights(), args, s, cost, tok) for s in seeds}
    figures: dict[str, Any] = {"round_robin": {
        "hit_tokens_median": statistics.median(b["hit_tokens"] for b in base.values()),
        "ttft_p99_s_median": statistics.median(b["ttft_p99_s"] for b in base.values())}}
    for policy in args.policies.split(","):
        for w in parse_weights(args.weights):
            hits, p99, absolute = [], [], []
            for s in seeds:
                r = one_run(policy, w, args, s, cost, tok)
                absolute.append(r["hit_tokens"])
                hits.append(r["hit_tokens"] / max(1, base[s]["hit_tokens"]))
                p99.append(r["ttft_p99_s"] / base[s]["ttft_p99_s"])
            load = "default" if w.load_cost_tokens is None else f"{w.load_cost_tokens:g}"
            name = f"{policy} load={load} queue={w.queue_weight:g}"
            figures[name] = {
                "hit_tokens_median": statistics.median(absolute),
                "hit_ratio_median": statistics.median(hits), "hit_ratio_min": min(hits),
                "p99_ratio_median": statistics.median(p99), "p99_ratio_max": max(p99),
                "seeds_p99_ratio_le_0.7": sum(x <= 0.7 for x in p99),
                "seeds_hit_ratio_ge_2": sum(x >= 2 for x in hits)}
            print(name, {k: round(v, 3) for k, v in figures[name].items()}, flush=True)
    config = {k: v for k, v in vars(args).items() if k != "name"}
    save(args.name, config, figures,
         {"what": "ratios against round_robin on the same seed (workload and arrivals); "
                  "medians over seeds", "seeds": args.seeds})


if __name__ == "__main__":
    main()
