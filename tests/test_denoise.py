"""The denoising objective end to end at a tiny size: real lenstronomy data, real training,
the noise types' statistics, and launch -> export -> load through the engine."""

from __future__ import annotations

import json
import math
import textwrap
from pathlib import Path

import numpy as np
import optuna
import pytest
import torch
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from lensnas import spaces
from lensnas.objectives import objective_class
from lensnas.objectives.base import LocalContext, TrialPruned
from lensnas.objectives.denoise.data import add_noise, noise_rng, noisy_splits
from lensnas.objectives.denoise.objective import DenoiseObjective
from lensnas.spaces.dimensions import SpaceError, admits
from lensnas.spaces.errors import DataError, StudyFileError
from lensnas.spaces.sr.denoise import DENOISE_NET, NOISE_TYPES

STUDIES = Path(__file__).resolve().parent.parent / "studies"
TINY_DATA = {"source": "euclid", "lr_size": 16, "n_train": 16, "n_validation": 4, "n_test": 4}
TINY_TRAINING = {"epochs": 2, "batch_size": 8, "learning_rate": 3e-3}
TINY_NET = {"depth": 1, "width": 8}


def make(cache_dir: Path, **options) -> DenoiseObjective:
    return DenoiseObjective(
        {**TINY_DATA, **options}, TINY_TRAINING, seed=3, cache_dir=cache_dir, progress=False
    )


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> DenoiseObjective:
    objective = make(tmp_path_factory.mktemp("cache"))
    objective.prepare()
    return objective


# ----------------------------------------------------------------------------- the noise

FLAT = np.full((20, 1, 32, 32), 0.5, dtype=np.float32)


def noisy(noise_type: str, level: float, clean: np.ndarray = FLAT) -> np.ndarray:
    return add_noise(clean, noise_type, level, np.random.default_rng(0)).astype(np.float64)


def test_gaussian_noise_has_standard_deviation_level():
    difference = noisy("gaussian", 0.1) - FLAT
    assert difference.std() == pytest.approx(0.1, rel=0.02)
    assert abs(difference.mean()) < 0.003


def test_uniform_noise_has_half_width_level():
    difference = noisy("uniform", 0.2) - FLAT
    assert np.abs(difference).max() <= 0.2
    assert difference.std() == pytest.approx(0.2 / math.sqrt(3), rel=0.02)


def test_poisson_noise_keeps_the_mean_and_has_variance_clean_times_level():
    clean = np.concatenate([FLAT, FLAT * 0.2])
    values = noisy("poisson", 0.01, clean)
    for level_of_clean, half in ((0.5, values[:20]), (0.1, values[20:])):
        assert half.mean() == pytest.approx(level_of_clean, rel=0.01)
        assert half.var() == pytest.approx(level_of_clean * 0.01, rel=0.05)
    counts = values / 0.01
    assert np.allclose(counts, np.round(counts), atol=1e-3)  # whole photons of 0.01 each


def test_salt_and_pepper_replaces_a_fraction_level_of_pixels_by_0_or_1():
    values = noisy("salt_and_pepper", 0.05)
    salt, pepper = np.mean(values == 1.0), np.mean(values == 0.0)
    assert salt + pepper == pytest.approx(0.05, rel=0.05)
    assert salt == pytest.approx(pepper, rel=0.15)
    assert np.all((values == 0.5) | (values == 0.0) | (values == 1.0))


@pytest.mark.parametrize("noise_type", NOISE_TYPES)
def test_level_zero_is_no_noise(noise_type):
    clean = np.random.default_rng(1).random((2, 1, 12, 12)).astype(np.float32)
    assert np.array_equal(add_noise(clean, noise_type, 0.0, np.random.default_rng(0)), clean)


def test_noise_is_seeded_by_data_seed_type_level_and_split():
    clean = {split: FLAT[:2] for split in ("train", "validation", "test")}
    first = noisy_splits(clean, "gaussian", 0.1, data_seed=5)
    again = noisy_splits(clean, "gaussian", 0.1, data_seed=5)
    for split in clean:
        assert np.array_equal(first[split], again[split])
    assert not np.array_equal(first["train"], first["test"])  # splits never share noise
    for other in (
        noisy_splits(clean, "gaussian", 0.1, data_seed=6),
        noisy_splits(clean, "gaussian", 0.1000001, data_seed=5),
        noisy_splits(clean, "uniform", 0.1, data_seed=5),
    ):
        assert not np.array_equal(first["train"], other["train"])
    a, b = noise_rng(5, "poisson", 0.1, "test"), noise_rng(5, "poisson", 0.1, "test")
    assert a.random() == b.random()


# ----------------------------------------------------------------------------- the family


def test_registered_by_name():
    assert objective_class("denoise") is DenoiseObjective
    assert spaces.family("denoise_net") is DENOISE_NET is DenoiseObjective.family
    assert DenoiseObjective.DEFAULT_METRIC == "psnr_gain"
    assert DenoiseObjective.VALIDATION_SCORE.metric in DenoiseObjective.METRICS


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch.jit
def test_dncnn_preset_is_dncnn_s_and_keeps_any_image_size():
    model = DENOISE_NET.build(DENOISE_NET.config(DENOISE_NET.presets["dncnn"]))
    convolutions = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert len(convolutions) == 17 and convolutions[0].out_channels == 64
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules()) == 15
    model.eval()
    x = torch.rand(2, 1, 13, 21)
    with torch.no_grad():
        assert model(x).shape == x.shape
        traced = torch.jit.trace(model, torch.rand(1, 1, 32, 32))
        torch.testing.assert_close(traced(x), model(x))  # height and width stay dynamic


def test_residual_learning_predicts_the_noise():
    config = DENOISE_NET.config({"depth": 0, "width": 2})
    residual = DENOISE_NET.build(config)
    torch.nn.init.zeros_(residual.layers[-1].weight)
    torch.nn.init.zeros_(residual.layers[-1].bias)
    x = torch.rand(1, 1, 16, 16)
    assert torch.equal(residual(x), x)  # no predicted noise: the input itself
    direct = DENOISE_NET.build({**config, "residual": False})
    direct.load_state_dict(residual.state_dict())
    assert torch.equal(direct(x), torch.zeros_like(x))


# ----------------------------------------------------------------------------- the objective


def test_clean_images_are_normalised_and_the_noisy_input_baseline_is_scikit_images(prepared):
    data = prepared.data
    assert data["test_clean"].shape == (4, 1, 16, 16) and data["train_clean"].shape[0] == 16
    for split in ("train", "validation", "test"):
        clean = np.asarray(data[f"{split}_clean"])
        assert clean.min() == 0.0 and clean.max() == 1.0
        assert (np.asarray(data[f"{split}_noisy"]) - clean).std() == pytest.approx(0.1, rel=0.2)
    (baseline,) = prepared.baselines
    assert baseline.key == "noisy_input" and baseline.description
    clean = np.asarray(data["test_clean"], dtype=np.float64)[:, 0]
    noisy_input = np.clip(np.asarray(data["test_noisy"], dtype=np.float64), 0, 1)[:, 0]
    pairs = list(zip(clean, noisy_input))
    psnr = np.mean([peak_signal_noise_ratio(c, n, data_range=1.0) for c, n in pairs])
    ssim = np.mean([
        structural_similarity(c, n, data_range=1.0, gaussian_weights=True, sigma=1.5,
                              use_sample_covariance=False)
        for c, n in pairs
    ])
    assert baseline.metrics["psnr"] == pytest.approx(psnr, rel=1e-6)
    assert baseline.metrics["ssim"] == pytest.approx(ssim, rel=1e-5)
    attrs = prepared.trial_attrs()
    assert attrs["n_train"] == 16 and attrs["n_test"] == 4 and attrs["image_shape"] == [16, 16]
    assert attrs["noise_type"] == "gaussian" and attrs["noise_level"] == 0.1
    json.dumps(attrs)


def test_a_trial_gains_over_its_noisy_input(prepared, tmp_path):
    ctx = LocalContext(artifact_dir=tmp_path / "trial", seed=1)
    metrics = prepared.run_trial({**TINY_NET, "loss": "charbonnier"}, ctx)
    assert set(DenoiseObjective.METRICS) <= set(metrics)
    flat = {k: v for k, v in metrics.items() if not isinstance(v, dict)}
    assert all(isinstance(v, float) and math.isfinite(v) for v in flat.values())
    baseline = prepared.baselines[0].metrics
    assert metrics["psnr_gain"] == pytest.approx(metrics["psnr"] - baseline["psnr"])
    assert metrics["ssim_gain"] == pytest.approx(metrics["ssim"] - baseline["ssim"])
    assert metrics["noisy_input"] == baseline
    assert [step for step, _ in ctx.reports] == [1, 2]
    assert metrics["validation_score"] == pytest.approx(max(value for _, value in ctx.reports))
    architecture = json.loads((tmp_path / "trial" / "architecture.json").read_text())
    assert architecture["family"] == "denoise_net" and architecture["in_channels"] == 1
    assert "noise_type" not in architecture["config"]
    assert (tmp_path / "trial" / "diagnostics.png").stat().st_size > 1000


def test_a_trial_can_set_its_own_noise_reproducibly(prepared, tmp_path):
    params = {**TINY_NET, "noise_type": "salt_and_pepper", "noise_level": 0.05, "epochs": 1}
    metrics = prepared.run_trial(params, LocalContext(artifact_dir=tmp_path, seed=1))
    own = metrics["noisy_input"]
    assert own != prepared.baselines[0].metrics
    assert metrics["psnr_gain"] == pytest.approx(metrics["psnr"] - own["psnr"])
    assert list(prepared.cache_dir.glob("denoise-noise-*"))  # generated once, on disk
    # An objective whose [objective] noise is that trial's sees the very same noisy images.
    same = make(prepared.cache_dir, noise_type="salt_and_pepper", noise_level=0.05)
    same.prepare()
    trial_set = prepared.noisy_set("salt_and_pepper", 0.05)
    for split in ("train", "validation", "test"):
        assert np.array_equal(same.data[f"{split}_noisy"], trial_set.images[split])
        assert np.array_equal(same.data[f"{split}_clean"], prepared.data[f"{split}_clean"])
    assert same.baselines[0].metrics == pytest.approx(own)


def test_pruning_raises(prepared, tmp_path):
    ctx = LocalContext(artifact_dir=tmp_path, seed=1, prune_after=1)
    with pytest.raises(TrialPruned):
        prepared.run_trial(TINY_NET, ctx)
    assert len(ctx.reports) == 1


def test_baseline_table_at_other_noise_levels(prepared):
    rows = prepared.baseline_table([0.05, 0.2])
    assert [row.conditions for row in rows] == [{}, {"noise_level": 0.05}, {"noise_level": 0.2}]
    assert rows[1].metrics["psnr"] > rows[0].metrics["psnr"] > rows[2].metrics["psnr"]


def test_second_prepare_hits_the_cache(prepared):
    again = make(prepared.cache_dir)
    again.prepare()
    assert again.cache_hit is True and again.dataset_key == prepared.dataset_key
    assert again.trial_attrs() == prepared.trial_attrs()
    assert make(prepared.cache_dir, noise_level=0.2).dataset_key != prepared.dataset_key


@pytest.mark.parametrize(
    ("options", "key", "allowed"),
    [
        ({"noise_type": "pink"}, "objective.noise_type", ", ".join(NOISE_TYPES)),
        ({"noise_level": 1.5}, "objective.noise_level", "[0, 1.0]"),
        ({"noise_level": "high"}, "objective.noise_level", "a number"),
        ({"noise_sigma": 0.1}, "objective.noise_sigma", "allowed:"),
        ({"source": "jwst"}, "objective.source", "simulate, euclid, hst, folder"),
        ({"lr_size": 8}, "objective.lr_size", "at least 11"),
        ({"n_train": 0}, "objective.n_train", "1..10000000"),
        ({"einstein_radius": [2.0, 1.0]}, "objective.einstein_radius", "impossible range"),
        ({"folder": "somewhere"}, "objective.folder", 'source = "folder"'),
        ({"source": "folder"}, "objective.folder", "required"),
        ({"eval_batch_size": 0}, "objective.eval_batch_size", "at least 1"),
    ],
)
def test_bad_options_are_one_line_errors_naming_the_key(options, key, allowed):
    with pytest.raises(SpaceError) as error:
        DenoiseObjective.check_options(options)
    message = str(error.value)
    assert "\n" not in message and message.startswith(key) and allowed in message


def test_bad_noise_in_a_study_file_names_the_file_and_key(tmp_path):
    from lensnas.search.spec import load_spec

    for table, line, key in (
        ("objective", 'noise_type = "pink"', "objective.noise_type"),
        ("space", 'noise_type = { type = "categorical", choices = ["pink"] }', "space.noise_type"),
        ("space", 'noise_level = { type = "float", low = 0.1, high = 3.0 }', "space.noise_level"),
    ):
        path = tmp_path / "bad.toml"
        path.write_text(f'[study]\nname = "bad"\nobjective = "denoise"\n[{table}]\n{line}\n')
        with pytest.raises(StudyFileError) as error:
            load_spec(path)
        message = str(error.value)
        assert "\n" not in message and message.startswith(f"{path}: {key}")


def test_folder_of_clean_images(tmp_path):
    rng = np.random.default_rng(0)
    (tmp_path / "images").mkdir()
    for i in range(10):
        np.save(tmp_path / "images" / f"lens_{i:03d}.npy", rng.random((1, 12, 14)) * 50)
    objective = DenoiseObjective(
        {"source": "folder", "folder": str(tmp_path / "images"), "test_fraction": 0.2,
         "noise_type": "poisson", "noise_level": 0.02},
        {"epochs": 1, "batch_size": 4}, seed=0, cache_dir=tmp_path / "cache", progress=False,
    )
    objective.prepare()
    attrs = objective.trial_attrs()
    assert (attrs["n_train"], attrs["n_validation"], attrs["n_test"]) == (7, 1, 2)
    assert attrs["image_shape"] == [12, 14]
    metrics = objective.run_trial(TINY_NET, LocalContext(artifact_dir=tmp_path / "a"))
    assert math.isfinite(metrics["psnr_gain"])

    stacked = tmp_path / "stacked"
    stacked.mkdir()
    np.save(stacked / "train.npy", rng.random((6, 1, 16, 16)))
    np.save(stacked / "test.npy", rng.random((3, 16, 16)))
    objective = DenoiseObjective(
        {"source": "folder", "folder": str(stacked), "normalize": False}, {}, seed=0,
        cache_dir=tmp_path / "cache", progress=False,
    )
    objective.prepare()
    assert objective.split_sizes() == {"train": 5, "validation": 1, "test": 3}

    np.save(stacked / "validation.npy", rng.random((2, 16, 15)))
    with pytest.raises(DataError, match="validation.npy: shape"):
        DenoiseObjective({"source": "folder", "folder": str(stacked)}, {}, seed=1,
                         cache_dir=tmp_path / "cache", progress=False).prepare()
    with pytest.raises(SpaceError, match="objective.folder: .*contains no .npy files"):
        DenoiseObjective.check_options({"source": "folder", "folder": str(tmp_path / "cache")})


def test_quickstart_study_loads_and_admits_its_presets():
    from lensnas.search.spec import load_spec

    spec = load_spec(STUDIES / "denoise_quickstart.toml")
    assert spec.objective == "denoise" and spec.metrics == ("psnr_gain",)
    assert spec.presets == ("dncnn", "dncnn_small")
    for preset in spec.presets:
        preset_values = DENOISE_NET.presets[preset]
        assert admits(list(spec.space), preset_values, DENOISE_NET.config(spec.training)) is None
    assert not {"noise_type", "noise_level"} & {d.name for d in spec.space}


TINY_STUDY = """
[study]
name = "denoise-tiny"
objective = "denoise"
n_trials = 3
seed = 2
pruner = "none"
presets = ["dncnn_small"]

[objective]
source = "euclid"
lr_size = 16
n_train = 16
n_validation = 4
n_test = 4

[training]
epochs = 2
batch_size = 8

[space]
depth = {{ type = "int", low = 1, high = 4 }}
width = {{ type = "categorical", choices = [8, 16] }}
noise_level = {{ type = "categorical", choices = [{levels}] }}
"""


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch.jit
def test_launch_export_and_load(tmp_path):
    from lensnas.search import launch
    from lensnas.search.results.export import export_study

    study_file = tmp_path / "denoise.toml"
    study_file.write_text(textwrap.dedent(TINY_STUDY.format(levels="0.05, 0.1")))
    url = f"sqlite:///{tmp_path / 'x.db'}"
    study = launch(study_file, url, quiet=True)
    complete = study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))
    assert len(study.trials) == 3 and len(complete) == 3
    assert study.trials[0].user_attrs["preset"] == "dncnn_small"
    (baseline,) = study.user_attrs["baselines"]
    assert baseline["key"] == "noisy_input"
    for trial in complete:  # each trial's gain is over the noisy input of its own noise level
        own = trial.user_attrs["noisy_input"]
        assert trial.values[0] == pytest.approx(trial.user_attrs["psnr"] - own["psnr"])
        assert (own == baseline["metrics"]) == (trial.params["noise_level"] == 0.1)

    folder = export_study(study, url, tmp_path / "best", top=1)[0]
    assert (folder / "model.onnx").is_file()
    model = spaces.load(folder)
    scripted = torch.jit.load(str(folder / "model.ts"))
    x = torch.rand(3, 1, 24, 20)  # another size than the one traced: dynamic height and width
    with torch.no_grad():
        np.testing.assert_array_equal(scripted(x).numpy(), model(x).numpy())
    card = (folder / "MODEL_CARD.md").read_text()
    assert "noisy images" in card and "noisy input" in card
