"""lensnas predict: real exports (shear, SR, denoising) applied through the command line to .npy,
FITS, folder and .zip inputs give the exported network's own outputs, in the input's format and
layout (a CSV for shear); bad inputs are one line on stderr naming the file, exit status 2."""

from __future__ import annotations

import csv
import os
import stat
import textwrap
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from astropy.io import fits

from lensnas import spaces
from lensnas.search import launch
from lensnas.search.cli import main
from lensnas.search.results import predict as predict_module
from lensnas.search.results.export import export_study
from tests.test_denoise import TINY_STUDY as TINY_DENOISE_STUDY
from tests.test_export import TINY_SR_STUDY, tiny_shear_study

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit:DeprecationWarning")

FAMILIES = ("shear", "sr", "denoise")
FORMATS = ("npy", "npy_stack", "fits", "folder", "zip")
SHEAR_SIZE = 25  # the tiny shear study's stamp size
RNG = np.random.default_rng(7)


def launch_and_export(study_file: Path, folder: Path) -> Path:
    """Launch a tiny study in ``folder`` and export its best trial; the exported folder."""
    url = f"sqlite:///{folder / 'lensnas.db'}"
    study = launch(study_file, url, quiet=True, cache_dir=folder / "cache")
    return export_study(study, url, folder / "best", top=1)[0]


@pytest.fixture(scope="module")
def shear_export(tmp_path_factory) -> Path:
    shear = tiny_shear_study(tmp_path_factory)
    return export_study(shear.study, shear.url, tmp_path_factory.mktemp("shear-best"), top=1)[0]


@pytest.fixture(scope="module")
def sr_export(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("sr")
    (folder / "sr.toml").write_text(textwrap.dedent(TINY_SR_STUDY))
    return launch_and_export(folder / "sr.toml", folder)


@pytest.fixture(scope="module")
def denoise_export(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("denoise")
    study = textwrap.dedent(TINY_DENOISE_STUDY.format(levels="0.1"))
    assert "n_trials = 3" in study
    (folder / "denoise.toml").write_text(study.replace("n_trials = 3", "n_trials = 1"))
    return launch_and_export(folder / "denoise.toml", folder)


def stamps(n: int, size: int = SHEAR_SIZE, flux: float = 1.0) -> np.ndarray:
    """(n, size, size) round Gaussian galaxies of total flux ``flux`` with a little noise."""
    y, x = np.mgrid[:size, :size] - (size - 1) / 2
    widths = RNG.uniform(1.5, 3.0, n)[:, None, None]
    galaxies = np.exp(-(x**2 + y**2) / (2 * widths**2))
    galaxies *= flux / galaxies.sum(axis=(1, 2), keepdims=True)
    return (galaxies + RNG.normal(0, 1e-5, galaxies.shape)).astype(np.float32)


def images(family: str, *shape: int, size: int = 16) -> np.ndarray:
    """Images of ``shape`` + (size, size) like the family's training data (size fixed for shear)."""
    if family == "shear":
        n = int(np.prod(shape))
        return stamps(n).reshape(*shape, SHEAR_SIZE, SHEAR_SIZE)
    return RNG.uniform(0, 1, (*shape, size, size)).astype(np.float32)


def input_files(family: str, fmt: str) -> dict[str, np.ndarray]:
    """The files of one input format, by relative name: the arrays as stored."""
    if fmt == "npy":
        return {"one.npy": images(family)}  # (H, W)
    if fmt == "npy_stack":
        return {"stack.npy": images(family, 3)}  # (N, H, W)
    if fmt == "fits":
        return {"cube.fits": images(family, 3)}
    return {  # a folder, or a zip with the same members: several layouts and, for SR, sizes
        "a.npy": images(family, 3),
        "sub/b.fits": images(family),
        "sub/c.npy": images(family, 2, 1, size=12),  # (N, 1, H, W)
    }


def write_array(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".npy":
        np.save(path, array)
    else:
        header = fits.Header()
        header["OBJECT"] = "lens test"
        fits.PrimaryHDU(array, header=header).writeto(path)


def read_array(path: Path) -> np.ndarray:
    if path.suffix == ".npy":
        return np.load(path)
    with fits.open(path) as hdus:
        assert hdus[0].header["OBJECT"] == "lens test"  # the input's primary header is kept
        return np.array(hdus[0].data)


def make_input(tmp_path: Path, fmt: str, files: dict[str, np.ndarray]) -> Path:
    """The input path of ``fmt`` holding ``files``."""
    folder = tmp_path / "data"
    for name, array in files.items():
        write_array(folder / name, array)
    (folder / ".DS_Store").write_bytes(b"\0junk")  # hidden files are ignored
    if fmt == "zip":
        with zipfile.ZipFile(tmp_path / "data.zip", "w") as archive:
            for name in files:
                archive.write(folder / name, name)
            archive.writestr("__MACOSX/._a.npy", b"\0junk")
        return tmp_path / "data.zip"
    return folder if fmt == "folder" else folder / next(iter(files))


def network_outputs(exported: Path, array: np.ndarray) -> np.ndarray:
    """The exported network applied in Python to a stored array, in the array's layout."""
    x = array[None, None] if array.ndim == 2 else array[:, None] if array.ndim == 3 else array
    with torch.no_grad():
        y = spaces.load(exported)(torch.from_numpy(np.ascontiguousarray(x))).numpy()
    if y.ndim == 2:  # one row of numbers per image
        return y
    return y[0, 0] if array.ndim == 2 else y[:, 0] if array.ndim == 3 else y


def run(*args: str | Path) -> int:
    return main(["predict", *map(str, args), "--device", "cpu", "--quiet"])


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("family", FAMILIES)
def test_outputs_equal_the_exported_network_in_python(family, fmt, request, tmp_path):
    exported = request.getfixturevalue(f"{family}_export")
    files = input_files(family, fmt)
    source = make_input(tmp_path, fmt, files)
    suffix = {"folder": "", "zip": ".zip"}.get(fmt, source.suffix)
    output = tmp_path / ("shears.csv" if family == "shear" else f"out{suffix}")
    assert run(exported, source, "-o", output, "--batch-size", "2") == 0  # batches span files

    if family == "shear":
        with open(output, newline="") as handle:
            rows = list(csv.DictReader(handle))
        assert list(rows[0]) == ["file", "index", "g1", "g2"]
        expected = []
        for name, array in files.items():
            label = {"folder": str(source / name), "zip": f"{source}:{name}"}.get(fmt, str(source))
            expected += [(label, str(i), g) for i, g in enumerate(network_outputs(exported, array))]
        assert [(row["file"], row["index"]) for row in rows] == [e[:2] for e in expected]
        got = np.array([[float(row["g1"]), float(row["g2"])] for row in rows])
        np.testing.assert_allclose(got, [e[2] for e in expected], rtol=0, atol=1e-6)
        return

    if fmt == "zip":
        with zipfile.ZipFile(output) as archive:
            assert archive.namelist() == sorted(files)
            archive.extractall(tmp_path / "unzipped")
        outputs = {name: tmp_path / "unzipped" / name for name in files}
    elif fmt == "folder":
        written = sorted(p.relative_to(output).as_posix() for p in output.rglob("*.*"))
        assert written == sorted(files)
        outputs = {name: output / name for name in files}
    else:
        outputs = {next(iter(files)): output}
    for name, array in files.items():
        expected = network_outputs(exported, array)
        got = read_array(outputs[name])
        assert got.shape == expected.shape  # one image stays one image, a stack a stack
        if family == "sr":
            assert got.shape[-1] == 2 * array.shape[-1]
        np.testing.assert_allclose(got, expected, rtol=0, atol=1e-6)


def test_several_inputs_give_a_folder_of_outputs_by_name(sr_export, tmp_path):
    one, stack = images("sr"), images("sr", 2)
    np.save(tmp_path / "one.npy", one)
    source = make_input(tmp_path, "zip", {"s.npy": stack})
    assert run(sr_export, tmp_path / "one.npy", source, "-o", tmp_path / "out") == 0
    np.testing.assert_allclose(np.load(tmp_path / "out" / "one.npy"),
                               network_outputs(sr_export, one), rtol=0, atol=1e-6)
    with zipfile.ZipFile(tmp_path / "out" / "data.zip") as archive:
        assert archive.namelist() == ["s.npy"]


def test_fits_hdu_option_reads_an_extension(denoise_export, tmp_path):
    image = images("denoise")
    fits.HDUList([fits.PrimaryHDU(), fits.ImageHDU(image)]).writeto(tmp_path / "x.fits")
    assert run(denoise_export, tmp_path / "x.fits", "-o", tmp_path / "y.fits") == 2  # HDU 0 empty
    assert run(denoise_export, tmp_path / "x.fits", "-o", tmp_path / "y.fits", "--hdu", "1") == 0
    with fits.open(tmp_path / "y.fits") as hdus:
        got = np.array(hdus[0].data)
    np.testing.assert_allclose(got, network_outputs(denoise_export, image), rtol=0, atol=1e-6)


def test_stamps_unlike_the_training_data_are_warned_about_and_still_measured(
    shear_export, tmp_path, capsys
):
    np.save(tmp_path / "bright.npy", stamps(2, flux=100.0))
    assert run(shear_export, tmp_path / "bright.npy", "-o", tmp_path / "g.csv") == 0
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("lensnas predict: warning: ") and "bright.npy" in line
    assert "total flux" in line
    assert len((tmp_path / "g.csv").read_text().splitlines()) == 3


# ----------------------------------------------------------------------------- bad inputs


def zip_with(path: Path, add: Callable[[zipfile.ZipFile], None]) -> Path:
    with zipfile.ZipFile(path, "w") as archive:
        add(archive)
    return path


def evil_zip(path: Path) -> Path:
    return zip_with(path, lambda archive: archive.writestr("../evil.npy", b"x"))


def link_zip(path: Path) -> Path:
    info = zipfile.ZipInfo("link.npy")
    info.external_attr = (stat.S_IFLNK | 0o777) << 16
    return zip_with(path, lambda archive: archive.writestr(info, "/etc/passwd"))


def bad_input(case: str, folder: Path) -> tuple[Path, str]:
    """An input that must be refused, and the name its error line must show."""
    path = folder / "stamps.npy"
    if case == "stamp size":
        np.save(path, stamps(2, size=30))
    elif case == "channels":
        np.save(path, np.stack([stamps(2), stamps(2)], axis=1))  # (2, 2, 25, 25)
    elif case == "NaN":
        array = stamps(3)
        array[1, 4, 4] = np.nan
        np.save(path, array)
    elif case == "non-image file in a folder":
        np.save(folder / "a.npy", stamps(1))
        (folder / "notes.txt").write_text("not an image")
        return folder, str(folder / "notes.txt")
    elif case == "not an .npy file":
        path.write_text("1 2 3")
    elif case == "unreadable FITS":
        path = folder / "broken.fits"
        path.write_bytes(b"SIMPLE  = this is not FITS" + bytes(100))
    elif case == "truncated FITS":
        path = folder / "cut.fits"
        fits.PrimaryHDU(stamps(1)[0]).writeto(path)
        path.write_bytes(path.read_bytes()[:3000])  # header and part of the data
    elif case == "path escaping a zip":
        return evil_zip(folder / "in.zip"), f"{folder / 'in.zip'}:../evil.npy"
    elif case == "link in a zip":
        return link_zip(folder / "in.zip"), f"{folder / 'in.zip'}:link.npy"
    elif case == "not a zip":
        path = folder / "in.zip"
        path.write_bytes(b"PK not really")
    elif case == "missing":
        path = folder / "missing.npy"
    return path, str(path)


BAD_INPUTS = ("stamp size", "channels", "NaN", "non-image file in a folder", "not an .npy file",
              "unreadable FITS", "truncated FITS", "path escaping a zip", "link in a zip",
              "not a zip", "missing")


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input_is_one_line_naming_the_file(case, shear_export, tmp_path, capsys):
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    path, name = bad_input(case, inputs)
    output = tmp_path / "out" / "g.csv"
    assert run(shear_export, path, "-o", output) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith(f"lensnas predict: error: {name}: "), line
    assert not output.exists()
    assert not (tmp_path / "evil.npy").exists() and not (inputs / "evil.npy").exists()


def test_error_lines_say_what_the_network_takes(shear_export, tmp_path, capsys):
    np.save(tmp_path / "big.npy", stamps(1, size=30))
    np.save(tmp_path / "two.npy", np.stack([stamps(1), stamps(1)], axis=1))
    assert run(shear_export, tmp_path / "big.npy", "-o", tmp_path / "g.csv") == 2
    assert "images of 30x30 pixels; the network takes 25x25" in capsys.readouterr().err
    assert run(shear_export, tmp_path / "two.npy", "-o", tmp_path / "g.csv") == 2
    assert "images of 2 channel(s) (shape (1, 2, 25, 25)); the network takes 1" in (
        capsys.readouterr().err)


def test_archive_limits(shear_export, tmp_path, capsys, monkeypatch):
    source = make_input(tmp_path, "zip", {"a.npy": stamps(2), "b.npy": stamps(1)})
    monkeypatch.setattr(predict_module, "MAX_ARCHIVE_MEMBERS", 2)
    assert run(shear_export, source, "-o", tmp_path / "g.csv") == 2
    assert "holds 3 members; at most 2 are read" in capsys.readouterr().err
    monkeypatch.setattr(predict_module, "MAX_ARCHIVE_MEMBERS", 10)
    size = os.path.getsize(tmp_path / "data" / "a.npy")
    monkeypatch.setattr(predict_module, "MAX_ARCHIVE_BYTES", size)
    assert run(shear_export, source, "-o", tmp_path / "g.csv") == 2
    assert f"{source}: unpacks to more than" in capsys.readouterr().err


def test_bad_options_are_one_line(sr_export, tmp_path, capsys):
    np.save(tmp_path / "x.npy", images("sr"))
    for args, message in [
        (["-o", tmp_path / "y.fits"], "-o: " + str(tmp_path / "y.fits")),
        (["-o", tmp_path / "x.npy"], "is the input itself"),
        (["-o", tmp_path / "y.npy", "--batch-size", "0"], "--batch-size: must be at least 1"),
        (["-o", tmp_path / "y.npy", "--device", "gpu"], "--device: 'gpu' is not allowed"),
    ]:
        assert main(["predict", str(sr_export), str(tmp_path / "x.npy"), *map(str, args)]) == 2
        (line,) = capsys.readouterr().err.strip().splitlines()
        assert message in line
    assert not (tmp_path / "y.npy").exists() and not (tmp_path / "y.fits").exists()
