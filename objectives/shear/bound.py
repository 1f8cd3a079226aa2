"""The physical limit of shear measurement: the Cramér-Rao bound on (g1, g2) per galaxy.

For each test galaxy the noiseless GalSim rendering of :mod:`lensnas.objectives.shear.data`
(intrinsic shape, then the applied shear, then the PSF, drawn at the pixel scale) is
differentiated by central finite differences with respect to the six parameters
``PARAMETERS``: the shear (g1, g2), the flux, the centroid (x, y in arcsec) and the size (the
half-light radius in arcsec). For Gaussian pixel noise of standard deviation sigma the Fisher
matrix is ``F_ij = sum_pixels (dI/dp_i)(dI/dp_j) / sigma^2``; the bound on g1 is
``sqrt((F^-1)_{g1,g1})``, marginalised over flux, centroid, size and the other shear
component (the same for g2). No unbiased estimator of one galaxy's shear has a smaller RMSE.

The Fisher matrix is computed once at unit noise sigma (``fisher_per_unit_sigma``); the bound
at noise sigma is ``sigma * bound_per_unit_sigma``, so every noise level is free. The
population's RMS bound :func:`crb_rmse` uses the convention of
:func:`lensnas.objectives.shear.metrics.rmse`: the root mean square over galaxies and both
components.

Example::

    bound = cached_bound(simulation, population, cache_dir, dataset_key)
    bound.rmse(1e-5), bound.at(1e-5)  # population RMS bound, per-galaxy (N, 2) bounds
"""

from __future__ import annotations

import math
import multiprocessing
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import galsim
import numpy as np

from lensnas.objectives.base import Baseline
from lensnas.objectives.cache import cached_arrays
from lensnas.objectives.shear.data import GalaxySimulation
from lensnas.objectives.shear.reference import cpu_count

PARAMETERS = ("g1", "g2", "flux", "x", "y", "half_light_radius")
# Central-difference half-steps, chosen where the bound has converged (to 1e-5 relative on the
# quickstart galaxies; see tests/test_shear_bound.py): shear in g units, the centroid as a
# fraction of a pixel, the size as a fraction of the half-light radius. The flux derivative is
# exact (the image is linear in flux).
SHEAR_STEP = 1e-3
CENTROID_STEP_PIXELS = 1e-2
SIZE_STEP_FRACTION = 1e-3
VERSION = 1
BOUND_NAME = "Cramér-Rao bound"
BOUND_DESCRIPTION = (
    "the smallest per-galaxy RMSE of g any unbiased estimator can reach on these galaxies at this "
    "noise (Fisher matrix of the noiseless rendering, marginalised over flux, centroid, size and "
    "the other component)"
)


@dataclass(frozen=True)
class ShearBound:
    """Per-galaxy Fisher matrices and Cramér-Rao bounds on (g1, g2) at unit pixel noise."""

    fisher_per_unit_sigma: np.ndarray  # (N, 6, 6), PARAMETERS order, at pixel noise sigma 1
    bound_per_unit_sigma: np.ndarray  # (N, 2): bound on (g1, g2) at pixel noise sigma 1

    def at(self, noise_sigma: float | np.ndarray) -> np.ndarray:
        """Per-galaxy bounds (N, 2) on (g1, g2) at pixel noise ``noise_sigma`` (unit-flux units;
        one number, or each galaxy's own (N,))."""
        sigma = np.asarray(noise_sigma, dtype=np.float64)
        return (sigma[:, None] if sigma.ndim else sigma) * np.asarray(
            self.bound_per_unit_sigma, dtype=np.float64)

    def rmse(self, noise_sigma: float | np.ndarray) -> float:
        """The population's RMS bound at pixel noise ``noise_sigma``."""
        return crb_rmse(self.at(noise_sigma))


def model_image(
    simulation: GalaxySimulation,
    half_light_radius: float,
    flux: float,
    intrinsic_g: tuple[float, float],
    shear: tuple[float, float],
    centroid: tuple[float, float] = (0.0, 0.0),
) -> np.ndarray:
    """The noiseless stamp (float64) as :func:`shear_data.render` draws it, with the galaxy
    moved by ``centroid`` (x, y in arcsec) from the stamp centre."""
    galaxy = simulation.sheared_galaxy(half_light_radius, flux, intrinsic_g, shear)
    if centroid[0] or centroid[1]:
        galaxy = galaxy.shift(float(centroid[0]), float(centroid[1]))
    size = simulation.stamp_size
    drawn = galsim.Convolve(galaxy, simulation.psf()).drawImage(
        nx=size, ny=size, scale=simulation.pixel_scale, dtype=np.float64
    )
    return drawn.array


def model_derivatives(
    simulation: GalaxySimulation,
    half_light_radius: float,
    flux: float,
    intrinsic_g: tuple[float, float],
    shear: tuple[float, float],
    shear_step: float = SHEAR_STEP,
    centroid_step_pixels: float = CENTROID_STEP_PIXELS,
    size_step_fraction: float = SIZE_STEP_FRACTION,
    offset: tuple[float, float] = (0.0, 0.0),
) -> np.ndarray:
    """dI/dp (6, H, W) for the PARAMETERS, by central finite differences (flux: exact), for a
    galaxy ``offset`` (x, y in arcsec) from the stamp centre."""
    g1, g2 = float(shear[0]), float(shear[1])
    shift = centroid_step_pixels * simulation.pixel_scale
    size_step = size_step_fraction * half_light_radius

    def draw(radius: float = half_light_radius, g: tuple[float, float] = (g1, g2),
             centroid: tuple[float, float] = (0.0, 0.0)) -> np.ndarray:
        moved = (offset[0] + centroid[0], offset[1] + centroid[1])
        return model_image(simulation, radius, flux, intrinsic_g, g, moved)

    return np.stack([
        (draw(g=(g1 + shear_step, g2)) - draw(g=(g1 - shear_step, g2))) / (2 * shear_step),
        (draw(g=(g1, g2 + shear_step)) - draw(g=(g1, g2 - shear_step))) / (2 * shear_step),
        draw() / flux,
        (draw(centroid=(shift, 0.0)) - draw(centroid=(-shift, 0.0))) / (2 * shift),
        (draw(centroid=(0.0, shift)) - draw(centroid=(0.0, -shift))) / (2 * shift),
        (draw(radius=half_light_radius + size_step) - draw(radius=half_light_radius - size_step))
        / (2 * size_step),
    ])


def fisher_matrix(
    simulation: GalaxySimulation,
    half_light_radius: float,
    flux: float,
    intrinsic_g: tuple[float, float],
    shear: tuple[float, float],
    **steps: Any,
) -> np.ndarray:
    """The Fisher matrix (6, 6) of one galaxy's PARAMETERS at pixel noise sigma 1."""
    derivatives = model_derivatives(
        simulation, half_light_radius, flux, intrinsic_g, shear, **steps
    )
    flat = derivatives.reshape(len(PARAMETERS), -1)
    return flat @ flat.T


def bound_from_fisher(fisher: np.ndarray) -> np.ndarray:
    """Marginalised bounds (N, 2) on (g1, g2) from Fisher matrices (N, 6, 6): sqrt of the
    diagonal of the inverse; inf where a matrix is singular."""
    fisher = np.asarray(fisher, dtype=np.float64)
    bounds = np.full((len(fisher), 2), np.inf)
    for i, matrix in enumerate(fisher):
        # Scale to unit diagonal before inverting: the parameters differ by orders of magnitude.
        scale = np.sqrt(np.diag(matrix))
        if not np.all(scale > 0):
            continue
        try:
            inverse = np.linalg.inv(matrix / np.outer(scale, scale)) / np.outer(scale, scale)
        except np.linalg.LinAlgError:
            continue
        variance = np.diag(inverse)[:2]
        if np.all(variance > 0):
            bounds[i] = np.sqrt(variance)
    return bounds


def crb_rmse(bounds: np.ndarray) -> float:
    """The population's RMS bound: sqrt of the mean of bound^2 over galaxies and both components."""
    return float(np.sqrt(np.mean(np.asarray(bounds, dtype=np.float64) ** 2)))


def _fisher_chunk(
    simulation: GalaxySimulation, population: dict[str, np.ndarray], first_index: int
) -> tuple[int, np.ndarray]:
    """Worker: the Fisher matrices (n, 6, 6) of one chunk of galaxies, each with its own PSF,
    profile and centroid offset where they vary."""
    count = len(population["flux"])
    fisher = np.empty((count, len(PARAMETERS), len(PARAMETERS)))
    for i in range(count):
        offset = (0.0, 0.0)
        if "centroid_offset" in population:
            offset = tuple(float(v) * simulation.pixel_scale for v in population["centroid_offset"][i])
        fisher[i] = fisher_matrix(
            simulation.for_galaxy(population, i), float(population["half_light_radius"][i]),
            float(population["flux"][i]), tuple(population["intrinsic_g"][i]),
            tuple(population["shear"][i]), offset=offset,
        )
    return first_index, fisher


def fisher_matrices(
    simulation: GalaxySimulation,
    population: dict[str, np.ndarray],
    workers: int | None = None,
    progress: bool = False,
    on_progress: Callable[[int], None] | None = None,
) -> np.ndarray:
    """Fisher matrices (N, 6, 6) at unit noise of every galaxy of ``population`` (keys
    half_light_radius, flux, intrinsic_g, shear, and the per-galaxy values of a varied
    simulation), in chunks over ``workers`` processes (default: all CPU cores), with a progress
    bar when ``progress``."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
    )

    keys = ("half_light_radius", "flux", "intrinsic_g", "shear", *simulation.varied(),
            "centroid_offset")
    population = {key: np.asarray(population[key], dtype=np.float64)
                  for key in keys if key in population}
    count = len(population["flux"])
    workers = cpu_count() if workers is None else workers
    chunk = int(min(64, max(1, math.ceil(count / (max(workers, 1) * 8)))))
    starts = list(range(0, count, chunk))
    workers = max(1, min(workers, len(starts)))
    pieces: dict[int, np.ndarray] = {}

    def chunk_of(start: int) -> dict[str, np.ndarray]:
        return {key: value[start:start + chunk] for key, value in population.items()}

    def done(start: int, fisher: np.ndarray) -> None:
        pieces[start] = fisher
        bar.advance(task, len(fisher))
        if on_progress is not None:
            on_progress(len(fisher))

    columns = (
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn()
    )
    bar = Progress(*columns, disable=not progress, transient=True)
    task = bar.add_task(f"Cramér-Rao bound ({count} galaxies, {workers} workers)", total=count)
    if workers == 1:
        with bar:
            for start in starts:
                done(*_fisher_chunk(simulation, chunk_of(start), start))
    else:
        # As the reference estimators: the pool's processes start at the first submit, before
        # the progress bar starts its refresh thread.
        context = multiprocessing.get_context()
        with ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
            futures = [pool.submit(_fisher_chunk, simulation, chunk_of(start), start)
                       for start in starts]
            with bar:
                for future in as_completed(futures):
                    done(*future.result())
    if not starts:
        return np.empty((0, len(PARAMETERS), len(PARAMETERS)))
    return np.concatenate([pieces[start] for start in starts])


def compute_bound(
    simulation: GalaxySimulation,
    population: dict[str, np.ndarray],
    workers: int | None = None,
    progress: bool = False,
) -> ShearBound:
    """The bound on every galaxy of ``population`` (no caching)."""
    fisher = fisher_matrices(simulation, population, workers, progress)
    return ShearBound(fisher, bound_from_fisher(fisher))


def cached_bound(
    simulation: GalaxySimulation,
    population: dict[str, np.ndarray],
    cache_dir: str | Path,
    dataset_key: str,
    progress: bool = False,
    workers: int | None = None,
) -> tuple[ShearBound, bool]:
    """The bound on ``population`` computed once and cached beside the dataset ``dataset_key``
    (whose galaxies ``population`` holds); returns (bound, cache hit)."""
    config: dict[str, Any] = {
        "dataset_key": dataset_key,
        "steps": {"shear": SHEAR_STEP, "centroid_pixels": CENTROID_STEP_PIXELS,
                  "size_fraction": SIZE_STEP_FRACTION},
        "version": VERSION,
    }

    def build() -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        bound = compute_bound(simulation, population, workers, progress)
        arrays = {"fisher_per_unit_sigma": bound.fisher_per_unit_sigma,
                  "bound_per_unit_sigma": bound.bound_per_unit_sigma}
        return arrays, {"parameters": list(PARAMETERS)}

    arrays, _, hit = cached_arrays(Path(cache_dir), "shear-bound", config, build)
    return ShearBound(arrays["fisher_per_unit_sigma"], arrays["bound_per_unit_sigma"]), hit


def bound_baseline(
    bound: ShearBound, noise_sigma: float, conditions: dict[str, float] | None = None
) -> Baseline:
    """The bound at pixel noise ``noise_sigma`` as a baseline row (rmse, rmse_g1, rmse_g2)."""
    per_galaxy = bound.at(noise_sigma)
    per_component = np.sqrt(np.mean(per_galaxy**2, axis=0))
    metrics = {"rmse": crb_rmse(per_galaxy), "rmse_g1": float(per_component[0]),
               "rmse_g2": float(per_component[1])}
    return Baseline("bound", BOUND_NAME, BOUND_DESCRIPTION, metrics, dict(conditions or {}))
