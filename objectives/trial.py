"""What a running trial sees and raises, below both the objective base and the training loop:
its context (reporting, pruning, device, artifact folder), the pruned/failed signals, and the
result of training."""

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
        """Record the validation score after epoch ``step`` (what the pruner compares)."""

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


@dataclass
class TrainingResult:
    model: Any
    best_validation_score: float
    epochs_run: int
    train_seconds: float
    history: list[float] = field(default_factory=list)
