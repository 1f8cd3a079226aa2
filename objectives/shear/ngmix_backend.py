"""NGMix metacalibration (``ngmix.metacal.MetacalBootstrapper``), used when ngmix is installed.

NGMix is not on PyPI; :data:`INSTALL_HINT` says how to get it. The per-object outputs
(``e``, ``R``, ``ok``) are the same as the built-in metacal's, and are calibrated the same
way (:func:`lensnas.objectives.shear.metacal.calibrate`).
"""

from __future__ import annotations

import importlib.util

import numpy as np

from lensnas.objectives.shear.metacal import resolve_fix_noise

NGMIX_DEFAULTS: dict[str, object] = {
    "fitter": "admom",
    "psf": "gauss",
    "step": 0.01,
    "fix_noise": None,
    "seed": 0,
}
NGMIX_FITTERS = ("admom", "gauss")
INSTALL_HINT = (
    "ngmix is not installed (it is not on PyPI): "
    "`conda install -c conda-forge ngmix` or `pip install git+https://github.com/esheldon/ngmix`"
)
METACAL_TYPES = ["noshear", "1p", "1m", "2p", "2m"]


def available() -> bool:
    """Whether ``import ngmix`` would succeed."""
    return importlib.util.find_spec("ngmix") is not None


def _runners(ngmix, fitter: str, rng: np.random.RandomState, T_guess: float):
    psf_fitter = ngmix.admom.AdmomFitter(rng=rng)
    psf_guesser = ngmix.guessers.GMixPSFGuesser(rng=rng, ngauss=1, guess_from_moms=True)
    psf_runner = ngmix.runners.PSFRunner(fitter=psf_fitter, guesser=psf_guesser, ntry=4)
    if fitter == "admom":
        runner = ngmix.runners.Runner(
            fitter=ngmix.admom.AdmomFitter(rng=rng),
            guesser=ngmix.guessers.GMixPSFGuesser(rng=rng, ngauss=1, guess_from_moms=True),
            ntry=2,
        )
    else:
        runner = ngmix.runners.Runner(
            fitter=ngmix.fitting.Fitter(model="gauss"),
            guesser=ngmix.guessers.TPSFFluxGuesser(rng=rng, T=T_guess),
            ntry=2,
        )
    return runner, psf_runner


def measure_chunk(
    images: np.ndarray,
    psf_images: np.ndarray,
    pixel_scale: float,
    noise_sigma: float,
    first_index: int,
    *,
    fitter: str = "admom",
    psf: str = "gauss",
    step: float = 0.01,
    fix_noise: bool | None = None,
    seed: int = 0,
) -> dict[str, np.ndarray]:
    """Per-object ``e`` (N, 2), ``R`` (N, 2, 2) and ``ok`` (N,) from NGMix metacal."""
    try:
        import ngmix
        from ngmix.gexceptions import BootGalFailure, BootPSFFailure, GMixFatalError, GMixRangeError
    except ImportError:
        raise ImportError(INSTALL_HINT) from None
    failures = (BootPSFFailure, BootGalFailure, GMixRangeError, GMixFatalError)
    if fitter not in NGMIX_FITTERS:
        raise ValueError(f"ngmix fitter must be one of {', '.join(NGMIX_FITTERS)}, got {fitter!r}")
    shape_key = "e" if fitter == "admom" else "g"
    use_noise = resolve_fix_noise(fix_noise, noise_sigma) and noise_sigma > 0
    count = len(images)
    e = np.full((count, 2), np.nan)
    response = np.full((count, 2, 2), np.nan)
    weight_value = 1.0 / max(float(noise_sigma), 1e-12) ** 2
    for i in range(count):
        rng = np.random.RandomState(
            np.random.SeedSequence([seed, first_index + i]).generate_state(1)[0]
        )
        image = np.asarray(images[i], dtype=np.float64)
        psf_image = np.asarray(
            psf_images if psf_images.ndim == 2 else psf_images[i], dtype=np.float64
        )
        psf_noise = psf_image.max() / 1e5
        centre = (np.array(image.shape) - 1.0) / 2.0
        psf_centre = (np.array(psf_image.shape) - 1.0) / 2.0
        psf_obs = ngmix.Observation(
            psf_image,
            weight=np.full(psf_image.shape, 1.0 / psf_noise**2),
            jacobian=ngmix.DiagonalJacobian(
                row=psf_centre[0], col=psf_centre[1], scale=pixel_scale
            ),
        )
        obs = ngmix.Observation(
            image,
            weight=np.full(image.shape, weight_value),
            jacobian=ngmix.DiagonalJacobian(row=centre[0], col=centre[1], scale=pixel_scale),
            psf=psf_obs,
        )
        runner, psf_runner = _runners(ngmix, fitter, rng, T_guess=4 * pixel_scale**2)
        boot = ngmix.metacal.MetacalBootstrapper(
            runner=runner,
            psf_runner=psf_runner,
            rng=rng,
            psf=psf,
            step=step,
            fixnoise=use_noise,
            types=METACAL_TYPES,
        )
        try:
            outcome = boot.go(obs)
        except failures:
            continue
        # ngmix 2.x returns (results, observations); some versions keep them on the bootstrapper
        results = outcome[0] if isinstance(outcome, tuple) else boot.result
        if any(results[key]["flags"] != 0 for key in METACAL_TYPES):
            continue
        e[i] = results["noshear"][shape_key]
        for j, (plus, minus) in enumerate((("1p", "1m"), ("2p", "2m"))):
            difference = np.asarray(results[plus][shape_key]) - np.asarray(
                results[minus][shape_key]
            )
            response[i, :, j] = difference / (2 * step)
    ok = np.all(np.isfinite(e), axis=1) & np.all(np.isfinite(response), axis=(1, 2))
    return {"e": e, "R": response, "ok": ok}
