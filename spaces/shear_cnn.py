"""The shear CNN family: conv blocks (+ optional residual, norm, pooling) and a regression head.

Block ``i`` has ``width * 2**i`` channels (capped at ``max_width``); each block is a
"same"-padded convolution with the given kernel size and dilation, a normalisation, an
activation, an optional residual connection (1x1 projection when channels change) and a
pooling step (max / avg 2x2, a strided 3x3 conv, or none). The head is a global average
pool or flatten + dense, ending in 2 outputs (g1, g2).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from lensnas.spaces.family import Choice, Family, Range
from lensnas.spaces.layers import ACTIVATIONS, NORMALIZATIONS, activation, normalization

POOLINGS = ("max", "avg", "conv", "none")
HEADS = ("gap", "dense")
MAX_WIDTH = 512
MAX_DENSE_WEIGHTS = 200_000_000


class ConvBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, config: dict[str, Any]):
        super().__init__()
        self.conv = nn.Conv2d(
            in_channels, out_channels, config["kernel_size"], padding="same", dilation=config["dilation"]
        )
        self.norm = normalization(config["normalization"], out_channels)
        self.act = activation(config["activation"])
        self.skip = None
        if config["residual"]:
            self.skip = nn.Identity() if in_channels == out_channels else nn.Conv2d(in_channels, out_channels, 1)
        pooling = config["pooling"]
        if pooling == "max":
            self.pool = nn.MaxPool2d(2)
        elif pooling == "avg":
            self.pool = nn.AvgPool2d(2)
        elif pooling == "conv":
            self.pool = nn.Conv2d(out_channels, out_channels, 3, stride=2, padding=1)
        else:
            self.pool = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.act(self.norm(self.conv(x)))
        if self.skip is not None:
            y = y + self.skip(x)
        return self.pool(y)


class ShearCNN(nn.Module):
    """A CNN mapping (N, C, H, W) stamps to (N, 2) shear estimates."""

    def __init__(
        self,
        config: dict[str, Any],
        in_channels: int = 1,
        image_size: int = 53,
        outputs: int = 2,
        input_scale: float = 1.0,
        output_scale: float = 1.0,
    ):
        super().__init__()
        # Pixel values of unit-flux stamps are ~1e-3 and shears ~0.1: scaling both to O(1)
        # inside the network keeps default initialisations and losses well conditioned.
        self.register_buffer("input_scale", torch.tensor(float(input_scale)))
        self.register_buffer("output_scale", torch.tensor(float(output_scale)))
        blocks, channels, size = [], in_channels, image_size
        for i in range(config["depth"]):
            out_channels = min(config["width"] * 2**i, MAX_WIDTH)
            if size < 2 and config["pooling"] != "none":
                # Pooling a 1x1 map is impossible: later blocks keep the size.
                config = {**config, "pooling": "none"}
            blocks.append(ConvBlock(channels, out_channels, config))
            channels = out_channels
            if config["pooling"] in ("max", "avg"):
                size = size // 2
            elif config["pooling"] == "conv":
                size = (size + 1) // 2
        self.features = nn.Sequential(*blocks)
        if config["head"] == "gap":
            self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, outputs))
        else:
            dense_weights = channels * size * size * config["dense_units"]
            if dense_weights > MAX_DENSE_WEIGHTS:
                raise ValueError(
                    f"dense head of {dense_weights:,} weights exceeds {MAX_DENSE_WEIGHTS:,}: "
                    "pool more, use fewer channels or head = 'gap'"
                )
            self.head = nn.Sequential(
                nn.Flatten(),
                nn.Linear(channels * size * size, config["dense_units"]),
                activation(config["activation"]),
                nn.Linear(config["dense_units"], outputs),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x * self.input_scale)) * self.output_scale


def build_shear_cnn(
    config: dict[str, Any],
    in_channels: int = 1,
    image_size: int = 53,
    input_scale: float = 1.0,
    output_scale: float = 1.0,
) -> ShearCNN:
    """Build a shear CNN from a full configuration (see SHEAR_CNN.defaults)."""
    return ShearCNN(config, in_channels, image_size, 2, input_scale, output_scale)


def example_stamps(
    spec: dict[str, Any], batch: int, generator: torch.Generator
) -> tuple[torch.Tensor, dict[int, str], dict[int, str]]:
    """Random stamps of the exported network's shape, at about the pixel noise of its data."""
    channels, size = int(spec.get("in_channels", 1)), int(spec["image_size"])
    scale = 1.0 / float(spec.get("input_scale", 1.0))
    x = torch.randn(batch, channels, size, size, generator=generator) * scale
    return x, {0: "batch"}, {0: "batch"}


def describe_stamps(spec: dict[str, Any]) -> str:
    """What an exported shear CNN takes and returns, in words."""
    channels, size = int(spec.get("in_channels", 1)), spec["image_size"]
    extra = " (channel 2: the PSF image)" if channels == 2 else ""
    return (
        f"input: float32 tensor (N, {channels}, {size}, {size}) of galaxy stamps in the "
        "training simulation's units: each galaxy's total flux near 1 (the study's flux_min.."
        "flux_max), pixel noise sigma as in the study, at its pixel_scale (arcsec/pixel) and "
        f"PSF (see the data configuration){extra}; the network rescales inputs itself, but "
        "stamps far from that flux or noise give meaningless shears. "
        "output: (N, 2) = (g1, g2), reduced shear."
    )


TRAINING_RULES = {
    "learning_rate": Range(1e-7, 1.0),
    "batch_size": Range(1, 65536, integer=True),
    "epochs": Range(1, 10000, integer=True),
    "weight_decay": Range(0.0, 1.0),
}

# ShearNet's small CNN: conv 16 3x3 + avg-pool 2, conv 32 3x3 + avg-pool 2, dense 128, 2 outputs.
SHEARNET_CNN = {
    "kernel_size": 3,
    "dilation": 1,
    "pooling": "avg",
    "depth": 2,
    "width": 16,
    "residual": False,
    "normalization": "none",
    "activation": "relu",
    "head": "dense",
    "dense_units": 128,
}

SHEAR_CNN = Family(
    name="shear_cnn",
    version=1,
    build=build_shear_cnn,
    rules={
        "kernel_size": Range(1, 15, integer=True),
        "dilation": Range(1, 8, integer=True),
        "pooling": Choice(POOLINGS),
        "depth": Range(1, 12, integer=True),
        "width": Range(1, MAX_WIDTH, integer=True),
        "residual": Choice((True, False)),
        "normalization": Choice(NORMALIZATIONS),
        "activation": Choice(tuple(ACTIVATIONS)),
        "head": Choice(HEADS),
        "dense_units": Range(1, 4096, integer=True),
        "loss": Choice(("mse", "l1", "huber")),
        **TRAINING_RULES,
    },
    # The defaults are ShearNet's network, so a space that fixes nothing searches around it.
    defaults={
        **SHEARNET_CNN,
        "loss": "mse",
        "learning_rate": 1e-3,
        "batch_size": 64,
        "epochs": 10,
        "weight_decay": 0.0,
    },
    architecture_keys=tuple(SHEARNET_CNN),
    example_input=example_stamps,
    describe_io=describe_stamps,
    presets={"shearnet_cnn": SHEARNET_CNN},
)
