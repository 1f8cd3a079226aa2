"""Image-quality metrics and training losses for super-resolution, on [0, 1] images.

One convention throughout, scikit-image's ``structural_similarity(..., data_range=1,
gaussian_weights=True, sigma=1.5, use_sample_covariance=False)``: an 11x11 Gaussian window
(sigma 1.5 pixels, truncated at 3.5 sigma), K1 = 0.01, K2 = 0.03, and the SSIM map averaged
over the pixels at least 5 pixels from the border. MSE, PSNR and SSIM are computed per image
and then averaged over images; PSNR = 10 log10(1 / MSE) with the MSE floored at 1e-10
(PSNR at most 100 dB) so an exact reconstruction does not make the average infinite.

scikit-image is not needed at run time (tests check agreement with it).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage
from torch import nn

DATA_RANGE = 1.0
SSIM_SIGMA = 1.5
SSIM_TRUNCATE = 3.5
SSIM_RADIUS = int(SSIM_TRUNCATE * SSIM_SIGMA + 0.5)  # 5: an 11x11 window
SSIM_K1 = 0.01
SSIM_K2 = 0.03
MSE_FLOOR = 1e-10
SSIM_L1_WEIGHT = 0.84  # weight of (1 - SSIM) in ssim_l1 (Zhao et al. 2017), 0.16 on L1
CHARBONNIER_EPSILON = 1e-3


def _as_stack(images: np.ndarray) -> np.ndarray:
    """(N, H, W) float64 from (H, W), (N, H, W) or (N, 1, H, W)."""
    array = np.asarray(images, dtype=np.float64)
    if array.ndim == 2:
        return array[None]
    if array.ndim == 4:
        if array.shape[1] != 1:
            raise ValueError(f"expected one channel, got shape {array.shape}")
        return array[:, 0]
    if array.ndim != 3:
        raise ValueError(f"expected (H, W), (N, H, W) or (N, 1, H, W), got shape {array.shape}")
    return array


def _pair(truth: np.ndarray, estimate: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    truth, estimate = _as_stack(truth), _as_stack(estimate)
    if truth.shape != estimate.shape:
        raise ValueError(f"shape mismatch: {truth.shape} vs {estimate.shape}")
    return truth, estimate


def mse_per_image(truth: np.ndarray, estimate: np.ndarray) -> np.ndarray:
    """Mean squared error of each image, shape (N,)."""
    truth, estimate = _pair(truth, estimate)
    return np.mean((truth - estimate) ** 2, axis=(1, 2))


def psnr_per_image(truth: np.ndarray, estimate: np.ndarray) -> np.ndarray:
    """PSNR in dB of each image (data range 1), shape (N,)."""
    mse = np.maximum(mse_per_image(truth, estimate), MSE_FLOOR)
    return 10.0 * np.log10(DATA_RANGE**2 / mse)


def _ssim_map(smooth: Any, truth: Any, estimate: Any) -> Any:
    """The SSIM map from local moments; ``smooth`` is the Gaussian window (numpy or torch)."""
    mu_x, mu_y = smooth(truth), smooth(estimate)
    var_x = smooth(truth * truth) - mu_x * mu_x
    var_y = smooth(estimate * estimate) - mu_y * mu_y
    cov_xy = smooth(truth * estimate) - mu_x * mu_y
    c1, c2 = (SSIM_K1 * DATA_RANGE) ** 2, (SSIM_K2 * DATA_RANGE) ** 2
    return ((2 * mu_x * mu_y + c1) * (2 * cov_xy + c2)) / (
        (mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2)
    )


def ssim_per_image(truth: np.ndarray, estimate: np.ndarray) -> np.ndarray:
    """Mean SSIM of each image with scikit-image's Gaussian-window convention, shape (N,)."""
    truth, estimate = _pair(truth, estimate)
    if min(truth.shape[1:]) < 2 * SSIM_RADIUS + 1:
        raise ValueError(f"SSIM needs images of at least 11x11 pixels, got {truth.shape[1:]}")

    def smooth(image: np.ndarray) -> np.ndarray:
        return ndimage.gaussian_filter(
            image, sigma=(0, SSIM_SIGMA, SSIM_SIGMA), truncate=SSIM_TRUNCATE, mode="reflect"
        )

    r = SSIM_RADIUS
    return _ssim_map(smooth, truth, estimate)[:, r:-r, r:-r].mean(axis=(1, 2))


def mse(truth: np.ndarray, estimate: np.ndarray) -> float:
    """MSE averaged over images."""
    return float(np.mean(mse_per_image(truth, estimate)))


def psnr(truth: np.ndarray, estimate: np.ndarray) -> float:
    """PSNR (dB) averaged over images."""
    return float(np.mean(psnr_per_image(truth, estimate)))


def ssim(truth: np.ndarray, estimate: np.ndarray) -> float:
    """SSIM averaged over images."""
    return float(np.mean(ssim_per_image(truth, estimate)))


def image_metrics(truth: np.ndarray, estimate: np.ndarray) -> dict[str, float]:
    """``{"mse", "psnr", "ssim"}`` of ``estimate`` against ``truth``, averaged per image."""
    return {
        "mse": mse(truth, estimate),
        "psnr": psnr(truth, estimate),
        "ssim": ssim(truth, estimate),
    }


def bicubic_upsample(images: np.ndarray, scale: int, batch_size: int = 256) -> np.ndarray:
    """Bicubic upsampling (torch, align_corners=False) of (N, 1, H, W) images, clamped to [0, 1]."""
    outputs = []
    with torch.no_grad():
        for start in range(0, len(images), batch_size):
            batch = torch.from_numpy(
                np.asarray(images[start : start + batch_size], dtype=np.float32)
            )
            upsampled = F.interpolate(
                batch, scale_factor=scale, mode="bicubic", align_corners=False
            )
            outputs.append(upsampled.clamp(0.0, 1.0).numpy())
    return np.concatenate(outputs)


def gaussian_window(dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The normalised 1-d SSIM window: 11 taps of a Gaussian of sigma 1.5."""
    offsets = torch.arange(-SSIM_RADIUS, SSIM_RADIUS + 1, dtype=torch.float64)
    window = torch.exp(-0.5 * (offsets / SSIM_SIGMA) ** 2)
    return (window / window.sum()).to(dtype)


def torch_ssim(truth: torch.Tensor, estimate: torch.Tensor) -> torch.Tensor:
    """Differentiable mean SSIM of (N, C, H, W) batches, same convention as :func:`ssim`."""
    channels = truth.shape[1]
    window = gaussian_window(truth.dtype).to(truth.device)
    rows = window.view(1, 1, -1, 1).repeat(channels, 1, 1, 1)
    columns = window.view(1, 1, 1, -1).repeat(channels, 1, 1, 1)

    def smooth(image: torch.Tensor) -> torch.Tensor:
        # A "valid" convolution gives exactly the border-cropped map scikit-image averages.
        return F.conv2d(F.conv2d(image, rows, groups=channels), columns, groups=channels)

    return _ssim_map(smooth, truth, estimate).mean()


class CharbonnierLoss(nn.Module):
    """Charbonnier loss: mean of sqrt(diff^2 + eps^2), a smooth L1."""

    def __init__(self, epsilon: float = CHARBONNIER_EPSILON):
        super().__init__()
        self.epsilon = epsilon

    def forward(self, prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return torch.sqrt((prediction - target) ** 2 + self.epsilon**2).mean()


class SSIML1Loss(nn.Module):
    """0.84 (1 - SSIM) + 0.16 L1 (the SSIM + L1 mix of Zhao et al. 2017)."""

    def __init__(self, ssim_weight: float = SSIM_L1_WEIGHT):
        super().__init__()
        self.ssim_weight = ssim_weight

    def forward(self, prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        structural = 1.0 - torch_ssim(target, prediction)
        return self.ssim_weight * structural + (1 - self.ssim_weight) * F.l1_loss(
            prediction, target
        )


class TrainValidationLoss(nn.Module):
    """The trial's own loss while gradients are on, a study-wide loss (MSE) under no_grad.

    The training loop evaluates its validation loss under ``torch.no_grad()``: this makes the
    reported per-epoch value (and so pruning and best-epoch selection) comparable between
    trials that train with different losses.
    """

    def __init__(self, train_loss: nn.Module, validation_loss: nn.Module | None = None):
        super().__init__()
        self.train_loss = train_loss
        self.validation_loss = validation_loss if validation_loss is not None else nn.MSELoss()

    def forward(self, prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled():
            return self.train_loss(prediction, target)
        return self.validation_loss(prediction, target)


SR_LOSSES: dict[str, type[nn.Module]] = {
    "l1": nn.L1Loss,
    "mse": nn.MSELoss,
    "charbonnier": CharbonnierLoss,
    "ssim_l1": SSIML1Loss,
}


def sr_loss(name: str) -> nn.Module:
    """The training loss by name (one of SR_LOSSES)."""
    if name not in SR_LOSSES:
        raise ValueError(f"unknown SR loss {name!r}; allowed: {', '.join(SR_LOSSES)}")
    return SR_LOSSES[name]()
