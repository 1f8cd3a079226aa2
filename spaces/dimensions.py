"""Declarative search dimensions (from a study file's ``[space]``) and define-by-run suggestion.

A ``[space]`` entry is either a fixed value (``epochs = 5``) or a table::

    width = { type = "int", low = 8, high = 64, log = true }
    learning_rate = { type = "float", low = 1e-4, high = 1e-2, log = true }
    pooling = { type = "categorical", choices = ["max", "avg"] }
    dense_units = { type = "int", low = 32, high = 256, when = { head = ["dense"] } }

``when`` makes a dimension conditional: it exists only when every named dimension
takes one of the listed values.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol

from lensnas.spaces.errors import StudyFileError

Scalar = bool | int | float | str
TYPES = ("int", "float", "categorical")
KEYS_BY_TYPE = {
    "int": {"type", "low", "high", "step", "log", "when"},
    "float": {"type", "low", "high", "step", "log", "when"},
    "categorical": {"type", "choices", "when"},
}


class SpaceError(StudyFileError):
    """A malformed dimension or option; ``key`` is the dotted path inside the study file."""

    def __init__(self, key: str, message: str):
        super().__init__(f"{key}: {message}")
        self.key = key
        self.message = message


def closest(word: str, allowed: Iterable[str]) -> str:
    """' (did you mean X?)' for the closest allowed word, or ''."""
    match = difflib.get_close_matches(word, list(allowed), n=1, cutoff=0.6)
    return f" (did you mean '{match[0]}'?)" if match else ""


def unknown_key(key: str, word: str, allowed: Iterable[str]) -> SpaceError:
    allowed = sorted(allowed)
    return SpaceError(
        key, f"unknown key '{word}'{closest(word, allowed)}; allowed: {', '.join(allowed)}"
    )


class Suggester(Protocol):
    """What an ``optuna.Trial`` offers (and what a Ray/Optuna define-by-run trial offers)."""

    def suggest_int(self, name: str, low: int, high: int, *, step: int = 1, log: bool = False) -> int: ...
    def suggest_float(self, name: str, low: float, high: float, *, step: float | None = None, log: bool = False) -> float: ...
    def suggest_categorical(self, name: str, choices: Any) -> Any: ...


def _is_scalar(value: Any) -> bool:
    return isinstance(value, (bool, int, float, str))


@dataclass(frozen=True)
class Dimension:
    """One searched or fixed parameter of a space."""

    name: str
    kind: str  # "int", "float", "categorical", "fixed"
    low: float | None = None
    high: float | None = None
    step: float | None = None
    log: bool = False
    choices: tuple[Scalar, ...] = ()
    value: Scalar | None = None
    when: dict[str, tuple[Scalar, ...]] = field(default_factory=dict)

    @property
    def searched(self) -> bool:
        return self.kind != "fixed"

    def active(self, params: dict[str, Any]) -> bool:
        """Whether the conditions of this dimension hold for the params chosen so far."""
        return all(name in params and params[name] in values for name, values in self.when.items())

    def suggest(self, trial: Suggester) -> Scalar:
        if self.kind == "fixed":
            return self.value
        if self.kind == "int":
            return trial.suggest_int(self.name, int(self.low), int(self.high), step=int(self.step or 1), log=self.log)
        if self.kind == "float":
            return trial.suggest_float(self.name, self.low, self.high, step=self.step, log=self.log)
        return trial.suggest_categorical(self.name, list(self.choices))

    def admits(self, value: Any) -> bool:
        """Whether ``value`` is a possible outcome of this dimension."""
        if self.kind == "fixed":
            return value == self.value and type(value) is type(self.value)
        if self.kind == "categorical":
            return any(value == c and type(value) is type(c) for c in self.choices)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False
        if not self.low <= value <= self.high:
            return False
        if self.kind == "int":
            return float(value).is_integer() and (value - self.low) % int(self.step or 1) == 0
        return True

    def possible_values(self) -> tuple[Scalar, ...] | None:
        """All outcomes for categorical/fixed dimensions, None for ranges."""
        if self.kind == "fixed":
            return (self.value,)
        if self.kind == "categorical":
            return self.choices
        return None


def _number(key: str, value: Any, integer: bool) -> float | int:
    wanted = "an integer" if integer else "a number"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise SpaceError(key, f"must be {wanted}, got {value!r}")
    if integer and not isinstance(value, int):
        raise SpaceError(key, f"must be {wanted}, got {value!r}")
    if not math.isfinite(value):
        raise SpaceError(key, f"must be finite, got {value!r}")
    return value


def parse_dimension(name: str, entry: Any, prefix: str = "space") -> Dimension:
    """Turn one ``[space]`` entry into a Dimension, raising SpaceError on anything malformed."""
    key = f"{prefix}.{name}"
    if _is_scalar(entry):
        return Dimension(name, "fixed", value=entry)
    if isinstance(entry, list):
        raise SpaceError(key, 'a list is not a dimension; write { type = "categorical", choices = [...] }')
    if not isinstance(entry, dict):
        raise SpaceError(key, f"must be a value or a table with 'type', got {type(entry).__name__}")
    kind = entry.get("type")
    if kind not in TYPES:
        hint = closest(kind, TYPES) if isinstance(kind, str) else ""
        raise SpaceError(f"{key}.type", f"must be one of {', '.join(TYPES)}, got {kind!r}{hint}")
    for word in entry:
        if word not in KEYS_BY_TYPE[kind]:
            raise unknown_key(key, word, KEYS_BY_TYPE[kind])
    when = _parse_when(f"{key}.when", entry.get("when", {}))
    if kind == "categorical":
        choices = entry.get("choices")
        if not isinstance(choices, list) or not choices:
            raise SpaceError(f"{key}.choices", f"must be a non-empty list, got {choices!r}")
        for i, choice in enumerate(choices):
            if not _is_scalar(choice):
                raise SpaceError(f"{key}.choices[{i}]", f"must be a string, number or boolean, got {choice!r}")
        if len({(type(c), c) for c in choices}) != len(choices):
            raise SpaceError(f"{key}.choices", f"has repeated values: {choices!r}")
        return Dimension(name, kind, choices=tuple(choices), when=when)

    integer = kind == "int"
    for word in ("low", "high"):
        if word not in entry:
            raise SpaceError(f"{key}.{word}", f"missing; a {kind} dimension needs low and high")
    low = _number(f"{key}.low", entry["low"], integer)
    high = _number(f"{key}.high", entry["high"], integer)
    if low > high:
        raise SpaceError(key, f"impossible range: low={low} > high={high}")
    log = entry.get("log", False)
    if not isinstance(log, bool):
        raise SpaceError(f"{key}.log", f"must be true or false, got {log!r}")
    step = entry.get("step")
    if step is not None:
        step = _number(f"{key}.step", step, integer)
        if step <= 0:
            raise SpaceError(f"{key}.step", f"must be positive, got {step}")
        if log and step != 1:
            raise SpaceError(key, "step and log cannot be combined (allowed: step=1 with log)")
        if (high - low) < step and high != low:
            raise SpaceError(f"{key}.step", f"step {step} is larger than the range {low}..{high}")
    if log and low <= 0:
        raise SpaceError(f"{key}.low", f"must be > 0 for a log dimension, got {low}")
    if log and step == 1 and not integer:
        step = None
    return Dimension(name, kind, low=low, high=high, step=step, log=log, when=when)


def _parse_when(key: str, when: Any) -> dict[str, tuple[Scalar, ...]]:
    if not isinstance(when, dict):
        raise SpaceError(key, f"must be a table like {{ head = [\"dense\"] }}, got {when!r}")
    parsed = {}
    for parent, values in when.items():
        values = values if isinstance(values, list) else [values]
        if not values or not all(_is_scalar(v) for v in values):
            raise SpaceError(f"{key}.{parent}", f"must be a value or a non-empty list of values, got {values!r}")
        parsed[parent] = tuple(values)
    return parsed


def parse_space(space: Any, prefix: str = "space") -> list[Dimension]:
    """Parse a whole ``[space]`` table; dimensions come back in an order where parents precede children."""
    if not isinstance(space, dict):
        raise SpaceError(prefix, f"must be a table, got {type(space).__name__}")
    dimensions = {name: parse_dimension(name, entry, prefix) for name, entry in space.items()}
    for dimension in dimensions.values():
        for parent, values in dimension.when.items():
            key = f"{prefix}.{dimension.name}.when.{parent}"
            if parent not in dimensions:
                raise SpaceError(key, f"refers to no dimension{closest(parent, dimensions)}; dimensions: {', '.join(dimensions)}")
            possible = dimensions[parent].possible_values()
            if possible is None:
                raise SpaceError(key, f"'{parent}' is a range; a condition needs a categorical or fixed dimension")
            for value in values:
                if not any(value == p and type(value) is type(p) for p in possible):
                    raise SpaceError(key, f"{value!r} is not a value of '{parent}'; allowed: {list(possible)}")
    return _parents_first(dimensions, prefix)


def _parents_first(dimensions: dict[str, Dimension], prefix: str) -> list[Dimension]:
    ordered: list[Dimension] = []
    state: dict[str, str] = {}

    def visit(name: str) -> None:
        if state.get(name) == "done":
            return
        if state.get(name) == "visiting":
            raise SpaceError(f"{prefix}.{name}.when", "conditions form a cycle")
        state[name] = "visiting"
        for parent in dimensions[name].when:
            visit(parent)
        state[name] = "done"
        ordered.append(dimensions[name])

    for name in dimensions:
        visit(name)
    return ordered


def suggest(trial: Suggester, dimensions: list[Dimension]) -> dict[str, Scalar]:
    """Define-by-run: ask ``trial`` for every active dimension; fixed values are included as is."""
    params: dict[str, Scalar] = {}
    for dimension in dimensions:
        if dimension.active(params):
            params[dimension.name] = dimension.suggest(trial)
    return params


def admits(dimensions: list[Dimension], values: dict[str, Any], defaults: dict[str, Any]) -> str | None:
    """Why the space cannot produce ``values`` (a preset), or None when it can.

    A key with no dimension must equal the family default; an inactive dimension may
    not be pinned by the preset.
    """
    by_name = {d.name: d for d in dimensions}
    chosen = {**defaults, **values}
    for name, value in values.items():
        dimension = by_name.get(name)
        if dimension is None:
            if defaults.get(name) != value:
                return f"'{name}' = {value!r} is not in the space and differs from the default {defaults.get(name)!r}"
            continue
        if not dimension.active(chosen):
            return f"'{name}' is inactive under the preset's other values"
        if not dimension.admits(value):
            return f"'{name}' = {value!r} is outside the space"
    return None
