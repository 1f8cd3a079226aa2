"""Image-quality metrics and training losses for super-resolution, on [0, 1] images.

One convention throughout, scikit-image's ``structural_similarity(..., data_range=1,
gaussian_weights=True, sigma=1.5, use_sample_covariance=False)``: an 11x11 Gaussian window
(sigma 1.5 pixels, truncated at 3.5 sigma), K1 = 0.01, K2 = 0.03, and the SSIM map averaged
over the pixels at least 5 pixels from the border. MSE, PSNR and SSIM are computed per image
and then averaged over images; PSNR = 10 log10(1 / MSE) with the MSE floored at 1e-10
(PSNR at most 100 dB) so an exact reconstruction does not make the average infinite.

scikit-image is not needed at run time (tests check agreement with it).

Physics-aware scores use the study's degradation operator :class:`Degradation` (HR -> LR: the
Gaussian PSF that separates the LR image from the HR one, then the mean of ``scale x scale``
blocks), written once in torch and differentiable: the simulation makes its noiseless LR images
with it, the scores and the ``consistency`` loss term use it.

- ``flux_error``: per image |sum(SR) - sum(HR)| / sum(HR), averaged over images;
- ``consistency_rms``: per image, the RMS of ``LR - (a D(SR) + b)`` (``a``, ``b``: the
  least-squares gain and offset, because LR and HR are normalised to [0, 1] separately and their
  relative scale is unknown), in the LR image's [0, 1] units, averaged over images;
- ``consistency_chi``: the same RMS in units of the LR image's noise RMS (simulated data, whose
  noise is known): about 1 means "as consistent with the LR input as its noise allows".
"""

from __future__ import annotations

import math
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
FWHM_PER_SIGMA = 2.0 * math.sqrt(2.0 * math.log(2.0))
PSF_TRUNCATE = 5.0  # Gaussian PSF kernels are cut at 5 sigma (as lenstronomy's)
INTERPOLATIONS = ("bicubic", "bilinear")


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


PUBLISHED_SSIM_WINDOW = 7


def ssim_published_per_image(truth: np.ndarray, estimate: np.ndarray) -> np.ndarray:
    """SSIM of each image in the convention of the published DeepLense Model-1 numbers:
    scikit-image's defaults (a 7x7 uniform window, sample covariance, the map averaged away
    from a 3-pixel border) with the data range of each SR ``estimate`` (max - min), shape (N,)."""
    truth, estimate = _pair(truth, estimate)
    size = PUBLISHED_SSIM_WINDOW
    if min(truth.shape[1:]) < size:
        raise ValueError(f"SSIM needs images of at least {size}x{size} pixels, got {truth.shape[1:]}")
    out = np.empty(len(truth))
    sample = size * size / (size * size - 1.0)
    pad = (size - 1) // 2
    for i, (x, y) in enumerate(zip(truth.astype(np.float64), estimate.astype(np.float64))):
        data_range = float(y.max() - y.min()) or 1.0
        mu_x, mu_y = ndimage.uniform_filter(x, size), ndimage.uniform_filter(y, size)
        var_x = sample * (ndimage.uniform_filter(x * x, size) - mu_x * mu_x)
        var_y = sample * (ndimage.uniform_filter(y * y, size) - mu_y * mu_y)
        cov_xy = sample * (ndimage.uniform_filter(x * y, size) - mu_x * mu_y)
        c1, c2 = (SSIM_K1 * data_range) ** 2, (SSIM_K2 * data_range) ** 2
        ssim_map = ((2 * mu_x * mu_y + c1) * (2 * cov_xy + c2)) / (
            (mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
        out[i] = ssim_map[pad:-pad, pad:-pad].mean()
    return out


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


def upsample(images: np.ndarray, scale: int, mode: str, batch_size: int = 256) -> np.ndarray:
    """Interpolation (torch ``mode`` "bicubic" or "bilinear", align_corners=False, the pixel-centre
    convention of OpenCV's ``resize``) of (N, 1, H, W) images, clamped to [0, 1]."""
    if mode not in INTERPOLATIONS:
        raise ValueError(f"unknown interpolation {mode!r}; allowed: {', '.join(INTERPOLATIONS)}")
    outputs = []
    with torch.no_grad():
        for start in range(0, len(images), batch_size):
            batch = torch.from_numpy(
                np.array(images[start : start + batch_size], dtype=np.float32)  # a writable copy
            )
            upsampled = F.interpolate(batch, scale_factor=scale, mode=mode, align_corners=False)
            outputs.append(upsampled.clamp(0.0, 1.0).numpy())
    return np.concatenate(outputs)


def bicubic_upsample(images: np.ndarray, scale: int, batch_size: int = 256) -> np.ndarray:
    """Bicubic upsampling of (N, 1, H, W) images, clamped to [0, 1]."""
    return upsample(images, scale, "bicubic", batch_size)


def bilinear_upsample(images: np.ndarray, scale: int, batch_size: int = 256) -> np.ndarray:
    """Bilinear upsampling of (N, 1, H, W) images, clamped to [0, 1]."""
    return upsample(images, scale, "bilinear", batch_size)


# ---------------------------------------------------------------------- degradation operator


def gaussian_kernel(fwhm_pixels: float) -> torch.Tensor:
    """The normalised 1-d Gaussian of FWHM ``fwhm_pixels`` (float64), cut at 5 sigma as
    scipy's ``gaussian_filter(truncate=5)``; ``[1.0]`` for a FWHM of 0."""
    if fwhm_pixels <= 0:
        return torch.ones(1, dtype=torch.float64)
    sigma = fwhm_pixels / FWHM_PER_SIGMA
    radius = int(PSF_TRUNCATE * sigma + 0.5)
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float64)
    kernel = torch.exp(-0.5 * (offsets / sigma) ** 2)
    return kernel / kernel.sum()


def gaussian_blur(images: torch.Tensor, fwhm_pixels: float) -> torch.Tensor:
    """(N, C, H, W) images convolved with a round Gaussian of FWHM ``fwhm_pixels``; no light
    comes from outside the image (zero padding), as for a cut-out of the sky."""
    kernel = gaussian_kernel(fwhm_pixels).to(images.device, images.dtype)
    if len(kernel) == 1:
        return images
    channels, radius = images.shape[1], len(kernel) // 2
    rows = kernel.view(1, 1, -1, 1).repeat(channels, 1, 1, 1)
    columns = kernel.view(1, 1, 1, -1).repeat(channels, 1, 1, 1)
    blurred = F.conv2d(images, rows, padding=(radius, 0), groups=channels)
    return F.conv2d(blurred, columns, padding=(0, radius), groups=channels)


class Degradation(nn.Module):
    """A study's HR -> LR operator: the Gaussian PSF of ``psf_fwhm_pixels`` (HR pixels) that
    the LR image has beyond the HR one, then the mean of ``scale x scale`` blocks (surface
    brightness kept: the LR counts per pixel are ``scale**2`` times it). Differentiable."""

    def __init__(self, scale: int, psf_fwhm_pixels: float = 0.0):
        super().__init__()
        self.scale = int(scale)
        self.psf_fwhm_pixels = float(psf_fwhm_pixels)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return F.avg_pool2d(gaussian_blur(images, self.psf_fwhm_pixels), self.scale)

    def extra_repr(self) -> str:
        return f"scale={self.scale}, psf_fwhm_pixels={self.psf_fwhm_pixels:g}"


def fitted_residual(model_lr: torch.Tensor, lr: torch.Tensor) -> torch.Tensor:
    """``lr - (a model_lr + b)`` per image, with the least-squares gain ``a`` and offset ``b``
    of each image (images normalised separately have an unknown relative scale)."""
    axes = tuple(range(1, model_lr.ndim))
    model_centred = model_lr - model_lr.mean(dim=axes, keepdim=True)
    lr_centred = lr - lr.mean(dim=axes, keepdim=True)
    variance = (model_centred * model_centred).sum(dim=axes, keepdim=True)
    gain = (model_centred * lr_centred).sum(dim=axes, keepdim=True) / variance.clamp_min(1e-20)
    return lr_centred - gain * model_centred


def flux_error_per_image(truth: np.ndarray, estimate: np.ndarray) -> np.ndarray:
    """|sum(estimate) - sum(truth)| / sum(truth) of each image, shape (N,)."""
    truth, estimate = _pair(truth, estimate)
    total = truth.sum(axis=(1, 2))
    return np.abs(estimate.sum(axis=(1, 2)) - total) / np.maximum(total, 1e-12)


def consistency_rms_per_image(
    estimate: np.ndarray, lr: np.ndarray, operator: Degradation, batch_size: int = 256
) -> np.ndarray:
    """RMS over pixels of ``lr - (a D(estimate) + b)`` of each image (LR units), shape (N,)."""
    estimate, lr = _as_stack(estimate), _as_stack(lr)
    values = []
    with torch.no_grad():
        for start in range(0, len(estimate), batch_size):
            hr = torch.from_numpy(estimate[start : start + batch_size, None])
            low = torch.from_numpy(lr[start : start + batch_size, None])
            residual = fitted_residual(operator(hr), low)
            values.append(residual.pow(2).mean(dim=(1, 2, 3)).sqrt().numpy())
    return np.concatenate(values)


def physics_metrics(
    truth: np.ndarray,
    estimate: np.ndarray,
    lr: np.ndarray,
    operator: Degradation,
    lr_noise: np.ndarray | None = None,
) -> dict[str, float]:
    """``flux_error`` and ``consistency_rms`` of HR ``estimate`` against ``truth`` and its ``lr``
    input, and ``consistency_chi`` when each LR image's noise RMS ``lr_noise`` is known."""
    rms = consistency_rms_per_image(estimate, lr, operator)
    metrics = {
        "flux_error": float(np.mean(flux_error_per_image(truth, estimate))),
        "consistency_rms": float(np.mean(rms)),
    }
    if lr_noise is not None:
        metrics["consistency_chi"] = float(np.mean(rms / np.maximum(np.asarray(lr_noise), 1e-12)))
    return metrics


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


class ConsistencyLoss(nn.Module):
    """``loss(prediction, target) + weight * MSE(D(prediction), D(target))``: the trial's loss
    plus the disagreement of prediction and target once both are degraded to the LR grid by the
    study's operator ``D`` (the target's degraded image is the LR image without its noise)."""

    def __init__(self, loss: nn.Module, operator: Degradation, weight: float):
        super().__init__()
        self.loss, self.operator, self.weight = loss, operator, float(weight)

    def forward(self, prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        consistency = F.mse_loss(self.operator(prediction), self.operator(target))
        return self.loss(prediction, target) + self.weight * consistency


SR_LOSSES: dict[str, type[nn.Module]] = {
    "l1": nn.L1Loss,
    "mse": nn.MSELoss,
    "charbonnier": CharbonnierLoss,
    "ssim_l1": SSIML1Loss,
}


def sr_loss(
    name: str, consistency_weight: float = 0.0, operator: Degradation | None = None
) -> nn.Module:
    """The training loss by name (one of SR_LOSSES), with the ``consistency`` term of
    ``operator`` when ``consistency_weight`` is positive."""
    if name not in SR_LOSSES:
        raise ValueError(f"unknown SR loss {name!r}; allowed: {', '.join(SR_LOSSES)}")
    loss = SR_LOSSES[name]()
    if consistency_weight > 0:
        if operator is None:
            raise ValueError("a consistency weight needs the study's degradation operator")
        return ConsistencyLoss(loss, operator, consistency_weight)
    return loss
