"""The progress display of a run, one for every executor: a bar over the study's finished trials,
the best so far and what is happening now; failed trials are printed above it with their reason."""

from __future__ import annotations

from types import TracebackType
from typing import Self

import optuna
from optuna.trial import TrialState
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from lensnas.search.study import finished_count


class TrialProgress:
    """A rich progress bar over ``study``'s finished trials (of ``n_trials``), with a status text.

    Use it as a context manager; ``quiet`` shows nothing.
    """

    def __init__(
        self, name: str, study: optuna.Study, n_trials: int, console: Console, quiet: bool = False
    ):
        self.study = study
        self.quiet = quiet
        self.best = best_text(study)
        self._bar = Progress(
            TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
            TimeElapsedColumn(), TextColumn("{task.fields[status]}"),
            console=console, disable=quiet, transient=False,
        )
        self._task = self._bar.add_task(
            name, total=n_trials, completed=finished_count(study), status=self.best
        )

    def __enter__(self) -> Self:
        self._bar.start()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self._bar.stop()

    def show(self, status: str) -> None:
        """Show ``status`` after the best trial so far (a trial's log line, a wait)."""
        self._bar.update(self._task, status=f"{self.best} | {status}")

    def trial_finished(self, trial: int | str, state: str, reason: str | None = None) -> None:
        """Count the finished trials again and show how ``trial`` ended (a FAIL's reason printed)."""
        if state == TrialState.FAIL.name and not self.quiet:
            self._bar.console.print(
                f"[red]trial {trial} failed:[/] {reason or 'see the log'}", highlight=False
            )
        self.best = best_text(self.study)
        self._bar.update(
            self._task, completed=finished_count(self.study),
            status=f"{self.best} | trial {trial} {state}",
        )


def best_text(study: optuna.Study) -> str:
    """The best trial so far in a few words (the size of the Pareto front for several metrics)."""
    try:
        if len(study.directions) > 1:
            return f"pareto front: {len(study.best_trials)} trials"
        return f"best {study.best_value:.4g} (trial {study.best_trial.number})"
    except ValueError:
        return "no completed trial yet"
