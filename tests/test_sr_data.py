"""SR data: deterministic lenstronomy simulations, disjoint splits, validated user folders in
DeepLense's layouts (identical names, LR_{i}/HR_{i}, stacks, FITS)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from lensnas.objectives.sr.data import (
    POPULATION_DEFAULTS,
    LensSimulator,
    SimulatedPair,
    block_sum,
    clip_to_unit_range,
    folder_dataset,
    folder_pairs,
    instrument_preset,
    normalize_per_image,
    normalized_pair,
    pair_key,
    simulate_dataset,
    simulation_config,
    split_rng,
)
from lensnas.objectives.sr.objective import SRObjective
from lensnas.spaces.dimensions import SpaceError
from lensnas.spaces.errors import DataError

COUNTS = {"train": 6, "validation": 3, "test": 3}


def small_config(**overrides) -> dict:
    options = {
        "source": "simulate",
        "scale": 2,
        "hr_psf_fwhm": 0.0,
        "supersampling": 1,
        **POPULATION_DEFAULTS,
        "lr_size": 24,
        "lr_pixel_scale": 0.15,
    }
    options.update(overrides)
    return simulation_config(options)


def test_simulation_is_deterministic_under_a_seed():
    config = small_config()
    first = simulate_dataset(config, COUNTS, data_seed=11, progress=False)
    second = simulate_dataset(config, COUNTS, data_seed=11, progress=False)
    other = simulate_dataset(config, COUNTS, data_seed=12, progress=False)
    assert set(first) == {f"{s}_{r}" for s in COUNTS for r in ("lr", "hr", "lr_noise")}
    for key, array in first.items():
        assert np.array_equal(array, second[key])
        assert not np.array_equal(array, other[key])


def test_shapes_normalisation_and_physics():
    arrays = simulate_dataset(small_config(), COUNTS, data_seed=3, progress=False)
    assert arrays["train_lr"].shape == (6, 1, 24, 24) and arrays["train_hr"].shape == (6, 1, 48, 48)
    for key, array in arrays.items():
        assert array.dtype == np.float32
        if key.endswith("_lr_noise"):  # each LR image's noise RMS in its [0, 1] units
            assert array.shape == (COUNTS[key.split("_")[0]],) and np.all(array > 0.005)
            assert np.all(array < 0.5)
            continue
        assert np.allclose(array.min(axis=(1, 2, 3)), 0.0) and np.allclose(
            array.max(axis=(1, 2, 3)), 1.0
        )
    hr = arrays["test_hr"][:, 0]
    border = np.concatenate([hr[:, 0], hr[:, -1], hr[:, :, 0], hr[:, :, -1]], axis=1)
    rows, columns = np.mgrid[:48, :48] - 23.5
    near_the_ring = np.hypot(rows, columns) < 20  # Model 1's Einstein radius: 1.28" = 17 pixels
    assert border.mean() < 0.05 < hr[:, near_the_ring].mean()  # light is near the lens


def test_splits_are_disjoint():
    arrays = simulate_dataset(small_config(), COUNTS, data_seed=4, progress=False)
    images = {split: arrays[f"{split}_hr"].reshape(COUNTS[split], -1) for split in COUNTS}
    for a, b in (("train", "validation"), ("train", "test"), ("validation", "test")):
        distances = np.abs(images[a][:, None] - images[b][None]).max(axis=2)
        assert distances.min() > 1e-3
    draws = [split_rng(4, split).random(8) for split in COUNTS]
    assert not np.allclose(draws[0], draws[1]) and not np.allclose(draws[1], draws[2])


def test_noise_and_psf_make_lr_differ_from_downsampled_hr():
    clean = {"background_rms": 0.0, "exposure_time": 1e12, "hr_exposure_time": 0.0}
    simulator = LensSimulator(small_config(psf_fwhm=0.0, hr_psf_fwhm=0.0, **clean))
    rng = np.random.default_rng(0)
    kwargs_lens, kwargs_source = simulator.draw_parameters(rng)
    lr, hr, lr_clean = simulator.render(kwargs_lens, kwargs_source, rng)
    binned = block_sum(hr, 2)
    assert np.allclose(lr_clean, binned, rtol=1e-12, atol=1e-15)  # no PSF: exact binning
    assert np.allclose(lr, binned, rtol=1e-4, atol=1e-6 * hr.max())  # and next to no noise
    # The LR PSF (0.3") beyond the HR one (0.1"): the noiseless LR is the HR blurred by the
    # Gaussian that makes up the difference, then binned (flux kept).
    blurred = LensSimulator(small_config(psf_fwhm=0.3, hr_psf_fwhm=0.1, **clean))
    _, hr_psf, lr_psf = blurred.render(kwargs_lens, kwargs_source, rng)
    assert lr_psf.sum() == pytest.approx(hr_psf.sum(), rel=0.05)  # but what leaves the field
    assert not np.allclose(lr_psf, block_sum(hr_psf, 2), rtol=1e-2)
    hr_tensor = torch.from_numpy(hr_psf)[None, None]
    expected = blurred.operator(hr_tensor)[0, 0].numpy() * 4
    assert np.allclose(lr_psf, expected, rtol=1e-12, atol=1e-15)
    assert blurred.operator.psf_fwhm_pixels == pytest.approx(np.sqrt(0.3**2 - 0.1**2) / 0.075)
    # Model 1's noise: the observed LR and the HR target are noisy, independently
    noisy = LensSimulator(small_config())
    lr_noisy, hr_noisy, lr_clean_again = noisy.render(kwargs_lens, kwargs_source, rng)
    assert not np.allclose(lr_noisy, lr_clean_again, atol=1e-3 * lr_clean_again.max())
    assert np.all(hr_noisy >= 0) and not np.allclose(hr_noisy, hr, atol=1e-3 * hr.max())


def test_lr_noise_is_the_rms_of_the_normalised_noise():
    rng = np.random.default_rng(1)
    clean = np.outer(np.hanning(20), np.hanning(20)) * 5.0
    noisy = clean + rng.normal(0.0, 0.1, clean.shape)
    lr, hr, noise = normalized_pair(SimulatedPair(noisy, np.kron(clean, np.ones((2, 2))), clean))
    span = noisy.max() - noisy.min()
    assert lr.min() == 0 and lr.max() == pytest.approx(1) and hr.max() == pytest.approx(1)
    assert noise == pytest.approx(np.sqrt(np.mean((noisy - clean) ** 2)) / span, rel=1e-6)


@pytest.mark.parametrize("source", ["euclid", "hst"])
def test_instrument_presets(source):
    instrument = instrument_preset(source)
    assert instrument["lr_size"] == 64 and instrument["background_rms"] > 0
    config = simulation_config({"source": source, "scale": 2, "supersampling": 1,
                                **POPULATION_DEFAULTS})
    assert config["hr_exposure_time"] == [0.0, 0.0] and config["hr_psf_fwhm"] == 0.0
    arrays = simulate_dataset(config, {"train": 1, "validation": 1, "test": 1}, 0, progress=False)
    assert arrays["test_lr"].shape == (1, 1, 64, 64) and arrays["test_hr"].shape == (1, 1, 128, 128)


def test_normalize_per_image_handles_constant_images():
    images = np.stack([np.full((4, 4), 3.0), np.arange(16.0).reshape(4, 4)])
    scaled = normalize_per_image(images)
    assert np.all(scaled[0] == 0) and scaled[1].min() == 0 and scaled[1].max() == 1


# ----------------------------------------------------------------------------- folders


def write_pairs(
    folder: Path, count: int, lr_shape=(8, 8), scale: int = 2, stem: str = "sample"
) -> None:
    rng = np.random.default_rng(count)
    (folder / "LR").mkdir(parents=True, exist_ok=True)
    (folder / "HR").mkdir(parents=True, exist_ok=True)
    for i in range(count):
        lr = rng.random((1, *lr_shape)) * 7
        hr = rng.random((1, lr_shape[0] * scale, lr_shape[1] * scale)) * 5
        np.save(folder / "LR" / f"{stem}{i}.npy", lr)
        np.save(folder / "HR" / f"{stem}{i}.npy", hr)


def load(folder: Path, **overrides) -> dict:
    options = {"validation_fraction": 0.2, "test_fraction": 0.2, "seed": 0, "normalize": True}
    options.update(overrides)
    return folder_dataset(folder, 2, **options)


def test_good_folder_of_pairs_loads(tmp_path):
    write_pairs(tmp_path, 10)
    arrays = load(tmp_path)
    assert [len(arrays[f"{s}_lr"]) for s in ("train", "validation", "test")] == [6, 2, 2]
    assert arrays["train_hr"].shape[1:] == (1, 16, 16) and arrays["train_lr"].shape[1:] == (1, 8, 8)
    assert all(array.min() >= 0 and array.max() <= 1 for array in arrays.values())
    everything = np.concatenate([arrays[f"{s}_lr"] for s in ("train", "validation", "test")])
    assert len(np.unique(everything.reshape(10, -1), axis=0)) == 10  # no pair in two splits
    again = load(tmp_path)
    assert all(np.array_equal(again[key], arrays[key]) for key in arrays)


def test_good_folder_of_split_arrays_loads(tmp_path):
    rng = np.random.default_rng(0)
    for name in ("LR", "HR"):
        (tmp_path / name).mkdir()
    for split, count in (("train", 5), ("val", 2), ("test", 3)):
        np.save(tmp_path / "LR" / f"{split}.npy", rng.random((count, 1, 6, 6)).astype(np.float32))
        np.save(tmp_path / "HR" / f"{split}.npy", rng.random((count, 12, 12)).astype(np.float32))
    arrays = load(tmp_path, normalize=False)
    assert [len(arrays[f"{s}_hr"]) for s in ("train", "validation", "test")] == [5, 2, 3]
    assert arrays["test_hr"].shape == (3, 1, 12, 12)


def expect_error(folder: Path, path: Path, fragment: str, **overrides) -> None:
    with pytest.raises(DataError) as raised:
        load(folder, **overrides)
    message = str(raised.value)
    assert isinstance(raised.value, ValueError)
    assert message.startswith(str(path)), message
    assert fragment in message and "\n" not in message


def test_folder_shape_mismatch_names_the_file(tmp_path):
    write_pairs(tmp_path, 4)
    bad = tmp_path / "HR" / "sample2.npy"
    np.save(bad, np.zeros((1, 15, 16)))
    expect_error(tmp_path, bad, "is not 2 x the LR shape")


def test_folder_nan_names_the_file(tmp_path):
    write_pairs(tmp_path, 4)
    bad = tmp_path / "LR" / "sample1.npy"
    image = np.ones((1, 8, 8))
    image[0, 3, 3] = np.nan
    np.save(bad, image)
    expect_error(tmp_path, bad, "non-finite")


def test_folder_missing_partner_names_the_file(tmp_path):
    write_pairs(tmp_path, 4)
    (tmp_path / "HR" / "sample3.npy").unlink()
    expect_error(tmp_path, tmp_path / "LR" / "sample3.npy", "has no HR partner")
    write_pairs(tmp_path, 4)
    np.save(tmp_path / "HR" / "extra.npy", np.zeros((16, 16)))
    expect_error(tmp_path, tmp_path / "HR" / "extra.npy", "has no LR partner")


def test_folder_inconsistent_lr_shapes_and_counts(tmp_path):
    write_pairs(tmp_path / "a", 3)
    write_pairs(tmp_path / "a", 1, lr_shape=(9, 9), stem="z")
    expect_error(tmp_path / "a", tmp_path / "a" / "LR" / "z0.npy", "differs from")
    for name, count in (("LR", 4), ("HR", 3)):
        (tmp_path / "b" / name).mkdir(parents=True)
        np.save(
            tmp_path / "b" / name / "train.npy",
            np.zeros((count, 8, 8) if name == "LR" else (count, 16, 16)),
        )
    expect_error(tmp_path / "b", tmp_path / "b" / "HR" / "train.npy", "holds 3 images")


def test_folder_unreadable_and_out_of_range(tmp_path):
    write_pairs(tmp_path, 4)
    bad = tmp_path / "LR" / "sample0.npy"
    bad.write_bytes(b"not an array")
    expect_error(tmp_path, bad, "unreadable")
    write_pairs(tmp_path, 4)
    expect_error(tmp_path, tmp_path / "LR" / "sample0.npy", "outside [-0.1, 1.1]", normalize=False)
    empty = tmp_path / "empty"
    (empty / "LR").mkdir(parents=True)
    (empty / "HR").mkdir()
    expect_error(empty, empty / "LR", "contains no .npy or FITS files")
    expect_error(tmp_path / "nowhere", tmp_path / "nowhere", "no such folder")
    write_pairs(tmp_path / "tiny", 4, lr_shape=(4, 4))
    expect_error(tmp_path / "tiny", tmp_path / "tiny" / "HR" / "sample0.npy", "too small")


def test_objective_folder_errors_are_one_line(tmp_path):
    write_pairs(tmp_path, 6)
    bad = tmp_path / "HR" / "sample4.npy"
    np.save(bad, np.full((1, 16, 16), np.inf))
    objective = SRObjective(
        {"source": "folder", "folder": str(tmp_path)},
        {},
        seed=0,
        cache_dir=tmp_path / "cache",
        progress=False,
    )
    with pytest.raises(ValueError) as raised:
        objective.prepare()
    assert str(raised.value).startswith(str(bad)) and "\n" not in str(raised.value)


def test_options_are_checked():
    with pytest.raises(SpaceError, match="objective.source: must be one of"):
        SRObjective.check_options({"source": "jwst"})
    with pytest.raises(SpaceError, match="objective.einstein_radius: impossible range"):
        SRObjective.check_options({"einstein_radius": [1.5, 1.0]})
    with pytest.raises(
        SpaceError, match=r"objective.source_axis_ratio: values must lie in \(0.0, 1.0\]"
    ):
        SRObjective.check_options({"source_axis_ratio": [0.5, 1.5]})
    with pytest.raises(SpaceError, match="objective.lr_size: must be an integer"):
        SRObjective.check_options({"lr_size": 7.5})
    with pytest.raises(SpaceError, match="objective.psf_fwhm: must be a number"):
        SRObjective.check_options({"psf_fwhm": "wide"})
    with pytest.raises(SpaceError, match="objective.hr_psf_fwhm: must not exceed the LR PSF"):
        SRObjective.check_options({"hr_psf_fwhm": 0.1})  # Model 1's LR PSF is 0.087"
    with pytest.raises(SpaceError, match=r"objective.exposure_time: .*\[low, high\] pair"):
        SRObjective.check_options({"exposure_time": [3000, 1000]})
    with pytest.raises(SpaceError, match="objective.exposure_time: must be a positive number"):
        SRObjective.check_options({"exposure_time": 0})
    with pytest.raises(SpaceError, match="objective.consistency_psf_fwhm: must be >= 0"):
        SRObjective.check_options({"source": "folder", "folder": ".", "consistency_psf_fwhm": -1})
    with pytest.raises(SpaceError, match='objective.consistency_psf_fwhm: is only used with'):
        SRObjective.check_options({"consistency_psf_fwhm": 2.0})
    with pytest.raises(SpaceError, match='objective.folder: is only used with source = "folder"'):
        SRObjective.check_options({"folder": "data"})
    with pytest.raises(SpaceError, match="objective.folder: .*no such folder"):
        SRObjective.check_options({"source": "folder", "folder": "/no/such/folder"})
    with pytest.raises(SpaceError, match="objective.n_trian: unknown key .*did you mean 'n_train'"):
        SRObjective.check_options({"n_trian": 3})
    options = SRObjective.check_options(
        {"source": "hst", "einstein_radius": [1, 2], "psf_fwhm": 0.15}
    )
    assert options["einstein_radius"] == [1.0, 2.0] and options["psf_fwhm"] == 0.15
    assert SRObjective.check_options(options) == options  # idempotent: the engine checks twice


# ------------------------------------------------------------- DeepLense's folder layouts


def test_pair_keys_match_deeplense_names():
    assert pair_key(Path("LR/LR_12.npy")) == pair_key(Path("HR/HR_12.npy")) == "12"
    assert pair_key(Path("LR/lr-007.fits")) == pair_key(Path("HR/HR_7.npy")) == "7"
    assert pair_key(Path("LR/sample3.npy")) == pair_key(Path("HR/sample3.npy")) == "sample3"
    assert pair_key(Path("HR/lens_5_hr.fits.gz")) == "lens_5"
    assert pair_key(Path("LR/sample10.npy")) != pair_key(Path("HR/sample1.npy"))


def test_paired_prefixes_are_matched_by_index(tmp_path):
    rng = np.random.default_rng(0)
    (tmp_path / "LR").mkdir()
    (tmp_path / "HR").mkdir()
    for i in (1, 2, 10):  # dataset B: LR/LR_{i}.npy, HR/HR_{i}.npy; 10 sorts after 2
        np.save(tmp_path / "LR" / f"LR_{i}.npy", np.full((1, 8, 8), i, dtype=np.float32))
        np.save(tmp_path / "HR" / f"HR_{i}.npy", np.full((1, 16, 16), i, dtype=np.float32)
                + rng.random((1, 16, 16), dtype=np.float32))
    pairs = folder_pairs(tmp_path)
    assert [(p.lr.name, p.hr.name) for p in pairs] == [
        ("LR_1.npy", "HR_1.npy"), ("LR_2.npy", "HR_2.npy"), ("LR_10.npy", "HR_10.npy")]
    (tmp_path / "HR" / "HR_10.npy").unlink()
    expect_error(tmp_path, tmp_path / "LR" / "LR_10.npy", "has no HR partner")
    np.save(tmp_path / "HR" / "HR_010.npy", np.zeros((1, 16, 16)))
    np.save(tmp_path / "HR" / "HR_10.npy", np.zeros((1, 16, 16)))
    expect_error(tmp_path, tmp_path / "HR" / "HR_10.npy", "same key '10' as")


def test_stacked_arrays_in_the_folder(tmp_path):
    rng = np.random.default_rng(0)
    for split, count in (("train", 6), ("test", 3)):  # no validation stack: carved from train
        np.save(tmp_path / f"{split}_LR.npy", rng.random((count, 1, 8, 8), dtype=np.float32))
        np.save(tmp_path / f"{split}_HR.npy", rng.random((count, 1, 16, 16), dtype=np.float32))
    arrays = load(tmp_path, normalize=False)
    assert [len(arrays[f"{s}_lr"]) for s in ("train", "validation", "test")] == [5, 1, 3]
    assert np.array_equal(arrays["test_hr"], np.load(tmp_path / "test_HR.npy"))
    np.save(tmp_path / "val_LR.npy", rng.random((2, 1, 8, 8)))
    expect_error(tmp_path, tmp_path / "val_LR.npy", "has no HR partner")
    (tmp_path / "val_LR.npy").unlink()
    np.save(tmp_path / "test_HR.npy", rng.random((3, 1, 16, 18)))
    expect_error(tmp_path, tmp_path / "test_HR.npy", "is not 2 x the LR shape")
    for path in tmp_path.iterdir():
        path.unlink()
    np.save(tmp_path / "notes.npy", np.zeros(3))
    expect_error(tmp_path, tmp_path, "holds neither LR/ and HR/ nor train_LR.npy")


def test_fits_images_and_mixed_formats(tmp_path):
    from astropy.io import fits

    rng = np.random.default_rng(0)
    (tmp_path / "LR").mkdir()
    (tmp_path / "HR").mkdir()
    for i in range(5):
        lr = rng.random((8, 8)).astype(">f4")  # FITS is big-endian
        fits.PrimaryHDU(lr).writeto(tmp_path / "LR" / f"lens{i}.fits")
        hr = rng.random((16, 16))
        if i == 4:
            np.save(tmp_path / "HR" / f"lens{i}.npy", hr)  # a .npy partner of a FITS file
        else:
            fits.HDUList([fits.PrimaryHDU(), fits.ImageHDU(hr)]).writeto(
                tmp_path / "HR" / f"lens{i}.fits")  # image in an extension
    arrays = load(tmp_path, normalize=False)
    everything = np.concatenate([arrays[f"{s}_lr"] for s in ("train", "validation", "test")])
    expected = [fits.getdata(tmp_path / "LR" / f"lens{i}.fits") for i in range(5)]
    assert sorted(everything.sum(axis=(1, 2, 3)).round(4)) == sorted(
        np.sum(expected, axis=(1, 2)).round(4))
    bad = tmp_path / "HR" / "lens2.fits"
    bad.write_bytes(b"SIMPLE  = T" + b" " * 100)
    expect_error(tmp_path, bad, "unreadable FITS file")


def test_values_slightly_outside_unit_range_are_clipped_and_counted(tmp_path):
    rng = np.random.default_rng(0)
    for split, count in (("train", 6), ("test", 2)):
        lr = rng.random((count, 1, 8, 8), dtype=np.float32)
        hr = rng.random((count, 1, 16, 16), dtype=np.float32)
        hr[0, 0, 0, :3] = 1.02  # dataset B: float32 values up to about 1.02
        lr[0, 0, 0, 0] = -0.01
        np.save(tmp_path / f"{split}_LR.npy", lr)
        np.save(tmp_path / f"{split}_HR.npy", hr)
    arrays = load(tmp_path, normalize=False)
    assert clip_to_unit_range(arrays) == 8 and clip_to_unit_range(arrays) == 0
    assert all(array.min() >= 0 and array.max() <= 1 for array in arrays.values())
    hr[0, 0, 5, 5] = 1.5  # far outside: refused, not clipped
    np.save(tmp_path / "test_HR.npy", hr)
    expect_error(tmp_path, tmp_path / "test_HR.npy", "outside [-0.1, 1.1]; set normalize = true",
                 normalize=False)
