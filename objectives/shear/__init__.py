"""Weak-lensing shear: simulation, metrics, the Cramér-Rao bound, reference estimators
(metacal, HSM, NGMix), report sections and the objective (:class:`ShearObjective`)."""

from __future__ import annotations

from typing import Any


def __getattr__(name: str) -> Any:
    # The objective imports torch and GalSim: loaded on first use, not with the package.
    if name == "ShearObjective":
        from lensnas.objectives.shear.objective import ShearObjective

        return ShearObjective
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
