"""The report's sections drawn from what ``lensnas inspect`` and ``lensnas export --ensemble``
stored with the study (its user attributes ``inspector`` and ``uncertainty``): the makers store,
this module draws, so the report reads stored results and never imports their makers."""

from __future__ import annotations

import html
from typing import Any

import plotly.graph_objects as go

from lensnas.objectives.report_html import COLOURS, figure_html, format_value, html_table, note

INSPECTOR_ATTR = "inspector"  # study user attribute: {trial number: its layers and probe}
UNCERTAINTY_ATTR = "uncertainty"  # study user attribute: {export name: its calibration record}
PROBE_GRID = 4  # the inspector's block features are average-pooled to this many cells per side
LAYER_HEADER = ("layer", "block", "type", "output", "stride (input px)",
                "receptive field (input px)", "parameters")
CALIBRATION_HEADER = (
    "estimate", "examples", "within 1 sigma (Gaussian 68.3%)", "within 2 sigma (Gaussian 95.4%)",
    "predicted / actual scatter", "RMS sigma", "RMSE",
)


# ----------------------------------------------------------------------------- inspector


def layer_rows(layers: list[dict[str, Any]]) -> list[tuple[str, ...]]:
    """Rows of :data:`LAYER_HEADER`."""
    return [(r["name"], r["block"], r["kind"], r["output"], r["stride"], r["receptive_field"],
             f"{r['parameters']:,}") for r in layers]


LAYER_NOTE = (
    "Each layer's output (channels x height x width, or features), its stride (input pixels "
    "between neighbouring output pixels) and receptive field (the input pixels one output pixel "
    "can depend on, per side), followed through every branch and skip from the network itself; "
    "'whole input' after a global pooling, a dense layer or channel attention. Parameters: the "
    "layer's own weights."
)
PROBE_NOTE = (
    "A linear probe (ridge least squares) of the true outputs (g1, g2) fitted on each block's "
    f"features, average-pooled to a {PROBE_GRID} x {PROBE_GRID} grid, on the validation "
    "examples, and scored on the test examples: where the RMSE stops falling, later blocks add "
    "no linearly readable shape information; where it rises, information is lost. Dotted lines: "
    "the probe on the raw pixels and the RMSE of always guessing the mean (no information); "
    "dashed: each network's own test RMSE."
)


def probe_figure(stored: dict[str, dict[str, Any]]) -> go.Figure:
    """Probe RMSE against block depth, one line per inspected trial; reference levels as
    horizontal lines."""
    figure = go.Figure()
    entries = [entry for _, entry in sorted(stored.items(), key=lambda kv: int(kv[0]))
               if (entry.get("probe") or {}).get("blocks")]
    span = [1, max([len(entry["probe"]["blocks"]) for entry in entries], default=1)]
    references: dict[str, float] = {}
    for index, entry in enumerate(entries):
        probe, colour = entry["probe"], COLOURS[index % len(COLOURS)]
        figure.add_trace(go.Scatter(
            x=list(range(1, len(probe["blocks"]) + 1)), y=probe["rmse"], mode="lines+markers",
            name=f"{entry['label']}: probe", line={"color": colour}, marker={"color": colour},
            text=probe["blocks"], hovertemplate="%{text}: RMSE %{y:.3e}<extra></extra>",
        ))
        if isinstance(probe.get("network_rmse"), (int, float)):
            figure.add_trace(go.Scatter(
                x=span, y=[probe["network_rmse"]] * 2, mode="lines",
                name=f"{entry['label']}: the network's own RMSE",
                line={"color": colour, "dash": "dash"},
            ))
        references = {"probe on the raw pixels": probe["pixels_rmse"],
                      "no information (the mean)": probe["no_information_rmse"]}
    for index, (label, value) in enumerate(references.items()):
        figure.add_trace(go.Scatter(x=span, y=[value] * 2, mode="lines", name=label,
                                    line={"color": ("gray", "black")[index], "dash": "dot"}))
    figure.update_layout(xaxis_title="block (depth along the network)",
                         yaxis_title="probe RMSE of the outputs (test set)",
                         yaxis_type="log", height=420, legend_title_text="line")
    figure.update_xaxes(dtick=1)
    return figure


def inspector_section(study_attrs: dict[str, Any]) -> str | None:
    """HTML of the report's inspector section, or None when no trial was inspected."""
    stored = study_attrs.get(INSPECTOR_ATTR)
    if not isinstance(stored, dict) or not stored:
        return None
    parts = []
    if any((entry.get("probe") or {}).get("blocks") for entry in stored.values()):
        parts += [note(PROBE_NOTE), figure_html(probe_figure(stored), "probe-figure")]
    parts.append(note(LAYER_NOTE))
    for number, entry in sorted(stored.items(), key=lambda kv: int(kv[0])):
        parts.append(f"<details><summary>Layers of {html.escape(entry['label'])}</summary>"
                     + html_table(LAYER_HEADER, layer_rows(entry["layers"]),
                                  f"layers-{int(number)}") + "</details>")
    return "\n".join(parts)


# ----------------------------------------------------------------------------- uncertainty


def calibration_row(name: str, values: dict[str, Any]) -> tuple[str, ...]:
    """One row of :data:`CALIBRATION_HEADER`."""
    if "unavailable" in values:
        return (name, "", f"unavailable: {values['unavailable']}", "", "", "", "")
    percent = [f"{100 * values[k]:.1f}%" if k in values else ""
               for k in ("within_1sigma", "within_2sigma")]
    return (name, f"{values.get('n', 0):.0f}", *percent,
            *(format_value(values.get(k)) for k in ("scatter_ratio", "sigma_rms", "rmse")))


def calibration_rows(record: dict[str, Any], name: str | None = None) -> list[tuple[str, ...]]:
    """This export's calibration row, then the reference estimator's."""
    reference = record["reference"]
    values = reference.get("calibration") or {"unavailable": reference.get("unavailable", "?")}
    return [calibration_row(name or record["label"], record["calibration"]),
            calibration_row(f"{reference['name']} (reference)", values)]


CALIBRATION_NOTE = (
    "Within 1 (2) sigma: the fraction of test examples and output components whose truth lies "
    "within 1 (2) sigma of the estimate; calibrated Gaussian errors give 68.3% (95.4%). "
    "Predicted / actual scatter: RMS sigma over the RMSE of the estimate (1 when the sigmas "
    "are right on average; below 1, overconfident). A deep ensemble's sigma is the spread of "
    "its members: it leaves out the errors they all share (the stamp's pixel noise, a common "
    "bias)."
)


def uncertainty_section(study_attrs: dict[str, Any]) -> str | None:
    """HTML of the report's calibration section, or None when no uncertainty was exported."""
    stored = study_attrs.get(UNCERTAINTY_ATTR)
    if not isinstance(stored, dict) or not stored:
        return None
    rows, references = [], {}
    for record in stored.values():
        export_row, reference_row = calibration_rows(record)
        rows.append(export_row)
        references.setdefault(reference_row[0], (reference_row, record["reference"]))
    rows += [row for row, _ in references.values()]
    described = [f"Reference: {ref['description']}." for _, ref in references.values()
                 if ref.get("description")]
    return (note(CALIBRATION_NOTE) + html_table(CALIBRATION_HEADER, rows, "calibration-table")
            + "".join(note(line) for line in described))
