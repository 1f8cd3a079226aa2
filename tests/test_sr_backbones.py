"""The SR backbones of the DeepLense seeds (RCAN, LapSRN, the ViT hybrid, SRGAN, DenoisedSISR):
shapes at scales 2 and 4 and DeepLense's sizes, a real training step each on CPU, exports to
TorchScript and ONNX that give the same images at other sizes, and their training steps."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import onnxruntime
import pytest
import torch
import torch.nn.functional as F

from lensnas import spaces
from lensnas.objectives.base import LocalContext
from lensnas.objectives.sr.metrics import Degradation, sr_loss
from lensnas.objectives.sr.training import (
    AdversarialStep,
    DenoiserStep,
    PyramidStep,
    noiseless_estimate,
    training_step,
)
from lensnas.objectives.training import TrainingStep, train_model
from lensnas.search.results.export import example_input, onnx, torchscript
from lensnas.search.spec import SpecError, load_spec
from lensnas.spaces.sr.adversary import build_discriminator
from lensnas.spaces.sr.backbones import EncoderLayer, TransformerStage
from lensnas.spaces.sr.layers import UPSAMPLERS
from lensnas.spaces.sr.net import SISR_BACKBONES, SR_NET

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit:DeprecationWarning")

NEW_BACKBONES = ("rcan", "lapsrn", "vit_hybrid", "srgan", "denoised_sisr")
TINY = {
    "width": 4, "depth": 1, "kernel_size": 3, "groups": 1, "group_blocks": 1, "reduction": 2,
    "level_depth": 1, "patch_size": 4, "embed_dim": 8, "heads": 2, "transformer_depth": 1,
    "denoiser_depth": 1, "denoiser_width": 4,
    "discriminator_depth": 2, "discriminator_width": 4, "feature_epochs": 1,
    "batch_size": 4, "epochs": 1, "learning_rate": 1e-3,
}


def tiny_config(backbone: str, **changes) -> dict:
    return SR_NET.config({**TINY, "backbone": backbone, **changes})


def tiny_model(backbone: str, scale: int = 2, **changes) -> torch.nn.Module:
    config = tiny_config(backbone, **changes)
    return SR_NET.build(SR_NET.architecture(config), in_channels=1, scale=scale)


def shape(model: torch.nn.Module, size: int, batch: int = 2) -> tuple[int, ...]:
    with torch.no_grad():
        return tuple(model.eval()(torch.rand(batch, 1, size, size)).shape)


@pytest.mark.parametrize("scale", [2, 4])
@pytest.mark.parametrize("backbone", NEW_BACKBONES)
def test_builds_for_scales_2_and_4(backbone, scale):
    model = tiny_model(backbone, scale)
    for size in (16, 15):
        assert shape(model, size) == (2, 1, scale * size, scale * size)


@pytest.mark.parametrize("backbone", ["srgan", "denoised_sisr"])
def test_every_sisr_backbone_inside_srgan_and_denoised_sisr(backbone):
    for inner in SISR_BACKBONES:
        assert shape(tiny_model(backbone, sisr_backbone=inner), 12) == (2, 1, 24, 24)


@pytest.mark.parametrize("backbone", ["rcan", "lapsrn", "vit_hybrid"])
def test_deeplense_sizes_and_upsamplers(backbone):
    """Dataset A (75 -> 150) and B (64 -> 128), with every upsampler; the ViT hybrid's patch
    sizes 4 and 8 do not divide 75 (padded to 76 and 80)."""
    changes = [{"upsampler": upsampler} for upsampler in UPSAMPLERS]
    if backbone == "vit_hybrid":
        changes.append({"patch_size": 8})
    for change in changes:
        model = tiny_model(backbone, **change)
        for size in (75, 64):
            assert shape(model, size, batch=1) == (1, 1, 2 * size, 2 * size)


def test_transformer_stage_keeps_the_size_and_checks_heads():
    stage = TransformerStage(4, tiny_config("vit_hybrid", patch_size=8)).eval()
    for height, width in ((75, 64), (8, 9), (3, 5)):
        x = torch.rand(2, 4, height, width)
        assert stage(x).shape == x.shape
    with pytest.raises(ValueError, match="embed_dim 10 must be a multiple of heads 4"):
        TransformerStage(4, tiny_config("vit_hybrid", embed_dim=10, heads=4))


def test_encoder_layer_computes_torchs_encoder_layer():
    """The attention written for ONNX gives torch's TransformerEncoderLayer's numbers and
    gradients (same weights), in training and in evaluation on its general path."""
    torch.manual_seed(0)
    ours = EncoderLayer(8, 2, 32, 0.0, activation="gelu", batch_first=True, norm_first=True)
    theirs = torch.nn.TransformerEncoderLayer(8, 2, 32, 0.0, activation="gelu",
                                              batch_first=True, norm_first=True)
    theirs.load_state_dict(ours.state_dict())
    x = torch.rand(3, 10, 8)
    torch.testing.assert_close(ours(x), theirs(x), rtol=0, atol=1e-6)
    ours(x).square().sum().backward()
    theirs(x).square().sum().backward()
    for a, b in zip(ours.parameters(), theirs.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=0, atol=1e-5)
    enabled = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with torch.no_grad():
            torch.testing.assert_close(ours.eval()(x), theirs.eval()(x), rtol=0, atol=1e-6)
    finally:
        torch.backends.mha.set_fastpath_enabled(enabled)


def test_lapsrn_pyramid_levels_and_bilinear_start():
    model = tiny_model("lapsrn", scale=4).eval()
    x = torch.rand(2, 1, 10, 10)
    with torch.no_grad():
        levels = model.pyramid(x)
        assert [level.shape[-1] for level in levels] == [20, 40]
        torch.testing.assert_close(levels[-1], model(x))
        for residual in model.body.residuals:  # no residuals: the image branch alone
            torch.nn.init.zeros_(residual.weight)
            torch.nn.init.zeros_(residual.bias)
        expected = x
        for _ in levels:  # bilinear x2 per level
            expected = F.interpolate(expected, scale_factor=2, mode="bilinear", align_corners=False)
        # equal away from the border (the transposed convolutions pad with zeros there)
        torch.testing.assert_close(model(x)[..., 4:-4, 4:-4], expected[..., 4:-4, 4:-4])
        assert not torch.allclose(model(x), expected)


def test_lapsrn_step_supervises_every_level():
    model = tiny_model("lapsrn", scale=4)
    step = training_step(tiny_config("lapsrn", loss="mse"), sr_loss("mse"), Degradation(4))
    step.setup(model, torch.empty(0), torch.empty(0), "cpu", 0)
    lr, hr = tiny_pairs(2, size=8, scale=4)
    with torch.no_grad():
        small, full = model.pyramid(lr)
        expected = F.mse_loss(full, hr) + F.mse_loss(small, F.avg_pool2d(hr, 2))
        assert float(step.loss(model, lr, hr, 1)) == pytest.approx(float(expected), rel=1e-6)


def test_lapsrn_needs_a_power_of_2_scale(tmp_path):
    with pytest.raises(ValueError, match="powers of 2"):
        tiny_model("lapsrn", scale=3)
    study = tmp_path / "lapsrn3.toml"
    study.write_text(
        '[study]\nname = "x"\nobjective = "sr"\n[objective]\nscale = 3\n'
        '[space]\nbackbone = { type = "categorical", choices = ["resnet", "srgan"] }\n'
        'sisr_backbone = { type = "categorical", choices = ["rcan", "lapsrn"] }\n'
    )
    with pytest.raises(SpecError, match=r"lapsrn3.toml: objective.scale: lapsrn upsamples by "):
        load_spec(study)
    study.write_text(study.read_text().replace('"lapsrn"', '"vit_hybrid"'))
    assert load_spec(study).objective_options["scale"] == 3


@pytest.mark.parametrize("discriminator", ["srgan", "patchgan"])
@pytest.mark.parametrize("batch_norm", [True, False])
def test_discriminators_give_logits(discriminator, batch_norm):
    config = tiny_config("srgan", discriminator=discriminator, discriminator_batch_norm=batch_norm,
                         discriminator_depth=3, discriminator_kernel_size=4)
    network = build_discriminator(config)
    logits = network(torch.rand(2, 1, 32, 32))
    assert logits.shape[0] == 2 and logits.shape[1] == 1
    if discriminator == "patchgan":
        assert logits.shape[-1] > 1  # one logit per patch
    has_norm = any(isinstance(m, torch.nn.BatchNorm2d) for m in network.modules())
    assert has_norm == batch_norm


def tiny_pairs(count: int = 8, size: int = 16, scale: int = 2, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    hr = torch.rand(count, 1, scale * size, scale * size, generator=generator)
    return F.avg_pool2d(hr, scale) + 0.05 * torch.randn(count, 1, size, size,
                                                         generator=generator), hr


def train_one_epoch(model, step, epochs: int = 1):
    lr, hr = tiny_pairs()
    validation = tiny_pairs(4, seed=1)
    return train_model(
        model, (lr.numpy(), hr.numpy()), loss_fn=step,
        validation_score=lambda m: -float(F.mse_loss(m(validation[0]), validation[1])),
        maximize=True, score_label="-mse", learning_rate=1e-3, batch_size=4, epochs=epochs,
        weight_decay=0.0, ctx=LocalContext(seed=1),
    )


@pytest.mark.parametrize("backbone", NEW_BACKBONES)
def test_trains_a_step_on_cpu(backbone):
    config = tiny_config(backbone, pretrain_epochs=0)
    torch.manual_seed(0)
    model = SR_NET.build(SR_NET.architecture(config), in_channels=1, scale=2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    step = training_step(config, sr_loss("l1"), Degradation(2))
    expected = {"lapsrn": PyramidStep, "srgan": AdversarialStep, "denoised_sisr": DenoiserStep}
    assert type(step) is expected.get(backbone, torch.nn.L1Loss)
    result = train_one_epoch(model, step)
    assert np.isfinite(result.best_validation_score) and result.epochs_run == 1
    after = result.model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert any(k.startswith("body.") for k in changed)
    if backbone == "denoised_sisr":  # trained before the loop, then frozen in eval mode
        assert any(k.startswith("denoiser.") for k in changed)
        assert not any(p.requires_grad for p in result.model.denoiser.parameters())
        assert not result.model.train().denoiser.training
    if backbone == "srgan":  # the discriminator took its own steps
        assert step.optimizer.state and step.features is not None


def test_srgan_pretraining_epochs_and_best_epoch_choice():
    config = tiny_config("srgan", pretrain_epochs=1, epochs=2, feature_weight=0.0)
    step = training_step(config, sr_loss("l1"), Degradation(2))
    assert [step.selectable(epoch) for epoch in (1, 2)] == [False, True]
    train_one_epoch(SR_NET.build(SR_NET.architecture(config), scale=2), step, epochs=1)
    assert not step.optimizer.state and step.features is None  # pre-training only: no GAN step
    everything = training_step({**config, "pretrain_epochs": 2}, sr_loss("l1"), Degradation(2))
    assert everything.selectable(1) and everything.selectable(2)  # no adversarial epoch at all


def test_the_denoisers_target_is_the_degraded_hr_image_in_lr_units():
    """A noiseless LR image is recovered exactly from the HR image; with noise, the estimate
    is much closer to it than the noisy image (the gain and offset fit averages noise out)."""
    operator = Degradation(2, psf_fwhm_pixels=2.0)
    hr = torch.rand(3, 1, 32, 32)
    clean = 0.7 * operator(hr) + 0.1
    torch.testing.assert_close(noiseless_estimate(clean, hr, operator), clean)
    noisy = clean + 0.05 * torch.randn(clean.shape, generator=torch.Generator().manual_seed(0))
    error = (noiseless_estimate(noisy, hr, operator) - clean).pow(2).mean().sqrt()
    assert error < 0.25 * (noisy - clean).pow(2).mean().sqrt()  # two fitted numbers per image


def test_default_step_is_the_plain_loss():
    """The loop's default step computes what the loop computed before steps existed."""
    torch.manual_seed(0)
    first = tiny_model("rcan")
    second = tiny_model("rcan")
    second.load_state_dict(first.state_dict())
    a = train_one_epoch(first, sr_loss("l1"))
    b = train_one_epoch(second, TrainingStep(sr_loss("l1")))
    assert a.history == b.history
    for key, value in a.model.state_dict().items():
        assert torch.equal(value, b.model.state_dict()[key])


def save_export(model: torch.nn.Module, spec: dict, folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "architecture.json").write_text(json.dumps(spec))
    torch.save(model.state_dict(), folder / "weights.pt")
    return folder


@pytest.mark.parametrize(("backbone", "scale", "inner"), [
    ("rcan", 4, None), ("lapsrn", 4, None), ("vit_hybrid", 2, None),
    ("srgan", 2, "vit_hybrid"), ("denoised_sisr", 4, "lapsrn"),
])
def test_export_round_trip_at_other_sizes(backbone, scale, inner, tmp_path):
    """architecture.json + weights.pt reload as the same network; TorchScript and ONNX, traced
    at the export's 32x32 example, give its images within 1e-5 at other sizes too."""
    config = tiny_config(backbone, **({"sisr_backbone": inner} if inner else {}))
    torch.manual_seed(3)
    model = SR_NET.build(SR_NET.architecture(config), in_channels=1, scale=scale).eval()
    spec = {"family": "sr_net", "version": SR_NET.version,
            "config": SR_NET.architecture(config), "in_channels": 1, "scale": scale}
    folder = save_export(model, spec, tmp_path / backbone)
    loaded = spaces.load(folder)
    x, input_axes, output_axes = example_input(spec)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torchscript(loaded, x, folder / "model.ts")
        onnx(loaded, x, (input_axes, output_axes), folder / "model.onnx")
        scripted = torch.jit.load(str(folder / "model.ts"))
    session = onnxruntime.InferenceSession(str(folder / "model.onnx"),
                                           providers=["CPUExecutionProvider"])
    for size in (24, 15):
        images = torch.rand(2, 1, size, size)
        with torch.no_grad():
            expected = model(images)
            assert expected.shape == (2, 1, scale * size, scale * size)
            torch.testing.assert_close(loaded(images), expected, rtol=0, atol=0)
            torch.testing.assert_close(scripted(images), expected, rtol=0, atol=1e-5)
        (output,) = session.run(None, {"input": images.numpy()})
        np.testing.assert_allclose(output, expected.numpy(), rtol=0, atol=1e-5)


def test_version_1_exports_load_with_the_version_1_network(tmp_path):
    """An export written before version 2 (no rcan/lapsrn/... keys) loads as it was."""
    version_1_keys = ("backbone", "kernel_size", "depth", "width", "shrink_width", "dilation",
                      "attention", "normalization", "activation", "upsampler", "global_skip")
    config = SR_NET.config({"depth": 1, "width": 4})
    model = SR_NET.build(SR_NET.architecture(config), scale=2).eval()
    spec = {"family": "sr_net", "version": 1, "in_channels": 1, "scale": 2,
            "config": {key: config[key] for key in version_1_keys}}
    loaded = spaces.load(save_export(model, spec, tmp_path / "v1"))
    x = torch.rand(1, 1, 12, 12)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)
