"""The strong-lensing super-resolution objective: an SR network maps LR lensing images to HR.

A trial trains the network sampled from ``lensnas.spaces.sr.net`` on LR/HR pairs (simulated with
lenstronomy or loaded from a folder, see ``lensnas.objectives.sr.data``) and scores it on the test set
with MSE, PSNR and SSIM (``lensnas.objectives.sr.metrics``), each also as a gain over the bicubic
upsampling, and with physics-aware scores: the relative total-flux error against HR and the
consistency of the SR image, degraded by the study's PSF and binning operator, with the LR input.
The bicubic and bilinear interpolations are baseline rows of every study, computed once per
dataset and cached with it. ``consistency_weight`` (``[training]`` or ``[space]``) adds the
operator's consistency term to the training loss. With ``lens_model_fits = N`` the simulation's
lens model (SIE + external shear, Sérsic source) is fitted to the first N test images
(``lensnas.objectives.sr.lens_model``): the HR target, the LR input, bicubic and bilinear once
per dataset (cached; baseline rows of the group ``lens_model``) and every trial's SR output,
scored by the errors of the Einstein radius, ellipticity and shear against the simulated truth.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from lensnas.objectives.base import Baseline, Metric, Objective, TrialContext, ValidationScore
from lensnas.objectives.cache import cached_arrays
from lensnas.objectives.diagnostics import sr_panels_figure
from lensnas.objectives.options import check_options, require, require_folder_keys_unset
from lensnas.objectives.sr.data import (
    EXPOSURE_KEYS,
    INSTRUMENT_KEYS,
    LOG_UNIFORM_KEYS,
    POPULATION_DEFAULTS,
    RANGE_KEYS,
    SOURCES,
    SPLITS,
    clip_to_unit_range,
    folder_config,
    folder_dataset,
    folder_pairs,
    instrument_preset,
    operator_psf_fwhm_pixels,
    simulate_dataset,
    simulation_config,
)
from lensnas.objectives.sr.lens_model import (
    LENS_METRICS,
    NO_TRUTHS,
    LensFitter,
    fit_images,
    fit_settings,
    recovery_metrics,
    simulated_truths,
)
from lensnas.objectives.sr.metrics import (
    INTERPOLATIONS,
    Degradation,
    bicubic_upsample,
    image_metrics,
    physics_metrics,
    psnr_per_image,
    sr_loss,
    ssim_published_per_image,
    upsample,
)
from lensnas.objectives.sr.training import check_scale, load_denoiser, training_step
from lensnas.objectives.training import predict
from lensnas.spaces.dimensions import SpaceError
from lensnas.spaces.errors import DataError
from lensnas.spaces.sr.net import SR_NET

logger = logging.getLogger("lensnas.sr")

DATASET_VERSION = 2

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
)
# Options that only a simulated source uses (an error for source = "folder").
SIMULATION_ONLY_KEYS = (
    "n_train",
    "n_validation",
    "n_test",
    *INSTRUMENT_KEYS,
    "supersampling",
    *POPULATION_DEFAULTS,
)
FOLDER_ONLY_KEYS = ("folder", "validation_fraction", "test_fraction", "consistency_psf_fwhm")


OPTIONS: dict[str, Any] = {
    # where the pairs come from: "simulate" (DeepLense Model 1, 75 -> 150), "euclid" or
    # "hst" (lenstronomy instrument presets, 64 -> 128), or "folder" (.npy or FITS pairs)
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
    "hr_psf_fwhm": None,  # arcsec, Gaussian PSF of the HR image (0 = none), <= psf_fwhm
    "exposure_time": None,  # seconds (Poisson noise); [low, high]: log-uniform per image
    "hr_exposure_time": None,  # seconds, the HR target's (0 = noiseless); as exposure_time
    "background_rms": None,  # counts/s per LR pixel (Gaussian background noise)
    "magnitude_zero_point": None,  # magnitude of 1 count/s
    "supersampling": 1,  # ray-shooting points per HR pixel side
    **POPULATION_DEFAULTS,  # lens and source population (default: the source's)
    # folder source
    "folder": "",  # LR/ and HR/, or train_LR/train_HR stacks; relative to the working directory
    # FWHM (HR pixels) of the Gaussian PSF the LR images have beyond the HR ones, for the
    # degradation operator (HR -> LR) of the consistency score and loss; 0 = binning only
    "consistency_psf_fwhm": 0.0,
    "validation_fraction": 0.1,  # carved from train when there is no LR/validation.npy
    "test_fraction": 0.1,  # carved from train when there is no LR/test.npy
    "normalize": True,  # min-max each image to [0, 1]; false only for folders already in [0, 1]
    "eval_batch_size": 32,
    # denoised_sisr: an exported denoise_net folder, its frozen denoiser (default: trained in
    # the trial, see lensnas.objectives.sr.training); relative to the working directory
    "denoiser_folder": "",
    # lens-model recovery: fit the simulation's SIE + shear lens model (lenstronomy + scipy,
    # started near the truth) to the first N test images: the HR target, LR input, bicubic and
    # bilinear once per dataset (cached), and every trial's SR output. Measured ~0.15 s per fit
    # on one core at Model 1's 150x150 (N = 20: ~3 s per trial, ~12 s for the baselines);
    # simulated sources only (a folder has no truths); 0 = off
    "lens_model_fits": 0,
}
# The lens-model baseline rows: kind -> (name, what it is).
LENS_MODEL_ROWS = {
    "hr_target": ("HR target (lens model)", (
        "the lens model fitted to the HR target with the HR PSF: what an SR image equal to its "
        "target would give")),
    "lr_input": ("LR input (lens model)", (
        "the lens model fitted to the LR input on its own grid with the LR PSF: what the "
        "observation gives without SR")),
    "bicubic": ("bicubic (lens model)", (
        "the lens model fitted to the bicubic upsampling on the HR grid with the HR PSF")),
    "bilinear": ("bilinear (lens model)", (
        "the lens model fitted to the bilinear upsampling on the HR grid with the HR PSF")),
}


class SRObjective(Objective):
    """Train an SR network on lensing image pairs; score PSNR/SSIM and their gain over bicubic."""

    name = "sr"
    family = SR_NET
    OPTIONS: ClassVar[dict[str, Any]] = OPTIONS
    METRICS: ClassVar[dict[str, Metric]] = {
        "psnr": Metric("maximize", "PSNR of the SR image against HR (dB, data range 1)", summary=True),
        "ssim": Metric("maximize", "SSIM against HR (Gaussian window 11, sigma 1.5)", summary=True),
        "psnr_gain": Metric("maximize", "PSNR minus the bicubic upsampling's PSNR (dB)", summary=True),
        "ssim_gain": Metric("maximize", "SSIM minus the bicubic upsampling's SSIM", summary=True),
        "ssim_published": Metric(
            "maximize", "SSIM in the convention of DeepLense's published Model-1 numbers "
            "(scikit-image's defaults: 7x7 uniform window, data range of the SR image)"),
        "mse": Metric("minimize", "mean squared error against HR"),
        "flux_error": Metric(
            "minimize", "|total flux of SR - HR's| / HR's, per image, averaged", summary=True),
        "consistency_rms": Metric(
            "minimize", "RMS of the LR input minus the SR image degraded by the study's PSF and "
            "binning (best gain and offset), in LR [0, 1] units", summary=True),
        "consistency_chi": Metric(
            "minimize", "consistency_rms in units of the LR image's noise RMS (simulated data; "
            "1: as consistent as the noise allows)", summary=True),
        "lens_theta_e_bias": Metric(
            None, "mean error of the Einstein radius of the lens model fitted to the SR image "
            "(arcsec; the first lens_model_fits test images)", summary=True),
        "lens_theta_e_scatter": Metric(
            "minimize", "RMS error of the fitted Einstein radius, bias included (arcsec)",
            summary=True),
        "lens_ellipticity_scatter": Metric(
            "minimize", "RMS length of the fitted SIE ellipticity's (e1, e2) error", summary=True),
        "lens_shear_scatter": Metric(
            "minimize", "RMS length of the fitted external shear's (gamma1, gamma2) error",
            summary=True),
        "validation_score": Metric("maximize", "best per-epoch validation PSNR gain over bicubic (dB)"),
        "n_params": Metric("minimize", "trainable parameters"),
        "train_seconds": Metric("minimize", "training time in seconds"),
    }
    DEFAULT_METRIC = "psnr_gain"
    BASELINE_GROUPS: ClassVar[dict[str, tuple[str, str]]] = {
        "lens_model": (
            "Lens-model recovery",
            ("The simulation's SIE + external shear lens model fitted with lenstronomy to the "
             "first lens_model_fits test images, each from its truth slightly perturbed: errors "
             "of the Einstein radius (arcsec), the SIE ellipticity and the shear against the "
             "truth."),
        ),
    }
    VALIDATION_SCORE = ValidationScore(
        "validation PSNR gain over bicubic (dB)", "maximize", "psnr_gain"
    )

    def setup(self) -> None:
        self.data_seed = self.seed if self.options["data_seed"] is None else self.options["data_seed"]
        self.scale = self.options["scale"]
        self.operator = Degradation(self.scale, self.operator_psf_fwhm())
        self._test_prediction: np.ndarray | None = None
        self.lens_truths: np.ndarray | None = None
        self.lens_summary: dict[str, Any] = {}

    def operator_psf_fwhm(self) -> float:
        """FWHM (HR pixels) of the PSF in the degradation operator: from the simulation, or the
        folder's ``consistency_psf_fwhm``."""
        if self.options["source"] == "folder":
            return self.options["consistency_psf_fwhm"]
        return operator_psf_fwhm_pixels(simulation_config(self.options))

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
                options[key] is None or (_is_number(options[key]) and options[key] >= 0),
                f"{prefix}.{key}",
                f"must be a number >= 0, got {options[key]!r}",
            )
        for key in RANGE_KEYS:
            if options[key] is not None:
                options[key] = _check_range(f"{prefix}.{key}", options[key], *RANGE_BOUNDS[key])
        require(
            math.isfinite(options["consistency_psf_fwhm"]) and options["consistency_psf_fwhm"] >= 0,
            f"{prefix}.consistency_psf_fwhm",
            f"must be >= 0 (HR pixels), got {options['consistency_psf_fwhm']}",
        )
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
            require_folder_keys_unset(options, OPTIONS, FOLDER_ONLY_KEYS, prefix)
        fits = options["lens_model_fits"]
        require(0 <= fits <= 10_000, f"{prefix}.lens_model_fits",
                f"must be in 0..10000 (test images; 0 = off), got {fits}")
        require(source == "folder" or fits <= options["n_test"], f"{prefix}.lens_model_fits",
                f"must not exceed n_test ({options['n_test']}), got {fits}")
        if options["denoiser_folder"]:
            load_denoiser(options["denoiser_folder"])  # DataError in one line if unusable
        return options

    @classmethod
    def check_training(
        cls, training: dict[str, Any], space: list[Any], options: dict[str, Any]
    ) -> None:
        """lapsrn (a backbone or sisr_backbone the space may choose) needs a power-of-2 scale."""
        check_scale(training, space, options["scale"])

    @classmethod
    def check_metrics(
        cls, metrics: tuple[str, ...], options: dict[str, Any], prefix: str = "study.metrics"
    ) -> None:
        """consistency_chi needs the LR noise, which only simulated sources know."""
        if "consistency_chi" in metrics and options["source"] == "folder":
            raise SpaceError(prefix, 'consistency_chi needs the LR noise of a simulated source; '
                             'with source = "folder" use consistency_rms')
        lens = [metric for metric in metrics if metric in LENS_METRICS]
        if lens and options["source"] == "folder":
            raise SpaceError(prefix, f"{lens[0]} needs the lens parameters of a simulated source; "
                             'a source = "folder" dataset has none')
        if lens and options["lens_model_fits"] == 0:
            raise SpaceError(prefix, f"{lens[0]} needs lens-model fits: set [objective] "
                             "lens_model_fits to a number of test images (e.g. 20)")

    def dataset_config(self) -> dict[str, Any]:
        """What the dataset cache key is made of."""
        options = self.options
        if options["source"] == "folder":
            return {"version": DATASET_VERSION, **folder_config(options, self.data_seed),
                    "scale": self.scale}
        return {
            "version": DATASET_VERSION,
            "source": options["source"],
            "simulation": simulation_config(options),
            "counts": {split: options[f"n_{split}"] for split in SPLITS},
            "data_seed": self.data_seed,
        }

    def load_data(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """Simulate or read the LR/HR pairs, and the bicubic and bilinear upsampling of the test
        set with their scores."""
        options, config = self.options, self.dataset_config()
        meta: dict[str, Any] = {}
        if options["source"] == "folder":
            arrays = folder_dataset(
                Path(config["folder"]),
                self.scale,
                validation_fraction=options["validation_fraction"],
                test_fraction=options["test_fraction"],
                seed=self.data_seed,
                normalize=options["normalize"],
            )
            meta["clipped_values"] = clip_to_unit_range(arrays)
        else:
            arrays = simulate_dataset(
                config["simulation"], config["counts"], self.data_seed, progress=self.progress
            )
        for mode in INTERPOLATIONS:
            arrays[f"test_{mode}"] = upsample(arrays["test_lr"], self.scale, mode)
            meta[mode] = self._test_metrics(arrays[f"test_{mode}"], arrays)
        return arrays, meta

    def _test_metrics(self, estimate: np.ndarray, data: dict[str, np.ndarray]) -> dict[str, float]:
        """Image and physics metrics of HR ``estimate`` on the test set."""
        metrics = image_metrics(data["test_hr"], estimate)
        metrics["ssim_published"] = float(np.mean(ssim_published_per_image(data["test_hr"], estimate)))
        metrics.update(physics_metrics(data["test_hr"], estimate, data["test_lr"], self.operator,
                                       data.get("test_lr_noise")))
        return metrics

    def after_load(self) -> None:
        validation_bicubic = bicubic_upsample(self.data["validation_lr"], self.scale)
        self.validation_bicubic_psnr = self._mean_psnr(self.data["validation_hr"], validation_bicubic)
        bicubic, bilinear = self.meta["bicubic"], self.meta["bilinear"]
        self.baselines = [
            Baseline(
                "bicubic", "bicubic interpolation",
                "the LR image upsampled by bicubic interpolation: what a network must beat",
                {k: float(v) for k, v in bicubic.items()},
            ),
            Baseline(
                "bilinear", "bilinear interpolation",
                "the LR image upsampled by bilinear interpolation: DeepLense's published baseline",
                {k: float(v) for k, v in bilinear.items()},
            ),
        ]
        logger.info(
            "sr dataset %s (%s): bicubic PSNR %.3f dB, SSIM %.4f; bilinear %.3f dB, %.4f",
            self.dataset_key, "cache hit" if self.cache_hit else "built", bicubic["psnr"],
            bicubic["ssim"], bilinear["psnr"], bilinear["ssim"],
        )
        clipped = self.meta.get("clipped_values", 0)
        if clipped:
            logger.warning("sr dataset %s: %d values outside [0, 1] clipped (normalize = false)",
                           self.options["folder"], clipped)
        if self.options["lens_model_fits"] > 0:
            self._lens_model_baselines()

    def _lens_model_baselines(self) -> None:
        """Fit the lens model to the first ``lens_model_fits`` test images of the HR target, LR
        input, bicubic and bilinear (cached per dataset and fit settings); baseline rows."""
        if self.options["source"] == "folder":
            self.lens_summary = {"unavailable": NO_TRUTHS}
            logger.warning("sr dataset %s: %s", self.options["folder"], NO_TRUTHS)
            return
        count = self.options["lens_model_fits"]
        key = {"dataset_key": self.dataset_key, "images": count, "fit": fit_settings()}
        arrays, meta, _ = cached_arrays(self.cache_dir, "sr-lens-model", key,
                                        lambda: self._fit_lens_baselines(count))
        self.lens_truths = np.asarray(arrays["truths"])
        self.lens_summary = {"images": count, "seconds_per_fit": meta["seconds_per_fit"],
                             "start": "the truth plus fixed Gaussian offsets (a local fit)"}
        for kind, (name, description) in LENS_MODEL_ROWS.items():
            self.baselines.append(Baseline(f"lens_{kind}", name, description,
                                           {k: float(v) for k, v in meta[kind].items()},
                                           group="lens_model"))
        logger.info("sr dataset %s: lens-model fits of %d test images, %.2f s per fit",
                    self.dataset_key, count, meta["seconds_per_fit"])

    def _fit_lens_baselines(self, count: int) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """The truths of the first ``count`` test images and the lens-model fits of the HR
        target, LR input, bicubic and bilinear: (arrays, meta with each kind's metrics)."""
        config = self.dataset_config()
        truths = simulated_truths(config["simulation"], self.options["n_test"], self.data_seed,
                                  count)
        hr_fitter = LensFitter(config["simulation"], "hr")
        images = {"hr_target": (hr_fitter, self.data["test_hr"], None),
                  "lr_input": (LensFitter(config["simulation"], "lr"), self.data["test_lr"],
                               self.data["test_lr_noise"]),
                  "bicubic": (hr_fitter, self.data["test_bicubic"], None),
                  "bilinear": (hr_fitter, self.data["test_bilinear"], None)}
        arrays: dict[str, np.ndarray] = {"truths": truths}
        meta: dict[str, Any] = {}
        seconds = []
        for kind, (fitter, stack, noise) in images.items():
            fitted, chi2, took = fit_images(fitter, stack, truths, noise)
            arrays[f"{kind}_fit"], arrays[f"{kind}_chi2"] = fitted, chi2
            meta[kind] = recovery_metrics(fitted, truths)
            seconds.extend(took)
        meta["seconds_per_fit"] = float(np.mean(seconds))
        return arrays, meta

    def split_sizes(self) -> dict[str, int]:
        return {split: len(self.data[f"{split}_lr"]) for split in SPLITS}

    def extra_attrs(self) -> dict[str, Any]:
        return {
            "source": self.options["source"],
            "scale": self.scale,
            "lr_shape": list(self.data["test_lr"].shape[2:]),
            "hr_shape": list(self.data["test_hr"].shape[2:]),
            "degradation": {"psf_fwhm_hr_pixels": self.operator.psf_fwhm_pixels,
                            "binning": self.scale},
            **({"clipped_values": self.meta["clipped_values"]}
               if "clipped_values" in self.meta else {}),
            **({"lens_model": self.lens_summary} if self.lens_summary else {}),
        }

    def baseline_notes(self) -> list[str]:
        """Why there are no lens-model rows, when fits were asked of a folder dataset."""
        self.prepare()
        reason = self.lens_summary.get("unavailable")
        return [reason] if reason else []

    def architecture_arguments(self) -> dict[str, Any]:
        return {"in_channels": 1, "scale": self.scale}

    def training_data(self, config: dict[str, Any]) -> tuple[Any, Any]:
        return self.data["train_lr"], self.data["train_hr"]

    def architecture(self, params: dict[str, Any]) -> dict[str, Any]:
        """The base's, plus the exported denoiser's configuration for denoised_sisr."""
        spec = super().architecture(params)
        if spec["config"]["backbone"] == "denoised_sisr" and self.options["denoiser_folder"]:
            spec["denoiser"] = load_denoiser(self.options["denoiser_folder"])[0]
        return spec

    def loss(self, config: dict[str, Any]) -> Any:
        """The trial's loss, or for lapsrn, srgan and denoised_sisr their training step."""
        loss = sr_loss(config["loss"], config["consistency_weight"], self.operator)
        return training_step(config, loss, self.operator, self.options["denoiser_folder"] or None)

    @staticmethod
    def _mean_psnr(truth: np.ndarray, estimate: np.ndarray) -> float:
        return float(np.mean(psnr_per_image(truth, np.clip(estimate, 0.0, 1.0))))

    def validation_score(self, model: torch.nn.Module, device: str) -> float:
        """Mean PSNR (dB) of the validation images minus bicubic's: the validation estimate of
        psnr_gain, comparable across losses and trials."""
        prediction = predict(model, self.data["validation_lr"], self.options["eval_batch_size"], device)
        return self._mean_psnr(self.data["validation_hr"], prediction) - self.validation_bicubic_psnr

    def score(self, model: torch.nn.Module, config: dict[str, Any], ctx: TrialContext) -> dict[str, Any]:
        """MSE, PSNR and SSIM on the test set, and their gains over bicubic."""
        prediction = predict(model, self.data["test_lr"], self.options["eval_batch_size"], ctx.device)
        self._test_prediction = np.clip(prediction, 0.0, 1.0)
        metrics: dict[str, Any] = self._test_metrics(self._test_prediction, self.data)
        bicubic = self.baselines[0].metrics
        metrics.update(psnr_gain=metrics["psnr"] - bicubic["psnr"], ssim_gain=metrics["ssim"] - bicubic["ssim"])
        ctx.log(f"PSNR {metrics['psnr']:.2f} dB ({metrics['psnr_gain']:+.2f} over bicubic)")
        if self.lens_truths is not None:
            metrics.update(self.lens_model_metrics(self._test_prediction))
            ctx.log(f"lens model: theta_E RMS error {metrics['lens_theta_e_scatter']:.4f} arcsec "
                    f"over {len(self.lens_truths)} test images")
        return metrics

    def lens_model_metrics(self, prediction: np.ndarray) -> dict[str, float]:
        """The lens-model recovery scores of HR-grid images of the test set (its first
        ``lens_model_fits``), fitted with the HR PSF."""
        fitter = LensFitter(self.dataset_config()["simulation"], "hr")
        fitted, _, _ = fit_images(fitter, prediction, self.lens_truths)
        return recovery_metrics(fitted, self.lens_truths)

    def figure(self, model: torch.nn.Module, path: Path) -> None:
        data = self.data
        sr_panels_figure(path, data["test_lr"][0], data["test_bicubic"][0], self._test_prediction[0], data["test_hr"][0])


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
    for key in EXPOSURE_KEYS:
        value = options[key]
        low = 0.0 if key == "hr_exposure_time" else None  # 0: a noiseless HR target
        if isinstance(value, list):
            require(
                len(value) == 2 and all(_is_number(v) and v > 0 for v in value)
                and value[0] <= value[1],
                f"{prefix}.{key}",
                f"must be a number of seconds or a [low, high] pair with 0 < low <= high, "
                f"got {value!r}",
            )
            options[key] = [float(v) for v in value]
        elif value is not None:
            require(
                _is_number(value) and (value > 0 or (low is not None and value == low)),
                f"{prefix}.{key}",
                f"must be a {'number >= 0' if low is not None else 'positive number'} of seconds "
                f"or a [low, high] pair, got {value!r}",
            )
            options[key] = float(value)
    positive = ("lr_pixel_scale",)
    non_negative = ("psf_fwhm", "hr_psf_fwhm", "background_rms")
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
    if options["hr_psf_fwhm"] is not None and options["source"] != "folder":
        psf = options["psf_fwhm"]
        psf = instrument_preset(options["source"])["psf_fwhm"] if psf is None else psf
        require(
            options["hr_psf_fwhm"] <= psf,
            f"{prefix}.hr_psf_fwhm",
            f"must not exceed the LR PSF's FWHM ({psf} arcsec): the HR image is the sharper one",
        )


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
    """source = "folder": the folder holds LR/HR pairs; simulation keys keep their defaults."""
    folder = options["folder"]
    require(bool(folder), f"{prefix}.folder", 'is required with source = "folder"')
    try:
        folder_pairs(Path(folder))
    except DataError as error:
        raise SpaceError(f"{prefix}.folder", str(error)) from None
    for key in SIMULATION_ONLY_KEYS:
        require(
            options[key] == OPTIONS[key],
            f"{prefix}.{key}",
            'is only used by simulated sources (source = "folder" takes its pairs from the files)',
        )
