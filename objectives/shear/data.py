"""GalSim simulation of sheared galaxy stamps for the shear objective.

Each galaxy has a profile (exponential, Gaussian, Sérsic or bulge+disk), a half-light
radius and a flux drawn from uniform distributions, an optional intrinsic ellipticity,
and an applied reduced shear (g1, g2) drawn uniformly in the disk |g| <= shear_max: that
shear is the label. It is convolved with the PSF (Gaussian or Moffat, optionally
elliptical), drawn on a ``stamp_size`` grid of ``pixel_scale`` arcsec, and Gaussian pixel
noise of ``noise_sigma`` (in units of a unit-flux galaxy) is added.

Train, validation and test come from independent child seeds of the data seed
(``numpy.random.SeedSequence(seed).spawn``): disjoint populations, no test galaxy is a
rendering of a training galaxy. The test split is also rendered at -g with the same
noise (``images_minus``) for the noise-cancelling paired bias protocol.
"""

from __future__ import annotations

import multiprocessing
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, replace
from typing import Any

import galsim
import numpy as np

from lensnas.objectives.shear.reference import cpu_count

PROFILES = ("exponential", "gaussian", "sersic", "bulge_disk")
PSF_PROFILES = ("gaussian", "moffat")
SPLITS = ("train", "validation", "test")


@dataclass(frozen=True)
class GalaxySimulation:
    """Everything that defines a simulated galaxy population and how it is observed."""

    stamp_size: int = 53
    pixel_scale: float = 0.141
    profile: str = "exponential"
    sersic_index: float = 1.0
    bulge_fraction: float = 0.3
    half_light_radius_min: float = 0.3
    half_light_radius_max: float = 0.8
    flux_min: float = 1.0
    flux_max: float = 1.0
    intrinsic_ellipticity_sigma: float = 0.0
    shear_max: float = 0.1
    psf_profile: str = "gaussian"
    psf_fwhm: float = 0.9
    psf_beta: float = 2.5
    psf_g1: float = 0.0
    psf_g2: float = 0.0
    noise_sigma: float = 1e-5

    def psf(self) -> galsim.GSObject:
        """The PSF as a GalSim object."""
        if self.psf_profile == "moffat":
            psf = galsim.Moffat(beta=self.psf_beta, fwhm=self.psf_fwhm)
        else:
            psf = galsim.Gaussian(fwhm=self.psf_fwhm)
        if self.psf_g1 or self.psf_g2:
            psf = psf.shear(g1=self.psf_g1, g2=self.psf_g2)
        return psf

    def psf_image(self) -> np.ndarray:
        """The PSF drawn on the stamp grid (including the pixel response), unit sum."""
        image = self.psf().drawImage(nx=self.stamp_size, ny=self.stamp_size, scale=self.pixel_scale)
        return (image.array / image.array.sum()).astype(np.float32)

    def galaxy(self, half_light_radius: float, flux: float) -> galsim.GSObject:
        """An unsheared galaxy of the configured profile."""
        if self.profile == "gaussian":
            return galsim.Gaussian(half_light_radius=half_light_radius, flux=flux)
        if self.profile == "sersic":
            return galsim.Sersic(n=self.sersic_index, half_light_radius=half_light_radius, flux=flux)
        if self.profile == "bulge_disk":
            bulge = galsim.DeVaucouleurs(half_light_radius=0.5 * half_light_radius)
            disk = galsim.Exponential(half_light_radius=half_light_radius)
            mix = self.bulge_fraction * bulge + (1 - self.bulge_fraction) * disk
            return mix.withFlux(flux)
        return galsim.Exponential(half_light_radius=half_light_radius, flux=flux)

    def sheared_galaxy(
        self, half_light_radius: float, flux: float, intrinsic_g: Any, shear: Any
    ) -> galsim.GSObject:
        """A galaxy with its intrinsic shape (g1, g2), then the applied shear (g1, g2)."""
        galaxy = self.galaxy(float(half_light_radius), float(flux))
        if intrinsic_g[0] or intrinsic_g[1]:
            galaxy = galaxy.shear(g1=float(intrinsic_g[0]), g2=float(intrinsic_g[1]))
        return galaxy.shear(g1=float(shear[0]), g2=float(shear[1]))


def metacal_benchmark_simulation(noise_sigma: float = 1e-5, stamp_size: int = 53) -> GalaxySimulation:
    """The galaxies the reference numbers were measured on (NGMix 2.4.2): round exponential,
    half-light radius 0.5", Moffat PSF (beta 2.5, FWHM 0.9"), 0.2"/pixel, |g| <= 0.1."""
    return GalaxySimulation(
        stamp_size=stamp_size,
        pixel_scale=0.2,
        profile="exponential",
        half_light_radius_min=0.5,
        half_light_radius_max=0.5,
        shear_max=0.1,
        psf_profile="moffat",
        psf_beta=2.5,
        psf_fwhm=0.9,
        noise_sigma=noise_sigma,
    )


def draw_population(
    simulation: GalaxySimulation, rng: np.random.Generator, count: int
) -> dict[str, np.ndarray]:
    """Draw per-galaxy parameters: size, flux, intrinsic shape and the applied shear."""
    radius = simulation.shear_max * np.sqrt(rng.uniform(0, 1, count))
    angle = rng.uniform(0, 2 * np.pi, count)
    shape = rng.normal(0, simulation.intrinsic_ellipticity_sigma, (count, 2))
    shape_norm = np.hypot(shape[:, 0], shape[:, 1])
    too_large = shape_norm > 0.9
    shape[too_large] *= (0.9 / shape_norm[too_large])[:, None]
    return {
        "half_light_radius": rng.uniform(simulation.half_light_radius_min, simulation.half_light_radius_max, count),
        "flux": rng.uniform(simulation.flux_min, simulation.flux_max, count),
        "intrinsic_g": shape,
        "shear": np.stack([radius * np.cos(angle), radius * np.sin(angle)], axis=1),
    }


RENDER_CHUNK = 512  # galaxies per task when rendering in parallel


def render(
    simulation: GalaxySimulation,
    population: dict[str, np.ndarray],
    noise: np.ndarray,
    shear_sign: float = 1.0,
    on_progress: Callable[[int], None] | None = None,
    workers: int | None = None,
) -> np.ndarray:
    """Render every galaxy of ``population`` with shear ``shear_sign * g`` plus ``noise``, on
    ``workers`` processes (default: every core this process may use) when there are several
    chunks; the result does not depend on the number of workers."""
    count = len(population["flux"])
    starts = list(range(0, count, RENDER_CHUNK))
    workers = min(workers or cpu_count(), len(starts))
    if workers <= 1:
        return _render_chunk(simulation, population, noise, shear_sign, on_progress)
    images = np.empty((count, simulation.stamp_size, simulation.stamp_size), dtype=np.float32)

    def chunk(start: int) -> tuple[dict[str, np.ndarray], np.ndarray]:
        stop = start + RENDER_CHUNK
        return {k: v[start:stop] for k, v in population.items()}, noise[start:stop]

    with ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context()) as pool:
        futures = {pool.submit(_render_chunk, simulation, *chunk(start), shear_sign): start
                   for start in starts}
        for future in as_completed(futures):
            start = futures[future]
            images[start : start + RENDER_CHUNK] = future.result()
            if on_progress is not None:
                on_progress(min(RENDER_CHUNK, count - start))
    return images


def _render_chunk(
    simulation: GalaxySimulation,
    population: dict[str, np.ndarray],
    noise: np.ndarray,
    shear_sign: float = 1.0,
    on_progress: Callable[[int], None] | None = None,
) -> np.ndarray:
    """Render galaxies one by one in this process (see :func:`render`)."""
    psf = simulation.psf()
    size, scale = simulation.stamp_size, simulation.pixel_scale
    images = np.empty((len(population["flux"]), size, size), dtype=np.float32)
    for i in range(len(images)):
        galaxy = simulation.sheared_galaxy(
            population["half_light_radius"][i], population["flux"][i],
            population["intrinsic_g"][i], shear_sign * population["shear"][i],
        )
        drawn = galsim.Convolve(galaxy, psf).drawImage(nx=size, ny=size, scale=scale)
        images[i] = drawn.array + noise[i]
        if on_progress is not None:
            on_progress(1)
    return images


def simulate_split(
    simulation: GalaxySimulation,
    seed_sequence: np.random.SeedSequence,
    count: int,
    paired: bool = False,
    on_progress: Callable[[int], None] | None = None,
) -> dict[str, np.ndarray]:
    """One split: images (N, H, W), labels (N, 2) and per-galaxy parameters.

    With ``paired``, also ``images_minus``: the same galaxies and noise at -g.
    """
    population_seed, noise_seed = seed_sequence.spawn(2)
    population = draw_population(simulation, np.random.default_rng(population_seed), count)
    size = simulation.stamp_size
    noise = np.random.default_rng(noise_seed).normal(0, simulation.noise_sigma, (count, size, size))
    split = {
        "images": render(simulation, population, noise, +1.0, on_progress),
        "labels": population["shear"].astype(np.float32),
        "half_light_radius": population["half_light_radius"],
        "flux": population["flux"],
        "intrinsic_g": population["intrinsic_g"],
    }
    if paired:
        split["images_minus"] = render(simulation, population, noise, -1.0, on_progress)
    return split


def simulate(
    simulation: GalaxySimulation,
    counts: dict[str, int],
    seed: int,
    on_progress: Callable[[int], None] | None = None,
) -> dict[str, np.ndarray]:
    """All splits as flat ``"<split>.<array>"`` entries, plus the PSF image.

    The test split is paired (rendered at +g and -g with the same noise).
    """
    children = split_seeds(seed)
    arrays: dict[str, np.ndarray] = {"psf_image": simulation.psf_image()}
    for split in SPLITS:
        data = simulate_split(simulation, children[split], counts[split], split == "test", on_progress)
        arrays.update({f"{split}.{name}": value for name, value in data.items()})
    return arrays


def split_seeds(seed: int) -> dict[str, np.random.SeedSequence]:
    """The seed of each split: disjoint populations and noise, reproducible from ``seed``."""
    return dict(zip(SPLITS, np.random.SeedSequence(seed).spawn(len(SPLITS))))


def simulate_test_at_noise(
    simulation: GalaxySimulation, count: int, seed: int, noise_sigma: float,
    on_progress: Callable[[int], None] | None = None,
) -> dict[str, np.ndarray]:
    """The test split of :func:`simulate` (same galaxies, same noise realisation) with the noise
    scaled to ``noise_sigma``: the same test set at another noise level."""
    return simulate_split(replace(simulation, noise_sigma=noise_sigma), split_seeds(seed)["test"], count,
                          paired=True, on_progress=on_progress)


def simulation_config(simulation: GalaxySimulation) -> dict[str, Any]:
    """A JSON-serialisable description (what the cache key is made of)."""
    return asdict(simulation)


def noiseless_images(simulation: GalaxySimulation, images: np.ndarray, seed: int, split: str,
                     chunk: int = 4096) -> np.ndarray:
    """A split's images without their pixel noise: the same noise drawn again from the split's
    seed (as :func:`simulate_split` drew it) and subtracted, in float32."""
    _, noise_seed = split_seeds(seed)[split].spawn(2)
    rng = np.random.default_rng(noise_seed)
    size = simulation.stamp_size
    out = np.empty(images.shape, dtype=np.float32)
    for start in range(0, len(images), chunk):
        stop = min(start + chunk, len(images))
        noise = rng.normal(0, simulation.noise_sigma, (stop - start, size, size))
        out[start:stop] = images[start:stop] - noise
    return out
