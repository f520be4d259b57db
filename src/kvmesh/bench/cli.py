"""`kvmesh bench`: build a workload, drive it, write JSON (and PNG plots)."""

from __future__ import annotations

import asyncio
import shlex
import sys
from pathlib import Path
from typing import Any

import typer
from rich.console import Console

from kvmesh.bench import datasets as ds
from kvmesh.bench.arrivals import DEFAULT_MAX_DURATION_S
from kvmesh.bench.client import Endpoint
from kvmesh.bench.metrics import SLO, summarize
from kvmesh.bench.report import plot_sweep, plot_ttft_cdf, result_doc, write_json
from kvmesh.bench.runner import LoadProfile, run_load
from kvmesh.bench.workload import DATASETS, WorkloadConfig


def build_dataset(
    name: str,
    n: int,
    input_len: int,
    output_len: int,
    seed: int,
    trace: Path | None,
    time_scale: float,
    length_scale: float,
    turns: int,
    groups: int,
) -> list[ds.Session]:
    try:
        return WorkloadConfig(name, n, input_len, output_len, turns, groups,
                              str(trace) if trace else None, time_scale, length_scale,
                              seed=seed).sessions()
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from exc


def run_once(ep: Endpoint, sessions, profile: LoadProfile, slo: SLO, progress: bool):
    records, duration = asyncio.run(run_load(ep, sessions, profile, progress))
    return records, summarize(records, duration, slo)


def bench_command(
    base_url: str = typer.Option("http://127.0.0.1:8000", help="Server base URL."),
    model: str | None = typer.Option(None, help="Model name to send (default: none)."),
    api: str = typer.Option("chat", help="chat or completions."),
    api_key: str | None = typer.Option(None, envvar="KVMESH_BENCH_API_KEY", help="API key."),
    dataset: str = typer.Option("random", help=f"One of {', '.join(DATASETS)}."),
    num_requests: int = typer.Option(32, help="Requests (sessions for multiturn)."),
    input_len: int = typer.Option(128, help="Prompt length in words (prefix/doc length)."),
    output_len: int = typer.Option(64, help="Output tokens per request (cap, for traces)."),
    turns: int = typer.Option(4, help="Turns per multiturn session."),
    groups: int = typer.Option(4, help="Prefix groups / distinct documents."),
    trace: Path | None = typer.Option(None, help="Trace file (.jsonl Mooncake, .csv Azure)."),
    time_scale: float = typer.Option(1.0, help="Multiply trace timestamps by this."),
    length_scale: float = typer.Option(1.0, help="Multiply trace lengths by this."),
    rate: float | None = typer.Option(None, help="Poisson arrival rate (req/s)."),
    burstiness: float = typer.Option(1.0, help="Gamma shape of inter-arrivals (1 = Poisson)."),
    concurrency: int | None = typer.Option(None, help="Most requests in flight."),
    sweep: str | None = typer.Option(None, help="Comma-separated rates to sweep."),
    slo: str | None = typer.Option(None, help="Goodput SLO, e.g. ttft_ms=500,tpot_ms=50."),
    ignore_eos: bool = typer.Option(True, help="Ask the server to ignore EOS (fixed lengths)."),
    max_duration_s: float = typer.Option(DEFAULT_MAX_DURATION_S,
                                         help="Stop sending after this many seconds."),
    seed: int = typer.Option(0, help="Workload and arrival seed."),
    out: Path = typer.Option(Path("bench.json"), help="JSON result path."),
    plot: Path | None = typer.Option(None, help="PNG plot path."),
    progress: bool = typer.Option(True, help="Show a progress bar."),
) -> None:
    """Load-test an OpenAI-compatible endpoint and report TTFT/TPOT/ITL/e2e and goodput."""
    console = Console(stderr=True)
    try:
        slo_obj = SLO.parse(slo)
        rates = [float(r) for r in sweep.split(",")] if sweep else [rate]
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from exc
    if api not in ("chat", "completions"):
        raise typer.BadParameter("--api must be chat or completions")
    ep = Endpoint(base_url, model, api, api_key)
    runs: list[dict[str, Any]] = []
    for r in rates:
        sessions = build_dataset(
            dataset,
            num_requests,
            input_len,
            output_len,
            seed,
            trace,
            time_scale,
            length_scale,
            turns,
            groups,
        )
        profile = LoadProfile(
            rate=r,
            burstiness=burstiness,
            concurrency=concurrency,
            use_trace_times=dataset == "trace" and r is None,
            max_duration_s=max_duration_s,
            ignore_eos=ignore_eos,
            seed=seed,
        )
        records, summary = run_once(ep, sessions, profile, slo_obj, progress)
        runs.append({"rate": r, "summary": summary, "records": [x.to_json() for x in records]})
        _print(console, r, summary)
    config = {
        "base_url": base_url,
        "api": api,
        "dataset": dataset,
        "num_requests": num_requests,
        "input_len": input_len,
        "output_len": output_len,
        "burstiness": burstiness,
        "concurrency": concurrency,
        "rates": rates,
        "seed": seed,
        "trace": str(trace) if trace else None,
    }
    figures = (
        runs[0]["summary"]
        if len(runs) == 1
        else {"sweep": [{"rate": x["rate"], **x["summary"]} for x in runs]}
    )
    doc = result_doc("bench", shlex.join(["kvmesh", "bench", *sys.argv[2:]]), config, figures)
    doc["runs"] = runs
    write_json(out, doc)
    if plot is not None:
        if len(runs) > 1:
            plot_sweep([x["rate"] for x in runs], [x["summary"] for x in runs], plot)
        else:
            ttfts = [x["ttft_s"] for x in runs[0]["records"] if x["ttft_s"] is not None]
            plot_ttft_cdf({dataset: ttfts}, plot)
    console.print(f"wrote {out}")
    if any(x["summary"]["completed"] == 0 for x in runs):
        raise typer.Exit(1)


def _print(console: Console, rate: float | None, s: dict[str, Any]) -> None:
    def ms(v: float | None) -> str:
        return "-" if v is None else f"{v * 1000:.1f}"

    console.print(
        f"rate={rate or 'max'} completed={s['completed']}/{s['num_requests']} "
        f"req/s={s['req_per_s']:.2f} out tok/s={s['output_tok_per_s']:.1f} "
        f"TTFT p50/p99={ms(s['ttft_s']['p50'])}/{ms(s['ttft_s']['p99'])} ms "
        f"TPOT p50={ms(s['tpot_s']['p50'])} ms cached={s['cached_token_ratio'] or 0:.2f}"
    )
