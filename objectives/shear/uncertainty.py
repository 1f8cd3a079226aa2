"""Per-galaxy errors of the reference shear estimator, to calibrate network uncertainties against.

Neither the built-in metacal nor HSM returns an error per galaxy (adaptive moments come without
one, and the metacal response is itself measured on the noisy image). The error is derived here
by noise resampling: each test galaxy is measured again ``RESAMPLES`` times with fresh Gaussian
pixel noise of the study's sigma added to its stamp, and its 1-sigma error is the standard
deviation of those estimates. To first order in the noise this is the spread the galaxy's
estimate has under pixel noise (the derivative of the estimator at the observed stamp times the
noise); it leaves out what noise does not cause (the estimator's model bias, its response
error at zero noise), which is why the calibration on the test set shows how complete it is.
Metacal estimates are each galaxy by its own response (the per-galaxy comparison); HSM's are
its shears. The result is cached with the dataset (about ``RESAMPLES`` times the reference's
own cost, once).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from lensnas.objectives.base import ReferenceErrors
from lensnas.objectives.cache import cached_arrays
from lensnas.objectives.shear.reference import ReferenceResult, cached_measure, measure

RESAMPLES = 8
CACHE_VERSION = 1


def per_galaxy_estimates(result: ReferenceResult) -> np.ndarray:
    """(N, 2) estimates of one galaxy each: metacal by its own response, else the shears."""
    per_object = result.g_per_object_response
    estimates = result.g if per_object is None else per_object
    return np.where(result.ok[:, None], estimates, np.nan)


def resampled_sigmas(
    name: str, images: np.ndarray, psf_image: np.ndarray, pixel_scale: float, noise_sigma: float,
    seed: int, resamples: int = RESAMPLES, progress: bool = False,
) -> np.ndarray:
    """(N, 2) standard deviation of ``resamples`` re-measurements of each stamp with fresh pixel
    noise of ``noise_sigma`` added (seeded); NaN where a re-measurement failed."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, len(images), resamples]))
    noisy = np.concatenate([
        images + rng.normal(0.0, noise_sigma, images.shape).astype(images.dtype)
        for _ in range(resamples)
    ])
    result = measure(name, noisy, psf_image, pixel_scale, noise_sigma, progress=progress)
    estimates = per_galaxy_estimates(result).reshape(resamples, len(images), 2)
    return np.std(estimates, axis=0, ddof=1)  # NaN wherever one of them is NaN


def reference_errors(objective: Any) -> ReferenceErrors:
    """The shear objective's reference estimates of its test galaxies (cached with the study)
    and their per-galaxy errors by noise resampling (cached on first use)."""
    name = objective.options["reference"]
    description = (
        f"{name} {'each galaxy by its own response' if name != 'hsm' else 'shears'}; "
        f"1 sigma = the spread of {RESAMPLES} re-measurements of each test galaxy with fresh "
        "pixel noise of the study's sigma added (its error from pixel noise, to first order; "
        "not the estimator's own bias)"
    )
    if name == "none":
        return ReferenceErrors("reference", "", unavailable="the study has no reference "
                               "estimator (objective.reference = \"none\")")
    sigma = objective.simulation.noise_sigma
    if sigma == 0:
        return ReferenceErrors(name, description, unavailable="the study has no pixel noise "
                               "(noise_sigma = 0), so resampling it gives no error")
    images, psf = objective.data["test.images"], objective.data["psf_image"]
    pixel_scale = objective.simulation.pixel_scale
    result = cached_measure(
        name, images, psf, pixel_scale, sigma, cache_dir=objective.cache_dir,
        dataset_key=f"{objective.dataset_key}-test.images", progress=objective.progress,
    )
    config = {"dataset": objective.dataset_key, "estimator": name, "resamples": RESAMPLES,
              "seed": objective.seed, "version": CACHE_VERSION}
    arrays, _, _ = cached_arrays(objective.cache_dir, "reference-errors", config, lambda: (
        {"sigmas": resampled_sigmas(name, np.asarray(images), psf, pixel_scale, sigma,
                                    objective.seed, progress=objective.progress)}, {}))
    return ReferenceErrors(name, description, per_galaxy_estimates(result),
                           np.asarray(arrays["sigmas"]))
