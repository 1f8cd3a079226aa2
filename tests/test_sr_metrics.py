"""SR metrics agree with scikit-image; the torch SSIM and the SR losses behave."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from lensnas.objectives.sr_data import (
    POPULATION_DEFAULTS,
    LensSimulator,
    normalize_per_image,
    simulation_config,
)
from lensnas.objectives.sr_metrics import (
    CharbonnierLoss,
    SSIML1Loss,
    TrainValidationLoss,
    bicubic_upsample,
    image_metrics,
    mse,
    psnr,
    psnr_per_image,
    sr_loss,
    ssim,
    ssim_per_image,
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
    options = {
        "source": "simulate",
        "scale": 2,
        "hr_psf_fwhm": 0.0,
        "supersampling": 1,
        **POPULATION_DEFAULTS,
    }
    simulator = LensSimulator(simulation_config(options))
    rng = np.random.default_rng(5)
    lows, highs = zip(*(simulator.pair(rng) for _ in range(4)))
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
