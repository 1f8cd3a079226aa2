"""One self-contained HTML report of a study (plotly.js embedded; opens with no network).

Sections (each a ``<section id=...>``): summary, top-trials, optimization-history,
param-importances, parallel-coordinates, intermediate-values, pareto-front (several
metrics), reference-comparison (stored ``ref_*`` attributes) and diagnostics (the best
trial's figure from the artifact store). Everything is read from the Optuna storage and
the artifact store.
"""

from __future__ import annotations

import base64
import datetime
import html
import json
import math
import warnings
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from typing import Any

import optuna
import plotly.graph_objects as go
import plotly.io
import plotly.offline
from lensnas.objectives.diagnostics import FIGURE
from lensnas.objectives.shear_data import GalaxySimulation
from lensnas.objectives.shear_metrics import NOISE_PREFIX, noise_prefix
from lensnas.search.artifacts import artifact_store, read_trial_artifact
from lensnas.search.summary import best_trials, format_params, format_value, summary_columns
from optuna.trial import FrozenTrial, TrialState
from plotly.subplots import make_subplots

TOP_TRIALS = 10
REFERENCE_PREFIX = "ref_"
BASELINE_PREFIX = "bicubic_"
NOT_METRICS = ("seed", "epochs_run")
BIAS_KEYS = ("m1", "m2", "c1", "c2")
REFERENCE_COLUMNS = ("rmse", *BIAS_KEYS, "abs_m", "abs_c", "psnr", "ssim", "mse", "n_failed")


def lensnas_version() -> str:
    """The installed lensnas version ("unknown" when run from a source tree)."""
    try:
        return metadata.version("lensnas")
    except metadata.PackageNotFoundError:
        return "unknown"


def metric_values(attrs: dict[str, Any]) -> dict[str, float]:
    """The numeric user attributes of a trial (its metrics), without seeds and counters."""
    return {
        key: float(value)
        for key, value in attrs.items()
        if isinstance(value, (int, float))
        and not isinstance(value, bool)
        and key not in NOT_METRICS
        and not key.startswith(REFERENCE_PREFIX)
    }


def metric_rows(
    attrs: dict[str, Any], first: tuple[str, ...] = ()
) -> list[tuple[str, float, float | None]]:
    """(name, value, error) for each metric; ``X_err`` attributes become the error of ``X``."""
    values = metric_values(attrs)
    names = [k for k in first if k in values] + sorted(
        k for k in values if k not in first and not k.endswith("_err")
    )
    names += sorted(k for k in values if k.endswith("_err") and k[:-4] not in values)
    return [(name, values[name], values.get(f"{name}_err")) for name in names]


def reference_metrics(
    study: optuna.Study, trial: FrozenTrial | None = None
) -> dict[str, dict[str, float]]:
    """Stored reference-estimator metrics as ``{estimator: {metric: value}}``.

    Read from the study's (then the trial's) user attributes ``ref_<estimator>_<metric>``
    or ``ref_<metric>``; metric names are those of the trial's own metrics when known. The
    SR objective's baseline (study attributes ``bicubic_<metric>``) is the estimator "bicubic".
    """
    attrs = dict(study.user_attrs)
    if trial is not None:
        attrs.update(trial.user_attrs)
    known = sorted(
        metric_values(trial.user_attrs) if trial is not None else {}, key=len, reverse=True
    )
    default_name = str(
        study.user_attrs.get("reference") or _objective_options(study).get("reference", "reference")
    )
    found: dict[str, dict[str, float]] = {}
    for key, value in attrs.items():
        if not key.startswith(REFERENCE_PREFIX):
            continue
        rest = key[len(REFERENCE_PREFIX) :]
        if isinstance(value, dict):  # ref_<estimator> = {metric: value}
            numbers = metric_values(value)
            if numbers:
                found.setdefault(rest, {}).update(numbers)
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        estimator, metric = default_name, rest
        for name in known if rest not in known else ():
            if rest.endswith(f"_{name}"):
                estimator, metric = rest[: -len(name) - 1], name
                break
        found.setdefault(estimator, {})[metric] = float(value)
    bicubic = {
        key[len(BASELINE_PREFIX) :]: float(value)
        for key, value in study.user_attrs.items()
        if key.startswith(BASELINE_PREFIX) and isinstance(value, (int, float))
    }
    if bicubic:
        found["bicubic"] = bicubic
    return found


def _objective_options(study: optuna.Study) -> dict[str, Any]:
    spec = study.user_attrs.get("spec")
    return dict(spec.get("objective", {})) if isinstance(spec, dict) else {}


def _figure_html(figure: go.Figure, div_id: str) -> str:
    return plotly.io.to_html(
        figure,
        full_html=False,
        include_plotlyjs=False,
        div_id=div_id,
        config={"displaylogo": False, "responsive": True},
    )


def _note(text: str) -> str:
    return f'<p class="note">{html.escape(text)}</p>'


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
        return _note("No completed trial yet.")
    parts = []
    for i, (target, name) in enumerate(_targets(study)):
        figure, _ = _quiet_plot(plot, study, target=target, target_name=name)
        parts.append(_figure_html(figure, f"{slug}-{i}"))
    return "\n".join(parts)


def _importance_section(study: optuna.Study, complete: list[FrozenTrial]) -> str:
    varied = {
        name
        for name in {p for t in complete for p in t.params}
        if len({json.dumps(t.params.get(name), default=str) for t in complete}) > 1
    }
    if len(complete) < 2 or not varied:
        return _note(
            f"Parameter importances need at least 2 completed trials whose parameters differ "
            f"({len(complete)} completed so far)."
        )
    parts = []
    for i, (target, name) in enumerate(_targets(study)):
        try:
            figure, messages = _quiet_plot(
                optuna.visualization.plot_param_importances, study, target=target, target_name=name
            )
        except (ValueError, RuntimeError) as error:
            parts.append(_note(f"{name}: parameter importances could not be computed ({error})."))
            continue
        if any("will be equal" in m or "too small" in m for m in messages):
            parts.append(
                _note(
                    f"{name}: too few completed trials ({len(complete)}) to estimate "
                    "parameter importances."
                )
            )
            continue
        parts.append(_figure_html(figure, f"param-importances-{i}"))
    return "\n".join(parts)


def _intermediate_section(study: optuna.Study) -> str:
    if len(study.directions) > 1:
        return _note("Optuna records intermediate values for single-objective studies only.")
    if not any(t.intermediate_values for t in study.get_trials(deepcopy=False)):
        return _note("No trial reported intermediate values.")
    figure, _ = _quiet_plot(optuna.visualization.plot_intermediate_values, study)
    figure.update_layout(yaxis_title="validation loss", xaxis_title="epoch")
    return _figure_html(figure, "intermediate-values-0")


def _pareto_section(study: optuna.Study, complete: list[FrozenTrial]) -> str:
    names = [name for _, name in _targets(study)]
    if not complete:
        return _note("No completed trial yet.")
    if len(names) > 3:
        return _note(f"The Pareto front is drawn for 2 or 3 metrics; this study has {len(names)}.")
    figure, _ = _quiet_plot(optuna.visualization.plot_pareto_front, study, target_names=names)
    return _figure_html(figure, "pareto-front-0")


def _trials_table(study: optuna.Study, trials: list[FrozenTrial]) -> str:
    columns = list(summary_columns(study))
    head = "".join(
        f"<th>{html.escape(c)}</th>" for c in ["trial", "state", "seconds", *columns, "params"]
    )
    rows = []
    for trial in trials:
        attrs = trial.user_attrs
        duration = trial.duration.total_seconds() if trial.duration else None
        cells = [str(trial.number), trial.state.name, "" if duration is None else f"{duration:.1f}"]
        cells += [format_value(attrs.get(c), attrs.get(f"{c}_err")) for c in columns]
        detail = format_params(trial.params)
        if "preset" in attrs:
            detail = f"(preset {attrs['preset']}) {detail}"
        cells.append(detail)
        rows.append("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in cells) + "</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>"


def _reference_section(study: optuna.Study, best: FrozenTrial | None) -> str:
    if best is None:
        return _note("No completed trial yet.")
    references = reference_metrics(study, best)
    if not references:
        reference = _objective_options(study).get("reference", "none")
        return _note(
            f"This study stored no reference-estimator metrics (ref_* attributes; "
            f"objective.reference = {reference!r})."
        )
    rows = {f"network (trial {best.number})": metric_values(best.user_attrs), **references}
    metrics = [k for k in REFERENCE_COLUMNS if any(k in r for r in references.values())]
    if not metrics:  # reference metrics under other names: show them all
        metrics = sorted({k for r in references.values() for k in r if not k.endswith("_err")})
    head = "".join(f"<th>{html.escape(c)}</th>" for c in ["estimator", *metrics])
    body = "".join(
        "<tr>"
        + f"<td>{html.escape(name)}</td>"
        + "".join(
            f"<td>{html.escape(format_value(r.get(k), r.get(f'{k}_err')))}</td>" for k in metrics
        )
        + "</tr>"
        for name, r in rows.items()
    )
    parts = [
        f'<table id="reference-table"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'
    ]
    if any(k in r for r in rows.values() for k in BIAS_KEYS):
        parts.append(_figure_html(_bias_figure(rows), "bias-comparison-0"))
    return "\n".join(parts)


def _noise_section(study: optuna.Study, best: FrozenTrial) -> str:
    """The test set at each noise level the study evaluated (``[objective] test_noise_levels``):
    RMSE and m of the best network and of the reference estimator."""
    attrs = best.user_attrs
    base = float(_objective_options(study).get("noise_sigma", GalaxySimulation.noise_sigma))
    levels = sorted({float(key.split("_", 2)[1]) for key in attrs if key.startswith(NOISE_PREFIX)})
    prefixes = {base: "", **{level: noise_prefix(level) for level in levels}}
    columns = ("rmse", "m1", "m2", "ref_rmse", "ref_m1", "ref_m2", "rmse_ratio")
    head = "".join(f"<th>{html.escape(c)}</th>" for c in ("noise sigma", *columns))
    body = "".join(
        f"<tr><td>{level:g}</td>" + "".join(
            f"<td>{html.escape(format_value(attrs.get(prefix + c), attrs.get(prefix + c + '_err')))}</td>"
            for c in columns
        ) + "</tr>"
        for level, prefix in sorted(prefixes.items())
    )
    figure = go.Figure()
    for label, key in ((f"network (trial {best.number})", "rmse"), ("reference", "ref_rmse")):
        points = [(level, attrs.get(prefix + key)) for level, prefix in sorted(prefixes.items())]
        points = [(level, value) for level, value in points if isinstance(value, (int, float)) and level > 0]
        if points:
            figure.add_trace(go.Scatter(x=[p[0] for p in points], y=[p[1] for p in points],
                                        mode="lines+markers", name=label))
    figure.update_layout(xaxis_type="log", yaxis_type="log", xaxis_title="pixel noise sigma",
                         yaxis_title="RMSE of g", height=380)
    return (f'<table id="noise-table"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>\n'
            + _figure_html(figure, "noise-levels-0"))


def _bias_figure(rows: dict[str, dict[str, float]]) -> go.Figure:
    """m and c (with error bars) of the network and each reference estimator."""
    figure = make_subplots(
        rows=1, cols=2, subplot_titles=("multiplicative bias m", "additive bias c")
    )
    for name, values in rows.items():
        for col, keys in ((1, ("m1", "m2")), (2, ("c1", "c2"))):
            present = [k for k in keys if k in values]
            errors = [values.get(f"{k}_err", float("nan")) for k in present]
            figure.add_trace(
                go.Scatter(
                    x=present,
                    y=[values[k] for k in present],
                    mode="markers",
                    name=name,
                    legendgroup=name,
                    showlegend=col == 1,
                    error_y={
                        "type": "data",
                        "array": [e if math.isfinite(e) else 0.0 for e in errors],
                    },
                ),
                row=1,
                col=col,
            )
    figure.add_hline(y=0.0, line_color="gray", line_width=1)
    figure.update_layout(title="shear bias: network vs reference estimators", height=420)
    return figure


def _diagnostics_section(
    study: optuna.Study, best: FrozenTrial | None, storage_url: str | None
) -> str:
    if best is None:
        return _note("No completed trial yet.")
    if storage_url is None:
        return _note("No artifact store given.")
    try:
        data = read_trial_artifact(best, artifact_store(storage_url), FIGURE)
    except (OSError, optuna.artifacts.exceptions.ArtifactNotFound) as error:
        return _note(f"The diagnostic figure of trial {best.number} could not be read ({error}).")
    if data is None:
        return _note(f"Trial {best.number} stored no diagnostic figure.")
    encoded = base64.b64encode(data).decode("ascii")
    alt = f"diagnostic figure of trial {best.number}"
    image = f'<img id="diagnostics-figure" alt="{alt}" src="data:image/png;base64,{encoded}">'
    return f"<p>Best trial {best.number}.</p>{image}"


STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1200px; color: #222; }
table { border-collapse: collapse; font-size: 0.9em; margin: 0.5em 0; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.5em; text-align: right; vertical-align: top; }
td:last-child { text-align: left; }
.note { color: #666; font-style: italic; }
img { max-width: 100%; }
"""


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
            f"Top {len(top)} trials",
            _trials_table(study, top) if top else _note("No completed trial yet."),
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
            "Intermediate values (validation loss per epoch)",
            _intermediate_section(study),
        ),
    ]
    if len(study.directions) > 1:
        sections.append(_section("pareto-front", "Pareto front", _pareto_section(study, complete)))
    sections.append(
        _section(
            "reference-comparison",
            "Best network vs reference estimators",
            _reference_section(study, best),
        )
    )
    if best is not None and any(key.startswith(NOISE_PREFIX) for key in best.user_attrs):
        sections.append(_section(
            "noise-levels", "Best network and reference across noise levels", _noise_section(study, best)
        ))
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
