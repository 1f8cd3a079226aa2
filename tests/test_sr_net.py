"""Every SR backbone, upsampler, attention setting, depth and preset maps H x W to sH x sW
(the backbones added in version 2 are tested in test_sr_backbones.py)."""

from __future__ import annotations

import pytest
import torch

from lensnas.spaces import SpaceError, family, parse_space
from lensnas.spaces.sr.layers import UPSAMPLERS, transposed_conv
from lensnas.spaces.sr.net import SR_NET

SIZES = [75, 64]
BACKBONES = ("resnet", "srcnn", "fsrcnn")


def output_shape(params: dict, size: int, scale: int = 2, batch: int = 2) -> tuple[int, ...]:
    model = SR_NET.build(SR_NET.config(params), in_channels=1, scale=scale)
    model.eval()
    with torch.no_grad():
        return tuple(model(torch.rand(batch, 1, size, size)).shape)


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("backbone", BACKBONES)
@pytest.mark.parametrize("upsampler", UPSAMPLERS)
@pytest.mark.parametrize("attention", [True, False])
def test_backbones_upsamplers_attention(size, backbone, upsampler, attention):
    params = {
        "backbone": backbone,
        "upsampler": upsampler,
        "attention": attention,
        "depth": 1,
        "width": 8,
        "shrink_width": 4,
    }
    assert output_shape(params, size) == (2, 1, 2 * size, 2 * size)


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("depth", [0, 1, 3])
@pytest.mark.parametrize("backbone", BACKBONES)
def test_depths(size, depth, backbone):
    params = {"backbone": backbone, "depth": depth, "width": 8, "dilation": 2}
    assert output_shape(params, size) == (2, 1, 2 * size, 2 * size)


@pytest.mark.parametrize("preset", sorted(SR_NET.presets))
def test_presets_build(preset):
    """Every preset at its published size (RCAN's 15.4M parameters take seconds per 16x16 image
    on a CPU: tiny odd and even inputs here; 75 and 64 in the backbone tests)."""
    for size in (7, 8):
        assert output_shape(SR_NET.presets[preset], size, batch=1) == (1, 1, 2 * size, 2 * size)


@pytest.mark.parametrize("normalization", ["none", "batch", "group", "layer", "instance"])
@pytest.mark.parametrize("activation", ["relu", "prelu", "gelu"])
def test_normalizations_and_activations(normalization, activation):
    params = {
        "normalization": normalization,
        "activation": activation,
        "depth": 1,
        "width": 8,
        "global_skip": False,
        "kernel_size": 5,
    }
    assert output_shape(params, 16) == (2, 1, 32, 32)


@pytest.mark.parametrize("scale", [2, 3, 4])
@pytest.mark.parametrize("upsampler", UPSAMPLERS)
@pytest.mark.parametrize("backbone", BACKBONES)
def test_other_scales(scale, upsampler, backbone):
    params = {"backbone": backbone, "upsampler": upsampler, "depth": 1, "width": 8}
    assert output_shape(params, 17, scale=scale) == (2, 1, 17 * scale, 17 * scale)


@pytest.mark.parametrize(
    ("kernel_size", "scale"), [(2, 2), (4, 2), (9, 2), (5, 3), (6, 3), (8, 4), (9, 4)]
)
def test_transposed_conv_size(kernel_size, scale):
    layer = transposed_conv(3, 2, kernel_size, scale)
    assert layer(torch.rand(1, 3, 11, 13)).shape == (1, 2, 11 * scale, 13 * scale)


def test_global_skip_starts_from_bicubic():
    """With global_skip, the output is the bicubic upsampling plus the network's correction."""
    params = {"depth": 1, "width": 8, "global_skip": True}
    model = SR_NET.build(SR_NET.config(params), scale=2)
    for parameter in model.body.tail[-1].parameters():  # zero the reconstruction convolution
        torch.nn.init.zeros_(parameter)
    x = torch.rand(1, 1, 20, 20)
    expected = torch.nn.functional.interpolate(
        x, scale_factor=2, mode="bicubic", align_corners=False
    )
    assert torch.allclose(model(x), expected)


def test_family_is_registered_and_checks_spaces():
    assert family("sr_net") is SR_NET
    assert SR_NET.version == 2
    space = parse_space(
        {
            "backbone": {"type": "categorical", "choices": ["resnet", "fsrcnn"]},
            "depth": {"type": "int", "low": 1, "high": 8},
            "upsampler": {"type": "categorical", "choices": list(UPSAMPLERS)},
            "loss": {"type": "categorical", "choices": ["l1", "ssim_l1", "charbonnier"]},
        }
    )
    SR_NET.check_space(space)
    with pytest.raises(SpaceError, match="space.upsampler"):
        SR_NET.check_space(
            parse_space({"upsampler": {"type": "categorical", "choices": ["bilinear"]}})
        )
    with pytest.raises(SpaceError, match="space.pooling"):
        SR_NET.check_space(parse_space({"pooling": "max"}))


def test_architecture_keys_exclude_training_keys():
    architecture = SR_NET.architecture({"learning_rate": 0.1, "depth": 2})
    assert (
        architecture["depth"] == 2
        and "learning_rate" not in architecture
        and "loss" not in architecture
    )
    training_keys = {"loss", "discriminator", "adversarial_weight", "pretrain_epochs",
                     "feature_weight", "denoiser_epochs"}
    assert not training_keys & set(SR_NET.architecture_keys)
    for preset in SR_NET.presets.values():
        assert set(preset) <= set(SR_NET.rules)
