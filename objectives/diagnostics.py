"""Small diagnostic figures written next to each trial's weights (PNG, matplotlib Agg).

Figures are drawn on a bare :class:`matplotlib.figure.Figure` with an Agg canvas, never
through pyplot, so no global state is touched and no display is needed.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

MAX_POINTS = 2000


def _save(figure: Figure, path: str | Path) -> Path:
    """Write ``figure`` as a PNG at ``path`` (parent folders created)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(figure)
    figure.savefig(path, format="png", dpi=100)
    return path


def shear_residual_figure(
    path: str | Path,
    truth: np.ndarray,
    estimate: np.ndarray,
    reference: np.ndarray | None = None,
    reference_name: str = "reference",
) -> Path:
    """Residuals (estimate - truth) against truth for g1 and g2: network and optional reference."""
    truth = np.asarray(truth, float)[:MAX_POINTS]
    estimate = np.asarray(estimate, float)[: len(truth)]
    figure = Figure(figsize=(9, 3.6), layout="constrained")
    axes = figure.subplots(1, 2, sharey=True)
    for i, ax in enumerate(axes):
        ax.axhline(0.0, color="0.5", lw=0.8)
        ax.scatter(truth[:, i], estimate[:, i] - truth[:, i], s=4, alpha=0.5, label="network")
        if reference is not None:
            reference_values = np.asarray(reference, float)[: len(truth)]
            ok = np.isfinite(reference_values[:, i])
            ax.scatter(
                truth[ok, i],
                reference_values[ok, i] - truth[ok, i],
                s=4,
                alpha=0.5,
                label=reference_name,
            )
        ax.set_xlabel(f"true g{i + 1}")
        ax.set_title(f"g{i + 1}: residual of each test galaxy")
        ax.xaxis.set_major_locator(MaxNLocator(nbins=5))  # readable ticks at any shear range
        ax.ticklabel_format(axis="both", style="sci", scilimits=(-2, 2))
    axes[0].set_ylabel("estimate - truth (shear)")
    axes[0].legend(loc="best", fontsize="small", markerscale=3)
    return _save(figure, path)


def sr_panels_figure(
    path: str | Path, lr: np.ndarray, bicubic: np.ndarray, sr: np.ndarray, hr: np.ndarray
) -> Path:
    """One test image as four panels: LR input, bicubic upsampling, network SR, HR truth."""
    return image_panels_figure(
        path, {"LR": lr, "bicubic": bicubic, "SR (network)": sr, "HR (truth)": hr}
    )


def image_panels_figure(path: str | Path, panels: dict[str, np.ndarray]) -> Path:
    """Images side by side on one colour scale, titled by their names (e.g. noisy, denoised,
    clean)."""
    images = {name: np.squeeze(np.asarray(image, float)) for name, image in panels.items()}
    for name, image in images.items():
        if image.ndim != 2:
            raise ValueError(
                f"image_panels_figure: {name} must be one 2-D image, got shape {image.shape}"
            )
    low = min(float(image.min()) for image in images.values())
    high = max(float(image.max()) for image in images.values())
    figure = Figure(figsize=(3.2 * len(images) + 0.8, 3.4), layout="constrained")
    axes = np.atleast_1d(figure.subplots(1, len(images)))
    for ax, (name, image) in zip(axes, images.items()):
        shown = ax.imshow(image, origin="lower", cmap="magma", vmin=low, vmax=high)
        ax.set_title(f"{name} {image.shape[0]}x{image.shape[1]}")
        ax.set_xticks([])
        ax.set_yticks([])
    figure.colorbar(shown, ax=list(axes), shrink=0.8)
    return _save(figure, path)
