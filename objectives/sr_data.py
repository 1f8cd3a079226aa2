"""Strong-lensing LR/HR image pairs: lenstronomy simulations and a user's folder of .npy pairs.

Simulation (DeepLense "Model 1" style). Each pair draws an SIE lens (Einstein radius, axis
ratio, orientation, centre), external shear, an optional Poisson number of point-mass
subhalos, and an elliptical Sérsic source (magnitude, half-light radius, Sérsic index, axis
ratio, orientation, centre). lenstronomy ray-shoots the HR pixel grid (``supersampling``
points per HR pixel side) and evaluates the source there:

- HR: ``scale * lr_size`` pixels of ``lr_pixel_scale / scale`` arcsec, noiseless, convolved
  with a Gaussian of ``hr_psf_fwhm`` (0 = none);
- LR: the same sky convolved with the Gaussian PSF of ``psf_fwhm``, summed over
  ``scale x scale`` HR pixels, plus noise with lenstronomy's convention (``SingleBand``):
  Gaussian background of ``background_rms`` counts/s and Poisson noise of the source counts
  over ``exposure_time`` (Gaussian approximation).

Instruments: ``simulate`` is DeepLense Model 1 (75x75 LR at 0.05"/pixel, PSF FWHM 0.087");
``euclid`` (VIS) and ``hst`` (WFC3 F160W) take pixel scale, seeing, exposure time, zero point
and background noise from lenstronomy's ``ObservationConfig`` (64x64 LR).

Normalisation: every image, LR and HR separately, is min-max rescaled to [0, 1]
(a constant image becomes 0). Arrays are float32 of shape (N, 1, H, W).

Splits are simulated from disjoint seeds: ``[data_seed, 1]`` train, ``[data_seed, 2]``
validation, ``[data_seed, 3]`` test.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from tokenize import TokenError
from typing import Any

import numpy as np
from scipy import ndimage

from lensnas.spaces.errors import DataError

SOURCES = ("simulate", "euclid", "hst", "folder")
SPLITS = ("train", "validation", "test")
SPLIT_SEED_CODES = {"train": 1, "validation": 2, "test": 3}
FWHM_PER_SIGMA = 2.0 * math.sqrt(2.0 * math.log(2.0))
PSF_TRUNCATE = 5.0  # Gaussian PSF kernels are cut at 5 sigma (as lenstronomy's)
MIN_HR_SIDE = 11  # the SSIM window (objectives.sr_metrics)

INSTRUMENT_KEYS = (
    "lr_size",
    "lr_pixel_scale",
    "psf_fwhm",
    "exposure_time",
    "background_rms",
    "magnitude_zero_point",
)

# DeepLense Model 1: 75x75 at 0.05"/pixel, Gaussian PSF FWHM 0.087". Exposure, zero point and
# background are chosen so that, with the default source magnitudes, the brightest LR pixel has
# a signal-to-noise ratio of about 7 to 50 (median about 20).
MODEL_1_INSTRUMENT = {
    "lr_size": 75,
    "lr_pixel_scale": 0.05,
    "psf_fwhm": 0.087,
    "exposure_time": 1000.0,
    "background_rms": 0.02,
    "magnitude_zero_point": 25.0,
}

# Physical population: [low, high] ranges are drawn uniformly unless said otherwise.
POPULATION_DEFAULTS: dict[str, Any] = {
    "einstein_radius": [0.6, 1.2],  # arcsec, SIE
    "lens_axis_ratio": [0.6, 1.0],  # SIE minor/major axis ratio
    "lens_center_sigma": 0.05,  # arcsec, Gaussian scatter of the lens centre
    "shear_strength": [0.0, 0.1],  # |gamma_ext|, random orientation
    "subhalo_mean_count": 5.0,  # Poisson mean of point-mass subhalos (0 = none)
    "subhalo_einstein_radius": [0.005, 0.05],  # arcsec, log-uniform
    "subhalo_position_radius": 1.5,  # arcsec, uniform in a disk around the lens centre
    "source_magnitude": [20.5, 22.5],  # AB magnitude of the unlensed source
    "source_half_light_radius": [0.1, 0.4],  # arcsec (Sérsic R_sersic)
    "source_sersic_index": [0.7, 2.5],
    "source_axis_ratio": [0.5, 1.0],
    "source_center_radius": 0.3,  # arcsec, uniform in a disk around the optical axis
}
RANGE_KEYS = tuple(k for k, v in POPULATION_DEFAULTS.items() if isinstance(v, list))
LOG_UNIFORM_KEYS = ("subhalo_einstein_radius",)


def instrument_preset(source: str) -> dict[str, Any]:
    """LR size, pixel scale, PSF FWHM, exposure, background and zero point of a simulated source."""
    if source == "simulate":
        return dict(MODEL_1_INSTRUMENT)
    from lenstronomy.SimulationAPI.observation_api import SingleBand

    if source == "euclid":
        from lenstronomy.SimulationAPI.ObservationConfig.Euclid import Euclid

        kwargs = Euclid(band="VIS", psf_type="GAUSSIAN", coadd_years=6).kwargs_single_band()
    elif source == "hst":
        from lenstronomy.SimulationAPI.ObservationConfig.HST import HST

        kwargs = HST(band="WFC3_F160W", psf_type="GAUSSIAN").kwargs_single_band()
    else:
        raise ValueError(f"no instrument for source {source!r}; simulated: simulate, euclid, hst")
    band = SingleBand(**kwargs)
    return {
        "lr_size": 64,
        "lr_pixel_scale": float(kwargs["pixel_scale"]),
        "psf_fwhm": float(kwargs["seeing"]),
        "exposure_time": float(band.exposure_time),
        "background_rms": float(band.background_noise),
        "magnitude_zero_point": float(kwargs["magnitude_zero_point"]),
    }


def simulation_config(options: dict[str, Any]) -> dict[str, Any]:
    """The complete simulation settings: the source's instrument, overridden by options."""
    instrument = instrument_preset(options["source"])
    for key in INSTRUMENT_KEYS:
        if options.get(key) is not None:
            instrument[key] = options[key]
    instrument["lr_size"] = int(instrument["lr_size"])
    config = {
        "source": options["source"],
        "scale": int(options["scale"]),
        "hr_psf_fwhm": float(options["hr_psf_fwhm"]),
        "supersampling": int(options["supersampling"]),
        **{k: float(v) for k, v in instrument.items() if k != "lr_size"},
        "lr_size": instrument["lr_size"],
    }
    for key in POPULATION_DEFAULTS:
        value = options[key]
        config[key] = [float(v) for v in value] if isinstance(value, list) else float(value)
    return config


def normalize_per_image(images: np.ndarray) -> np.ndarray:
    """Min-max rescale each image of (N, ..., H, W) to [0, 1] as float32 (constant -> 0)."""
    images = np.asarray(images, dtype=np.float64)
    axes = tuple(range(1, images.ndim))
    low = images.min(axis=axes, keepdims=True)
    span = images.max(axis=axes, keepdims=True) - low
    scaled = np.divide(images - low, span, out=np.zeros_like(images), where=span > 0)
    return scaled.astype(np.float32)


def block_sum(image: np.ndarray, factor: int) -> np.ndarray:
    """Sum ``factor x factor`` blocks of a 2-d image (its side must be a multiple of factor)."""
    if factor == 1:
        return image
    rows, columns = image.shape
    return image.reshape(rows // factor, factor, columns // factor, factor).sum(axis=(1, 3))


class LensSimulator:
    """Renders LR/HR pairs of strongly lensed Sérsic sources with lenstronomy."""

    def __init__(self, config: dict[str, Any]):
        from lenstronomy.LightModel.light_model import LightModel
        from lenstronomy.SimulationAPI.observation_api import SingleBand

        self.config = config
        self.scale = config["scale"]
        self.lr_size = config["lr_size"]
        self.hr_size = self.lr_size * self.scale
        self.hr_pixel_scale = config["lr_pixel_scale"] / self.scale
        self.supersampling = config["supersampling"]
        points = self.hr_size * self.supersampling
        spacing = self.hr_pixel_scale / self.supersampling
        axis = (np.arange(points) - (points - 1) / 2.0) * spacing
        x, y = np.meshgrid(axis, axis)
        self.x, self.y = x.ravel(), y.ravel()
        self.source_model = LightModel(["SERSIC_ELLIPSE"])
        self.band = SingleBand(
            pixel_scale=config["lr_pixel_scale"],
            exposure_time=config["exposure_time"],
            magnitude_zero_point=config["magnitude_zero_point"],
            background_noise=config["background_rms"],
            seeing=config["psf_fwhm"],
            psf_type="GAUSSIAN",
        )
        self._lens_models: dict[int, Any] = {}

    def lens_model(self, subhalo_count: int) -> Any:
        """lenstronomy's SIE + SHEAR + ``subhalo_count`` POINT_MASS model (built once per count)."""
        if subhalo_count not in self._lens_models:
            from lenstronomy.LensModel.lens_model import LensModel

            self._lens_models[subhalo_count] = LensModel(
                ["SIE", "SHEAR"] + ["POINT_MASS"] * subhalo_count
            )
        return self._lens_models[subhalo_count]

    def draw_parameters(self, rng: np.random.Generator) -> tuple[list[dict], list[dict]]:
        """Random lens and source keyword lists in lenstronomy's conventions."""
        from lenstronomy.Util import param_util

        c = self.config

        def uniform(key: str) -> float:
            low, high = c[key]
            if key in LOG_UNIFORM_KEYS:
                return float(math.exp(rng.uniform(math.log(low), math.log(high))))
            return float(rng.uniform(low, high))

        def in_disk(radius: float) -> tuple[float, float]:
            r, angle = radius * math.sqrt(rng.uniform()), rng.uniform(0, 2 * math.pi)
            return r * math.cos(angle), r * math.sin(angle)

        lens_x, lens_y = (float(v) for v in rng.normal(0.0, 1.0, size=2) * c["lens_center_sigma"])
        e1, e2 = param_util.phi_q2_ellipticity(rng.uniform(0, math.pi), uniform("lens_axis_ratio"))
        gamma1, gamma2 = param_util.shear_polar2cartesian(
            rng.uniform(0, math.pi), uniform("shear_strength")
        )
        kwargs_lens = [
            {
                "theta_E": uniform("einstein_radius"),
                "e1": float(e1),
                "e2": float(e2),
                "center_x": lens_x,
                "center_y": lens_y,
            },
            {"gamma1": float(gamma1), "gamma2": float(gamma2), "ra_0": 0.0, "dec_0": 0.0},
        ]
        for _ in range(int(rng.poisson(c["subhalo_mean_count"]))):
            dx, dy = in_disk(c["subhalo_position_radius"])
            kwargs_lens.append(
                {
                    "theta_E": uniform("subhalo_einstein_radius"),
                    "center_x": lens_x + dx,
                    "center_y": lens_y + dy,
                }
            )
        source_x, source_y = in_disk(c["source_center_radius"])
        e1, e2 = param_util.phi_q2_ellipticity(
            rng.uniform(0, math.pi), uniform("source_axis_ratio")
        )
        kwargs_source = [
            {
                "amp": 1.0,
                "R_sersic": uniform("source_half_light_radius"),
                "n_sersic": uniform("source_sersic_index"),
                "e1": float(e1),
                "e2": float(e2),
                "center_x": float(source_x),
                "center_y": float(source_y),
            }
        ]
        flux = self.band.magnitude2cps(uniform("source_magnitude"))
        kwargs_source[0]["amp"] = float(flux / self.source_model.total_flux(kwargs_source)[0])
        return kwargs_lens, kwargs_source

    def render(
        self, kwargs_lens: list[dict], kwargs_source: list[dict], rng: np.random.Generator
    ) -> tuple[np.ndarray, np.ndarray]:
        """(LR with PSF and noise, noiseless HR), both in counts/s per pixel, unnormalised."""
        lens_model = self.lens_model(len(kwargs_lens) - 2)
        beta_x, beta_y = lens_model.ray_shooting(self.x, self.y, kwargs_lens)
        brightness = self.source_model.surface_brightness(beta_x, beta_y, kwargs_source)
        side = self.hr_size * self.supersampling
        sub_area = (self.hr_pixel_scale / self.supersampling) ** 2
        sky = block_sum(np.asarray(brightness).reshape(side, side) * sub_area, self.supersampling)
        hr = self._blur(sky, self.config["hr_psf_fwhm"])
        lr_clean = block_sum(self._blur(sky, self.config["psf_fwhm"]), self.scale)
        noise_rms = self.band.estimate_noise(lr_clean)
        lr = lr_clean + rng.standard_normal(lr_clean.shape) * noise_rms
        return lr, hr

    def _blur(self, image: np.ndarray, fwhm: float) -> np.ndarray:
        if fwhm <= 0:
            return image
        sigma = fwhm / FWHM_PER_SIGMA / self.hr_pixel_scale
        return ndimage.gaussian_filter(image, sigma, mode="constant", truncate=PSF_TRUNCATE)

    def pair(self, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """One random (LR, HR) pair, unnormalised."""
        kwargs_lens, kwargs_source = self.draw_parameters(rng)
        return self.render(kwargs_lens, kwargs_source, rng)


def split_rng(data_seed: int, split: str) -> np.random.Generator:
    """The random generator of one split; splits never share a seed."""
    return np.random.default_rng([data_seed, SPLIT_SEED_CODES[split]])


def simulate_split(
    simulator: LensSimulator,
    count: int,
    rng: np.random.Generator,
    advance: Callable[[int], None] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """``count`` normalised pairs as float32 arrays (N, 1, h, w) and (N, 1, H, W)."""
    lr = np.empty((count, 1, simulator.lr_size, simulator.lr_size), dtype=np.float32)
    hr = np.empty((count, 1, simulator.hr_size, simulator.hr_size), dtype=np.float32)
    for i in range(count):
        low, high = simulator.pair(rng)
        lr[i, 0], hr[i, 0] = normalize_per_image(low[None])[0], normalize_per_image(high[None])[0]
        if advance is not None:
            advance(1)
    return lr, hr


def simulate_dataset(
    config: dict[str, Any], counts: dict[str, int], data_seed: int, progress: bool = True
) -> dict[str, np.ndarray]:
    """Train/validation/test pairs: ``{"<split>_lr", "<split>_hr"}`` arrays, with a progress bar."""
    from rich.progress import Progress

    simulator = LensSimulator(config)
    arrays = {}
    total = sum(counts.values())
    with Progress(disable=not progress, transient=True) as bar:
        task = bar.add_task(f"simulating {total} lensed image pairs", total=total)
        for split in SPLITS:
            lr, hr = simulate_split(
                simulator,
                counts[split],
                split_rng(data_seed, split),
                lambda n: bar.advance(task, n),
            )
            arrays[f"{split}_lr"], arrays[f"{split}_hr"] = lr, hr
    return arrays


# ---------------------------------------------------------------------------- user folders

SPLIT_FILE_NAMES = {
    "train": "train",
    "validation": "validation",
    "val": "validation",
    "test": "test",
}


def folder_files(folder: Path) -> tuple[Path, Path, list[str]]:
    """(LR dir, HR dir, sorted .npy names under LR/), checking that both folders exist."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(str(folder), "no such folder (expected LR/ and HR/ with .npy files)")
    lr_dir, hr_dir = folder / "LR", folder / "HR"
    for sub in (lr_dir, hr_dir):
        if not sub.is_dir():
            raise DataError(
                str(sub), "missing folder; a data folder holds LR/ and HR/ with matching .npy names"
            )
    names = sorted(p.name for p in lr_dir.glob("*.npy"))
    if not names:
        raise DataError(str(lr_dir), "contains no .npy files")
    return lr_dir, hr_dir, names


def folder_config(
    options: dict[str, Any], data_seed: int,
    fingerprint: Callable[[Path], list[list[Any]]] | None = None,
) -> dict[str, Any]:
    """What a dataset read from ``options["folder"]`` is made of (its files' ``fingerprint``,
    default this module's LR/HR one; the split fractions, normalisation, seed): part of its
    cache key."""
    folder = Path(options["folder"]).resolve()
    return {
        "source": "folder",
        "folder": str(folder),
        "files": (fingerprint or folder_fingerprint)(folder),
        "validation_fraction": options["validation_fraction"],
        "test_fraction": options["test_fraction"],
        "normalize": options["normalize"],
        "data_seed": data_seed,
    }


def folder_fingerprint(folder: Path) -> list[list[Any]]:
    """[name, size, mtime_ns] of every .npy under LR/ and HR/: part of the cache key."""
    lr_dir, hr_dir, _ = folder_files(folder)
    return [
        [f"{sub.name}/{path.name}", path.stat().st_size, path.stat().st_mtime_ns]
        for sub in (lr_dir, hr_dir)
        for path in sorted(sub.glob("*.npy"))
    ]


def _load_array(path: Path, unit_range: bool) -> np.ndarray:
    try:
        array = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError, SyntaxError, TokenError) as error:
        # a corrupted header fails in numpy's header parser with SyntaxError or TokenError
        message = " ".join(str(error).split())
        raise DataError(str(path), f"unreadable .npy file ({message})") from None
    if not np.issubdtype(array.dtype, np.number) or np.issubdtype(array.dtype, np.complexfloating):
        raise DataError(str(path), f"must hold real numbers, got dtype {array.dtype}")
    bad = int(np.size(array) - np.count_nonzero(np.isfinite(array)))
    if bad:
        raise DataError(str(path), f"contains {bad} non-finite values (NaN or inf)")
    if unit_range and array.size and (array.min() < 0 or array.max() > 1):
        raise DataError(
            str(path),
            f"values span [{array.min():.3g}, {array.max():.3g}], outside [0, 1]; "
            "set normalize = true",
        )
    return array


def _as_images(path: Path, array: np.ndarray, stacked: bool) -> np.ndarray:
    """(N, H, W) from one image (H, W) / (1, H, W), or a stack (N, H, W) / (N, 1, H, W)."""
    if stacked:
        if array.ndim == 4 and array.shape[1] == 1:
            array = array[:, 0]
        if array.ndim != 3 or 0 in array.shape:
            raise DataError(
                str(path), f"expected a stack of shape (N, H, W) or (N, 1, H, W), got {array.shape}"
            )
        return array
    if array.ndim == 3 and array.shape[0] == 1:
        array = array[0]
    if array.ndim != 2 or 0 in array.shape:
        raise DataError(
            str(path), f"expected one image of shape (H, W) or (1, H, W), got {array.shape}"
        )
    return array[None]


def _check_pair(lr_path: Path, lr: np.ndarray, hr_path: Path, hr: np.ndarray, scale: int) -> None:
    if len(lr) != len(hr):
        raise DataError(str(hr_path), f"holds {len(hr)} images but {lr_path} holds {len(lr)}")
    expected = (lr.shape[1] * scale, lr.shape[2] * scale)
    if hr.shape[1:] != expected:
        raise DataError(
            str(hr_path),
            f"HR shape {hr.shape[1:]} is not {scale} x the LR shape {lr.shape[1:]} of {lr_path} "
            f"(expected {expected})",
        )
    if min(expected) < MIN_HR_SIDE:
        raise DataError(
            str(hr_path), f"HR images of {expected} are too small; SSIM needs at least 11x11 pixels"
        )


def load_folder(
    folder: Path, scale: int, unit_range: bool = False
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Validated raw (LR, HR) stacks by split, unnormalised, from ``folder/LR`` and ``folder/HR``.

    Layouts: one array per split (``LR/train.npy``, optional ``LR/validation.npy`` or
    ``LR/val.npy``, optional ``LR/test.npy``), or one image per file with matching names
    (all returned as ``train``). Any problem raises DataError naming the file; with
    ``unit_range``, so does a value outside [0, 1].
    """
    lr_dir, hr_dir, names = folder_files(folder)
    stems = {Path(name).stem for name in names}
    stacked = "train" in stems and stems <= set(SPLIT_FILE_NAMES)
    for name in sorted(p.name for p in hr_dir.glob("*.npy")):
        if name not in names:
            raise DataError(str(hr_dir / name), f"has no LR partner {lr_dir / name}")
    pools: dict[str, tuple[list, list]] = {}
    first: tuple[Path, tuple[int, ...]] | None = None
    for name in names:
        lr_path, hr_path = lr_dir / name, hr_dir / name
        if not hr_path.is_file():
            raise DataError(str(lr_path), f"has no HR partner {hr_path}")
        lr = _as_images(lr_path, _load_array(lr_path, unit_range), stacked)
        hr = _as_images(hr_path, _load_array(hr_path, unit_range), stacked)
        if first is None:
            first = (lr_path, lr.shape[1:])
        elif lr.shape[1:] != first[1]:
            raise DataError(
                str(lr_path), f"LR shape {lr.shape[1:]} differs from {first[1]} of {first[0]}"
            )
        _check_pair(lr_path, lr, hr_path, hr, scale)
        split = SPLIT_FILE_NAMES[Path(name).stem] if stacked else "train"
        pools.setdefault(split, ([], []))
        pools[split][0].append(lr)
        pools[split][1].append(hr)
    return {
        split: (np.concatenate(lrs).astype(np.float64), np.concatenate(hrs).astype(np.float64))
        for split, (lrs, hrs) in pools.items()
    }


def folder_dataset(
    folder: Path,
    scale: int,
    *,
    validation_fraction: float,
    test_fraction: float,
    seed: int,
    normalize: bool,
) -> dict[str, np.ndarray]:
    """Train/validation/test arrays from a user folder; missing splits are carved from train."""
    pools = load_folder(folder, scale, unit_range=not normalize)
    train_lr, train_hr = pools["train"]
    rng = np.random.default_rng([seed, 0])
    for split, fraction in (("test", test_fraction), ("validation", validation_fraction)):
        if split in pools:
            continue
        count = max(1, round(fraction * len(train_lr)))
        if len(train_lr) - count < 1:
            raise DataError(
                str(Path(folder) / "LR"),
                f"too few pairs ({len(train_lr)}) for a {split} split of {count} and training",
            )
        order = rng.permutation(len(train_lr))
        carved, kept = np.sort(order[:count]), np.sort(order[count:])
        pools[split] = (train_lr[carved], train_hr[carved])
        train_lr, train_hr = train_lr[kept], train_hr[kept]
    pools["train"] = (train_lr, train_hr)
    arrays = {}
    for split in SPLITS:
        lr, hr = pools[split]
        if normalize:
            lr, hr = normalize_per_image(lr), normalize_per_image(hr)
        else:
            lr, hr = lr.astype(np.float32), hr.astype(np.float32)
        arrays[f"{split}_lr"], arrays[f"{split}_hr"] = lr[:, None], hr[:, None]
    return arrays
