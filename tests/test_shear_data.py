"""GalSim simulation: deterministic under a seed, disjoint splits, paired test set, cached."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from lensnas.objectives.shear.data import GalaxySimulation, simulate, simulate_test_at_noise
from lensnas.objectives.shear.objective import ShearObjective
from lensnas.spaces.dimensions import SpaceError

SMALL = GalaxySimulation(stamp_size=21, pixel_scale=0.2, half_light_radius_min=0.3,
                         half_light_radius_max=0.7, noise_sigma=1e-4)
COUNTS = {"train": 40, "validation": 10, "test": 12}


def test_simulation_is_deterministic_under_a_seed():
    first, second = simulate(SMALL, COUNTS, seed=5), simulate(SMALL, COUNTS, seed=5)
    assert first.keys() == second.keys()
    for key in first:
        np.testing.assert_array_equal(first[key], second[key])
    other = simulate(SMALL, COUNTS, seed=6)
    assert not np.array_equal(first["train.images"], other["train.images"])


def test_splits_are_disjoint_populations():
    arrays = simulate(SMALL, COUNTS, seed=5)
    keys = {}
    for split, count in COUNTS.items():
        rows = np.column_stack([arrays[f"{split}.half_light_radius"], arrays[f"{split}.labels"]])
        keys[split] = {tuple(np.round(row, 12)) for row in rows}
        assert len(keys[split]) == count
    assert not keys["train"] & keys["validation"]
    assert not keys["train"] & keys["test"]
    assert not keys["validation"] & keys["test"]
    # no test stamp is a rendering of a training galaxy
    train = arrays["train.images"].reshape(COUNTS["train"], -1)
    test = arrays["test.images"].reshape(COUNTS["test"], -1)
    distance = np.linalg.norm(train[:, None] - test[None], axis=2)
    assert distance.min() > 10 * SMALL.noise_sigma


def test_labels_and_paired_images():
    arrays = simulate(SMALL, COUNTS, seed=5)
    labels = arrays["test.labels"]
    assert np.all(np.hypot(labels[:, 0], labels[:, 1]) <= SMALL.shear_max)
    plus, minus = arrays["test.images"], arrays["test.images_minus"]
    # same noise, opposite shear: a g1 > 0 galaxy is wider along x at +g and along y at -g
    assert not np.allclose(plus, minus)
    i = int(np.argmax(labels[:, 0]))
    x_profile_plus, y_profile_plus = plus[i].sum(0), plus[i].sum(1)
    center = np.arange(SMALL.stamp_size) - SMALL.stamp_size // 2
    width = lambda profile: np.sum(profile * center**2) / np.sum(profile)
    assert width(x_profile_plus) > width(y_profile_plus)
    assert width(minus[i].sum(0)) < width(minus[i].sum(1))
    # unit flux: the stamp sums to about 1 (a little light falls off the stamp)
    assert 0.9 < plus[i].sum() < 1.01
    assert arrays["psf_image"].shape == (21, 21) and np.isclose(arrays["psf_image"].sum(), 1)


def test_dataset_is_cached_and_a_corrupt_cache_is_rebuilt(tmp_path, caplog):
    options = {"n_train": 20, "n_validation": 5, "n_test": 6, "stamp_size": 17}
    first = ShearObjective(options, {}, seed=1, cache_dir=tmp_path, progress=False)
    first.prepare()
    assert first.cache_hit is False
    second = ShearObjective(options, {}, seed=1, cache_dir=tmp_path, progress=False)
    with caplog.at_level(logging.INFO, logger="lensnas"):
        second.prepare()
    assert second.cache_hit is True and "cache hit" in caplog.text
    np.testing.assert_array_equal(first.data["test.images"], second.data["test.images"])
    original = np.array(first.data["train.images"])  # a copy: the memory map sees the tampering
    # truncate one array file: detected by its checksum and rebuilt identically
    entry = next(tmp_path.glob("shear-*"))
    victim = entry / "train.images.npy"
    victim.write_bytes(victim.read_bytes()[:-100])
    third = ShearObjective(options, {}, seed=1, cache_dir=tmp_path, progress=False)
    with caplog.at_level(logging.WARNING, logger="lensnas"):
        third.prepare()
    assert third.cache_hit is False and "checksum mismatch" in caplog.text
    np.testing.assert_array_equal(original, third.data["train.images"])


def test_reference_rmse_with_mean_and_per_object_response(tmp_path):
    # a spread of sizes spreads the metacal response: the mean response then misestimates each
    # galaxy's shear, the object's own response does not
    options = {"n_train": 8, "n_validation": 4, "n_test": 150, "stamp_size": 33,
               "half_light_radius_min": 0.3, "half_light_radius_max": 0.8}
    objective = ShearObjective(options, {}, seed=2, cache_dir=tmp_path, progress=False)
    objective.prepare()
    rows = {b.key: b for b in objective.baselines}
    assert rows["reference"].metrics["n_failed"] == 0
    assert rows["reference"].group == "ensemble" and rows["reference_object"].group == ""
    assert rows["reference_object"].metrics["rmse"] < 2e-3 < rows["reference"].metrics["rmse"]


def test_the_test_set_at_another_noise_level_holds_the_same_galaxies():
    arrays = simulate(SMALL, COUNTS, seed=5)
    same = simulate_test_at_noise(SMALL, COUNTS["test"], 5, SMALL.noise_sigma)
    for name in ("images", "images_minus", "labels"):
        np.testing.assert_array_equal(same[name], arrays[f"test.{name}"])
    noisier = simulate_test_at_noise(SMALL, COUNTS["test"], 5, 10 * SMALL.noise_sigma)
    np.testing.assert_array_equal(noisier["labels"], arrays["test.labels"])
    # the same noise realisation, scaled: the difference is 9 sigma of pure noise
    difference = noisier["images"] - arrays["test.images"]
    assert abs(np.std(difference) / (9 * SMALL.noise_sigma) - 1) < 0.05


@pytest.mark.parametrize("levels", [["1e-3"], [-1e-3], [1e-3, True], [5000.0]])
def test_bad_test_noise_levels_are_refused(levels):
    with pytest.raises(SpaceError, match="objective.test_noise_levels"):
        ShearObjective.check_options({"test_noise_levels": levels})


def test_parallel_rendering_gives_the_same_images_as_one_process():
    from lensnas.objectives.shear.data import RENDER_CHUNK, draw_population, render

    simulation = GalaxySimulation(stamp_size=15, pixel_scale=0.3)
    count = 2 * RENDER_CHUNK + 7  # three chunks, the last one short
    population = draw_population(simulation, np.random.default_rng(1), count)
    noise = np.random.default_rng(2).normal(0, 1e-5, (count, 15, 15))
    seen = []
    parallel = render(simulation, population, noise, workers=2, on_progress=seen.append)
    serial = render(simulation, population, noise, workers=1)
    np.testing.assert_array_equal(parallel, serial)
    assert sum(seen) == count
