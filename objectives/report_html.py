"""Small pieces shared by every page lensnas writes (report, inspector page, model cards) and by
the objectives' report sections: the style sheet, tables, figures, notes and metric rows."""

from __future__ import annotations

import html
import math
from collections.abc import Sequence
from importlib import metadata
from typing import Any

import plotly.graph_objects as go
import plotly.io

NOT_METRICS = ("seed", "epochs_run")  # numeric trial attributes that are not metrics
STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1200px; color: #222; }
table { border-collapse: collapse; font-size: 0.9em; margin: 0.5em 0; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.5em; text-align: right; vertical-align: top; }
td:last-child { text-align: left; }
.note { color: #666; font-style: italic; }
img { max-width: 100%; }
"""  # the style sheet of every HTML page lensnas writes
# One colour per row of a comparison (plotly's default cycle), so that every panel of a
# figure draws the same estimator in the same colour as its legend entry.
COLOURS = ("#636efa", "#ef553b", "#00cc96", "#ab63fa", "#ffa15a", "#19d3f3", "#ff6692")


def figure_html(figure: go.Figure, div_id: str) -> str:
    """A plotly figure as a <div> (plotly.js is embedded once by the report)."""
    return plotly.io.to_html(
        figure,
        full_html=False,
        include_plotlyjs=False,
        div_id=div_id,
        config={"displaylogo": False, "responsive": True},
    )


def note(text: str) -> str:
    """A paragraph of explanation or a message in place of an empty figure."""
    return f'<p class="note">{html.escape(text)}</p>'


def html_table(
    header: Sequence[str], rows: Sequence[Sequence[str]], table_id: str | None = None
) -> str:
    """An HTML table of text cells (escaped)."""
    ident = f' id="{html.escape(table_id)}"' if table_id else ""
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in header)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in rows
    )
    return f"<table{ident}><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


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
