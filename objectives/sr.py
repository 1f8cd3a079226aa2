"""The strong-lensing super-resolution objective: an SR network maps LR lensing images to HR.

A trial trains the network sampled from ``lensnas.spaces.sr_net`` on LR/HR pairs (simulated with
lenstronomy or loaded from a folder, see ``lensnas.objectives.sr_data``) and scores it on the test set
with MSE, PSNR and SSIM (``lensnas.objectives.sr_metrics``), each also as a gain over the bicubic
upsampling, which is computed once per dataset and cached with it.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from lensnas.objectives.base import TrialContext
from lensnas.objectives.cache import cache_root, cached_arrays, config_hash
from lensnas.objectives.diagnostics import FIGURE, sr_panels_figure
from lensnas.objectives.options import check_options, require
from lensnas.objectives.sr_data import (
    INSTRUMENT_KEYS,
    LOG_UNIFORM_KEYS,
    POPULATION_DEFAULTS,
    RANGE_KEYS,
    SOURCES,
    SPLITS,
    folder_dataset,
    folder_files,
    folder_fingerprint,
    simulate_dataset,
    simulation_config,
)
from lensnas.objectives.sr_metrics import (
    TrainValidationLoss,
    bicubic_upsample,
    image_metrics,
    sr_loss,
)
from lensnas.objectives.training import parameter_count, predict, seed_everything, train_model
from lensnas.spaces.dimensions import SpaceError
from lensnas.spaces.sr_net import SR_NET

logger = logging.getLogger("lensnas.sr")

DATASET_VERSION = 1

# Allowed values of the physical ranges: (lowest, highest, whether the lowest is excluded).
RANGE_BOUNDS: dict[str, tuple[float, float, bool]] = {
    "einstein_radius": (0.0, 10.0, True),
    "lens_axis_ratio": (0.0, 1.0, True),
    "shear_strength": (0.0, 0.5, False),
    "subhalo_einstein_radius": (0.0, 1.0, True),
    "source_magnitude": (0.0, 40.0, False),
    "source_half_light_radius": (0.0, 10.0, True),
    "source_sersic_index": (0.2, 8.0, False),
    "source_axis_ratio": (0.0, 1.0, True),
}
NON_NEGATIVE_KEYS = (
    "lens_center_sigma",
    "subhalo_mean_count",
    "subhalo_position_radius",
    "source_center_radius",
    "hr_psf_fwhm",
)
# Options that only a simulated source uses (an error for source = "folder").
SIMULATION_ONLY_KEYS = (
    "n_train",
    "n_validation",
    "n_test",
    *INSTRUMENT_KEYS,
    "hr_psf_fwhm",
    "supersampling",
    *POPULATION_DEFAULTS,
)
FOLDER_ONLY_KEYS = ("folder", "validation_fraction", "test_fraction")


class SRObjective:
    """Train an SR network on lensing image pairs; score PSNR/SSIM and their gain over bicubic."""

    name = "sr"
    family = SR_NET
    OPTIONS: ClassVar[dict[str, Any]] = {
        # where the pairs come from: "simulate" (DeepLense Model 1, 75 -> 150), "euclid" or
        # "hst" (lenstronomy instrument presets, 64 -> 128), or "folder" (LR/ and HR/ .npy files)
        "source": "simulate",
        "n_train": 1000,
        "n_validation": 200,
        "n_test": 200,
        "data_seed": None,  # default: the study seed
        "scale": 2,  # HR side / LR side
        # instrument (default: the source's preset; see objectives.sr_data)
        "lr_size": None,  # LR pixels per side
        "lr_pixel_scale": None,  # arcsec per LR pixel (HR: lr_pixel_scale / scale)
        "psf_fwhm": None,  # arcsec, Gaussian PSF of the LR image
        "exposure_time": None,  # seconds (Poisson noise)
        "background_rms": None,  # counts/s per LR pixel (Gaussian background noise)
        "magnitude_zero_point": None,  # magnitude of 1 count/s
        "hr_psf_fwhm": 0.0,  # arcsec, Gaussian PSF of the HR image (0 = none)
        "supersampling": 1,  # ray-shooting points per HR pixel side
        **POPULATION_DEFAULTS,
        # folder source
        "folder": "",  # holds LR/ and HR/; relative paths are from the working directory
        "validation_fraction": 0.1,  # carved from train when there is no LR/validation.npy
        "test_fraction": 0.1,  # carved from train when there is no LR/test.npy
        "normalize": True,  # min-max each image to [0, 1]; false only for folders already in [0, 1]
        "eval_batch_size": 32,
    }
    METRICS: ClassVar[dict[str, str]] = {
        "psnr_gain": "maximize",
        "psnr": "maximize",
        "ssim": "maximize",
        "ssim_gain": "maximize",
        "mse": "minimize",
        "best_val_loss": "minimize",
        "n_params": "minimize",
        "train_seconds": "minimize",
    }
    DEFAULT_METRIC = "psnr_gain"
    SUMMARY = ("psnr", "ssim", "psnr_gain", "ssim_gain")

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
        self.data_seed = seed if self.options["data_seed"] is None else self.options["data_seed"]
        self.cache_dir = cache_root(cache_dir)
        self.progress = progress
        self.scale = self.options["scale"]
        self.data: dict[str, np.ndarray] | None = None
        self.bicubic: dict[str, float] = {}
        self.dataset_key: str | None = None
        self.cache_hit: bool | None = None

    @classmethod
    def check_options(cls, table: dict[str, Any], prefix: str = "objective") -> dict[str, Any]:
        """Validated ``[objective]`` options (defaults filled in); raises SpaceError."""
        options = check_options(table, cls.OPTIONS, prefix)
        source = options["source"]
        require(
            source in SOURCES,
            f"{prefix}.source",
            f"must be one of {', '.join(SOURCES)}, got {source!r}",
        )
        for key in ("n_train", "n_validation", "n_test"):
            require(
                1 <= options[key] <= 10_000_000,
                f"{prefix}.{key}",
                f"must be in 1..10000000, got {options[key]}",
            )
        seed = options["data_seed"]
        require(
            seed is None or (_is_int(seed) and 0 <= seed < 2**32),
            f"{prefix}.data_seed",
            f"must be an integer in 0..{2**32 - 1}, got {seed!r}",
        )
        require(
            2 <= options["scale"] <= 8,
            f"{prefix}.scale",
            f"must be in 2..8, got {options['scale']}",
        )
        _check_instrument(options, prefix)
        require(
            1 <= options["supersampling"] <= 8,
            f"{prefix}.supersampling",
            f"must be in 1..8, got {options['supersampling']}",
        )
        for key in NON_NEGATIVE_KEYS:
            require(
                math.isfinite(options[key]) and options[key] >= 0,
                f"{prefix}.{key}",
                f"must be >= 0, got {options[key]}",
            )
        for key in RANGE_KEYS:
            options[key] = _check_range(f"{prefix}.{key}", options[key], *RANGE_BOUNDS[key])
        require(
            options["eval_batch_size"] >= 1,
            f"{prefix}.eval_batch_size",
            f"must be at least 1, got {options['eval_batch_size']}",
        )
        for key in ("validation_fraction", "test_fraction"):
            require(
                0 < options[key] < 1, f"{prefix}.{key}", f"must be in (0, 1), got {options[key]}"
            )
        require(
            options["validation_fraction"] + options["test_fraction"] < 1,
            f"{prefix}.test_fraction",
            "validation_fraction + test_fraction must be below 1",
        )
        if source == "folder":
            _check_folder_options(options, prefix)
        else:
            for key in FOLDER_ONLY_KEYS:
                require(
                    options[key] == cls.OPTIONS[key],
                    f"{prefix}.{key}",
                    f'is only used with source = "folder" (source is {source!r})',
                )
            require(
                options["normalize"],
                f"{prefix}.normalize",
                'simulated images are always normalised; false is only for source = "folder"',
            )
        return options

    def dataset_config(self) -> dict[str, Any]:
        """What the dataset cache key is made of."""
        options = self.options
        if options["source"] == "folder":
            folder = Path(options["folder"]).resolve()
            return {
                "version": DATASET_VERSION,
                "source": "folder",
                "folder": str(folder),
                "files": folder_fingerprint(folder),
                "scale": self.scale,
                "validation_fraction": options["validation_fraction"],
                "test_fraction": options["test_fraction"],
                "normalize": options["normalize"],
                "data_seed": self.data_seed,
            }
        return {
            "version": DATASET_VERSION,
            "source": options["source"],
            "simulation": simulation_config(options),
            "counts": {split: options[f"n_{split}"] for split in SPLITS},
            "data_seed": self.data_seed,
        }

    def prepare(self) -> None:
        """Simulate or load the pairs and the bicubic baseline (cached on disk); idempotent."""
        if self.data is not None:
            return
        config = self.dataset_config()
        self.dataset_key = config_hash(config)
        self.data, meta, self.cache_hit = cached_arrays(
            self.cache_dir, "sr", config, lambda: self._build(config)
        )
        self.bicubic = meta["bicubic"]
        logger.info(
            "sr dataset %s (%s): bicubic PSNR %.3f dB, SSIM %.4f",
            self.dataset_key,
            "cache hit" if self.cache_hit else "built",
            self.bicubic["psnr"],
            self.bicubic["ssim"],
        )

    def _build(self, config: dict[str, Any]) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        options = self.options
        if options["source"] == "folder":
            arrays = folder_dataset(
                Path(config["folder"]),
                self.scale,
                validation_fraction=options["validation_fraction"],
                test_fraction=options["test_fraction"],
                seed=self.data_seed,
                normalize=options["normalize"],
            )
        else:
            arrays = simulate_dataset(
                config["simulation"], config["counts"], self.data_seed, progress=self.progress
            )
        arrays["test_bicubic"] = bicubic_upsample(arrays["test_lr"], self.scale)
        bicubic = image_metrics(arrays["test_hr"], arrays["test_bicubic"])
        counts = {f"n_{split}": len(arrays[f"{split}_lr"]) for split in SPLITS}
        return arrays, {"bicubic": bicubic, "dataset_key": self.dataset_key, **counts}

    def architecture(self, params: dict[str, Any]) -> dict[str, Any]:
        """Everything needed to rebuild the trial's network (family, version, builder arguments)."""
        return {
            "family": self.family.name,
            "version": self.family.version,
            "config": self.family.architecture(self.family.config({**self.training, **params})),
            "in_channels": 1,
            "scale": self.scale,
        }

    def build_model(self, params: dict[str, Any]) -> torch.nn.Module:
        """The trial's network, untrained."""
        spec = self.architecture(params)
        return self.family.build(
            spec["config"], in_channels=spec["in_channels"], scale=spec["scale"]
        )

    def run_trial(self, params: dict[str, Any], ctx: TrialContext) -> dict[str, float]:
        """Train the network sampled in ``params`` and return its test-set metrics."""
        self.prepare()
        config = self.family.config({**self.training, **params})
        seed_everything(ctx.seed)  # the initial weights depend on the trial seed only
        model = self.build_model(params)
        data = self.data
        result = train_model(
            model,
            (data["train_lr"], data["train_hr"]),
            (data["validation_lr"], data["validation_hr"]),
            loss_fn=TrainValidationLoss(sr_loss(config["loss"])),
            learning_rate=config["learning_rate"],
            batch_size=config["batch_size"],
            epochs=config["epochs"],
            weight_decay=config["weight_decay"],
            ctx=ctx,
        )
        prediction = predict(
            result.model, data["test_lr"], self.options["eval_batch_size"], ctx.device
        )
        metrics = image_metrics(data["test_hr"], np.clip(prediction, 0.0, 1.0))
        metrics.update(
            bicubic_psnr=self.bicubic["psnr"],
            bicubic_ssim=self.bicubic["ssim"],
            bicubic_mse=self.bicubic["mse"],
            psnr_gain=metrics["psnr"] - self.bicubic["psnr"],
            ssim_gain=metrics["ssim"] - self.bicubic["ssim"],
            n_params=float(parameter_count(result.model)),
            train_seconds=result.train_seconds,
            best_val_loss=result.best_val_loss,
            epochs_run=float(result.epochs_run),
        )
        ctx.log(f"PSNR {metrics['psnr']:.2f} dB ({metrics['psnr_gain']:+.2f} over bicubic)")
        self._save(result.model, params, ctx)
        sr_panels_figure(
            Path(ctx.artifact_dir) / FIGURE,
            data["test_lr"][0],
            data["test_bicubic"][0],
            np.clip(prediction[0], 0.0, 1.0),
            data["test_hr"][0],
        )
        return metrics

    def _save(self, model: torch.nn.Module, params: dict[str, Any], ctx: TrialContext) -> None:
        folder = Path(ctx.artifact_dir)
        folder.mkdir(parents=True, exist_ok=True)
        torch.save(model.cpu().state_dict(), folder / "weights.pt")
        (folder / "architecture.json").write_text(json.dumps(self.architecture(params), indent=1))

    def trial_attrs(self) -> dict[str, Any]:
        """Study-wide facts: the dataset key, split sizes, image shapes and the bicubic baseline."""
        self.prepare()
        data = self.data
        return {
            "dataset_key": self.dataset_key,
            "source": self.options["source"],
            "scale": self.scale,
            **{f"n_{split}": len(data[f"{split}_lr"]) for split in SPLITS},
            "lr_shape": list(data["test_lr"].shape[2:]),
            "hr_shape": list(data["test_hr"].shape[2:]),
            **{f"bicubic_{name}": value for name, value in self.bicubic.items()},
        }


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check_instrument(options: dict[str, Any], prefix: str) -> None:
    """Instrument overrides: None (the source's preset) or a number in range."""
    size = options["lr_size"]
    require(
        size is None or (_is_int(size) and 8 <= size <= 2048),
        f"{prefix}.lr_size",
        f"must be an integer in 8..2048, got {size!r}",
    )
    positive = ("lr_pixel_scale", "exposure_time")
    non_negative = ("psf_fwhm", "background_rms")
    for key in (*positive, *non_negative, "magnitude_zero_point"):
        value = options[key]
        if value is None:
            continue
        require(_is_number(value), f"{prefix}.{key}", f"must be a number, got {value!r}")
        if key in positive:
            require(value > 0, f"{prefix}.{key}", f"must be positive, got {value}")
        if key in non_negative:
            require(value >= 0, f"{prefix}.{key}", f"must be >= 0, got {value}")
        options[key] = float(value)


def _check_range(
    key: str, value: Any, lowest: float, highest: float, open_low: bool
) -> list[float]:
    """A [low, high] pair of finite numbers within the allowed bounds."""
    require(
        isinstance(value, list) and len(value) == 2 and all(_is_number(v) for v in value),
        key,
        f"must be a [low, high] pair of numbers, got {value!r}",
    )
    low, high = float(value[0]), float(value[1])
    require(low <= high, key, f"impossible range: low={low} > high={high}")
    below = low <= lowest if open_low else low < lowest
    bounds = f"({lowest}, {highest}]" if open_low else f"[{lowest}, {highest}]"
    require(not below and high <= highest, key, f"values must lie in {bounds}, got {value!r}")
    if key.rsplit(".", 1)[-1] in LOG_UNIFORM_KEYS:
        require(low > 0, key, f"is drawn log-uniformly: values must be > 0, got {value!r}")
    return [low, high]


def _check_folder_options(options: dict[str, Any], prefix: str) -> None:
    """source = "folder": the folder holds LR/ and HR/; simulation keys keep their defaults."""
    folder = options["folder"]
    require(bool(folder), f"{prefix}.folder", 'is required with source = "folder"')
    try:
        folder_files(Path(folder))
    except SpaceError as error:
        raise SpaceError(f"{prefix}.folder", str(error)) from None
    for key in SIMULATION_ONLY_KEYS:
        require(
            options[key] == SRObjective.OPTIONS[key],
            f"{prefix}.{key}",
            'is only used by simulated sources (source = "folder" takes its pairs from the files)',
        )
