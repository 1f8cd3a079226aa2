"""The weak-lensing shear objective: a CNN regresses (g1, g2) from GalSim galaxy stamps."""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import logging
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from lensnas.objectives.base import (
    Baseline,
    Metric,
    Objective,
    ReferenceErrors,
    ReportSection,
    TrialContext,
    TrialRecord,
    ValidationScore,
)
from lensnas.objectives.cache import cached_arrays, config_hash
from lensnas.objectives.diagnostics import shear_residual_figure
from lensnas.objectives.options import check_options, require
from lensnas.objectives.shear.bound import ShearBound, bound_baseline, cached_bound
from lensnas.objectives.shear.calibration import cached_metacal_images, calibrated, network_response
from lensnas.objectives.shear.data import (
    LOG_UNIFORM_KEYS,
    MIX_KEYS,
    PROFILES,
    PSF_PROFILES,
    RANGE_KEYS,
    SPLITS,
    GalaxySimulation,
    noiseless_images,
    simulate,
    simulate_split,
    simulate_test_at_noise,
    simulation_config,
    split_seeds,
    wide_stamps,
)
from lensnas.objectives.shear.metacal import TARGET_PSFS
from lensnas.objectives.shear.metrics import (
    Bias,
    psf_leakage,
    response_matched_bias,
    rmse,
    shear_metrics,
    worst_bias,
)
from lensnas.objectives.shear.ngmix_backend import INSTALL_HINT
from lensnas.objectives.shear.reference import cached_measure, is_available
from lensnas.objectives.training import REGRESSION_LOSSES, predict
from lensnas.spaces.d4 import random_transform
from lensnas.spaces.dimensions import SpaceError, closest
from lensnas.spaces.shear.cnn import SHEAR_CNN

logger = logging.getLogger("lensnas.shear")

SIMULATION_DEFAULTS = {f.name: f.default for f in dataclasses.fields(GalaxySimulation)}
# What a test population may change: any simulation key but the stamp size (the network's input).
POPULATION_KEYS = tuple(key for key in SIMULATION_DEFAULTS if key != "stamp_size")
PAIRS = "pairs"  # a population's own count of +g/-g pairs (default: n_test), e.g. for noisy ones
MAX_PAIRS = 1_000_000
POPULATIONS = "populations"  # trial attribute: {population name: its metrics}
TRAINING_POPULATION = "training"  # the name of the study's own test set among the populations
POPULATION_METRICS = ("rmse", "m1", "m1_err", "m2", "m2_err", "c1", "c1_err", "c2", "c2_err",
                      "abs_m", "abs_c")
MIX_CHOICES = {"profile": PROFILES, "psf_profile": PSF_PROFILES}
CALIBRATIONS = ("none", "metacal")
CALIBRATED = "cal_"  # prefix of the metrics of the network calibrated by its metacal response
METACAL_STEP = 0.01
REFERENCES = ("none", "metacal", "hsm", "ngmix")
RELATIVE_METRICS = ("rmse_ratio", "rmse_ratio_object", "abs_m_diff", "ref_rmse_over_crb",
                    "ref_object_rmse_over_crb")
BOUND_METRICS = ("rmse_over_crb", "ref_rmse_over_crb", "ref_object_rmse_over_crb")  # need noise > 0
NOISE_LEVELS = "noise_levels"  # trial attribute: {noise sigma: {metric: value}}


class StampInputs:
    """Array-like (N, C, H, W) view of (N, H, W) stamps, optionally with the PSF image as
    channel 1: one (H, W) for every stamp, or each stamp's own (N, H, W)."""

    def __init__(self, images: np.ndarray, psf_image: np.ndarray | None = None):
        self.images = images
        self.psf_image = psf_image

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: np.ndarray) -> np.ndarray:
        stamps = np.asarray(self.images[index], dtype=np.float32)[:, None]
        if self.psf_image is None:
            return stamps
        psf = self.psf_image if self.psf_image.ndim == 2 else self.psf_image[index]
        psf = np.broadcast_to(np.asarray(psf, dtype=np.float32)[..., None, :, :] if psf.ndim == 3
                              else psf, stamps.shape)
        return np.concatenate([stamps, psf], axis=1)


@dataclasses.dataclass(frozen=True)
class TestPopulation:
    """A named test population: the study's test galaxies with some simulation keys changed,
    rendered at +g and -g (``arrays``: images, images_minus, labels, shear, psf_images, ...)."""

    name: str
    simulation: GalaxySimulation
    arrays: dict[str, np.ndarray]
    key: str  # content hash of its configuration (its cache key)

    def psf(self) -> np.ndarray:
        """Each galaxy's PSF image where the PSF varies, else the population's one PSF image."""
        if "psf_images" in self.arrays:
            return self.arrays["psf_images"]
        return self.simulation.psf_image()

    def psf_g(self) -> np.ndarray:
        """Each galaxy's PSF ellipticity (N, 2)."""
        count = len(self.arrays["labels"])
        return np.stack([np.broadcast_to(np.asarray(
            self.arrays.get(key, getattr(self.simulation, key)), dtype=np.float64), (count,))
            for key in ("psf_g1", "psf_g2")], axis=1)


def _check_varied(value: Any, key: str, where: str) -> Any:
    """A range [low, high] (RANGE_KEYS) or a mix of names (MIX_KEYS) as a tuple; SpaceError
    naming ``where`` otherwise."""
    if key in MIX_KEYS:
        allowed = MIX_CHOICES[key]
        require(len(value) > 0 and all(v in allowed for v in value) and len(set(value)) == len(value),
                where, f"must be one of {', '.join(allowed)} or a list of distinct ones, got {value!r}")
        return tuple(value)
    require(len(value) == 2 and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value),
            where, f"must be a number or a range [low, high], got {value!r}")
    low, high = (float(v) for v in value)
    require(low <= high, where, f"impossible range: low {low:g} > high {high:g}")
    if key in LOG_UNIFORM_KEYS:
        require(low > 0, where, f"a range is drawn log-uniformly: low must be > 0, got {low:g}")
    return (low, high)


def _lowest(value: Any) -> float:
    return min(value) if isinstance(value, tuple) else value


def _check_simulation(table: dict[str, Any], prefix: str) -> dict[str, Any]:
    """Validated simulation keys (defaults filled in); ranges and mixes as tuples."""
    table = dict(table)
    varied = {key: table.pop(key) for key in (*RANGE_KEYS, *MIX_KEYS)
              if isinstance(table.get(key), (list, tuple))}
    options = check_options(table, SIMULATION_DEFAULTS, prefix)
    for key, value in varied.items():
        options[key] = _check_varied(value, key, f"{prefix}.{key}")
    require(8 <= options["stamp_size"] <= 512, f"{prefix}.stamp_size", f"must be in 8..512, got {options['stamp_size']}")
    for key in ("pixel_scale", "psf_fwhm", "half_light_radius_min", "flux_min", "sersic_index"):
        require(_lowest(options[key]) > 0, f"{prefix}.{key}", f"must be positive, got {options[key]}")
    require(_lowest(options["noise_sigma"]) >= 0, f"{prefix}.noise_sigma", f"must be >= 0, got {options['noise_sigma']}")
    for low, high in (("half_light_radius_min", "half_light_radius_max"), ("flux_min", "flux_max")):
        require(options[low] <= options[high], f"{prefix}.{high}", f"impossible range: {low}={options[low]} > {high}={options[high]}")
    require(0 <= options["shear_max"] < 1, f"{prefix}.shear_max", f"must be in [0, 1), got {options['shear_max']}")
    require(0 <= options["shear_fixed"] < 1, f"{prefix}.shear_fixed", f"must be in [0, 1) (0: shears drawn in |g| <= shear_max), got {options['shear_fixed']}")
    require(0 <= options["bulge_fraction"] <= 1, f"{prefix}.bulge_fraction", "must be in [0, 1]")
    require(_lowest(options["psf_beta"]) > 1.1, f"{prefix}.psf_beta", f"must be > 1.1, got {options['psf_beta']}")
    for key in ("psf_g1", "psf_g2"):
        value = options[key]
        require(all(abs(v) < 0.5 for v in (value if isinstance(value, tuple) else (value,))),
                f"{prefix}.{key}", f"must be in (-0.5, 0.5), got {value}")
    require(0 <= options["intrinsic_ellipticity_sigma"] < 1, f"{prefix}.intrinsic_ellipticity_sigma", "must be in [0, 1) (0.26 is typical of real galaxies)")
    require(0 <= options["centroid_offset_pixels"] <= options["stamp_size"] / 4, f"{prefix}.centroid_offset_pixels",
            f"must be in 0..stamp_size/4 pixels, got {options['centroid_offset_pixels']}")
    for key, allowed in (("profile", PROFILES), ("psf_profile", PSF_PROFILES)):
        require(isinstance(options[key], tuple) or options[key] in allowed, f"{prefix}.{key}",
                f"must be one of {', '.join(allowed)} (or a list of them), got {options[key]!r}")
    return options


def _bias_metrics(prefix: str, what: str) -> dict[str, Metric]:
    return {
        f"{prefix}{kind}{i}": Metric(None, f"{label} of g{i} ({what})", summary=not prefix)
        for kind, label in (("m", "multiplicative bias"), ("c", "additive bias"))
        for i in (1, 2)
    }


class ShearObjective(Objective):
    """Train a shear CNN on simulated galaxies; score it on RMSE and m/c of a held-out test set."""

    name = "shear"
    family = SHEAR_CNN
    OPTIONS: ClassVar[dict[str, Any]] = {
        "n_train": 2000,
        "n_validation": 500,
        "n_test": 1000,
        "psf_channel": False,
        "reference": "metacal",
        "test_noise_levels": [],  # the test set again at these noise sigmas (network and reference)
        "test_populations": {},  # name -> simulation keys changed: the test galaxies again, changed
        "calibration": "none",  # "metacal": also score the network calibrated by its response
        # metacal's images come from stamps this wide, cropped to stamp_size (0: stamp_size +
        # 2 * (stamp_size // 4), 79 around 53): a sheared stamp's edge must not reach the crop
        "calibration_stamp_size": 0,
        # metacal's reconvolution PSF: "gauss" (round, NGMix's default) removes the PSF's
        # anisotropy from the calibrated images, "dilate" keeps it (PSF leakage stays)
        "calibration_psf": "gauss",
        **SIMULATION_DEFAULTS,
    }
    METRICS: ClassVar[dict[str, Metric]] = {
        "rmse": Metric("minimize", "RMSE of (g1, g2) per test galaxy", summary=True),
        **_bias_metrics("", "paired +g/-g protocol, jackknife error"),
        "rmse_ratio": Metric(
            "minimize", "network RMSE / reference RMSE (reference calibrated by the mean "
            "response of the test set)", summary=True),
        "rmse_ratio_object": Metric(
            "minimize", "network RMSE / reference RMSE (each galaxy calibrated by its own "
            "response)", summary=True),
        "rmse_g1": Metric("minimize", "RMSE of g1 per test galaxy"),
        "rmse_g2": Metric("minimize", "RMSE of g2 per test galaxy"),
        "abs_m": Metric("minimize", "largest |m| of the two components"),
        "abs_c": Metric("minimize", "largest |c| of the two components"),
        "abs_m_diff": Metric("minimize", "|m| of the network minus |m| of the reference"),
        "crb_rmse": Metric(
            "minimize", "Cramér-Rao bound: RMS over test galaxies and both components of the "
            "smallest RMSE of g an unbiased estimator can reach at this noise"),
        "rmse_over_crb": Metric(
            "minimize", "network RMSE / Cramér-Rao bound (1 is the physical limit)", summary=True),
        "ref_rmse_over_crb": Metric(
            "minimize", "reference RMSE (mean response) / Cramér-Rao bound"),
        "ref_object_rmse_over_crb": Metric(
            "minimize", "reference RMSE (each galaxy's own response) / Cramér-Rao bound"),
        **_bias_metrics("linear_", "straight-line fit of estimate against truth"),
        "worst_abs_m": Metric(
            "minimize", "largest |m| of either component over the test populations (the "
            "study's own test set where it declares none; paired; its jackknife error in "
            "worst_abs_m_err)"),
        "worst_abs_c": Metric(
            "minimize", "largest |c| of either component over the test populations (the "
            "study's own test set where it declares none)"),
        "cal_rmse": Metric(
            "minimize", "RMSE of g per test galaxy of the network calibrated by its mean response "
            "to metacal's sheared images (calibration = \"metacal\")", summary=True),
        "cal_rmse_over_crb": Metric("minimize", "cal_rmse / Cramér-Rao bound"),
        "cal_object_rmse": Metric(
            "minimize", "RMSE of g per test galaxy, each calibrated by its own response"),
        **_bias_metrics(CALIBRATED, "network calibrated by its mean metacal response, paired"),
        "cal_abs_m": Metric("minimize", "largest |m| of the calibrated network"),
        "cal_abs_c": Metric("minimize", "largest |c| of the calibrated network"),
        "cal_worst_abs_m": Metric(
            "minimize", "worst_abs_m of the network calibrated by its metacal response"),
        "cal_worst_abs_c": Metric(
            "minimize", "worst_abs_c of the network calibrated by its metacal response"),
        "validation_score": Metric("minimize", "best per-epoch validation RMSE of g"),
        "n_params": Metric("minimize", "trainable parameters"),
        "train_seconds": Metric("minimize", "training time in seconds"),
    }
    DEFAULT_METRIC = "rmse"
    VALIDATION_SCORE = ValidationScore("validation RMSE of g", "minimize", "rmse")
    BASELINE_COLUMNS = ("rmse_g1", "rmse_g2", "object_rmse", "n_failed", "galaxies_per_core_second")
    BASELINE_GROUPS: ClassVar[dict[str, tuple[str, str]]] = {
        "ensemble": (
            "Ensemble estimators (mean response)",
            ("Calibrated by the mean response of the whole test set, as surveys calibrate "
            "shear catalogues: right on average over many galaxies, so their m and c are the "
            "ensemble biases; their per-galaxy RMSE includes the spread of responses between "
            "galaxy sizes, so it is not the comparison for a per-galaxy network."),
        ),
    }

    def setup(self) -> None:
        self.simulation = GalaxySimulation(**{k: self.options[k] for k in SIMULATION_DEFAULTS})
        self.counts = {split: self.options[f"n_{split}"] for split in SPLITS}
        self.reference_estimate: np.ndarray | None = None
        self.bound: ShearBound | None = None
        self.noise_tests: dict[float, dict[str, np.ndarray]] = {}
        self.populations: dict[str, TestPopulation] = {}
        # population name -> metacal's images of its stamps at +g and at -g (calibration)
        self.metacal_sets: dict[str, tuple[dict[str, np.ndarray], dict[str, np.ndarray]]] = {}
        self.input_scale = 1.0
        self._test_estimate: np.ndarray | None = None
        self._noiseless: np.ndarray | None = None

    @classmethod
    def check_options(cls, table: dict[str, Any], prefix: str = "objective") -> dict[str, Any]:
        """Validated ``[objective]`` options (defaults filled in)."""
        if not isinstance(table, dict):
            require(False, prefix, f"must be a table, got {type(table).__name__}")
        simulation = {key: value for key, value in table.items() if key in SIMULATION_DEFAULTS}
        rest = {key: value for key, value in table.items() if key not in SIMULATION_DEFAULTS}
        options = {**check_options(rest, cls.OPTIONS, prefix), **_check_simulation(simulation, prefix)}
        for key in ("n_train", "n_validation", "n_test"):
            require(options[key] >= 2, f"{prefix}.{key}", f"must be at least 2, got {options[key]}")
        require(options["reference"] in REFERENCES, f"{prefix}.reference",
                f"must be one of {', '.join(REFERENCES)}, got {options['reference']!r}")
        require(options["calibration"] in CALIBRATIONS, f"{prefix}.calibration",
                f"must be one of {', '.join(CALIBRATIONS)}, got {options['calibration']!r}")
        require(options["calibration_psf"] in TARGET_PSFS, f"{prefix}.calibration_psf",
                f"must be one of {', '.join(TARGET_PSFS)}, got {options['calibration_psf']!r}")
        size, wide = options["stamp_size"], options["calibration_stamp_size"]
        if wide == 0:
            options["calibration_stamp_size"] = size + 2 * (size // 4)
        require(options["calibration_stamp_size"] >= size and (options["calibration_stamp_size"] - size) % 2 == 0,
                f"{prefix}.calibration_stamp_size", f"must be 0 (automatic) or at least stamp_size "
                f"({size}) and differ from it by an even number, got {wide}")
        if options["reference"] != "none":
            require(is_available(options["reference"]), f"{prefix}.reference", f"{INSTALL_HINT}; or use metacal, hsm")
        levels = options["test_noise_levels"]
        require(all(isinstance(v, (int, float)) and not isinstance(v, bool) and 0 <= v < 1000 for v in levels),
                f"{prefix}.test_noise_levels", f"must be noise sigmas in [0, 1000), got {levels!r}")
        require(not levels or not isinstance(options["noise_sigma"], tuple), f"{prefix}.test_noise_levels",
                "needs one noise_sigma, not a range")
        options["test_noise_levels"] = sorted({float(v) for v in levels} - {options["noise_sigma"]})
        options["test_populations"] = _check_populations(options, prefix)
        return options

    @classmethod
    def check_metrics(cls, metrics: tuple[str, ...], options: dict[str, Any], prefix: str = "study.metrics") -> None:
        """Metrics relative to the reference need one."""
        for metric in metrics:
            if metric in RELATIVE_METRICS and options["reference"] == "none":
                raise SpaceError(prefix, f"'{metric}' compares with the reference estimator; set objective.reference to metacal, hsm or ngmix")
            if metric.startswith(CALIBRATED) and options["calibration"] == "none":
                raise SpaceError(prefix, f"'{metric}' scores the network calibrated by its "
                                 'metacal response; set objective.calibration = "metacal"')
            if metric in BOUND_METRICS and options["noise_sigma"] == 0:
                raise SpaceError(prefix, f"'{metric}' divides by the Cramér-Rao bound, which is 0 "
                                 "without noise; set objective.noise_sigma > 0")

    def dataset_config(self) -> dict[str, Any]:
        """What the dataset cache key is made of."""
        return {"simulation": simulation_config(self.simulation), "counts": self.counts, "seed": self.seed, "version": 1}

    def load_data(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """Simulate the train/validation/test galaxies (the test set at +g and -g)."""
        from rich.progress import Progress

        total = sum(self.counts.values()) + self.counts["test"]
        with Progress(disable=not self.progress, transient=True) as bar:
            task = bar.add_task(f"simulating {total} galaxies", total=total)
            arrays = simulate(self.simulation, self.counts, self.seed, lambda n: bar.advance(task, n))
        return arrays, {}

    def split_arrays(self, split: str) -> dict[str, np.ndarray]:
        """One split's arrays by name (images, labels, shear, per-galaxy values, ...)."""
        prefix = f"{split}."
        arrays = {key[len(prefix):]: value for key, value in self.data.items() if key.startswith(prefix)}
        arrays.setdefault("shear", arrays["labels"])  # datasets cached before "shear" was stored
        return arrays

    def split_psf(self, split: str) -> np.ndarray:
        """The PSF image of a split's galaxies: (H, W), or each galaxy's own (N, H, W)."""
        return self.data.get(f"{split}.psf_images", self.data.get("psf_image"))

    def split_noise_sigma(self, split: str) -> float | np.ndarray:
        """The pixel noise sigma of a split's galaxies: one number, or each galaxy's (N,)."""
        return self.data.get(f"{split}.noise_sigma", self.simulation.noise_sigma)

    def after_load(self) -> None:
        """Input scaling, the reference estimator and the Cramér-Rao bound on the test set (once,
        cached), the test set at each extra noise level, and each test population."""
        logger.info("shear dataset %s (%s)", self.dataset_key, "cache hit" if self.cache_hit else "simulated")
        self.input_scale = 1.0 / float(np.std(self.data["train.images"][:1000]) or 1.0)
        test = self.split_arrays("test")
        self.baselines, self.reference_estimate = self._reference_baselines(
            test, self.split_psf("test"), self.simulation.typical_noise_sigma, self.dataset_key
        )
        # The bound on the label: a round galaxy sheared to the label is the same image as the
        # intrinsic shape sheared by g (shear composition leaves only a rotation of a round one).
        population = {**test, "intrinsic_g": np.zeros_like(test["labels"], dtype=np.float64),
                      "shear": test["labels"]}
        self.bound, _ = cached_bound(self.simulation, population, self.cache_dir, self.dataset_key,
                                     self.progress)
        self.baselines.append(bound_baseline(self.bound, self.split_noise_sigma("test")))
        self._load_populations()
        if self.options["calibration"] == "metacal":
            self._load_metacal_sets()
        for level in self.options["test_noise_levels"]:
            config = {"dataset": self.dataset_config(), "test_noise_sigma": level}
            self.noise_tests[level], _, _ = cached_arrays(
                self.cache_dir, "shear-test-noise", config, lambda level=level: (
                    simulate_test_at_noise(self.simulation, self.counts["test"], self.seed, level), {}
                ),
            )
            noisy = {**self.noise_tests[level]}
            noisy.setdefault("shear", noisy["labels"])
            baselines, _ = self._reference_baselines(noisy, self.split_psf("test"), level, config_hash(config))
            self.baselines += [dataclasses.replace(b, conditions={"noise_sigma": level}) for b in baselines]
            self.baselines.append(bound_baseline(self.bound, level, {"noise_sigma": level}))

    def _load_populations(self) -> None:
        """Each test population simulated once (cached): the test split's own galaxies, seeds and
        noise with its keys changed, paired; the reference estimator on it (cached)."""
        from rich.progress import Progress

        for name, changes in self.options["test_populations"].items():
            simulation, count = population_setup(self.simulation, changes, self.counts["test"])
            config = {"simulation": simulation_config(simulation), "count": count,
                      "seed": self.seed, "split": "test",
                      # 2: fixed shears alternate between g1 and g2 by pairs of galaxies
                      "version": 2 if simulation.shear_fixed else 1}

            def build(simulation: GalaxySimulation = simulation, name: str = name, count: int = count
                      ) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
                with Progress(disable=not self.progress, transient=True) as bar:
                    task = bar.add_task(f"test population {name}", total=2 * count)
                    arrays = simulate_split(simulation, split_seeds(self.seed)["test"], count,
                                            paired=True, on_progress=lambda n: bar.advance(task, n))
                return arrays, {}

            arrays, _, _ = cached_arrays(self.cache_dir, "shear-population", config, build)
            population = TestPopulation(name, simulation, dict(arrays), config_hash(config))
            self.populations[name] = population
            baselines, _ = self._reference_baselines(
                population.arrays, population.psf(), simulation.typical_noise_sigma, population.key,
                simulation.pixel_scale)
            self.baselines += [dataclasses.replace(b, conditions={"population": name}) for b in baselines]

    def _load_metacal_sets(self) -> None:
        """Metacal's images of the test set and of every test population, at +g and at -g, made
        from the same galaxies on ``calibration_stamp_size`` stamps and cropped to the network's
        (computed once per set, cached), for the response calibration of every trial."""
        wide_size = self.options["calibration_stamp_size"]
        sets = {TRAINING_POPULATION: (self.split_arrays("test"), self.simulation, self.dataset_key)}
        sets.update({name: (population.arrays, population.simulation, population.key)
                     for name, population in self.populations.items()})
        for name, (arrays, simulation, key) in sets.items():
            seed = int(hashlib.sha256(f"{key}-wide".encode()).hexdigest()[:15], 16)
            wide = functools.cache(functools.partial(wide_stamps, simulation, arrays, wide_size, seed))

            def stamps(images: str, wide: Any = wide, arrays: dict[str, np.ndarray] = arrays,
                       simulation: GalaxySimulation = simulation) -> tuple[Any, Any, Any]:
                return (wide()[images], wide()["psf_images"],
                        arrays.get("noise_sigma", simulation.noise_sigma))

            self.metacal_sets[name] = tuple(  # type: ignore[assignment]
                cached_metacal_images(functools.partial(stamps, images), simulation.pixel_scale,
                                      cache_dir=self.cache_dir, crop=simulation.stamp_size,
                                      dataset_key=f"{key}-test.{images}-wide{wide_size}",
                                      step=METACAL_STEP, psf=self.options["calibration_psf"],
                                      seed=self.seed, progress=self.progress)
                for images in ("images", "images_minus"))

    def _reference_baselines(
        self, test: dict[str, np.ndarray], psf: np.ndarray, noise_sigma: float, dataset_key: str,
        pixel_scale: float | None = None,
    ) -> tuple[list[Baseline], np.ndarray | None]:
        """The reference estimator on a paired test set (computed once, cached): its rows
        (mean response; each galaxy's own response) and its per-galaxy estimates."""
        name = self.options["reference"]
        if name == "none":
            return [], None
        results = [
            cached_measure(
                name, test[images], psf, pixel_scale or self.simulation.pixel_scale,
                noise_sigma, cache_dir=self.cache_dir,
                dataset_key=f"{dataset_key}-test.{images}", progress=self.progress,
            )
            for images in ("images", "images_minus")
        ]
        ok = results[0].ok & results[1].ok
        metrics = shear_metrics(results[0].g[ok], test["labels"][ok], results[1].g[ok],
                                shear=test["shear"][ok])
        if results[0].R is not None:  # metacal: m, c against each pair's own response
            metrics.update(_bias_dict(response_matched_bias(
                results[0].e[ok], results[1].e[ok], results[0].R[ok], results[1].R[ok],
                test["shear"][ok])))
        metrics["n_failed"] = float(np.count_nonzero(~ok))
        metrics["galaxies_per_core_second"] = results[0].galaxies_per_core_second
        rows = []
        per_object = results[0].g_per_object_response
        if per_object is not None:
            rows.append(Baseline(
                "reference_object", f"{name}, per-galaxy response",
                f"{name} with each galaxy calibrated by its own response: how it measures "
                "one galaxy's shear, the comparison for a per-galaxy network",
                {"rmse": rmse(per_object[ok], test["labels"][ok])[2]},
            ))
        rows.append(Baseline(
            "reference", f"{name}, mean response",
            f"{name} calibrated by the mean response of the whole test set (the ensemble "
            "estimator of weak-lensing surveys)" if per_object is not None else
            f"{name} on the same test galaxies (no per-galaxy calibration)",
            metrics, group="ensemble" if per_object is not None else "",
        ))
        return rows, results[0].g

    def split_sizes(self) -> dict[str, int]:
        return dict(self.counts)

    def extra_attrs(self) -> dict[str, Any]:
        return {"reference": self.options["reference"], "noise_sigma": self.simulation.noise_sigma}

    def inputs(self, split: str, name: str = "images") -> StampInputs:
        """The network inputs for one split (``name`` = "images" or, for test, "images_minus")."""
        return self.stamp_inputs(self.data[f"{split}.{name}"], self.split_psf(split))

    def examples(self, split: str) -> tuple[StampInputs, np.ndarray]:
        """The stamps of ``split`` and their shears (N, 2)."""
        return self.inputs(split), np.asarray(self.data[f"{split}.labels"])

    def reference_errors(self) -> ReferenceErrors:
        """The reference's per-galaxy estimates of the test set and their errors (noise
        resampling: :mod:`lensnas.objectives.shear.uncertainty`)."""
        from lensnas.objectives.shear.uncertainty import reference_errors

        return reference_errors(self)

    def stamp_inputs(self, images: np.ndarray, psf: np.ndarray | None = None) -> StampInputs:
        """Network inputs for (N, H, W) stamps whose PSF image is ``psf`` ((H, W) or one per
        stamp; default: the study's one PSF); the PSF is channel 1 when the study asks."""
        if not self.options["psf_channel"]:
            return StampInputs(images)
        return StampInputs(images, self.data["psf_image"] if psf is None else psf)

    def architecture_arguments(self) -> dict[str, Any]:
        return {
            "in_channels": 2 if self.options["psf_channel"] else 1,
            "image_size": self.simulation.stamp_size,
            "input_scale": self.input_scale,
            "output_scale": max(self.simulation.shear_max, 1e-3),
        }

    def input_description(self) -> dict[str, Any]:
        simulation = self.simulation
        return {
            "total_flux": [simulation.flux_min, simulation.flux_max],
            "noise_sigma": simulation.noise_sigma,
            "pixel_scale_arcsec": simulation.pixel_scale,
            "psf": f"{simulation.psf_profile}, FWHM {simulation.psf_fwhm} arcsec",
            "labels": "sheared_ellipticity" if simulation.intrinsic_ellipticity_sigma else "shear",
            "calibration": self.options["calibration"],
            "calibration_psf": self.options["calibration_psf"],
        }

    def training_data(self, config: dict[str, Any]) -> tuple[Any, Any]:
        """The training stamps; with ``fresh_noise`` their noiseless renderings (the noise is
        drawn anew for every batch by :meth:`batch_transform`)."""
        labels = self.data["train.labels"]
        if not config.get("fresh_noise"):
            return self.inputs("train"), labels
        sigma = self.data.get("train.noise_sigma")
        if self._noiseless is None:
            config_key = {"dataset": self.dataset_key, "split": "train", "noiseless": True}
            arrays, _, _ = cached_arrays(self.cache_dir, "shear-noiseless", config_key, lambda: (
                {"images": noiseless_images(self.simulation, self.data["train.images"], self.seed,
                                            "train", noise_sigma=sigma)}, {}))
            self._noiseless = arrays["images"]
        if sigma is not None:  # each galaxy's noise sigma rides beside its label to batch_transform
            labels = np.concatenate([labels, np.asarray(sigma, np.float32)[:, None]], axis=1)
        return self.stamp_inputs(self._noiseless, self.split_psf("train")), labels

    def batch_transform(self, config: dict[str, Any]) -> Any:
        """Fresh pixel noise (galaxy channel only; each galaxy's own sigma where it varies) and/or
        a random D4 element per batch."""
        fresh = bool(config.get("fresh_noise"))
        per_galaxy = fresh and "train.noise_sigma" in self.data
        sigma = self.simulation.noise_sigma if fresh and not per_galaxy else 0.0
        d4 = config.get("augment", "none") == "d4"
        if not sigma and not d4 and not per_galaxy:
            return None

        def transform(x: torch.Tensor, g: torch.Tensor, generator: torch.Generator):
            if per_galaxy:
                g, level = g[:, :2], g[:, 2]
                noise = torch.randn(x[:, :1].shape, generator=generator, device=x.device)
                x = torch.cat([x[:, :1] + noise * level[:, None, None, None], x[:, 1:]], dim=1)
            elif sigma:
                noise = torch.randn(x[:, :1].shape, generator=generator, device=x.device) * sigma
                x = torch.cat([x[:, :1] + noise, x[:, 1:]], dim=1)
            return random_transform(x, g, generator) if d4 else (x, g)

        return transform

    @classmethod
    def check_training(cls, training: dict[str, Any], space: list[Any], options: dict[str, Any]) -> None:
        """D4 augmentation and symmetrization need a PSF that D4 maps onto itself, or the PSF
        image as an input channel (then D4 acts on both); a PSF branch needs that channel."""
        checks = [("psf_branch", True, ("needs the PSF image as a second input channel: set "
                   "objective.psf_channel = true"), "false")] if not options["psf_channel"] else []
        if (options["psf_g1"] or options["psf_g2"]) and not options["psf_channel"]:
            why = (f"needs a D4-symmetric PSF, but objective.psf_g1/psf_g2 = {options['psf_g1']}, "
                   f"{options['psf_g2']} make it elliptical (or give the network the PSF: "
                   "objective.psf_channel = true)")
            checks += [("augment", "d4", why, "none"), ("symmetrize", True, why, "false")]
        for key, bad, why, allowed in checks:
            possible = [training[key]] if key in training else []
            for dimension in space:
                if dimension.name == key:
                    possible = list(dimension.possible_values() or [])
                    table = "space"
                    break
            else:
                table = "training"
            if any(value == bad and type(value) is type(bad) for value in possible):
                raise SpaceError(f"{table}.{key}", f"{bad!r} {why}; allowed here: {allowed}")

    def loss(self, config: dict[str, Any]) -> torch.nn.Module:
        return REGRESSION_LOSSES[config["loss"]]()

    def validation_score(self, model: torch.nn.Module, device: str) -> float:
        """RMSE of g on the validation galaxies: comparable across losses and trials."""
        estimate = predict(model, self.inputs("validation"), 256, device)
        return rmse(estimate, self.data["validation.labels"])[2]

    def score(self, model: torch.nn.Module, config: dict[str, Any], ctx: TrialContext) -> dict[str, Any]:
        """RMSE and biases on the test set (and at each extra noise level), and the ratios to
        the reference estimator measured on the same galaxies."""
        batch = max(config["batch_size"], 256)

        def estimate(images: np.ndarray, psf: np.ndarray | None) -> np.ndarray:
            """The network's (g1, g2) of stamps whose PSF image is ``psf``."""
            return predict(model, self.stamp_inputs(images, psf), batch, ctx.device)

        def estimates(test: dict[str, np.ndarray], psf: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
            """The network's estimates at +g and at -g of a paired test set."""
            return estimate(test["images"], psf), estimate(test["images_minus"], psf)

        def measure(
            test: dict[str, np.ndarray], references: list[Baseline]
        ) -> tuple[dict[str, float], np.ndarray]:
            """Metrics on a paired test set of the study's PSF, and the estimates at +g."""
            plus, minus = estimates(test, self.split_psf("test"))
            metrics = shear_metrics(plus, test["labels"], minus, shear=test.get("shear"))
            return {**metrics, **_relative_metrics(metrics, references)}, plus

        own = [b for b in self.baselines if not b.conditions]
        metrics, self._test_estimate = measure(self.split_arrays("test"), own)
        if self.noise_tests:
            metrics[NOISE_LEVELS] = {
                f"{level:g}": measure(noisy, [b for b in self.baselines
                                             if b.conditions.get("noise_sigma") == level])[0]
                for level, noisy in self.noise_tests.items()
            }
        populations = {TRAINING_POPULATION: {key: metrics[key] for key in POPULATION_METRICS}}
        for name, population in self.populations.items():
            plus, minus = estimates(population.arrays, population.psf())
            populations[name] = population_metrics(population, plus, minus)
        if self.metacal_sets:
            test = TestPopulation(TRAINING_POPULATION, self.simulation, self.split_arrays("test"),
                                  self.dataset_key)
            for name, population in {TRAINING_POPULATION: test, **self.populations}.items():
                calibrated_metrics = response_calibrated_metrics(
                    population, *self.metacal_sets[name], estimate)
                populations[name].update(calibrated_metrics)
            metrics.update({key: value for key, value in populations[TRAINING_POPULATION].items()
                            if key.startswith(CALIBRATED)})
            if self.bound is not None and "cal_rmse" in metrics:
                bound = next(b.metrics["rmse"] for b in own if b.key == "bound")
                if bound > 0:
                    metrics["cal_rmse_over_crb"] = metrics["cal_rmse"] / bound
        # A study that declares test populations is judged on them: its own test set keeps the
        # training population's shears (|g| up to shear_max), where a calibrated network's m
        # also holds the curvature of its response between 0 and g, not a bias at survey shears.
        judged = {name: values for name, values in populations.items()
                  if name != TRAINING_POPULATION or len(populations) == 1}
        if self.metacal_sets:
            metrics.update(worst_bias(judged, CALIBRATED))
        metrics.update(worst_bias(judged))
        if self.populations:
            metrics[POPULATIONS] = populations
        return metrics

    def figure(self, model: torch.nn.Module, path: Path) -> None:
        shear_residual_figure(
            path, self.data["test.labels"], self._test_estimate,
            self.reference_estimate, reference_name=self.options["reference"],
        )

    def baseline_table(self, noise_levels: list[float] | None = None) -> list[Baseline]:
        """Every available shear estimator on the study's paired test set, at each noise level."""
        from lensnas.objectives.shear.baseline import baseline_rows

        rows = baseline_rows(self.simulation, self.counts["test"], self.seed, noise_levels,
                             self.cache_dir, self.progress)
        for name, changes in self.options["test_populations"].items():
            simulation, count = population_setup(self.simulation, changes, self.counts["test"])
            rows += baseline_rows(simulation, count, self.seed, None, self.cache_dir, self.progress,
                                  {"population": name})
        return rows

    def baseline_notes(self) -> list[str]:
        return [] if is_available("ngmix") else [f"ngmix row skipped: {INSTALL_HINT}"]

    @classmethod
    def trial_tables(cls, study_attrs: dict[str, Any], trial: TrialRecord
                     ) -> list[tuple[str, str, list[str], list[list[str]]]]:
        """m and c per test population: the network, calibrated where the study calibrates,
        beside the reference estimator on the same galaxies."""
        from lensnas.objectives.shear.report import population_tables

        return population_tables(study_attrs, trial)

    @classmethod
    def report_sections(cls, study_attrs: dict[str, Any], best: TrialRecord | None) -> list[ReportSection]:
        from lensnas.objectives.shear.report import report_sections

        return report_sections(study_attrs, best)


def population_metrics(population: TestPopulation, plus: np.ndarray, minus: np.ndarray
                       ) -> dict[str, float]:
    """m, c (paired, jackknife errors), RMSE and, where its PSF is elliptical, the PSF leakage
    alpha of estimates at +g (``plus``) and -g (``minus``) of a test population."""
    arrays = population.arrays
    metrics = shear_metrics(plus, arrays["labels"], minus, shear=arrays.get("shear"))
    out = {key: metrics[key] for key in POPULATION_METRICS}
    psf_g = population.psf_g()
    if np.any(psf_g):
        out.update(psf_leakage(plus, minus, psf_g))
    return out


def response_calibrated_metrics(
    population: TestPopulation, metacal_plus: dict[str, np.ndarray],
    metacal_minus: dict[str, np.ndarray], estimate: Any,
) -> dict[str, float]:
    """The metrics of :func:`population_metrics` (prefixed ``cal_``) of an estimator calibrated
    by its response to metacal's images of the population's stamps: shears at +g and -g both
    divided by the mean response over the two sets (RMSE, PSF leakage); m and c by
    :func:`response_matched_bias` (the same expectation, without the scatter of responses
    between galaxies); ``cal_object_rmse`` with each galaxy's own response."""
    e_plus, r_plus = network_response(estimate, metacal_plus, METACAL_STEP)
    e_minus, r_minus = network_response(estimate, metacal_minus, METACAL_STEP)
    ok = metacal_plus["ok"] & metacal_minus["ok"]
    both = calibrated(np.concatenate([e_plus, e_minus]), np.concatenate([r_plus, r_minus]),
                      np.concatenate([ok, ok]))
    inverse = np.linalg.inv(both["response"])
    plus, minus = e_plus[ok] @ inverse.T, e_minus[ok] @ inverse.T
    kept = TestPopulation(population.name, population.simulation,
                          {key: np.asarray(value)[ok] for key, value in population.arrays.items()
                           if key in ("labels", "shear", "psf_g1", "psf_g2")},
                          population.key)
    metrics = population_metrics(kept, plus, minus)
    metrics.update(_bias_dict(response_matched_bias(
        e_plus[ok], e_minus[ok], r_plus[ok], r_minus[ok], kept.arrays.get("shear", kept.arrays["labels"]))))
    out = {f"{CALIBRATED}{key}": value for key, value in metrics.items()}
    per_galaxy = both["g_object"][: len(ok)][ok]
    out[f"{CALIBRATED}object_rmse"] = rmse(per_galaxy, kept.arrays["labels"])[2]
    out[f"{CALIBRATED}response_11"], out[f"{CALIBRATED}response_22"] = (
        float(both["response"][0, 0]), float(both["response"][1, 1]))
    out[f"{CALIBRATED}n_failed"] = float(np.count_nonzero(~ok))
    return out


def _bias_dict(bias: Bias) -> dict[str, float]:
    """m1, m1_err, ..., c2_err and abs_m, abs_c (the larger |m|, |c| of the two components)."""
    return {**bias.as_dict(), "abs_m": max(abs(bias.m[0]), abs(bias.m[1])),
            "abs_c": max(abs(bias.c[0]), abs(bias.c[1]))}


def _check_populations(options: dict[str, Any], prefix: str) -> dict[str, dict[str, Any]]:
    """Each test population's changed simulation keys, validated as the whole population they
    make (SpaceError naming ``objective.test_populations.NAME.KEY``)."""
    checked = {}
    base = {key: options[key] for key in SIMULATION_DEFAULTS}
    for name, overrides in options["test_populations"].items():
        where = f"{prefix}.test_populations.{name}"
        require(name != TRAINING_POPULATION, where,
                f"'{TRAINING_POPULATION}' names the study's own test set; choose another name")
        require(isinstance(overrides, dict), where,
                f"must be a table of simulation keys to change, got {overrides!r}")
        for key in overrides:
            require(key in (*POPULATION_KEYS, PAIRS), f"{where}.{key}",
                    f"unknown key{closest(key, (*POPULATION_KEYS, PAIRS))}; a population may "
                    f"change: {', '.join(POPULATION_KEYS)}, or set its {PAIRS}")
        changes = {key: value for key, value in overrides.items() if key != PAIRS}
        merged = _check_simulation({**base, **changes}, where)
        checked[name] = {key: merged[key] for key in changes}
        if PAIRS in overrides:
            pairs = overrides[PAIRS]
            require(isinstance(pairs, int) and not isinstance(pairs, bool)
                    and 8 <= pairs <= MAX_PAIRS, f"{where}.{PAIRS}",
                    f"must be a whole number of +g/-g pairs from 8 to {MAX_PAIRS}, got {pairs!r}")
            checked[name][PAIRS] = pairs
    return checked


def population_setup(simulation: GalaxySimulation, changes: dict[str, Any], n_test: int
                     ) -> tuple[GalaxySimulation, int]:
    """A test population's simulation (``simulation`` with ``changes``) and its pairs."""
    keys = {key: value for key, value in changes.items() if key != PAIRS}
    return dataclasses.replace(simulation, **keys), int(changes.get(PAIRS, n_test))


def _relative_metrics(metrics: dict[str, float], references: list[Baseline]) -> dict[str, float]:
    """rmse_ratio (mean response), rmse_ratio_object (own response), abs_m_diff, and the
    Cramér-Rao bound crb_rmse with the RMSE of the network (rmse_over_crb) and of the
    reference (ref_rmse_over_crb, ref_object_rmse_over_crb) over it."""
    out: dict[str, float] = {}
    for reference in references:
        if reference.key == "reference":
            out["rmse_ratio"] = metrics["rmse"] / reference.metrics["rmse"]
            out["abs_m_diff"] = metrics["abs_m"] - reference.metrics["abs_m"]
        elif reference.key == "reference_object":
            out["rmse_ratio_object"] = metrics["rmse"] / reference.metrics["rmse"]
    bound = next((b.metrics["rmse"] for b in references if b.key == "bound"), None)
    if bound is None:
        return out
    out["crb_rmse"] = bound
    if bound > 0:
        out["rmse_over_crb"] = metrics["rmse"] / bound
        for reference in references:
            if reference.key in ("reference", "reference_object") and "rmse" in reference.metrics:
                name = {"reference": "ref_rmse_over_crb",
                        "reference_object": "ref_object_rmse_over_crb"}[reference.key]
                out[name] = reference.metrics["rmse"] / bound
    return out
