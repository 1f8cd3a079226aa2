"""The weak-lensing shear objective: a CNN regresses (g1, g2) from GalSim galaxy stamps."""

from __future__ import annotations

import dataclasses
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
from lensnas.objectives.shear.data import (
    PROFILES,
    PSF_PROFILES,
    SPLITS,
    GalaxySimulation,
    noiseless_images,
    simulate,
    simulate_test_at_noise,
    simulation_config,
)
from lensnas.objectives.shear.metrics import rmse, shear_metrics
from lensnas.objectives.shear.ngmix_backend import INSTALL_HINT
from lensnas.objectives.shear.reference import cached_measure, is_available
from lensnas.objectives.training import REGRESSION_LOSSES, predict
from lensnas.spaces.d4 import random_transform
from lensnas.spaces.dimensions import SpaceError
from lensnas.spaces.shear.cnn import SHEAR_CNN

logger = logging.getLogger("lensnas.shear")

SIMULATION_DEFAULTS = {f.name: f.default for f in dataclasses.fields(GalaxySimulation)}
REFERENCES = ("none", "metacal", "hsm", "ngmix")
RELATIVE_METRICS = ("rmse_ratio", "rmse_ratio_object", "abs_m_diff", "ref_rmse_over_crb",
                    "ref_object_rmse_over_crb")
BOUND_METRICS = ("rmse_over_crb", "ref_rmse_over_crb", "ref_object_rmse_over_crb")  # need noise > 0
NOISE_LEVELS = "noise_levels"  # trial attribute: {noise sigma: {metric: value}}


class StampInputs:
    """Array-like (N, C, H, W) view of (N, H, W) stamps, optionally with the PSF image as channel 2."""

    def __init__(self, images: np.ndarray, psf_image: np.ndarray | None = None):
        self.images = images
        self.psf_image = psf_image

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: np.ndarray) -> np.ndarray:
        stamps = np.asarray(self.images[index], dtype=np.float32)[:, None]
        if self.psf_image is None:
            return stamps
        psf = np.broadcast_to(self.psf_image, stamps.shape)
        return np.concatenate([stamps, psf], axis=1)


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
        self.input_scale = 1.0
        self._test_estimate: np.ndarray | None = None
        self._noiseless: np.ndarray | None = None

    @classmethod
    def check_options(cls, table: dict[str, Any], prefix: str = "objective") -> dict[str, Any]:
        """Validated ``[objective]`` options (defaults filled in)."""
        options = check_options(table, cls.OPTIONS, prefix)
        for key in ("n_train", "n_validation", "n_test"):
            require(options[key] >= 2, f"{prefix}.{key}", f"must be at least 2, got {options[key]}")
        require(8 <= options["stamp_size"] <= 512, f"{prefix}.stamp_size", f"must be in 8..512, got {options['stamp_size']}")
        for key in ("pixel_scale", "psf_fwhm", "half_light_radius_min", "flux_min", "sersic_index"):
            require(options[key] > 0, f"{prefix}.{key}", f"must be positive, got {options[key]}")
        require(options["noise_sigma"] >= 0, f"{prefix}.noise_sigma", f"must be >= 0, got {options['noise_sigma']}")
        for low, high in (("half_light_radius_min", "half_light_radius_max"), ("flux_min", "flux_max")):
            require(options[low] <= options[high], f"{prefix}.{high}", f"impossible range: {low}={options[low]} > {high}={options[high]}")
        require(0 <= options["shear_max"] < 1, f"{prefix}.shear_max", f"must be in [0, 1), got {options['shear_max']}")
        require(0 <= options["bulge_fraction"] <= 1, f"{prefix}.bulge_fraction", "must be in [0, 1]")
        require(options["psf_beta"] > 1.1, f"{prefix}.psf_beta", f"must be > 1.1, got {options['psf_beta']}")
        require(options["intrinsic_ellipticity_sigma"] >= 0, f"{prefix}.intrinsic_ellipticity_sigma", "must be >= 0")
        for key, allowed in (("profile", PROFILES), ("psf_profile", PSF_PROFILES), ("reference", REFERENCES)):
            require(options[key] in allowed, f"{prefix}.{key}", f"must be one of {', '.join(allowed)}, got {options[key]!r}")
        if options["reference"] != "none":
            require(is_available(options["reference"]), f"{prefix}.reference", f"{INSTALL_HINT}; or use metacal, hsm")
        levels = options["test_noise_levels"]
        require(all(isinstance(v, (int, float)) and not isinstance(v, bool) and 0 <= v < 1000 for v in levels),
                f"{prefix}.test_noise_levels", f"must be noise sigmas in [0, 1000), got {levels!r}")
        options["test_noise_levels"] = sorted({float(v) for v in levels} - {options["noise_sigma"]})
        return options

    @classmethod
    def check_metrics(cls, metrics: tuple[str, ...], options: dict[str, Any], prefix: str = "study.metrics") -> None:
        """Metrics relative to the reference need one."""
        for metric in metrics:
            if metric in RELATIVE_METRICS and options["reference"] == "none":
                raise SpaceError(prefix, f"'{metric}' compares with the reference estimator; set objective.reference to metacal, hsm or ngmix")
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

    def after_load(self) -> None:
        """Input scaling, the reference estimator and the Cramér-Rao bound on the test set (once,
        cached), and the test set at each extra noise level."""
        logger.info("shear dataset %s (%s)", self.dataset_key, "cache hit" if self.cache_hit else "simulated")
        self.input_scale = 1.0 / float(np.std(self.data["train.images"][:1000]) or 1.0)
        test = {name: self.data[f"test.{name}"] for name in ("images", "images_minus", "labels")}
        self.baselines, self.reference_estimate = self._reference_baselines(
            test, self.simulation.noise_sigma, self.dataset_key
        )
        population = {name: self.data[f"test.{name}"]
                      for name in ("half_light_radius", "flux", "intrinsic_g")}
        population["shear"] = self.data["test.labels"]
        self.bound, _ = cached_bound(self.simulation, population, self.cache_dir, self.dataset_key,
                                     self.progress)
        self.baselines.append(bound_baseline(self.bound, self.simulation.noise_sigma))
        for level in self.options["test_noise_levels"]:
            config = {"dataset": self.dataset_config(), "test_noise_sigma": level}
            self.noise_tests[level], _, _ = cached_arrays(
                self.cache_dir, "shear-test-noise", config, lambda level=level: (
                    simulate_test_at_noise(self.simulation, self.counts["test"], self.seed, level), {}
                ),
            )
            baselines, _ = self._reference_baselines(self.noise_tests[level], level, config_hash(config))
            self.baselines += [dataclasses.replace(b, conditions={"noise_sigma": level}) for b in baselines]
            self.baselines.append(bound_baseline(self.bound, level, {"noise_sigma": level}))

    def _reference_baselines(
        self, test: dict[str, np.ndarray], noise_sigma: float, dataset_key: str
    ) -> tuple[list[Baseline], np.ndarray | None]:
        """The reference estimator on a paired test set (computed once, cached): its rows
        (mean response; each galaxy's own response) and its per-galaxy estimates."""
        name = self.options["reference"]
        if name == "none":
            return [], None
        results = [
            cached_measure(
                name, test[images], self.data["psf_image"], self.simulation.pixel_scale,
                noise_sigma, cache_dir=self.cache_dir,
                dataset_key=f"{dataset_key}-test.{images}", progress=self.progress,
            )
            for images in ("images", "images_minus")
        ]
        ok = results[0].ok & results[1].ok
        metrics = shear_metrics(results[0].g[ok], test["labels"][ok], results[1].g[ok])
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
        return self.stamp_inputs(self.data[f"{split}.{name}"])

    def examples(self, split: str) -> tuple[StampInputs, np.ndarray]:
        """The stamps of ``split`` and their shears (N, 2)."""
        return self.inputs(split), np.asarray(self.data[f"{split}.labels"])

    def reference_errors(self) -> ReferenceErrors:
        """The reference's per-galaxy estimates of the test set and their errors (noise
        resampling: :mod:`lensnas.objectives.shear.uncertainty`)."""
        from lensnas.objectives.shear.uncertainty import reference_errors

        return reference_errors(self)

    def stamp_inputs(self, images: np.ndarray) -> StampInputs:
        """Network inputs for (N, H, W) stamps of this study's simulation."""
        return StampInputs(images, self.data["psf_image"] if self.options["psf_channel"] else None)

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
        }

    def training_data(self, config: dict[str, Any]) -> tuple[Any, Any]:
        """The training stamps; with ``fresh_noise`` their noiseless renderings (the noise is
        drawn anew for every batch by :meth:`batch_transform`)."""
        if not config.get("fresh_noise"):
            return self.inputs("train"), self.data["train.labels"]
        if self._noiseless is None:
            config_key = {"dataset": self.dataset_key, "split": "train", "noiseless": True}
            arrays, _, _ = cached_arrays(self.cache_dir, "shear-noiseless", config_key, lambda: (
                {"images": noiseless_images(self.simulation, self.data["train.images"], self.seed,
                                            "train")}, {}))
            self._noiseless = arrays["images"]
        return self.stamp_inputs(self._noiseless), self.data["train.labels"]

    def batch_transform(self, config: dict[str, Any]) -> Any:
        """Fresh pixel noise (galaxy channel only) and/or a random D4 element per batch."""
        sigma = self.simulation.noise_sigma if config.get("fresh_noise") else 0.0
        d4 = config.get("augment", "none") == "d4"
        if not sigma and not d4:
            return None

        def transform(x: torch.Tensor, g: torch.Tensor, generator: torch.Generator):
            if sigma:
                noise = torch.randn(x[:, :1].shape, generator=generator, device=x.device) * sigma
                x = torch.cat([x[:, :1] + noise, x[:, 1:]], dim=1)
            return random_transform(x, g, generator) if d4 else (x, g)

        return transform

    @classmethod
    def check_training(cls, training: dict[str, Any], space: list[Any], options: dict[str, Any]) -> None:
        """D4 augmentation and symmetrization need a PSF that D4 maps onto itself; a PSF
        branch needs the PSF image as an input channel."""
        checks = [("psf_branch", True, ("needs the PSF image as a second input channel: set "
                   "objective.psf_channel = true"), "false")] if not options["psf_channel"] else []
        if options["psf_g1"] or options["psf_g2"]:
            why = (f"needs a D4-symmetric PSF, but objective.psf_g1/psf_g2 = {options['psf_g1']}, "
                   f"{options['psf_g2']} make it elliptical")
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

        def measure(
            test: dict[str, np.ndarray], references: list[Baseline]
        ) -> tuple[dict[str, float], np.ndarray]:
            """Metrics on a paired test set, and the estimates at +g."""
            plus, minus = (predict(model, self.stamp_inputs(test[name]), batch, ctx.device)
                           for name in ("images", "images_minus"))
            metrics = shear_metrics(plus, test["labels"], minus)
            return {**metrics, **_relative_metrics(metrics, references)}, plus

        own = [b for b in self.baselines if not b.conditions]
        test = {name: self.data[f"test.{name}"] for name in ("images", "images_minus", "labels")}
        metrics, self._test_estimate = measure(test, own)
        if self.noise_tests:
            metrics[NOISE_LEVELS] = {
                f"{level:g}": measure(noisy, [b for b in self.baselines
                                             if b.conditions.get("noise_sigma") == level])[0]
                for level, noisy in self.noise_tests.items()
            }
        return metrics

    def figure(self, model: torch.nn.Module, path: Path) -> None:
        shear_residual_figure(
            path, self.data["test.labels"], self._test_estimate,
            self.reference_estimate, reference_name=self.options["reference"],
        )

    def baseline_table(self, noise_levels: list[float] | None = None) -> list[Baseline]:
        """Every available shear estimator on the study's paired test set, at each noise level."""
        from lensnas.objectives.shear.baseline import baseline_rows

        return baseline_rows(self.simulation, self.counts["test"], self.seed, noise_levels,
                             self.cache_dir, self.progress)

    def baseline_notes(self) -> list[str]:
        return [] if is_available("ngmix") else [f"ngmix row skipped: {INSTALL_HINT}"]

    @classmethod
    def report_sections(cls, study_attrs: dict[str, Any], best: TrialRecord | None) -> list[ReportSection]:
        from lensnas.objectives.shear.report import report_sections

        return report_sections(study_attrs, best)


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
