"""The deeper super-resolution backbones of the DeepLense seeds: RCAN, LapSRN and the hybrid of
EDSR residual features with vision-transformer blocks. Each maps (N, C, H, W) to
(N, C, sH, sW); which family keys each reads is said in ``lensnas.spaces.sr.net``.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lensnas.spaces.sr.layers import (
    ResidualBlock,
    conv,
    reconstruction,
    sr_activation,
    transposed_conv,
    upsampler,
)

MLP_RATIO = 4  # hidden units of a transformer block's feed-forward layer per embedding unit
LAPSRN_KERNEL = 4  # LapSRN's 4x4 transposed convolutions (stride 2)


@contextlib.contextmanager
def traceable_attention() -> Iterator[None]:
    """While tracing (TorchScript, ONNX export), turn off torch's fused attention fast path
    (eval mode), whose single operator the ONNX exporter cannot write; restore it after."""
    enabled = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(enabled and not torch.jit.is_tracing())
    try:
        yield
    finally:
        torch.backends.mha.set_fastpath_enabled(enabled)


class EncoderLayer(nn.TransformerEncoderLayer):
    """torch's TransformerEncoderLayer, its self-attention computed by
    ``F.scaled_dot_product_attention`` from the layer's own weights (the same numbers): traced
    for ONNX, the layer's MultiheadAttention freezes the sequence length
    (pytorch/pytorch#120075), so an exported network would take one input size only. This
    overrides the layer's (private) ``_sa_block``; a test compares it with the original."""

    def _sa_block(self, x: torch.Tensor, attn_mask: Any, key_padding_mask: Any,
                  is_causal: bool = False) -> torch.Tensor:
        attention = self.self_attn
        heads = attention.num_heads
        batch, _, embed = x.shape
        projected = F.linear(x, attention.in_proj_weight, attention.in_proj_bias)

        def split(t: torch.Tensor) -> torch.Tensor:  # (N, L, E) -> (N, heads, L, E / heads)
            return t.reshape(batch, -1, heads, embed // heads).transpose(1, 2)

        query, key, value = (split(t) for t in projected.chunk(3, dim=-1))
        dropout = attention.dropout if self.training else 0.0
        mixed = F.scaled_dot_product_attention(query, key, value, dropout_p=dropout)
        return self.dropout1(attention.out_proj(mixed.transpose(1, 2).reshape(batch, -1, embed)))


class ResidualGroup(nn.Module):
    """RCAN's residual group: channel-attention residual blocks, a 3x3 conv, a short skip."""

    def __init__(self, width: int, config: dict[str, Any]):
        super().__init__()
        block_config = {**config, "attention": True}
        self.body = nn.Sequential(
            *[ResidualBlock(width, block_config, config["reduction"])
              for _ in range(config["group_blocks"])],
            conv(width, width, 3),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class RCANBody(nn.Module):
    """RCAN (Zhang et al. 2018): head conv, residual groups in a long skip, upsampler, conv."""

    def __init__(self, config: dict[str, Any], in_channels: int, scale: int):
        super().__init__()
        width, kernel_size = config["width"], config["kernel_size"]
        self.head = conv(in_channels, width, kernel_size)
        self.groups = nn.Sequential(
            *[ResidualGroup(width, config) for _ in range(config["groups"])],
            conv(width, width, 3),
        )
        self.tail = nn.Sequential(
            upsampler(config["upsampler"], width, width, scale, 3),
            conv(width, in_channels, kernel_size),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.head(x)
        return self.tail(features + self.groups(features))


def pyramid_levels(scale: int) -> int:
    """log2(scale): the number of x2 levels of a LapSRN pyramid; ValueError if not a power of 2."""
    levels = round(math.log2(scale)) if scale >= 2 else 0
    if levels < 1 or 2**levels != scale:
        raise ValueError(f"lapsrn upsamples by powers of 2 (2, 4, 8), not by scale {scale}")
    return levels


def bilinear_transposed_conv(channels: int) -> nn.ConvTranspose2d:
    """A 4x4 stride-2 transposed convolution initialised to bilinear x2 upsampling (LapSRN's
    image branch), channel by channel."""
    layer = transposed_conv(channels, channels, LAPSRN_KERNEL, 2)
    taps = torch.tensor([0.25, 0.75, 0.75, 0.25])
    with torch.no_grad():
        layer.weight.zero_()
        for channel in range(channels):
            layer.weight[channel, channel] = torch.outer(taps, taps)
        layer.bias.zero_()
    return layer


class LapSRNBody(nn.Module):
    """LapSRN (Lai et al. 2017): log2(scale) x2 levels. Each level's feature branch
    (``level_depth`` 3x3 convs and an x2 upsampler) predicts a residual that is added to the
    x2 upsampling of the previous level's image (a transposed conv starting as bilinear)."""

    def __init__(self, config: dict[str, Any], in_channels: int, scale: int):
        super().__init__()
        width, levels = config["width"], pyramid_levels(scale)
        self.head = nn.Sequential(
            conv(in_channels, width, config["kernel_size"]),
            sr_activation(config["activation"], width),
        )
        self.features = nn.ModuleList()
        for _ in range(levels):
            layers = []
            for _ in range(config["level_depth"]):
                layers += [conv(width, width, 3, config["dilation"]),
                           sr_activation(config["activation"], width)]
            layers += [upsampler(config["upsampler"], width, width, 2, 3),
                       sr_activation(config["activation"], width)]
            self.features.append(nn.Sequential(*layers))
        self.residuals = nn.ModuleList(conv(width, in_channels, 3) for _ in range(levels))
        self.images = nn.ModuleList(bilinear_transposed_conv(in_channels) for _ in range(levels))

    def pyramid(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The image at every level: 2x, 4x, ... the input size (the last is the output)."""
        features, image, outputs = self.head(x), x, []
        for feature, residual, upsample in zip(self.features, self.residuals, self.images):
            features = feature(features)
            image = upsample(image) + residual(features)
            outputs.append(image)
        return outputs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pyramid(x)[-1]


class TransformerStage(nn.Module):
    """Transformer blocks over the non-overlapping ``patch_size`` patches of a feature map.

    The map is zero-padded on the right and bottom to a multiple of ``patch_size`` (75 -> 76
    at patch 4), embedded by a strided convolution, given a depthwise-convolution positional
    encoding (CPVT's, so any size works), passed through pre-norm encoder blocks, mapped back by
    a transposed convolution, cropped to the input size and added to the input.
    """

    def __init__(self, channels: int, config: dict[str, Any]):
        super().__init__()
        patch, embed, heads = config["patch_size"], config["embed_dim"], config["heads"]
        if embed % heads:
            raise ValueError(f"embed_dim {embed} must be a multiple of heads {heads}")
        self.patch_size = patch
        self.embed = nn.Conv2d(channels, embed, patch, stride=patch)
        self.position = nn.Conv2d(embed, embed, 3, padding=1, groups=embed)
        layer = EncoderLayer(
            embed, heads, dim_feedforward=MLP_RATIO * embed, dropout=config["dropout"],
            activation="gelu", batch_first=True, norm_first=True,
        )
        self.blocks = nn.TransformerEncoder(
            layer, config["transformer_depth"], enable_nested_tensor=False
        )
        self.norm = nn.LayerNorm(embed)
        self.unembed = nn.ConvTranspose2d(embed, channels, patch, stride=patch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        height, width = x.shape[-2:]
        padded = F.pad(x, (0, (-width) % self.patch_size, 0, (-height) % self.patch_size))
        tokens = self.embed(padded)
        tokens = tokens + self.position(tokens)
        batch, embed, rows, columns = tokens.shape
        with traceable_attention():
            sequence = self.norm(self.blocks(tokens.flatten(2).transpose(1, 2)))
        grid = sequence.transpose(1, 2).reshape(batch, embed, rows, columns)
        return x + self.unembed(grid)[..., :height, :width]


class ViTHybridBody(nn.Module):
    """EDSR residual blocks, then transformer blocks over patches of their features (a long
    skip over both), then the upsampler and a reconstruction convolution."""

    def __init__(self, config: dict[str, Any], in_channels: int, scale: int):
        super().__init__()
        width, kernel_size = config["width"], config["kernel_size"]
        self.head = conv(in_channels, width, kernel_size)
        self.body = nn.Sequential(
            *[ResidualBlock(width, config) for _ in range(config["depth"])],
            TransformerStage(width, config),
            conv(width, width, 3),
        )
        self.tail = reconstruction(config, width, in_channels, scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.head(x)
        return self.tail(features + self.body(features))
