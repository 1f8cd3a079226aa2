"""Strong-lensing super-resolution: data (simulated with lenstronomy, or a folder of LR/HR
pairs), metrics and the objective (:class:`SRObjective`)."""

from __future__ import annotations

from typing import Any


def __getattr__(name: str) -> Any:
    # The objective imports torch and lenstronomy: loaded on first use, not with the package.
    if name == "SRObjective":
        from lensnas.objectives.sr.objective import SRObjective

        return SRObjective
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
