"""Denoising of strong-lensing images: data and the objective (:class:`DenoiseObjective`)."""

from __future__ import annotations

from typing import Any


def __getattr__(name: str) -> Any:
    # The objective imports torch: loaded on first use, not with the package.
    if name == "DenoiseObjective":
        from lensnas.objectives.denoise.objective import DenoiseObjective

        return DenoiseObjective
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
