"""Test populations and varied training populations of the shear objective: overrides change
the rendered galaxies as asked (and nothing else), a population's m is the m of the network's
own predictions, and bad overrides are one line naming the key."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import galsim
import numpy as np
import pytest

from lensnas import spaces
from lensnas.objectives import LocalContext
from lensnas.objectives.shear.data import (
    GalaxySimulation,
    sheared_ellipticity,
    simulate_split,
    simulation_config,
)
from lensnas.objectives.shear.metrics import (
    jackknife_blocks,
    paired_bias,
    psf_leakage,
    shear_metrics,
    worst_bias,
)
from lensnas.objectives.shear.objective import (
    PAIRS,
    POPULATIONS,
    TRAINING_POPULATION,
    ShearObjective,
    population_metrics,
)
from lensnas.objectives.training import predict
from lensnas.search.spec import SpecError, load_spec
from tests.conftest import write_tiny_shear_study

BASE = GalaxySimulation(stamp_size=33, pixel_scale=0.2, noise_sigma=1e-5)


def split(simulation: GalaxySimulation, count: int = 12, seed: int = 4) -> dict[str, np.ndarray]:
    return simulate_split(simulation, np.random.SeedSequence(seed), count, paired=True)


def moments(image: np.ndarray) -> galsim.hsm.ShapeData:
    return galsim.hsm.FindAdaptiveMom(galsim.Image(np.ascontiguousarray(image, dtype=np.float64),
                                                   scale=BASE.pixel_scale))


def test_psf_size_override_is_measured_on_the_stamps() -> None:
    """Point-like galaxies: the stamps' adaptive-moment size follows the PSF FWHM asked for."""
    point = dataclasses.replace(BASE, half_light_radius_min=0.01, half_light_radius_max=0.01,
                                shear_max=0.0, noise_sigma=0.0)
    sizes = {}
    for fwhm in (0.8, 1.2):
        images = split(dataclasses.replace(point, psf_fwhm=fwhm), count=3)["images"]
        sigma = np.mean([moments(image).moments_sigma for image in images]) * BASE.pixel_scale
        sizes[fwhm] = sigma * 2 * np.sqrt(2 * np.log(2))  # Gaussian FWHM of the measured sigma
    assert sizes[1.2] / sizes[0.8] == pytest.approx(1.2 / 0.8, rel=0.03)
    assert sizes[1.2] == pytest.approx(1.2, rel=0.05)  # the pixel and the tiny galaxy add a little


def test_a_population_holds_the_same_galaxies_with_one_thing_changed() -> None:
    base, sersic = split(BASE), split(dataclasses.replace(BASE, profile="sersic", sersic_index=4.0))
    for key in ("half_light_radius", "flux", "shear", "intrinsic_g"):
        np.testing.assert_array_equal(base[key], sersic[key])
    assert not np.allclose(base["images"], sersic["images"])
    # galaxy 0 of the Sérsic population is exactly that galaxy drawn by GalSim (noise aside)
    galaxy = galsim.Sersic(n=4.0, half_light_radius=sersic["half_light_radius"][0],
                           flux=sersic["flux"][0]).shear(g1=sersic["shear"][0, 0], g2=sersic["shear"][0, 1])
    drawn = galsim.Convolve(galaxy, BASE.psf()).drawImage(nx=33, ny=33, scale=BASE.pixel_scale).array
    assert np.abs(sersic["images"][0] - drawn).max() < 6 * BASE.noise_sigma


def test_centroid_offsets_move_the_galaxies_by_the_stored_offsets() -> None:
    offset = split(dataclasses.replace(BASE, centroid_offset_pixels=1.5, noise_sigma=0.0))
    centred = split(dataclasses.replace(BASE, noise_sigma=0.0))
    assert np.abs(offset["centroid_offset"]).max() <= 1.5 and np.ptp(offset["centroid_offset"]) > 0.5
    for index in range(4):
        moved, still = moments(offset["images"][index]), moments(centred["images"][index])
        shift = np.array([moved.moments_centroid.x - still.moments_centroid.x,
                          moved.moments_centroid.y - still.moments_centroid.y])
        np.testing.assert_allclose(shift, offset["centroid_offset"][index], atol=0.02)


def test_varied_population_draws_each_key_in_its_range_and_stores_each_psf() -> None:
    varied = dataclasses.replace(BASE, psf_fwhm=(0.7, 1.1), psf_profile=("gaussian", "moffat"),
                                 noise_sigma=(1e-5, 1e-3), profile=("exponential", "sersic"),
                                 sersic_index=(1.0, 3.0))
    arrays = split(varied, count=40)
    assert arrays["psf_fwhm"].min() >= 0.7 and arrays["psf_fwhm"].max() <= 1.1
    assert set(np.unique(arrays["psf_profile"])) == {0, 1}
    assert 1e-5 <= arrays["noise_sigma"].min() and arrays["noise_sigma"].max() <= 1e-3
    assert arrays["psf_images"].shape == (40, 33, 33)
    np.testing.assert_allclose(arrays["psf_images"].sum(axis=(1, 2)), 1, rtol=1e-5)
    own = varied.for_galaxy(arrays, 5)
    np.testing.assert_allclose(arrays["psf_images"][5], own.psf_image(), rtol=1e-6)
    # each galaxy's noise has its own sigma: the corner pixels (no galaxy) tell
    corners = np.concatenate([arrays["images"][:, :4, :4].reshape(40, -1)], axis=1)
    ratio = corners.std(axis=1) / arrays["noise_sigma"]
    assert 0.6 < np.median(ratio) < 1.4


def test_labels_with_intrinsic_shapes_are_the_sheared_ellipticity() -> None:
    shaped = dataclasses.replace(BASE, intrinsic_ellipticity_sigma=0.3, noise_sigma=0.0)
    arrays = split(shaped, count=4)
    np.testing.assert_allclose(arrays["labels"], sheared_ellipticity(arrays["intrinsic_g"], arrays["shear"]),
                               rtol=1e-6)
    measured = moments(arrays["images"][0]).observed_shape
    # the drawn galaxy's shape is its label (up to the PSF's rounding, so compare the angle)
    assert np.angle(measured.g1 + 1j * measured.g2) == pytest.approx(
        np.angle(arrays["labels"][0, 0] + 1j * arrays["labels"][0, 1]), abs=0.05)


def test_new_keys_leave_earlier_dataset_keys_unchanged() -> None:
    config = simulation_config(GalaxySimulation())
    assert "centroid_offset_pixels" not in config and "shear_fixed" not in config
    assert "labels" in simulation_config(GalaxySimulation(intrinsic_ellipticity_sigma=0.2))


def test_fixed_shear_population_puts_half_along_each_component() -> None:
    """By turns of two galaxies, and of four in shape-noise rings (which share their shear), so
    that rings too put half along each component."""
    along_g1, along_g2 = [0.02, 0.0], [0.0, 0.02]
    arrays = split(dataclasses.replace(BASE, shear_fixed=0.02), count=8)
    np.testing.assert_array_equal(arrays["shear"], [along_g1, along_g1, along_g2, along_g2] * 2)
    ringed = split(dataclasses.replace(BASE, shear_fixed=0.02, intrinsic_ellipticity_sigma=0.2,
                                       shape_noise_pairs=True), count=8)
    np.testing.assert_array_equal(ringed["shear"], [along_g1] * 4 + [along_g2] * 4)
    along_one = np.tile([0.02, 0.0], (8, 1))  # one value per component: no line to fit, no error
    bias = shear_metrics(along_one, along_one, -along_one, shear=along_one)
    assert np.isnan(bias["linear_m1"]) and bias["m1"] == pytest.approx(0.0)


def test_metrics_of_a_known_estimator() -> None:
    """An estimator e = (1 + m) g + c + alpha e_psf recovers m, c and alpha."""
    rng = np.random.default_rng(0)
    shear = rng.uniform(-0.05, 0.05, (400, 2))
    psf_g = np.stack([rng.uniform(-0.03, 0.03, 400), np.zeros(400)], axis=1)
    plus = 1.02 * shear + 3e-4 + 0.1 * psf_g
    minus = -1.02 * shear + 3e-4 + 0.1 * psf_g
    bias = paired_bias(plus, minus, shear)
    np.testing.assert_allclose(bias.m, (0.02, 0.02), atol=1e-12)
    leakage = psf_leakage(plus, minus, psf_g)
    assert leakage["alpha1"] == pytest.approx(0.1) and "alpha2" not in leakage
    worst = worst_bias({"a": {"m1": 0.001, "m1_err": 1e-4, "m2": -0.003, "m2_err": 2e-4, "c1": 0.0,
                              "c2": 1e-5},
                        "b": {"m1": 0.002, "m2": 0.0, "c1": -2e-5, "c1_err": 3e-6, "c2": 0.0}})
    assert worst["worst_abs_m"] == 0.003 and worst["worst_abs_m_err"] == 2e-4
    assert worst["worst_abs_c"] == 2e-5 and worst["worst_abs_c_err"] == 3e-6


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[ShearObjective, dict, Path]:
    """A 2-epoch network on a tiny study with two test populations (objective, metrics,
    artifact folder)."""
    options = {
        "n_train": 256, "n_validation": 64, "n_test": 96, "stamp_size": 25, "pixel_scale": 0.2,
        "reference": "none", "calibration": "metacal",
        "test_populations": {"psf_wide": {"psf_fwhm": 1.1}, "elliptical": {"psf_g1": 0.04}},
    }
    objective = ShearObjective(options, {"epochs": 2, "batch_size": 32, "width": 4},
                               seed=3, cache_dir=tmp_path_factory.mktemp("cache"), progress=False)
    folder = tmp_path_factory.mktemp("trial")
    metrics = objective.run_trial({}, LocalContext(artifact_dir=folder))
    return objective, metrics, folder


def test_population_m_is_the_m_of_the_networks_predictions(trained) -> None:
    objective, metrics, folder = trained
    assert set(metrics[POPULATIONS]) == {TRAINING_POPULATION, "psf_wide", "elliptical"}
    model = spaces.load(folder)
    population = objective.populations["psf_wide"]
    plus, minus = (predict(model, objective.stamp_inputs(population.arrays[name]), 64, "cpu")
                   for name in ("images", "images_minus"))
    g = population.arrays["shear"]
    half_difference = (plus - minus) / 2
    by_hand = np.sum(half_difference * g, axis=0) / np.sum(g * g, axis=0) - 1
    stored = metrics[POPULATIONS]["psf_wide"]
    np.testing.assert_allclose([stored["m1"], stored["m2"]], by_hand, rtol=1e-6, atol=1e-9)
    assert population_metrics(population, plus, minus) == {
        key: value for key, value in stored.items() if not key.startswith("cal_")}
    assert "alpha1" in metrics[POPULATIONS]["elliptical"] and "alpha1" not in stored
    declared = {name: v for name, v in metrics[POPULATIONS].items() if name != TRAINING_POPULATION}
    assert metrics["worst_abs_m"] == max(abs(v[f"m{i}"]) for v in declared.values() for i in (1, 2))


def test_calibrated_metrics_match_each_pair_to_its_metacal_response(trained) -> None:
    """cal_m of a population: the network's change between +g and -g on metacal's noshear
    images against the change its response to the sheared ones predicts; cal_rmse divides by
    the mean response; both measured by hand."""
    objective, metrics, folder = trained
    model = spaces.load(folder)

    def estimate(images, psf):
        return predict(model, objective.stamp_inputs(images, psf), 64, "cpu")

    plus_set, minus_set = objective.metacal_sets["psf_wide"]
    e_plus, e_minus = estimate(plus_set["noshear"], None), estimate(minus_set["noshear"], None)
    responses = [(estimate(s[f"{j}p"], None) - estimate(s[f"{j}m"], None)) / 0.02
                 for s in (plus_set, minus_set) for j in (1, 2)]
    mean_response = np.stack([np.concatenate([responses[0], responses[2]]).mean(axis=0),
                              np.concatenate([responses[1], responses[3]]).mean(axis=0)], axis=1)
    population = objective.populations["psf_wide"]
    g = population.arrays["shear"]
    pair_response = np.stack([(responses[0] + responses[2]) / 2, (responses[1] + responses[3]) / 2],
                             axis=2)  # (N, component i, shear j)
    predicted = np.einsum("nij,nj->ni", pair_response, g)
    by_hand = np.sum((e_plus - e_minus) / 2 * g, axis=0) / np.sum(predicted * g, axis=0) - 1
    stored = metrics[POPULATIONS]["psf_wide"]
    np.testing.assert_allclose([stored["cal_m1"], stored["cal_m2"]], by_hand, rtol=1e-5, atol=1e-8)
    calibrated_plus = e_plus @ np.linalg.inv(mean_response).T
    np.testing.assert_allclose(stored["cal_rmse"], np.sqrt(np.mean((calibrated_plus
                               - population.arrays["labels"]) ** 2)), rtol=1e-5)
    assert metrics["cal_worst_abs_m"] == max(abs(v[f"cal_m{i}"]) for name, v in metrics[POPULATIONS].items()
                                             for i in (1, 2) if name != TRAINING_POPULATION)
    assert metrics["cal_m1"] == metrics[POPULATIONS][TRAINING_POPULATION]["cal_m1"]


@pytest.mark.parametrize(
    "extra, appended, expected",
    [
        ("", "[objective.test_populations.wide]\npsf_fwhmm = 1.0",
         "objective.test_populations.wide.psf_fwhmm: unknown key (did you mean 'psf_fwhm'?); a population may change:"),
        ("", "[objective.test_populations.wide]\nstamp_size = 31",
         "objective.test_populations.wide.stamp_size: unknown key"),
        ("", "[objective.test_populations.noisy]\nnoise_sigma = [1e-3, 1e-5]",
         "objective.test_populations.noisy.noise_sigma: impossible range: low 0.001 > high 1e-05"),
        ("", "[objective.test_populations.noisy]\nnoise_sigma = 1e-4\npairs = 4",
         "objective.test_populations.noisy.pairs: must be a whole number of +g/-g pairs from 8 to"),
        ("", "[objective.test_populations.training]\npsf_fwhm = 1.0",
         "objective.test_populations.training: 'training' names the study's own test set"),
        ("psf_fwhm = [1.0]", "", "objective.psf_fwhm: must be a number or a range [low, high], got [1.0]"),
        ('profile = ["exponential", "disk"]', "",
         "objective.profile: must be one of exponential, gaussian, sersic, bulge_disk or a list"),
        ("noise_sigma = [0.0, 1e-4]", "",
         "objective.noise_sigma: a range is drawn log-uniformly: low must be > 0"),
        ('calibration = "metacal"\ncalibration_stamp_size = 30', "",
         ("objective.calibration_stamp_size: must be 0 (automatic) or at least stamp_size (25) "
          "and differ from it by an even number, got 30")),
        ("psf_g1 = [-0.02, 0.02]", '[training]\naugment = "d4"',
         "training.augment: 'd4' needs a D4-symmetric PSF"),
    ],
)
def test_bad_population_and_range_keys_are_one_line(tmp_path, extra, appended, expected) -> None:
    path = write_tiny_shear_study(tmp_path, objective_extra=extra)
    text = path.read_text()
    if appended.startswith("[training]"):
        text = text.replace("[training]\n", appended + "\n", 1)
    elif appended:
        text += appended + "\n"
    path.write_text(text)
    with pytest.raises(SpecError) as info:
        load_spec(path)
    message = str(info.value)
    assert "\n" not in message and str(path) in message
    assert expected in message, message


def test_populations_reach_status_report_model_card_and_baseline(tmp_path, capsys) -> None:
    """A launched study with a test population and calibration: status --wide, the report, the
    model card and lensnas baseline all show m per population."""
    from lensnas.search.cli import main

    path = write_tiny_shear_study(tmp_path, n_trials=1, epochs=1,
                                  objective_extra='calibration = "metacal"\nreference = "hsm"')
    path.write_text(path.read_text().replace("n_test = 64", "n_test = 24")
                    + "[objective.test_populations.psf_wide]\npsf_fwhm = 1.2\n")
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    assert main(["launch", str(path), "--storage", storage, "--quiet"]) == 0
    capsys.readouterr()
    assert main(["status", "tiny", "--storage", storage, "--wide"]) == 0
    status = capsys.readouterr().out
    assert "m per test population" in status and "psf_wide" in status and "psf_fwhm=1.2" in status
    report = tmp_path / "report.html"
    assert main(["report", "tiny", "--storage", storage, "-o", str(report)]) == 0
    html = report.read_text()
    assert 'id="test-populations"' in html and 'id="populations-figure"' in html
    assert main(["export", "tiny", "--storage", storage, "--top", "1", "-o", str(tmp_path / "out")]) == 0
    card = (tmp_path / "out" / "trial-0" / "MODEL_CARD.md").read_text()
    assert "### m per test population" in card and "| psf_wide |" in card
    capsys.readouterr()
    assert main(["baseline", str(path), "--quiet"]) == 0
    baseline = capsys.readouterr().out
    assert "population psf_wide" in baseline and "hsm REGAUSS" in baseline


def test_a_population_with_its_own_psf_gives_the_network_that_psf(tmp_path) -> None:
    options = {"n_train": 8, "n_validation": 4, "n_test": 6, "stamp_size": 25, "pixel_scale": 0.2,
               "reference": "none", "psf_channel": True,
               "test_populations": {"wide": {"psf_fwhm": 1.2}}}
    objective = ShearObjective(options, {}, seed=1, cache_dir=tmp_path, progress=False)
    objective.prepare()
    population = objective.populations["wide"]
    np.testing.assert_allclose(population.psf(), dataclasses.replace(BASE, stamp_size=25, psf_fwhm=1.2).psf_image())
    assert not np.allclose(population.psf(), objective.data["psf_image"])


def test_a_population_may_have_more_pairs_than_the_test_set(tmp_path) -> None:
    """pairs = 10: that population has 10 +g/-g pairs, the others n_test; its reference row
    is measured on them."""
    options = {"n_train": 8, "n_validation": 4, "n_test": 6, "stamp_size": 25, "pixel_scale": 0.2,
               "reference": "hsm",
               "test_populations": {"noisy": {"noise_sigma": 1e-4, PAIRS: 10},
                                    "plain": {"noise_sigma": 1e-5}}}
    objective = ShearObjective(options, {}, seed=1, cache_dir=tmp_path, progress=False)
    objective.prepare()
    noisy, plain = objective.populations["noisy"], objective.populations["plain"]
    assert len(noisy.arrays["images"]) == len(noisy.arrays["images_minus"]) == 10
    assert len(plain.arrays["images"]) == 6 and noisy.simulation.noise_sigma == 1e-4
    rows = [b for b in objective.baselines if b.conditions.get("population") == "noisy"]
    assert rows and all("m1" in b.metrics for b in rows if b.key == "reference")


def test_shape_noise_rings_cancel_shape_noise_in_m_and_c() -> None:
    """An estimator returning each galaxy's label exactly (plus a known additive bias): with
    intrinsic shapes, the errors of m and c are shape noise; in rings of four galaxies turned by
    45 degrees they drop by orders of magnitude, and c is recovered."""
    shaped = dataclasses.replace(BASE, intrinsic_ellipticity_sigma=0.26, noise_sigma=0.0,
                                 shear_fixed=0.02)
    additive = np.array([3e-4, -2e-4])
    biases = {}
    for rings in (False, True):
        arrays = simulate_split(dataclasses.replace(shaped, shape_noise_pairs=rings),
                                np.random.SeedSequence(8), 202, paired=True)
        plus = sheared_ellipticity(arrays["intrinsic_g"], arrays["shear"]) + additive
        minus = sheared_ellipticity(arrays["intrinsic_g"], -arrays["shear"]) + additive
        biases[rings] = paired_bias(plus, minus, arrays["shear"])
        if rings:
            first = arrays["intrinsic_g"][0:200:4]
            turned = first @ np.array([[0, 1], [-1, 0]])  # 45 degrees: e -> i e
            for turn, expected in enumerate((first, turned, -first, -turned)):
                np.testing.assert_allclose(arrays["intrinsic_g"][turn:200:4], expected)
                np.testing.assert_array_equal(arrays["shear"][turn:200:4], arrays["shear"][0:200:4])
            np.testing.assert_array_equal(arrays["intrinsic_g"][200] == arrays["intrinsic_g"][201],
                                          [False, False])  # the incomplete ring is left as drawn
    cold, ringed = biases[False], biases[True]
    assert max(ringed.m_err) < max(cold.m_err) / 30 and max(ringed.c_err) < max(cold.c_err) / 30
    assert max(abs(m) for m in ringed.m) < 5e-4
    np.testing.assert_allclose(ringed.c, additive, atol=3 * max(ringed.c_err) + 1e-6)
    assert max(cold.c_err) > 1e-3  # shape noise: 0.26 / sqrt(200) in c without rings


def test_jackknife_blocks_hold_whole_rings() -> None:
    blocks = jackknife_blocks(1000, 100)
    assert len(blocks) == 100 and sum(len(b) for b in blocks) == 1000
    assert all(b[0] % 4 == 0 for b in blocks)
    assert [len(b) for b in jackknife_blocks(5, 100)] == [1] * 5  # too few for rings
