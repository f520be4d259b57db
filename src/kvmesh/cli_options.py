"""Build CLI options from the config dataclasses: one flag per field, help from its docs.

Precedence: command-line flag > KVMESH_<FIELD> environment variable > --config file
(YAML or TOML, keys are field names, optionally grouped by section) > dataclass default.
"""

from __future__ import annotations

import dataclasses
import inspect
import tomllib
import types
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any

import typer
import yaml


def _base_type(tp: Any) -> Any:
    if isinstance(tp, str):
        tp = eval(tp, {"tuple": tuple, "str": str, "int": int, "float": float, "bool": bool})
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if typing.get_origin(tp) in (types.UnionType, typing.Union):
        return _base_type(args[0])
    if typing.get_origin(tp) is tuple:
        return str  # comma-separated
    return tp


def config_parameters(classes: list[type]) -> list[inspect.Parameter]:
    params = []
    for cls in classes:
        for f in dataclasses.fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else None
            shown = ",".join(default) if isinstance(default, tuple) else default
            flag = f"--{f.name.replace('_', '-')}"
            if _base_type(f.type) is bool:
                flag = f"{flag}/--no-{flag[2:]}"
            option = typer.Option(
                None,
                flag,
                help=f"{f.metadata.get('help', '')} (default: {shown})",
                envvar=f"KVMESH_{f.name.upper()}",
                show_default=False,
                rich_help_panel=cls.__name__,
            )
            annotation = _base_type(f.type) | None
            params.append(
                inspect.Parameter(
                    f.name, inspect.Parameter.KEYWORD_ONLY, default=option, annotation=annotation
                )
            )
    return params


def load_config_file(path: Path | None) -> dict[str, Any]:
    if path is None:
        return {}
    if not path.is_file():
        raise typer.BadParameter(f"config file {path} does not exist")
    text = path.read_text()
    data = tomllib.loads(text) if path.suffix == ".toml" else yaml.safe_load(text)
    if not isinstance(data, dict):
        raise typer.BadParameter(f"config file {path} must hold a mapping")
    flat: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict):
            flat.update(value)
        else:
            flat[key] = value
    return flat


def build_configs(classes: list[type], values: dict[str, Any], file_values: dict[str, Any]):
    """Instantiate each class from flag/env values over file values. ValueError if invalid."""
    known = {f.name for c in classes for f in dataclasses.fields(c)}
    unknown = set(file_values) - known
    if unknown:
        raise typer.BadParameter(f"unknown config keys: {sorted(unknown)}")
    merged = {**file_values, **{k: v for k, v in values.items() if v is not None}}
    out = []
    for cls in classes:
        kwargs = {}
        for f in dataclasses.fields(cls):
            if f.name in merged:
                value = merged[f.name]
                if (
                    _base_type(f.type) is str
                    and typing.get_origin(f.type) is None
                    and isinstance(f.default, tuple)
                ):
                    value = tuple(value.split(",")) if isinstance(value, str) else tuple(value)
                kwargs[f.name] = value
        out.append(cls(**kwargs))
    return out


def with_config_options(classes: list[type]) -> Callable[[Callable], Callable]:
    """Give `fn(config_file, **fields)` a signature typer can read."""

    def wrap(fn: Callable) -> Callable:
        sig = inspect.signature(fn)
        fixed = [p for p in sig.parameters.values() if p.kind != inspect.Parameter.VAR_KEYWORD]
        fn.__signature__ = sig.replace(parameters=fixed + config_parameters(classes))  # type: ignore[attr-defined]
        return fn

    return wrap
