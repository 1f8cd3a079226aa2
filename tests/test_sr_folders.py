"""A DeepLense user's SR data launches a study: a tiny real study (SQLite, torch training) on a
folder in each layout DeepLense distributes, and one line with exit status 2 for a bad folder or
a bad consistency setting."""

from __future__ import annotations

import math
import textwrap
from pathlib import Path

import numpy as np
import optuna
import pytest
from astropy.io import fits

from lensnas.search.cli import main

STUDY = """
[study]
name = "{name}"
objective = "sr"
metrics = {metrics}
pruner = "none"
n_trials = 1
seed = 3

[objective]
source = "folder"
folder = "{folder}"
test_fraction = 0.2
validation_fraction = 0.2
{objective}

[training]
epochs = 1
batch_size = 4
{training}

[space]
depth = 1
width = 4
{space}
"""


def write_study(folder: Path, data: Path, name: str, *, objective: str = "", training: str = "",
                space: str = "", metrics: str = '["psnr_gain"]') -> Path:
    path = folder / f"{name}.toml"
    path.write_text(textwrap.dedent(STUDY.format(
        name=name, folder=data, objective=objective, training=training, space=space,
        metrics=metrics)))
    return path


def lensed_pairs(count: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(N, 1, 12, 12) and (N, 1, 24, 24) images in [0, 1]: blobs, and their 2 x 2 means + noise."""
    rows, columns = np.mgrid[:24, :24]
    hr = np.empty((count, 1, 24, 24))
    for i in range(count):
        x, y, width = rng.uniform(6, 18), rng.uniform(6, 18), rng.uniform(2, 5)
        hr[i, 0] = np.exp(-((rows - y) ** 2 + (columns - x) ** 2) / (2 * width**2))
    lr = hr.reshape(count, 1, 12, 2, 12, 2).mean(axis=(3, 5))
    lr = np.clip(lr + rng.normal(0, 0.02, lr.shape), 0, 1)
    return lr, hr


def dataset_a(folder: Path) -> None:
    """Identical names: LR/sample{i}.npy (1, h, w) and HR/sample{i}.npy (1, 2h, 2w)."""
    lr, hr = lensed_pairs(10, np.random.default_rng(1))
    for side, images in (("LR", lr), ("HR", hr)):
        (folder / side).mkdir(parents=True)
        for i, image in enumerate(images):
            np.save(folder / side / f"sample{i}.npy", image)


def dataset_b(folder: Path) -> None:
    """Paired prefixes LR/LR_{i}.npy, HR/HR_{i}.npy, float32 with values up to about 1.02."""
    lr, hr = lensed_pairs(10, np.random.default_rng(2))
    for side, images in (("LR", lr), ("HR", hr)):
        (folder / side).mkdir(parents=True)
        for i, image in enumerate(images):
            np.save(folder / side / f"{side}_{i}.npy", (image * 1.02).astype(np.float32))


def dataset_stacked(folder: Path) -> None:
    """train_LR.npy / train_HR.npy (N, 1, H, W) and test_LR.npy / test_HR.npy."""
    folder.mkdir(parents=True)
    for split, count, seed in (("train", 8, 3), ("test", 3, 4)):
        lr, hr = lensed_pairs(count, np.random.default_rng(seed))
        np.save(folder / f"{split}_LR.npy", lr.astype(np.float32))
        np.save(folder / f"{split}_HR.npy", hr.astype(np.float32))


def dataset_fits(folder: Path) -> None:
    """FITS images LR/lens_{i}.fits and HR/lens_{i}.fits."""
    lr, hr = lensed_pairs(10, np.random.default_rng(5))
    for side, images in (("LR", lr), ("HR", hr)):
        (folder / side).mkdir(parents=True)
        for i, image in enumerate(images):
            fits.PrimaryHDU(image[0].astype(np.float32)).writeto(folder / side / f"lens_{i}.fits")


LAYOUTS = {
    "a": (dataset_a, "", ""),
    "b": (dataset_b, "normalize = false", ""),
    "stacked": (dataset_stacked, "normalize = false\nconsistency_psf_fwhm = 1.5",
                'consistency_weight = { type = "float", low = 0.5, high = 2.0 }'),
    "fits": (dataset_fits, "", ""),
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_each_deeplense_layout_launches_a_study(tmp_path, layout, capsys):
    make, objective, space = LAYOUTS[layout]
    make(tmp_path / "data")
    study_file = write_study(tmp_path, tmp_path / "data", layout, objective=objective, space=space)
    storage = f"sqlite:///{tmp_path / 'sr.db'}"
    assert main(["launch", str(study_file), "--storage", storage, "--quiet"]) == 0, (
        capsys.readouterr().err)
    study = optuna.load_study(study_name=layout, storage=storage)
    (trial,) = study.trials
    assert trial.state == optuna.trial.TrialState.COMPLETE
    attrs = trial.user_attrs
    for key in ("psnr", "ssim", "psnr_gain", "flux_error", "consistency_rms"):
        assert math.isfinite(attrs[key]), key
    assert "consistency_chi" not in attrs  # a folder's LR noise is unknown
    assert [row["key"] for row in study.user_attrs["baselines"]] == ["bicubic", "bilinear"]
    assert study.user_attrs["n_test"] == (3 if layout == "stacked" else 2)
    degradation = study.user_attrs["degradation"]
    assert degradation == {"psf_fwhm_hr_pixels": 1.5 if layout == "stacked" else 0.0, "binning": 2}
    if layout == "b":  # float32 values up to 1.02, kept as they are: the excess is clipped
        assert study.user_attrs["clipped_values"] > 0
    if layout == "stacked":
        assert 0.5 <= trial.params["consistency_weight"] <= 2.0


def launch_error(tmp_path: Path, study_file: Path, capsys) -> str:
    code = main(["launch", str(study_file), "--storage", f"sqlite:///{tmp_path / 'x.db'}",
                 "--quiet"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.count("\n") == 0 and "Traceback" not in err, err
    return err


def test_a_bad_folder_is_one_line_naming_the_file(tmp_path, capsys):
    data = tmp_path / "b"
    dataset_b(data)
    (data / "HR" / "HR_7.npy").unlink()
    err = launch_error(tmp_path, write_study(tmp_path, data, "missing"), capsys)
    assert str(data / "LR" / "LR_7.npy") in err and "has no HR partner" in err

    np.save(data / "HR" / "HR_7.npy", np.zeros((1, 24, 25), dtype=np.float32))
    err = launch_error(tmp_path, write_study(tmp_path, data, "shape"), capsys)
    assert str(data / "HR" / "HR_7.npy") in err and "is not 2 x the LR shape" in err

    fits_data = tmp_path / "f"
    dataset_fits(fits_data)
    (fits_data / "LR" / "lens_3.fits").write_bytes(b"not a FITS file at all")
    err = launch_error(tmp_path, write_study(tmp_path, fits_data, "unreadable"), capsys)
    assert str(fits_data / "LR" / "lens_3.fits") in err and "unreadable FITS file" in err


def test_bad_consistency_settings_are_one_line(tmp_path, capsys):
    data = tmp_path / "a"
    dataset_a(data)
    err = launch_error(tmp_path, write_study(tmp_path, data, "typo",
                                             training="consistency_wieght = 1.0"), capsys)
    assert "training.consistency_wieght" in err and "did you mean 'consistency_weight'" in err
    err = launch_error(tmp_path, write_study(tmp_path, data, "type",
                                             training='consistency_weight = "high"'), capsys)
    assert "training.consistency_weight" in err and "must be a number" in err
    err = launch_error(tmp_path, write_study(
        tmp_path, data, "range", space='consistency_weight = { type = "float", low = -1.0, '
        'high = 1.0 }'), capsys)
    assert "space.consistency_weight" in err and "outside the allowed range 0.0..1000.0" in err
    err = launch_error(tmp_path, write_study(tmp_path, data, "chi",
                                             metrics='["consistency_chi"]'), capsys)
    assert "study.metrics" in err and "consistency_rms" in err
