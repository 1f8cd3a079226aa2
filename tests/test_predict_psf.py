"""lensnas predict with a PSF (--psf) and response calibration (--calibrate metacal), on real
exports of tiny shear studies (one with the PSF image as input channel 2, psf_channel = true):
the PSF file is the network's second channel; calibrated rows hold the network's estimate on
metacal's images (with the reconvolution PSF as PSF channel), its response and <R>^-1 e; every
refusal is one line naming the option, exit status 2."""

from __future__ import annotations

import csv
import json
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from astropy.io import fits

from lensnas import spaces
from lensnas.objectives.shear.calibration import KEYS, metacal_images
from lensnas.objectives.shear.data import GalaxySimulation, simulate_split
from lensnas.search import launch
from lensnas.search.cli import main
from lensnas.search.results.export import export_study
from lensnas.search.results.predict import predict
from lensnas.search.results.serve import find_networks
from lensnas.spaces.errors import OptionError
from tests.conftest import write_tiny_shear_study

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit:DeprecationWarning")

# the tiny studies' stamps: 25x25 at 0.2"/pixel, exponential galaxies, Gaussian PSF 0.9"
SIMULATION = GalaxySimulation(stamp_size=25, pixel_scale=0.2, half_light_radius_min=0.4,
                              half_light_radius_max=0.6)
CALIBRATED = ["file", "index", "g1_raw", "g2_raw", "R11", "R12", "R21", "R22", "g1", "g2"]


def tiny_export(folder: Path, psf_channel: bool) -> Path:
    """One 1-epoch trial of a tiny shear study (no reference estimator), exported."""
    name = "psf2" if psf_channel else "psf1"
    path = write_tiny_shear_study(folder, name=name, n_trials=1, epochs=1, objective_extra=(
        f'reference = "none"\npsf_channel = {str(psf_channel).lower()}'))
    path.write_text(path.read_text().replace("n_train = 160", "n_train = 64")
                    .replace("n_validation = 48", "n_validation = 16")
                    .replace("n_test = 64", "n_test = 16"))
    url = f"sqlite:///{folder / 'lensnas.db'}"
    study = launch(path, url, quiet=True, cache_dir=folder / "cache")
    return export_study(study, url, folder / "best", top=1)[0]


@pytest.fixture(scope="module")
def psf_export(tmp_path_factory) -> Path:
    exported = tiny_export(tmp_path_factory.mktemp("psf2"), psf_channel=True)
    assert json.loads((exported / "architecture.json").read_text())["in_channels"] == 2
    return exported


def test_export_names_its_calibration_target_psf(psf_export, tmp_path):
    """The study's calibration_psf (default "gauss": round) is stored in the export and used by
    --calibrate metacal; "dilate" there gives other rows; an unknown target is one line."""
    stored = json.loads((psf_export / "architecture.json").read_text())
    assert stored["input"]["calibration_psf"] == "gauss"
    stamps, psf = galaxies(4), SIMULATION.psf_image()
    np.save(tmp_path / "stamps.npy", stamps)
    np.save(tmp_path / "psf.npy", psf)
    rows = {}
    for target in ("gauss", "dilate"):
        export = tmp_path / target
        shutil.copytree(psf_export, export)
        stored["input"]["calibration_psf"] = target
        (export / "architecture.json").write_text(json.dumps(stored))
        assert run(export, tmp_path / "stamps.npy", "--psf", tmp_path / "psf.npy", "--calibrate",
                   "metacal", "-o", tmp_path / f"{target}.csv") == 0
        rows[target] = numbers(read_rows(tmp_path / f"{target}.csv")[1], "g1_raw", "g2_raw")
        images = metacal_images(stamps, psf, SIMULATION.pixel_scale, SIMULATION.noise_sigma,
                                workers=1, psf=target)
        expected = network(export, np.stack(
            [images["noshear"], np.broadcast_to(images["psf_target"], stamps.shape)], axis=1))
        np.testing.assert_allclose(rows[target], expected, atol=1e-6)
    assert not np.allclose(rows["gauss"], rows["dilate"], atol=1e-6)
    stored["input"]["calibration_psf"] = "square"
    (tmp_path / "dilate" / "architecture.json").write_text(json.dumps(stored))
    with pytest.raises(OptionError, match="calibration_psf is 'square'; allowed: dilate, fitgauss, gauss"):
        predict(tmp_path / "dilate", [tmp_path / "stamps.npy"], tmp_path / "x.csv",
                psf=tmp_path / "psf.npy", calibrate="metacal", quiet=True)


@pytest.fixture(scope="module")
def plain_export(tmp_path_factory) -> Path:
    return tiny_export(tmp_path_factory.mktemp("psf1"), psf_channel=False)


def galaxies(count: int, seed: int = 5) -> np.ndarray:
    """``count`` stamps like the tiny studies' (unit flux, noise 1e-5)."""
    return simulate_split(SIMULATION, np.random.SeedSequence(seed), count)["images"]


def network(exported: Path, x: np.ndarray) -> np.ndarray:
    """The exported network applied in Python to (N, C, H, W)."""
    with torch.no_grad():
        return spaces.load(exported)(torch.from_numpy(np.ascontiguousarray(x, np.float32))).numpy()


def read_rows(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    with open(path, newline="") as handle:
        reader = csv.DictReader(handle)
        return list(reader.fieldnames or []), list(reader)


def numbers(rows: list[dict[str, str]], *columns: str) -> np.ndarray:
    return np.array([[float(row[column]) for column in columns] for row in rows])


def run(*args: str | Path, quiet: bool = True) -> int:
    return main(["predict", *map(str, args), "--device", "cpu", *(["--quiet"] if quiet else [])])


def test_the_psf_file_is_the_second_channel_of_a_psf_network(psf_export, tmp_path):
    stamps, psf = galaxies(4), SIMULATION.psf_image()
    np.save(tmp_path / "stamps.npy", stamps)
    np.save(tmp_path / "psf.npy", 3.0 * psf)  # normalised to unit sum by predict
    assert run(psf_export, tmp_path / "stamps.npy", "--psf", tmp_path / "psf.npy",
               "-o", tmp_path / "g.csv") == 0
    columns, rows = read_rows(tmp_path / "g.csv")
    assert columns == ["file", "index", "g1", "g2"]
    x = np.stack([stamps, np.broadcast_to(psf / psf.sum(), stamps.shape)], axis=1)
    expected = network(psf_export, x)
    np.testing.assert_allclose(numbers(rows, "g1", "g2"), expected, rtol=0, atol=1e-6)

    # one PSF per stamp, in a FITS file, across two input files (in the inputs' order)
    wider = replace(SIMULATION, psf_fwhm=1.1).psf_image()
    each = np.stack([psf, wider, psf, wider])
    fits.PrimaryHDU(each).writeto(tmp_path / "psfs.fits")
    np.save(tmp_path / "a.npy", stamps[:3])
    np.save(tmp_path / "b.npy", stamps[3:])
    assert run(psf_export, tmp_path / "a.npy", tmp_path / "b.npy", "--psf",
               tmp_path / "psfs.fits", "-o", tmp_path / "each.csv") == 0
    _, rows = read_rows(tmp_path / "each.csv")
    assert [(Path(row["file"]).name, row["index"]) for row in rows] == [
        ("a.npy", "0"), ("a.npy", "1"), ("a.npy", "2"), ("b.npy", "0")]
    expected = network(psf_export, np.stack([stamps, each / each.sum(axis=(1, 2),
                                                                       keepdims=True)], axis=1))
    np.testing.assert_allclose(numbers(rows, "g1", "g2"), expected, rtol=0, atol=1e-6)


def check_calibrated_rows(rows: list[dict[str, str]], printed: str | None = None) -> np.ndarray:
    """g = <R>^-1 (g1_raw, g2_raw) in every row, by the mean of the rows' R; the mean R."""
    raw = numbers(rows, "g1_raw", "g2_raw")
    response = numbers(rows, "R11", "R12", "R21", "R22").reshape(-1, 2, 2)
    mean = response.mean(axis=0)
    np.testing.assert_allclose(numbers(rows, "g1", "g2"), raw @ np.linalg.inv(mean).T,
                               rtol=1e-6, atol=1e-9)
    if printed is not None:
        line = next(line for line in printed.splitlines() if line.startswith("mean response"))
        assert f"over {len(rows)} of {len(rows)} stamp(s)" in line
        shown = [float(word.strip(",")) for word in line.split()[-7::2]]
        np.testing.assert_allclose(shown, mean.reshape(-1), rtol=1e-5)
    return mean


def test_calibration_applies_the_network_to_metacal_images_with_their_psf(
    psf_export, tmp_path, capsys
):
    stamps, psf = galaxies(6), SIMULATION.psf_image()
    np.save(tmp_path / "stamps.npy", stamps)
    np.save(tmp_path / "psf.npy", psf)
    assert run(psf_export, tmp_path / "stamps.npy", "--psf", tmp_path / "psf.npy",
               "--calibrate", "metacal", "-o", tmp_path / "g.csv", quiet=False) == 0
    columns, rows = read_rows(tmp_path / "g.csv")
    assert columns == CALIBRATED
    mean = check_calibrated_rows(rows, capsys.readouterr().out)

    # the same in Python: the network on metacal's five images, PSF channel = the target PSF
    images = metacal_images(stamps, psf, SIMULATION.pixel_scale, SIMULATION.noise_sigma,
                            workers=1, psf="gauss")
    target = images["psf_target"]
    out = {key: network(psf_export, np.stack(
        [images[key], np.broadcast_to(target, stamps.shape)], axis=1)) for key in KEYS}
    np.testing.assert_allclose(numbers(rows, "g1_raw", "g2_raw"), out["noshear"], atol=1e-6)
    response = np.stack([(out["1p"] - out["1m"]) / 0.02, (out["2p"] - out["2m"]) / 0.02], axis=2)
    np.testing.assert_allclose(numbers(rows, "R11", "R12", "R21", "R22"),
                               response.reshape(-1, 4), rtol=1e-4, atol=1e-4)
    assert not np.allclose(mean, np.eye(2), atol=1e-3)  # an untrained-ish network: R is not 1
    assert not np.allclose(numbers(rows, "g1", "g2"), numbers(rows, "g1_raw", "g2_raw"))
    with_psf = network(psf_export, np.stack([images["noshear"],
                                             np.broadcast_to(psf, stamps.shape)], axis=1))
    assert not np.allclose(with_psf, out["noshear"], rtol=0, atol=1e-7)  # the channel matters


def test_a_network_without_psf_channel_is_calibrated_with_per_stamp_psfs(
    plain_export, tmp_path
):
    stamps = galaxies(5, seed=8)
    psfs = np.repeat(SIMULATION.psf_image()[None], 5, axis=0)
    np.save(tmp_path / "a.npy", stamps[:2])
    np.save(tmp_path / "b.npy", stamps[2:])
    np.save(tmp_path / "psfs.npy", psfs)
    assert run(plain_export, tmp_path / "a.npy", tmp_path / "b.npy", "--psf",
               tmp_path / "psfs.npy", "--calibrate", "metacal", "-o", tmp_path / "g.csv") == 0
    columns, rows = read_rows(tmp_path / "g.csv")
    assert columns == CALIBRATED and len(rows) == 5
    check_calibrated_rows(rows)
    images = metacal_images(stamps, psfs[0], SIMULATION.pixel_scale, SIMULATION.noise_sigma,
                            workers=1, psf="gauss")
    np.testing.assert_allclose(numbers(rows, "g1_raw", "g2_raw"),
                               network(plain_export, images["noshear"][:, None]), atol=1e-6)


def test_calibration_takes_wider_stamps_and_crops_after_metacal(psf_export, tmp_path):
    """Stamps wider than the network's input: metacal runs on them, the network reads the
    centre; the same as metacal_images(..., crop=25) in Python."""
    wide_simulation = replace(SIMULATION, stamp_size=41)
    stamps = simulate_split(wide_simulation, np.random.SeedSequence(9), 4)["images"]
    psf = wide_simulation.psf_image()
    np.save(tmp_path / "wide.npy", stamps)
    np.save(tmp_path / "psf.npy", psf)
    assert run(psf_export, tmp_path / "wide.npy", "--psf", tmp_path / "psf.npy",
               "--calibrate", "metacal", "-o", tmp_path / "g.csv") == 0
    _, rows = read_rows(tmp_path / "g.csv")
    images = metacal_images(stamps, psf, SIMULATION.pixel_scale, SIMULATION.noise_sigma,
                            workers=1, crop=25, psf="gauss")
    inputs = np.stack([images["noshear"], np.broadcast_to(images["psf_target"], (4, 25, 25))], axis=1)
    np.testing.assert_allclose(numbers(rows, "g1_raw", "g2_raw"), network(psf_export, inputs),
                               atol=1e-6)


def test_an_export_without_pixel_scale_needs_the_option(psf_export, tmp_path, capsys):
    folder = tmp_path / "no-scale"
    shutil.copytree(psf_export, folder)
    spec = json.loads((folder / "architecture.json").read_text())
    del spec["input"]["pixel_scale_arcsec"]
    (folder / "architecture.json").write_text(json.dumps(spec))
    np.save(tmp_path / "stamps.npy", galaxies(3))
    np.save(tmp_path / "psf.npy", SIMULATION.psf_image())
    args = (folder, tmp_path / "stamps.npy", "--psf", tmp_path / "psf.npy", "--calibrate",
            "metacal", "-o", tmp_path / "g.csv")
    assert run(*args) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("lensnas predict: error: --pixel-scale: required"), line
    assert run(*args, "--pixel-scale", "0.2") == 0
    check_calibrated_rows(read_rows(tmp_path / "g.csv")[1])


def refusal(case: str, folder: Path, psf_export: Path, plain_export: Path) -> tuple[list, str]:
    """The arguments of a run that must be refused, and the start of its error line."""
    stamps, psf = folder / "stamps.npy", folder / "psf.npy"
    np.save(stamps, galaxies(3))
    np.save(psf, SIMULATION.psf_image())
    calibrate = ["--calibrate", "metacal"]
    if case == "psf network without --psf":
        return [psf_export, stamps], "--psf: required: this network takes the PSF image"
    if case == "--calibrate without --psf":
        return [plain_export, stamps, *calibrate], "--calibrate metacal: needs --psf FILE"
    if case == "unknown --calibrate":
        return ([plain_export, stamps, "--psf", psf, "--calibrate", "ngmix"],
                "--calibrate: 'ngmix' is not allowed; allowed: metacal")
    if case == "--psf of another size":
        np.save(psf, np.ones((21, 21)))
        return [psf_export, stamps, "--psf", psf], f"--psf {psf}: shape (21, 21); the inputs"
    if case == "--psf of another count":
        np.save(psf, np.ones((2, 25, 25)))
        return [psf_export, stamps, "--psf", psf], f"--psf {psf}: shape (2, 25, 25); the inputs"
    if case == "--psf of zero sum":
        np.save(psf, np.zeros((25, 25)))
        return [psf_export, stamps, "--psf", psf], f"--psf {psf}: the PSF sums to 0"
    if case == "--psf missing":
        return ([psf_export, stamps, "--psf", folder / "nope.fits"],
                f"--psf {folder / 'nope.fits'}: no such file")
    if case == "--psf for a network without psf channel":
        return ([plain_export, stamps, "--psf", psf],
                "--psf: this network takes no PSF channel (in_channels 1)")
    if case == "--calibrate for a network returning images":
        sr = folder / "sr"
        sr.mkdir()
        (sr / "architecture.json").write_text(json.dumps(
            {"family": "sr_net", "version": 1, "config": {}}))
        return ([sr, stamps, "--psf", psf, *calibrate],
                "--calibrate metacal: only for shear networks, which return g1, g2")
    if case == "--pixel-scale without --calibrate":
        return ([psf_export, stamps, "--psf", psf, "--pixel-scale", "0.2"],
                "--pixel-scale: used only with --calibrate metacal")
    if case == "--pixel-scale unlike the export's":
        return ([psf_export, stamps, "--psf", psf, *calibrate, "--pixel-scale", "0.1"],
                "--pixel-scale: 0.1 differs from the 0.2 arcsec/pixel")
    if case == "stamps with a PSF channel and --psf":
        np.save(stamps, np.stack([galaxies(3), np.load(stamps)], axis=1))
        return ([psf_export, stamps, "--psf", psf],
                (f"{stamps}: images of 2 channel(s) (shape (3, 2, 25, 25)); the network takes "
                 "1; with --psf give the stamps alone"))
    if case == "calibrated stamps of the wrong parity":
        np.save(stamps, np.zeros((3, 30, 30)))
        np.save(psf, np.ones((30, 30)))
        return ([plain_export, stamps, "--psf", psf, *calibrate],
                (f"{stamps}: stamps of 30x30 pixels; the network takes 25x25: with --calibrate "
                 "metacal give stamps of 25x25 or larger by an even number of pixels"))
    if case == "negative --noise-sigma":
        return ([psf_export, stamps, "--psf", psf, *calibrate, "--noise-sigma", "-1"],
                "--noise-sigma: must be a number >= 0")
    raise AssertionError(case)


REFUSALS = ("psf network without --psf", "--calibrate without --psf", "unknown --calibrate",
            "--psf of another size", "--psf of another count", "--psf of zero sum",
            "--psf missing", "--psf for a network without psf channel",
            "--calibrate for a network returning images", "--pixel-scale without --calibrate",
            "--pixel-scale unlike the export's", "negative --noise-sigma",
            "stamps with a PSF channel and --psf", "calibrated stamps of the wrong parity")


@pytest.mark.parametrize("case", REFUSALS)
def test_a_refusal_is_one_line_naming_the_option_or_file(case, psf_export, plain_export, tmp_path,
                                                 capsys):
    args, message = refusal(case, tmp_path, psf_export, plain_export)
    output = tmp_path / "out" / "g.csv"
    assert run(*args, "-o", output) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith(f"lensnas predict: error: {message}"), line
    assert not output.exists()


def test_serve_lists_a_psf_network_as_not_usable_from_the_page(psf_export, plain_export):
    networks = find_networks(psf_export.parent)
    (network,) = networks.values()
    assert network.returns == ["g1", "g2"]
    assert "\n" not in network.error and "--psf" in network.error
    assert not next(iter(find_networks(plain_export.parent).values())).error
