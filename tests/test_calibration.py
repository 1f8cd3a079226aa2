"""Response calibration of a shear estimator by metacal's images (objectives/shear/calibration):
on real GalSim renderings, an estimator's response and calibrated shears are right (exactly for an
estimator linear in g, within 1e-3 in m for a biased moment estimator), the response of the
adaptive-moments distortion is the built-in metacal's own, the images' PSF channel is their PSF,
and results do not depend on chunks, workers, shared or per-object PSFs or the cache."""

from __future__ import annotations

import galsim
import numpy as np
import pytest

from lensnas.objectives.shear import calibration, metacal
from lensnas.objectives.shear.calibration import (
    KEYS,
    cached_metacal_images,
    calibrated,
    metacal_images,
    network_response,
)
from lensnas.objectives.shear.data import GalaxySimulation, simulate_split, wide_stamps

STEP = 0.01
SLOPE = np.array([[0.8, 0.1], [-0.05, 0.9]])  # not symmetric: catches a transposed response
OFFSET = np.array([3e-3, -2e-3])


def simulation(**overrides) -> GalaxySimulation:
    """Small stamps of round exponential galaxies of one size (one response), little noise."""
    settings = {"stamp_size": 33, "pixel_scale": 0.2, "half_light_radius_min": 0.4,
                "half_light_radius_max": 0.4, "shear_max": 0.02, "noise_sigma": 1e-6}
    return GalaxySimulation(**{**settings, **overrides})


def paired(sim: GalaxySimulation, count: int, seed: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """Stamps at +g then the same galaxies and noise at -g (2 count, H, W), and g (count, 2)."""
    split = simulate_split(sim, np.random.SeedSequence(seed), count, paired=True)
    return np.concatenate([split["images"], split["images_minus"]]), split["labels"].astype(float)


def distortion(pixel_scale: float):
    """An estimator: the adaptive-moments distortion (e1, e2) of each image."""
    def estimate(images: np.ndarray, psf: np.ndarray | None) -> np.ndarray:
        return np.array([metacal.adaptive_distortion(image, pixel_scale)[:2] for image in images])

    return estimate


def paired_bias(estimates: np.ndarray, truth: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """m (2,) and c (2,) of estimates of the +g then -g stamps (noise and shape cancel)."""
    count = len(truth)
    half = (estimates[:count] - estimates[count:]) / 2
    m = np.sum(half * truth, axis=0) / np.sum(truth**2, axis=0) - 1
    return m, ((estimates[:count] + estimates[count:]) / 2).mean(axis=0)


@pytest.fixture(scope="module")
def noisy():
    """16 stamps at noise 1e-3 (metacal's noise correction on), their PSF and images."""
    sim = simulation(stamp_size=25, half_light_radius_max=0.6, shear_max=0.1, noise_sigma=1e-3)
    split = simulate_split(sim, np.random.SeedSequence(1), 16)
    psf = sim.psf_image()
    images = metacal_images(split["images"], psf, sim.pixel_scale, sim.noise_sigma,
                            fix_noise=True, workers=1)
    return sim, split["images"], psf, images


def test_an_estimator_linear_in_g_is_calibrated_exactly(noisy):
    """estimate = SLOPE (g + applied metacal shear) + OFFSET, looked up from each image: the
    response is SLOPE, and <R>^-1 e = g + SLOPE^-1 OFFSET for the mean and each own response."""
    _, stamps, _, images = noisy
    truth = np.random.default_rng(0).uniform(-0.05, 0.05, (len(stamps), 2))
    shifts = {key: STEP * np.array(signs) for key, signs in metacal.SHEARS.items()}
    known = {images[key][i].tobytes(): truth[i] + shifts[key]
             for key in KEYS for i in range(len(stamps))}

    def estimate(batch: np.ndarray, psf: np.ndarray | None) -> np.ndarray:
        return np.array([SLOPE @ known[image.tobytes()] + OFFSET for image in batch])

    e, response = network_response(estimate, images, STEP)
    np.testing.assert_allclose(response, np.broadcast_to(SLOPE, response.shape), atol=1e-12)
    result = calibrated(e, response)
    np.testing.assert_allclose(result["response"], SLOPE, atol=1e-12)
    expected = truth + np.linalg.solve(SLOPE, OFFSET)
    np.testing.assert_allclose(result["g"], expected, atol=1e-12)
    np.testing.assert_allclose(result["g_object"], expected, atol=1e-12)
    assert result["ok"].all()


@pytest.mark.parametrize("psf", ["gaussian", "moffat"])
def test_calibration_removes_the_bias_of_a_moment_estimator(psf):
    """SLOPE x the adaptive-moments distortion + OFFSET has m of -25..-50%; calibrated by its
    response to metacal's images, |m| < 1e-3, and its offset becomes <R>^-1 OFFSET."""
    sim = simulation(psf_profile=psf, psf_fwhm=0.9 if psf == "gaussian" else 1.0)
    stamps, truth = paired(sim, 24)
    images = metacal_images(stamps, sim.psf_image(), sim.pixel_scale, sim.noise_sigma, workers=1)
    moments = distortion(sim.pixel_scale)

    def estimate(batch: np.ndarray, psf_image: np.ndarray | None) -> np.ndarray:
        return moments(batch, psf_image) @ SLOPE.T + OFFSET

    e, response = network_response(estimate, images, STEP)
    m_raw, _ = paired_bias(e, truth)
    assert np.all(m_raw < -0.2), m_raw
    result = calibrated(e, response)
    for g in (result["g"], result["g_object"]):
        m, c = paired_bias(g, truth)
        assert np.all(np.abs(m) < 1e-3), m
        np.testing.assert_allclose(c, np.linalg.solve(result["response"], OFFSET), atol=2e-5)


def test_round_target_psf_removes_psf_leakage():
    """Galaxies seen through a PSF of ellipticity 0.05: the adaptive-moments distortion, calibrated
    with metacal's "dilate" target (which keeps the PSF's anisotropy), has c1 of order 1e-2; with
    the round "gauss" target (the shear objective's default calibration_psf) |c1| < 1e-3."""
    sim = simulation(psf_g1=0.05)
    stamps, truth = paired(sim, 16)
    additive = {}
    for target in ("dilate", "gauss"):
        images = metacal_images(stamps, sim.psf_image(), sim.pixel_scale, sim.noise_sigma,
                                psf=target, workers=1)
        e, response = network_response(distortion(sim.pixel_scale), images, STEP)
        _, additive[target] = paired_bias(calibrated(e, response)["g"], truth)
    assert additive["dilate"][0] > 5e-3, additive
    assert abs(additive["gauss"][0]) < 1e-3 and abs(additive["gauss"][1]) < 1e-3, additive


def test_response_of_adaptive_moments_is_the_builtin_metacal_response(noisy):
    """The "network" returning the adaptive-moments distortion gets metacal.measure_chunk's own e
    and R on the same galaxies, the correcting noise included (chunked on 2 processes here)."""
    sim, stamps, psf, images = noisy
    reference = metacal.measure_chunk(stamps, psf, sim.pixel_scale, sim.noise_sigma, 0,
                                      fix_noise=True)
    assert reference["ok"].all()
    chunked = metacal_images(stamps, psf, sim.pixel_scale, sim.noise_sigma, fix_noise=True,
                             workers=2)
    for key in (*KEYS, "psf_target", "ok"):
        np.testing.assert_array_equal(chunked[key], images[key])  # chunks, workers: no change
    e, response = network_response(distortion(sim.pixel_scale), chunked, STEP)
    np.testing.assert_allclose(e, reference["e"], rtol=0, atol=1e-6)
    np.testing.assert_allclose(response, reference["R"], rtol=0, atol=1e-5)
    g, mean_response = metacal.calibrate(reference["e"], reference["R"], reference["ok"])
    result = calibrated(e, response)
    np.testing.assert_allclose(result["response"], mean_response, atol=1e-5)
    np.testing.assert_allclose(result["g"], g, atol=1e-5)
    without = metacal_images(stamps, psf, sim.pixel_scale, sim.noise_sigma, fix_noise=False,
                             workers=1)
    assert not np.array_equal(without["noshear"], images["noshear"])  # the noise was added


def test_psf_target_is_the_psf_of_the_metacal_images(noisy):
    """Metacal's unsheared image of a star (the PSF image itself) is the target PSF image;
    it has unit sum and is the PSF dilated by at most 1 + 2 step."""
    sim, _, psf, images = noisy
    target = images["psf_target"]
    assert target.shape == psf.shape and target.dtype == np.float32
    assert target.sum() == pytest.approx(1.0, abs=1e-6)
    star = metacal_images(psf[None], psf, sim.pixel_scale, 0.0, workers=1)
    np.testing.assert_array_equal(star["psf_target"], target)
    assert np.abs(star["noshear"][0] - target).max() < 1e-3 * target.max()
    grown = (metacal.adaptive_distortion(target, sim.pixel_scale)[2]
             / metacal.adaptive_distortion(psf, sim.pixel_scale)[2])
    assert 1.01 < grown <= metacal.dilation(STEP)


def test_per_object_psfs_equal_to_a_shared_psf_give_the_same_result(noisy):
    sim, stamps, psf, images = noisy
    count = len(stamps)
    each = metacal_images(stamps, np.repeat(psf[None], count, axis=0), sim.pixel_scale,
                          np.full(count, sim.noise_sigma), fix_noise=True, workers=2)
    for key in (*KEYS, "ok"):
        np.testing.assert_array_equal(each[key], images[key])
    assert each["psf_target"].shape == (count, *psf.shape)
    np.testing.assert_array_equal(each["psf_target"],
                                  np.broadcast_to(images["psf_target"], each["psf_target"].shape))
    seen = []

    def estimate(batch: np.ndarray, psf_images: np.ndarray | None) -> np.ndarray:
        seen.append(psf_images)
        return distortion(sim.pixel_scale)(batch, psf_images)

    np.testing.assert_array_equal(network_response(estimate, each, STEP)[1],
                                  network_response(distortion(sim.pixel_scale), images, STEP)[1])
    assert len(seen) == len(KEYS) and all(p is not None and p.shape == (count, *psf.shape)
                                          for p in seen)


def test_metacal_images_are_computed_once_and_reused(noisy, tmp_path, monkeypatch):
    sim, stamps, psf, images = noisy
    arguments = (lambda: (stamps, psf, sim.noise_sigma), sim.pixel_scale)
    first = cached_metacal_images(*arguments, cache_dir=tmp_path, dataset_key="test-set",
                                  fix_noise=True, workers=1)
    for key in (*KEYS, "psf_target", "ok"):
        np.testing.assert_array_equal(first[key], images[key])

    def recompute(*args, **kwargs):
        raise AssertionError("a cache hit must not compute the images again")

    monkeypatch.setattr(calibration, "metacal_images", recompute)
    second = cached_metacal_images(*arguments, cache_dir=tmp_path, dataset_key="test-set",
                                   fix_noise=True, workers=1)
    for key in (*KEYS, "psf_target", "ok"):
        np.testing.assert_array_equal(second[key], first[key])
    assert not second["noshear"].flags.writeable  # memory-mapped, read-only
    with pytest.raises(AssertionError, match="cache hit"):  # other settings: another entry
        cached_metacal_images(*arguments, cache_dir=tmp_path, dataset_key="test-set",
                              fix_noise=True, step=0.02, workers=1)


def unweighted_distortion(images: np.ndarray, psf: np.ndarray | None) -> np.ndarray:
    """An estimator that reads every pixel of the stamp, as a network does: the distortion of
    the unweighted second moments of the whole stamp."""
    size = images.shape[-1]
    y, x = np.mgrid[:size, :size] - (size - 1) / 2
    flux = images.sum(axis=(1, 2))
    xx, yy, xy = ((images * w).sum(axis=(1, 2)) / flux for w in (x * x, y * y, x * y))
    return np.stack([(xx - yy) / (xx + yy), 2 * xy / (xx + yy)], axis=1)


def test_metacal_of_wider_stamps_gives_the_response_to_real_shear():
    """Shearing a stamp shears its edge: for Sérsic n = 4 galaxies and an estimator that reads
    the whole stamp, metacal on the stamps themselves gets the response to shear wrong; made
    from wider stamps of the same galaxies (wide_stamps) and cropped, it is the response to
    galaxies rendered with the shear, within 1%."""
    sim = simulation(stamp_size=33, profile="sersic", sersic_index=4.0, half_light_radius_min=0.5,
                     half_light_radius_max=0.8, shear_max=0.05)
    split = simulate_split(sim, np.random.SeedSequence(3), 12, paired=True)
    wide = wide_stamps(sim, split, 49, seed=4)
    low = (49 - 33) // 2
    centre = (slice(None), slice(low, low + 33), slice(low, low + 33))
    np.testing.assert_array_equal(wide["images"][centre], split["images"])
    np.testing.assert_array_equal(wide["images_minus"][centre], split["images_minus"])
    noisy_sim = simulation(stamp_size=9, noise_sigma=0.1)
    noisy_split = simulate_split(noisy_sim, np.random.SeedSequence(5), 40, paired=True)
    ring = wide_stamps(noisy_sim, noisy_split, 21, seed=6)
    corners = {name: ring[name][:, :5, :5] for name in ("images", "images_minus")}
    assert 0.09 < corners["images"].std() < 0.11  # the stamps' own noise level around them
    np.testing.assert_allclose(corners["images"], corners["images_minus"], atol=1e-3)
    kernel = metacal.MetacalKernel(wide["psf_images"], sim.pixel_scale, 49, STEP)
    direct = {}
    for key, (sign1, sign2) in metacal.SHEARS.items():
        rendered = []
        for i in range(12):
            galaxy = sim.sheared_galaxy(split["half_light_radius"][i], split["flux"][i],
                                        split["intrinsic_g"][i], split["shear"][i])
            if sign1 or sign2:
                galaxy = galaxy.shear(g1=sign1 * STEP, g2=sign2 * STEP)
            rendered.append(galsim.Convolve(galaxy, kernel.target).drawImage(
                nx=33, ny=33, scale=sim.pixel_scale, method="no_pixel").array)
        direct[key] = np.array(rendered)
    truth = network_response(unweighted_distortion, direct, STEP)[1].mean(axis=0)
    on_stamps = metacal_images(split["images"], sim.psf_image(), sim.pixel_scale, sim.noise_sigma,
                               workers=1)
    cropped = metacal_images(wide["images"], wide["psf_images"], sim.pixel_scale, sim.noise_sigma,
                             workers=1, crop=33)
    assert cropped["noshear"].shape == (12, 33, 33) and cropped["psf_target"].shape == (33, 33)
    from_stamps = network_response(unweighted_distortion, on_stamps, STEP)[1].mean(axis=0)
    from_wide = network_response(unweighted_distortion, cropped, STEP)[1].mean(axis=0)
    assert abs(from_wide[0, 0] / truth[0, 0] - 1) < 0.01
    assert abs(from_wide[1, 1] / truth[1, 1] - 1) < 0.01
    assert abs(from_stamps[0, 0] / truth[0, 0] - 1) > 0.03
    with pytest.raises(ValueError, match="even number"):
        wide_stamps(sim, split, 48, seed=4)


def test_bad_inputs_and_failed_objects():
    stamps = np.zeros((2, 9, 9))
    with pytest.raises(ValueError, match="square"):
        metacal_images(np.zeros((2, 9, 8)), np.ones((9, 8)), 0.2, 0.0)
    with pytest.raises(ValueError, match="psf_images"):
        metacal_images(stamps, np.ones((7, 7)), 0.2, 0.0)
    with pytest.raises(ValueError, match="3 PSFs for 2 images"):
        metacal_images(stamps, np.ones((3, 9, 9)), 0.2, 0.0)
    with pytest.raises(ValueError, match="step"):
        metacal_images(stamps, np.ones((9, 9)), 0.2, 0.0, step=0.5)
    with pytest.raises(ValueError, match=r"expected \(2, 2\)"):
        network_response(lambda images, psf: np.zeros((2, 3)),
                         {key: stamps for key in KEYS}, STEP)
    e = np.array([[0.1, 0.0], [np.nan, 0.0], [0.2, 0.1]])
    response = np.array([np.eye(2), np.eye(2), 2 * np.eye(2)])
    result = calibrated(e, response)
    assert result["ok"].tolist() == [True, False, True]
    np.testing.assert_allclose(result["response"], 1.5 * np.eye(2))
    np.testing.assert_allclose(result["g"][[0, 2]], e[[0, 2]] / 1.5)
    np.testing.assert_allclose(result["g_object"][[0, 2]], [[0.1, 0.0], [0.1, 0.05]])
    assert np.isnan(result["g"][1]).all() and np.isnan(result["g_object"][1]).all()
