"""Uncertainty exports (issue 14, part 3): deep ensembles of the top trials or of training seeds,
MC dropout with fixed masks, their calibration on the test set beside the reference estimator's
per-galaxy errors, and `lensnas predict` writing the sigmas."""

from __future__ import annotations

import copy
import csv
import re
import shutil

import numpy as np
import onnxruntime
import optuna
import pytest
import torch
from torch import nn

from lensnas import spaces
from lensnas.objectives.base import LocalContext
from lensnas.objectives.shear.uncertainty import resampled_sigmas
from lensnas.search import launch
from lensnas.search.artifacts import artifact_store, download_trial_artifacts
from lensnas.search.cli import main
from lensnas.search.results.export import study_objective, study_spec
from lensnas.search.results.report import build_report
from lensnas.search.results.uncertainty import GAUSSIAN_WITHIN, member_seeds
from lensnas.search.summary import best_trials
from lensnas.spaces.d4 import shear_signs, transform_images
from lensnas.spaces.dimensions import suggest
from lensnas.spaces.ensemble import Ensemble, FixedMasks, MCDropout
from lensnas.spaces.loading import build
from lensnas.spaces.shear.cnn import SHEAR_CNN, build_shear_cnn
from tests.conftest import write_tiny_shear_study
from tests.test_export import TinyStudy, tiny_shear_study

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit:DeprecationWarning")


def copied_tiny_shear_study(tmp_path_factory: pytest.TempPathFactory, name: str) -> TinyStudy:
    """A copy of the shared tiny shear study (database, artifacts, dataset cache), so that what
    a test module stores with it stays in that module."""
    shared = tiny_shear_study(tmp_path_factory)
    folder = tmp_path_factory.mktemp(name) / "study"
    shutil.copytree(shared.folder, folder)
    url = f"sqlite:///{folder / 'lensnas.db'}"
    return TinyStudy(optuna.load_study(study_name="tiny5", storage=url), url, folder,
                     folder / "cache")


def trial_network(study: TinyStudy, trial: optuna.trial.FrozenTrial, folder) -> nn.Module:
    download_trial_artifacts(trial, artifact_store(study.url), folder)
    return spaces.load(folder)


def reloaded(study: TinyStudy) -> optuna.Study:
    return optuna.load_study(study_name=study.study.study_name, storage=study.url)


@pytest.fixture(scope="module")
def study(tmp_path_factory) -> TinyStudy:
    return copied_tiny_shear_study(tmp_path_factory, "uncertainty")


@pytest.fixture(scope="module")
def ensemble(study, tmp_path_factory):
    """``lensnas export tiny5 --ensemble 2``: the folder."""
    output = tmp_path_factory.mktemp("ensemble-export")
    assert main(["export", "tiny5", "--storage", study.url, "--ensemble", "2", "-o", str(output),
                 "--cache-dir", str(study.cache_dir)]) == 0
    return output / "ensemble-top-2"


def test_ensemble_returns_the_members_mean_and_spread(study, ensemble, tmp_path):
    objective = study_objective(study.study, study.cache_dir)
    stamps = torch.from_numpy(objective.inputs("test")[np.arange(16)])
    members = [trial_network(study, trial, tmp_path / str(trial.number))
               for trial in best_trials(study.study, 2)]
    model = spaces.load(ensemble)
    with torch.no_grad():
        outputs = torch.stack([member(stamps) for member in members]).double()
        got = model(stamps)
        scripted = torch.jit.load(str(ensemble / "model.ts"))(stamps).numpy()
    np.testing.assert_allclose(got[:, :2].numpy(), outputs.mean(0).numpy(), rtol=1e-5, atol=1e-9)
    np.testing.assert_allclose(got[:, 2:].numpy(), outputs.std(0, correction=1).numpy(),
                               rtol=1e-4, atol=1e-9)
    assert (got[:, 2:] > 0).all()
    np.testing.assert_allclose(scripted, got.numpy(), rtol=0, atol=1e-7)
    session = onnxruntime.InferenceSession(str(ensemble / "model.onnx"),
                                           providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(session.run(None, {"input": stamps.numpy()})[0], got.numpy(),
                               rtol=1e-4, atol=1e-7)


def test_ensemble_calibration_is_in_the_card_the_study_and_the_report(study, ensemble):
    objective = study_objective(study.study, study.cache_dir)
    inputs, truth = objective.examples("test")
    model = spaces.load(ensemble)
    with torch.no_grad():
        outputs = model(torch.from_numpy(inputs[np.arange(len(inputs))])).double().numpy()
    error, sigma = outputs[:, :2] - truth, outputs[:, 2:]
    within = {k: np.mean(np.abs(error) <= k * sigma) for k in GAUSSIAN_WITHIN}
    ratio = np.sqrt(np.mean(sigma**2)) / np.sqrt(np.mean(error**2))

    record = reloaded(study).user_attrs["uncertainty"]["ensemble-top-2"]
    stored = record["calibration"]
    assert stored["n"] == len(truth)
    assert stored["within_1sigma"] == pytest.approx(within[1])
    assert stored["within_2sigma"] == pytest.approx(within[2])
    assert stored["scatter_ratio"] == pytest.approx(ratio, rel=1e-4)
    assert record["members"] == [f"trial {t.number}" + (f" (preset {t.user_attrs['preset']})"
                                 if "preset" in t.user_attrs else "")
                                 for t in best_trials(study.study, 2)]
    # the reference's per-galaxy errors, by noise resampling, calibrated on the same galaxies
    reference = record["reference"]
    assert reference["name"] == "hsm" and "re-measurements" in reference["description"]
    assert 0 < reference["calibration"]["within_1sigma"] <= reference["calibration"]["within_2sigma"]
    assert reference["calibration"]["sigma_rms"] > 0

    card = (ensemble / "MODEL_CARD.md").read_text()
    row = next(line for line in card.splitlines() if line.startswith("| this export |"))
    assert f"| {100 * within[1]:.1f}% | {100 * within[2]:.1f}% |" in row
    assert "| hsm (reference) |" in card and "Gaussian 68.3%" in card
    assert "g1, g2, sigma_g1, sigma_g2" in card

    report = build_report(reloaded(study), study.url)
    table = report.split('id="calibration-table"', 1)[1].split("</table>", 1)[0]
    assert f"{100 * within[1]:.1f}%" in table and "hsm (reference)" in table


def test_predict_writes_the_sigmas(ensemble, study, tmp_path):
    objective = study_objective(study.study, study.cache_dir)
    stamps = np.asarray(objective.data["test.images"][:5], dtype=np.float32)
    np.save(tmp_path / "stamps.npy", stamps)
    assert main(["predict", str(ensemble), str(tmp_path / "stamps.npy"), "-o",
                 str(tmp_path / "shears.csv"), "--quiet"]) == 0
    with open(tmp_path / "shears.csv", newline="") as handle:
        rows = list(csv.reader(handle))
    assert rows[0] == ["file", "index", "g1", "g2", "sigma_g1", "sigma_g2"]
    with torch.no_grad():
        expected = spaces.load(ensemble)(torch.from_numpy(stamps[:, None])).numpy()
    np.testing.assert_allclose(np.array([r[2:] for r in rows[1:]], dtype=float), expected,
                               rtol=1e-6)


def test_seeds_export_retrains_the_trial_with_the_objectives_own_code(study, tmp_path):
    trial = best_trials(study.study, 1)[0]
    assert main(["export", "tiny5", "--storage", study.url, "--seeds", "2", "-o", str(tmp_path),
                 "--cache-dir", str(study.cache_dir)]) == 0
    folder = tmp_path / f"trial-{trial.number}-seeds-2"
    model = spaces.load(folder)
    assert isinstance(model, Ensemble) and len(model.members) == 2
    own = trial_network(study, trial, tmp_path / "own")
    for key, value in own.state_dict().items():  # member 0 is the trial itself
        assert torch.equal(model.members[0].state_dict()[key], value)
    # member 1: the trial's configuration trained again under the next seed, as a trial is
    (seed,) = member_seeds(trial, 1)
    objective = study_objective(study.study, study.cache_dir)
    params = suggest(optuna.trial.FixedTrial(trial.params), list(study_spec(study.study).space))
    metrics = objective.run_trial(params, LocalContext(artifact_dir=tmp_path / "again", seed=seed))
    again = spaces.load(tmp_path / "again")
    for key, value in again.state_dict().items():
        assert torch.equal(model.members[1].state_dict()[key], value)
    assert not torch.equal(model.members[1].state_dict()["features.0.conv.weight"],
                           own.state_dict()["features.0.conv.weight"])
    card = (folder / "MODEL_CARD.md").read_text()
    assert f"| trial {trial.number} retrained, seed {seed} | {seed} | {metrics['rmse']:.4g} |" in card
    assert "within 1 sigma" in card


def test_mc_dropout_export_is_deterministic_and_averages_its_masks(study, tmp_path):
    path = write_tiny_shear_study(tmp_path, name="tinymc", n_trials=1, epochs=1,
                                  objective_extra='reference = "hsm"')
    path.write_text(path.read_text() + "dropout = 0.3\n")  # fixed in [space]
    mc = launch(path, study.url, quiet=True, cache_dir=study.cache_dir)
    trial = best_trials(mc, 1)[0]
    assert main(["export", "tinymc", "--storage", study.url, "--mc-dropout", "4", "-o",
                 str(tmp_path / "out"), "--cache-dir", str(study.cache_dir)]) == 0
    folder = tmp_path / "out" / f"trial-{trial.number}-mc-dropout-4"
    model = spaces.load(folder)
    assert isinstance(model, MCDropout)
    stamps = torch.from_numpy(study_objective(mc, study.cache_dir).inputs("test")[np.arange(8)])
    with torch.no_grad():
        first, second = model(stamps), spaces.load(folder)(stamps)
        scripted = torch.jit.load(str(folder / "model.ts"))(stamps)
        # by hand: the trial's network with each mask in turn in place of its dropout
        (masks,) = [m.masks for m in model.modules() if isinstance(m, FixedMasks)]
        assert masks.shape[0] == 4 and (masks == 0).any()
        torch.testing.assert_close(masks[masks > 0], torch.full_like(masks[masks > 0], 1 / 0.7))
        network = trial_network(study, trial, tmp_path / "trial")
        samples = []
        for mask in masks:
            thinned = copy.deepcopy(network)
            (name,) = [n for n, m in thinned.named_modules() if isinstance(m, nn.Dropout)]
            parent, _, child = name.rpartition(".")
            setattr(thinned.get_submodule(parent), child, FixedMasks(mask[None]))
            samples.append(thinned(stamps))
    samples = torch.stack(samples)
    assert torch.equal(first, second)
    np.testing.assert_allclose(first[:, :2].numpy(), samples.mean(0).numpy(), rtol=1e-5, atol=1e-9)
    np.testing.assert_allclose(first[:, 2:].numpy(), samples.std(0).numpy(), rtol=1e-4, atol=1e-9)
    assert (first[:, 2:] > 0).all()
    np.testing.assert_allclose(scripted.numpy(), first.numpy(), rtol=0, atol=1e-7)
    assert "MC dropout of trial" in (folder / "MODEL_CARD.md").read_text()


def test_mc_dropout_of_a_network_without_dropout_is_one_line(study, tmp_path, capsys):
    assert main(["export", "tiny5", "--storage", study.url, "--mc-dropout", "4", "-o",
                 str(tmp_path), "--cache-dir", str(study.cache_dir)]) == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and "has no dropout (dropout = 0)" in error
    assert main(["export", "tiny5", "--storage", study.url, "--ensemble", "1"]) == 2
    assert "--ensemble: must be at least 2" in capsys.readouterr().err
    assert main(["export", "tiny5", "--storage", study.url, "--ensemble", "0", "-o",
                 str(tmp_path)]) == 2  # not a plain export of the top trials
    assert "--ensemble: must be at least 2 (a spread needs two), got 0" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def _symmetrized(**config) -> dict:
    return {"family": "shear_cnn", "version": SHEAR_CNN.version, "image_size": 17,
            "config": SHEAR_CNN.architecture({"width": 4, "dense_units": 8, "symmetrize": True,
                                              **config})}


@pytest.mark.parametrize("samples", [0, 3])
def test_uncertainty_networks_keep_the_d4_symmetry(samples):
    torch.manual_seed(0)
    members = [_symmetrized(dropout=0.5)] if samples else [_symmetrized(), _symmetrized(head="gap")]
    spec = {"family": "shear_cnn_ensemble", "version": 1, "image_size": 17,
            "config": {"members": members, "mc_dropout_samples": samples, "seed": 1}}
    model = build(spec).eval()
    x = torch.randn(4, 1, 17, 17)
    with torch.no_grad():
        y = model(x)
        for element in range(8):
            moved = model(transform_images(x, element))
            signs = torch.tensor(shear_signs(element))
            torch.testing.assert_close(moved[:, :2], y[:, :2] * signs, rtol=1e-5, atol=1e-7)
            torch.testing.assert_close(moved[:, 2:], y[:, 2:], rtol=1e-5, atol=1e-7)


def test_dropout_dimension_leaves_existing_networks_unchanged():
    preset = SHEAR_CNN.config(SHEAR_CNN.presets["shearnet_cnn"])
    assert preset["dropout"] == 0.0
    plain = build_shear_cnn(preset, image_size=25)
    assert not any(isinstance(m, nn.Dropout) for m in plain.modules())
    dropped = build_shear_cnn({**preset, "dropout": 0.2}, image_size=25)
    assert isinstance(dropped.head[-2], nn.Dropout) and dropped.head[-2].p == 0.2
    assert [k for k in plain.state_dict()] == [re.sub(r"head\.4", "head.3", k)
                                             for k in dropped.state_dict()]
    # a version-2 export (no dropout key) loads as the same network, without dropout
    version_2 = {"family": "shear_cnn", "version": 2, "image_size": 25,
                 "config": {k: v for k, v in SHEAR_CNN.architecture({}).items() if k != "dropout"}}
    assert not any(isinstance(m, nn.Dropout) for m in build(version_2).modules())
    assert [name for name, _ in dropped.blocks()] == ["block 1", "block 2", "dense hidden"]


def test_reference_errors_grow_with_the_noise(study):
    objective = study_objective(study.study, study.cache_dir)
    images, psf = np.asarray(objective.data["test.images"][:12]), objective.data["psf_image"]
    low, high = (resampled_sigmas("hsm", images, psf, objective.simulation.pixel_scale, sigma,
                                  seed=0) for sigma in (1e-5, 4e-5))
    assert np.isfinite(low).all() and (low > 0).all()
    assert 2.5 < np.median(high / low) < 6  # linear in the noise, to first order
