"""GalSim simulation of sheared galaxy stamps for the shear objective.

Each galaxy has a profile (exponential, Gaussian, Sérsic or bulge+disk), a half-light
radius and a flux drawn from uniform distributions, an optional intrinsic ellipticity,
and an applied reduced shear (g1, g2) drawn uniformly in the disk |g| <= shear_max: that
shear is the label. It is convolved with the PSF (Gaussian or Moffat, optionally
elliptical), drawn on a ``stamp_size`` grid of ``pixel_scale`` arcsec, and Gaussian pixel
noise of ``noise_sigma`` (in units of a unit-flux galaxy) is added.

Varied populations: the keys of :data:`RANGE_KEYS` take a number or a ``(low, high)`` range
(drawn per galaxy, uniformly; the noise sigma log-uniformly) and the keys of
:data:`MIX_KEYS` a name or a list of names (drawn per galaxy with equal odds);
``centroid_offset_pixels`` moves each galaxy off the stamp centre (uniform within ± that many
pixels along x and y); ``shear_fixed`` puts every galaxy at that |g|, half along g1 and half
along g2, instead of drawing it; ``shape_noise_pairs`` makes a paired test set of galaxies with
intrinsic shapes come in rings of four, each turned by 45 degrees from the last (shape-noise
cancellation: the errors of m and c drop from shape noise to measurement noise). Each varied key has its own random stream, so two populations
that differ in one key hold the same galaxies otherwise. :meth:`GalaxySimulation.for_galaxy`
gives one galaxy's own (scalar) simulation; with a varied PSF each galaxy's PSF image is
stored beside its stamp (``psf_images``).

Labels: the applied shear, or with intrinsic shapes the galaxy's sheared ellipticity (its
intrinsic shape composed with g: ShearNet's convention), so that a population's mean label is
its shear. The applied shear is stored as ``shear`` in both cases; m and c are measured
against it.

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

from lensnas.objectives.shear.metrics import RING
from lensnas.objectives.shear.reference import cpu_count

PROFILES = ("exponential", "gaussian", "sersic", "bulge_disk")
PSF_PROFILES = ("gaussian", "moffat")
SPLITS = ("train", "validation", "test")
RANGE_KEYS = ("psf_fwhm", "psf_beta", "psf_g1", "psf_g2", "sersic_index", "noise_sigma")
LOG_UNIFORM_KEYS = ("noise_sigma",)  # ranges drawn uniformly in log
MIX_KEYS = ("profile", "psf_profile")
PSF_KEYS = ("psf_profile", "psf_fwhm", "psf_beta", "psf_g1", "psf_g2")
# Per-galaxy parameters of a varied population, each from its own random stream (in this order).
VARIETY_STREAMS = (*MIX_KEYS, *RANGE_KEYS, "centroid_offset")
# Fields added after version 1 of the data: in a dataset's cache key only when not at these
# defaults, so that the datasets of earlier studies keep their keys.
LATER_DEFAULTS: dict[str, Any] = {"centroid_offset_pixels": 0.0, "shear_fixed": 0.0,
                                   "shape_noise_pairs": False}


@dataclass(frozen=True)
class GalaxySimulation:
    """Everything that defines a simulated galaxy population and how it is observed (angles
    and sizes in arcsec; a key of RANGE_KEYS may be a (low, high) range, one of MIX_KEYS a
    tuple of names)."""

    stamp_size: int = 53
    pixel_scale: float = 0.141
    profile: str | tuple[str, ...] = "exponential"
    sersic_index: float | tuple[float, float] = 1.0
    bulge_fraction: float = 0.3
    half_light_radius_min: float = 0.3
    half_light_radius_max: float = 0.8
    flux_min: float = 1.0
    flux_max: float = 1.0
    intrinsic_ellipticity_sigma: float = 0.0
    shear_max: float = 0.1
    psf_profile: str | tuple[str, ...] = "gaussian"
    psf_fwhm: float | tuple[float, float] = 0.9
    psf_beta: float | tuple[float, float] = 2.5
    psf_g1: float | tuple[float, float] = 0.0
    psf_g2: float | tuple[float, float] = 0.0
    noise_sigma: float | tuple[float, float] = 1e-5
    centroid_offset_pixels: float = 0.0
    shear_fixed: float = 0.0
    shape_noise_pairs: bool = False  # paired test sets: rings of 4 galaxies turned by 45 degrees

    def __post_init__(self) -> None:
        for key in (*RANGE_KEYS, *MIX_KEYS):  # lists (TOML arrays) become tuples: hashable
            value = getattr(self, key)
            if isinstance(value, list):
                object.__setattr__(self, key, tuple(value))

    def varied(self) -> tuple[str, ...]:
        """The keys drawn per galaxy (ranges and mixes)."""
        return tuple(key for key in (*MIX_KEYS, *RANGE_KEYS) if isinstance(getattr(self, key), tuple))

    @property
    def shape_noise_rings(self) -> bool:
        """Whether a paired test set of this simulation comes in rings of four (see
        :func:`rotated_rings`): shape_noise_pairs, on galaxies with intrinsic shapes."""
        return bool(self.shape_noise_pairs and self.intrinsic_ellipticity_sigma)

    @property
    def psf_varies(self) -> bool:
        """Whether galaxies have PSFs of their own (then each stamp has its PSF image)."""
        return any(key in PSF_KEYS for key in self.varied())

    def for_galaxy(self, population: dict[str, np.ndarray], index: int) -> GalaxySimulation:
        """The simulation of galaxy ``index`` of ``population``: its own drawn values."""
        values: dict[str, Any] = {}
        for key in self.varied():
            drawn = population[key][index]
            values[key] = getattr(self, key)[int(drawn)] if key in MIX_KEYS else float(drawn)
        return replace(self, **values) if values else self

    @property
    def typical_noise_sigma(self) -> float:
        """The noise sigma, or the geometric middle of its range."""
        if isinstance(self.noise_sigma, tuple):
            return float(np.sqrt(self.noise_sigma[0] * self.noise_sigma[1]))
        return float(self.noise_sigma)

    def psf(self) -> galsim.GSObject:
        """The PSF as a GalSim object (of one galaxy's simulation)."""
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
    """Draw per-galaxy parameters: size, flux, intrinsic shape and the applied shear, and the
    varied keys of the simulation (each from its own stream, see :data:`VARIETY_STREAMS`)."""
    radius = simulation.shear_max * np.sqrt(rng.uniform(0, 1, count))
    angle = rng.uniform(0, 2 * np.pi, count)
    shape = rng.normal(0, simulation.intrinsic_ellipticity_sigma, (count, 2))
    shape_norm = np.hypot(shape[:, 0], shape[:, 1])
    too_large = shape_norm > 0.9
    shape[too_large] *= (0.9 / shape_norm[too_large])[:, None]
    population = {
        "half_light_radius": rng.uniform(simulation.half_light_radius_min, simulation.half_light_radius_max, count),
        "flux": rng.uniform(simulation.flux_min, simulation.flux_max, count),
        "intrinsic_g": shape,
        "shear": np.stack([radius * np.cos(angle), radius * np.sin(angle)], axis=1),
    }
    if simulation.shear_fixed:  # along g1 and g2 by turns: a shape-noise ring shares one
        fixed = np.zeros((count, 2))
        turn = RING if simulation.shape_noise_rings else 2
        fixed[np.arange(count), (np.arange(count) // turn) % 2] = simulation.shear_fixed
        population["shear"] = fixed
    varied = simulation.varied()
    if varied or simulation.centroid_offset_pixels:
        population.update(_variety(simulation, rng, count))
    return population


def _variety(simulation: GalaxySimulation, rng: np.random.Generator, count: int
             ) -> dict[str, np.ndarray]:
    """The per-galaxy values of the varied keys and the centroid offsets (pixels)."""
    root = np.random.SeedSequence(int(rng.integers(2**63)))
    streams = {key: np.random.default_rng(np.random.SeedSequence(
        root.entropy, spawn_key=(index,))) for index, key in enumerate(VARIETY_STREAMS)}
    drawn: dict[str, np.ndarray] = {}
    for key in simulation.varied():
        value = getattr(simulation, key)
        if key in MIX_KEYS:
            drawn[key] = streams[key].integers(0, len(value), count)
        elif key in LOG_UNIFORM_KEYS:
            drawn[key] = np.exp(streams[key].uniform(np.log(value[0]), np.log(value[1]), count))
        else:
            drawn[key] = streams[key].uniform(value[0], value[1], count)
    if simulation.centroid_offset_pixels:
        limit = simulation.centroid_offset_pixels
        drawn["centroid_offset"] = streams["centroid_offset"].uniform(-limit, limit, (count, 2))
    return drawn


def sheared_ellipticity(intrinsic_g: np.ndarray, shear: np.ndarray) -> np.ndarray:
    """The reduced-shear ellipticity (N, 2) of galaxies of intrinsic shape ``intrinsic_g`` after
    the shear ``shear``: (e + g) / (1 + conj(g) e) in complex notation."""
    e = intrinsic_g[:, 0] + 1j * intrinsic_g[:, 1]
    g = shear[:, 0] + 1j * shear[:, 1]
    total = (e + g) / (1 + np.conj(g) * e)
    return np.stack([total.real, total.imag], axis=1)


def rotated_rings(population: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Shape-noise cancellation: galaxies 4k+1, 4k+2, 4k+3 become galaxy 4k (size, flux, shear,
    PSF, offset) turned by 45, 90 and 135 degrees, which multiplies its intrinsic ellipticity by
    i, -1 and -i. Within each ring the intrinsic shapes sum to zero (c of a ring is free of
    shape noise) and so do their squares (the second-order term -conj(g) e^2 of the sheared
    ellipticity, for m). A last incomplete ring is left as drawn."""
    ringed = {key: np.array(value) for key, value in population.items()}
    complete = RING * (len(ringed["flux"]) // RING)
    first = np.arange(0, complete, RING)
    for value in ringed.values():
        for turn in range(1, RING):
            value[first + turn] = value[first]
    shape = ringed["intrinsic_g"][first]
    complex_shape = shape[:, 0] + 1j * shape[:, 1]
    for turn in range(1, RING):
        turned = complex_shape * 1j**turn
        ringed["intrinsic_g"][first + turn] = np.stack([turned.real, turned.imag], axis=1)
    return ringed


def labels_of(simulation: GalaxySimulation, population: dict[str, np.ndarray]) -> np.ndarray:
    """What a network is trained to return (N, 2): the shear, or with intrinsic shapes the
    sheared ellipticity."""
    if simulation.intrinsic_ellipticity_sigma:
        return sheared_ellipticity(population["intrinsic_g"], population["shear"])
    return np.asarray(population["shear"])


def psf_images(simulation: GalaxySimulation, population: dict[str, np.ndarray],
               workers: int | None = None) -> np.ndarray:
    """Each galaxy's PSF drawn on the stamp grid, unit sum (N, H, W) float32, on ``workers``
    processes (default: every core this process may use) when there are several chunks."""
    count = len(population["flux"])
    starts = list(range(0, count, RENDER_CHUNK))
    workers = min(workers or cpu_count(), len(starts))
    if workers <= 1:
        return _psf_chunk(simulation, population)
    out = np.empty((count, simulation.stamp_size, simulation.stamp_size), dtype=np.float32)
    with ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context()) as pool:
        futures = {pool.submit(_psf_chunk, simulation, {k: v[start:start + RENDER_CHUNK]
                                                        for k, v in population.items()}): start
                   for start in starts}
        for future in as_completed(futures):
            start = futures[future]
            out[start:start + RENDER_CHUNK] = future.result()
    return out


def _psf_chunk(simulation: GalaxySimulation, population: dict[str, np.ndarray]) -> np.ndarray:
    """The PSF images of galaxies one by one in this process (see :func:`psf_images`)."""
    size = simulation.stamp_size
    out = np.empty((len(population["flux"]), size, size), dtype=np.float32)
    for i in range(len(out)):
        out[i] = simulation.for_galaxy(population, i).psf_image()
    return out


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
    psf = None if simulation.varied() else simulation.psf()
    size, scale = simulation.stamp_size, simulation.pixel_scale
    images = np.empty((len(population["flux"]), size, size), dtype=np.float32)
    for i in range(len(images)):
        own = simulation.for_galaxy(population, i)
        galaxy = own.sheared_galaxy(
            population["half_light_radius"][i], population["flux"][i],
            population["intrinsic_g"][i], shear_sign * population["shear"][i],
        )
        if "centroid_offset" in population:
            galaxy = galaxy.shift(*(float(v) * scale for v in population["centroid_offset"][i]))
        drawn = galsim.Convolve(galaxy, psf or own.psf()).drawImage(nx=size, ny=size, scale=scale)
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
    if paired and simulation.shape_noise_rings:
        population = rotated_rings(population)
    noise = pixel_noise(simulation, population, noise_seed)
    split = {
        "images": render(simulation, population, noise, +1.0, on_progress),
        **population,
        "labels": labels_of(simulation, population).astype(np.float32),
    }
    if simulation.psf_varies:
        split["psf_images"] = psf_images(simulation, population)
    if paired:
        split["images_minus"] = render(simulation, population, noise, -1.0, on_progress)
    return split


PER_STAMP_ARRAYS = ("images", "images_minus", "labels", "psf_images")  # not drawn parameters


def wide_stamps(simulation: GalaxySimulation, split: dict[str, np.ndarray], wide_size: int,
                seed: int) -> dict[str, np.ndarray]:
    """A paired split's stamps on a larger ``wide_size`` grid (for metacal, whose shear moves
    flux across a stamp's edge): the same galaxies rendered there, the split's own stamps (with
    their noise) pasted in the centre, fresh noise of each galaxy's sigma around them (seeded by
    ``seed``, the same at +g and -g); "images", "images_minus" and the PSF on that grid
    ("psf_images": (S, S), or (N, S, S) where the PSF varies)."""
    size = simulation.stamp_size
    if wide_size < size or (wide_size - size) % 2:
        raise ValueError(f"wide_size must be at least the stamp size {size} and differ from it by "
                         f"an even number, got {wide_size}")
    wide = replace(simulation, stamp_size=wide_size)
    population = {key: value for key, value in split.items() if key not in PER_STAMP_ARRAYS}
    count = len(split["images"])
    sigma = np.broadcast_to(np.asarray(split.get("noise_sigma", simulation.typical_noise_sigma),
                                       dtype=np.float64), (count,))
    noise = np.random.default_rng(seed).normal(0, 1, (count, wide_size, wide_size)) * sigma[:, None, None]
    low = (wide_size - size) // 2
    centre = (slice(None), slice(low, low + size), slice(low, low + size))
    noise[centre] = 0
    out: dict[str, np.ndarray] = {}
    for name, sign in (("images", 1.0), ("images_minus", -1.0)):
        out[name] = render(wide, population, noise, sign)
        out[name][centre] = split[name]
    out["psf_images"] = psf_images(wide, population) if simulation.psf_varies else wide.psf_image()
    return out


def pixel_noise(simulation: GalaxySimulation, population: dict[str, np.ndarray],
                noise_seed: np.random.SeedSequence) -> np.ndarray:
    """The pixel noise of every stamp (N, H, W): each galaxy's own sigma where it varies."""
    size, count = simulation.stamp_size, len(population["flux"])
    rng = np.random.default_rng(noise_seed)
    if "noise_sigma" in population:
        return rng.normal(0, 1, (count, size, size)) * population["noise_sigma"][:, None, None]
    return rng.normal(0, simulation.noise_sigma, (count, size, size))


def simulate(
    simulation: GalaxySimulation,
    counts: dict[str, int],
    seed: int,
    on_progress: Callable[[int], None] | None = None,
) -> dict[str, np.ndarray]:
    """All splits as flat ``"<split>.<array>"`` entries, plus the PSF image (when all galaxies
    share it; otherwise each split's ``psf_images``).

    The test split is paired (rendered at +g and -g with the same noise).
    """
    children = split_seeds(seed)
    arrays: dict[str, np.ndarray] = {}
    if not simulation.psf_varies:
        arrays["psf_image"] = simulation.psf_image()
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
    """A JSON-serialisable description (what the cache key is made of); fields added after
    version 1 appear only when set, and the label convention only with intrinsic shapes."""
    config = asdict(simulation)
    for key, default in LATER_DEFAULTS.items():
        if config[key] == default:
            del config[key]
    if simulation.intrinsic_ellipticity_sigma:
        config["labels"] = "sheared_ellipticity"
    if simulation.shape_noise_rings:  # rings of four since December 2026 (pairs before)
        config["shape_noise_ring"] = RING
    return config


def noiseless_images(simulation: GalaxySimulation, images: np.ndarray, seed: int, split: str,
                     chunk: int = 4096, noise_sigma: np.ndarray | None = None) -> np.ndarray:
    """A split's images without their pixel noise: the same noise drawn again from the split's
    seed (as :func:`simulate_split` drew it) and subtracted, in float32; ``noise_sigma``: each
    galaxy's sigma where it varies."""
    _, noise_seed = split_seeds(seed)[split].spawn(2)
    rng = np.random.default_rng(noise_seed)
    size = simulation.stamp_size
    out = np.empty(images.shape, dtype=np.float32)
    for start in range(0, len(images), chunk):
        stop = min(start + chunk, len(images))
        if noise_sigma is None:
            noise = rng.normal(0, simulation.noise_sigma, (stop - start, size, size))
        else:
            noise = rng.normal(0, 1, (stop - start, size, size)) * noise_sigma[start:stop, None, None]
        out[start:stop] = images[start:stop] - noise
    return out
