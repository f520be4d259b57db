"""Build CLI options from the config dataclasses: flags per field, help from its docs.

Every field gets `--<section>-<field>` and KVMESH_<SECTION>_<FIELD>; the bare `--<field>` and
KVMESH_<FIELD> stay aliases for the first class in the list that owns the name, so a later
section with a colliding field (a router's `port`) gets only the prefixed forms. --help shows
one name per field (the bare one where it exists) and each panel's title names the prefix.
Precedence: command-line flag > environment variable > --config file (YAML or TOML; keys are
field names or section_field names, or fields grouped under their section) > default.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import tomllib
import types
import typing
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import typer
import yaml

from kvmesh.config import split_by_section

_PREFIXED = "__prefixed"  # the hidden twin of a field's parameter
_CTX = "config_options_ctx"


def _base_type(tp: Any) -> Any:
    if isinstance(tp, str):
        tp = eval(tp, {"tuple": tuple, "str": str, "int": int, "float": float, "bool": bool})
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if typing.get_origin(tp) in (types.UnionType, typing.Union):
        return _base_type(args[0])
    if typing.get_origin(tp) is tuple:
        return str  # comma-separated
    return tp


def config_parameters(classes: Sequence[type[Any]]) -> list[inspect.Parameter]:
    """A keyword parameter `section__field` per field, shown in --help under its bare name
    where the class is that name's first owner, plus a hidden `section__field__prefixed`
    one for the prefixed flag and env var (folded back in by `with_config_options`)."""
    first_owner: dict[str, type[Any]] = {}
    for cls in classes:
        for f in dataclasses.fields(cls):
            first_owner.setdefault(f.name, cls)
    params: list[inspect.Parameter] = []
    taken: set[str] = set()
    for cls in classes:
        for f in dataclasses.fields(cls):
            prefixed = f"{cls.SECTION}_{f.name}"
            names = [f.name, prefixed] if first_owner[f.name] is cls else [prefixed]
            if clash := taken.intersection(names):
                raise ValueError(f"config option names clash: {sorted(clash)}")
            taken.update(names)
            param_names = [f"{cls.SECTION}__{f.name}", f"{cls.SECTION}__{f.name}{_PREFIXED}"]
            params += [_parameter(cls, f, *pair) for pair in zip(param_names, names, strict=False)]
    return params


def _parameter(
    cls: type[Any], f: dataclasses.Field[Any], param_name: str, name: str
) -> inspect.Parameter:
    default = f.default if f.default is not dataclasses.MISSING else None
    shown = ",".join(default) if isinstance(default, tuple) else default
    flag = f"--{name.replace('_', '-')}"
    option = typer.Option(
        None,
        f"{flag}/--no-{flag[2:]}" if _base_type(f.type) is bool else flag,
        help=f"{f.metadata.get('help', '')} (default: {shown})",
        envvar=f"KVMESH_{name.upper()}",
        show_default=False,
        hidden=param_name.endswith(_PREFIXED),
        rich_help_panel=f"{cls.__name__} (also --{cls.SECTION}-<field>, "
        f"KVMESH_{cls.SECTION.upper()}_<FIELD>)",
    )
    return inspect.Parameter(
        param_name,
        inspect.Parameter.KEYWORD_ONLY,
        default=option,
        annotation=_base_type(f.type) | None,
    )


def _fold_prefixed(values: dict[str, Any], ctx: typer.Context | None) -> dict[str, Any]:
    """Merge each hidden `*__prefixed` value into its visible twin: a flag beats an env var;
    from the same source, the prefixed form wins."""
    ranks = {"COMMANDLINE": 2, "ENVIRONMENT": 1}

    def rank(name: str) -> int:
        source = ctx.get_parameter_source(name) if ctx else None
        return -1 if values[name] is None else ranks.get(source.name if source else "", 0)

    out = {name: value for name, value in values.items() if not name.endswith(_PREFIXED)}
    for name in values.keys() - out.keys():
        visible = name[: -len(_PREFIXED)]
        if rank(name) >= rank(visible):
            out[visible] = values[name]
    return out


def load_config_file(path: Path | None) -> dict[str, Any]:
    """The file's keys: top-level ones as written, a section's as `section.field`."""
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
            flat.update({f"{key}.{name}": item for name, item in value.items()})
        else:
            flat[key] = value
    return flat


def build_configs(
    classes: Sequence[type[Any]], values: dict[str, Any], file_values: dict[str, Any]
) -> list[Any]:
    """Instantiate each class from flag/env values over file values.

    Keys are resolved by `split_by_section` (bare names go to their first owner); None
    values mean "not given". BadParameter for unknown keys, ValueError for invalid values.
    """
    given = {key: value for key, value in values.items() if value is not None}
    try:
        from_file = split_by_section(classes, file_values, first_owner_wins=True)
        from_cli = split_by_section(classes, given, first_owner_wins=True)
    except (TypeError, ValueError) as exc:
        raise typer.BadParameter(str(exc)) from exc
    out: list[Any] = []
    for cls, file_kwargs, cli_kwargs in zip(classes, from_file, from_cli, strict=True):
        merged = {**file_kwargs, **cli_kwargs}
        kinds = {f.name: f for f in dataclasses.fields(cls)}
        out.append(cls(**{name: _coerce(kinds[name], v) for name, v in merged.items()}))
    return out


def _coerce(f: dataclasses.Field[Any], value: Any) -> Any:
    if isinstance(f.default, tuple):  # tuple fields: a list, or a comma-separated string
        return tuple(value.split(",")) if isinstance(value, str) else tuple(value)
    return value


def with_config_options(classes: Sequence[type[Any]]) -> Callable[[Callable], Callable]:
    """Give `fn(config_file, **fields)` a signature typer can read; `fields` arrive keyed
    `section__field`, ready for `build_configs`."""

    def wrap(fn: Callable) -> Callable:
        @functools.wraps(fn)
        def command(*args: Any, **kwargs: Any) -> Any:
            ctx = kwargs.pop(_CTX, None)
            return fn(*args, **_fold_prefixed(kwargs, ctx))

        sig = inspect.signature(fn)
        fixed = [p for p in sig.parameters.values() if p.kind != inspect.Parameter.VAR_KEYWORD]
        kind = inspect.Parameter.KEYWORD_ONLY
        ctx_param = inspect.Parameter(_CTX, kind, annotation=typer.Context)
        params = [*fixed, *config_parameters(classes), ctx_param]
        command.__signature__ = sig.replace(parameters=params)  # type: ignore[attr-defined]
        return command

    return wrap
