"""The comparison of a network with its study's baselines (reference estimators,
interpolation): one builder of rows for the report, the model card and ``lensnas baseline``."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from lensnas.objectives import Baseline, Objective, objective_class
from lensnas.objectives.report_html import format_value

NETWORK_DESCRIPTION = "the searched network on the same test set"
FLAG = "⚠"
FLAG_NOTE = (f"{FLAG}: differs from 0 by more than 3 standard errors (a significant bias); "
             "± values are 1-sigma errors.")


def study_baselines(study_attrs: dict[str, Any]) -> list[Baseline]:
    """The baselines stored with a study (its user attribute ``baselines``)."""
    stored = study_attrs.get("baselines", [])
    return [Baseline.from_dict(b) for b in stored if isinstance(b, dict)] if isinstance(stored, list) else []


def study_objective_class(study_attrs: dict[str, Any]) -> type[Objective] | None:
    """The objective class a study was run with (None when it is not installed here)."""
    try:
        return objective_class(str(study_attrs.get("objective")))
    except (KeyError, ImportError):
        return None


def comparison_columns(
    objective: type[Objective] | None, baselines: Sequence[Baseline], extra: Sequence[str] = ()
) -> list[str]:
    """The objective's summary metrics (then ``extra``) that some baseline has."""
    names = (*(objective.summary_metrics() if objective else ()), *extra)
    return [name for name in dict.fromkeys(names) if any(name in b.metrics for b in baselines)]


def comparison_rows(
    objective: type[Objective] | None,
    baselines: Sequence[Baseline],
    network: tuple[str, dict[str, Any]] | None = None,
    extra: Sequence[str] = (),
    describe: bool = True,
) -> tuple[list[str], list[list[str]]]:
    """(header, rows): the network (name, metrics) first when given, then each baseline; the
    metric cells as ``value ± error``; with ``describe`` a last column says what each row is."""
    columns = comparison_columns(objective, baselines, extra)
    header = ["estimator", *columns, *(["what it is"] if describe else [])]
    rows = []
    named = [(network[0], network[1], NETWORK_DESCRIPTION)] if network else []
    named += [(_label(b), b.metrics, b.description) for b in baselines]
    for name, metrics, description in named:
        cells = [flagged(metrics.get(c), metrics.get(f"{c}_err")) for c in columns]
        rows.append([name, *cells, *([description] if describe else [])])
    return header, rows


def flagged(value: Any, error: Any) -> str:
    """``value ± error``, marked when |value| exceeds 3 errors; "-" when missing."""
    text = format_value(value, error) or "-"
    numbers = all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in (value, error))
    if numbers and error > 0 and abs(value) > 3 * error:
        text += f" {FLAG} {abs(value) / error:.1f}σ"
    return text


def comparison_tables(
    objective: type[Objective] | None,
    baselines: Sequence[Baseline],
    network: tuple[str, dict[str, Any]] | None = None,
) -> list[tuple[str, str, list[str], list[list[str]]]]:
    """(title, explanation, header, rows) per table: the headline comparison (the network
    against the baselines that measure what it measures), then each group of the objective's
    ``BASELINE_GROUPS`` (e.g. mean-response ensemble estimators) with its sentence."""
    groups = dict(objective.BASELINE_GROUPS) if objective else {}
    headline = [b for b in baselines if b.group not in groups]
    header, rows = comparison_rows(objective, headline, network)
    sentence = "The network and the estimators it is compared with, on the same test set."
    if any("±" in cell for row in rows for cell in row):
        sentence += " " + FLAG_NOTE
    tables = [("Headline comparison", sentence, header, rows)]
    for group, (title, sentence) in groups.items():
        members = [b for b in baselines if b.group == group]
        if members:
            tables.append((title, sentence, *comparison_rows(objective, members, network)))
    return tables


def _label(baseline: Baseline) -> str:
    if not baseline.conditions:
        return baseline.name
    where = ", ".join(f"{key} {value:g}" if isinstance(value, float) else f"{key} {value}"
                      for key, value in baseline.conditions.items())
    return f"{baseline.name} ({where})"
