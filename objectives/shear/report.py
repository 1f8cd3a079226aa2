"""The shear objective's sections of the study report: biases against the reference, the best
network and reference across noise levels, and m and c on each test population."""

from __future__ import annotations

import dataclasses
import math
from collections import Counter
from typing import Any

import plotly.graph_objects as go
from plotly.subplots import make_subplots

from lensnas.objectives.base import Baseline, ReportSection, TrialRecord
from lensnas.objectives.report_html import COLOURS, figure_html, format_value, html_table, note
from lensnas.objectives.shear.data import GalaxySimulation

BIAS_KEYS = ("m1", "m2", "c1", "c2")
NOISE_LEVELS = "noise_levels"
POPULATIONS = "populations"
TRAINING_POPULATION = "training"
SIMULATION_DEFAULTS = {f.name: f.default for f in dataclasses.fields(GalaxySimulation)}
REQUIREMENT_M = 1e-3  # |m| a weak-lensing survey needs (LSST, isolated galaxies)
POPULATIONS_NOTE = (
    "Each test population is the study's test galaxies (same sizes, fluxes, shears and noise "
    "realisation) with the simulation keys listed changed, rendered at +g and -g; 'training' is "
    "the study's own test set. m and c from the paired protocol against the applied shear, with "
    "jackknife 1-sigma errors. Network: the trial's raw estimates. Calibrated: the network's "
    "estimates on metacal's unsheared images divided by its mean response to metacal's sheared "
    "images of the same population. Reference: the study's reference estimator on the same "
    "images. alpha: PSF leakage (c = alpha e_psf) where the population's PSF is elliptical."
)


def report_sections(study_attrs: dict[str, Any], best: TrialRecord | None) -> list[ReportSection]:
    """The bias comparison and (when the study evaluated them) the noise-level comparison."""
    if best is None:
        return []
    baselines = [Baseline.from_dict(b) for b in study_attrs.get("baselines", [])]
    own = [b for b in baselines if not b.conditions]
    rows = {f"network (trial {best.number})": best.attrs}
    rows.update({b.name: b.metrics for b in own if any(k in b.metrics for k in BIAS_KEYS)})
    sections = [ReportSection(
        "shear-bias", "Shear bias: best network and reference estimator",
        note("Multiplicative bias m (estimate = (1 + m) g + c) and additive bias c of each "
             "shear component on the test set, from the paired +g/-g protocol with jackknife "
             "1-sigma error bars. Weak-lensing surveys need |m| of order 1e-3.")
        + figure_html(bias_figure(rows), "bias-comparison-0"),
    )]
    if isinstance(best.attrs.get(POPULATIONS), dict):
        figure = populations_figure(study_attrs, best)
        tables = "".join(
            f"<h3>{title}</h3>" + note(sentence) + html_table(header, rows, f"population-table-{i}")
            for i, (title, sentence, header, rows) in enumerate(population_tables(study_attrs, best)))
        sections.append(ReportSection(
            "test-populations", "Test populations: |m| off the training population",
            note(POPULATIONS_NOTE + " Figure: the largest |m| of the two components per "
                 f"population (log scale); the dashed line is |m| = {REQUIREMENT_M:g}, what a "
                 "weak-lensing survey needs.") + figure_html(figure, "populations-figure") + tables,
        ))
    if isinstance(best.attrs.get(NOISE_LEVELS), dict):
        sections.append(ReportSection(
            "noise-levels", "Best network and reference across noise levels",
            noise_section(study_attrs, best, baselines),
        ))
    return sections


def bias_figure(rows: dict[str, dict[str, Any]]) -> go.Figure:
    """m and c (with error bars) of the network and each reference estimator: one colour per
    estimator in both panels and in the legend."""
    figure = make_subplots(rows=1, cols=2, subplot_titles=("multiplicative bias m", "additive bias c"))
    for index, (name, values) in enumerate(rows.items()):
        colour = COLOURS[index % len(COLOURS)]
        for col, keys in ((1, ("m1", "m2")), (2, ("c1", "c2"))):
            present = [k for k in keys if isinstance(values.get(k), (int, float))]
            errors = [values.get(f"{k}_err", float("nan")) for k in present]
            figure.add_trace(
                go.Scatter(
                    x=present, y=[values[k] for k in present], mode="markers", name=name,
                    legendgroup=name, showlegend=col == 1,
                    marker={"color": colour, "size": 9},
                    error_y={"type": "data", "color": colour,
                             "array": [e if math.isfinite(e) else 0.0 for e in errors]},
                ),
                row=1, col=col,
            )
    figure.add_hline(y=0.0, line_color="gray", line_width=1)
    figure.update_yaxes(title_text="m (dimensionless)", row=1, col=1)
    figure.update_yaxes(title_text="c (shear units)", row=1, col=2)
    figure.update_xaxes(title_text="shear component", row=1, col=1)
    figure.update_xaxes(title_text="shear component", row=1, col=2)
    figure.update_layout(height=420, legend_title_text="estimator")
    return figure


def noise_section(study_attrs: dict[str, Any], best: TrialRecord, baselines: list[Baseline]) -> str:
    """RMSE and m of the best network and of the reference at each noise level evaluated."""
    base = float(study_attrs.get("noise_sigma", float("nan")))
    levels = {base: best.attrs}
    for level, metrics in best.attrs[NOISE_LEVELS].items():
        levels[float(level)] = metrics
    reference = {base: next((b.metrics for b in baselines if b.key == "reference" and not b.conditions), {})}
    bound = {float(b.conditions.get("noise_sigma", base)): b.metrics
             for b in baselines if b.key == "bound"}
    for b in baselines:
        if b.key == "reference" and "noise_sigma" in b.conditions:
            reference[float(b.conditions["noise_sigma"])] = b.metrics
    header = ("pixel noise sigma", "network RMSE", "network m1", "network m2",
              "reference RMSE", "reference m1", "reference m2", "RMSE ratio",
              "Cramér-Rao bound", "network RMSE / bound", "reference RMSE / bound",
              "reference per-galaxy RMSE / bound")
    rows = []
    for level in sorted(levels):
        net, ref = levels[level], reference.get(level, {})
        rows.append((f"{level:g}", *(format_value(net.get(k), net.get(f"{k}_err")) for k in ("rmse", "m1", "m2")),
                     *(format_value(ref.get(k), ref.get(f"{k}_err")) for k in ("rmse", "m1", "m2")),
                     format_value(net.get("rmse_ratio")),
                     format_value(bound.get(level, {}).get("rmse")),
                     *(format_value(net.get(k)) for k in
                       ("rmse_over_crb", "ref_rmse_over_crb", "ref_object_rmse_over_crb"))))
    figure = go.Figure()
    for index, (label, source) in enumerate(
        ((f"network (trial {best.number})", levels), ("reference (mean response)", reference),
         ("Cramér-Rao bound", bound))
    ):
        points = [(level, source[level].get("rmse")) for level in sorted(source) if level > 0]
        points = [(x, y) for x, y in points if isinstance(y, (int, float))]
        if points:
            figure.add_trace(go.Scatter(
                x=[p[0] for p in points], y=[p[1] for p in points], mode="lines+markers",
                name=label, marker={"color": COLOURS[index]},
                line={"color": COLOURS[index], "dash": "dash" if source is bound else "solid"},
            ))
    figure.update_layout(xaxis_type="log", yaxis_type="log", xaxis_title="pixel noise sigma (unit-flux galaxy)",
                         yaxis_title="RMSE of g per galaxy", height=380)
    explanation = note(
        "The same test galaxies with the same noise realisation scaled to each level "
        "([objective] test_noise_levels). RMSE ratio: network RMSE / reference RMSE. Cramér-Rao "
        "bound: the smallest per-galaxy RMSE of g any unbiased estimator can reach on these "
        "galaxies at that noise; RMSE / bound is 1 at the physical limit."
    )
    return explanation + html_table(header, rows, "noise-table") + "\n" + figure_html(figure, "noise-levels-0")


def _population_changes(study_attrs: dict[str, Any]) -> dict[str, str]:
    """What sets each population apart, as text (``psf_fwhm=1.0``): its keys whose value is not
    the most common one among the populations (so a family of "one thing changed" populations
    shows that one thing), from the stored study file."""
    spec = study_attrs.get("spec") if isinstance(study_attrs.get("spec"), dict) else {}
    options = spec.get("objective") or {}
    declared = {name: dict(changes) for name, changes in (options.get("test_populations") or {}).items()
                if isinstance(changes, dict)}
    keys = sorted({key for changes in declared.values() for key in changes})
    base = {key: options.get(key, SIMULATION_DEFAULTS.get(key)) for key in keys}
    values = {name: {key: changes.get(key, base[key]) for key in keys} for name, changes in declared.items()}
    usual = {}
    for key in keys:
        value, count = Counter(repr(population[key]) for population in values.values()).most_common(1)[0]
        usual[key] = value if count >= 2 else None  # a value no two populations share is news
    return {name: ", ".join(f"{key}={own[key]}" for key in keys if repr(own[key]) != usual[key]) or "-"
            for name, own in values.items()}


def _reference_by_population(study_attrs: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The reference estimator's metrics (mean response) on each population."""
    found = {}
    for baseline in (Baseline.from_dict(b) for b in study_attrs.get("baselines", [])):
        if baseline.key != "reference":
            continue
        if not baseline.conditions:
            found[TRAINING_POPULATION] = baseline.metrics
        elif set(baseline.conditions) == {"population"}:
            found[str(baseline.conditions["population"])] = baseline.metrics
    return found


def population_tables(study_attrs: dict[str, Any], trial: TrialRecord
                      ) -> list[tuple[str, str, list[str], list[list[str]]]]:
    """Two tables (m, then c and alpha) of the trial's metrics on each test population beside
    the reference's; empty when the trial has none."""
    populations = trial.attrs.get(POPULATIONS)
    if not isinstance(populations, dict):
        return []
    changes = _population_changes(study_attrs)
    reference = _reference_by_population(study_attrs)
    calibrated = any("cal_m1" in values for values in populations.values())
    estimators = [("network", "")] + ([("calibrated", "cal_")] if calibrated else [])
    tables = []
    leakage = tuple(key for key in ("alpha1", "alpha2")
                    if any(key in values for values in populations.values()))
    for title, keys, extra in (("m per test population", ("m1", "m2"), ()),
                               ("c and PSF leakage per test population", ("c1", "c2"), leakage)):
        header = ["population", "changed"]
        header += [f"{label} {key}" for label, _ in estimators for key in keys]
        header += [f"reference {key}" for key in keys]
        header += [f"{label} {key}" for label, _ in estimators for key in extra]
        rows = []
        for name, values in populations.items():
            ref = reference.get(name, {})
            row = [name, "(the study's test set)" if name == TRAINING_POPULATION else changes.get(name, "")]
            row += [format_value(values.get(f"{prefix}{key}"), values.get(f"{prefix}{key}_err"))
                    or "-" for _, prefix in estimators for key in keys]
            row += [format_value(ref.get(key), ref.get(f"{key}_err")) or "-" for key in keys]
            row += [format_value(values.get(f"{prefix}{key}"), values.get(f"{prefix}{key}_err"))
                    or "-" for _, prefix in estimators for key in extra]
            rows.append(row)
        sentence = (f"Trial {trial.number}; " + POPULATIONS_NOTE.split(". ", 1)[1])
        tables.append((title, sentence, header, rows))
    return tables


def populations_figure(study_attrs: dict[str, Any], trial: TrialRecord) -> go.Figure:
    """The largest |m| of the two components per test population (log scale), for the network,
    calibrated network and reference, with 1-sigma error bars, and the survey requirement."""
    populations = trial.attrs[POPULATIONS]
    reference = _reference_by_population(study_attrs)
    names = list(populations)
    figure = go.Figure()
    sources = [(f"network (trial {trial.number})", populations, "")]
    if any("cal_m1" in values for values in populations.values()):
        sources.append(("network calibrated by its metacal response", populations, "cal_"))
    sources.append(("reference estimator", reference, ""))
    for index, (label, metrics, prefix) in enumerate(sources):
        xs, ys, errors = [], [], []
        for name in names:
            values = metrics.get(name, {})
            pairs = [(abs(values[f"{prefix}m{i}"]), values.get(f"{prefix}m{i}_err", 0.0))
                     for i in (1, 2) if isinstance(values.get(f"{prefix}m{i}"), (int, float))]
            if pairs:
                worst, error = max(pairs)
                xs.append(name)
                ys.append(max(worst, 1e-6))
                errors.append(error if isinstance(error, (int, float)) and math.isfinite(error) else 0.0)
        colour = COLOURS[index % len(COLOURS)]
        figure.add_trace(go.Scatter(x=xs, y=ys, mode="markers", name=label,
                                    marker={"color": colour, "size": 10},
                                    error_y={"type": "data", "array": errors, "color": colour}))
    figure.add_hline(y=REQUIREMENT_M, line_dash="dash", line_color="gray",
                     annotation_text=f"|m| = {REQUIREMENT_M:g} (survey requirement)")
    figure.update_layout(yaxis_type="log", yaxis_title="largest |m| of g1, g2 (log)",
                         xaxis_title="test population", height=440, legend_title_text="estimator")
    return figure
