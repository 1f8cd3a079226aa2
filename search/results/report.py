"""One self-contained HTML report of a study (plotly.js embedded; opens with no network).

Sections (each a ``<section id=...>``): summary, top-trials, optimization-history,
param-importances, parallel-coordinates, intermediate-values, pareto-front (several
metrics), reference-comparison (stored ``ref_*`` attributes), the objective's own sections,
uncertainty (the calibration of exported ensembles) and inspector (layers and linear probes of
inspected trials), when stored, and diagnostics (the best trial's figure from the artifact
store). Everything is read from the Optuna storage and
the artifact store.
"""

from __future__ import annotations

import base64
import datetime
import html
import json
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import optuna
import plotly.graph_objects as go
import plotly.io
import plotly.offline
from optuna.trial import FrozenTrial, TrialState

from lensnas.objectives.base import FIGURE, TrialRecord
from lensnas.objectives.report_html import STYLE, figure_html, html_table, lensnas_version, note
from lensnas.search.artifacts import artifact_store, read_trial_artifact
from lensnas.search.results.comparison import (
    comparison_tables,
    study_baselines,
    study_objective_class,
)
from lensnas.search.results.sections import inspector_section, uncertainty_section
from lensnas.search.summary import best_trials, summary_columns, trial_header, trial_rows

TOP_TRIALS = 10
IMPORTANCE_MIN_TRIALS = 10  # below this many completed trials importances get a caveat
IMPORTANCE_METHOD = (
    "Importances by Optuna's PED-ANOVA (PedAnovaImportanceEvaluator): how differently each "
    "parameter is distributed among the best 10% of completed trials than among all of them. "
    "A conditional parameter is judged on the trials that have it; each metric of a "
    "multi-objective study is ranked on its own."
)


def _comparison_section(study: optuna.Study, best: FrozenTrial | None) -> str:
    """The best network beside the study's baselines (reference estimators, interpolation)."""
    if best is None:
        return note("No completed trial yet.")
    attrs = study.user_attrs
    baselines = [b for b in study_baselines(attrs) if not b.conditions]
    if not baselines:
        return note("This study stored no baseline (its objective has no reference estimator, "
                    "or it was switched off).")
    parts = []
    tables = comparison_tables(
        study_objective_class(attrs), baselines, (f"network (trial {best.number})", best.user_attrs)
    )
    for index, (title, sentence, header, rows) in enumerate(tables):
        table_id = "reference-table" if index == 0 else f"reference-table-{index}"
        parts.append(f"<h3>{html.escape(title)}</h3>" + note(sentence) + html_table(header, rows, table_id))
    return "\n".join(parts)


def _section(section_id: str, title: str, body: str) -> str:
    return f'<section id="{section_id}"><h2>{html.escape(title)}</h2>\n{body}\n</section>'


def _targets(study: optuna.Study) -> list[tuple[Callable[[FrozenTrial], float] | None, str]]:
    """(target, name) per objective value; a single objective needs no target."""
    metrics = list(study.user_attrs.get("metrics", []))
    if len(study.directions) == 1:
        return [(None, metrics[0] if metrics else "objective")]
    names = (
        metrics
        if len(metrics) == len(study.directions)
        else [f"objective {i}" for i in range(len(study.directions))]
    )
    return [(lambda t, i=i: t.values[i], name) for i, name in enumerate(names)]


def _quiet_plot(
    function: Callable[..., go.Figure], *args: Any, **kwargs: Any
) -> tuple[go.Figure, list[str]]:
    """Call an optuna.visualization function; returns the figure and the warnings it gave."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        figure = function(*args, **kwargs)
    return figure, [
        str(w.message)
        for w in caught
        if not issubclass(w.category, optuna.exceptions.ExperimentalWarning)
    ]


def _plot_per_target(
    study: optuna.Study, complete: list[FrozenTrial], plot: Any, slug: str
) -> str:
    """One figure of ``plot`` per objective of the study (or a note when nothing completed)."""
    if not complete:
        return note("No completed trial yet.")
    parts = []
    for i, (target, name) in enumerate(_targets(study)):
        figure, _ = _quiet_plot(plot, study, target=target, target_name=name)
        parts.append(figure_html(figure, f"{slug}-{i}"))
    return "\n".join(parts)


def lower_is_better(
    study: optuna.Study, index: int, target: Callable[[FrozenTrial], float] | None
) -> Callable[[FrozenTrial], float] | None:
    """``target`` of objective ``index`` as PED-ANOVA ranks a given target (lower is better):
    negated for a maximised objective."""
    if target is None or study.directions[index] != optuna.study.StudyDirection.MAXIMIZE:
        return target
    return lambda trial: -target(trial)


def _importance_section(study: optuna.Study, complete: list[FrozenTrial]) -> str:
    varied = {
        name
        for name in {p for t in complete for p in t.params}
        if len({json.dumps(t.params.get(name), default=str) for t in complete}) > 1
    }
    if len(complete) < 2 or not varied:
        return note(
            f"Parameter importances need at least 2 completed trials whose parameters differ "
            f"({len(complete)} completed so far)."
        )
    parts = [note(IMPORTANCE_METHOD)]
    for i, (target, name) in enumerate(_targets(study)):
        try:
            figure, messages = _quiet_plot(
                optuna.visualization.plot_param_importances, study,
                target=lower_is_better(study, i, target), target_name=name,
                evaluator=optuna.importance.PedAnovaImportanceEvaluator(),
            )
        except (ValueError, RuntimeError) as error:
            parts.append(note(f"{name}: parameter importances could not be computed ({error})."))
            continue
        if any("will be equal" in m or "too small" in m for m in messages):
            parts.append(
                note(
                    f"{name}: too few completed trials ({len(complete)}) to estimate "
                    "parameter importances."
                )
            )
            continue
        if len(complete) < IMPORTANCE_MIN_TRIALS:
            parts.append(note(
                f"{name}: computed from only {len(complete)} completed trials (fewer than "
                f"{IMPORTANCE_MIN_TRIALS}): indicative at best."
            ))
        figure.update_layout(xaxis_title=f"importance for {name} (Optuna's PED-ANOVA)")
        parts.append(figure_html(figure, f"param-importances-{i}"))
    return "\n".join(parts)


def _intermediate_section(study: optuna.Study) -> str:
    if len(study.directions) > 1:
        return note("Optuna records intermediate values for single-objective studies only.")
    if not any(t.intermediate_values for t in study.get_trials(deepcopy=False)):
        return note("No trial reported intermediate values.")
    figure, _ = _quiet_plot(optuna.visualization.plot_intermediate_values, study)
    trials = {f"Trial{t.number}": t for t in study.get_trials(deepcopy=False)}
    for trace in figure.data:  # legend entries: trial number, state and preset name
        trial = trials.get(trace.name)
        if trial is not None:
            preset = trial.user_attrs.get("preset")
            trace.name = f"trial {trial.number} {trial.state.name.lower()}" + (
                f" ({preset})" if preset else "")
        trace.showlegend = True
    figure.update_layout(yaxis_title=_score_label(study), xaxis_title="epoch", showlegend=True,
                         legend_title_text="trial")
    return note("Each trial's per-epoch validation score: what the pruner compared.") + figure_html(
        figure, "intermediate-values-0")


def _score_label(study: optuna.Study) -> str:
    """The per-epoch validation score of the study's objective, in words."""
    objective = study_objective_class(study.user_attrs)
    return objective.VALIDATION_SCORE.label if objective else "validation score"


def _pareto_section(study: optuna.Study, complete: list[FrozenTrial]) -> str:
    names = [name for _, name in _targets(study)]
    if not complete:
        return note("No completed trial yet.")
    if len(names) > 3:
        return note(f"The Pareto front is drawn for 2 or 3 metrics; this study has {len(names)}.")
    figure, _ = _quiet_plot(optuna.visualization.plot_pareto_front, study, target_names=names)
    return figure_html(figure, "pareto-front-0")


def _trials_table(study: optuna.Study, trials: list[FrozenTrial]) -> str:
    columns = list(summary_columns(study))
    return html_table(trial_header(columns), trial_rows(trials, columns))


def _diagnostics_section(
    study: optuna.Study, best: FrozenTrial | None, storage_url: str | None
) -> str:
    if best is None:
        return note("No completed trial yet.")
    if storage_url is None:
        return note("No artifact store given.")
    try:
        data = read_trial_artifact(best, artifact_store(storage_url), FIGURE)
    except (OSError, optuna.artifacts.exceptions.ArtifactNotFound) as error:
        return note(f"The diagnostic figure of trial {best.number} could not be read ({error}).")
    if data is None:
        return note(f"Trial {best.number} stored no diagnostic figure.")
    encoded = base64.b64encode(data).decode("ascii")
    alt = f"diagnostic figure of trial {best.number}"
    image = f'<img id="diagnostics-figure" alt="{alt}" src="data:image/png;base64,{encoded}">'
    return f"<p>Best trial {best.number}.</p>{image}"


def build_report(study: optuna.Study, storage_url: str | None = None) -> str:
    """The HTML text of the report of ``study`` (artifacts read from ``storage_url``'s store)."""
    trials = study.get_trials(deepcopy=False)
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    top = best_trials(study, TOP_TRIALS)
    best = top[0] if top else None
    counts: dict[str, int] = {}
    for trial in trials:
        counts[trial.state.name] = counts.get(trial.state.name, 0) + 1
    attrs = study.user_attrs
    metrics = list(attrs.get("metrics", []))
    directions = [d.name.lower() for d in study.directions]
    spec = attrs.get("spec", {}) if isinstance(attrs.get("spec"), dict) else {}
    description = spec.get("study", {}).get("description", "")
    summary = [
        ("objective", str(attrs.get("objective", "?"))),
        (
            "metrics",
            ", ".join(f"{m} ({d})" for m, d in zip(metrics, directions)) or ", ".join(directions),
        ),
        ("trials", ", ".join(f"{n} {s}" for s, n in counts.items()) or "none"),
        ("dataset", str(attrs.get("dataset_key", "?"))),
        (
            "generated",
            datetime.datetime.now().isoformat(timespec="seconds")
            + f" by lensnas {lensnas_version()}",
        ),
    ]
    summary_html = (
        "<table>"
        + "".join(
            f"<tr><th>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>" for k, v in summary
        )
        + "</table>"
    )
    if description:
        summary_html = f"<p>{html.escape(description)}</p>" + summary_html
    sections = [
        _section("summary", "Study", summary_html),
        _section(
            "top-trials",
            f"Top {len(top)} trials" if top else "Top trials",
            _trials_table(study, top) if top else note("No completed trial yet."),
        ),
        _section("optimization-history", "Optimisation history", _plot_per_target(
            study, complete, optuna.visualization.plot_optimization_history, "optimization-history"
        )),
        _section(
            "param-importances", "Parameter importances", _importance_section(study, complete)
        ),
        _section(
            "parallel-coordinates", "Parallel coordinates", _plot_per_target(
                study, complete, optuna.visualization.plot_parallel_coordinate,
                "parallel-coordinates",
            )
        ),
        _section(
            "intermediate-values",
            f"Intermediate values ({_score_label(study)} per epoch)",
            _intermediate_section(study),
        ),
    ]
    if len(study.directions) > 1:
        sections.append(_section("pareto-front", "Pareto front", _pareto_section(study, complete)))
    sections.append(
        _section(
            "reference-comparison",
            "Best network vs baselines",
            _comparison_section(study, best),
        )
    )
    objective = study_objective_class(attrs)
    if objective is not None:
        record = None if best is None else TrialRecord(best.number, best.params, best.user_attrs)
        for part in objective.report_sections(dict(attrs), record):
            sections.append(_section(part.section_id, part.title, part.html))
    for section_id, title, render in (
        ("uncertainty", "Uncertainty calibration (exported ensembles)", uncertainty_section),
        ("inspector", "Layers, and where the information on the outputs is lost",
         inspector_section),
    ):
        body = render(dict(attrs))
        if body is not None:
            sections.append(_section(section_id, title, body))
    sections.append(
        _section(
            "diagnostics",
            "Diagnostics of the best trial",
            _diagnostics_section(study, best, storage_url),
        )
    )
    title = html.escape(f"lensnas report: {study.study_name}")
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f"<title>{title}</title>\n<style>{STYLE}</style>\n"
        f'<script type="text/javascript">{plotly.offline.get_plotlyjs()}</script>\n'
        f"</head>\n<body>\n<h1>{title}</h1>\n" + "\n".join(sections) + "\n</body>\n</html>\n"
    )


def write_report(study: optuna.Study, path: str | Path, storage_url: str | None = None) -> Path:
    """Write the report of ``study`` to ``path`` (one self-contained HTML file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(build_report(study, storage_url), encoding="utf-8")
    return path
