"""The shear objective's sections of the study report: biases against the reference, and the
best network and reference across noise levels."""

from __future__ import annotations

import math
from typing import Any

import plotly.graph_objects as go
from plotly.subplots import make_subplots

from lensnas.objectives.base import Baseline, ReportSection, TrialRecord
from lensnas.objectives.report_html import COLOURS, figure_html, format_value, html_table, note

BIAS_KEYS = ("m1", "m2", "c1", "c2")
NOISE_LEVELS = "noise_levels"


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
