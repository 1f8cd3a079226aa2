"""GalSim HSM PSF-corrected shape estimates (REGAUSS, KSB) as per-object reduced shears."""

from __future__ import annotations

import galsim
import numpy as np

HSM_DEFAULTS: dict[str, object] = {"method": "REGAUSS"}
HSM_METHODS = ("REGAUSS", "KSB")


def distortion_to_shear(e1: float, e2: float) -> tuple[float, float]:
    """Reduced shear g of distortion e: |g| = |e| / (1 + sqrt(1 - |e|^2)); NaNs if |e| >= 1."""
    e_squared = e1 * e1 + e2 * e2
    if not e_squared < 1:
        return np.nan, np.nan
    factor = 1.0 / (1.0 + np.sqrt(1.0 - e_squared))
    return e1 * factor, e2 * factor


def measure_chunk(
    images: np.ndarray,
    psf_images: np.ndarray,
    pixel_scale: float,
    noise_sigma: float,
    first_index: int,
    *,
    method: str = "REGAUSS",
) -> dict[str, np.ndarray]:
    """Per-object ``g`` (N, 2) and ``ok`` (N,) from ``galsim.hsm.EstimateShear``.

    REGAUSS measures a distortion, converted to reduced shear; KSB gives a shear directly.
    ``first_index`` is unused (HSM is deterministic) and kept for a uniform interface.
    """
    if method not in HSM_METHODS:
        raise ValueError(f"hsm method must be one of {', '.join(HSM_METHODS)}, got {method!r}")
    count = len(images)
    g = np.full((count, 2), np.nan)
    psf = None
    for i in range(count):
        if psf is None or psf_images.ndim == 3:
            psf_array = psf_images if psf_images.ndim == 2 else psf_images[i]
            psf = galsim.Image(np.asarray(psf_array, dtype=np.float64), scale=pixel_scale)
        image = galsim.Image(np.asarray(images[i], dtype=np.float64), scale=pixel_scale)
        result = galsim.hsm.EstimateShear(
            image, psf, sky_var=float(noise_sigma) ** 2, shear_est=method, strict=False
        )
        if result.error_message or result.correction_status != 0:
            continue
        if method == "KSB":
            g[i] = result.corrected_g1, result.corrected_g2
        else:
            g[i] = distortion_to_shear(result.corrected_e1, result.corrected_e2)
    return {"g": g, "ok": np.all(np.isfinite(g), axis=1)}
