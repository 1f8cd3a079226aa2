"""Lens-model recovery (objectives/sr/lens_model.py) with real lenstronomy at tiny sizes.

Measured (this file's 64x64 HR set-up, 4 noiseless images): the fit from the perturbed truth
recovers theta_E, e1, e2, gamma1, gamma2 to within 4e-9; the tolerance is 1e-5. Blurring the image
by a Gaussian of sigma 2 and 3 HR pixels raises the RMS theta_E error to ~0.005" and ~0.010".
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage

from lensnas.objectives.base import LocalContext
from lensnas.objectives.sr.data import LensSimulator, normalize_per_image, simulation_config
from lensnas.objectives.sr.lens_model import (
    LENS_METRICS,
    NO_TRUTHS,
    PARAMETERS,
    LensFitter,
    fit_images,
    keywords,
    recovery_metrics,
    simulated_truths,
    start_point,
)
from lensnas.objectives.sr.objective import SRObjective
from lensnas.spaces.dimensions import SpaceError

STUDIES = Path(__file__).resolve().parent.parent / "studies"
NOISELESS_TOLERANCE = 1e-5  # arcsec for theta_E, unitless for e1, e2, gamma1, gamma2
LENS_COLUMNS = [PARAMETERS.index(name) for name in ("theta_E", "e1", "e2", "gamma1", "gamma2")]
TINY_DATA = {"n_train": 16, "n_validation": 4, "n_test": 4, "lr_size": 16, "lr_pixel_scale": 0.2}
TINY_TRAINING = {"epochs": 1, "batch_size": 8, "learning_rate": 3e-3}


@pytest.fixture(scope="module")
def noiseless():
    """A Model-1 simulation at 32 -> 64 pixels of 0.05": four truths and their noiseless HR
    images, normalised as the dataset's."""
    config = simulation_config(SRObjective.check_options({"lr_size": 32, "lr_pixel_scale": 0.1}))
    truths = simulated_truths(config, 4, 5, 4)
    simulator = LensSimulator(config)
    images = [simulator.render_clean(simulator.sky(*keywords(t))[None])[0] for t in truths]
    return config, truths, normalize_per_image(np.concatenate(images))[:, None]


def test_noiseless_hr_recovers_the_true_lens(noiseless):
    config, truths, images = noiseless
    for index, truth in enumerate(truths):  # the fits start away from the truth
        assert np.abs(start_point(truth, index) - truth[: len(PARAMETERS)]).max() > 0.01
    fitted, _, seconds = fit_images(LensFitter(config, "hr"), images, truths)
    errors = np.abs(fitted - truths[:, : len(PARAMETERS)])[:, LENS_COLUMNS]
    assert errors.max() < NOISELESS_TOLERANCE
    assert seconds.max() < 5
    metrics = recovery_metrics(fitted, truths)
    assert set(metrics) == set(LENS_METRICS) and set(LENS_METRICS) <= set(SRObjective.METRICS)
    assert all(abs(value) < NOISELESS_TOLERANCE for value in metrics.values())


def test_blurring_the_image_degrades_the_fit(noiseless):
    config, truths, images = noiseless
    fitter = LensFitter(config, "hr")
    scatter = {}
    for sigma in (0, 2, 3):  # HR pixels; the fit still assumes the sharp HR PSF
        blurred = ndimage.gaussian_filter(images, (0, 0, sigma, sigma)) if sigma else images
        scatter[sigma] = recovery_metrics(fit_images(fitter, blurred, truths)[0], truths)
    for name in ("lens_theta_e_scatter", "lens_ellipticity_scatter", "lens_shear_scatter"):
        assert scatter[0][name] < scatter[2][name] < scatter[3][name]
    assert scatter[3]["lens_theta_e_scatter"] > 0.003  # arcsec
    assert scatter[3]["lens_ellipticity_scatter"] > 0.02


def test_truths_are_the_ones_each_test_image_was_simulated_with(tmp_path):
    # a noiseless HR target, and more test pairs than one simulation batch (32)
    objective = SRObjective(
        {"n_train": 1, "n_validation": 1, "n_test": 36, "lr_size": 8, "lr_pixel_scale": 0.4,
         "hr_exposure_time": 0.0}, {}, seed=4, cache_dir=tmp_path, progress=False)
    objective.prepare()
    config = objective.dataset_config()["simulation"]
    truths = simulated_truths(config, 36, objective.data_seed, 36)
    simulator = LensSimulator(config)
    for index in (0, 31, 32, 35):  # Model 1 has no subhalos: the truth is the whole lens
        hr = simulator.render_clean(simulator.sky(*keywords(truths[index]))[None])[0]
        stored = objective.data["test_hr"][index]
        assert np.allclose(normalize_per_image(hr), stored, atol=1e-5)


def test_baseline_rows_and_trial_scores_of_a_tiny_study(tmp_path):
    def make() -> SRObjective:
        return SRObjective({**TINY_DATA, "lens_model_fits": 2}, TINY_TRAINING, seed=3,
                           cache_dir=tmp_path / "cache", progress=False)

    objective = make()
    objective.prepare()
    attrs = objective.trial_attrs()
    rows = {row["key"]: row for row in attrs["baselines"]}
    assert list(rows)[:2] == ["bicubic", "bilinear"]  # the headline rows come first, unchanged
    lens_rows = ["lens_hr_target", "lens_lr_input", "lens_bicubic", "lens_bilinear"]
    assert list(rows)[2:] == lens_rows
    for key in lens_rows:
        assert rows[key]["group"] == "lens_model" and rows[key]["description"]
        assert set(rows[key]["metrics"]) == set(LENS_METRICS)
        assert all(math.isfinite(v) for v in rows[key]["metrics"].values())
    assert attrs["lens_model"]["images"] == 2 and attrs["lens_model"]["seconds_per_fit"] > 0
    json.dumps(attrs)
    assert len(list((tmp_path / "cache").glob("sr-lens-model-*"))) == 1

    metrics = objective.run_trial({"depth": 1, "width": 8}, LocalContext(artifact_dir=tmp_path / "t"))
    assert set(LENS_METRICS) <= set(metrics)
    assert all(math.isfinite(metrics[name]) for name in LENS_METRICS)

    again = make()  # the fits are cached with the dataset's key
    again.prepare()
    assert again.cache_hit and again.trial_attrs() == attrs

    from lensnas.search.results.comparison import comparison_tables

    tables = comparison_tables(SRObjective, objective.baselines, ("network", metrics))
    titles = [table[0] for table in tables]
    assert titles == ["Headline comparison", "Lens-model recovery"]
    header, lens_table = tables[1][2], tables[1][3]
    assert "lens_theta_e_scatter" in header and "psnr" not in header and len(lens_table) == 5


def test_the_lens_metrics_need_fits_and_a_simulated_source():
    SRObjective.check_metrics(("lens_theta_e_scatter",), SRObjective.check_options(
        {"lens_model_fits": 3}))
    with pytest.raises(SpaceError, match="lens_model_fits"):
        SRObjective.check_metrics(("psnr_gain", "lens_shear_scatter"),
                                  SRObjective.check_options({}))
    with pytest.raises(SpaceError, match="n_test"):
        SRObjective.check_options({"n_test": 5, "lens_model_fits": 6})


def test_a_folder_dataset_says_why_it_has_no_lens_model(tmp_path):
    rng = np.random.default_rng(0)
    for name, side in (("LR", 12), ("HR", 24)):
        (tmp_path / "data" / name).mkdir(parents=True)
        for i in range(6):
            np.save(tmp_path / "data" / name / f"lens_{i}.npy", rng.random((side, side)))
    options = {"source": "folder", "folder": str(tmp_path / "data"), "test_fraction": 0.3,
               "lens_model_fits": 2}
    objective = SRObjective(options, TINY_TRAINING, seed=0, cache_dir=tmp_path / "cache",
                            progress=False)
    objective.prepare()
    assert objective.baseline_notes() == [NO_TRUTHS] and "\n" not in NO_TRUTHS
    assert objective.trial_attrs()["lens_model"] == {"unavailable": NO_TRUTHS}
    assert [row.key for row in objective.baselines] == ["bicubic", "bilinear"]
    metrics = objective.run_trial({"depth": 1, "width": 4}, LocalContext(artifact_dir=tmp_path / "t"))
    assert not set(LENS_METRICS) & set(metrics)
    with pytest.raises(SpaceError, match="simulated source"):
        SRObjective.check_metrics(("lens_theta_e_scatter",), objective.options)


def test_the_model_1_cpu_study_loads():
    from lensnas.search.spec import load_spec

    spec = load_spec(STUDIES / "sr_model1_cpu.toml")
    assert spec.objective == "sr" and "psnr_gain" in spec.metrics
    objective = spec.make_objective(cache_dir="/nonexistent-unused", progress=False)
    options = objective.options
    assert options["source"] == "simulate" and options["n_test"] >= 300
    assert options["lens_model_fits"] > 0
