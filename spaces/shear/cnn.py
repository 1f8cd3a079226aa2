"""The shear CNN family: conv blocks (+ optional residual, norm, attention, pooling) and a
regression head.

An optional stem (``stem_width`` > 0: a 3x3 conv, norm, activation) comes first. Block ``i``
has ``width * 2**i`` channels (capped at ``MAX_WIDTH``). A "plain" block is a "same"-padded
convolution with the given kernel size and dilation, a normalisation, an activation, optional
attention, an optional residual connection (1x1 projection when channels change) and a
pooling step (max / avg 2x2, a strided 3x3 conv with or without norm + activation, or none;
``pool_last = false`` leaves the last block unpooled). A "multiscale" block (see
shear_blocks.py) runs 3x3 convolutions at dilations 1, 3, 7 in parallel (kernel_size and
dilation do not apply to it). ``attention = "cbam"`` puts CBAM in every block, before the
residual addition (as the CBAM paper and ShearNet do). With ``psf_branch`` the input's
channel 2 (the PSF image) goes through ForkLens's small PSF CNN and its features join the
galaxy features before the head. The head is a global average pool or flatten + dense
(optionally GroupNorm on its hidden units), ending in 2 outputs (g1, g2); ``dropout`` > 0 puts a
dropout layer before its last linear layer (active in training, and in MC dropout exports).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from lensnas.spaces.d4 import D4Symmetrized
from lensnas.spaces.family import TRAINING_RULES, Choice, Family, Range
from lensnas.spaces.layers import ACTIVATIONS, NORMALIZATIONS, activation, normalization
from lensnas.spaces.shear.blocks import (
    POOLINGS,
    MultiScaleBlock,
    PsfCNN,
    attention,
    pooled_size,
    pooling,
)

HEADS = ("gap", "dense")
BLOCKS = ("plain", "multiscale")
ATTENTIONS = ("none", "cbam")
MULTISCALE_FUSIONS = ("conv1x1", "concat")
MAX_WIDTH = 512
MAX_DENSE_WEIGHTS = 200_000_000


class ConvBlock(nn.Module):
    """One plain block: conv, norm, activation, attention, optional residual, pooling."""

    def __init__(self, in_channels: int, out_channels: int, config: dict[str, Any]):
        super().__init__()
        self.conv = nn.Conv2d(
            in_channels,
            out_channels,
            config["kernel_size"],
            padding="same",
            dilation=config["dilation"],
        )
        self.norm = normalization(config["normalization"], out_channels)
        self.act = activation(config["activation"])
        self.attention = attention(config["attention"], out_channels)
        self.skip = None
        if config["residual"]:
            same = in_channels == out_channels
            self.skip = nn.Identity() if same else nn.Conv2d(in_channels, out_channels, 1)
        self.pool = pooling(config["pooling"], out_channels, config)
        self.out_channels = out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.attention(self.act(self.norm(self.conv(x))))
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
        if config["psf_branch"] and in_channels != 2:
            raise ValueError(
                "psf_branch = true needs the PSF image as a second input channel (the shear "
                f"objective's psf_channel = true); this network has {in_channels} input channel(s)"
            )
        # With a PSF branch the galaxy network sees channel 1 only, the PSF branch channel 2.
        channels = 1 if config["psf_branch"] else in_channels
        size = image_size
        self.stem = nn.Identity()
        if config["stem_width"] > 0:
            self.stem = nn.Sequential(
                nn.Conv2d(channels, config["stem_width"], 3, padding="same"),
                normalization(config["normalization"], config["stem_width"]),
                activation(config["activation"]),
            )
            channels = config["stem_width"]
        blocks = []
        for i in range(config["depth"]):
            width = min(config["width"] * 2**i, MAX_WIDTH)
            pool = config["pooling"]
            if size < 2 or (i == config["depth"] - 1 and not config["pool_last"]):
                pool = "none"  # pooling a 1x1 map is impossible: later blocks keep the size
            block_config = {**config, "pooling": pool}
            if config["block"] == "multiscale":
                block = MultiScaleBlock(channels, width, block_config)
            else:
                block = ConvBlock(channels, width, block_config)
            blocks.append(block)
            channels, size = block.out_channels, pooled_size(size, pool)
        self.features = nn.Sequential(*blocks)
        gap = config["head"] == "gap"
        features = channels if gap else channels * size * size
        self.psf_features = None
        if config["psf_branch"]:
            self.psf_features = PsfCNN()
            psf_size = PsfCNN.output_size(image_size)
            psf_channels = self.psf_features.out_channels
            features += psf_channels if gap else psf_channels * psf_size * psf_size
        # The head's first `reduced` layers turn a feature map into a vector (no weights): the
        # galaxy and PSF maps are reduced apart, concatenated, then go through the rest.
        # Dropout (training only, and MC dropout exports) acts before the last linear layer.
        dropout = [nn.Dropout(config["dropout"])] if config.get("dropout", 0.0) > 0 else []
        self.hidden = None
        if gap:
            self.reduced = 2
            self.head = nn.Sequential(
                nn.AdaptiveAvgPool2d(1), nn.Flatten(), *dropout, nn.Linear(features, outputs)
            )
        else:
            units = config["dense_units"]
            dense_weights = features * units
            if dense_weights > MAX_DENSE_WEIGHTS:
                raise ValueError(
                    f"dense head of {dense_weights:,} weights exceeds {MAX_DENSE_WEIGHTS:,}: "
                    "pool more, use fewer channels or head = 'gap'"
                )
            hidden_norm = [normalization("group", units)] if config["head_norm"] else []
            self.reduced = 1
            self.head = nn.Sequential(
                nn.Flatten(),
                nn.Linear(features, units),
                *hidden_norm,
                activation(config["activation"]),
                *dropout,
                nn.Linear(units, outputs),
            )
            self.hidden = len(self.head) - 2 - len(dropout)  # the activation of the hidden units

    def blocks(self) -> list[tuple[str, nn.Module]]:
        """The stages of the galaxy path in order, named: the stem (if any), each block, and a
        dense head's hidden units (after their activation); what the inspector looks at."""
        stages = [] if isinstance(self.stem, nn.Identity) else [("stem", self.stem)]
        stages += [(f"block {i + 1}", block) for i, block in enumerate(self.features)]
        if self.hidden is not None:
            stages.append(("dense hidden", self.head[self.hidden]))
        return stages

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x * self.input_scale
        galaxy = x if self.psf_features is None else x[:, :1]
        features = self.head[: self.reduced](self.features(self.stem(galaxy)))
        if self.psf_features is not None:
            psf = self.head[: self.reduced](self.psf_features(x[:, 1:]))
            features = torch.cat([features, psf], dim=1)
        return self.head[self.reduced :](features) * self.output_scale


def build_shear_cnn(
    config: dict[str, Any],
    in_channels: int = 1,
    image_size: int = 53,
    input_scale: float = 1.0,
    output_scale: float = 1.0,
) -> nn.Module:
    """Build a shear CNN from a full configuration (see SHEAR_CNN.defaults); with
    ``symmetrize`` it is averaged over the D4 group in evaluation."""
    network = ShearCNN(config, in_channels, image_size, 2, input_scale, output_scale)
    return D4Symmetrized(network) if config.get("symmetrize", False) else network


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
    described = spec.get("input", {})
    extra = (" (channel 2: each stamp's PSF image on the same grid, unit sum: `lensnas predict "
             "... --psf`)") if channels == 2 else ""
    output = "(N, 2) = (g1, g2), reduced shear."
    if described.get("labels") == "sheared_ellipticity":
        output = ("(N, 2) = (g1, g2), each galaxy's sheared ellipticity (its intrinsic shape "
                  "composed with the shear, ShearNet's convention): averaged over a population, "
                  "its reduced shear.")
    if described.get("calibration") == "metacal":
        output += (" The study scored it calibrated by its response to metacal's sheared images: "
                   "apply it that way with `lensnas predict FOLDER stamps --psf psf.fits "
                   "--calibrate metacal`.")
    return (
        f"input: float32 tensor (N, {channels}, {size}, {size}) of galaxy stamps in the "
        "training simulation's units: each galaxy's total flux near 1 (the study's flux_min.."
        "flux_max), pixel noise sigma as in the study, at its pixel_scale (arcsec/pixel) and "
        f"PSF (see the data configuration){extra}; the network rescales inputs itself, but "
        f"stamps far from that flux or noise give meaningless shears. output: {output}"
    )


FLUX_TOLERANCE = 2.0  # a stamp's total flux may be this factor outside the training range


def check_stamps(spec: dict[str, Any], x: Any) -> list[str]:
    """Warnings for stamps unlike the training stamps: shape, and total flux (channel 1) more
    than a factor 2 outside the training range (stored under ``input`` by the export)."""
    array = np.asarray(x.detach().cpu() if isinstance(x, torch.Tensor) else x, dtype=np.float64)
    channels, size = int(spec.get("in_channels", 1)), int(spec["image_size"])
    if array.ndim != 4 or array.shape[1:] != (channels, size, size):
        return [f"input shape {array.shape}: the network takes (N, {channels}, {size}, {size})"]
    low, high = spec.get("input", {}).get("total_flux", (None, None))
    if low is None:
        return []
    flux = array[:, 0].sum(axis=(1, 2))
    outside = np.flatnonzero((flux < low / FLUX_TOLERANCE) | (flux > high * FLUX_TOLERANCE))
    if not len(outside):
        return []
    return [
        (f"{len(outside)} of {len(flux)} stamps have a total flux outside {low:g}..{high:g} (the "
        f"training range) by more than a factor {FLUX_TOLERANCE:g}, e.g. stamp {outside[0]}: "
        f"{flux[outside[0]]:.3g}; normalise stamps to unit flux as in training, or their shears "
        "are meaningless")
    ]


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
    # version 2 (today's network: absent from version-1 exports, which load with these values)
    "block": "plain",
    "attention": "none",
    "psf_branch": False,
    "multiscale_fusion": "conv1x1",
    "stem_width": 0,
    "pool_last": True,
    "head_norm": False,
}

# ShearNet's multi-scale attention ResNet (`ResearchBackedGalaxyResNet`, nn = "research_backed"):
# conv 16 3x3 + GroupNorm(8) + ReLU; a multi-scale block of 16 channels per scale (3x3 convs at
# dilation 1, 3, 7, its "scales 3, 9, 21", each + GroupNorm + ReLU), concatenated to 48, CBAM
# (reduction 8, 7x7 spatial), residual (1x1 conv + GroupNorm) added before a ReLU; a stride-2
# 3x3 conv of 48 + GroupNorm + ReLU (53 -> 27); the same block at 32 per scale (96 channels),
# not pooled; flatten (27 * 27 * 96 at 53x53) -> dense 128 -> GroupNorm(8) -> ReLU -> 2.
# Built layer for layer; differences: PyTorch's default initialisation (Flax: LeCun normal),
# GroupNorm epsilon 1e-5 (Flax 1e-6), input/output scaling inside the network (ShearNet
# standardises labels outside it), no dropout (ShearNet's default is none; here dropout = 0).
RESEARCH_BACKED = {
    **SHEARNET_CNN,
    "block": "multiscale",
    "multiscale_fusion": "concat",
    "attention": "cbam",
    "residual": True,
    "normalization": "group",
    "stem_width": 16,
    "pooling": "conv_act",
    "pool_last": False,
    "head_norm": True,
}

# ShearNet's two-branch galaxy + PSF network (`ForkLike`, nn = "fork-like", as its fork-like
# and ForkLens baseline configs set it: galaxy branch research_backed, PSF branch
# forklens_psf, fusion concat, gap false): the research_backed features of the galaxy (flat,
# 27 * 27 * 96) and ForkLens's PSF CNN (four stride-2 3x3 convs of 32, 64, 32, 16 channels,
# padding 3, no bias, GroupNorm(8) + ReLU: 8 * 8 * 16 at 53x53, flat) concatenated -> dense
# 128 -> GroupNorm(8) -> ReLU -> 2. Needs the objective's psf_channel = true (input channel 2
# is the PSF image: the study's PSF, where ShearNet may feed each galaxy its own). Same
# differences as research_backed; ShearNet's optional transformer fusion is not translated.
FORK_LIKE = {**RESEARCH_BACKED, "psf_branch": True}

SHEAR_CNN = Family(
    name="shear_cnn",
    # 2: symmetrize, block, attention, psf_branch, multiscale_fusion, stem_width, pool_last,
    # head_norm (version-1 exports load with their defaults: the version-1 network); 3: dropout
    # (version-2 exports load with dropout 0: the same network)
    version=3,
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
        "block": Choice(BLOCKS),
        "attention": Choice(ATTENTIONS),
        "psf_branch": Choice((True, False)),  # needs the objective's psf_channel = true
        "multiscale_fusion": Choice(MULTISCALE_FUSIONS),  # block = "multiscale" only
        "stem_width": Range(0, MAX_WIDTH, integer=True),  # 0: no stem
        "pool_last": Choice((True, False)),
        "head_norm": Choice((True, False)),  # head = "dense" only
        "loss": Choice(("mse", "l1", "huber")),
        "augment": Choice(("none", "d4")),  # each batch under a random D4 element
        "fresh_noise": Choice((True, False)),  # new pixel noise every epoch
        "symmetrize": Choice((True, False)),  # the network averaged over D4 (also exported)
        "dropout": Range(0.0, 0.9),  # before the head's last layer; 0 = none (MC dropout export)
        **TRAINING_RULES,
    },
    # The defaults are ShearNet's network, so a space that fixes nothing searches around it.
    defaults={
        **SHEARNET_CNN,
        "loss": "mse",
        "augment": "none",
        "fresh_noise": False,
        "symmetrize": False,
        "dropout": 0.0,
        "learning_rate": 1e-3,
        "batch_size": 64,
        "epochs": 10,
        "weight_decay": 0.0,
    },
    architecture_keys=(*SHEARNET_CNN, "symmetrize", "dropout"),
    example_input=example_stamps,
    describe_io=describe_stamps,
    check_input=check_stamps,
    output_columns=("g1", "g2"),
    presets={
        "shearnet_cnn": SHEARNET_CNN,
        "research_backed": RESEARCH_BACKED,
        "fork_like": FORK_LIKE,
    },
)
