"""Routing configuration keys to their sections: shared by the CLI, `LLM(...)` and config
files. A key is a field name, or `section_field`, `section.field` or `section__field`."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any


def help_field(text: str, **kwargs: Any) -> Any:
    """A dataclass field documented by `text` (its --help)."""
    return dataclasses.field(metadata={"help": text}, **kwargs)


def field_help(cls: type) -> dict[str, str]:
    """Field name -> help text, for the CLI."""
    return {f.name: f.metadata.get("help", "") for f in dataclasses.fields(cls)}


class UnknownConfigKeys(TypeError):
    """Keys that name no field of the given sections."""

    def __init__(self, keys: list[str], sections: list[str]) -> None:
        self.keys = keys
        super().__init__(
            f"unknown config keys: {keys} (valid: field names of sections "
            f"{', '.join(sections)}, or section_field / section.field)"
        )


def _field_names(cls: type[Any]) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)}


def _resolve(classes: Sequence[type[Any]], key: str, first_owner_wins: bool) -> tuple[int, str]:
    """(index of the owning class, field name) for a bare or prefixed key; KeyError if none."""
    owners = [i for i, cls in enumerate(classes) if key in _field_names(cls)]
    if len(owners) == 1 or (owners and first_owner_wins):
        return owners[0], key
    if owners:
        forms = " or ".join(f"{classes[i].SECTION}_{key}" for i in owners)
        raise ValueError(f"config key {key!r} is ambiguous: use {forms}")
    for i, cls in enumerate(classes):
        for sep in (".", "__", "_"):
            prefix = cls.SECTION + sep
            if key.startswith(prefix) and key[len(prefix) :] in _field_names(cls):
                return i, key[len(prefix) :]
    raise KeyError(key)


def split_by_section(
    classes: Sequence[type[Any]], values: Mapping[str, Any], *, first_owner_wins: bool = False
) -> list[dict[str, Any]]:
    """Route keyword values to their owning classes: one kwargs dict per class, in order.

    A key is a field name, or `section_field`, `section.field` or `section__field`. A field
    name that several classes own goes to the first of them when `first_owner_wins` (the
    CLI's alias rule) and is an error otherwise. Raises UnknownConfigKeys (a TypeError) for
    keys that match nothing, ValueError for an ambiguous key or a field given twice.
    """
    sections = [cls.SECTION for cls in classes]
    if len(set(sections)) != len(sections):
        raise ValueError(f"duplicate config sections: {sections}")
    out: list[dict[str, Any]] = [{} for _ in classes]
    given: dict[tuple[int, str], str] = {}
    unknown = []
    for key, value in values.items():
        try:
            index, name = _resolve(classes, key, first_owner_wins)
        except KeyError:
            unknown.append(key)
            continue
        if (index, name) in given:
            first = given[index, name]
            raise ValueError(f"{sections[index]}.{name} given twice: as {first!r} and {key!r}")
        given[index, name] = key
        out[index][name] = value
    if unknown:
        raise UnknownConfigKeys(unknown, sections)
    return out
