"""Tables of trials for the terminal (launch's best trials, status)."""

from __future__ import annotations

import json
import math
import re
import sys
from collections.abc import Sequence
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState
from rich.console import Console
from rich.table import Table

from lensnas.objectives.report_html import (  # noqa: F401 (format_value, html_table re-exported)
    NOT_METRICS,
    format_value,
    html_table,
)
from lensnas.search.study import FAIL_REASON


def format_params(params: dict[str, Any]) -> str:
    """Parameters as ``name=value`` separated by spaces."""
    return " ".join(
        f"{k}={format_value(v) if isinstance(v, float) else v}" for k, v in params.items()
    )


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


PARAMS_MIN_WIDTH = 24  # the compact table keeps at least this much for params
REASON_MAX = 60  # characters of a failure reason in the compact table


def compact_value(value: Any, error: Any = None) -> str:
    """A metric in few characters: ``-0.00703±0.0021``, ``1.15e-5``, ``12345``."""
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return "" if value is None else str(value)
    text = _short_number(value, 3)
    if isinstance(error, (int, float)) and not isinstance(error, bool) and math.isfinite(error):
        text += "±" + _short_number(error, 2)
    return text


def _short_number(value: float, digits: int) -> str:
    """``value`` in %g, or in scientific notation where that is 2+ characters shorter."""
    if isinstance(value, int) or not math.isfinite(value):
        return str(value)
    general = _tidy_exponent(f"{value:.{digits}g}")
    mantissa, exponent = f"{value:.{digits - 1}e}".split("e")
    if "." in mantissa:
        mantissa = mantissa.rstrip("0").rstrip(".")
    scientific = _tidy_exponent(f"{mantissa}e{exponent}")
    return scientific if len(scientific) <= len(general) - 2 else general


def _tidy_exponent(text: str) -> str:
    """``1e-05`` -> ``1e-5``, ``1e+04`` -> ``1e4``."""
    return re.sub(r"e([+-])0*(\d)", lambda m: "e" + ("-" if m[1] == "-" else "") + m[2], text)


def shorten(text: str, limit: int) -> str:
    """The first line of ``text``, cut to ``limit`` characters with an ellipsis."""
    line = text.strip().splitlines()[0] if text.strip() else ""
    return line if len(line) <= limit else line[: limit - 1] + "…"


def trial_header(columns: Sequence[str], wide: bool = True) -> list[str]:
    """Header of :func:`trial_rows`: trial, state, (seconds,) metrics, params / reason."""
    return ["trial", "state", *(["seconds"] if wide else []), *columns, "params / reason"]


def trial_rows(
    trials: Sequence[FrozenTrial], columns: Sequence[str], wide: bool = True
) -> list[list[str]]:
    """One row of text cells per trial (see :func:`trial_header`).

    ``wide``: every parameter, the full failure reason and metrics as ``1.23e-03 ± 4.0e-04``;
    otherwise compact metrics, only the parameters that differ between ``trials`` and the
    first line of a failure reason, shortened.
    """
    varying = _varying_params(trials)
    rows = []
    for trial in trials:
        attrs = trial.user_attrs
        row = [str(trial.number), trial.state.name]
        if wide:
            duration = trial.duration.total_seconds() if trial.duration else None
            row.append("" if duration is None else f"{duration:.1f}")
            row += [format_value(attrs.get(c), attrs.get(f"{c}_err")) for c in columns]
            params = trial.params
        else:
            row += [compact_value(attrs.get(c), attrs.get(f"{c}_err")) for c in columns]
            params = {k: v for k, v in trial.params.items() if k in varying}
        detail = format_params(params) if wide else _compact_params(params)
        if "preset" in attrs:
            detail = f"(preset {attrs['preset']}) {detail}".strip()
        if trial.state == TrialState.FAIL and FAIL_REASON in attrs:
            reason = str(attrs[FAIL_REASON])
            detail = f"{reason if wide else shorten(reason, REASON_MAX)} | {detail}".strip(" |")
        rows.append([*row, detail])
    return rows


def _varying_params(trials: Sequence[FrozenTrial]) -> set[str]:
    """Names of the parameters whose value is not the same in every trial (all when one trial)."""
    names = {name for trial in trials for name in trial.params}
    if len(trials) < 2:
        return names
    missing = object()
    return {
        name for name in names
        if len({repr(t.params.get(name, missing)) for t in trials}) > 1
    }


def _compact_params(params: dict[str, Any]) -> str:
    return " ".join(
        f"{k}={_short_number(v, 3) if isinstance(v, float) else v}" for k, v in params.items()
    )


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A GitHub markdown table (``|`` escaped, line breaks as spaces), ending in a newline."""

    def cell(text: str) -> str:
        return " ".join(str(text).split()).replace("|", "\\|")

    lines = ["| " + " | ".join(cell(h) for h in header) + " |"]
    lines.append("|" + "|".join("---" for _ in header) + "|")
    lines += ["| " + " | ".join(cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def fit_columns(
    trials: Sequence[FrozenTrial], required: Sequence[str], optional: Sequence[str], width: int
) -> tuple[list[str], list[str]]:
    """(shown, left out): every ``required`` column, then ``optional`` ones in order while the
    compact table still fits ``width`` with room for params (all-empty ones are skipped)."""
    def column_width(name: str) -> int:
        cells = trial_rows(trials, [name], wide=False)
        return max([len(name), *(len(row[2]) for row in cells)])

    shown = list(dict.fromkeys(required))
    used = 1 + (max([5, *(len(str(t.number)) for t in trials)]) + 3) + (8 + 3)
    used += sum(column_width(name) + 3 for name in shown)
    left_out = []
    for name in dict.fromkeys(optional):
        if name in shown:
            continue
        if not any(t.user_attrs.get(name) is not None for t in trials):
            continue
        needed = column_width(name) + 3
        if not left_out and used + needed + PARAMS_MIN_WIDTH + 3 <= width:
            shown.append(name)
            used += needed
        else:  # the first that does not fit ends the list: columns keep their priority
            left_out.append(name)
    return shown, left_out


def trial_table(
    trials: Sequence[FrozenTrial], columns: Sequence[str], title: str, wide: bool = True,
    caption: str | None = None,
) -> Table:
    """The rows of :func:`trial_rows` as a rich table; trial, state and metrics never wrap."""
    table = Table(title=title, title_justify="left", caption=caption, caption_justify="left")
    header = trial_header(columns, wide)
    for index, name in enumerate(header):
        if index == len(header) - 1:
            table.add_column(name, overflow="fold", min_width=min(PARAMS_MIN_WIDTH, 12))
        else:
            table.add_column(name, justify="left" if name == "state" else "right", no_wrap=True)
    for row in trial_rows(trials, columns, wide):
        table.add_row(*row)
    return table


def _fitted_table(
    study: optuna.Study, trials: Sequence[FrozenTrial], title: str, console: Console, wide: bool
) -> Table:
    """The wide table, or the compact one whose columns fit the console's width."""
    if wide:
        return trial_table(trials, summary_columns(study), title, wide=True)
    metrics = tuple(study.user_attrs.get("metrics", ()))
    shown, left_out = fit_columns(trials, metrics, summary_columns(study), console.width)
    caption = None
    if left_out:
        caption = (
            f"not shown: {', '.join(left_out)}, seconds "
            f"(all columns: lensnas status {study.study_name} --wide)"
        )
    return trial_table(trials, shown, title, wide=False, caption=caption)


def summary_columns(study: optuna.Study) -> tuple[str, ...]:
    """The columns its objective wants shown that some trial stores, plus the study's metrics."""
    from lensnas.objectives import objective_class

    metrics = tuple(study.user_attrs.get("metrics", ()))
    try:
        columns = objective_class(study.user_attrs["objective"]).summary_metrics()
    except (KeyError, ImportError):
        columns = ()
    stored = {key for trial in study.get_trials(deepcopy=False) for key in trial.user_attrs}
    if stored:  # a metric added since the study ran (e.g. rmse_over_crb) is no empty column
        columns = tuple(c for c in columns if c in stored)
    return columns + tuple(m for m in metrics if m not in columns)


def print_best(study: optuna.Study, console: Console, top: int = 5, wide: bool = False) -> None:
    """Print the best trials of ``study`` (``wide``: every column, else fitted to the console)."""
    trials = best_trials(study, top)
    if not trials:
        console.print(f"study {study.study_name}: no completed trial yet")
        return
    title = f"{study.study_name}: best {len(trials)} of {len(study.trials)} trials"
    console.print(_fitted_table(study, trials, title, console, wide))


def print_status(study: optuna.Study, console: Console, wide: bool = False) -> None:
    """Print every trial of ``study`` and a count per state (``wide``: every column)."""
    trials = study.get_trials(deepcopy=False)
    counts = {}
    for trial in trials:
        counts[trial.state.name] = counts.get(trial.state.name, 0) + 1
    title = f"{study.study_name}: " + ", ".join(f"{n} {s}" for s, n in counts.items())
    console.print(_fitted_table(study, trials, title or study.study_name, console, wide))
    if wide:
        print_trial_tables(study, console)


def print_trial_tables(study: optuna.Study, console: Console) -> None:
    """The objective's tables of the best trial's grouped metrics (e.g. m and c per test
    population), when it has any."""
    from lensnas.objectives import TrialRecord, objective_class

    best = best_trials(study, 1)
    try:
        objective = objective_class(study.user_attrs["objective"])
    except (KeyError, ImportError):
        return
    if not best:
        return
    record = TrialRecord(best[0].number, best[0].params, best[0].user_attrs)
    for title, sentence, header, rows in objective.trial_tables(dict(study.user_attrs), record):
        table = Table(title=f"{study.study_name}, best trial {record.number}: {title}",
                      caption=sentence, caption_justify="left")
        for column in header:
            table.add_column(column, overflow="fold")
        for row in rows:
            table.add_row(*row)
        console.print(table)


def status_json(study: optuna.Study) -> str:
    """Every trial of ``study`` as JSON: number, state, values, params, metrics, preset, reason."""
    trials = []
    for trial in study.get_trials(deepcopy=False):
        attrs = trial.user_attrs
        trials.append({
            "number": trial.number,
            "state": trial.state.name,
            "values": None if trial.values is None else [_json_number(v) for v in trial.values],
            "params": {k: _json_number(v) for k, v in trial.params.items()},
            "metrics": {
                key: _json_number(value) for key, value in attrs.items()
                if isinstance(value, (int, float)) and not isinstance(value, bool)
                and key not in NOT_METRICS
            },
            "preset": attrs.get("preset"),
            "fail_reason": attrs.get(FAIL_REASON),
            "seconds": trial.duration.total_seconds() if trial.duration else None,
        })
    document = {
        "study": study.study_name,
        "metrics": list(study.user_attrs.get("metrics", ())),
        "directions": [d.name.lower() for d in study.directions],
        "trials": trials,
    }
    return json.dumps(document, indent=2, allow_nan=False)


def _json_number(value: Any) -> Any:
    """``value``, with NaN and infinities as None (JSON has none)."""
    return None if isinstance(value, float) and not math.isfinite(value) else value
