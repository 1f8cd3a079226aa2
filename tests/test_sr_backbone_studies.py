"""SRGAN and DenoisedSISR end to end, at a tiny size: real lenstronomy data, real Optuna
studies in SQLite, real training, `lensnas export`, and a denoiser from a real denoise trial."""

from __future__ import annotations

import json
import math
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from optuna.trial import TrialState

from lensnas import spaces
from lensnas.objectives.base import LocalContext
from lensnas.objectives.denoise.objective import DenoiseObjective
from lensnas.search import launch
from lensnas.search.cli import main
from lensnas.search.results.export import study_objective
from lensnas.search.summary import best_trials
from lensnas.spaces.sr.net import SR_NET

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit:DeprecationWarning")

STUDY = """
[study]
name = "{name}"
objective = "sr"
metrics = ["psnr_gain"]
pruner = "none"
n_trials = 1
seed = 3

[objective]
n_train = 16
n_validation = 4
n_test = 4
lr_size = 16
lr_pixel_scale = 0.2
{objective}

[training]
epochs = 2
batch_size = 8
learning_rate = 2e-3

[space]
width = 4
depth = 1
{space}
"""


def write_study(folder: Path, name: str, space: str, objective: str = "") -> Path:
    """A one-trial SR study on 16 simulated 16x16 -> 32x32 pairs, 2 epochs."""
    path = folder / f"{name}.toml"
    path.write_text(textwrap.dedent(STUDY.format(
        name=name, space=textwrap.dedent(space), objective=objective)))
    return path


def test_srgan_study_trains_and_exports_the_generator(tmp_path):
    space = """
    backbone = "srgan"
    sisr_backbone = "resnet"
    discriminator = { type = "categorical", choices = ["srgan", "patchgan"] }
    discriminator_depth = 2
    discriminator_width = 4
    discriminator_kernel_size = 3
    discriminator_batch_norm = true
    adversarial_weight = 0.01
    pretrain_epochs = 1
    feature_weight = 0.1
    feature_epochs = 1
    """
    path = write_study(tmp_path, "tiny-srgan", space)
    url = f"sqlite:///{tmp_path / 'lensnas.db'}"
    study = launch(path, url, quiet=True, cache_dir=tmp_path / "cache")
    (trial,) = study.get_trials(states=(TrialState.COMPLETE,))
    assert trial.params["discriminator"] in ("srgan", "patchgan")
    assert math.isfinite(trial.user_attrs["psnr"]) and trial.user_attrs["epochs_run"] == 2
    assert main(["export", "tiny-srgan", "--storage", url, "-o", str(tmp_path / "best"),
                 "--top", "1"]) == 0
    best = best_trials(study, 1)[0]
    folder = tmp_path / "best" / f"trial-{best.number}"
    architecture = json.loads((folder / "architecture.json").read_text())
    assert architecture["config"]["backbone"] == "srgan"
    # the generator alone: the weights of the resnet it names, no discriminator
    generator = SR_NET.build(architecture["config"], in_channels=1, scale=2)
    weights = torch.load(folder / "weights.pt", weights_only=True)
    assert set(weights) == set(generator.state_dict())
    objective = study_objective(study, tmp_path / "cache")
    low_resolution = torch.from_numpy(np.array(objective.data["test_lr"], dtype=np.float32))
    with torch.no_grad():
        assert spaces.load(folder)(low_resolution).shape == (4, 1, 32, 32)
    assert "onnx max |difference|" in (folder / "MODEL_CARD.md").read_text()


@pytest.fixture
def denoiser_folder(tmp_path) -> Path:
    """The folder of a denoising network as `lensnas export` writes it (architecture.json and
    weights.pt), from a real trial of the denoise objective on noisy lenstronomy images."""
    objective = DenoiseObjective(
        {"source": "euclid", "lr_size": 16, "n_train": 8, "n_validation": 4, "n_test": 4},
        {"epochs": 1, "batch_size": 8}, seed=2, cache_dir=tmp_path / "cache", progress=False,
    )
    folder = tmp_path / "denoiser"
    objective.run_trial({"depth": 1, "width": 4}, LocalContext(artifact_dir=folder, seed=1))
    return folder


def test_denoised_sisr_with_an_exported_denoiser(tmp_path, denoiser_folder):
    objective = f'denoiser_folder = "{denoiser_folder}"'
    space = """
    backbone = "denoised_sisr"
    sisr_backbone = { type = "categorical", choices = ["srcnn", "lapsrn"] }
    """
    path = write_study(tmp_path, "tiny-dsisr", space, objective)
    url = f"sqlite:///{tmp_path / 'lensnas.db'}"
    study = launch(path, url, quiet=True, cache_dir=tmp_path / "cache")
    trials = study.get_trials(states=(TrialState.COMPLETE,))
    assert len(trials) == 1 and math.isfinite(trials[0].user_attrs["psnr"])
    assert main(["export", "tiny-dsisr", "--storage", url, "-o", str(tmp_path / "best"),
                 "--top", "1"]) == 0
    denoiser = spaces.load(denoiser_folder)
    exported_config = json.loads((denoiser_folder / "architecture.json").read_text())["config"]
    x = torch.rand(3, 1, 16, 16)
    for trial in trials:
        folder = tmp_path / "best" / f"trial-{trial.number}"
        architecture = json.loads((folder / "architecture.json").read_text())
        assert architecture["denoiser"] == exported_config
        model = spaces.load(folder)
        with torch.no_grad():  # the first stage is the exported denoiser, unchanged (frozen)
            torch.testing.assert_close(model.denoiser(x), denoiser(x), rtol=0, atol=0)
            assert model(x).shape == (3, 1, 32, 32)


def test_a_bad_denoiser_folder_is_one_line(tmp_path, capsys):
    space = 'backbone = "denoised_sisr"\nsisr_backbone = "srcnn"'
    for folder, expected in (
        (tmp_path / "missing", "no such exported folder"),
        (tmp_path, "no such architecture file"),
    ):
        path = write_study(tmp_path, "bad", space, f'denoiser_folder = "{folder}"')
        assert main(["launch", str(path), "--storage", f"sqlite:///{tmp_path / 'x.db'}"]) == 2
        error = capsys.readouterr().err.strip()
        assert len(error.splitlines()) == 1 and str(folder) in error and expected in error
    # an exported network of another family (an SR network) is not a denoiser
    sr_folder = tmp_path / "sr"
    sr_folder.mkdir()
    config = SR_NET.architecture(SR_NET.config({"depth": 1, "width": 4}))
    (sr_folder / "architecture.json").write_text(json.dumps(
        {"family": "sr_net", "version": 2, "config": config, "in_channels": 1, "scale": 2}))
    torch.save(SR_NET.build(config, scale=2).state_dict(), sr_folder / "weights.pt")
    path = write_study(tmp_path, "bad", space, f'denoiser_folder = "{sr_folder}"')
    assert main(["launch", str(path), "--storage", f"sqlite:///{tmp_path / 'x.db'}"]) == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and "holds a sr_net network" in error
    assert "denoise_net" in error
