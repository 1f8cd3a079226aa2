"""Objectives: what a trial is scored on. Each is a subclass of :class:`Objective`.

Objectives are found by name in a registry: the built-in ones and those of installed plug-ins
(entry point group ``lensnas.objectives``, each naming a class as ``module:Class``). They are
imported lazily, so an objective whose simulator is missing does not break the others.
"""

from __future__ import annotations

import importlib
from importlib.metadata import entry_points

from lensnas.objectives.base import (
    Baseline,
    LocalContext,
    Metric,
    Objective,
    ReportSection,
    TrialContext,
    TrialFailed,
    TrialPruned,
    TrialRecord,
    ValidationScore,
)

ENTRY_POINT_GROUP = "lensnas.objectives"
_LOCATIONS: dict[str, str] = {
    "shear": "lensnas.objectives.shear.objective:ShearObjective",
    "sr": "lensnas.objectives.sr.objective:SRObjective",
    "denoise": "lensnas.objectives.denoise.objective:DenoiseObjective",
}
_LOADED: dict[str, type[Objective]] = {}


def register_objective(name: str, location: str | type[Objective]) -> None:
    """Register an objective class, or its ``"module:Class"`` location, under ``name``."""
    if isinstance(location, str):
        _LOCATIONS[name] = location
        _LOADED.pop(name, None)
    else:
        _LOCATIONS[name] = f"{location.__module__}:{location.__qualname__}"
        _LOADED[name] = location


def objective_names() -> list[str]:
    """Every registered objective name (built-in and plug-ins), sorted."""
    for point in entry_points(group=ENTRY_POINT_GROUP):
        _LOCATIONS.setdefault(point.name, point.value)
    return sorted(_LOCATIONS)


def objective_class(name: str) -> type[Objective]:
    """The objective class registered under ``name`` (KeyError naming the known ones)."""
    if name in _LOADED:
        return _LOADED[name]
    if name not in objective_names():
        raise KeyError(f"unknown objective {name!r}; known: {', '.join(objective_names())}")
    module_name, _, class_name = _LOCATIONS[name].partition(":")
    cls = getattr(importlib.import_module(module_name), class_name)
    if not (isinstance(cls, type) and issubclass(cls, Objective)):
        raise TypeError(f"{_LOCATIONS[name]} is not a subclass of lensnas.objectives.Objective")
    _LOADED[name] = cls
    return cls


__all__ = [
    "Baseline", "LocalContext", "Metric", "Objective", "ReportSection", "TrialContext",
    "TrialFailed", "TrialPruned", "TrialRecord", "ValidationScore", "objective_class",
    "objective_names", "register_objective",
]
