"""Objectives: what a trial is scored on. Each is a class with prepare() and run_trial().

Imported lazily by name so an objective whose simulator is missing does not break the others.
"""

from __future__ import annotations

import importlib

from objectives.base import LocalContext, Objective, TrialContext, TrialFailed, TrialPruned

OBJECTIVES = {
    "shear": "objectives.shear:ShearObjective",
    "sr": "objectives.sr:SRObjective",
}


def objective_class(name: str) -> type:
    """The objective class registered under ``name`` (KeyError for an unknown name)."""
    module_name, class_name = OBJECTIVES[name].split(":")
    return getattr(importlib.import_module(module_name), class_name)


__all__ = [
    "OBJECTIVES", "LocalContext", "Objective", "TrialContext", "TrialFailed", "TrialPruned",
    "objective_class",
]
