"""Response calibration of any shear estimator (a network) by metacalibration's image operations.

A network trained on one galaxy population is biased on another (m of 10-28% for another PSF or
profile). Metacalibration (Sheldon & Huff 2017) measures an estimator's response to shear on the
galaxies themselves; Ribli et al. (2019) put a CNN inside it. For each stamp,
:func:`metacal_images` makes metacal's five images with the project's own built-in operations
(:class:`lensnas.objectives.shear.metacal.MetacalKernel`: deconvolve by the PSF, shear by
``±step`` along g1 and g2, reconvolve by the slightly dilated target PSF), and the target PSF
drawn on the stamp grid (``psf_target``): the PSF of those images, the second input channel of
a network that takes the PSF. :func:`network_response` applies the estimator to them:
``e = estimate(noshear)`` and ``R_ij = (e_i(+step_j) - e_i(-step_j)) / 2 step`` per object;
:func:`calibrated` gives ``<R>^-1 e`` (the mean response of the set, as surveys calibrate) and
``R_i^-1 e_i`` (each object's own response).

The images are computed once per test set and reused by every trial with
:func:`cached_metacal_images`. Example::

    images = cached_metacal_images(lambda: (stamps, psf_image, 1e-5), 0.2,
                                   cache_dir=".lensnas-cache", dataset_key=key)
    e, R = network_response(estimate, images, step=0.01)
    result = calibrated(e, R)  # result["g"], result["response"], result["g_object"]
"""

from __future__ import annotations

import logging
import math
import multiprocessing
import os
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Any

import galsim
import numpy as np

from lensnas.objectives.cache import cache_root, cached_arrays
from lensnas.objectives.shear import metacal

logger = logging.getLogger("lensnas.calibration")

KEYS = tuple(metacal.SHEARS)  # noshear, 1p, 1m, 2p, 2m
PAIRS = (("1p", "1m"), ("2p", "2m"))  # the images sheared by +step and -step along g1, g2
CACHE_VERSION = 2  # 2: images made from wider stamps, cropped

Estimate = Callable[[np.ndarray, np.ndarray | None], np.ndarray]
"""``estimate(images (N, H, W), psf_images (H, W) or (N, H, W) or None) -> (N, 2)``."""


def target_psf_image(kernel: metacal.MetacalKernel, shape: tuple[int, int]) -> np.ndarray:
    """The reconvolution (target) PSF of ``kernel`` on a stamp grid of ``shape``, unit sum.

    Every target already holds the pixel response where the metacal images have it (the
    reconvolution is sampled at pixel centres, no further pixel), so it is drawn ``no_pixel``.
    """
    height, width = shape
    drawn = kernel.target.drawImage(
        nx=width, ny=height, scale=kernel.pixel_scale, method="no_pixel"
    ).array
    return (drawn / drawn.sum()).astype(np.float32)


def metacal_chunk(
    images: np.ndarray,
    psf_images: np.ndarray,
    pixel_scale: float,
    noise_sigmas: np.ndarray,
    first_index: int,
    *,
    step: float = 0.01,
    psf: str = "dilate",
    fix_noise: bool | None = None,
    interpolant: str = "lanczos15",
    seed: int = 0,
    crop: int | None = None,
) -> dict[str, np.ndarray]:
    """Metacal images of a chunk of stamps, seeded as :func:`metacal.measure_chunk` seeds them.

    ``noise_sigmas`` (N,) are the stamps' noise levels; the correcting noise of object ``i``
    comes from ``SeedSequence([seed, first_index + i])``. A stamp GalSim cannot process gets
    NaN images and ``ok`` False. ``crop``: keep the central ``crop`` x ``crop`` pixels.
    """
    count, full_size, _ = images.shape
    size = crop or full_size
    low = (full_size - size) // 2
    out = {key: np.full((count, size, size), np.nan, dtype=np.float32) for key in KEYS}
    shared = psf_images.ndim == 2
    targets = np.empty((size, size) if shared else (count, size, size), dtype=np.float32)
    ok = np.zeros(count, dtype=bool)
    kernels: dict[bytes, tuple[metacal.MetacalKernel, np.ndarray]] = {}
    for i in range(count):
        psf_image = psf_images if shared else psf_images[i]
        key = np.ascontiguousarray(psf_image).tobytes()
        if key not in kernels:
            kernels.clear()
            kernel = metacal.MetacalKernel(psf_image, pixel_scale, full_size, step, psf, interpolant)
            kernels[key] = kernel, target_psf_image(kernel, (size, size))
        kernel, target = kernels[key]
        if shared:
            targets[...] = target
        else:
            targets[i] = target
        noise = metacal.correcting_noise(float(noise_sigmas[i]), fix_noise, seed, first_index + i,
                                         images.shape[1:])
        try:
            versions = kernel.images(images[i], noise)
        except galsim.GalSimError:
            continue
        for name, image in versions.items():
            out[name][i] = image[low:low + size, low:low + size]
        ok[i] = True
    return {**out, "psf_target": targets, "ok": ok}


def _chunk_worker(
    images: np.ndarray, psf_images: np.ndarray, pixel_scale: float, noise_sigmas: np.ndarray,
    first_index: int, settings: dict[str, Any],
) -> tuple[int, dict[str, np.ndarray]]:
    """Process-pool task: one chunk's metacal images, with the index of its first object."""
    return first_index, metacal_chunk(
        images, psf_images, pixel_scale, noise_sigmas, first_index, **settings
    )


def _settings(step: float, psf: str, fix_noise: bool | None, seed: int,
              interpolant: str) -> dict[str, Any]:
    """The metacal settings, checked as the reference estimator checks them."""
    from lensnas.objectives.shear.reference import estimator_settings

    return estimator_settings("metacal", {"step": step, "psf": psf, "fix_noise": fix_noise,
                                          "seed": seed, "interpolant": interpolant})


def _check(
    images: np.ndarray, psf_images: np.ndarray, pixel_scale: float, noise_sigma: Any,
    crop: int | None = None,
) -> np.ndarray:
    """Refuse inputs metacal cannot take; the per-object noise sigmas (N,)."""
    if images.ndim != 3:
        raise ValueError(f"images must be (N, H, W), got shape {images.shape}")
    if images.shape[1] != images.shape[2]:
        raise ValueError(f"metacal needs square stamps, got {images.shape[1]}x{images.shape[2]}")
    if psf_images.ndim not in (2, 3) or psf_images.shape[-2:] != images.shape[1:]:
        raise ValueError(f"psf_images must be (H, W) or (N, H, W) on the stamps' grid "
                         f"{images.shape[1:]}, got shape {psf_images.shape}")
    if psf_images.ndim == 3 and len(psf_images) != len(images):
        raise ValueError(f"psf_images holds {len(psf_images)} PSFs for {len(images)} images")
    if crop is not None and not (0 < crop <= images.shape[1] and (images.shape[1] - crop) % 2 == 0):
        raise ValueError(f"crop must be at most the stamps' {images.shape[1]} pixels and differ "
                         f"from it by an even number, got {crop}")
    if not pixel_scale > 0:
        raise ValueError(f"pixel_scale must be positive, got {pixel_scale}")
    sigmas = np.broadcast_to(np.asarray(noise_sigma, dtype=np.float64), (len(images),))
    if not np.all(sigmas >= 0):
        raise ValueError("noise_sigma must be >= 0")
    return sigmas


def metacal_images(
    images: np.ndarray,
    psf_images: np.ndarray,
    pixel_scale: float,
    noise_sigma: float | np.ndarray,
    *,
    step: float = 0.01,
    psf: str = "dilate",
    fix_noise: bool | None = None,
    seed: int = 0,
    interpolant: str = "lanczos15",
    workers: int | None = None,
    progress: bool = False,
    crop: int | None = None,
) -> dict[str, np.ndarray]:
    """Metacal's images of every stamp: "noshear", "1p", "1m", "2p", "2m" (N, H, W) float32,
    "psf_target" ((H, W), or (N, H, W) for per-object PSFs; unit sum) and "ok" (N,).

    ``psf_images``: the PSF on the stamp grid, pixel included, one (H, W) or one per stamp;
    ``noise_sigma``: the stamps' pixel noise, one number or one per stamp (the noise
    correction, ``fix_noise``, as in :func:`metacal.measure_chunk`). ``crop``: return the
    central ``crop`` x ``crop`` pixels of each image (and the target PSF on that grid).
    Shearing a stamp shears its square edge too: flux the real sheared galaxy has there came
    from outside the stamp. For a network that reads the whole stamp (a Sérsic n = 2-4 galaxy
    of 0.3-0.8" in a 53-pixel stamp: R11 wrong by 2-5%) make the images from a larger stamp and
    crop them to the network's size (79 pixels around 53: within 2e-4 of the directly rendered
    response). Computed in chunks on ``workers`` processes (default: every core this process
    may use); the result does not depend on the chunks or the worker count.
    """
    from lensnas.objectives.shear.reference import cpu_count

    images, psf_images = np.asarray(images), np.asarray(psf_images)
    sigmas = _check(images, psf_images, pixel_scale, noise_sigma, crop)
    settings = {**_settings(step, psf, fix_noise, seed, interpolant), "crop": crop}
    count = len(images)
    if count == 0:
        raise ValueError("no images")
    workers = workers or cpu_count()
    chunk = int(min(256, max(4, math.ceil(count / (workers * 8)))))
    starts = list(range(0, count, chunk))
    workers = max(1, min(workers, len(starts)))

    def inputs(start: int) -> tuple[np.ndarray, np.ndarray, float, np.ndarray, int]:
        stop = min(start + chunk, count)
        psf_chunk = psf_images if psf_images.ndim == 2 else np.asarray(psf_images[start:stop])
        return (np.asarray(images[start:stop]), psf_chunk, float(pixel_scale),
                np.array(sigmas[start:stop]), start)

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    bar = Progress(TextColumn("metacal images"), BarColumn(), MofNCompleteColumn(),
                   disable=not progress, transient=True)
    pieces: dict[int, dict[str, np.ndarray]] = {}
    with bar:
        task = bar.add_task("metacal", total=count)
        if workers == 1:
            for start in starts:
                _, pieces[start] = _chunk_worker(*inputs(start), settings)
                bar.advance(task, len(pieces[start]["ok"]))
        else:
            with ProcessPoolExecutor(max_workers=workers,
                                     mp_context=multiprocessing.get_context()) as pool:
                futures = [pool.submit(_chunk_worker, *inputs(start), settings)
                           for start in starts]
                for future in as_completed(futures):
                    start, arrays = future.result()
                    pieces[start] = arrays
                    bar.advance(task, len(arrays["ok"]))
    ordered = [pieces[start] for start in starts]
    out = {key: np.concatenate([piece[key] for piece in ordered]) for key in (*KEYS, "ok")}
    out["psf_target"] = (ordered[0]["psf_target"] if psf_images.ndim == 2
                         else np.concatenate([piece["psf_target"] for piece in ordered]))
    failed = count - int(np.count_nonzero(out["ok"]))
    if failed:
        logger.warning("metacal images: %d of %d stamps failed (NaN images, ok False)",
                       failed, count)
    return out


Stamps = Callable[[], tuple[np.ndarray, np.ndarray, "float | np.ndarray"]]
"""``() -> (images (N, S, S), psf_images (S, S) or (N, S, S), noise sigma (one or (N,)))``."""


def cached_metacal_images(
    stamps: Stamps,
    pixel_scale: float,
    *,
    cache_dir: str | os.PathLike | None,
    dataset_key: str,
    crop: int | None = None,
    step: float = 0.01,
    psf: str = "dilate",
    fix_noise: bool | None = None,
    seed: int = 0,
    interpolant: str = "lanczos15",
    workers: int | None = None,
    progress: bool = False,
) -> dict[str, np.ndarray]:
    """:func:`metacal_images` of the stamps ``stamps()`` returns, cropped to ``crop``, computed
    once: stored under ``cache_dir`` (memory-mapped, read-only on loading), keyed by
    ``dataset_key`` (which must identify the stamps, their PSFs and noise: ``stamps`` is called
    only when the cache has no entry), the settings, the pixel scale and the crop."""
    settings = _settings(step, psf, fix_noise, seed, interpolant)
    config = {
        "dataset_key": dataset_key,
        "settings": settings,
        "pixel_scale": float(pixel_scale),
        "crop": crop,
        "version": CACHE_VERSION,
    }

    def build() -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        images, psf_images, noise_sigma = stamps()
        return metacal_images(images, psf_images, pixel_scale, noise_sigma, workers=workers,
                              progress=progress, crop=crop, **settings), {}

    arrays, _, hit = cached_arrays(Path(cache_root(cache_dir)), "metacal-images", config, build)
    logger.info("metacal images cache %s: %d stamps, dataset %s, %s",
                "hit" if hit else "miss", len(arrays["ok"]), dataset_key, settings)
    return arrays


def network_response(
    estimate: Estimate, metacal_set: dict[str, np.ndarray], step: float
) -> tuple[np.ndarray, np.ndarray]:
    """The estimator's ``e`` on the noshear images (N, 2) and its response ``R`` (N, 2, 2),
    ``R[:, i, j] = (e_i(+step_j) - e_i(-step_j)) / 2 step``.

    ``estimate(images, psf)`` gets each image set with ``metacal_set["psf_target"]`` (or None
    where the set has none): the PSF of those images, a network's PSF channel.
    """
    if not 0 < step < 0.1:
        raise ValueError(f"step must be in (0, 0.1), got {step}")
    psf = metacal_set.get("psf_target")
    count = len(metacal_set["noshear"])

    def run(key: str) -> np.ndarray:
        values = np.asarray(estimate(np.asarray(metacal_set[key]),
                                     None if psf is None else np.asarray(psf)), dtype=np.float64)
        if values.shape != (count, 2):
            raise ValueError(f"estimate returned shape {values.shape} for {key!r}; "
                             f"expected ({count}, 2)")
        return values

    e = run("noshear")
    response = np.empty((count, 2, 2))
    for j, (plus, minus) in enumerate(PAIRS):
        response[:, :, j] = (run(plus) - run(minus)) / (2 * step)
    return e, response


def calibrated(
    e: np.ndarray, response: np.ndarray, ok: np.ndarray | None = None
) -> dict[str, np.ndarray]:
    """Calibrated shears: "g" = <R>^-1 e (N, 2) by the mean "response" (2, 2) over the ``ok``
    objects (default: finite e and R), "g_object" = R_i^-1 e_i (N, 2), and "ok" (N,)."""
    e, response = np.asarray(e, dtype=np.float64), np.asarray(response, dtype=np.float64)
    finite = np.all(np.isfinite(e), axis=1) & np.all(np.isfinite(response), axis=(1, 2))
    ok = finite if ok is None else np.asarray(ok, dtype=bool) & finite
    g, mean_response = metacal.calibrate(e, response, ok)
    g_object = np.full_like(e, np.nan)
    solvable = ok & (np.abs(np.linalg.det(np.where(ok[:, None, None], response, 1.0))) > 0)
    if np.any(solvable):
        g_object[solvable] = np.linalg.solve(response[solvable], e[solvable][..., None])[..., 0]
    return {"g": g, "response": mean_response, "g_object": g_object, "ok": ok}
