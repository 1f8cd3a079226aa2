"""Shear accuracy metrics: RMSE and multiplicative/additive bias (m, c) with errors.

Convention: an estimator measures ``e_i = (1 + m_i) g_i + c_i`` for component i.

* :func:`linear_bias` fits that line by least squares; errors are the standard
  errors of the fit.
* :func:`paired_bias` uses the noise-cancelling protocol: every galaxy is measured at
  +g and -g with the same noise, so ``(e+ - e-)/2 = (1 + m) g`` and ``(e+ + e-)/2 = c``.
  ``1 + m`` is the least-squares slope through the origin; errors are delete-one-block
  jackknife errors.
* :func:`response_matched_bias` does the same for an estimator calibrated by its response to
  shear (metacal): each pair's raw change against the change its own response predicts.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class Bias:
    """m and c with their standard errors, per shear component (index 0 is g1, 1 is g2)."""

    m: tuple[float, float]
    m_err: tuple[float, float]
    c: tuple[float, float]
    c_err: tuple[float, float]

    def as_dict(self, prefix: str = "") -> dict[str, float]:
        """Flat ``{m1, m1_err, m2, ..., c2_err}`` with an optional key prefix."""
        out = {}
        for i in (0, 1):
            out[f"{prefix}m{i + 1}"] = self.m[i]
            out[f"{prefix}m{i + 1}_err"] = self.m_err[i]
            out[f"{prefix}c{i + 1}"] = self.c[i]
            out[f"{prefix}c{i + 1}_err"] = self.c_err[i]
        return out


def rmse(estimate: np.ndarray, truth: np.ndarray) -> tuple[float, float, float]:
    """Per-galaxy RMSE of g1, of g2, and over both components together."""
    residual = np.asarray(estimate, float) - np.asarray(truth, float)
    per_component = np.sqrt(np.mean(residual**2, axis=0))
    return float(per_component[0]), float(per_component[1]), float(np.sqrt(np.mean(residual**2)))


def _line_fit(x: np.ndarray, y: np.ndarray) -> tuple[float, float, float, float]:
    if len(x) < 3 or not np.ptp(x) > 0:  # one shear value: no line (a constant-shear population)
        return (float("nan"),) * 4
    design = np.stack([x, np.ones_like(x)], axis=1)
    coefficients, *_ = np.linalg.lstsq(design, y, rcond=None)
    residual = y - design @ coefficients
    dof = max(len(x) - 2, 1)
    covariance = np.linalg.inv(design.T @ design) * (residual @ residual) / dof
    slope, intercept = coefficients
    return float(slope - 1), float(np.sqrt(covariance[0, 0])), float(intercept), float(np.sqrt(covariance[1, 1]))


def linear_bias(estimate: np.ndarray, truth: np.ndarray) -> Bias:
    """m, c from a least-squares line of estimate against truth, per component."""
    estimate, truth = np.asarray(estimate, float), np.asarray(truth, float)
    fits = [_line_fit(truth[:, i], estimate[:, i]) for i in (0, 1)]
    return Bias(
        m=(fits[0][0], fits[1][0]), m_err=(fits[0][1], fits[1][1]),
        c=(fits[0][2], fits[1][2]), c_err=(fits[0][3], fits[1][3]),
    )


def _paired_estimates(plus: np.ndarray, minus: np.ndarray, truth: np.ndarray) -> np.ndarray:
    half_difference = (plus - minus) / 2
    half_sum = (plus + minus) / 2
    with np.errstate(invalid="ignore", divide="ignore"):  # no shear along a component: m NaN
        m = np.sum(half_difference * truth, axis=0) / np.sum(truth * truth, axis=0) - 1
    c = np.mean(half_sum, axis=0)
    return np.concatenate([m, c])


RING = 4  # galaxies in a shape-noise ring (see lensnas.objectives.shear.data.rotated_rings)


def jackknife_blocks(count: int, n_blocks: int) -> list[np.ndarray]:
    """``n_blocks`` contiguous blocks of ``count`` objects (fewer if N is small), cut between
    shape-noise rings (multiples of :data:`RING`) where there are enough objects: a block
    that cut a ring would leave half a ring's intrinsic shapes in the estimate."""
    unit = RING if count >= 2 * RING else 1
    units = count // unit
    n_blocks = max(2, min(n_blocks, units))
    edges = [unit * round(units * k / n_blocks) for k in range(n_blocks)] + [count]
    return [np.arange(start, stop) for start, stop in itertools.pairwise(edges)]


def _jackknife_bias(estimates: Any, arrays: tuple[np.ndarray, ...], n_blocks: int) -> Bias:
    """``estimates(*arrays) -> [m1, m2, c1, c2]`` on all objects, with delete-one-block
    jackknife errors over ``n_blocks`` contiguous blocks of objects (:func:`jackknife_blocks`)."""
    count = len(arrays[0])
    full = estimates(*arrays)
    blocks = jackknife_blocks(count, n_blocks)
    n_blocks = len(blocks)
    samples = []
    for block in blocks:
        keep = np.ones(count, bool)
        keep[block] = False
        samples.append(estimates(*(array[keep] for array in arrays)))
    samples = np.array(samples)
    errors = np.sqrt((n_blocks - 1) / n_blocks * np.sum((samples - samples.mean(axis=0)) ** 2, axis=0))
    return Bias(
        m=(float(full[0]), float(full[1])), m_err=(float(errors[0]), float(errors[1])),
        c=(float(full[2]), float(full[3])), c_err=(float(errors[2]), float(errors[3])),
    )


def paired_bias(
    plus: np.ndarray, minus: np.ndarray, truth: np.ndarray, n_blocks: int = 100
) -> Bias:
    """m, c from estimates at +g (``plus``) and -g (``minus``) of galaxies with shear ``truth``.

    Jackknife errors over ``n_blocks`` contiguous blocks of galaxies (fewer if N is small).
    """
    arrays = tuple(np.asarray(a, float) for a in (plus, minus, truth))
    return _jackknife_bias(_paired_estimates, arrays, n_blocks)


def _response_matched_estimates(
    plus: np.ndarray, minus: np.ndarray, response: np.ndarray, shear: np.ndarray
) -> np.ndarray:
    predicted = np.einsum("nij,nj->ni", response, shear)
    m = np.sum((plus - minus) / 2 * shear, axis=0) / np.sum(predicted * shear, axis=0) - 1
    c = np.mean((plus + minus) / 2, axis=0) @ np.linalg.inv(response.mean(axis=0)).T
    return np.concatenate([m, c])


def response_matched_bias(
    plus: np.ndarray, minus: np.ndarray, response_plus: np.ndarray, response_minus: np.ndarray,
    shear: np.ndarray, n_blocks: int = 100,
) -> Bias:
    """m, c of an estimator calibrated by its response to shear, from raw paired estimates
    ``plus``/``minus`` (N, 2) at +g/-g and each object's response (N, 2, 2) at +g and -g.

    ``1 + m_i = sum (e+ - e-)_i / 2 g_i / sum (R g)_i g_i``, R each pair's mean response: the
    raw change of each pair against the change its own measured response predicts. Where shears
    are drawn independently of the galaxies this has the expectation of dividing by the mean
    response, ``<R>^-1 e``, without the error from the scatter of responses between galaxies
    (metacal's m error on 1000 pairs: about 1e-2 that way). ``c = <(e+ + e-)/2> <R>^-1``.
    Jackknife errors as :func:`paired_bias`.
    """
    response = (np.asarray(response_plus, float) + np.asarray(response_minus, float)) / 2
    arrays = (np.asarray(plus, float), np.asarray(minus, float), response, np.asarray(shear, float))
    return _jackknife_bias(_response_matched_estimates, arrays, n_blocks)


def shear_metrics(
    estimate: np.ndarray, truth: np.ndarray, estimate_minus: np.ndarray | None = None, prefix: str = "",
    shear: np.ndarray | None = None,
) -> dict[str, float]:
    """All shear metrics as a flat dict: rmse, rmse_g1, rmse_g2, linear m/c (+ errors),
    paired m/c when ``estimate_minus`` is given, and ``abs_m`` (the largest |m|, paired if
    available). RMSEs are against ``truth`` (the labels); m and c against the applied
    ``shear`` when given (with intrinsic shapes the labels are sheared ellipticities)."""
    rmse_g1, rmse_g2, rmse_all = rmse(estimate, truth)
    shear = truth if shear is None else shear
    out = {f"{prefix}rmse": rmse_all, f"{prefix}rmse_g1": rmse_g1, f"{prefix}rmse_g2": rmse_g2}
    linear = linear_bias(estimate, shear)
    out.update(linear.as_dict(prefix=f"{prefix}linear_"))
    headline = linear
    if estimate_minus is not None:
        headline = paired_bias(estimate, estimate_minus, shear)
        out.update(headline.as_dict(prefix=f"{prefix}paired_"))
    out.update(headline.as_dict(prefix=prefix))
    out[f"{prefix}abs_m"] = max(abs(headline.m[0]), abs(headline.m[1]))
    out[f"{prefix}abs_c"] = max(abs(headline.c[0]), abs(headline.c[1]))
    return out


NOISE_PREFIX = "noise_"


def noise_prefix(noise_sigma: float) -> str:
    """Prefix of the metrics measured on the test set at another noise level (``noise_0.001_rmse``)."""
    return f"{NOISE_PREFIX}{noise_sigma:g}_"


def _leakage(x: np.ndarray, half_sum: np.ndarray) -> float:
    """alpha of one component: the slope of the half-sums against a varying PSF ellipticity,
    or their mean over a fixed one."""
    if np.ptp(x) > 0:
        return float(np.polyfit(x, half_sum, 1)[0])
    return float(np.mean(half_sum) / x[0])


def psf_leakage(
    plus: np.ndarray, minus: np.ndarray, psf_g: np.ndarray, n_blocks: int = 100
) -> dict[str, float]:
    """PSF leakage alpha per component (c_i = alpha_i e_psf,i) from paired estimates: the
    half-sum (e+ + e-)/2 of each pair against its PSF's ellipticity ``psf_g`` (N, 2), a straight
    line where the PSF ellipticity varies, else their ratio; jackknife errors. Components whose
    PSF is round everywhere are left out."""
    plus, minus, psf_g = (np.asarray(a, float) for a in (plus, minus, psf_g))
    half_sum = (plus + minus) / 2
    count = len(psf_g)
    blocks = jackknife_blocks(count, n_blocks)
    out: dict[str, float] = {}
    for i in (0, 1):
        x, y = psf_g[:, i], half_sum[:, i]
        if not np.any(x):
            continue
        samples = []
        for block in blocks:
            keep = np.ones(count, bool)
            keep[block] = False
            samples.append(_leakage(x[keep], y[keep]))
        samples = np.array(samples)
        error = np.sqrt((len(blocks) - 1) / len(blocks) * np.sum((samples - samples.mean()) ** 2))
        out[f"alpha{i + 1}"], out[f"alpha{i + 1}_err"] = _leakage(x, y), float(error)
    return out


def worst_bias(populations: dict[str, dict[str, float]], prefix: str = "") -> dict[str, float]:
    """``worst_abs_m`` and ``worst_abs_c`` over populations (each a dict with m1, m1_err, ...):
    the largest |m| (|c|) of any component of any population, with that value's error."""
    out: dict[str, float] = {}
    for kind in ("m", "c"):
        found = [(abs(values[f"{prefix}{kind}{i}"]), values.get(f"{prefix}{kind}{i}_err", float("nan")))
                 for values in populations.values() for i in (1, 2)
                 if np.isfinite(values.get(f"{prefix}{kind}{i}", float("nan")))]
        if found:
            worst, error = max(found)
            out[f"{prefix}worst_abs_{kind}"], out[f"{prefix}worst_abs_{kind}_err"] = worst, float(error)
    return out
