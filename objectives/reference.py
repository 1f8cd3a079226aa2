"""Moved: the reference shear estimators live in :mod:`lensnas.objectives.shear.reference`.

This module re-exports its public names so that ``lensnas.objectives.reference.measure``, as
written before the domain wings (lensnas 0.1), keeps working.
"""

from lensnas.objectives.shear.reference import (
    ReferenceResult,
    cached_measure,
    estimator_settings,
    is_available,
    measure,
    reference_config,
)

__all__ = [
    "ReferenceResult", "cached_measure", "estimator_settings", "is_available", "measure",
    "reference_config",
]
