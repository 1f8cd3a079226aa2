"""The denoising family: DnCNN-style networks mapping a noisy (N, C, H, W) image to a clean one.

A ``kernel_size`` convolution of ``width`` channels and an activation, ``depth`` layers of
convolution-normalisation-activation, and a ``kernel_size`` convolution back to the input's
channels; every convolution keeps the spatial size, so any height and width work. With
``residual`` (DnCNN's residual learning) the layers predict the noise and the output is the
input minus that prediction; without it they predict the clean image directly. DnCNN-S
(Zhang et al. 2017) is 17 layers of 64 channels with batch norm: ``depth`` 15.

``noise_type`` and ``noise_level`` are not architecture: they select the noise the objective
adds to the clean images (see ``lensnas.objectives.denoise.objective``), listed here so that ``[space]``
can search them. They have no family default: without them the ``[objective]`` noise is used.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from lensnas.spaces.family import TRAINING_RULES, Choice, Family, Range
from lensnas.spaces.layers import NORMALIZATIONS, normalization
from lensnas.spaces.sr.layers import SR_ACTIVATIONS, conv, sr_activation

NOISE_TYPES = ("gaussian", "poisson", "uniform", "salt_and_pepper")
MAX_NOISE_LEVEL = 1.0
DENOISE_LOSSES = ("mse", "l1", "charbonnier")
MAX_WIDTH = 512
MAX_DEPTH = 64


class DenoiseNet(nn.Module):
    """DnCNN: conv-act, ``depth`` x [conv-norm-act], conv; output = input - noise if residual."""

    def __init__(self, config: dict[str, Any], in_channels: int = 1):
        super().__init__()
        width, kernel_size = config["width"], config["kernel_size"]
        layers = [conv(in_channels, width, kernel_size), sr_activation(config["activation"], width)]
        for _ in range(config["depth"]):
            layers += [
                conv(width, width, kernel_size),
                normalization(config["normalization"], width),
                sr_activation(config["activation"], width),
            ]
        layers.append(conv(width, in_channels, kernel_size))
        self.layers = nn.Sequential(*layers)
        self.residual = bool(config["residual"])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.residual:
            return x - self.layers(x)
        return self.layers(x)


def build_denoise_net(config: dict[str, Any], in_channels: int = 1) -> DenoiseNet:
    """Build a denoising network from a full configuration (see DENOISE_NET.defaults)."""
    return DenoiseNet(config, in_channels=in_channels)


def example_noisy_images(
    spec: dict[str, Any], batch: int, generator: torch.Generator
) -> tuple[torch.Tensor, dict[int, str], dict[int, str]]:
    """Random [0, 1] images plus Gaussian noise of sigma 0.1 (dynamic batch, height, width)."""
    channels = int(spec.get("in_channels", 1))
    clean = torch.rand(batch, channels, 32, 32, generator=generator)
    x = clean + 0.1 * torch.randn(clean.shape, generator=generator)
    axes = {0: "batch", 2: "height", 3: "width"}
    return x, axes, dict(axes)


def describe_noisy_images(spec: dict[str, Any]) -> str:
    """What an exported denoising network takes and returns, in words."""
    channels = int(spec.get("in_channels", 1))
    return (
        f"input: float32 tensor (N, {channels}, H, W) of noisy images on the [0, 1] scale of "
        f"the clean images (noise may take values outside it); output: (N, {channels}, H, W) "
        "denoised images (not clamped; clamp to [0, 1] for display)."
    )


# DnCNN-S (Zhang et al. 2017): 17 layers of 64 3x3 channels, batch norm, ReLU, residual.
DNCNN = {
    "depth": 15,
    "width": 64,
    "kernel_size": 3,
    "normalization": "batch",
    "activation": "relu",
    "residual": True,
}
# A small DnCNN for CPUs: 6 layers of 16 channels.
DNCNN_SMALL = {**DNCNN, "depth": 4, "width": 16}

DENOISE_NET = Family(
    name="denoise_net",
    version=1,
    build=build_denoise_net,
    rules={
        "depth": Range(0, MAX_DEPTH, integer=True),
        "width": Range(1, MAX_WIDTH, integer=True),
        "kernel_size": Range(1, 15, integer=True),
        "normalization": Choice(NORMALIZATIONS),
        "activation": Choice(SR_ACTIVATIONS),
        "residual": Choice((True, False)),
        "loss": Choice(DENOISE_LOSSES),
        "noise_type": Choice(NOISE_TYPES),
        "noise_level": Range(0.0, MAX_NOISE_LEVEL),
        **TRAINING_RULES,
    },
    defaults={
        **DNCNN_SMALL,
        "loss": "mse",
        "learning_rate": 1e-3,
        "batch_size": 16,
        "epochs": 20,
        "weight_decay": 0.0,
    },
    architecture_keys=tuple(DNCNN),
    example_input=example_noisy_images,
    describe_io=describe_noisy_images,
    presets={"dncnn": DNCNN, "dncnn_small": DNCNN_SMALL},
)
