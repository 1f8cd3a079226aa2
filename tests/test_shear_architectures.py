"""Architecture options of the shear CNN family: multi-scale blocks, CBAM, the PSF branch,
ShearNet's research_backed and fork_like presets, their export, and version-1 exports."""

from __future__ import annotations

import itertools
import json

import numpy as np
import onnxruntime
import pytest
import torch

from lensnas import spaces
from lensnas.search.results.export import onnx, torchscript
from lensnas.search.spec import SpecError, load_spec
from lensnas.spaces import parse_space
from lensnas.spaces.dimensions import SpaceError
from lensnas.spaces.loading import build
from lensnas.spaces.shear.blocks import CBAM, MultiScaleBlock, PsfCNN
from lensnas.spaces.shear.cnn import SHEAR_CNN, ShearCNN, build_shear_cnn, example_stamps
from tests.conftest import write_tiny_shear_study

SMALL = {"depth": 2, "width": 4, "dense_units": 16, "residual": True, "normalization": "group"}


def _network(params: dict, size: int, channels: int = 1, **scales: float) -> ShearCNN:
    torch.manual_seed(0)
    return build_shear_cnn(SHEAR_CNN.config(params), channels, size, **scales)


def _check_forward_and_gradients(model: ShearCNN, channels: int, size: int) -> None:
    x = torch.randn(3, channels, size, size)
    y = model(x)
    assert y.shape == (3, 2)
    y.square().sum().backward()
    for name, parameter in model.named_parameters():
        assert parameter.grad is not None, name
        assert torch.isfinite(parameter.grad).all(), name
    first = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d))  # stem or block
    assert first.weight.grad.abs().sum() > 0  # the loss reaches the first galaxy convolution
    if model.psf_features is not None:
        assert model.psf_features.layers[0].weight.grad.abs().sum() > 0


@pytest.mark.parametrize("block, attention, psf_branch, size", list(itertools.product(
    ["plain", "multiscale"], ["none", "cbam"], [False, True], [25, 53]
)))
def test_every_new_dimension_builds_runs_and_trains(block, attention, psf_branch, size):
    channels = 2 if psf_branch else 1
    for head in ("gap", "dense"):
        params = {
            **SMALL, "block": block, "attention": attention, "psf_branch": psf_branch,
            "head": head,
        }
        model = _network(params, size, channels)
        _check_forward_and_gradients(model, channels, size)
        blocks = [m for m in model.modules() if isinstance(m, MultiScaleBlock)]
        assert len(blocks) == (2 if block == "multiscale" else 0)
        assert len([m for m in model.modules() if isinstance(m, CBAM)]) == (
            2 if attention == "cbam" else 0
        )
        assert (model.psf_features is not None) == psf_branch


@pytest.mark.parametrize("size", [25, 53])
@pytest.mark.parametrize("options", [
    {"block": "multiscale", "multiscale_fusion": "concat"},
    {"block": "multiscale", "multiscale_fusion": "conv1x1", "residual": False},
    {"stem_width": 8, "pooling": "conv_act", "pool_last": False},
    {"head_norm": True, "pooling": "max", "depth": 4},
])
def test_extension_options_build_and_train(options, size):
    model = _network({**SMALL, "head": "dense", **options}, size)
    _check_forward_and_gradients(model, 1, size)


def test_multiscale_block_is_dilated_3x3_convolutions_concatenated_or_fused():
    config = SHEAR_CNN.config({**SMALL, "block": "multiscale"})
    fused = MultiScaleBlock(5, 8, config)
    convs = [branch[0] for branch in fused.branches]
    assert [(c.kernel_size, c.dilation, c.out_channels) for c in convs] == [
        ((3, 3), (1, 1), 8), ((3, 3), (3, 3), 8), ((3, 3), (7, 7), 8)
    ]
    assert fused.out_channels == 8 and fused.fusion[0].kernel_size == (1, 1)
    concatenated = MultiScaleBlock(5, 8, {**config, "multiscale_fusion": "concat"})
    assert concatenated.out_channels == 24
    assert concatenated(torch.zeros(1, 5, 11, 11)).shape == (1, 24, 5, 5)  # avg-pooled


def test_cbam_weights_channels_then_positions():
    cbam = CBAM(16)
    assert (cbam.mlp[0].in_features, cbam.mlp[0].out_features) == (16, 2)  # reduction 8
    assert cbam.spatial.kernel_size == (7, 7) and cbam.spatial.in_channels == 2
    x = torch.rand(2, 16, 9, 9)
    y = cbam(x)
    assert y.shape == x.shape and bool(((y >= 0) & (y <= x)).all())  # gates in (0, 1)


def test_psf_branch_without_a_psf_channel_is_refused():
    with pytest.raises(ValueError, match=r"psf_branch.*psf_channel"):
        _network({**SMALL, "psf_branch": True}, 25, channels=1)
    with pytest.raises(ValueError, match=r"psf_branch.*psf_channel"):
        build_shear_cnn(SHEAR_CNN.config(SHEAR_CNN.presets["fork_like"]), 1, 53)


def test_psf_branch_reads_the_psf_channel_and_the_galaxy_network_the_galaxy_channel():
    model = _network({**SMALL, "psf_branch": True}, 25, channels=2).eval()
    galaxy = next(m for m in model.features.modules() if isinstance(m, torch.nn.Conv2d))
    assert galaxy.in_channels == 1
    assert model.psf_features.layers[0].in_channels == 1
    x = torch.randn(2, 2, 25, 25)
    with torch.no_grad():
        for channel in (0, 1):
            changed = x.clone()
            changed[:, channel] += torch.randn(2, 25, 25)
            assert not torch.allclose(model(x), model(changed))


@pytest.mark.parametrize("size", [25, 53])
@pytest.mark.parametrize("name", ["shearnet_cnn", "research_backed", "fork_like"])
def test_presets_build(name, size):
    preset = SHEAR_CNN.presets[name]
    channels = 2 if preset["psf_branch"] else 1
    model = build_shear_cnn(SHEAR_CNN.config(preset), channels, size)
    assert model(torch.randn(2, channels, size, size)).shape == (2, 2)


def test_research_backed_is_shearnets_multiscale_attention_resnet():
    model = build_shear_cnn(SHEAR_CNN.config(SHEAR_CNN.presets["research_backed"]), 1, 53)
    assert model.stem[0].out_channels == 16 and isinstance(model.stem[1], torch.nn.GroupNorm)
    first, second = model.features
    assert isinstance(first, MultiScaleBlock) and isinstance(second, MultiScaleBlock)
    assert [b[0].out_channels for b in first.branches] == [16, 16, 16]
    assert [b[0].out_channels for b in second.branches] == [32, 32, 32]
    assert (first.out_channels, second.out_channels) == (48, 96)
    assert isinstance(first.attention, CBAM) and isinstance(second.attention, CBAM)
    assert first.pool[0].stride == (2, 2) and isinstance(first.pool[1], torch.nn.GroupNorm)
    assert isinstance(second.pool, torch.nn.Identity)  # no pooling after the last block
    head = [type(m).__name__ for m in model.head]
    assert head == ["Flatten", "Linear", "GroupNorm", "ReLU", "Linear"]
    assert model.head[1].in_features == 27 * 27 * 96 and model.head[1].out_features == 128


def test_fork_like_adds_forklens_psf_cnn_features_to_research_backed():
    model = build_shear_cnn(SHEAR_CNN.config(SHEAR_CNN.presets["fork_like"]), 2, 53)
    assert isinstance(model.psf_features, PsfCNN)
    convs = [m for m in model.psf_features.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [(c.out_channels, c.stride, c.padding, c.bias) for c in convs] == [
        (32, (2, 2), (3, 3), None), (64, (2, 2), (3, 3), None),
        (32, (2, 2), (3, 3), None), (16, (2, 2), (3, 3), None),
    ]
    assert PsfCNN.output_size(53) == 8
    assert model.head[1].in_features == 27 * 27 * 96 + 8 * 8 * 16


def test_the_family_refuses_bad_values_of_the_new_dimensions():
    bad = {
        "block": {"type": "categorical", "choices": ["plain", "inception"]},
        "attention": "se",
        "psf_branch": "yes",
        "multiscale_fusion": "sum",
        "stem_width": -1,
        "pooling": "stride",
    }
    for name, entry in bad.items():
        with pytest.raises(SpaceError, match=f"space.{name}"):
            SHEAR_CNN.check_space(parse_space({name: entry}))
    SHEAR_CNN.check_space(parse_space({
        "block": {"type": "categorical", "choices": ["plain", "multiscale"]},
        "attention": {"type": "categorical", "choices": ["none", "cbam"]},
        "psf_branch": False,
        "stem_width": {"type": "int", "low": 0, "high": 32},
    }))


def test_a_study_file_with_an_unknown_block_type_is_refused(tmp_path):
    path = write_tiny_shear_study(tmp_path)
    text = path.read_text() + 'block = { type = "categorical", choices = ["plain", "inception"] }\n'
    path.write_text(text)
    with pytest.raises(SpecError, match=r"space\.block: 'inception' is not allowed") as info:
        load_spec(path)
    assert str(path) in str(info.value) and "multiscale" in str(info.value)
    assert "\n" not in str(info.value)


def test_cbam_multiscale_psf_branch_network_exports_to_torchscript_and_onnx(tmp_path):
    params = {
        **SMALL, "block": "multiscale", "attention": "cbam", "psf_branch": True,
        "pooling": "conv_act", "stem_width": 8, "head": "dense", "head_norm": True,
    }
    model = _network(params, 25, channels=2, input_scale=1e3, output_scale=0.1).eval()
    spec = {"family": "shear_cnn", "image_size": 25, "in_channels": 2, "input_scale": 1e3}
    x, input_axes, output_axes = example_stamps(spec, 3, torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = model(x).numpy()
        traced = torchscript(model, x, tmp_path / "model.ts")
        np.testing.assert_allclose(traced(x).numpy(), expected, rtol=0, atol=1e-5)
        loaded = torch.jit.load(str(tmp_path / "model.ts"))
        np.testing.assert_allclose(loaded(x).numpy(), expected, rtol=0, atol=1e-5)
    onnx(model, x, (input_axes, output_axes), tmp_path / "model.onnx")
    session = onnxruntime.InferenceSession(
        str(tmp_path / "model.onnx"), providers=["CPUExecutionProvider"]
    )
    (output,) = session.run(None, {"input": x.numpy()})
    np.testing.assert_allclose(output, expected, rtol=0, atol=1e-5)
    x5, _, _ = example_stamps(spec, 5, torch.Generator().manual_seed(2))  # dynamic batch
    with torch.no_grad():
        np.testing.assert_allclose(
            session.run(None, {"input": x5.numpy()})[0], model(x5).numpy(), rtol=0, atol=1e-5
        )


# What a version-1 export of ShearNet's CNN wrote: today's keys only.
VERSION_1_CONFIG = {
    "kernel_size": 3, "dilation": 1, "pooling": "avg", "depth": 2, "width": 16,
    "residual": False, "normalization": "none", "activation": "relu", "head": "dense",
    "dense_units": 128,
}
VERSION_1_WEIGHTS = {
    "input_scale": (), "output_scale": (),
    "features.0.conv.weight": (16, 1, 3, 3), "features.0.conv.bias": (16,),
    "features.1.conv.weight": (32, 16, 3, 3), "features.1.conv.bias": (32,),
    "head.1.weight": (128, 32 * 13 * 13), "head.1.bias": (128,),
    "head.3.weight": (2, 128), "head.3.bias": (2,),
}


def test_a_version_1_architecture_still_loads(tmp_path):
    spec = {
        "family": "shear_cnn", "version": 1, "config": VERSION_1_CONFIG,
        "in_channels": 1, "image_size": 53, "input_scale": 1000.0, "output_scale": 0.1,
    }
    model = build(spec)
    shapes = {key: tuple(value.shape) for key, value in model.state_dict().items()}
    assert shapes == VERSION_1_WEIGHTS  # the same network, so version-1 weights.pt fit
    (tmp_path / "architecture.json").write_text(json.dumps(spec))
    generator = torch.Generator().manual_seed(0)
    weights = {k: torch.randn(shape, generator=generator) for k, shape in shapes.items()}
    torch.save(weights, tmp_path / "weights.pt")
    loaded = spaces.load(tmp_path)
    assert torch.equal(loaded.head[3].weight, weights["head.3.weight"])
    assert loaded(torch.zeros(2, 1, 53, 53)).shape == (2, 2)


def test_a_current_architecture_must_name_every_key():
    config = SHEAR_CNN.architecture({})
    del config["block"]
    spec = {"family": "shear_cnn", "version": SHEAR_CNN.version, "config": config, "image_size": 25}
    with pytest.raises(spaces.ArchitectureError, match=r"config\.block: missing"):
        build(spec)
