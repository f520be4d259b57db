"""`kvmesh sim`: a workload through simulated instances; the same flags as `serve` for the
engine sections and as `bench` for the workload."""

from __future__ import annotations

import random
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import Progress

from kvmesh.bench.metrics import SLO
from kvmesh.bench.workload import WorkloadConfig
from kvmesh.config import DEFAULT_MODEL, CacheConfig, SchedulerConfig, TierConfig
from kvmesh.sim import cost_model as cm
from kvmesh.sim.instance import InstanceSpec
from kvmesh.sim.planner import Prices, SearchSpace
from kvmesh.sim.run import SimConfig, session_starts, simulate
from kvmesh.sim.workload import SimWorkload, from_bench, trace_sessions

SIM_CLASSES = [SimConfig, WorkloadConfig, CacheConfig, SchedulerConfig, TierConfig]
console = Console(stderr=True)


def build_sessions(w: WorkloadConfig, tokenizer_model: str) -> SimWorkload:
    """The workload as token ids, with start times drawn as `kvmesh bench` draws them."""
    if w.dataset == "trace":
        assert w.trace is not None
        sessions = trace_sessions(Path(w.trace), w.num_requests, w.time_scale, w.length_scale,
                                  w.output_len, w.seed)
        return SimWorkload(sessions, session_starts(sessions, None, w.profile()))
    from kvmesh.bench.datasets import words
    from kvmesh.model.registry import resolve_model
    from kvmesh.model.tokenizer import Tokenizer

    tokenizer = Tokenizer(resolve_model(tokenizer_model, progress=False).path)
    text = w.sessions()
    sessions = from_bench(text, tokenizer)
    filler = tuple(tokenizer.encode(words(random.Random(0), 4000), add_special_tokens=False))
    return SimWorkload(sessions, session_starts(sessions, text, w.profile()), filler)


def run_sim(sim: SimConfig, w: WorkloadConfig, spec: InstanceSpec, progress: bool = True,
            tokenizer_model: str = DEFAULT_MODEL) -> dict[str, Any]:
    cost = cm.load(sim.cost_model)
    work = build_sessions(w, tokenizer_model)
    total = sum(s.num_turns for s in work.sessions)
    t0 = time.perf_counter()
    with Progress(disable=not progress, transient=True, console=console) as bar:
        task = bar.add_task("simulated requests", total=total)
        figures = simulate(spec, cost, sim, work.sessions, work.starts, w.concurrency,
                           w.max_duration_s, lambda n: bar.advance(task, n), work.filler)
    figures["wall_s"] = time.perf_counter() - t0
    figures["cost_model"] = cost.to_json()
    return figures


def print_summary(s: dict[str, Any]) -> None:
    def ms(v: float | None) -> str:
        return "-" if v is None else f"{v * 1000:.1f}"

    tiers = s["tiers"]
    hits = " ".join(f"{name}={t['hit_tokens']}" for name, t in tiers.items()
                    if isinstance(t, dict))
    console.print(
        f"completed={s['completed']}/{s['num_requests']} simulated={s['duration_s']:.1f}s "
        f"out tok/s={s['output_tok_per_s'] or 0:.1f} TTFT mean/p99={ms(s['ttft_s']['mean'])}/"
        f"{ms(s['ttft_s']['p99'])} ms TPOT mean={ms(s['tpot_s']['mean'])} ms hit tokens: "
        f"{hits} (wall {s['wall_s']:.1f}s)")


def plan_command(simc: SimConfig, w: WorkloadConfig, base: InstanceSpec, space: SearchSpace,
                 prices: Prices, out: Path, plot: Path | None, tokenizer_model: str) -> None:
    """Run the planner and write its ranked table (JSON), frontier plot and summary."""
    import shlex
    import sys

    from kvmesh.bench.report import plot_frontier, result_doc, write_json
    from kvmesh.sim.planner import frontier, plan

    slo = SLO.parse(simc.slo)
    cost = cm.load(simc.cost_model)
    work = build_sessions(w, tokenizer_model)
    candidates = space.candidates()
    with Progress(transient=True, console=console) as bar:
        task = bar.add_task("candidates", total=len(candidates))
        rows = plan(space, base, cost, prices, slo, work, w.concurrency,
                    lambda: bar.advance(task))
    front = frontier(rows)
    doc = result_doc("plan", shlex.join(["kvmesh", "plan", *sys.argv[2:]]),
                     {"workload": vars(w), "slo": simc.slo, "prices": vars(prices),
                      "space": vars(space), "cost_model": cost.to_json()},
                     {"ranked": rows, "frontier": front,
                      "best": rows[0] if rows and rows[0]["meets_slo"] else None})
    write_json(out, doc)
    if plot is not None:
        plot_frontier(rows, front, plot)
    for i, r in enumerate(rows[:10]):
        console.print(f"{i + 1:2d}. {_row_text(r)}")
    console.print(f"wrote {out}")


def search_space(instances: list[float], host_gb: list[float], disk_gb: list[float],
                 block_sizes: list[float], routes: list[str],
                 evictions: list[str]) -> SearchSpace:
    """The planner's grid from the CLI's lists; ValueError for unknown names."""
    from kvmesh.kvstore.eviction import make_eviction_policy
    from kvmesh.router.policies import make_route_policy

    for route in routes:
        make_route_policy(route)
    for name in evictions:
        make_eviction_policy(name, 1)
    return SearchSpace([int(n) for n in instances], host_gb, disk_gb,
                       [int(b) for b in block_sizes], routes, evictions)


def _row_text(r: dict[str, Any]) -> str:
    c = r["candidate"]
    return (f"{'ok  ' if r['meets_slo'] else 'miss'} ${r['price_per_hour']:.2f}/h "
            f"n={c['num_instances']} host={c['host_gb']}GB disk={c['disk_gb']}GB "
            f"bs={c['block_size']} {c['route']} {c['eviction']}: "
            f"{r['output_tok_per_s']:.0f} tok/s, TTFT p99 {(r['ttft_p99_s'] or 0) * 1000:.0f} "
            f"ms, TPOT p99 {(r['tpot_p99_s'] or 0) * 1000:.1f} ms")
