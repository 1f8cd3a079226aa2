"""The weak-lensing shear objective: a CNN regresses (g1, g2) from GalSim galaxy stamps."""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from lensnas.objectives.base import TrialContext
from lensnas.objectives.cache import cache_root, cached_arrays, config_hash
from lensnas.objectives.diagnostics import FIGURE, shear_residual_figure
from lensnas.objectives.ngmix_backend import INSTALL_HINT
from lensnas.objectives.options import check_options, require
from lensnas.objectives.reference import cached_measure, is_available
from lensnas.objectives.shear_data import (
    PROFILES,
    PSF_PROFILES,
    SPLITS,
    GalaxySimulation,
    simulate,
    simulate_test_at_noise,
    simulation_config,
)
from lensnas.objectives.shear_metrics import noise_prefix, rmse, shear_metrics
from lensnas.objectives.training import (
    REGRESSION_LOSSES,
    parameter_count,
    predict,
    seed_everything,
    train_model,
)
from lensnas.spaces.dimensions import SpaceError
from lensnas.spaces.shear_cnn import SHEAR_CNN, build_shear_cnn

logger = logging.getLogger("lensnas.shear")

SIMULATION_DEFAULTS = {f.name: f.default for f in dataclasses.fields(GalaxySimulation)}
REFERENCES = ("none", "metacal", "hsm", "ngmix")
RELATIVE_METRICS = ("rmse_ratio", "rmse_ratio_object", "abs_m_diff")


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


class ShearObjective:
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
    METRICS: ClassVar[dict[str, str]] = {
        "rmse": "minimize",
        "rmse_g1": "minimize",
        "rmse_g2": "minimize",
        "abs_m": "minimize",
        "abs_c": "minimize",
        "rmse_ratio": "minimize",
        "rmse_ratio_object": "minimize",
        "abs_m_diff": "minimize",
        "best_val_loss": "minimize",
        "n_params": "minimize",
        "train_seconds": "minimize",
    }
    DEFAULT_METRIC = "rmse"
    SUMMARY = ("rmse", "m1", "m2", "c1", "c2", "rmse_ratio", "rmse_ratio_object")

    def __init__(
        self,
        options: dict[str, Any],
        training: dict[str, Any],
        *,
        seed: int,
        cache_dir: str | Path | None = None,
        progress: bool = True,
    ):
        self.options = self.check_options(options)
        self.training = dict(training)
        self.seed = seed
        self.cache_dir = cache_root(cache_dir)
        self.progress = progress
        self.simulation = GalaxySimulation(**{k: self.options[k] for k in SIMULATION_DEFAULTS})
        self.counts = {
            "train": self.options["n_train"],
            "validation": self.options["n_validation"],
            "test": self.options["n_test"],
        }
        self.data: dict[str, np.ndarray] | None = None
        self.dataset_key = config_hash(self.dataset_config())
        self.cache_hit: bool | None = None
        self.reference_metrics: dict[str, float] = {}
        self.reference_estimate: np.ndarray | None = None
        self.noise_tests: dict[float, dict[str, np.ndarray]] = {}

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

    def dataset_config(self) -> dict[str, Any]:
        """What the dataset cache key is made of."""
        return {"simulation": simulation_config(self.simulation), "counts": self.counts, "seed": self.seed, "version": 1}

    def prepare(self) -> None:
        """Simulate (or load from cache) the train/validation/test galaxies."""
        if self.data is not None:
            return
        total = sum(self.counts.values()) + self.counts["test"]
        self.data, _, self.cache_hit = cached_arrays(
            self.cache_dir, "shear", self.dataset_config(), lambda: self._simulate(total)
        )
        logger.info("shear dataset %s (%s)", self.dataset_key, "cache hit" if self.cache_hit else "simulated")
        self.input_scale = 1.0 / float(np.std(self.data["train.images"][:1000]) or 1.0)
        test = {name: self.data[f"test.{name}"] for name in ("images", "images_minus", "labels")}
        self.reference_metrics, self.reference_estimate = self._reference_metrics(
            test, self.simulation.noise_sigma, self.dataset_key, "ref_"
        )
        for level in self.options["test_noise_levels"]:
            config = {"dataset": self.dataset_config(), "test_noise_sigma": level}
            self.noise_tests[level], _, _ = cached_arrays(
                self.cache_dir, "shear-test-noise", config, lambda level=level: (
                    simulate_test_at_noise(self.simulation, self.counts["test"], self.seed, level), {}
                ),
            )
            metrics, _ = self._reference_metrics(
                self.noise_tests[level], level, config_hash(config), f"{noise_prefix(level)}ref_"
            )
            self.reference_metrics.update(metrics)

    def _reference_metrics(
        self, test: dict[str, np.ndarray], noise_sigma: float, dataset_key: str, prefix: str
    ) -> tuple[dict[str, float], np.ndarray | None]:
        """The reference estimator on a paired test set (computed once, cached): ``<prefix>*``
        metrics and its per-galaxy estimates."""
        name = self.options["reference"]
        if name == "none":
            return {}, None
        results = [
            cached_measure(
                name, test[images], self.data["psf_image"], self.simulation.pixel_scale,
                noise_sigma, cache_dir=self.cache_dir,
                dataset_key=f"{dataset_key}-test.{images}", progress=self.progress,
            )
            for images in ("images", "images_minus")
        ]
        ok = results[0].ok & results[1].ok
        metrics = shear_metrics(results[0].g[ok], test["labels"][ok], results[1].g[ok], prefix=prefix)
        metrics[f"{prefix}n_failed"] = float(np.count_nonzero(~ok))
        per_object = results[0].g_per_object_response
        if per_object is not None:
            metrics[f"{prefix}object_rmse"] = rmse(per_object[ok], test["labels"][ok])[2]
        metrics[f"{prefix}galaxies_per_core_second"] = results[0].galaxies_per_core_second
        return metrics, results[0].g

    def _simulate(self, total: int) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        from rich.progress import Progress

        with Progress(disable=not self.progress, transient=True) as bar:
            task = bar.add_task(f"simulating {total} galaxies", total=total)
            arrays = simulate(self.simulation, self.counts, self.seed, lambda n: bar.advance(task, n))
        return arrays, {"dataset_key": self.dataset_key}

    def inputs(self, split: str, name: str = "images") -> StampInputs:
        """The network inputs for one split (``name`` = "images" or, for test, "images_minus")."""
        return self.stamp_inputs(self.data[f"{split}.{name}"])

    def stamp_inputs(self, images: np.ndarray) -> StampInputs:
        """Network inputs for (N, H, W) stamps of this study's simulation."""
        return StampInputs(images, self.data["psf_image"] if self.options["psf_channel"] else None)

    def architecture(self, params: dict[str, Any]) -> dict[str, Any]:
        """Everything needed to rebuild the trial's network (family, version, builder arguments)."""
        return {
            "family": self.family.name,
            "version": self.family.version,
            "config": self.family.architecture(self.family.config({**self.training, **params})),
            "in_channels": 2 if self.options["psf_channel"] else 1,
            "image_size": self.simulation.stamp_size,
            "input_scale": self.input_scale,
            "output_scale": max(self.simulation.shear_max, 1e-3),
        }

    def build_model(self, params: dict[str, Any]) -> torch.nn.Module:
        """The trial's network, untrained."""
        spec = self.architecture(params)
        return build_shear_cnn(
            spec["config"], spec["in_channels"], spec["image_size"], spec["input_scale"], spec["output_scale"]
        )

    def run_trial(self, params: dict[str, Any], ctx: TrialContext) -> dict[str, float]:
        """Train the network sampled in ``params`` and return its test-set metrics."""
        self.prepare()
        config = self.family.config({**self.training, **params})
        seed_everything(ctx.seed)  # the weight initialisation too
        model = self.build_model(params)
        result = train_model(
            model,
            (self.inputs("train"), self.data["train.labels"]),
            (self.inputs("validation"), self.data["validation.labels"]),
            loss_fn=REGRESSION_LOSSES[config["loss"]](),
            learning_rate=config["learning_rate"],
            batch_size=config["batch_size"],
            epochs=config["epochs"],
            weight_decay=config["weight_decay"],
            ctx=ctx,
        )
        batch = max(config["batch_size"], 256)
        estimate = predict(result.model, self.inputs("test"), batch, ctx.device)
        estimate_minus = predict(result.model, self.inputs("test", "images_minus"), batch, ctx.device)
        metrics = shear_metrics(estimate, self.data["test.labels"], estimate_minus)
        metrics.update(
            n_params=float(parameter_count(result.model)),
            train_seconds=result.train_seconds,
            best_val_loss=result.best_val_loss,
            epochs_run=float(result.epochs_run),
        )
        for level, test in self.noise_tests.items():
            estimates = [predict(result.model, self.stamp_inputs(test[name]), batch, ctx.device)
                         for name in ("images", "images_minus")]
            metrics.update(shear_metrics(estimates[0], test["labels"], estimates[1], prefix=noise_prefix(level)))
        if self.reference_metrics:
            metrics.update(self.reference_metrics)
            for prefix in ["", *map(noise_prefix, self.noise_tests)]:
                metrics[f"{prefix}rmse_ratio"] = metrics[f"{prefix}rmse"] / metrics[f"{prefix}ref_rmse"]
                if f"{prefix}ref_object_rmse" in metrics:
                    metrics[f"{prefix}rmse_ratio_object"] = metrics[f"{prefix}rmse"] / metrics[f"{prefix}ref_object_rmse"]
                metrics[f"{prefix}abs_m_diff"] = metrics[f"{prefix}abs_m"] - metrics[f"{prefix}ref_abs_m"]
        self._save(result.model, params, ctx)
        shear_residual_figure(
            Path(ctx.artifact_dir) / FIGURE, self.data["test.labels"], estimate,
            self.reference_estimate, reference_name=self.options["reference"],
        )
        return metrics

    def _save(self, model: torch.nn.Module, params: dict[str, Any], ctx: TrialContext) -> None:
        folder = Path(ctx.artifact_dir)
        folder.mkdir(parents=True, exist_ok=True)
        torch.save(model.cpu().state_dict(), folder / "weights.pt")
        (folder / "architecture.json").write_text(json.dumps(self.architecture(params), indent=1))

    def trial_attrs(self) -> dict[str, Any]:
        """Study-wide facts: the dataset key, split sizes and the reference's metrics."""
        return {
            "dataset_key": self.dataset_key,
            "reference": self.options["reference"],
            **{f"n_{split}": self.counts[split] for split in SPLITS},
            **self.reference_metrics,
        }
