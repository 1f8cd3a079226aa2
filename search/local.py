"""The local executor: in-process Optuna optimisation with a progress bar."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import optuna
from optuna.study import MaxTrialsCallback
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from search.spec import StudySpec
from search.study import FINISHED, StopAfterFailures, evaluate, finished_count

logger = logging.getLogger("lensnas")


def run_local(
    spec: StudySpec,
    study: optuna.Study,
    objective: Any,
    *,
    device: str,
    artifact_root: Path,
    max_failures: int = 3,
    quiet: bool = False,
    console: Console | None = None,
) -> StopAfterFailures:
    """Run trials in this process until the study has ``spec.n_trials`` finished trials.

    Trials that raise are recorded as FAIL with their reason and the study goes on;
    ``max_failures`` consecutive failures stop it. KeyboardInterrupt propagates after
    Optuna has recorded the interrupted trial as FAIL.
    """
    remaining = spec.n_trials - finished_count(study)
    failures = StopAfterFailures(max_failures)
    if remaining <= 0:
        return failures
    console = console or Console(stderr=True)
    with Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
        TimeElapsedColumn(), TextColumn("{task.fields[status]}"),
        console=console, disable=quiet, transient=False,
    ) as progress:
        task = progress.add_task(spec.name, total=spec.n_trials, completed=spec.n_trials - remaining, status="")
        best = _best_text(study)

        def on_log(message: str) -> None:
            progress.update(task, status=f"{best} | {message}")

        def objective_function(trial: optuna.Trial) -> list[float]:
            return evaluate(spec, objective, trial, device, artifact_root, on_log)

        def after_trial(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
            nonlocal best
            best = _best_text(study)
            if trial.state == optuna.trial.TrialState.FAIL:
                reason = trial.user_attrs.get("fail_reason", "see the log")
                progress.console.print(f"[red]trial {trial.number} failed:[/] {reason}", highlight=False)
            progress.update(task, completed=finished_count(study), status=f"{best} | trial {trial.number} {trial.state.name}")

        study.optimize(
            objective_function,
            n_trials=remaining,
            timeout=spec.timeout,
            catch=(Exception,),
            callbacks=[MaxTrialsCallback(spec.n_trials, states=FINISHED), failures, after_trial],
            gc_after_trial=True,
        )
    return failures


def _best_text(study: optuna.Study) -> str:
    try:
        if len(study.directions) > 1:
            return f"pareto front: {len(study.best_trials)} trials"
        return f"best {study.best_value:.4g} (trial {study.best_trial.number})"
    except ValueError:
        return "no completed trial yet"
