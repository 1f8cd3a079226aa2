"""Strong-lensing LR/HR image pairs: lenstronomy simulations and a user's folder of pairs.

Simulation. Each pair draws an SIE lens (Einstein radius, axis ratio, orientation, centre),
external shear, an optional Poisson number of point-mass subhalos, and an elliptical Sérsic
source (magnitude, half-light radius, Sérsic index, axis ratio, orientation, centre).
lenstronomy ray-shoots the HR pixel grid (``supersampling`` points per HR pixel side) and
evaluates the source there, in counts/s:

- noiseless HR: ``scale * lr_size`` pixels of ``lr_pixel_scale / scale`` arcsec, convolved with
  a Gaussian PSF of ``hr_psf_fwhm``;
- noiseless LR: the noiseless HR degraded by the study's operator
  (``lensnas.objectives.sr.metrics.Degradation``: the Gaussian of FWHM
  sqrt(psf_fwhm^2 - hr_psf_fwhm^2), then ``scale x scale`` blocks summed), so that the LR image
  has the PSF ``psf_fwhm`` and the operator maps the noiseless HR exactly onto it;
- observed images, DeepLenseSim's noise recipe: counts = Poisson(max(0, t (image + shot +
  background))) with ``shot`` Gaussian of variance image / t and ``background`` Gaussian of
  ``background_rms`` counts/s (so shot noise enters twice, as in DeepLense's sets), divided by
  the exposure t (``exposure_time``, a number or a [low, high] range drawn log-uniformly per
  image). The HR target is the Poisson counts of its noiseless image at ``hr_exposure_time``
  (drawn the same way, independently), or noiseless when that is 0.

Sources: ``simulate`` is DeepLense Model 1 (see :data:`MODEL_1_INSTRUMENT` and
:data:`MODEL_1_POPULATION`: DeepLenseSim's Model I lens, source, PSF and noise, 75x75 LR at
0.05"/pixel, 150x150 HR at 0.025"/pixel); ``euclid`` (VIS) and ``hst`` (WFC3 F160W) take pixel
scale, seeing, exposure time, zero point and background noise from lenstronomy's
``ObservationConfig`` (64x64 LR), a noiseless HR without PSF, and the generic population
:data:`GENERIC_POPULATION`.

Normalisation: every image, LR and HR separately, is min-max rescaled to [0, 1]
(a constant image becomes 0). Arrays are float32 of shape (N, 1, H, W); ``<split>_lr_noise``
(N,) holds each LR image's noise RMS in its [0, 1] units (the RMS of the normalised LR image
minus its noiseless version).

Splits are simulated from disjoint seeds: ``[data_seed, 1]`` train, ``[data_seed, 2]``
validation, ``[data_seed, 3]`` test.
"""

from __future__ import annotations

import math
import re
import warnings
from collections.abc import Callable
from pathlib import Path
from tokenize import TokenError
from typing import Any, NamedTuple

import numpy as np
import torch

from lensnas.objectives.sr.metrics import Degradation, gaussian_blur
from lensnas.spaces.errors import DataError

SOURCES = ("simulate", "euclid", "hst", "folder")
SPLITS = ("train", "validation", "test")
SPLIT_SEED_CODES = {"train": 1, "validation": 2, "test": 3}
MIN_HR_SIDE = 11  # the SSIM window (objectives.sr_metrics)
SIMULATION_BATCH = 32  # pairs whose PSF and binning are one torch call

INSTRUMENT_KEYS = (
    "lr_size",
    "lr_pixel_scale",
    "psf_fwhm",
    "hr_psf_fwhm",
    "exposure_time",
    "hr_exposure_time",
    "background_rms",
    "magnitude_zero_point",
)
EXPOSURE_KEYS = ("exposure_time", "hr_exposure_time")
MODEL_1_EXPOSURE = [1000.0, 3162.2777]  # s: DeepLenseSim draws 10**uniform(3, 3.5)

# DeepLense Model 1 (DeepLenseSim's Model I, at the LR/HR sizes of DeepLense's SR sets):
# Gaussian PSF of FWHM 0.087" on both images, exposure 10**U(3, 3.5) s for each, zero point 25.
# background_rms is calibrated: DeepLenseSim's own 0.01 counts/s gives a bilinear baseline of
# 27.2 dB PSNR / SSIM 0.53, 0.025 gives the published 24.8 dB / 0.30 within 0.8 dB / 0.03
# (README, "Super-resolution").
MODEL_1_INSTRUMENT: dict[str, Any] = {
    "lr_size": 75,
    "lr_pixel_scale": 0.05,
    "psf_fwhm": 0.087,
    "hr_psf_fwhm": 0.087,
    "exposure_time": MODEL_1_EXPOSURE,
    "hr_exposure_time": MODEL_1_EXPOSURE,
    "background_rms": 0.025,
    "magnitude_zero_point": 25.0,
}

# Physical population of the euclid and hst sources: [low, high] ranges are drawn uniformly
# unless said otherwise.
GENERIC_POPULATION: dict[str, Any] = {
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
# DeepLenseSim's Model I without substructure: an SIE of 1e12 solar masses at z = 0.5 lensing a
# source at z = 1 (Einstein radius 1.28"), e1 = 0.1 (axis ratio 0.818), external shear 0.05; a
# Sérsic source of amplitude 20 (magnitude 22.06 at zero point 25), R_sersic 0.25", n = 1,
# e = (-0.1, 0.1) (axis ratio 0.752), centred uniformly within 0.35" of the axis. Orientations
# are drawn at random here (DeepLenseSim fixes them).
MODEL_1_POPULATION: dict[str, Any] = {
    **GENERIC_POPULATION,
    "einstein_radius": [1.2815, 1.2815],
    "lens_axis_ratio": [0.8182, 0.8182],
    "lens_center_sigma": 0.0,
    "shear_strength": [0.05, 0.05],
    "subhalo_mean_count": 0.0,
    "source_magnitude": [22.063, 22.063],
    "source_half_light_radius": [0.25, 0.25],
    "source_sersic_index": [1.0, 1.0],
    "source_axis_ratio": [0.7522, 0.7522],
    "source_center_radius": 0.4,
}
# The [objective] defaults of the population keys: None is the source's population.
POPULATION_DEFAULTS: dict[str, Any] = {key: None for key in GENERIC_POPULATION}
RANGE_KEYS = tuple(k for k, v in GENERIC_POPULATION.items() if isinstance(v, list))
LOG_UNIFORM_KEYS = ("subhalo_einstein_radius",)


def instrument_preset(source: str) -> dict[str, Any]:
    """LR size, pixel scale, PSFs, exposures, background and zero point of a simulated source."""
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
        "hr_psf_fwhm": 0.0,
        "exposure_time": float(band.exposure_time),
        "hr_exposure_time": 0.0,
        "background_rms": float(band.background_noise),
        "magnitude_zero_point": float(kwargs["magnitude_zero_point"]),
    }


def population_preset(source: str) -> dict[str, Any]:
    """The lens and source population of a simulated source."""
    return dict(MODEL_1_POPULATION if source == "simulate" else GENERIC_POPULATION)


def _exposure_range(value: Any) -> list[float]:
    return [float(v) for v in value] if isinstance(value, list) else [float(value)] * 2


def simulation_config(options: dict[str, Any]) -> dict[str, Any]:
    """The complete simulation settings: the source's instrument and population, overridden by
    the options that are set (not None)."""
    instrument = instrument_preset(options["source"])
    population = population_preset(options["source"])
    for key in INSTRUMENT_KEYS:
        if options.get(key) is not None:
            instrument[key] = options[key]
    for key in POPULATION_DEFAULTS:
        if options.get(key) is not None:
            population[key] = options[key]
    config: dict[str, Any] = {
        "source": options["source"],
        "scale": int(options["scale"]),
        "supersampling": int(options["supersampling"]),
        "lr_size": int(instrument["lr_size"]),
    }
    for key, value in instrument.items():
        if key != "lr_size":
            config[key] = _exposure_range(value) if key in EXPOSURE_KEYS else float(value)
    for key, value in population.items():
        config[key] = [float(v) for v in value] if isinstance(value, list) else float(value)
    return config


def operator_psf_fwhm_pixels(config: dict[str, Any]) -> float:
    """FWHM in HR pixels of the Gaussian that blurs the HR image's PSF into the LR one's."""
    extra = math.sqrt(max(config["psf_fwhm"] ** 2 - config["hr_psf_fwhm"] ** 2, 0.0))
    return extra / (config["lr_pixel_scale"] / config["scale"])


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


def observe(
    image: np.ndarray, exposure: float, background_rms: float, rng: np.random.Generator
) -> np.ndarray:
    """DeepLenseSim's noisy observation of ``image`` (counts/s per pixel), in counts/s:
    Poisson(max(0, t (image + shot + background))) / t, shot ~ N(0, image / t)."""
    shot = rng.standard_normal(image.shape) * np.sqrt(np.abs(image) / exposure)
    background = rng.standard_normal(image.shape) * background_rms
    counts = exposure * (image + shot + background)
    return rng.poisson(np.maximum(counts, 0.0)) / exposure


class SimulatedPair(NamedTuple):
    """One simulated pair, unnormalised, in counts/s per pixel."""

    lr: np.ndarray  # observed LR
    hr: np.ndarray  # HR target (Poisson counts at hr_exposure_time, or noiseless)
    lr_clean: np.ndarray  # the LR image without noise


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
        # only for magnitude -> counts/s at the zero point
        self.band = SingleBand(
            pixel_scale=config["lr_pixel_scale"],
            exposure_time=1.0,
            magnitude_zero_point=config["magnitude_zero_point"],
            background_noise=0.0,
        )
        self.operator = Degradation(self.scale, operator_psf_fwhm_pixels(config))
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

    def sky(self, kwargs_lens: list[dict], kwargs_source: list[dict]) -> np.ndarray:
        """The lensed source on the HR grid before any PSF, in counts/s per HR pixel."""
        lens_model = self.lens_model(len(kwargs_lens) - 2)
        beta_x, beta_y = lens_model.ray_shooting(self.x, self.y, kwargs_lens)
        brightness = self.source_model.surface_brightness(beta_x, beta_y, kwargs_source)
        side = self.hr_size * self.supersampling
        sub_area = (self.hr_pixel_scale / self.supersampling) ** 2
        return block_sum(np.asarray(brightness).reshape(side, side) * sub_area, self.supersampling)

    def render_clean(self, skies: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(noiseless HR, noiseless LR) of a batch of skies (N, H, W), in counts/s per pixel
        (one torch call per batch: per-image calls are slow on a busy machine)."""
        with torch.no_grad():
            sky = torch.from_numpy(np.asarray(skies, dtype=np.float64))[:, None]
            hr = gaussian_blur(sky, self.config["hr_psf_fwhm"] / self.hr_pixel_scale)
            lr = self.operator(hr) * self.scale**2  # block sums: counts are conserved
        return hr[:, 0].numpy(), lr[:, 0].numpy()

    def _exposure(self, key: str, rng: np.random.Generator) -> float:
        low, high = self.config[key]
        return low if low == high else float(math.exp(rng.uniform(math.log(low), math.log(high))))

    def observe(
        self, hr_clean: np.ndarray, lr_clean: np.ndarray, rng: np.random.Generator
    ) -> SimulatedPair:
        """The observed LR and the HR target of one noiseless pair."""
        exposure = self._exposure("exposure_time", rng)
        lr = observe(lr_clean, exposure, self.config["background_rms"], rng)
        hr = hr_clean
        if self.config["hr_exposure_time"][1] > 0:
            exposure = self._exposure("hr_exposure_time", rng)
            hr = rng.poisson(np.maximum(hr_clean, 0.0) * exposure) / exposure
        return SimulatedPair(lr, hr, lr_clean)

    def render(
        self, kwargs_lens: list[dict], kwargs_source: list[dict], rng: np.random.Generator
    ) -> SimulatedPair:
        """The observed LR, the HR target and the noiseless LR, unnormalised."""
        (hr_clean,), (lr_clean,) = self.render_clean(self.sky(kwargs_lens, kwargs_source)[None])
        return self.observe(hr_clean, lr_clean, rng)

    def pair(self, rng: np.random.Generator) -> SimulatedPair:
        """One random pair, unnormalised."""
        kwargs_lens, kwargs_source = self.draw_parameters(rng)
        return self.render(kwargs_lens, kwargs_source, rng)

    def pairs(self, count: int, rng: np.random.Generator) -> list[SimulatedPair]:
        """``count`` random pairs, unnormalised, their PSF and binning done in one batch."""
        skies = np.stack([self.sky(*self.draw_parameters(rng)) for _ in range(count)])
        hr_clean, lr_clean = self.render_clean(skies)
        return [self.observe(hr, lr, rng) for hr, lr in zip(hr_clean, lr_clean)]


def split_rng(data_seed: int, split: str) -> np.random.Generator:
    """The random generator of one split; splits never share a seed."""
    return np.random.default_rng([data_seed, SPLIT_SEED_CODES[split]])


def normalized_pair(pair: SimulatedPair) -> tuple[np.ndarray, np.ndarray, float]:
    """(LR, HR) min-max normalised to [0, 1] and the LR image's noise RMS in those units."""
    low, span = float(pair.lr.min()), float(pair.lr.max() - pair.lr.min())
    lr = normalize_per_image(pair.lr[None])[0]
    clean = (pair.lr_clean - low) / span if span > 0 else np.zeros_like(pair.lr_clean)
    noise = float(np.sqrt(np.mean((lr - clean) ** 2)))
    return lr, normalize_per_image(pair.hr[None])[0], noise


def simulate_split(
    simulator: LensSimulator,
    count: int,
    rng: np.random.Generator,
    advance: Callable[[int], None] | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``count`` normalised pairs as float32 arrays (N, 1, h, w) and (N, 1, H, W), and each LR
    image's noise RMS (N,) in its normalised units."""
    lr = np.empty((count, 1, simulator.lr_size, simulator.lr_size), dtype=np.float32)
    hr = np.empty((count, 1, simulator.hr_size, simulator.hr_size), dtype=np.float32)
    noise = np.empty(count, dtype=np.float32)
    for start in range(0, count, SIMULATION_BATCH):
        batch = simulator.pairs(min(SIMULATION_BATCH, count - start), rng)
        for i, pair in enumerate(batch, start):
            lr[i, 0], hr[i, 0], noise[i] = normalized_pair(pair)
        if advance is not None:
            advance(len(batch))
    return lr, hr, noise


def split_parameters(
    simulator: LensSimulator, count: int, rng: np.random.Generator, wanted: int
) -> list[tuple[list[dict], list[dict]]]:
    """The lens and source keywords of the first ``wanted`` of the ``count`` pairs that
    :func:`simulate_split` makes from ``rng``, drawn again exactly as it draws them.

    A batch draws all its parameters before its noise, so the first batch costs no rendering;
    each earlier batch is rendered and observed again, because its noise advances ``rng``.
    """
    drawn: list[tuple[list[dict], list[dict]]] = []
    for start in range(0, min(wanted, count), SIMULATION_BATCH):
        batch = [simulator.draw_parameters(rng) for _ in range(min(SIMULATION_BATCH, count - start))]
        drawn.extend(batch)
        if len(drawn) >= wanted:
            break
        hr_clean, lr_clean = simulator.render_clean(np.stack([simulator.sky(*p) for p in batch]))
        for hr, lr in zip(hr_clean, lr_clean):
            simulator.observe(hr, lr, rng)
    return drawn[:wanted]


def simulate_dataset(
    config: dict[str, Any], counts: dict[str, int], data_seed: int, progress: bool = True
) -> dict[str, np.ndarray]:
    """Train/validation/test pairs: ``{"<split>_lr", "<split>_hr", "<split>_lr_noise"}``
    arrays, with a progress bar."""
    from rich.progress import Progress

    simulator = LensSimulator(config)
    arrays = {}
    total = sum(counts.values())
    with Progress(disable=not progress, transient=True) as bar:
        task = bar.add_task(f"simulating {total} lensed image pairs", total=total)
        for split in SPLITS:
            lr, hr, noise = simulate_split(
                simulator,
                counts[split],
                split_rng(data_seed, split),
                lambda n: bar.advance(task, n),
            )
            arrays[f"{split}_lr"], arrays[f"{split}_hr"] = lr, hr
            arrays[f"{split}_lr_noise"] = noise
    return arrays


# ---------------------------------------------------------------------------- user folders

SPLIT_FILE_NAMES = {
    "train": "train",
    "validation": "validation",
    "val": "validation",
    "test": "test",
}
NPY_SUFFIXES = (".npy",)
FITS_SUFFIXES = (".fits", ".fit", ".fts", ".fits.gz")
UNIT_RANGE_TOLERANCE = 0.1  # unnormalised folders: values within this of [0, 1] are clipped
# LR/LR_12.npy, HR/hr-0012.fits: a leading or trailing LR/HR tag around the pair's key
_SIDE_TAG = re.compile(
    r"^(?:lr|hr)[_\-. ]?(?P<head>.+)$|^(?P<tail>.+?)[_\-. ]?(?:lr|hr)$", re.IGNORECASE
)
# train_LR.npy, val_hr.fits: stacked splits directly in the folder
_STACK_NAME = re.compile(
    r"^(?P<split>train|validation|val|test)[_\-]?(?P<side>lr|hr)$", re.IGNORECASE
)


class PairFiles(NamedTuple):
    """One LR file and its HR partner; ``split`` for stacks, None for one image per file."""

    lr: Path
    hr: Path
    split: str | None


def _suffix(path: Path) -> str:
    name = path.name.lower()
    return next((s for s in (*NPY_SUFFIXES, *FITS_SUFFIXES) if name.endswith(s)), "")


def _stem(path: Path) -> str:
    return path.name[: len(path.name) - len(_suffix(path))]


def _data_files(folder: Path) -> list[Path]:
    """The .npy and FITS files directly in ``folder`` (hidden ones ignored), sorted."""
    return sorted(
        p for p in folder.iterdir() if p.is_file() and _suffix(p) and not p.name.startswith(".")
    )


def pair_key(path: Path) -> str:
    """What pairs an LR file with its HR partner: the name without its extension and without
    an LR/HR tag (``LR_12`` and ``HR_12`` give ``12``); a number is read as an integer, so
    ``LR_007`` pairs with ``HR_7``."""
    stem = _stem(path)
    match = _SIDE_TAG.match(stem)
    key = (match.group("head") or match.group("tail")) if match else stem
    return str(int(key)) if key.isdigit() else key


def _natural(key: str) -> tuple:
    return tuple(int(part) if part.isdigit() else part for part in re.split(r"(\d+)", key))


def _match_by_key(lr_files: list[Path], hr_files: list[Path], split: str | None) -> list[PairFiles]:
    lr_keys: dict[str, Path] = {}
    for path in lr_files:
        key = pair_key(path)
        if key in lr_keys:
            raise DataError(str(path), f"pairs under the same key {key!r} as {lr_keys[key]}")
        lr_keys[key] = path
    hr_keys: dict[str, Path] = {}
    for path in hr_files:
        key = pair_key(path)
        if key in hr_keys:
            raise DataError(str(path), f"pairs under the same key {key!r} as {hr_keys[key]}")
        if key not in lr_keys:
            raise DataError(str(path), f"has no LR partner (no LR file named like it, key {key!r})")
        hr_keys[key] = path
    for key, path in lr_keys.items():
        if key not in hr_keys:
            raise DataError(str(path), f"has no HR partner (no HR file named like it, key {key!r})")
    return [PairFiles(lr_keys[key], hr_keys[key], split) for key in sorted(lr_keys, key=_natural)]


def folder_pairs(folder: Path) -> list[PairFiles]:
    """The LR/HR file pairs of a data folder (DataError naming the file when one is missing).

    Layouts: ``LR/`` and ``HR/`` holding one image per file, paired by name (identical names,
    or ``LR_{i}`` / ``HR_{i}``, see :func:`pair_key`), or one stack per split
    (``train``, optional ``validation`` or ``val``, optional ``test``); or stacks directly in
    the folder: ``train_LR`` / ``train_HR`` (optional ``validation_*``, ``val_*``, ``test_*``).
    Files are ``.npy`` or FITS.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(str(folder), "no such folder (expected LR/ and HR/, or train_LR.npy and "
                        "train_HR.npy)")
    lr_dir, hr_dir = folder / "LR", folder / "HR"
    if lr_dir.is_dir() or hr_dir.is_dir():
        for sub in (lr_dir, hr_dir):
            if not sub.is_dir():
                raise DataError(str(sub), "missing folder; a data folder holds LR/ and HR/ with "
                                "matching files")
        lr_files, hr_files = _data_files(lr_dir), _data_files(hr_dir)
        if not lr_files:
            raise DataError(str(lr_dir), "contains no .npy or FITS files")
        stems = {_stem(p) for p in lr_files} | {_stem(p) for p in hr_files}
        if "train" in stems and stems <= set(SPLIT_FILE_NAMES):
            pairs = _match_by_key(lr_files, hr_files, None)
            return [pair._replace(split=SPLIT_FILE_NAMES[_stem(pair.lr)]) for pair in pairs]
        return _match_by_key(lr_files, hr_files, None)
    stacks: dict[tuple[str, str], Path] = {}
    for path in _data_files(folder):
        match = _STACK_NAME.match(_stem(path))
        if match:
            split = SPLIT_FILE_NAMES[match.group("split").lower()]
            side = match.group("side").upper()
            if (split, side) in stacks:
                raise DataError(str(path), f"a second {split} {side} stack beside "
                                f"{stacks[split, side]}")
            stacks[split, side] = path
    if ("train", "LR") not in stacks and ("train", "HR") not in stacks:
        raise DataError(str(folder), "holds neither LR/ and HR/ nor train_LR.npy and "
                        "train_HR.npy (.npy or FITS)")
    pairs = []
    for split in SPLITS:
        lr, hr = stacks.get((split, "LR")), stacks.get((split, "HR"))
        if lr is None and hr is None:
            continue
        if hr is None:
            raise DataError(str(lr), f"has no HR partner ({split}_HR.npy or FITS)")
        if lr is None:
            raise DataError(str(hr), f"has no LR partner ({split}_LR.npy or FITS)")
        pairs.append(PairFiles(lr, hr, split))
    return pairs


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
    """[path, size, mtime_ns] of every paired file: part of the cache key."""
    folder = Path(folder)
    return [
        [str(path.relative_to(folder)), path.stat().st_size, path.stat().st_mtime_ns]
        for pair in folder_pairs(folder)
        for path in (pair.lr, pair.hr)
    ]


def _read_fits(path: Path) -> np.ndarray:
    from astropy.io import fits

    try:
        with warnings.catch_warnings():  # a damaged header is reported below, in one line
            warnings.simplefilter("ignore", fits.verify.VerifyWarning)
            with fits.open(path, memmap=False) as hdus:
                for hdu in hdus:
                    if hdu.data is not None:
                        return np.asarray(hdu.data)
    except (OSError, ValueError, TypeError, IndexError, EOFError) as error:
        message = " ".join(str(error).split())
        raise DataError(str(path), f"unreadable FITS file ({message})") from None
    raise DataError(str(path), "FITS file without an image")


def read_array(path: Path) -> np.ndarray:
    """The array in a .npy or FITS file (the first HDU with data); DataError if unreadable."""
    if _suffix(path) in FITS_SUFFIXES:
        return _read_fits(path)
    try:
        return np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError, SyntaxError, TokenError) as error:
        # a corrupted header fails in numpy's header parser with SyntaxError or TokenError
        message = " ".join(str(error).split())
        raise DataError(str(path), f"unreadable .npy file ({message})") from None


def _load_array(path: Path, unit_range: bool, tolerance: float = 0.0) -> np.ndarray:
    """A file's real, finite array; with ``unit_range``, values must lie within ``tolerance``
    of [0, 1]."""
    array = read_array(path)
    if not np.issubdtype(array.dtype, np.number) or np.issubdtype(array.dtype, np.complexfloating):
        raise DataError(str(path), f"must hold real numbers, got dtype {array.dtype}")
    bad = int(np.size(array) - np.count_nonzero(np.isfinite(array)))
    if bad:
        raise DataError(str(path), f"contains {bad} non-finite values (NaN or inf)")
    if unit_range and array.size and (array.min() < -tolerance or array.max() > 1 + tolerance):
        allowed = f"[{-tolerance:g}, {1 + tolerance:g}]" if tolerance else "[0, 1]"
        raise DataError(
            str(path),
            f"values span [{array.min():.3g}, {array.max():.3g}], outside {allowed}; "
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
    """Validated raw (LR, HR) stacks by split, unnormalised, from a data folder (layouts: see
    :func:`folder_pairs`; one image per file all go to ``train``). Any problem raises
    DataError naming the file; with ``unit_range``, so does a value farther than
    :data:`UNIT_RANGE_TOLERANCE` outside [0, 1]."""
    pools: dict[str, tuple[list, list]] = {}
    first: tuple[Path, tuple[int, ...]] | None = None
    tolerance = UNIT_RANGE_TOLERANCE if unit_range else 0.0
    for pair in folder_pairs(folder):
        stacked = pair.split is not None
        lr = _as_images(pair.lr, _load_array(pair.lr, unit_range, tolerance), stacked)
        hr = _as_images(pair.hr, _load_array(pair.hr, unit_range, tolerance), stacked)
        if first is None:
            first = (pair.lr, lr.shape[1:])
        elif lr.shape[1:] != first[1]:
            raise DataError(
                str(pair.lr), f"LR shape {lr.shape[1:]} differs from {first[1]} of {first[0]}"
            )
        _check_pair(pair.lr, lr, pair.hr, hr, scale)
        pools.setdefault(pair.split or "train", ([], []))
        pools[pair.split or "train"][0].append(lr)
        pools[pair.split or "train"][1].append(hr)
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
    """Train/validation/test arrays from a user folder; missing splits are carved from train.
    Without ``normalize`` the values are kept as they are (:func:`clip_to_unit_range` clips
    those slightly outside [0, 1])."""
    pools = load_folder(folder, scale, unit_range=not normalize)
    if "train" not in pools:
        raise DataError(str(folder), "has no training pairs (train_LR / train_HR or LR/train)")
    train_lr, train_hr = pools["train"]
    rng = np.random.default_rng([seed, 0])
    for split, fraction in (("test", test_fraction), ("validation", validation_fraction)):
        if split in pools:
            continue
        count = max(1, round(fraction * len(train_lr)))
        if len(train_lr) - count < 1:
            raise DataError(
                str(folder),
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


def clip_to_unit_range(arrays: dict[str, np.ndarray]) -> int:
    """Clip every array to [0, 1] in place; returns how many values were outside."""
    outside = 0
    for array in arrays.values():
        outside += int(np.count_nonzero((array < 0) | (array > 1)))
        np.clip(array, 0.0, 1.0, out=array)
    return outside
