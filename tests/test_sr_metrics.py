"""SR metrics agree with scikit-image; the torch SSIM and the SR losses behave; the degradation
operator, the flux error and the LR-consistency scores give known answers."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from lensnas.objectives.sr.data import (
    POPULATION_DEFAULTS,
    LensSimulator,
    normalize_per_image,
    simulation_config,
)
from lensnas.objectives.sr.metrics import (
    CharbonnierLoss,
    ConsistencyLoss,
    Degradation,
    SSIML1Loss,
    TrainValidationLoss,
    bicubic_upsample,
    bilinear_upsample,
    consistency_rms_per_image,
    flux_error_per_image,
    gaussian_blur,
    image_metrics,
    mse,
    physics_metrics,
    psnr,
    psnr_per_image,
    sr_loss,
    ssim,
    ssim_per_image,
    ssim_published_per_image,
    torch_ssim,
)

TOLERANCE = 1e-4


def skimage_ssim(truth: np.ndarray, estimate: np.ndarray) -> float:
    return structural_similarity(
        truth, estimate, gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=1
    )


def reference(truth: np.ndarray, estimate: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    ssims = [skimage_ssim(t, e) for t, e in zip(truth, estimate)]
    psnrs = [peak_signal_noise_ratio(t, e, data_range=1) for t, e in zip(truth, estimate)]
    return np.array(ssims), np.array(psnrs)


@pytest.fixture(scope="module")
def simulated() -> tuple[np.ndarray, np.ndarray]:
    """Normalised HR images and the bicubic upsampling of their noisy LR partners."""
    options = {"source": "simulate", "scale": 2, "supersampling": 1, **POPULATION_DEFAULTS}
    simulator = LensSimulator(simulation_config(options))
    rng = np.random.default_rng(5)
    lows, highs, _ = zip(*simulator.pairs(4, rng))
    lr = normalize_per_image(np.array(lows))[:, None]
    hr = normalize_per_image(np.array(highs))
    return hr, bicubic_upsample(lr, 2)[:, 0]


@pytest.mark.parametrize("shape", [(3, 32, 32), (2, 40, 29), (2, 150, 150)])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_metrics_match_skimage_on_random_images(shape, dtype):
    rng = np.random.default_rng(sum(shape))
    truth = rng.random(shape).astype(dtype)
    estimate = np.clip(truth + 0.1 * rng.standard_normal(shape), 0, 1).astype(dtype)
    ssims, psnrs = reference(truth, estimate)
    assert np.allclose(ssim_per_image(truth, estimate), ssims, atol=TOLERANCE, rtol=0)
    assert np.allclose(psnr_per_image(truth, estimate), psnrs, atol=TOLERANCE, rtol=0)
    assert ssim(truth, estimate) == pytest.approx(ssims.mean(), abs=TOLERANCE)
    assert psnr(truth, estimate) == pytest.approx(psnrs.mean(), abs=TOLERANCE)


def test_metrics_match_skimage_on_simulated_images(simulated):
    truth, estimate = simulated
    ssims, psnrs = reference(truth, estimate)
    metrics = image_metrics(truth[:, None], estimate[:, None])
    assert metrics["ssim"] == pytest.approx(ssims.mean(), abs=TOLERANCE)
    assert metrics["psnr"] == pytest.approx(psnrs.mean(), abs=TOLERANCE)
    assert metrics["mse"] == pytest.approx(np.mean((truth - estimate) ** 2), rel=1e-6)
    assert np.allclose(ssim_per_image(truth, estimate), ssims, atol=TOLERANCE, rtol=0)


def test_published_ssim_is_scikit_images_default_with_the_sr_images_range(simulated):
    """The convention of DeepLense's published Model-1 SSIM: scikit-image's defaults, data range
    of the SR image; it differs from ours on the same images."""
    truth, estimate = simulated
    expected = [structural_similarity(t, e, data_range=float(e.max() - e.min()))
                for t, e in zip(truth, estimate)]
    published = ssim_published_per_image(truth, estimate)
    assert np.allclose(published, expected, atol=TOLERANCE, rtol=0)
    assert np.max(np.abs(published - ssim_per_image(truth, estimate))) > 3e-3


def test_torch_ssim_matches_numpy_and_is_differentiable(simulated):
    truth, estimate = simulated
    expected = ssim(truth, estimate)
    for dtype in (torch.float64, torch.float32):
        prediction = torch.tensor(estimate[:, None], dtype=dtype, requires_grad=True)
        value = torch_ssim(torch.tensor(truth[:, None], dtype=dtype), prediction)
        assert value.item() == pytest.approx(expected, abs=TOLERANCE)
        value.backward()
        assert torch.isfinite(prediction.grad).all() and prediction.grad.abs().sum() > 0


def test_identical_images_and_psnr_floor():
    images = np.random.default_rng(0).random((2, 1, 16, 16))
    assert ssim(images, images) == pytest.approx(1.0)
    assert psnr(images, images) == pytest.approx(100.0)
    assert mse(images, images) == 0.0
    with pytest.raises(ValueError, match="11x11"):
        ssim(images[:, :, :8, :8], images[:, :, :8, :8])
    with pytest.raises(ValueError, match="shape mismatch"):
        psnr(images, images[:, :, :8])


def test_bicubic_upsample_shape_and_range():
    lr = np.random.default_rng(1).random((3, 1, 20, 20)).astype(np.float32)
    hr = bicubic_upsample(lr, 2, batch_size=2)
    assert hr.shape == (3, 1, 40, 40) and hr.dtype == np.float32
    assert hr.min() >= 0.0 and hr.max() <= 1.0


def test_bilinear_upsample_is_opencvs_pixel_centre_convention():
    from skimage.transform import resize

    lr = np.random.default_rng(1).random((2, 1, 9, 7)).astype(np.float32)
    expected = [resize(image[0].astype(np.float64), (18, 14), order=1, mode="edge",
                       anti_aliasing=False) for image in lr]
    assert np.allclose(bilinear_upsample(lr, 2)[:, 0], expected, atol=1e-6)


# ------------------------------------------------------------ physics-aware scores


def test_gaussian_blur_is_scipys_with_a_zero_border():
    from scipy import ndimage

    image = np.random.default_rng(3).random((30, 26))
    blurred = gaussian_blur(torch.from_numpy(image)[None, None], 3.0)[0, 0].numpy()
    sigma = 3.0 / (2 * np.sqrt(2 * np.log(2)))
    expected = ndimage.gaussian_filter(image, sigma, mode="constant", truncate=5.0)
    assert np.allclose(blurred, expected, atol=1e-12)
    unblurred = gaussian_blur(torch.from_numpy(image)[None, None], 0.0)
    assert torch.equal(unblurred[0, 0], torch.from_numpy(image))


@pytest.mark.parametrize(("scale", "psf_fwhm"), [(2, 0.0), (2, 2.5), (4, 3.0)])
def test_an_hr_image_degraded_by_the_operator_is_exactly_consistent(simulated, scale, psf_fwhm):
    hr = simulated[0][:, None, :144, :144].astype(np.float64)
    operator = Degradation(scale, psf_fwhm)
    lr = operator(torch.from_numpy(hr)).numpy()
    assert lr.shape == (4, 1, 144 // scale, 144 // scale)
    assert np.all(consistency_rms_per_image(hr, lr, operator) < 1e-9)
    # the LR image normalised on its own (another gain and offset): still exactly consistent
    normalised = normalize_per_image(lr)
    assert np.all(consistency_rms_per_image(hr, normalised, operator) < 1e-6)
    # a different image is not
    shifted = np.roll(hr, 3, axis=3)
    assert np.all(consistency_rms_per_image(shifted, normalised, operator) > 1e-3)


def test_consistency_chi_of_the_truth_is_one_in_units_of_the_noise(simulated):
    hr = simulated[0][:, None].astype(np.float64)
    operator = Degradation(2, 1.5)
    clean = operator(torch.from_numpy(hr)).numpy()
    rng = np.random.default_rng(7)
    sigma = np.array([0.01, 0.02, 0.05, 0.1])
    noisy = clean + rng.standard_normal(clean.shape) * sigma[:, None, None, None]
    scores = physics_metrics(hr, hr, noisy, operator, sigma)
    # 75 x 75 = 5625 pixels per image: the RMS of the noise is sigma within a few percent
    assert scores["consistency_chi"] == pytest.approx(1.0, abs=0.03)
    assert scores["consistency_rms"] == pytest.approx(sigma.mean(), rel=0.03)
    assert scores["flux_error"] == 0.0
    assert "consistency_chi" not in physics_metrics(hr, hr, noisy, operator)


def test_flux_error_of_scaled_images():
    hr = np.random.default_rng(4).random((3, 1, 20, 20)) + 0.1
    assert np.allclose(flux_error_per_image(hr, 1.1 * hr), 0.1)
    assert np.allclose(flux_error_per_image(hr, 0.5 * hr), 0.5)
    shifted = np.roll(hr, 5, axis=3)  # the same light elsewhere: no flux error
    assert np.allclose(flux_error_per_image(hr, shifted), 0.0)


def test_consistency_loss_adds_the_operators_term():
    rng = np.random.default_rng(5)
    target = torch.tensor(rng.random((2, 1, 24, 24)), dtype=torch.float32)
    prediction = (target + 0.1 * torch.randn_like(target)).requires_grad_(True)
    operator = Degradation(2, 2.0)
    loss = sr_loss("l1", consistency_weight=3.0, operator=operator)
    assert isinstance(loss, ConsistencyLoss)
    expected = torch.nn.functional.l1_loss(prediction, target) + 3.0 * torch.mean(
        (operator(prediction) - operator(target)) ** 2)
    value = loss(prediction, target)
    assert float(value.detach()) == pytest.approx(float(expected.detach()), rel=1e-6)
    value.backward()
    assert prediction.grad is not None and torch.isfinite(prediction.grad).all()
    assert float(loss(target, target)) == 0.0
    # without a PSF, a pattern that averages out over each 2 x 2 block costs the term nothing
    checkerboard = 0.1 * (-1.0) ** torch.arange(24).add(torch.arange(24)[:, None])
    binning_only = sr_loss("l1", consistency_weight=3.0, operator=Degradation(2))
    assert float(binning_only(target + checkerboard, target)) == pytest.approx(0.1)
    assert type(sr_loss("l1", 0.0, operator)) is torch.nn.L1Loss
    with pytest.raises(ValueError, match="degradation operator"):
        sr_loss("l1", 1.0)


def test_losses():
    rng = np.random.default_rng(2)
    target = torch.tensor(rng.random((2, 1, 24, 24)), dtype=torch.float32)
    prediction = (target + 0.05 * torch.randn_like(target)).requires_grad_(True)
    for name in ("l1", "mse", "charbonnier", "ssim_l1"):
        loss = sr_loss(name)(prediction, target)
        assert loss.ndim == 0 and loss.item() > 0
        loss.backward()
    assert float(CharbonnierLoss()(target, target)) == pytest.approx(1e-3)
    assert float(SSIML1Loss()(target, target)) == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError, match="unknown SR loss"):
        sr_loss("huber")


def test_validation_loss_is_mse_under_no_grad():
    target = torch.zeros(1, 1, 16, 16)
    prediction = torch.full((1, 1, 16, 16), 0.5)
    loss = TrainValidationLoss(sr_loss("l1"))
    assert float(loss(prediction, target)) == pytest.approx(0.5)
    with torch.no_grad():
        assert float(loss(prediction, target)) == pytest.approx(0.25)
