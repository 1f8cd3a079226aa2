"""Training recipes as searchable dimensions: D4 symmetry (checked against GalSim), the
symmetrized network, schedules, optimizers, weight averaging and fresh noise, reproducible
under a seed and validated like every other key."""

from __future__ import annotations

import textwrap
from dataclasses import replace

import galsim
import numpy as np
import pytest
import torch

from lensnas.objectives import LocalContext
from lensnas.objectives.shear.data import GalaxySimulation
from lensnas.objectives.shear.objective import ShearObjective
from lensnas.search.cli import main
from lensnas.search.results.export import onnx, torchscript
from lensnas.spaces.d4 import ELEMENTS, D4Symmetrized, shear_signs, transform_images
from lensnas.spaces.shear.cnn import SHEAR_CNN, build_shear_cnn


def _render(size: int, g1: float, g2: float, psf: galsim.GSObject) -> np.ndarray:
    galaxy = galsim.Exponential(half_light_radius=0.5).shear(g1=0.2, g2=0.0)  # not round
    galaxy = galaxy.rotate(0 * galsim.degrees).shear(g1=g1, g2=g2)
    return galsim.Convolve(galaxy, psf).drawImage(nx=size, ny=size, scale=0.2).array


@pytest.mark.parametrize("size", [25, 24])
@pytest.mark.parametrize("psf", [galsim.Gaussian(fwhm=0.9), galsim.Moffat(beta=2.5, fwhm=0.8)])
def test_d4_label_signs_match_galsim_renderings(size, psf):
    """A stamp under each group element equals GalSim's rendering of the same galaxy (here
    with an intrinsic shape) whose total shear is transformed by the element's signs."""
    base = galsim.Exponential(half_light_radius=0.5)
    for element in range(ELEMENTS):
        s1, s2 = shear_signs(element)
        # the intrinsic shape (0.2, 0) transforms like any shear: combine and transform both
        original = base.shear(g1=0.2, g2=0.05).shear(g1=0.03, g2=-0.04)
        expected_galaxy = base.shear(g1=s1 * 0.2, g2=s2 * 0.05).shear(g1=s1 * 0.03, g2=s2 * -0.04)
        image = galsim.Convolve(original, psf).drawImage(nx=size, ny=size, scale=0.2).array
        expected = galsim.Convolve(expected_galaxy, psf).drawImage(nx=size, ny=size, scale=0.2).array
        moved = transform_images(torch.from_numpy(image.astype(np.float64)), element).numpy()
        np.testing.assert_allclose(moved, expected, rtol=0, atol=1e-6 * image.max())


def test_quarter_turn_flips_both_components_and_transpose_flips_g1():
    assert shear_signs(1) == (-1.0, -1.0) and shear_signs(4) == (-1.0, 1.0)
    assert shear_signs(0) == (1.0, 1.0) and shear_signs(2) == (1.0, 1.0)


def _symmetrized(size: int = 25) -> torch.nn.Module:
    config = SHEAR_CNN.config({"depth": 2, "width": 4, "symmetrize": True})
    torch.manual_seed(0)
    model = build_shear_cnn(config, 1, size, 300.0, 0.1)  # input scale ~ 1 / pixel std
    assert isinstance(model, D4Symmetrized)
    return model.eval().double()


def test_a_symmetrized_network_is_exactly_equivariant():
    model = _symmetrized()
    round_galaxy = galsim.Convolve(galsim.Exponential(half_light_radius=0.5), galsim.Gaussian(fwhm=0.9))
    stamp = round_galaxy.drawImage(nx=25, ny=25, scale=0.2, dtype=np.float64).array
    with torch.no_grad():
        zero = model(torch.from_numpy(stamp.astype(np.float64))[None, None])
        sheared = torch.from_numpy(
            _render(25, 0.05, -0.03, galsim.Gaussian(fwhm=0.9)).astype(np.float64))[None, None]
        g = model(sheared)[0]
        assert g.abs().max() > 1e-5  # a sheared stamp gives a nonzero shear
        # a round galaxy at g = 0 gives (0, 0), to the (double) precision of its rendering
        assert torch.all(zero.abs() < 1e-10 * g.abs().max()), (zero, g)
        for element in range(ELEMENTS):
            signs = torch.tensor(shear_signs(element), dtype=g.dtype)
            moved = model(transform_images(sheared, element))[0]
            torch.testing.assert_close(moved, g * signs, rtol=0, atol=1e-12 * float(g.abs().max()))


def test_the_export_of_a_symmetrized_network_includes_the_average(tmp_path):
    model = _symmetrized().float()
    x = torch.randn(2, 1, 25, 25)
    with torch.no_grad():
        expected = model(x)
        traced = torchscript(model, x, tmp_path / "model.ts")
        torch.testing.assert_close(traced(transform_images(x, 1)), -expected, rtol=0, atol=1e-6)
        onnx(model, x, ({0: "batch"}, {0: "batch"}), tmp_path / "model.onnx")
    import onnxruntime

    session = onnxruntime.InferenceSession(str(tmp_path / "model.onnx"))
    (output,) = session.run(None, {"input": x.numpy()})
    np.testing.assert_allclose(output, expected.numpy(), atol=1e-6)


SMALL = {"n_train": 96, "n_validation": 32, "n_test": 32, "stamp_size": 21, "pixel_scale": 0.2,
         "half_light_radius_min": 0.4, "half_light_radius_max": 0.6, "reference": "none",
         "noise_sigma": 1e-4}
TINY = {"depth": 1, "width": 4, "epochs": 3, "batch_size": 32, "learning_rate": 3e-3}
RECIPES = [
    {"lr_schedule": "cosine", "warmup_fraction": 0.2, "ema_decay": 0.9},
    {"lr_schedule": "onecycle", "optimizer": "sgd", "momentum": 0.8, "grad_clip": 1.0},
    {"lr_schedule": "plateau", "fresh_noise": True, "augment": "d4", "symmetrize": True},
]


@pytest.fixture(scope="module")
def shear(tmp_path_factory) -> ShearObjective:
    objective = ShearObjective(SMALL, {}, seed=5, cache_dir=tmp_path_factory.mktemp("cache"),
                               progress=False)
    objective.prepare()
    return objective


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda r: r["lr_schedule"])
def test_recipes_train_and_are_reproducible_under_a_seed(shear, recipe, tmp_path):
    def run(seed: int) -> dict:
        ctx = LocalContext(artifact_dir=tmp_path / str(seed), seed=seed)
        metrics = shear.run_trial({**TINY, **recipe}, ctx)
        return {"rmse": metrics["rmse"], "reports": [v for _, v in ctx.reports]}

    first, again, other = run(1), run(1), run(2)
    assert first == again  # bit-identical under the same trial seed
    assert first["rmse"] != other["rmse"]
    assert len(first["reports"]) == 3 and all(np.isfinite(first["reports"]))


def test_fresh_noise_trains_on_noiseless_renderings_plus_new_noise(shear):
    inputs, labels = shear.training_data({"fresh_noise": True})
    clean = np.asarray(inputs[np.arange(8)])[:, 0]
    noisy = np.asarray(shear.inputs("train")[np.arange(8)])[:, 0]
    residual = noisy - clean  # exactly the stored noise
    assert abs(residual.std() / SMALL["noise_sigma"] - 1) < 0.05
    simulation = replace(shear.simulation, noise_sigma=0.0)
    assert isinstance(simulation, GalaxySimulation)
    transform = shear.batch_transform({"fresh_noise": True})
    x = torch.from_numpy(clean[:, None].copy())
    generator = torch.Generator().manual_seed(0)
    first, _ = transform(x, torch.from_numpy(np.asarray(labels[:8])), generator)
    second, _ = transform(x, torch.from_numpy(np.asarray(labels[:8])), generator)
    assert not torch.equal(first, second)  # new noise for every batch
    assert abs(float((first - x).std()) / SMALL["noise_sigma"] - 1) < 0.1


BAD = [
    ('lr_shedule = "cosine"', "training.lr_shedule", "did you mean 'lr_schedule'"),
    ('optimizer = "adam"', "training.optimizer", "allowed"),
    ("ema_decay = 1.5", "training.ema_decay", "outside the allowed range"),
    ('augment = "d4"\n', "training.augment", "D4-symmetric PSF"),
    ("[space]\nsymmetrize = true", "space.symmetrize", "D4-symmetric PSF"),
    ("[space]\npsf_branch = true", "space.psf_branch", "psf_channel = true"),
]


@pytest.mark.parametrize("line, key, message", BAD)
def test_bad_recipe_settings_are_one_line_errors(tmp_path, capsys, line, key, message):
    study = tmp_path / "s.toml"
    study.write_text(textwrap.dedent("""
        [study]
        name = "r"
        objective = "shear"
        [objective]
        psf_g1 = 0.05
        [training]
    """) + line + "\n")
    assert main(["launch", str(study), "--storage", f"sqlite:///{tmp_path / 'x.db'}"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and key in err and message in err, err


def test_check_input_warns_about_stamps_unlike_the_training_data(shear):
    from lensnas.spaces import check_input

    spec = shear.architecture(TINY)
    assert spec["input"]["total_flux"] == [1.0, 1.0]
    stamps = np.asarray(shear.inputs("test")[np.arange(4)])
    assert check_input(spec, stamps) == []
    (warning,) = check_input(spec, stamps * 60.0)  # counts instead of unit flux
    assert "4 of 4 stamps" in warning and "unit flux" in warning
    (shape,) = check_input(spec, stamps[:, :, :20])
    assert "(N, 1, 21, 21)" in shape
