"""The super-resolution family: networks mapping a (N, 1, H, W) image to (N, 1, sH, sW).

Three backbones share one set of keys:

- ``resnet`` (SRResNet / EDSR): a ``kernel_size`` head convolution, ``depth`` residual
  blocks (conv-norm-act-conv-norm, optional channel attention), a body convolution with a
  long skip over the blocks, an upsampler, and a ``kernel_size`` reconstruction convolution.
- ``srcnn``: bicubic upsampling first, then a ``kernel_size`` convolution of ``width``
  channels, ``depth`` 1x1 mapping layers of ``width // 2`` channels, and a 5x5
  reconstruction (SRCNN 9-1-5 is kernel_size 9, depth 1, width 64). ``upsampler`` is unused.
- ``fsrcnn``: a ``kernel_size`` feature extraction of ``width`` channels, a 1x1 shrink to
  ``shrink_width``, ``depth`` 3x3 mapping layers, a 1x1 expansion and a 9x9 upsampler
  straight to the output (FSRCNN(56, 12, 4) is kernel_size 5, width 56, shrink_width 12, depth 4).

The body's 3x3 convolutions (resnet blocks, fsrcnn mapping) use ``dilation``. Upsamplers:
``pixel_shuffle`` (conv to s^2 times the channels, then sub-pixel shuffle), ``transposed``
(a transposed convolution of stride s) and ``interpolate`` (nearest-neighbour resize, then
a convolution). With ``global_skip`` the network predicts a correction to the bicubic
upsampling of its input. Outputs are not clamped; metrics clamp to [0, 1].
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lensnas.spaces.family import Choice, Family, Range
from lensnas.spaces.layers import ACTIVATIONS, NORMALIZATIONS, activation, normalization
from lensnas.spaces.shear_cnn import TRAINING_RULES

BACKBONES = ("resnet", "srcnn", "fsrcnn")
UPSAMPLERS = ("pixel_shuffle", "transposed", "interpolate")
SR_ACTIVATIONS = (*ACTIVATIONS, "prelu")
SR_LOSS_NAMES = ("l1", "mse", "charbonnier", "ssim_l1")
MAX_WIDTH = 512
ATTENTION_REDUCTION = 16
SRCNN_RECONSTRUCTION_KERNEL = 5
FSRCNN_UPSAMPLER_KERNEL = 9


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
    """conv-norm-act-conv-norm (+ channel attention), added to the block's input."""

    def __init__(self, channels: int, config: dict[str, Any]):
        super().__init__()
        layers = [
            conv(channels, channels, 3, config["dilation"]),
            normalization(config["normalization"], channels),
            sr_activation(config["activation"], channels),
            conv(channels, channels, 3, config["dilation"]),
            normalization(config["normalization"], channels),
        ]
        if config["attention"]:
            layers.append(ChannelAttention(channels))
        self.body = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class ResNetBody(nn.Module):
    """SRResNet / EDSR: head, residual blocks with a long skip, upsampler, reconstruction."""

    def __init__(self, config: dict[str, Any], in_channels: int, scale: int):
        super().__init__()
        width, kernel_size = config["width"], config["kernel_size"]
        self.head = nn.Sequential(
            conv(in_channels, width, kernel_size), sr_activation(config["activation"], width)
        )
        self.blocks = nn.Sequential(
            *[ResidualBlock(width, config) for _ in range(config["depth"])],
            conv(width, width, 3),
            normalization(config["normalization"], width),
        )
        self.tail = nn.Sequential(
            upsampler(config["upsampler"], width, width, scale, 3),
            sr_activation(config["activation"], width),
            conv(width, in_channels, kernel_size),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.head(x)
        return self.tail(features + self.blocks(features))


def mapping_layer(
    in_channels: int, out_channels: int, kernel_size: int, config: dict[str, Any]
) -> nn.Module:
    """conv-norm-act (+ channel attention): one mapping layer of SRCNN / FSRCNN."""
    layers = [
        conv(in_channels, out_channels, kernel_size, config["dilation"] if kernel_size > 1 else 1),
        normalization(config["normalization"], out_channels),
        sr_activation(config["activation"], out_channels),
    ]
    if config["attention"]:
        layers.append(ChannelAttention(out_channels))
    return nn.Sequential(*layers)


class SRCNNBody(nn.Module):
    """SRCNN on the bicubic upsampling: extraction, 1x1 mapping layers, 5x5 reconstruction."""

    def __init__(self, config: dict[str, Any], in_channels: int, scale: int):
        super().__init__()
        self.scale = scale
        width, mapped = config["width"], max(1, config["width"] // 2)
        layers = [
            conv(in_channels, width, config["kernel_size"]),
            sr_activation(config["activation"], width),
        ]
        channels = width
        for _ in range(config["depth"]):
            layers.append(mapping_layer(channels, mapped, 1, config))
            channels = mapped
        layers.append(conv(channels, in_channels, SRCNN_RECONSTRUCTION_KERNEL))
        self.layers = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(bicubic(x, self.scale))


class FSRCNNBody(nn.Module):
    """FSRCNN: extraction, shrink, 3x3 mapping layers, expand, 9x9 upsampling to the output."""

    def __init__(self, config: dict[str, Any], in_channels: int, scale: int):
        super().__init__()
        width, shrink = config["width"], config["shrink_width"]
        layers = [
            conv(in_channels, width, config["kernel_size"]),
            sr_activation(config["activation"], width),
            mapping_layer(width, shrink, 1, config),
        ]
        layers += [mapping_layer(shrink, shrink, 3, config) for _ in range(config["depth"])]
        layers += [
            conv(shrink, width, 1),
            sr_activation(config["activation"], width),
            upsampler(config["upsampler"], width, in_channels, scale, FSRCNN_UPSAMPLER_KERNEL),
        ]
        self.layers = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


BODIES = {"resnet": ResNetBody, "srcnn": SRCNNBody, "fsrcnn": FSRCNNBody}


class SRNet(nn.Module):
    """A super-resolution network: a backbone, plus the bicubic upsampling when ``global_skip``."""

    def __init__(self, config: dict[str, Any], in_channels: int = 1, scale: int = 2):
        super().__init__()
        if config["backbone"] not in BODIES:
            raise ValueError(
                f"unknown backbone {config['backbone']!r}; allowed: {', '.join(BACKBONES)}"
            )
        self.scale = scale
        self.global_skip = bool(config["global_skip"])
        self.body = BODIES[config["backbone"]](config, in_channels, scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        output = self.body(x)
        if self.global_skip:
            output = output + bicubic(x, self.scale)
        return output


def build_sr_net(config: dict[str, Any], in_channels: int = 1, scale: int = 2) -> SRNet:
    """Build an SR network from a full configuration (see SR_NET.defaults)."""
    return SRNet(config, in_channels=in_channels, scale=scale)


def example_images(
    spec: dict[str, Any], batch: int, generator: torch.Generator
) -> tuple[torch.Tensor, dict[int, str], dict[int, str]]:
    """Random [0, 1] low-resolution images (any height and width work: dynamic axes)."""
    x = torch.rand(batch, int(spec.get("in_channels", 1)), 32, 32, generator=generator)
    return (
        x,
        {0: "batch", 2: "height", 3: "width"},
        {0: "batch", 2: "out_height", 3: "out_width"},
    )


def describe_images(spec: dict[str, Any]) -> str:
    """What an exported SR network takes and returns, in words."""
    channels, scale = int(spec.get("in_channels", 1)), spec.get("scale", 2)
    return (
        f"input: float32 tensor (N, {channels}, H, W) of low-resolution images normalised to "
        f"[0, 1]; output: (N, {channels}, {scale}H, {scale}W) super-resolved images."
    )


SR_NET = Family(
    name="sr_net",
    version=1,
    build=build_sr_net,
    rules={
        "backbone": Choice(BACKBONES),
        "kernel_size": Range(1, 15, integer=True),
        "depth": Range(0, 64, integer=True),
        "width": Range(1, MAX_WIDTH, integer=True),
        "shrink_width": Range(1, MAX_WIDTH, integer=True),
        "dilation": Range(1, 8, integer=True),
        "attention": Choice((True, False)),
        "normalization": Choice(NORMALIZATIONS),
        "activation": Choice(SR_ACTIVATIONS),
        "upsampler": Choice(UPSAMPLERS),
        "global_skip": Choice((True, False)),
        "loss": Choice(SR_LOSS_NAMES),
        **TRAINING_RULES,
    },
    defaults={
        "backbone": "resnet",
        "kernel_size": 3,
        "depth": 4,
        "width": 32,
        "shrink_width": 12,
        "dilation": 1,
        "attention": False,
        "normalization": "none",
        "activation": "relu",
        "upsampler": "pixel_shuffle",
        "global_skip": True,
        "loss": "l1",
        "learning_rate": 1e-3,
        "batch_size": 16,
        "epochs": 20,
        "weight_decay": 0.0,
    },
    architecture_keys=(
        "backbone",
        "kernel_size",
        "depth",
        "width",
        "shrink_width",
        "dilation",
        "attention",
        "normalization",
        "activation",
        "upsampler",
        "global_skip",
    ),
    example_input=example_images,
    describe_io=describe_images,
    presets={
        # DeepLense SR tests' ResNet SISR: SRResNet-style, 10 residual blocks with batch norm,
        # 9x9 head and reconstruction, PReLU, one pixel-shuffle x2 stage.
        "resnet_sisr": {
            "backbone": "resnet",
            "kernel_size": 9,
            "depth": 10,
            "width": 64,
            "dilation": 1,
            "attention": False,
            "normalization": "batch",
            "activation": "prelu",
            "upsampler": "pixel_shuffle",
            "global_skip": False,
        },
        # EDSR baseline (Lim et al. 2017): 16 blocks of 64 channels, no batch norm, 3x3 convs.
        "edsr_baseline": {
            "backbone": "resnet",
            "kernel_size": 3,
            "depth": 16,
            "width": 64,
            "dilation": 1,
            "attention": False,
            "normalization": "none",
            "activation": "relu",
            "upsampler": "pixel_shuffle",
            "global_skip": False,
        },
        # SRCNN 9-1-5 (Dong et al. 2014) on the bicubic upsampling: 64 and 32 channels.
        "srcnn": {
            "backbone": "srcnn",
            "kernel_size": 9,
            "depth": 1,
            "width": 64,
            "attention": False,
            "normalization": "none",
            "activation": "relu",
            "global_skip": False,
        },
        # FSRCNN(d=56, s=12, m=4) (Dong et al. 2016): 5x5 extraction, PReLU, 9x9 deconvolution.
        "fsrcnn": {
            "backbone": "fsrcnn",
            "kernel_size": 5,
            "depth": 4,
            "width": 56,
            "shrink_width": 12,
            "dilation": 1,
            "attention": False,
            "normalization": "none",
            "activation": "prelu",
            "upsampler": "transposed",
            "global_skip": False,
        },
    },
)
