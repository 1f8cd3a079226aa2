"""The strong-lensing denoising objective: a network maps a noisy LR image to the clean one.

DeepLense's Denoiser (the first stage of DenoisedSISR). Clean images are the noiseless LR
images of the super-resolution simulation, or a user's folder of ``.npy`` images
(``lensnas.objectives.denoise.data``); the objective adds ``noise_type`` noise of
``noise_level`` itself, seeded, so every trial sees the same noisy images. A trial trains a
``lensnas.spaces.sr.denoise`` network on (noisy, clean) pairs and is scored on the test set
with MSE, PSNR and SSIM (``lensnas.objectives.sr.metrics``: data range 1, scikit-image's
convention) of its output clipped to [0, 1], each also as a gain over the noisy input (clipped
to [0, 1] as well, so clipping alone gains nothing).

``noise_type`` and ``noise_level`` are ``[objective]`` options, and may also be set in
``[training]`` or searched in ``[space]`` (the family lists them as training keys): a trial's
value overrides the ``[objective]`` one. A trial's other noise is generated once, cached on
disk next to the dataset, and its gains are over its own noisy input (stored with the trial
as the metric group ``noisy_input``).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from lensnas.objectives.base import (
    Baseline,
    Metric,
    Objective,
    TrainingResult,
    TrialContext,
    ValidationScore,
)
from lensnas.objectives.cache import cached_arrays
from lensnas.objectives.denoise.data import (
    MIN_SIDE,
    clean_simulation_config,
    folder_clean_dataset,
    folder_files,
    folder_fingerprint,
    noisy_splits,
    simulate_clean,
)
from lensnas.objectives.diagnostics import image_panels_figure
from lensnas.objectives.options import check_options, require, require_folder_keys_unset
from lensnas.objectives.sr.data import POPULATION_DEFAULTS, SOURCES, SPLITS, folder_config
from lensnas.objectives.sr.metrics import image_metrics, psnr_per_image, sr_loss
from lensnas.objectives.sr.objective import SRObjective
from lensnas.objectives.training import predict
from lensnas.spaces.dimensions import SpaceError
from lensnas.spaces.errors import DataError, OptionError
from lensnas.spaces.sr.denoise import DENOISE_NET, MAX_NOISE_LEVEL, NOISE_TYPES

logger = logging.getLogger("lensnas.denoise")

DATASET_VERSION = 1
NOISY_INPUT_DESCRIPTION = (
    "the noisy input itself, clipped to [0, 1]: what a denoiser must improve on"
)

OPTIONS: dict[str, Any] = {
    # clean images: "simulate" (DeepLense Model 1, 75x75), "euclid" or "hst" (lenstronomy
    # instrument presets, 64x64): the SR simulation's LR images without noise; or "folder"
    "source": "simulate",
    "n_train": 1000,
    "n_validation": 200,
    "n_test": 200,
    "data_seed": None,  # default: the study seed
    "lr_size": None,  # pixels per side (default: the source's preset)
    "lr_pixel_scale": None,  # arcsec per pixel (default: the source's preset)
    "psf_fwhm": None,  # arcsec, Gaussian PSF (default: the source's preset)
    "supersampling": 1,  # ray-shooting points per (2x finer) simulation pixel side
    **POPULATION_DEFAULTS,  # lens and source population, as the SR objective's
    # folder source: .npy files of clean images (see lensnas.objectives.denoise.data)
    "folder": "",
    "validation_fraction": 0.1,  # carved from train when there is no validation.npy
    "test_fraction": 0.1,  # carved from train when there is no test.npy
    "normalize": True,  # min-max each image to [0, 1]; false only for folders already in [0, 1]
    # the noise added to the clean images (a trial's noise_type / noise_level overrides it):
    # gaussian: sigma; poisson: 1 / counts at value 1; uniform: half-width; salt_and_pepper:
    # fraction of pixels. All on [0, 1] images, level in [0, 1].
    "noise_type": "gaussian",
    "noise_level": 0.1,
    "eval_batch_size": 32,
}
SIMULATION_KEYS = (
    "n_train", "n_validation", "n_test", "lr_size", "lr_pixel_scale", "psf_fwhm",
    "supersampling", *POPULATION_DEFAULTS,
)
FOLDER_KEYS = ("folder", "validation_fraction", "test_fraction")


@dataclass(frozen=True)
class NoisySet:
    """The noisy images of one noise setting, by split, and the noisy input's scores."""

    noise_type: str
    noise_level: float
    images: dict[str, np.ndarray]
    input_metrics: dict[str, float]  # mse, psnr, ssim of the clipped noisy test images
    validation_psnr: float  # mean PSNR (dB) of the clipped noisy validation images


class DenoiseObjective(Objective):
    """Train a denoiser on noisy/clean lensing images; score PSNR/SSIM and their gain."""

    name = "denoise"
    family = DENOISE_NET
    OPTIONS: ClassVar[dict[str, Any]] = OPTIONS
    METRICS: ClassVar[dict[str, Metric]] = {
        "psnr": Metric("maximize", "PSNR of the denoised image against the clean one (dB, data "
                       "range 1)", summary=True),
        "ssim": Metric("maximize", "SSIM against the clean image (Gaussian window 11, sigma 1.5)",
                       summary=True),
        "psnr_gain": Metric("maximize", "PSNR minus the noisy input's PSNR (dB)", summary=True),
        "ssim_gain": Metric("maximize", "SSIM minus the noisy input's SSIM", summary=True),
        "mse": Metric("minimize", "mean squared error against the clean image"),
        "validation_score": Metric(
            "maximize", "best per-epoch validation PSNR gain over the noisy input (dB)"
        ),
        "n_params": Metric("minimize", "trainable parameters"),
        "train_seconds": Metric("minimize", "training time in seconds"),
    }
    DEFAULT_METRIC = "psnr_gain"
    VALIDATION_SCORE = ValidationScore(
        "validation PSNR gain over the noisy input (dB)", "maximize", "psnr_gain"
    )
    BASELINE_COLUMNS: ClassVar[tuple[str, ...]] = ("mse",)

    def setup(self) -> None:
        options = self.options
        self.data_seed = self.seed if options["data_seed"] is None else options["data_seed"]
        self.noise = (options["noise_type"], options["noise_level"])
        self._noisy_sets: dict[tuple[str, float], NoisySet] = {}
        self._active: NoisySet | None = None
        self._test_prediction: np.ndarray | None = None

    @classmethod
    def check_options(cls, table: dict[str, Any], prefix: str = "objective") -> dict[str, Any]:
        """Validated ``[objective]`` options (defaults filled in); raises SpaceError."""
        options = check_options(table, cls.OPTIONS, prefix)
        source = options["source"]
        require(source in SOURCES, f"{prefix}.source",
                f"must be one of {', '.join(SOURCES)}, got {source!r}")
        check_noise(options["noise_type"], options["noise_level"], prefix)
        options["noise_level"] = float(options["noise_level"])
        require(options["eval_batch_size"] >= 1, f"{prefix}.eval_batch_size",
                f"must be at least 1, got {options['eval_batch_size']}")
        size = options["lr_size"]
        require(size is None or not isinstance(size, int) or size >= MIN_SIDE, f"{prefix}.lr_size",
                f"must be at least {MIN_SIDE} (the SSIM window), got {size}")
        # the simulation's keys, the data seed and their messages are the SR objective's
        shared = ("data_seed",) if source == "folder" else ("source", "data_seed", *SIMULATION_KEYS)
        checked = SRObjective.check_options({key: options[key] for key in shared}, prefix)
        options.update({key: checked[key] for key in shared})
        if source == "folder":
            _check_folder_options(options, prefix)
        else:
            require_folder_keys_unset(options, OPTIONS, FOLDER_KEYS, prefix)
        return options

    # ----- data

    def clean_config(self) -> dict[str, Any]:
        """What the clean images are made of (source, simulation or files, counts, seed)."""
        options = self.options
        if options["source"] == "folder":
            return folder_config(options, self.data_seed, folder_fingerprint)
        return {
            "source": options["source"],
            "simulation": clean_simulation_config(options),
            "counts": {split: options[f"n_{split}"] for split in SPLITS},
            "data_seed": self.data_seed,
        }

    def dataset_config(self) -> dict[str, Any]:
        """The clean images and the ``[objective]`` noise."""
        noise_type, level = self.noise
        return {
            "version": DATASET_VERSION,
            "clean": self.clean_config(),
            "noise": {"type": noise_type, "level": level},
        }

    def load_data(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """Clean images by split, their noisy versions, and the noisy input's test scores."""
        config, options = self.dataset_config()["clean"], self.options
        if options["source"] == "folder":
            clean = folder_clean_dataset(
                Path(config["folder"]),
                validation_fraction=options["validation_fraction"],
                test_fraction=options["test_fraction"],
                seed=self.data_seed,
                normalize=options["normalize"],
            )
        else:
            clean = simulate_clean(
                config["simulation"], config["counts"], self.data_seed, progress=self.progress
            )
        noisy, meta = self._noisy_arrays(clean, *self.noise)
        arrays = {f"{split}_clean": clean[split] for split in SPLITS}
        arrays.update({f"{split}_noisy": noisy[split] for split in SPLITS})
        return arrays, meta

    def _noisy_arrays(
        self, clean: dict[str, np.ndarray], noise_type: str, level: float
    ) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        noisy = noisy_splits(clean, noise_type, level, self.data_seed)
        clipped = {split: np.clip(images, 0.0, 1.0) for split, images in noisy.items()}
        meta = {
            "noisy_input": image_metrics(clean["test"], clipped["test"]),
            "noisy_validation_psnr": float(
                np.mean(psnr_per_image(clean["validation"], clipped["validation"]))
            ),
        }
        return noisy, meta

    def after_load(self) -> None:
        noise_type, level = self.noise
        noisy = {split: self.data[f"{split}_noisy"] for split in SPLITS}
        self._remember(NoisySet(noise_type, level, noisy, self._input_metrics(self.meta),
                                float(self.meta["noisy_validation_psnr"])))
        self.baselines = [self._baseline(self._noisy_sets[self.noise])]
        logger.info(
            "denoise dataset %s (%s): %s noise %g, noisy input PSNR %.3f dB, SSIM %.4f",
            self.dataset_key, "cache hit" if self.cache_hit else "built", noise_type, level,
            self.baselines[0].metrics["psnr"], self.baselines[0].metrics["ssim"],
        )

    @staticmethod
    def _input_metrics(meta: dict[str, Any]) -> dict[str, float]:
        return {key: float(value) for key, value in meta["noisy_input"].items()}

    def _remember(self, noisy: NoisySet) -> None:
        """Keep the ``[objective]`` noise and the latest other one (memory-mapped arrays)."""
        key = (noisy.noise_type, noisy.noise_level)
        for old in [k for k in self._noisy_sets if k not in (self.noise, key)]:
            del self._noisy_sets[old]
        self._noisy_sets[key] = noisy

    def noisy_set(self, noise_type: str, level: float) -> NoisySet:
        """The noisy images of ``noise_type`` at ``level``, generated once and cached on disk."""
        self.prepare()
        check_noise(noise_type, level, "noise")
        key = (noise_type, float(level))
        if key in self._noisy_sets:
            return self._noisy_sets[key]
        clean = {split: self.data[f"{split}_clean"] for split in SPLITS}
        config = {
            "version": DATASET_VERSION,
            "clean": self.clean_config(),
            "noise": {"type": noise_type, "level": float(level)},
        }
        arrays, meta, _ = cached_arrays(
            self.cache_dir, f"{self.name}-noise", config,
            lambda: self._noisy_arrays(clean, noise_type, float(level)),
        )
        noisy = NoisySet(noise_type, float(level), dict(arrays), self._input_metrics(meta),
                         float(meta["noisy_validation_psnr"]))
        self._remember(noisy)
        return noisy

    def trial_noise(self, config: dict[str, Any]) -> tuple[str, float]:
        """A trial's (noise type, level): its config's when set there, else ``[objective]``'s."""
        noise_type = config.get("noise_type", self.noise[0])
        level = config.get("noise_level", self.noise[1])
        check_noise(noise_type, level, "space")
        return noise_type, float(level)

    def _baseline(self, noisy: NoisySet, conditions: dict[str, Any] | None = None) -> Baseline:
        return Baseline("noisy_input", "noisy input", NOISY_INPUT_DESCRIPTION,
                        dict(noisy.input_metrics), conditions or {})

    def split_sizes(self) -> dict[str, int]:
        return {split: len(self.data[f"{split}_clean"]) for split in SPLITS}

    def extra_attrs(self) -> dict[str, Any]:
        return {
            "source": self.options["source"],
            "image_shape": list(self.data["test_clean"].shape[2:]),
            "noise_type": self.noise[0],
            "noise_level": self.noise[1],
        }

    def baseline_table(self, noise_levels: list[float] | None = None) -> list[Baseline]:
        """The noisy input on the test set, also at other ``noise_levels`` of the same type."""
        self.prepare()
        rows = list(self.baselines)
        for level in noise_levels or []:
            if not (math.isfinite(level) and 0.0 <= level <= MAX_NOISE_LEVEL):
                raise OptionError(f"--noise: levels must be in [0, {MAX_NOISE_LEVEL}], got {level}")
            noisy = self.noisy_set(self.noise[0], level)
            rows.append(self._baseline(noisy, {"noise_level": float(level)}))
        return rows

    # ----- model, training and scoring

    def architecture_arguments(self) -> dict[str, Any]:
        return {"in_channels": 1}

    def train(self, model: Any, config: dict[str, Any], ctx: TrialContext) -> TrainingResult:
        """Select the trial's noise (searched ``noise_type`` / ``noise_level``), then train."""
        self._active = self.noisy_set(*self.trial_noise(config))
        return super().train(model, config, ctx)

    def training_data(self, config: dict[str, Any]) -> tuple[Any, Any]:
        active = self._active or self._noisy_sets[self.noise]
        return active.images["train"], self.data["train_clean"]

    def loss(self, config: dict[str, Any]) -> torch.nn.Module:
        return sr_loss(config["loss"])

    def validation_score(self, model: torch.nn.Module, device: str) -> float:
        """Mean validation PSNR (dB) of the clipped output, minus the noisy input's."""
        active = self._active or self._noisy_sets[self.noise]
        batch = self.options["eval_batch_size"]
        prediction = np.clip(predict(model, active.images["validation"], batch, device), 0.0, 1.0)
        psnr = float(np.mean(psnr_per_image(self.data["validation_clean"], prediction)))
        return psnr - active.validation_psnr

    def score(
        self, model: torch.nn.Module, config: dict[str, Any], ctx: TrialContext
    ) -> dict[str, Any]:
        """MSE, PSNR and SSIM on the test set, their gains over the noisy input, and its scores."""
        noisy = self.noisy_set(*self.trial_noise(config))
        batch = self.options["eval_batch_size"]
        prediction = predict(model, noisy.images["test"], batch, ctx.device)
        self._active, self._test_prediction = noisy, np.clip(prediction, 0.0, 1.0)
        metrics: dict[str, Any] = image_metrics(self.data["test_clean"], self._test_prediction)
        metrics.update(
            psnr_gain=metrics["psnr"] - noisy.input_metrics["psnr"],
            ssim_gain=metrics["ssim"] - noisy.input_metrics["ssim"],
            noisy_input=dict(noisy.input_metrics),
        )
        ctx.log(f"PSNR {metrics['psnr']:.2f} dB ({metrics['psnr_gain']:+.2f} over the noisy input)")
        return metrics

    def figure(self, model: torch.nn.Module, path: Path) -> None:
        if self._active is None or self._test_prediction is None:
            return
        noisy = self._active
        image_panels_figure(path, {
            f"noisy ({noisy.noise_type} {noisy.noise_level:g})": noisy.images["test"][0],
            "denoised (network)": self._test_prediction[0],
            "clean (truth)": self.data["test_clean"][0],
        })


def check_noise(noise_type: Any, level: Any, prefix: str) -> None:
    """Raise SpaceError unless ``noise_type`` is known and ``level`` is a number in [0, 1]."""
    require(noise_type in NOISE_TYPES, f"{prefix}.noise_type",
            f"must be one of {', '.join(NOISE_TYPES)}, got {noise_type!r}")
    is_number = isinstance(level, (int, float)) and not isinstance(level, bool)
    require(is_number and math.isfinite(level) and 0.0 <= level <= MAX_NOISE_LEVEL,
            f"{prefix}.noise_level",
            f"must be a number in [0, {MAX_NOISE_LEVEL}] ({noise_type}: "
            f"{NOISE_LEVEL_MEANING.get(noise_type, 'see the noise type')}), got {level!r}")


NOISE_LEVEL_MEANING = {
    "gaussian": "the standard deviation",
    "poisson": "1 / counts at value 1",
    "uniform": "the half-width",
    "salt_and_pepper": "the fraction of pixels",
}


def _check_folder_options(options: dict[str, Any], prefix: str) -> None:
    """source = "folder": the folder holds .npy images; simulation keys keep their defaults."""
    folder = options["folder"]
    require(bool(folder), f"{prefix}.folder", 'is required with source = "folder"')
    try:
        folder_files(Path(folder))
    except DataError as error:
        raise SpaceError(f"{prefix}.folder", str(error)) from None
    for key in ("validation_fraction", "test_fraction"):
        require(0 < options[key] < 1, f"{prefix}.{key}", f"must be in (0, 1), got {options[key]}")
    require(options["validation_fraction"] + options["test_fraction"] < 1,
            f"{prefix}.test_fraction", "validation_fraction + test_fraction must be below 1")
    for key in SIMULATION_KEYS:
        require(options[key] == OPTIONS[key], f"{prefix}.{key}",
                'is only used by simulated sources (source = "folder" reads the images)')
