"""Validation of an objective's ``[objective]`` table against its documented defaults."""

from __future__ import annotations

from typing import Any

from lensnas.spaces.dimensions import SpaceError, closest


def check_options(table: Any, defaults: dict[str, Any], prefix: str = "objective") -> dict[str, Any]:
    """Defaults overlaid with ``table``; unknown keys and wrong types raise SpaceError.

    A key's type must match its default's (an int is accepted where a float is expected;
    a default of None accepts anything and leaves the check to the objective).
    """
    if not isinstance(table, dict):
        raise SpaceError(prefix, f"must be a table, got {type(table).__name__}")
    options = dict(defaults)
    for key, value in table.items():
        if key not in defaults:
            raise SpaceError(
                f"{prefix}.{key}",
                f"unknown key{closest(key, defaults)}; allowed: {', '.join(sorted(defaults))}",
            )
        default = defaults[key]
        if default is not None and not _same_type(value, default):
            raise SpaceError(
                f"{prefix}.{key}", f"must be {_type_name(default)}, got {value!r}"
            )
        options[key] = float(value) if isinstance(default, float) else value
    return options


def _same_type(value: Any, default: Any) -> bool:
    if isinstance(default, bool):
        return isinstance(value, bool)
    if isinstance(default, float):
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if isinstance(default, int):
        return isinstance(value, int) and not isinstance(value, bool)
    if isinstance(default, list):
        return isinstance(value, list)
    return isinstance(value, type(default))


def _type_name(default: Any) -> str:
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string",
            list: "a list", dict: "a table"}.get(type(default), type(default).__name__)


def require(condition: bool, key: str, message: str) -> None:
    """Raise SpaceError(key, message) unless ``condition``."""
    if not condition:
        raise SpaceError(key, message)


def require_folder_keys_unset(
    options: dict[str, Any], defaults: dict[str, Any], folder_keys: tuple[str, ...], prefix: str
) -> None:
    """For a simulated source: the folder-only keys keep their defaults and images are
    normalised (SpaceError naming the key otherwise)."""
    source = options["source"]
    for key in folder_keys:
        require(options[key] == defaults[key], f"{prefix}.{key}",
                f'is only used with source = "folder" (source is {source!r})')
    require(options["normalize"], f"{prefix}.normalize",
            'simulated images are always normalised; false is only for source = "folder"')
