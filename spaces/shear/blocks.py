"""Building blocks of the shear CNN family beyond its plain conv block.

- :class:`CBAM`: channel then spatial attention (Woo et al. 2018, "CBAM"), as ShearNet uses it.
- :class:`MultiScaleBlock`: three parallel 3x3 convolutions at dilation 1, 3 and 7, ShearNet's
  scales "3, 9, 21" (it dilates a 3x3 kernel by scale // 3; the receptive fields are 3, 7 and
  15 pixels), concatenated, optionally fused by a 1x1 convolution.
- :class:`PsfCNN`: the small PSF network of ForkLens that ShearNet's fork-like model uses as
  its PSF branch: four stride-2 3x3 convolutions (32, 64, 32, 16 channels, zero padding 3, no
  bias), each followed by GroupNorm(8) and ReLU.
- :func:`pooling` / :func:`pooled_size`: the family's downsampling steps.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from lensnas.spaces.layers import activation, normalization

POOLINGS = ("max", "avg", "conv", "conv_act", "none")
MULTISCALE_DILATIONS = (1, 3, 7)
CBAM_REDUCTION = 8
CBAM_SPATIAL_KERNEL = 7
PSF_CHANNELS = (32, 64, 32, 16)
PSF_PADDING = 3


def pooling(name: str, channels: int, config: dict[str, Any]) -> nn.Module:
    """The downsampling step ``name`` (one of POOLINGS) over ``channels`` channels.

    "conv" is a strided 3x3 convolution; "conv_act" adds the block's normalisation and
    activation after it (ShearNet's learnable downsampling).
    """
    if name == "max":
        return nn.MaxPool2d(2)
    if name == "avg":
        return nn.AvgPool2d(2)
    if name == "conv":
        return nn.Conv2d(channels, channels, 3, stride=2, padding=1)
    if name == "conv_act":
        return nn.Sequential(
            nn.Conv2d(channels, channels, 3, stride=2, padding=1),
            normalization(config["normalization"], channels),
            activation(config["activation"]),
        )
    if name == "none":
        return nn.Identity()
    raise ValueError(f"unknown pooling {name!r}; allowed: {', '.join(POOLINGS)}")


def pooled_size(size: int, name: str) -> int:
    """The side of a ``size`` x ``size`` map after the pooling step ``name``."""
    if name in ("max", "avg"):
        return size // 2
    if name in ("conv", "conv_act"):
        return (size + 1) // 2
    return size


class CBAM(nn.Module):
    """Channel attention (shared MLP over average- and max-pooled features) then spatial
    attention (a 7x7 convolution over the channel-average and channel-max maps)."""

    def __init__(self, channels: int, reduction: int = CBAM_REDUCTION):
        super().__init__()
        hidden = max(1, channels // reduction)
        self.mlp = nn.Sequential(
            nn.Linear(channels, hidden), nn.ReLU(), nn.Linear(hidden, channels)
        )
        self.spatial = nn.Conv2d(
            2, 1, CBAM_SPATIAL_KERNEL, padding=CBAM_SPATIAL_KERNEL // 2
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights = torch.sigmoid(self.mlp(x.mean(dim=(2, 3))) + self.mlp(x.amax(dim=(2, 3))))
        x = x * weights[:, :, None, None]
        maps = torch.cat([x.mean(dim=1, keepdim=True), x.amax(dim=1, keepdim=True)], dim=1)
        return x * torch.sigmoid(self.spatial(maps))


def attention(name: str, channels: int) -> nn.Module:
    """The attention module ``name`` ("none" or "cbam") over ``channels`` channels."""
    if name == "cbam":
        return CBAM(channels)
    if name == "none":
        return nn.Identity()
    raise ValueError(f"unknown attention {name!r}; allowed: none, cbam")


class MultiScaleBlock(nn.Module):
    """Parallel 3x3 convolutions at dilations 1, 3, 7 (each conv, norm, activation) of
    ``channels`` channels each, concatenated; then a 1x1 fusion (conv, norm, activation) back to
    ``channels`` ("conv1x1") or none ("concat": 3 * ``channels`` out, as ShearNet); attention;
    an optional residual added before a final activation (projection: 1x1 conv + norm); pooling.
    """

    def __init__(self, in_channels: int, channels: int, config: dict[str, Any]):
        super().__init__()
        norm, act = config["normalization"], config["activation"]
        self.branches = nn.ModuleList(
            nn.Sequential(
                nn.Conv2d(in_channels, channels, 3, padding="same", dilation=dilation),
                normalization(norm, channels),
                activation(act),
            )
            for dilation in MULTISCALE_DILATIONS
        )
        concatenated = channels * len(MULTISCALE_DILATIONS)
        if config["multiscale_fusion"] == "conv1x1":
            self.out_channels = channels
            self.fusion = nn.Sequential(
                nn.Conv2d(concatenated, channels, 1), normalization(norm, channels), activation(act)
            )
        else:
            self.out_channels = concatenated
            self.fusion = nn.Identity()
        self.attention = attention(config["attention"], self.out_channels)
        self.skip = None
        if config["residual"]:
            if in_channels == self.out_channels:
                self.skip = nn.Identity()
            else:
                self.skip = nn.Sequential(
                    nn.Conv2d(in_channels, self.out_channels, 1),
                    normalization(norm, self.out_channels),
                )
        self.act = activation(act)
        self.pool = pooling(config["pooling"], self.out_channels, config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.cat([branch(x) for branch in self.branches], dim=1)
        y = self.attention(self.fusion(y))
        if self.skip is not None:
            y = self.act(y + self.skip(x))
        return self.pool(y)


class PsfCNN(nn.Module):
    """ForkLens's PSF network without its head: (N, 1, S, S) PSF images to a feature map."""

    def __init__(self, in_channels: int = 1):
        super().__init__()
        layers: list[nn.Module] = []
        for channels in PSF_CHANNELS:
            layers += [
                nn.Conv2d(in_channels, channels, 3, stride=2, padding=PSF_PADDING, bias=False),
                normalization("group", channels),
                nn.ReLU(),
            ]
            in_channels = channels
        self.layers = nn.Sequential(*layers)
        self.out_channels = in_channels

    @staticmethod
    def output_size(size: int) -> int:
        """The side of the feature map for a ``size`` x ``size`` PSF image."""
        for _ in PSF_CHANNELS:
            size = (size + 2 * PSF_PADDING - 3) // 2 + 1
        return size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)
