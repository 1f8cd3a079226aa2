"""Reference shear estimators: accuracy on the low-noise benchmark galaxies, caching, flags.

Galaxies (the documented reference configuration): round exponentials, hlr 0.5", Moffat PSF
beta 2.5 FWHM 0.9", 0.2"/pixel, 53x53 stamps, |g| <= 0.1, noise sigma 1e-5 of unit flux.
Known figures (NGMix 2.4.2 admom metacal, 2500 galaxies): RMSE 4.7e-4, m1 -5.9e-4 +- 1.6e-4;
HSM REGAUSS m about -3%.
"""

from __future__ import annotations

import logging

import galsim
import numpy as np
import pytest

from lensnas.objectives.cache import entry_path
from lensnas.objectives.shear import ngmix_backend
from lensnas.objectives.shear.baseline import baseline_rows
from lensnas.objectives.shear.data import metacal_benchmark_simulation, simulate_split
from lensnas.objectives.shear.hsm import distortion_to_shear
from lensnas.objectives.shear.metacal import MetacalKernel, resolve_fix_noise
from lensnas.objectives.shear.metrics import linear_bias, rmse
from lensnas.objectives.shear.objective import ShearObjective
from lensnas.objectives.shear.reference import (
    cached_measure,
    estimator_settings,
    measure,
    reference_config,
)
from lensnas.search.results.comparison import comparison_rows

NGMIX_RMSE = 4.7e-4
COUNT = 600


@pytest.fixture(scope="module")
def galaxies():
    simulation = metacal_benchmark_simulation()
    data = simulate_split(simulation, np.random.SeedSequence(2024), COUNT)
    return simulation, data


@pytest.fixture(scope="module")
def metacal_result(galaxies):
    simulation, data = galaxies
    return measure("metacal", data["images"], simulation.psf_image(), 0.2, 1e-5, workers=2)


@pytest.mark.parametrize("stamp_size", [53, 48])
@pytest.mark.parametrize("psf", ["dilate", "fitgauss", "gauss"])
def test_metacal_images_match_galsim_drawing(stamp_size, psf):
    """The k-space shortcut gives GalSim's own deconvolve-shear-reconvolve drawing."""
    simulation = metacal_benchmark_simulation(stamp_size=stamp_size)
    image = simulate_split(simulation, np.random.SeedSequence(1), 1)["images"][0]
    psf_image = simulation.psf_image()
    kernel = MetacalKernel(psf_image, 0.2, stamp_size, step=0.01, psf=psf)
    psf_ii = galsim.InterpolatedImage(
        galsim.Image(psf_image.astype(float), scale=0.2), x_interpolant="lanczos15"
    )
    interpolated = kernel.interpolated(image)
    deconvolved = galsim.Convolve(interpolated, galsim.Deconvolve(psf_ii))
    for key, (g1, g2) in (("noshear", (0, 0)), ("1p", (0.01, 0)), ("2m", (0, -0.01))):
        expected = galsim.Convolve(deconvolved.shear(g1=g1, g2=g2), kernel.target).drawImage(
            nx=stamp_size, ny=stamp_size, scale=0.2, method="no_pixel", dtype=float
        )
        rendered = kernel.render(interpolated, key)
        assert np.abs(rendered - expected.array).max() < 2e-4 * expected.array.max()


def test_metacal_low_noise_accuracy(galaxies, metacal_result):
    """Built-in metacal: RMSE within 1.2x NGMix's, |m| < 2e-3, at sigma 1e-5."""
    _, data = galaxies
    result = metacal_result
    assert result.n_failed == 0
    rmse_g1, rmse_g2, _ = rmse(result.g, data["labels"])
    assert rmse_g1 <= 1.2 * NGMIX_RMSE and rmse_g2 <= 1.2 * NGMIX_RMSE
    bias = linear_bias(result.g, data["labels"])
    assert max(abs(bias.m[0]), abs(bias.m[1])) < 2e-3
    assert max(abs(bias.c[0]), abs(bias.c[1])) < 1e-4
    # the mean response of a round galaxy behind a round PSF is diagonal and isotropic
    assert result.response[0, 0] == pytest.approx(result.response[1, 1], rel=2e-3)
    assert abs(result.response[0, 1]) < 5e-3 * result.response[0, 0]
    assert result.galaxies_per_core_second > 0 and result.workers == 2


def test_hsm_regauss_reproduces_known_bias(galaxies):
    """REGAUSS on these galaxies is biased low by about 3%; KSB runs and is finite."""
    simulation, data = galaxies
    regauss = measure("hsm", data["images"], simulation.psf_image(), 0.2, 1e-5, method="REGAUSS")
    assert regauss.n_failed == 0
    bias = linear_bias(regauss.g, data["labels"])
    for m, m_err in zip(bias.m, bias.m_err):
        assert -0.035 < m < -0.025 and m_err < 1e-3
    assert rmse(regauss.g, data["labels"])[2] < 2.5e-3
    ksb = measure("hsm", data["images"][:50], simulation.psf_image(), 0.2, 1e-5, method="KSB")
    assert ksb.n_failed == 0 and np.all(np.isfinite(ksb.g))


def test_ngmix_backend_agrees_with_builtin(galaxies, metacal_result):
    """NGMix admom metacal and the built-in metacal agree within errors on the same galaxies."""
    pytest.importorskip("ngmix", reason=ngmix_backend.INSTALL_HINT)
    simulation, data = galaxies
    count = 300
    ours = linear_bias(metacal_result.g[:count], data["labels"][:count])
    result = measure(
        "ngmix", data["images"][:count], simulation.psf_image(), 0.2, 1e-5, fitter="admom"
    )
    assert result.n_failed == 0
    theirs = linear_bias(result.g, data["labels"][:count])
    for i in (0, 1):
        combined = np.hypot(ours.m_err[i], theirs.m_err[i])
        assert abs(ours.m[i] - theirs.m[i]) < 4 * combined
    our_rmse = rmse(metacal_result.g[:count], data["labels"][:count])[2]
    assert our_rmse < 1.2 * rmse(result.g, data["labels"][:count])[2]


def test_ngmix_missing_says_how_to_install():
    if ngmix_backend.available():
        pytest.skip("ngmix is installed")
    images = np.zeros((1, 21, 21))
    with pytest.raises(ImportError, match="conda install -c conda-forge ngmix"):
        measure("ngmix", images, np.ones((21, 21)), 0.2, 1e-5)


def test_parallel_chunks_give_the_same_result_as_one_process():
    """Noise correction draws its noise per object, so chunking and workers do not matter."""
    simulation = metacal_benchmark_simulation(noise_sigma=1e-3, stamp_size=33)
    data = simulate_split(simulation, np.random.SeedSequence(5), 24)
    psf = simulation.psf_image()
    assert resolve_fix_noise(None, 1e-3) and not resolve_fix_noise(None, 1e-5)
    serial = measure("metacal", data["images"], psf, 0.2, 1e-3, workers=1)
    parallel = measure("metacal", data["images"], psf, 0.2, 1e-3, workers=2)
    np.testing.assert_array_equal(serial.g, parallel.g)
    np.testing.assert_array_equal(serial.ok, parallel.ok)
    no_fix = measure("metacal", data["images"], psf, 0.2, 1e-3, workers=1, fix_noise=False)
    assert not np.array_equal(no_fix.g, serial.g)
    # one PSF per object gives the same answer as one shared PSF
    per_object = measure(
        "metacal", data["images"], np.repeat(psf[None], 24, axis=0), 0.2, 1e-3, workers=1
    )
    np.testing.assert_array_equal(per_object.g, serial.g)


def test_failed_objects_are_flagged_not_dropped():
    simulation = metacal_benchmark_simulation(stamp_size=33)
    images = simulate_split(simulation, np.random.SeedSequence(9), 8)["images"].copy()
    images[3] = 0.0  # nothing to measure
    psf = simulation.psf_image()
    for name in ("metacal", "hsm"):
        result = measure(name, images, psf, 0.2, 1e-5, workers=1)
        assert result.n == 8 and result.n_failed == 1
        assert not result.ok[3] and np.isnan(result.g1[3]) and np.isnan(result.g2[3])
        assert np.all(np.isfinite(result.g[result.ok]))
    metacal = measure("metacal", images, psf, 0.2, 1e-5, workers=1)
    assert np.allclose(metacal.response, metacal.R[metacal.ok].mean(axis=0))


def test_cache_hit_and_corrupted_entry_recomputed(tmp_path, caplog):
    simulation = metacal_benchmark_simulation(stamp_size=33)
    images = simulate_split(simulation, np.random.SeedSequence(3), 12)["images"]
    psf = simulation.psf_image()
    args = ("metacal", images, psf, 0.2, 1e-5)
    kwargs = {"cache_dir": tmp_path, "dataset_key": "test-set-abc", "progress": False, "workers": 1}
    caplog.set_level(logging.INFO, logger="lensnas")

    first = cached_measure(*args, **kwargs)
    assert not first.cache_hit and "reference cache miss" in caplog.text
    caplog.clear()
    second = cached_measure(*args, **kwargs)
    assert second.cache_hit and "reference cache hit" in caplog.text
    np.testing.assert_array_equal(first.g, second.g)
    assert second.core_seconds == first.core_seconds  # the speed of the original computation

    config = reference_config("metacal", {}, "test-set-abc", 0.2, 1e-5, len(images))
    stored = entry_path(tmp_path, "reference-metacal", config) / "e.npy"
    data = bytearray(stored.read_bytes())
    data[-3] ^= 0xFF
    stored.write_bytes(bytes(data))
    caplog.clear()
    third = cached_measure(*args, **kwargs)
    assert (
        not third.cache_hit and "corrupt" in caplog.text and "reference cache miss" in caplog.text
    )
    np.testing.assert_array_equal(third.g, first.g)

    other = cached_measure(*args, **{**kwargs, "dataset_key": "another"})
    assert not other.cache_hit  # a different test set is a different entry
    hsm = cached_measure("hsm", images, psf, 0.2, 1e-5, **kwargs)
    assert not hsm.cache_hit and hsm.settings == {"method": "REGAUSS"}


def test_settings_are_checked():
    with pytest.raises(ValueError, match="allowed: metacal, hsm, ngmix"):
        estimator_settings("regauss")
    with pytest.raises(ValueError, match="allowed: method"):
        estimator_settings("hsm", {"methd": "KSB"})
    with pytest.raises(ValueError, match="REGAUSS, KSB"):
        estimator_settings("hsm", {"method": "BJ"})
    with pytest.raises(ValueError, match="dilate, fitgauss, gauss"):
        estimator_settings("metacal", {"psf": "moffat"})
    assert estimator_settings("metacal", {"step": 0.02})["step"] == 0.02
    with pytest.raises(ValueError, match="images must be"):
        measure("hsm", np.zeros((21, 21)), np.ones((21, 21)), 0.2, 1e-5)


def test_distortion_to_shear():
    shear = galsim.Shear(g1=0.3, g2=-0.2)
    assert distortion_to_shear(shear.e1, shear.e2) == pytest.approx((0.3, -0.2))
    assert np.isnan(distortion_to_shear(1.0, 0.0)[0])


def test_baseline_rows_and_table(tmp_path, caplog):
    simulation = metacal_benchmark_simulation(stamp_size=33)
    rows = baseline_rows(simulation, 40, 7, [1e-5, 1e-3], tmp_path, progress=False)
    names = [row.name for row in rows]
    assert names[:4] == ["Cramér-Rao bound", "metacal", "hsm REGAUSS", "hsm KSB"]
    rows = [row for row in rows if row.key != "bound"]  # the bound has no estimates
    assert {row.conditions["noise_sigma"] for row in rows} == {1e-5, 1e-3}
    for row in rows:
        for key in ("rmse_g1", "rmse_g2", "m1", "m1_err", "m2", "c1", "c2_err", "n_failed"):
            assert key in row.metrics
        assert row.metrics["galaxies_per_core_second"] > 0 and row.description
    low_noise = {row.name: row.metrics for row in rows if row.conditions["noise_sigma"] == 1e-5}
    assert low_noise["metacal"]["rmse_g1"] < low_noise["hsm REGAUSS"]["rmse_g1"]
    assert low_noise["metacal"]["object_rmse"] > 0  # metacal has a response per galaxy
    with caplog.at_level(logging.INFO, logger="lensnas"):
        again = baseline_rows(simulation, 40, 7, [1e-5], tmp_path, progress=False)
    assert "reference cache miss" not in caplog.text and "reference cache hit" in caplog.text
    assert again[1].metrics["m1"] == low_noise["metacal"]["m1"]
    header, table = comparison_rows(ShearObjective, rows, extra=ShearObjective.BASELINE_COLUMNS)
    assert header[0] == "estimator" and header[-1] == "what it is"
    assert {"rmse", "m1", "c2", "n_failed"} <= set(header)
    assert table[0][0] == "metacal (noise_sigma 1e-05)" and len(table) == len(rows)
