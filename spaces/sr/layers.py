"""Building blocks of the super-resolution networks: convolutions, upsamplers, channel
attention, the residual block, and activations by name (``prelu`` included)."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lensnas.spaces.layers import ACTIVATIONS, activation, normalization

UPSAMPLERS = ("pixel_shuffle", "transposed", "interpolate")
SR_ACTIVATIONS = (*ACTIVATIONS, "prelu")
ATTENTION_REDUCTION = 16


def sr_activation(name: str, channels: int) -> nn.Module:
    """An activation by name; ``prelu`` has one learned slope per channel (SRResNet, FSRCNN)."""
    if name == "prelu":
        return nn.PReLU(channels)
    return activation(name)


def conv(in_channels: int, out_channels: int, kernel_size: int, dilation: int = 1) -> nn.Conv2d:
    """A stride-1 convolution keeping the spatial size."""
    return nn.Conv2d(in_channels, out_channels, kernel_size, padding="same", dilation=dilation)


def transposed_conv(in_channels: int, out_channels: int, kernel_size: int, scale: int) -> nn.Module:
    """A transposed convolution of stride ``scale`` mapping H to exactly ``scale * H``."""
    padding = math.ceil((kernel_size - scale) / 2)
    output_padding = scale - kernel_size + 2 * padding
    return nn.ConvTranspose2d(
        in_channels,
        out_channels,
        kernel_size,
        stride=scale,
        padding=padding,
        output_padding=output_padding,
    )


def upsampler(
    kind: str, in_channels: int, out_channels: int, scale: int, kernel_size: int
) -> nn.Module:
    """Upsample features by ``scale``: pixel_shuffle, transposed or interpolate (+conv)."""
    if kind == "pixel_shuffle":
        return nn.Sequential(
            conv(in_channels, out_channels * scale * scale, kernel_size), nn.PixelShuffle(scale)
        )
    if kind == "transposed":
        return transposed_conv(in_channels, out_channels, max(kernel_size, 2 * scale), scale)
    if kind == "interpolate":
        return nn.Sequential(
            nn.Upsample(scale_factor=scale, mode="nearest"),
            conv(in_channels, out_channels, kernel_size),
        )
    raise ValueError(f"unknown upsampler {kind!r}; allowed: {', '.join(UPSAMPLERS)}")


def reconstruction(config: dict[str, Any], width: int, out_channels: int, scale: int) -> nn.Sequential:
    """The SRResNet/EDSR tail: upsample ``width`` features by ``scale``, the activation, then a
    ``kernel_size`` convolution to the image's channels."""
    return nn.Sequential(
        upsampler(config["upsampler"], width, width, scale, 3),
        sr_activation(config["activation"], width),
        conv(width, out_channels, config["kernel_size"]),
    )


def bicubic(x: torch.Tensor, scale: int) -> torch.Tensor:
    """Bicubic upsampling (align_corners=False), not clamped."""
    return F.interpolate(x, scale_factor=scale, mode="bicubic", align_corners=False)


class ChannelAttention(nn.Module):
    """Squeeze-and-excitation channel attention (RCAN): rescale channels by a learned gate."""

    def __init__(self, channels: int, reduction: int = ATTENTION_REDUCTION):
        super().__init__()
        hidden = max(1, channels // reduction)
        self.gate = nn.Sequential(
            nn.AdaptiveAvgPool2d(1),
            nn.Conv2d(channels, hidden, 1),
            nn.ReLU(),
            nn.Conv2d(hidden, channels, 1),
            nn.Sigmoid(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gate(x)


class ResidualBlock(nn.Module):
    """conv-norm-act-conv-norm (+ channel attention), added to the block's input.

    With ``attention`` and no normalisation this is RCAN's residual channel-attention block.
    """

    def __init__(
        self, channels: int, config: dict[str, Any], reduction: int = ATTENTION_REDUCTION
    ):
        super().__init__()
        layers = [
            conv(channels, channels, 3, config["dilation"]),
            normalization(config["normalization"], channels),
            sr_activation(config["activation"], channels),
            conv(channels, channels, 3, config["dilation"]),
            normalization(config["normalization"], channels),
        ]
        if config["attention"]:
            layers.append(ChannelAttention(channels, reduction))
        self.body = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)
