"""The networks SRGAN training uses besides its generator (none of them is exported).

- ``srgan`` discriminator (Ledig et al. 2017's classifier): ``discriminator_depth`` convolutions
  of ``discriminator_kernel_size``, the 2nd, 4th, ... of stride 2, channels from
  ``discriminator_width`` doubling every second layer (at most 512), batch norm after all but
  the first (``discriminator_batch_norm``), LeakyReLU(0.2); then a global average pool and two
  1x1 convolutions (SRGAN's dense 1024 and 1, size-free) to one logit per image. SRGAN: depth 8,
  width 64, kernel 3.
- ``patchgan`` discriminator (pix2pix, Isola et al. 2017): ``discriminator_depth`` stride-2
  convolutions (channels width, 2 width, ... at most 8 width), one stride-1 convolution and a
  stride-1 convolution to one logit per patch. pix2pix's 70x70 PatchGAN: depth 3, width 64,
  kernel 4.
- :class:`FeatureNet`, the network of the feature (perceptual) loss: no ImageNet weights exist
  offline, so a small denoising autoencoder is trained in the trial on the study's own HR
  training images (Gaussian noise of sigma 0.1 in, the clean image out); the feature loss
  compares its encoder's features (two scales deep, half resolution) of SR and HR images.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from lensnas.spaces.sr.layers import conv

DISCRIMINATORS = ("srgan", "patchgan")
MAX_DISCRIMINATOR_WIDTH = 512
PATCHGAN_WIDTH_FACTOR = 8  # PatchGAN's channels stop doubling at 8x the first layer's
LEAKY_SLOPE = 0.2
FEATURE_WIDTH = 16  # channels of the feature network's first layer (twice that after it)
FEATURE_NOISE_SIGMA = 0.1  # noise the feature network learns to remove, on [0, 1] images


def _conv_layer(
    in_channels: int, out_channels: int, kernel_size: int, stride: int, batch_norm: bool
) -> list[nn.Module]:
    layers: list[nn.Module] = [
        nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride, padding=kernel_size // 2)
    ]
    if batch_norm:
        layers.append(nn.BatchNorm2d(out_channels))
    layers.append(nn.LeakyReLU(LEAKY_SLOPE))
    return layers


def srgan_discriminator(config: dict[str, Any], in_channels: int) -> nn.Sequential:
    """SRGAN's classifier, one logit per image: (N, C, H, W) -> (N, 1)."""
    width, kernel_size = config["discriminator_width"], config["discriminator_kernel_size"]
    layers: list[nn.Module] = []
    channels = in_channels
    for i in range(config["discriminator_depth"]):
        out = min(width * 2 ** (i // 2), MAX_DISCRIMINATOR_WIDTH)
        batch_norm = config["discriminator_batch_norm"] and i > 0
        layers += _conv_layer(channels, out, kernel_size, 1 + i % 2, batch_norm)
        channels = out
    layers += [
        nn.AdaptiveAvgPool2d(1),
        nn.Conv2d(channels, 2 * channels, 1),
        nn.LeakyReLU(LEAKY_SLOPE),
        nn.Conv2d(2 * channels, 1, 1),
        nn.Flatten(),
    ]
    return nn.Sequential(*layers)


def patchgan_discriminator(config: dict[str, Any], in_channels: int) -> nn.Sequential:
    """pix2pix's PatchGAN, one logit per overlapping patch: (N, C, H, W) -> (N, 1, h, w)."""
    width, kernel_size = config["discriminator_width"], config["discriminator_kernel_size"]
    batch_norm, depth = config["discriminator_batch_norm"], config["discriminator_depth"]
    layers: list[nn.Module] = []
    channels = in_channels
    for i in range(depth + 1):
        out = width * min(2**i, PATCHGAN_WIDTH_FACTOR)
        stride = 2 if i < depth else 1
        layers += _conv_layer(channels, out, kernel_size, stride, batch_norm and i > 0)
        channels = out
    layers.append(nn.Conv2d(channels, 1, kernel_size, padding=kernel_size // 2))
    return nn.Sequential(*layers)


def build_discriminator(config: dict[str, Any], in_channels: int = 1) -> nn.Module:
    """The discriminator named by ``config["discriminator"]``; its output is logits."""
    if config["discriminator"] == "srgan":
        return srgan_discriminator(config, in_channels)
    if config["discriminator"] == "patchgan":
        return patchgan_discriminator(config, in_channels)
    raise ValueError(
        f"unknown discriminator {config['discriminator']!r}; allowed: {', '.join(DISCRIMINATORS)}"
    )


class FeatureNet(nn.Module):
    """A denoising autoencoder; ``features(x)`` is its encoder (the perceptual loss's features)."""

    def __init__(self, in_channels: int = 1, width: int = FEATURE_WIDTH):
        super().__init__()
        self.encoder = nn.Sequential(
            conv(in_channels, width, 3),
            nn.LeakyReLU(LEAKY_SLOPE),
            nn.Conv2d(width, 2 * width, 3, stride=2, padding=1),
            nn.LeakyReLU(LEAKY_SLOPE),
            conv(2 * width, 2 * width, 3),
            nn.LeakyReLU(LEAKY_SLOPE),
        )
        self.decoder = nn.Sequential(
            nn.Upsample(scale_factor=2, mode="nearest"),
            conv(2 * width, width, 3),
            nn.LeakyReLU(LEAKY_SLOPE),
            conv(width, in_channels, 3),
        )

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.encoder(x))[..., : x.shape[-2], : x.shape[-1]]
