"""The SR objective end to end at a tiny size: real lenstronomy data, real torch training."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from lensnas.objectives import objective_class
from lensnas.objectives.base import LocalContext, TrialPruned
from lensnas.objectives.sr.lens_model import LENS_METRICS
from lensnas.objectives.sr.objective import SRObjective
from lensnas.objectives.training import predict
from lensnas.spaces.dimensions import admits

STUDIES = Path(__file__).resolve().parent.parent / "studies"
TINY_DATA = {"n_train": 16, "n_validation": 4, "n_test": 4, "lr_size": 16, "lr_pixel_scale": 0.2}
TINY_TRAINING = {"epochs": 2, "batch_size": 8, "learning_rate": 3e-3}
TINY_NET = {"depth": 1, "width": 8, "loss": "ssim_l1"}


def make(cache_dir: Path, **options) -> SRObjective:
    return SRObjective(
        {**TINY_DATA, **options}, TINY_TRAINING, seed=3, cache_dir=cache_dir, progress=False
    )


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> SRObjective:
    objective = make(tmp_path_factory.mktemp("cache"))
    objective.prepare()
    return objective


def test_registered_by_name():
    assert objective_class("sr") is SRObjective
    assert SRObjective.DEFAULT_METRIC in SRObjective.METRICS
    # None: a bias (lens_theta_e_bias), reported and not optimised
    assert {m.direction for m in SRObjective.METRICS.values()} <= {"minimize", "maximize", None}


def test_prepare_and_run_trial_give_finite_metrics(prepared, tmp_path):
    ctx = LocalContext(artifact_dir=tmp_path / "trial", seed=1)
    metrics = prepared.run_trial(TINY_NET, ctx)
    expected = {
        "psnr",
        "ssim",
        "mse",
        "psnr_gain",
        "ssim_gain",
        "n_params",
        "train_seconds",
        "validation_score",
    }
    # the lens-model scores come only with [objective] lens_model_fits (tests/test_sr_lens_model.py)
    assert expected <= set(metrics) and set(SRObjective.METRICS) - set(LENS_METRICS) <= set(metrics)
    assert all(isinstance(v, float) and math.isfinite(v) for v in metrics.values())
    bicubic = prepared.baselines[0].metrics
    assert metrics["psnr_gain"] == pytest.approx(metrics["psnr"] - bicubic["psnr"])
    assert metrics["ssim_gain"] == pytest.approx(metrics["ssim"] - bicubic["ssim"])
    assert 0 < metrics["ssim"] <= 1 and metrics["n_params"] > 0
    assert [step for step, _ in ctx.reports] == [1, 2]
    assert metrics["validation_score"] == pytest.approx(max(value for _, value in ctx.reports))

    architecture = json.loads((tmp_path / "trial" / "architecture.json").read_text())
    assert architecture["family"] == "sr_net" and architecture["scale"] == 2
    model = prepared.family.build(
        architecture["config"], architecture["in_channels"], architecture["scale"]
    )
    model.load_state_dict(torch.load(tmp_path / "trial" / "weights.pt"))
    assert model(torch.zeros(1, 1, 16, 16)).shape == (1, 1, 32, 32)

    # The reported validation score is the PSNR gain over bicubic (dB) of the kept (best)
    # weights, whatever the loss, as scikit-image computes PSNR per image (data range 1).
    from skimage.metrics import peak_signal_noise_ratio

    from lensnas.objectives.sr.metrics import bicubic_upsample

    data = prepared.data
    prediction = np.clip(predict(model, data["validation_lr"], 4, "cpu"), 0, 1)
    validation_hr = np.asarray(data["validation_hr"], dtype=np.float64)
    bicubic = bicubic_upsample(data["validation_lr"], 2)
    expected = np.mean([
        peak_signal_noise_ratio(hr[0], sr[0], data_range=1.0) - peak_signal_noise_ratio(
            hr[0], np.clip(bi[0], 0, 1).astype(np.float64), data_range=1.0)
        for hr, sr, bi in zip(validation_hr, prediction, bicubic)
    ])
    assert metrics["validation_score"] == pytest.approx(expected, rel=1e-4)


def test_other_backbones_and_losses_run(prepared, tmp_path):
    for params in (
        {"backbone": "srcnn", "depth": 1, "width": 8, "loss": "charbonnier"},
        {
            "backbone": "fsrcnn",
            "depth": 1,
            "width": 8,
            "upsampler": "transposed",
            "loss": "mse",
            "epochs": 1,
        },
    ):
        metrics = prepared.run_trial(params, LocalContext(artifact_dir=tmp_path, seed=2))
        assert math.isfinite(metrics["psnr_gain"])


def test_pruning_raises(prepared, tmp_path):
    ctx = LocalContext(artifact_dir=tmp_path, seed=1, prune_after=1)
    with pytest.raises(TrialPruned):
        prepared.run_trial(TINY_NET, ctx)
    assert len(ctx.reports) == 1


def test_second_prepare_hits_the_cache(prepared):
    assert prepared.cache_hit is False
    again = make(prepared.cache_dir)
    again.prepare()
    assert again.cache_hit is True and again.dataset_key == prepared.dataset_key
    assert again.trial_attrs() == prepared.trial_attrs()
    for key, array in prepared.data.items():
        assert np.array_equal(again.data[key], array)
    prepared.prepare()  # idempotent: nothing reloaded
    assert prepared.cache_hit is False


def test_trial_attrs_and_interpolation_baselines(prepared):
    attrs = prepared.trial_attrs()
    assert attrs["n_train"] == 16 and attrs["n_test"] == 4
    assert attrs["lr_shape"] == [16, 16] and attrs["hr_shape"] == [32, 32]
    assert attrs["degradation"] == {"psf_fwhm_hr_pixels": 0.0, "binning": 2}  # Model 1
    bicubic, bilinear = attrs["baselines"]
    assert (bicubic["key"], bilinear["key"]) == ("bicubic", "bilinear")
    for row in (bicubic, bilinear):
        assert row["description"] and 5 < row["metrics"]["psnr"] < 60
        assert 0 < row["metrics"]["ssim"] < 1 and row["metrics"]["consistency_chi"] > 0
        assert 0 <= row["metrics"]["flux_error"] < 1
    assert bicubic["metrics"] != bilinear["metrics"]
    json.dumps(attrs)
    data = prepared.data
    for mode in ("bicubic", "bilinear"):
        assert data[f"test_{mode}"].shape == data["test_hr"].shape
        assert data[f"test_{mode}"].min() >= 0 and data[f"test_{mode}"].max() <= 1


def test_data_seed_and_options_change_the_dataset(prepared):
    assert make(prepared.cache_dir, data_seed=99).dataset_config() != prepared.dataset_config()
    assert (
        make(prepared.cache_dir, einstein_radius=[1.0, 1.1]).dataset_config()
        != prepared.dataset_config()
    )


def test_folder_source_through_the_objective(tmp_path):
    rng = np.random.default_rng(0)
    for name, side in (("LR", 12), ("HR", 24)):
        (tmp_path / "data" / name).mkdir(parents=True)
        for i in range(10):
            np.save(tmp_path / "data" / name / f"lens_{i:03d}.npy", rng.random((1, side, side)))
    objective = SRObjective(
        {"source": "folder", "folder": str(tmp_path / "data"), "test_fraction": 0.2},
        {"epochs": 1, "batch_size": 4},
        seed=0,
        cache_dir=tmp_path / "cache",
        progress=False,
    )
    objective.prepare()
    assert objective.trial_attrs()["n_test"] == 2 and objective.trial_attrs()["n_train"] == 7
    metrics = objective.run_trial(
        {"depth": 1, "width": 4}, LocalContext(artifact_dir=tmp_path / "a")
    )
    assert math.isfinite(metrics["psnr_gain"])


@pytest.mark.parametrize("study", ["sr_quickstart.toml", "sr_lensing.toml"])
def test_study_files_load_and_admit_their_presets(study):
    from lensnas.search.spec import load_spec

    spec = load_spec(STUDIES / study)
    assert spec.objective == "sr" and spec.metrics == ("psnr_gain",)
    family = SRObjective.family
    for preset in spec.presets:
        assert (
            admits(list(spec.space), family.presets[preset], family.config(spec.training)) is None
        )
    objective = spec.make_objective(cache_dir="/nonexistent-unused", progress=False)
    assert isinstance(objective, SRObjective)
