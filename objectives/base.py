"""The seam between objectives and executors: a trial is a function of params and a context.

Objectives never import Optuna or Ray; executors adapt their own trial objects to
:class:`TrialContext` and translate :class:`TrialPruned` / :class:`TrialFailed`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol


class TrialPruned(Exception):
    """Raised by an objective when ``ctx.should_prune()`` said stop."""


class TrialFailed(Exception):
    """Raised by an objective for a trial that cannot give a result (NaN loss, divergence)."""


class TrialContext(Protocol):
    """What a running trial may use: reporting, pruning, its device and its artifact folder."""

    device: str
    artifact_dir: Path
    seed: int

    def report(self, step: int, value: float) -> None:
        """Record an intermediate value (validation loss after epoch ``step``)."""

    def should_prune(self) -> bool:
        """Whether the study's pruner wants this trial stopped now."""

    def log(self, message: str) -> None:
        """Show a progress message (current epoch, ...)."""


@dataclass
class LocalContext:
    """A plain context for running a trial outside any executor (notebooks, tests)."""

    device: str = "cpu"
    artifact_dir: Path = field(default_factory=lambda: Path("."))
    seed: int = 0
    prune_after: int | None = None
    reports: list[tuple[int, float]] = field(default_factory=list)
    on_log: Callable[[str], None] | None = None

    def report(self, step: int, value: float) -> None:
        self.reports.append((step, value))

    def should_prune(self) -> bool:
        return self.prune_after is not None and len(self.reports) >= self.prune_after

    def log(self, message: str) -> None:
        if self.on_log is not None:
            self.on_log(message)


class Objective(Protocol):
    """One scientific objective: prepares its data once, then scores trials."""

    name: str

    def prepare(self, progress: bool = True) -> None:
        """Simulate or load the data and compute reference results (cached on disk)."""

    def run_trial(self, params: dict[str, Any], ctx: TrialContext) -> dict[str, float]:
        """Build the model from ``params``, train it, and return its metrics."""

    def trial_attrs(self) -> dict[str, Any]:
        """Study-wide facts worth storing (reference metrics, dataset hash)."""
