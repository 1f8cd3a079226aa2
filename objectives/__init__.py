"""Objectives: what a trial is scored on. Each is a class with prepare() and run_trial().

Imported lazily by name so an objective whose simulator is missing does not break the others.
"""

from __future__ import annotations

import importlib

from lensnas.objectives.base import LocalContext, Objective, TrialContext, TrialFailed, TrialPruned

OBJECTIVES = {
    "shear": "lensnas.objectives.shear:ShearObjective",
    "sr": "lensnas.objectives.sr:SRObjective",
}


def objective_class(name: str) -> type:
    """The objective class registered under ``name`` (KeyError for an unknown name)."""
    module_name, class_name = OBJECTIVES[name].split(":")
    return getattr(importlib.import_module(module_name), class_name)


__all__ = [
    "OBJECTIVES", "LocalContext", "Objective", "TrialContext", "TrialFailed", "TrialPruned",
    "objective_class",
]
