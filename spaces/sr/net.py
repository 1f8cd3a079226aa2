"""The super-resolution family: networks mapping a (N, 1, H, W) image to (N, 1, sH, sW).

Backbones (``backbone``) and the keys each reads beside ``width``, ``kernel_size`` (head and
reconstruction convolutions), ``activation`` and ``upsampler``:

- ``resnet`` (SRResNet / EDSR): a head convolution, ``depth`` residual blocks
  (conv-norm-act-conv-norm, optional channel ``attention``, ``normalization``, ``dilation``), a
  body convolution with a long skip over the blocks, an upsampler, a reconstruction convolution.
- ``srcnn``: bicubic upsampling first, then a ``kernel_size`` convolution of ``width``
  channels, ``depth`` 1x1 mapping layers of ``width // 2`` channels, and a 5x5
  reconstruction (SRCNN 9-1-5 is kernel_size 9, depth 1, width 64). ``upsampler`` is unused.
- ``fsrcnn``: a ``kernel_size`` feature extraction of ``width`` channels, a 1x1 shrink to
  ``shrink_width``, ``depth`` 3x3 mapping layers, a 1x1 expansion and a 9x9 upsampler
  straight to the output (FSRCNN(56, 12, 4) is kernel_size 5, width 56, shrink_width 12, depth 4).
- ``rcan`` (RCAN): ``groups`` residual groups of ``group_blocks`` residual channel-attention
  blocks (squeeze ratio ``reduction``; ``normalization`` and ``dilation`` apply to their
  convolutions), all in a long skip; no activation after head or upsampler, as published.
- ``lapsrn`` (LapSRN): log2(scale) x2 levels (so scale 2, 4 or 8), each ``level_depth`` 3x3
  convolutions and an x2 upsampler; every level adds its residual to the x2 upsampling of the
  previous level's image (a learned transposed convolution started as bilinear), so
  ``global_skip`` is not used. Trained on every level (``lensnas.objectives.sr.training``).
- ``vit_hybrid``: the resnet head and ``depth`` residual blocks, then ``transformer_depth``
  transformer blocks (torch's TransformerEncoderLayer, pre-norm, GELU, feed-forward 4x) over
  ``patch_size`` patches embedded in ``embed_dim`` channels with ``heads`` heads and
  ``dropout``; sizes not divisible by the patch are zero-padded right and bottom and cropped
  back (see ``lensnas.spaces.sr.backbones.TransformerStage``); then the resnet tail.
- ``srgan``: the ``sisr_backbone`` network as the generator of adversarial training (the
  discriminator and the feature loss are training keys; ``lensnas.spaces.sr.adversary``). The
  network built and exported is the generator alone.
- ``denoised_sisr``: a frozen DnCNN (``lensnas.spaces.sr.denoise``: ``denoiser_depth`` hidden
  layers of ``denoiser_width`` channels, 3x3, batch norm, ReLU, residual; or the network of an
  exported denoising folder, the ``[objective] denoiser_folder`` option) in front of the
  ``sisr_backbone`` network; the global skip upsamples the denoised image.

Upsamplers: ``pixel_shuffle`` (conv to s^2 times the channels, then sub-pixel shuffle),
``transposed`` (a transposed convolution of stride s) and ``interpolate`` (nearest-neighbour
resize, then a convolution). With ``global_skip`` the network predicts a correction to the
bicubic upsampling of its input. Outputs are not clamped; metrics clamp to [0, 1].
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from lensnas.spaces.family import TRAINING_RULES, Choice, Family, Range
from lensnas.spaces.layers import NORMALIZATIONS, normalization
from lensnas.spaces.sr.adversary import DISCRIMINATORS
from lensnas.spaces.sr.backbones import LapSRNBody, RCANBody, ViTHybridBody
from lensnas.spaces.sr.layers import (
    SR_ACTIVATIONS,
    UPSAMPLERS,
    ChannelAttention,
    ResidualBlock,
    bicubic,
    conv,
    reconstruction,
    sr_activation,
    upsampler,
)

SR_LOSS_NAMES = ("l1", "mse", "charbonnier", "ssim_l1")
MAX_WIDTH = 512
MAX_CONSISTENCY_WEIGHT = 1000.0
SRCNN_RECONSTRUCTION_KERNEL = 5
FSRCNN_UPSAMPLER_KERNEL = 9


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
        self.tail = reconstruction(config, width, in_channels, scale)

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


SISR_BODIES: dict[str, type[nn.Module]] = {
    "resnet": ResNetBody,
    "srcnn": SRCNNBody,
    "fsrcnn": FSRCNNBody,
    "rcan": RCANBody,
    "lapsrn": LapSRNBody,
    "vit_hybrid": ViTHybridBody,
}
SISR_BACKBONES = tuple(SISR_BODIES)  # networks on their own (also the sisr_backbone choices)
BACKBONES = (*SISR_BACKBONES, "srgan", "denoised_sisr")


def sisr_backbone(config: dict[str, Any]) -> str:
    """The single-image SR network of a configuration: ``sisr_backbone`` for srgan and
    denoised_sisr, else the backbone itself."""
    backbone = config["backbone"]
    if backbone not in BACKBONES:
        raise ValueError(f"unknown backbone {backbone!r}; allowed: {', '.join(BACKBONES)}")
    return config["sisr_backbone"] if backbone in ("srgan", "denoised_sisr") else backbone


def denoiser_config(config: dict[str, Any]) -> dict[str, Any]:
    """The DnCNN a denoised_sisr configuration trains in the trial (denoise_net's keys)."""
    return {
        "depth": config["denoiser_depth"],
        "width": config["denoiser_width"],
        "kernel_size": 3,
        "normalization": "batch",
        "activation": "relu",
        "residual": True,
    }


class SRNet(nn.Module):
    """A super-resolution network: an optional denoiser, a backbone, plus the bicubic
    upsampling (of the denoised input) when ``global_skip``.

    ``denoiser`` is the denoise_net configuration of an exported denoiser (denoised_sisr with
    ``[objective] denoiser_folder``); without it denoised_sisr builds :func:`denoiser_config`.
    """

    def __init__(
        self,
        config: dict[str, Any],
        in_channels: int = 1,
        scale: int = 2,
        denoiser: dict[str, Any] | None = None,
    ):
        super().__init__()
        backbone = sisr_backbone(config)
        self.scale = scale
        self.global_skip = bool(config["global_skip"]) and backbone != "lapsrn"
        self.denoiser: nn.Module | None = None
        if config["backbone"] == "denoised_sisr":
            from lensnas.spaces.sr.denoise import DenoiseNet

            self.denoiser = DenoiseNet(denoiser or denoiser_config(config), in_channels)
        self.body = SISR_BODIES[backbone](config, in_channels, scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.denoiser is not None:
            x = self.denoiser(x)
        output = self.body(x)
        if self.global_skip:
            output = output + bicubic(x, self.scale)
        return output

    def pyramid(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The outputs at every x2 level of a LapSRN body (the last is ``forward``'s); for
        other backbones, ``[forward(x)]``."""
        if not isinstance(self.body, LapSRNBody):
            return [self.forward(x)]
        if self.denoiser is not None:
            x = self.denoiser(x)
        return self.body.pyramid(x)

    def train(self, mode: bool = True) -> SRNet:
        super().train(mode)
        if self.denoiser is not None and not any(
            p.requires_grad for p in self.denoiser.parameters()
        ):
            self.denoiser.eval()  # a frozen denoiser keeps its batch-norm statistics
        return self


def build_sr_net(
    config: dict[str, Any],
    in_channels: int = 1,
    scale: int = 2,
    denoiser: dict[str, Any] | None = None,
) -> SRNet:
    """Build an SR network from a full configuration (see SR_NET.defaults); ``denoiser``: the
    configuration of an exported denoise_net for denoised_sisr."""
    return SRNet(config, in_channels=in_channels, scale=scale, denoiser=denoiser)


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


# Published networks, as presets. Widths and depths are the papers' (RGB networks there; one
# channel here), so they are GPU-sized; each says where it departs from the paper.

# DeepLense SR tests' ResNet SISR: SRResNet-style, 10 residual blocks with batch norm,
# 9x9 head and reconstruction, PReLU, one pixel-shuffle x2 stage.
RESNET_SISR = {
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
}
# SRResNet (Ledig et al. 2017), SRGAN's generator: 16 residual blocks of 64, batch norm, PReLU.
SRRESNET = {**RESNET_SISR, "depth": 16}
# RCAN (Zhang et al. 2018), the best published DeepLense Model-1 network: 10 residual groups of
# 20 blocks, 64 channels, reduction 16, 3x3 convolutions (about 15.4M parameters at x2; the
# x4 upsampler is one pixel shuffle by 4 here, two by 2 there).
RCAN = {
    "backbone": "rcan",
    "kernel_size": 3,
    "width": 64,
    "groups": 10,
    "group_blocks": 20,
    "reduction": 16,
    "dilation": 1,
    "normalization": "none",
    "activation": "relu",
    "upsampler": "pixel_shuffle",
    "global_skip": False,
}
# LapSRN (Lai et al. 2017): 10 convolutions of 64 per level, 4x4 transposed-convolution
# upsampling, Charbonnier loss on every level. Its LeakyReLU slope is 0.2 (0.1 here).
LAPSRN = {
    "backbone": "lapsrn",
    "kernel_size": 3,
    "width": 64,
    "level_depth": 10,
    "dilation": 1,
    "activation": "leaky_relu",
    "upsampler": "transposed",
    "loss": "charbonnier",
}
# The EDSR + vision-transformer hybrid of the DeepLense GSoC proposal, which gives no sizes:
# ours are 8 EDSR blocks of 64, 4x4 patches in 128 channels, 4 heads, 4 blocks, dropout 0.1.
VIT_HYBRID = {
    "backbone": "vit_hybrid",
    "kernel_size": 3,
    "depth": 8,
    "width": 64,
    "dilation": 1,
    "attention": False,
    "normalization": "none",
    "activation": "relu",
    "upsampler": "pixel_shuffle",
    "global_skip": True,
    "patch_size": 4,
    "embed_dim": 128,
    "heads": 4,
    "transformer_depth": 4,
    "dropout": 0.1,
}
# SRGAN (Ledig et al. 2017): the SRResNet generator, its 8-layer discriminator (64 to 512
# channels, batch norm), adversarial weight 1e-3. Its VGG feature loss is replaced by the
# features of a denoising autoencoder trained on the study's HR images (sr_adversary).
SRGAN = {
    **SRRESNET,
    "backbone": "srgan",
    "sisr_backbone": "resnet",
    "discriminator": "srgan",
    "discriminator_depth": 8,
    "discriminator_width": 64,
    "discriminator_kernel_size": 3,
    "discriminator_batch_norm": True,
    "adversarial_weight": 1e-3,
}
# DeepLense's DenoisedSISR: a DnCNN-S denoiser (17 layers of 64) frozen in front of the
# ResNet SISR above.
DENOISED_SISR = {
    **RESNET_SISR,
    "backbone": "denoised_sisr",
    "sisr_backbone": "resnet",
    "denoiser_depth": 15,
    "denoiser_width": 64,
}

ARCHITECTURE_DEFAULTS: dict[str, Any] = {
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
    # version 2 (absent from version-1 exports, which load with these values)
    "sisr_backbone": "resnet",
    "groups": 2,
    "group_blocks": 4,
    "reduction": 16,
    "level_depth": 3,
    "patch_size": 4,
    "embed_dim": 64,
    "heads": 4,
    "transformer_depth": 2,
    "dropout": 0.0,
    "denoiser_depth": 4,
    "denoiser_width": 16,
}

SR_NET = Family(
    name="sr_net",
    # 2: rcan, lapsrn, vit_hybrid, srgan, denoised_sisr and their keys
    version=2,
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
        "sisr_backbone": Choice(SISR_BACKBONES),  # srgan, denoised_sisr
        "groups": Range(1, 64, integer=True),  # rcan
        "group_blocks": Range(1, 64, integer=True),  # rcan
        "reduction": Range(1, MAX_WIDTH, integer=True),  # rcan
        "level_depth": Range(1, 64, integer=True),  # lapsrn
        "patch_size": Range(1, 32, integer=True),  # vit_hybrid
        "embed_dim": Range(1, 2048, integer=True),  # vit_hybrid; a multiple of heads
        "heads": Range(1, 64, integer=True),  # vit_hybrid
        "transformer_depth": Range(1, 48, integer=True),  # vit_hybrid
        "dropout": Range(0.0, 0.9),  # vit_hybrid's transformer blocks
        "denoiser_depth": Range(0, 64, integer=True),  # denoised_sisr
        "denoiser_width": Range(1, MAX_WIDTH, integer=True),  # denoised_sisr
        # training keys of denoised_sisr and srgan (lensnas.objectives.sr.training)
        "denoiser_epochs": Range(1, 10000, integer=True),
        "discriminator": Choice(DISCRIMINATORS),
        "discriminator_depth": Range(1, 16, integer=True),
        "discriminator_width": Range(1, MAX_WIDTH, integer=True),
        "discriminator_kernel_size": Range(1, 15, integer=True),
        "discriminator_batch_norm": Choice((True, False)),
        "adversarial_weight": Range(0.0, 1.0),
        "pretrain_epochs": Range(0, 10000, integer=True),
        "feature_weight": Range(0.0, 100.0),
        "feature_epochs": Range(1, 10000, integer=True),
        "loss": Choice(SR_LOSS_NAMES),
        # the weight of the objective's consistency loss term (lensnas.objectives.sr.metrics)
        "consistency_weight": Range(0.0, MAX_CONSISTENCY_WEIGHT),
        **TRAINING_RULES,
    },
    defaults={
        **ARCHITECTURE_DEFAULTS,
        "denoiser_epochs": 3,
        "discriminator": "srgan",
        "discriminator_depth": 4,
        "discriminator_width": 32,
        "discriminator_kernel_size": 3,
        "discriminator_batch_norm": True,
        "adversarial_weight": 1e-3,
        "pretrain_epochs": 0,
        "feature_weight": 0.1,
        "feature_epochs": 2,
        "loss": "l1",
        "consistency_weight": 0.0,
        "learning_rate": 1e-3,
        "batch_size": 16,
        "epochs": 20,
        "weight_decay": 0.0,
    },
    architecture_keys=tuple(ARCHITECTURE_DEFAULTS),
    example_input=example_images,
    describe_io=describe_images,
    presets={
        "resnet_sisr": RESNET_SISR,
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
        "rcan": RCAN,
        "lapsrn": LAPSRN,
        "vit_hybrid": VIT_HYBRID,
        "srgan": SRGAN,
        "denoised_sisr": DENOISED_SISR,
    },
)
