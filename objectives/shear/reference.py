"""Reference shear estimators behind one interface, computed once and cached on disk.

Stamps ``images`` (N, ny, nx), a PSF image (ny, nx) or one per object, the pixel scale and
the pixel-noise level go in; per-object reduced-shear estimates ``g1``, ``g2`` and an ``ok``
flag come out (:class:`ReferenceResult`). Estimators:

``"metacal"``
    Built-in metacalibration over GalSim adaptive moments (:mod:`lensnas.objectives.shear.metacal`);
    settings ``step`` (0.01), ``psf`` ("dilate" | "fitgauss" | "gauss"), ``fix_noise``
    (None = on above very low noise), ``interpolant``, ``seed``.
``"hsm"``
    GalSim HSM PSF correction (:mod:`lensnas.objectives.shear.hsm`); setting ``method`` ("REGAUSS" | "KSB").
``"ngmix"``
    NGMix metacalibration (:mod:`lensnas.objectives.shear.ngmix_backend`) when ngmix is installed;
    settings ``fitter`` ("admom" | "gauss"), ``psf``, ``step``, ``fix_noise``, ``seed``.

Both metacal variants calibrate by the mean response of the objects given (over ``ok``
objects): ``g = <R>^-1 e``. Work is spread over all CPU cores in chunks (a process pool);
the per-object results come back and the mean response is taken over all of them.

Example::

    result = cached_measure("metacal", images, psf_image, 0.2, 1e-5,
                            cache_dir=".lensnas-cache", dataset_key=key)
    result.g1, result.g2, result.ok, result.n_failed, result.galaxies_per_core_second
"""

from __future__ import annotations

import logging
import math
import multiprocessing
import os
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lensnas.objectives.cache import cache_root, cached_arrays
from lensnas.objectives.shear import hsm, metacal, ngmix_backend

logger = logging.getLogger("lensnas.reference")

ESTIMATORS = ("metacal", "hsm", "ngmix")
DEFAULTS: dict[str, dict[str, Any]] = {
    "metacal": metacal.METACAL_DEFAULTS,
    "hsm": hsm.HSM_DEFAULTS,
    "ngmix": ngmix_backend.NGMIX_DEFAULTS,
}
CHOICES: dict[str, dict[str, tuple[str, ...]]] = {
    "metacal": {"psf": metacal.TARGET_PSFS},
    "hsm": {"method": hsm.HSM_METHODS},
    "ngmix": {"fitter": ngmix_backend.NGMIX_FITTERS, "psf": ("gauss", "fitgauss", "dilate")},
}
_CHUNK_FUNCTIONS: dict[str, Callable[..., dict[str, np.ndarray]]] = {
    "metacal": metacal.measure_chunk,
    "hsm": hsm.measure_chunk,
    "ngmix": ngmix_backend.measure_chunk,
}
CACHE_VERSION = 1


@dataclass(frozen=True)
class ReferenceResult:
    """Per-object shear estimates of one reference estimator on one set of stamps."""

    name: str
    settings: dict[str, Any]
    g1: np.ndarray
    g2: np.ndarray
    ok: np.ndarray
    seconds: float
    core_seconds: float
    workers: int
    response: np.ndarray | None = None
    e: np.ndarray | None = None
    R: np.ndarray | None = None
    cache_hit: bool = False

    @property
    def n(self) -> int:
        """Number of objects measured."""
        return len(self.ok)

    @property
    def n_failed(self) -> int:
        """Objects without a valid estimate (their g1, g2 are NaN)."""
        return int(self.n - np.count_nonzero(self.ok))

    @property
    def g(self) -> np.ndarray:
        """Estimates as one (N, 2) array."""
        return np.stack([self.g1, self.g2], axis=1)

    @property
    def g_per_object_response(self) -> np.ndarray | None:
        """Metacal estimates calibrated by each object's own response, ``R_i^-1 e_i`` (N, 2);
        None for estimators without a response. Per-galaxy errors of the mean-response
        estimates include the spread of R across sizes; these do not."""
        if self.e is None or self.R is None:
            return None
        g = np.full_like(self.e, np.nan)
        g[self.ok] = np.linalg.solve(self.R[self.ok], self.e[self.ok][..., None])[..., 0]
        return g

    @property
    def galaxies_per_core_second(self) -> float:
        """Throughput per CPU core: objects over the CPU seconds the measurement used."""
        return self.n / self.core_seconds if self.core_seconds > 0 else float("nan")


def is_available(name: str) -> bool:
    """Whether estimator ``name`` can run here (ngmix needs the optional ngmix package)."""
    return name != "ngmix" or ngmix_backend.available()


def estimator_settings(name: str, settings: dict[str, Any] | None = None) -> dict[str, Any]:
    """The estimator's defaults overlaid with ``settings``, checked; raises ValueError if bad."""
    if name not in ESTIMATORS:
        raise ValueError(f"unknown reference estimator {name!r}; allowed: {', '.join(ESTIMATORS)}")
    defaults = DEFAULTS[name]
    merged = dict(defaults)
    for key, value in (settings or {}).items():
        if key not in defaults:
            raise ValueError(
                f"unknown setting {key!r} for reference estimator {name!r}; "
                f"allowed: {', '.join(sorted(defaults))}"
            )
        merged[key] = value
    for key, allowed in CHOICES[name].items():
        if merged[key] not in allowed:
            raise ValueError(
                f"{name}.{key} must be one of {', '.join(allowed)}, got {merged[key]!r}"
            )
    if "step" in merged:
        merged["step"] = float(merged["step"])
        if not 0 < merged["step"] < 0.1:
            raise ValueError(f"{name}.step must be in (0, 0.1), got {merged['step']}")
    if "fix_noise" in merged and merged["fix_noise"] not in (None, True, False):
        raise ValueError(
            f"{name}.fix_noise must be true, false or None, got {merged['fix_noise']!r}"
        )
    if "seed" in merged and not isinstance(merged["seed"], int):
        raise ValueError(f"{name}.seed must be an integer, got {merged['seed']!r}")
    return merged


def _check_inputs(
    images: np.ndarray, psf_images: np.ndarray, pixel_scale: float, noise_sigma: float
) -> None:
    if images.ndim != 3:
        raise ValueError(f"images must be (N, ny, nx), got shape {images.shape}")
    if psf_images.ndim == 3 and len(psf_images) != len(images):
        raise ValueError(f"psf_images holds {len(psf_images)} PSFs for {len(images)} images")
    if psf_images.ndim not in (2, 3):
        raise ValueError(
            f"psf_images must be (ny, nx) or (N, ny, nx), got shape {psf_images.shape}"
        )
    if not pixel_scale > 0:
        raise ValueError(f"pixel_scale must be positive, got {pixel_scale}")
    if not noise_sigma >= 0:
        raise ValueError(f"noise_sigma must be >= 0, got {noise_sigma}")


def cpu_count() -> int:
    """CPU cores this process may use."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def _measure_chunk(
    name: str,
    images: np.ndarray,
    psf_images: np.ndarray,
    pixel_scale: float,
    noise_sigma: float,
    first_index: int,
    settings: dict[str, Any],
) -> tuple[int, dict[str, np.ndarray], float]:
    """Worker: one chunk's per-object arrays and the CPU seconds it took."""
    start = time.process_time()
    arrays = _CHUNK_FUNCTIONS[name](
        images, psf_images, pixel_scale, noise_sigma, first_index, **settings
    )
    return first_index, arrays, time.process_time() - start


def _per_object_arrays(
    name: str,
    images: np.ndarray,
    psf_images: np.ndarray,
    pixel_scale: float,
    noise_sigma: float,
    settings: dict[str, Any],
    workers: int,
    progress: bool,
) -> tuple[dict[str, np.ndarray], float, int]:
    """Run the estimator over all objects in chunks, in parallel; (arrays, CPU seconds, workers)."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
    )

    count = len(images)
    chunk = int(min(256, max(4, math.ceil(count / (workers * 8)))))
    starts = list(range(0, count, chunk))
    workers = max(1, min(workers, len(starts)))

    def chunk_inputs(start: int) -> tuple[np.ndarray, np.ndarray]:
        stop = min(start + chunk, count)
        psf = psf_images if psf_images.ndim == 2 else np.asarray(psf_images[start:stop])
        return np.asarray(images[start:stop]), psf

    pieces: dict[int, dict[str, np.ndarray]] = {}
    core_seconds = 0.0
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
    )
    bar = Progress(*columns, disable=not progress, transient=True)
    task = bar.add_task(f"reference {name} ({workers} workers)", total=count)
    if workers == 1:
        with bar:
            for start in starts:
                images_chunk, psf_chunk = chunk_inputs(start)
                _, arrays, seconds = _measure_chunk(
                    name, images_chunk, psf_chunk, pixel_scale, noise_sigma, start, settings
                )
                pieces[start], core_seconds = arrays, core_seconds + seconds
                bar.advance(task, len(images_chunk))
    else:
        # The platform's default start method (fork on Linux); the pool's processes start
        # at the first submit, before the progress bar starts its refresh thread.
        with ProcessPoolExecutor(
            max_workers=workers, mp_context=multiprocessing.get_context()
        ) as pool:
            futures = [
                pool.submit(
                    _measure_chunk,
                    name,
                    *chunk_inputs(start),
                    pixel_scale,
                    noise_sigma,
                    start,
                    settings,
                )
                for start in starts
            ]
            with bar:
                for future in as_completed(futures):
                    start, arrays, seconds = future.result()
                    pieces[start], core_seconds = arrays, core_seconds + seconds
                    bar.advance(task, len(arrays["ok"]))
    ordered = [pieces[start] for start in starts]
    merged = {key: np.concatenate([piece[key] for piece in ordered]) for key in ordered[0]}
    return merged, core_seconds, workers


def _finish(
    name: str,
    settings: dict[str, Any],
    arrays: dict[str, np.ndarray],
    seconds: float,
    core_seconds: float,
    workers: int,
    cache_hit: bool = False,
) -> ReferenceResult:
    ok = np.asarray(arrays["ok"], dtype=bool)
    if "g" in arrays:
        g, response, e, R = np.array(arrays["g"], dtype=np.float64), None, None, None
    else:
        e, R = np.array(arrays["e"]), np.array(arrays["R"])
        g, response = metacal.calibrate(e, R, ok)
    return ReferenceResult(
        name=name,
        settings=settings,
        g1=g[:, 0].copy(),
        g2=g[:, 1].copy(),
        ok=ok.copy(),
        seconds=seconds,
        core_seconds=core_seconds,
        workers=workers,
        response=response,
        e=e,
        R=R,
        cache_hit=cache_hit,
    )


def measure(
    name: str,
    images: np.ndarray,
    psf_images: np.ndarray,
    pixel_scale: float,
    noise_sigma: float,
    *,
    workers: int | None = None,
    progress: bool = False,
    **settings: Any,
) -> ReferenceResult:
    """Measure per-object shears of ``images`` with reference estimator ``name`` (no caching).

    ``workers``: processes to use (default all CPU cores; 1 runs in this process).
    """
    full_settings = estimator_settings(name, settings)
    if name == "ngmix" and not ngmix_backend.available():
        raise ImportError(ngmix_backend.INSTALL_HINT)
    images, psf_images = np.asarray(images), np.asarray(psf_images)
    _check_inputs(images, psf_images, pixel_scale, noise_sigma)
    if len(images) == 0:
        raise ValueError("no images to measure")
    start = time.perf_counter()
    arrays, core_seconds, used = _per_object_arrays(
        name,
        images,
        psf_images,
        float(pixel_scale),
        float(noise_sigma),
        full_settings,
        workers or cpu_count(),
        progress,
    )
    result = _finish(name, full_settings, arrays, time.perf_counter() - start, core_seconds, used)
    if result.n_failed:
        logger.warning(
            "reference %s: %d of %d objects failed (flagged, g = NaN)",
            name,
            result.n_failed,
            result.n,
        )
    return result


def reference_config(
    name: str,
    settings: dict[str, Any],
    dataset_key: str,
    pixel_scale: float,
    noise_sigma: float,
    count: int,
) -> dict[str, Any]:
    """What a cached reference result is keyed by."""
    return {
        "estimator": name,
        "settings": estimator_settings(name, settings),
        "dataset_key": dataset_key,
        "pixel_scale": float(pixel_scale),
        "noise_sigma": float(noise_sigma),
        "count": int(count),
        "version": CACHE_VERSION,
    }


def cached_measure(
    name: str,
    images: np.ndarray,
    psf_images: np.ndarray,
    pixel_scale: float,
    noise_sigma: float,
    *,
    cache_dir: str | os.PathLike | None,
    dataset_key: str,
    progress: bool = True,
    workers: int | None = None,
    **settings: Any,
) -> ReferenceResult:
    """:func:`measure`, computed once: stored under ``cache_dir`` keyed by the dataset and settings.

    ``dataset_key`` must identify the stamps (e.g. the hash of the test set's configuration).
    A second call with the same key loads the stored result (log: "reference cache hit"); a
    corrupted entry fails its checksum and is recomputed.
    """
    config = reference_config(name, settings, dataset_key, pixel_scale, noise_sigma, len(images))

    def build() -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        result = measure(
            name,
            images,
            psf_images,
            pixel_scale,
            noise_sigma,
            workers=workers,
            progress=progress,
            **settings,
        )
        arrays = {"g": result.g, "ok": result.ok}
        if result.e is not None:
            arrays.update(e=result.e, R=result.R)
        meta = {
            "seconds": result.seconds,
            "core_seconds": result.core_seconds,
            "workers": result.workers,
        }
        return arrays, meta

    root = Path(cache_root(cache_dir))
    arrays, meta, hit = cached_arrays(root, f"reference-{name}", config, build)
    if "e" in arrays:
        arrays = {"e": arrays["e"], "R": arrays["R"], "ok": arrays["ok"]}
    result = _finish(
        name,
        config["settings"],
        arrays,
        float(meta["seconds"]),
        float(meta["core_seconds"]),
        int(meta["workers"]),
        cache_hit=hit,
    )
    logger.info(
        "reference cache %s: %s %s on %d objects (%d failed), dataset %s",
        "hit" if hit else "miss",
        name,
        config["settings"],
        result.n,
        result.n_failed,
        dataset_key,
    )
    return result
