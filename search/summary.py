"""Tables of trials for the terminal (launch's best trials, status)."""

from __future__ import annotations

import math
import sys
from collections.abc import Sequence
from typing import Any

import optuna
from lensnas.search.study import FAIL_REASON
from optuna.trial import FrozenTrial, TrialState
from rich.console import Console
from rich.table import Table


def format_value(value: Any, error: Any = None) -> str:
    """A metric as ``1.23e-03 ± 4.0e-04`` (error optional)."""
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return "" if value is None else str(value)
    if not math.isfinite(value):
        return str(value)
    text = f"{value:.4g}" if 1e-2 <= abs(value) < 1e4 or value == 0 else f"{value:.3e}"
    if isinstance(error, (int, float)) and math.isfinite(error):
        text += f" ± {error:.1e}"
    return text


def format_params(params: dict[str, Any]) -> str:
    return " ".join(f"{k}={format_value(v) if isinstance(v, float) else v}" for k, v in params.items())


def output_console() -> Console:
    """Stdout console; wide when not a terminal so piped tables keep one line per field."""
    return Console() if sys.stdout.isatty() else Console(width=220)


def best_trials(study: optuna.Study, top: int) -> list[FrozenTrial]:
    """The ``top`` best completed trials; for multi-objective studies the Pareto front first,
    then the front of the trials left, and so on (by trial number within a front)."""
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    signs = [1 if d == optuna.study.StudyDirection.MINIMIZE else -1 for d in study.directions]
    if len(signs) == 1:
        return sorted(complete, key=lambda t: signs[0] * t.value)[:top]
    remaining = {t.number: [sign * value for sign, value in zip(signs, t.values)] for t in complete}
    by_number = {t.number: t for t in complete}
    ordered: list[FrozenTrial] = []
    while remaining and len(ordered) < top:
        front = [n for n, key in remaining.items()
                 if not any(_dominates(other, key) for other in remaining.values())]
        ordered += [by_number[n] for n in sorted(front)]
        for number in front:
            del remaining[number]
    return ordered[:top]


def _dominates(a: list[float], b: list[float]) -> bool:
    """Whether a is at least as good as b everywhere and better somewhere (all minimised)."""
    return all(x <= y for x, y in zip(a, b)) and any(x < y for x, y in zip(a, b))


def trial_table(trials: Sequence[FrozenTrial], columns: Sequence[str], title: str) -> Table:
    """One row per trial: number, state, duration, metrics (with ± errors), params."""
    table = Table(title=title, title_justify="left")
    table.add_column("trial", justify="right", no_wrap=True)
    table.add_column("state", no_wrap=True)
    table.add_column("seconds", justify="right", no_wrap=True)
    for column in columns:
        table.add_column(column, justify="right", no_wrap=True)
    table.add_column("params / reason", overflow="fold")
    for trial in trials:
        attrs = trial.user_attrs
        duration = trial.duration.total_seconds() if trial.duration else None
        cells = [format_value(attrs.get(c), attrs.get(f"{c}_err")) for c in columns]
        detail = format_params(trial.params)
        if "preset" in attrs:
            detail = f"(preset {attrs['preset']}) {detail}"
        if trial.state == TrialState.FAIL and FAIL_REASON in attrs:
            detail = f"{attrs[FAIL_REASON]} | {detail}"
        table.add_row(
            str(trial.number), trial.state.name,
            "" if duration is None else f"{duration:.1f}", *cells, detail,
        )
    return table


def summary_columns(study: optuna.Study) -> tuple[str, ...]:
    """The columns its objective wants shown, plus the study's metrics."""
    from lensnas.objectives import objective_class

    metrics = tuple(study.user_attrs.get("metrics", ()))
    try:
        columns = tuple(objective_class(study.user_attrs["objective"]).SUMMARY)
    except (KeyError, ImportError):
        columns = ()
    return columns + tuple(m for m in metrics if m not in columns)


def print_best(study: optuna.Study, console: Console, top: int = 5) -> None:
    """Print the best trials of ``study``."""
    trials = best_trials(study, top)
    if not trials:
        console.print(f"study {study.study_name}: no completed trial yet")
        return
    title = f"{study.study_name}: best {len(trials)} of {len(study.trials)} trials"
    console.print(trial_table(trials, summary_columns(study), title))


def print_status(study: optuna.Study, console: Console) -> None:
    """Print every trial of ``study`` and a count per state."""
    trials = study.get_trials(deepcopy=False)
    counts = {}
    for trial in trials:
        counts[trial.state.name] = counts.get(trial.state.name, 0) + 1
    title = f"{study.study_name}: " + ", ".join(f"{n} {s}" for s, n in counts.items())
    console.print(trial_table(trials, summary_columns(study), title or study.study_name))
