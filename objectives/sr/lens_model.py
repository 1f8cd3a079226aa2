"""Lens-model recovery: how well the simulation's lens model, fitted to an image, recovers the
lens parameters the image was simulated with.

The fitted model is the simulation's own, without subhalos: an SIE (Einstein radius ``theta_E``,
ellipticity ``e1``, ``e2``, centre) with external shear (``gamma1``, ``gamma2``) lensing an
elliptical Sérsic source (half-light radius, index, ellipticity, centre): 13 non-linear
parameters, ray-shot by lenstronomy (``LensSimulator.sky``) on the HR grid. The source's
amplitude and a constant background are linear parameters, solved exactly at every step, because
each image is min-max normalised apart. Which grid and PSF:

- ``"hr"`` (the HR target, its bicubic and bilinear upsamplings, an SR network's output): the HR
  grid convolved with the HR image's Gaussian PSF (``hr_psf_fwhm``; none when 0), the PSF the
  study's degradation operator assumes the HR image has;
- ``"lr"`` (the LR input): that HR image passed through the degradation operator (the Gaussian
  the LR PSF has beyond the HR one, then ``scale x scale`` block sums), i.e. the LR grid with the
  LR PSF, the simulation's own map from sky to LR image.

The fit is a local one: scipy's ``least_squares`` (trust region, finite-difference Jacobian)
started from the TRUE parameters perturbed by fixed Gaussian offsets (:data:`START_SIGMAS`, drawn
per test image from a fixed seed, so that every image of one test index starts from the same
point). It measures how precisely an image pins the lens model down near the truth, not whether
a blind search would find it; an image that says nothing about the lens leaves the fit near its
start, with errors of about :data:`START_SIGMAS` (0.05" for theta_E). Pixels are weighted uniformly by the image's noise RMS: known for
the LR input (the dataset's ``test_lr_noise``), otherwise estimated from the image's border;
uniform weights leave the best fit unchanged, so the noise only scales the reported chi^2.

Scores over the fitted images (errors are fit minus truth): ``lens_theta_e_bias`` (mean error of
theta_E, arcsec), ``lens_theta_e_scatter`` (RMS error of theta_E, bias included, arcsec),
``lens_ellipticity_scatter`` (RMS of |(e1, e2) error|) and ``lens_shear_scatter`` (RMS of
|(gamma1, gamma2) error|).
"""

from __future__ import annotations

import time
from contextlib import AbstractContextManager, nullcontext
from typing import Any, NamedTuple

import numpy as np
from scipy import ndimage
from scipy.optimize import least_squares

from lensnas.objectives.sr.data import (
    LensSimulator,
    block_sum,
    operator_psf_fwhm_pixels,
    split_parameters,
    split_rng,
)
from lensnas.objectives.sr.metrics import gaussian_kernel

GRIDS = ("hr", "lr")
# The fitted parameters, in the order of a parameter vector (arcsec for radii and centres).
PARAMETERS = (
    "theta_E", "e1", "e2", "center_x", "center_y", "gamma1", "gamma2",
    "R_sersic", "n_sersic", "source_e1", "source_e2", "source_x", "source_y",
)
TRUTH_COLUMNS = (*PARAMETERS, "subhalos")  # a truth row adds the number of (unfitted) subhalos
# Lower and upper bounds of each parameter in the fit.
BOUNDS = {
    "theta_E": (0.02, 5.0), "e1": (-0.6, 0.6), "e2": (-0.6, 0.6),
    "center_x": (-1.0, 1.0), "center_y": (-1.0, 1.0), "gamma1": (-0.4, 0.4), "gamma2": (-0.4, 0.4),
    "R_sersic": (0.005, 5.0), "n_sersic": (0.3, 8.0), "source_e1": (-0.6, 0.6),
    "source_e2": (-0.6, 0.6), "source_x": (-3.0, 3.0), "source_y": (-3.0, 3.0),
}
# The start of a fit: the truth plus a Gaussian offset of these sigmas (arcsec or unitless).
START_SIGMAS = {
    "theta_E": 0.05, "e1": 0.03, "e2": 0.03, "center_x": 0.02, "center_y": 0.02,
    "gamma1": 0.02, "gamma2": 0.02, "R_sersic": 0.03, "n_sersic": 0.15, "source_e1": 0.05,
    "source_e2": 0.05, "source_x": 0.03, "source_y": 0.03,
}
START_SEED = 2121  # the starting offsets of test image i are drawn from [START_SEED, i]
MAX_EVALUATIONS = 1500  # least_squares' max_nfev per fit
TOLERANCE = 1e-8  # least_squares' ftol and xtol
BORDER_FRACTION = 0.1  # the border whose pixels estimate an image's noise: 10% of its side
LENS_METRICS = (
    "lens_theta_e_bias", "lens_theta_e_scatter", "lens_ellipticity_scatter", "lens_shear_scatter",
)
NO_TRUTHS = ("no lens-model recovery: a folder dataset's images come without the lens parameters "
             "they were made with (only simulated sources have them)")


def fit_settings() -> dict[str, Any]:
    """What a fit depends on besides its image: part of the cache key of fitted baselines."""
    return {"version": 1, "start_sigmas": START_SIGMAS, "start_seed": START_SEED,
            "bounds": BOUNDS, "max_evaluations": MAX_EVALUATIONS, "tolerance": TOLERANCE}


def truth_row(kwargs_lens: list[dict], kwargs_source: list[dict]) -> np.ndarray:
    """The :data:`TRUTH_COLUMNS` of one simulated pair's lenstronomy keywords."""
    sie, shear, source = kwargs_lens[0], kwargs_lens[1], kwargs_source[0]
    return np.array([
        sie["theta_E"], sie["e1"], sie["e2"], sie["center_x"], sie["center_y"],
        shear["gamma1"], shear["gamma2"], source["R_sersic"], source["n_sersic"],
        source["e1"], source["e2"], source["center_x"], source["center_y"],
        len(kwargs_lens) - 2,
    ], dtype=np.float64)


def keywords(parameters: np.ndarray) -> tuple[list[dict], list[dict]]:
    """lenstronomy's SIE + SHEAR and SERSIC_ELLIPSE keywords (amplitude 1) of a parameter vector."""
    p = dict(zip(PARAMETERS, (float(v) for v in parameters)))
    kwargs_lens = [
        {"theta_E": p["theta_E"], "e1": p["e1"], "e2": p["e2"], "center_x": p["center_x"],
         "center_y": p["center_y"]},
        {"gamma1": p["gamma1"], "gamma2": p["gamma2"], "ra_0": 0.0, "dec_0": 0.0},
    ]
    kwargs_source = [
        {"amp": 1.0, "R_sersic": p["R_sersic"], "n_sersic": p["n_sersic"], "e1": p["source_e1"],
         "e2": p["source_e2"], "center_x": p["source_x"], "center_y": p["source_y"]},
    ]
    return kwargs_lens, kwargs_source


def simulated_truths(config: dict[str, Any], n_test: int, data_seed: int, count: int) -> np.ndarray:
    """(count, len(TRUTH_COLUMNS)) truths of the first ``count`` test pairs of a simulated
    dataset, drawn again from the test split's seed (the dataset stores none)."""
    simulator = LensSimulator(config)
    drawn = split_parameters(simulator, n_test, split_rng(data_seed, "test"), count)
    return np.stack([truth_row(*pair) for pair in drawn])


def start_point(truth: np.ndarray, index: int) -> np.ndarray:
    """Test image ``index``'s starting point: its truth offset by fixed Gaussian draws, within
    :data:`BOUNDS`."""
    rng = np.random.default_rng([START_SEED, index])
    sigmas = np.array([START_SIGMAS[name] for name in PARAMETERS])
    low, high = _bounds()
    return np.clip(truth[: len(PARAMETERS)] + sigmas * rng.standard_normal(len(PARAMETERS)),
                   low + 1e-6, high - 1e-6)


def _bounds() -> tuple[np.ndarray, np.ndarray]:
    return (np.array([BOUNDS[name][0] for name in PARAMETERS]),
            np.array([BOUNDS[name][1] for name in PARAMETERS]))


def border_noise_rms(image: np.ndarray) -> float:
    """An image's noise RMS from its border (1.4826 x the median absolute deviation of the
    pixels within 10% of the side from the edge), floored at 1e-6."""
    image = np.asarray(image, dtype=np.float64)
    width = max(2, int(BORDER_FRACTION * min(image.shape)))
    mask = np.zeros(image.shape, dtype=bool)
    mask[:width], mask[-width:], mask[:, :width], mask[:, -width:] = True, True, True, True
    border = image[mask]
    return max(1.4826 * float(np.median(np.abs(border - np.median(border)))), 1e-6)


def _blur(image: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """The separable blur of ``metrics.gaussian_blur`` (zero padding) in numpy, for one image."""
    if len(kernel) == 1:
        return image
    blurred = ndimage.correlate1d(image, kernel, axis=0, mode="constant")
    return ndimage.correlate1d(blurred, kernel, axis=1, mode="constant")


def _one_blas_thread() -> AbstractContextManager[Any]:
    """BLAS on one thread while fitting (threadpoolctl, where installed): the fit's small
    products and SVDs run ~15x slower on a busy machine when BLAS threads spin."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return nullcontext()
    return threadpool_limits(limits=1, user_api="blas")


class FitResult(NamedTuple):
    """One fit: the fitted parameter vector, its reduced chi^2, evaluations and seconds taken."""

    parameters: np.ndarray
    chi2: float
    evaluations: int
    seconds: float


class LensFitter:
    """Fits the SIE + shear + Sérsic model to images of one grid (``"hr"`` or ``"lr"``) of a
    simulation ``config`` (``data.simulation_config``)."""

    def __init__(self, config: dict[str, Any], grid: str):
        if grid not in GRIDS:
            raise ValueError(f"unknown grid {grid!r}; allowed: {', '.join(GRIDS)}")
        self.grid = grid
        self.simulator = LensSimulator(config)
        hr_pixel_scale = self.simulator.hr_pixel_scale
        self.hr_kernel = gaussian_kernel(config["hr_psf_fwhm"] / hr_pixel_scale).numpy()
        self.lr_kernel = gaussian_kernel(operator_psf_fwhm_pixels(config)).numpy()
        self.shape = (self.simulator.hr_size,) * 2 if grid == "hr" else (self.simulator.lr_size,) * 2

    def model(self, parameters: np.ndarray) -> np.ndarray:
        """The noiseless image of a parameter vector on this grid (source amplitude 1)."""
        image = _blur(self.simulator.sky(*keywords(parameters)), self.hr_kernel)
        if self.grid == "lr":
            image = block_sum(_blur(image, self.lr_kernel), self.simulator.scale)
        return image

    def fit(self, image: np.ndarray, start: np.ndarray, noise_rms: float | None = None) -> FitResult:
        """Least-squares fit of ``image`` (this grid's shape) from ``start``; the noise RMS
        defaults to the border estimate."""
        data = np.asarray(image, dtype=np.float64).reshape(self.shape).ravel()
        sigma = border_noise_rms(data.reshape(self.shape)) if noise_rms is None else noise_rms
        data_centred = data - data.mean()

        def residuals(parameters: np.ndarray) -> np.ndarray:
            model = self.model(parameters).ravel()
            model = model - model.mean()
            gain = float(model @ data_centred) / max(float(model @ model), 1e-300)
            return (data_centred - gain * model) / sigma

        began = time.perf_counter()
        with np.errstate(all="ignore"), _one_blas_thread():
            result = least_squares(residuals, start, bounds=_bounds(), method="trf",
                                   ftol=TOLERANCE, xtol=TOLERANCE, max_nfev=MAX_EVALUATIONS)
        seconds = time.perf_counter() - began
        degrees = max(data.size - len(PARAMETERS) - 2, 1)
        chi2 = float(2 * result.cost / degrees)
        return FitResult(result.x, chi2, int(result.nfev), seconds)


def fit_images(
    fitter: LensFitter,
    images: np.ndarray,
    truths: np.ndarray,
    noise_rms: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Fit the first ``len(truths)`` of ``images`` (N, 1, H, W), each from its start point:
    (fitted parameters (K, 13), reduced chi^2 (K,), seconds (K,))."""
    fitted, chi2, seconds = [], [], []
    for index, truth in enumerate(truths):
        noise = None if noise_rms is None else float(noise_rms[index])
        result = fitter.fit(np.asarray(images[index]), start_point(truth, index), noise)
        fitted.append(result.parameters)
        chi2.append(result.chi2)
        seconds.append(result.seconds)
    return np.stack(fitted), np.array(chi2), np.array(seconds)


def recovery_metrics(fitted: np.ndarray, truths: np.ndarray) -> dict[str, float]:
    """:data:`LENS_METRICS` of fitted parameter vectors against their truths."""
    error = fitted[:, : len(PARAMETERS)] - truths[:, : len(PARAMETERS)]
    column = {name: error[:, i] for i, name in enumerate(PARAMETERS)}
    return {
        "lens_theta_e_bias": float(np.mean(column["theta_E"])),
        "lens_theta_e_scatter": float(np.sqrt(np.mean(column["theta_E"] ** 2))),
        "lens_ellipticity_scatter": float(np.sqrt(np.mean(column["e1"] ** 2 + column["e2"] ** 2))),
        "lens_shear_scatter": float(np.sqrt(np.mean(column["gamma1"] ** 2 + column["gamma2"] ** 2))),
    }
