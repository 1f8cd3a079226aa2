"""Apply an exported network to a user's images: ``lensnas predict FOLDER INPUTS... -o OUTPUT``.

Inputs are ``.npy`` files (one image (H, W) or (C, H, W), or a stack (N, H, W) or
(N, C, H, W); a 3-dimensional array is one image of C channels when the network takes more
than one channel, else a stack), FITS files (the primary HDU, or ``hdu``; the same shapes),
folders of these (every file, sorted, recursively) and ``.zip`` archives of these. In a folder
or an archive, hidden files (a name starting with ".", and ``__MACOSX``) are ignored and any
other file that is not ``.npy`` or FITS is refused. Every input is read and checked (shape
against the network's ``in_channels`` and, where the architecture fixes it, ``image_size``;
finite values) before the network runs: a bad one is a one-line :class:`DataError`.

The network's family says what comes out: a family with ``output_columns`` returns one row of
named numbers per image, written as a CSV (``file``, ``index`` within the file, the columns);
otherwise the network returns images, written in each input's own format and layout (one image
stays one image, a stack stays a stack; a folder gives a folder with the same relative names,
an archive an archive with the same member names; FITS files keep their primary header).

Shear networks and the PSF (``psf``, ``--psf FILE``): a .npy or FITS file of one PSF image
(H, W) for all stamps or one per stamp (N, H, W, in the order of the inputs' stamps), on the
stamps' grid with the pixel response, each normalised here to unit sum. A network whose export
says ``in_channels`` 2 takes it as its second channel (the stamps are then single images); such
a network without a PSF is refused.

Response calibration (``calibrate="metacal"``, ``--calibrate metacal``; shear networks that
return g1, g2; needs the PSF): metacal's images of every stamp (deconvolved by its PSF, sheared
by ±0.01 along g1 and g2, reconvolved by a round Gaussian a little larger than the PSF or
the target the export's ``input.calibration_psf`` names; see
:mod:`lensnas.objectives.shear.calibration`) go through the network, with the reconvolution
PSF as the PSF channel. The CSV then holds per stamp the raw estimate ``g1_raw, g2_raw`` (the
network on the unsheared metacal image), its response ``R11, R12, R21, R22``
(``R_ij = d g_i / d g_j``) and the calibrated shear ``g1, g2 = <R>^-1 (g1_raw, g2_raw)``, by
the mean response of all the stamps given. The pixel scale is the export's (its stored input
description), else ``pixel_scale``; the noise level for metacal's noise correction is the
export's, else ``noise_sigma``.
"""

from __future__ import annotations

import csv
import io
import re
import stat
import sys
import tempfile
import warnings
import zipfile
import zlib
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import closing, contextmanager
from dataclasses import dataclass
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any, BinaryIO

import numpy as np
import torch
from astropy.io import fits
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from torch import nn

from lensnas.search.study import resolve_device
from lensnas.spaces import check_input, family, load
from lensnas.spaces.errors import ArchitectureError, DataError, OptionError
from lensnas.spaces.loading import read_architecture

FITS_SUFFIXES = (".fits", ".fit", ".fts")
IMAGE_SUFFIXES = (".npy", *FITS_SUFFIXES)
MAX_ARCHIVE_BYTES = 2 * 1024**3  # an archive may unpack to at most this many bytes
MAX_ARCHIVE_MEMBERS = 10_000
FITS_DATA_KEYS = ("BSCALE", "BZERO", "BLANK", "DATAMIN", "DATAMAX", "CHECKSUM", "DATASUM")
READABLE = "give .npy or FITS (.fits, .fit, .fts) files, folders of them or a .zip of them"
SHEAR_COLUMNS = ("g1", "g2")
CALIBRATIONS = ("metacal",)
CALIBRATED_COLUMNS = ("g1_raw", "g2_raw", "R11", "R12", "R21", "R22", "g1", "g2")
PSF_FILE = ("a .npy or FITS file of one PSF image (H, W) for all stamps or one per stamp "
            "(N, H, W), on the stamps' grid")


@dataclass
class ImageFile:
    """One file's images as the network takes them, and what is needed to write results back."""

    name: str  # in messages and the CSV: its path, or "archive.zip:member"
    relative: str  # its path inside its folder or archive (its own name for a lone file)
    images: np.ndarray  # (N, C, H, W) float32
    layout: str  # how the file stores them: "HW", "CHW", "NHW" or "NCHW"
    header: fits.Header | None = None  # a FITS file's primary header


@dataclass
class Source:
    """One of the INPUTS: a file, a folder or a zip archive, with the image files read from it."""

    path: Path
    kind: str  # "file", "folder" or "zip"
    files: list[ImageFile]


def predict(
    exported: str | Path, inputs: Sequence[str | Path], output: str | Path, hdu: int = 0,
    device: str = "auto", batch_size: int = 64, quiet: bool = False,
    warn: Callable[[str], None] | None = None, names: Sequence[str] | None = None,
    on_output: Callable[[ImageFile, np.ndarray], None] | None = None,
    psf: str | Path | None = None, calibrate: str | None = None,
    pixel_scale: float | None = None, noise_sigma: float | None = None,
    on_response: Callable[[np.ndarray, int, int], None] | None = None,
) -> int:
    """Apply the network exported in ``exported`` to ``inputs``, write ``output``; image count.

    ``names`` name the inputs in messages and in the CSV (default: their paths);
    ``on_output(file, outputs)`` sees each file's outputs before they are written. ``psf``,
    ``calibrate``, ``pixel_scale``, ``noise_sigma``: see the module's docstring;
    ``on_response(mean response (2, 2), stamps calibrated, stamps)`` is told the mean response.
    """
    if batch_size < 1:
        raise OptionError(f"--batch-size: must be at least 1, got {batch_size}")
    if hdu < 0:
        raise OptionError(f"--hdu: must be 0 (the primary HDU) or more, got {hdu}")
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", device):
        raise OptionError(f"--device: {device!r} is not allowed; allowed: auto, cpu, cuda, cuda:N")
    if not inputs:
        raise OptionError("INPUTS: give at least one file, folder or .zip")
    spec = read_architecture(exported)
    columns = family(spec["family"]).output_columns
    plan = psf_plan(spec, psf, calibrate, pixel_scale, noise_sigma)
    device = resolve_device(device, "--device")
    names = names or [str(path) for path in inputs]
    if len(names) != len(inputs):
        raise ValueError(f"{len(names)} names for {len(inputs)} inputs")
    stamp_spec = spec if psf is None else {**spec, "in_channels": 1}  # stamps: one channel
    if plan.calibrate:  # wider stamps are welcome: metacal runs on them, then they are cropped
        stamp_spec = {key: value for key, value in stamp_spec.items() if key != "image_size"}
    try:
        sources = [read_source(Path(path), stamp_spec, hdu, name)
                   for path, name in zip(inputs, names)]
    except DataError as error:
        if psf is None or "channel" not in error.message:
            raise
        raise DataError(error.path, f"{error.message}; with --psf give the stamps alone, (H, W) "
                                    "or (N, H, W): the PSF channel comes from --psf") from None
    output = Path(output)
    targets = [] if columns else image_targets(sources, output)
    files = [file for source in sources for file in source.files]
    if columns and any(output.resolve() == Path(path).resolve() for path in inputs):
        raise OptionError(f"-o: {output} is one of the inputs; choose another output")
    psf_images = None if psf is None else read_psf(Path(psf), files)
    metacal_set = None
    if plan.calibrate:  # before the network is loaded: metacal's processes fork from this one
        metacal_set = metacal_images_of(files, psf_images, plan, quiet, spec.get("image_size"))
        inputs_seen = [("metacal's unsheared images", network_inputs(metacal_set, plan.channels))]
    else:
        if psf_images is not None:
            with_psf_channel(files, psf_images, plan.channels)
        inputs_seen = [(file.name, file.images) for file in files]
    for name, images in inputs_seen:
        for line in check_input(spec, images):
            (warn or print_warning)(f"{name}: {line}")
    model = load(exported, map_location=device).to(device)
    if metacal_set is not None:
        values = calibrated_rows(model, metacal_set, plan, batch_size, device, quiet, on_response)
        failed = len(values) - int(np.count_nonzero(metacal_set["ok"]))
        if failed:
            (warn or print_warning)(f"{failed} of {len(values)} stamps could not be put through "
                                    "metacal (GalSim failed): their rows are NaN")
        rows = split_rows(values, files)
        if on_output is not None:
            rows = watched(rows, files, on_output)
        output.parent.mkdir(parents=True, exist_ok=True)
        write_table(output, files, rows, CALIBRATED_COLUMNS)
        return len(values)
    images = [file.images for file in files]
    with closing(apply(model, images, batch_size, device, quiet)) as results:
        if on_output is not None:
            results = watched(results, files, on_output)
        if columns:
            output.parent.mkdir(parents=True, exist_ok=True)
            write_table(output, files, results, columns)
        else:
            for source, target in zip(sources, targets, strict=True):
                write_images(source, results, target)
    return sum(len(file.images) for file in files)


def watched(
    results: Iterator[np.ndarray], files: Sequence[ImageFile],
    on_output: Callable[[ImageFile, np.ndarray], None],
) -> Iterator[np.ndarray]:
    """``results`` (the outputs of ``files``, in turn) unchanged, shown to ``on_output`` first."""
    for file, outputs in zip(files, results, strict=False):
        on_output(file, outputs)
        yield outputs


def print_warning(line: str) -> None:
    """Print one warning line on stderr."""
    print(f"lensnas predict: warning: {line}", file=sys.stderr)


# ----------------------------------------------------------------------------- reading


def read_source(path: Path, spec: dict[str, Any], hdu: int = 0, name: str | None = None) -> Source:
    """Read one of the INPUTS (a file, a folder or a .zip) and check its images against ``spec``;
    ``name`` names it in messages and tables (default: its path)."""
    name = str(path) if name is None else name
    if path.is_dir():
        files = read_folder(path, spec, hdu, lambda relative: str(Path(name) / relative))
        return Source(path, "folder", files)
    if not path.exists():
        raise DataError(name, "no such file or folder")
    if path.suffix.lower() == ".zip":
        with tempfile.TemporaryDirectory(prefix="lensnas-predict-") as folder:
            extract(path, Path(folder), name)
            files = read_folder(Path(folder), spec, hdu, lambda relative: f"{name}:{relative}")
            return Source(path, "zip", files)
    if path.suffix.lower() not in IMAGE_SUFFIXES:
        raise DataError(name, f"not an input lensnas reads; {READABLE}")
    return Source(path, "file", [read_file(path, name, path.name, spec, hdu)])


def read_folder(
    folder: Path, spec: dict[str, Any], hdu: int, name: Callable[[str], str]
) -> list[ImageFile]:
    """The image files under ``folder``, sorted, recursively; ``name(relative path)`` names
    each in messages and tables."""
    paths = sorted(
        (path for path in folder.rglob("*") if not path.is_dir()),
        key=lambda path: path.relative_to(folder).as_posix(),
    )
    files = []
    for path in paths:
        relative = path.relative_to(folder).as_posix()
        if any(part.startswith(".") or part == "__MACOSX" for part in relative.split("/")):
            continue  # hidden files, as ls and file browsers hide them
        if path.suffix.lower() not in IMAGE_SUFFIXES:
            raise DataError(name(relative), "not an image file; a folder or .zip may hold only "
                                            ".npy and FITS (.fits, .fit, .fts) files")
        files.append(read_file(path, name(relative), relative, spec, hdu))
    if not files:
        raise DataError(name("").rstrip(":/"), "holds no .npy or FITS files")
    return files


def read_file(
    path: Path, name: str, relative: str, spec: dict[str, Any], hdu: int = 0
) -> ImageFile:
    """One .npy or FITS file's images, checked against ``spec`` (``name`` names it in errors)."""
    header = None
    if path.suffix.lower() == ".npy":
        array = read_npy(path, name)
    else:
        array, header = read_fits(path, name, hdu)
    if array.dtype.kind not in "biuf":
        raise DataError(name, f"holds {array.dtype} values, not real numbers")
    images, layout = as_images(array, name, int(spec.get("in_channels", 1)))
    size = spec.get("image_size")
    if size is not None and images.shape[2:] != (int(size), int(size)):
        height, width = images.shape[2:]
        raise DataError(name, f"images of {height}x{width} pixels; the network takes {size}x{size}")
    finite = np.isfinite(images).reshape(len(images), -1).all(axis=1)
    if not finite.all():
        where = f" (image {np.flatnonzero(~finite)[0]})" if len(images) > 1 else ""
        raise DataError(name, f"holds NaN or infinite values{where}")
    return ImageFile(name, relative, images, layout, header)


def read_npy(path: Path, name: str) -> np.ndarray:
    """The array in a .npy file (no pickled objects)."""
    try:
        with open(path, "rb") as handle:
            return np.lib.format.read_array(handle, allow_pickle=False)
    except (ValueError, EOFError, OSError) as error:
        raise DataError(name, f"not a readable .npy file ({error})") from None


def read_fits(path: Path, name: str, hdu: int) -> tuple[np.ndarray, fits.Header]:
    """The image of HDU ``hdu`` of a FITS file, and the file's primary header."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # header repairs, truncation: unusable data raises
            with fits.open(path, memmap=False) as hdus:
                count, header = len(hdus), hdus[0].header.copy()
                data = hdus[hdu].data if hdu < count and hdus[hdu].is_image else None
                data = None if data is None else np.array(data)
                found = [str(i) for i, unit in enumerate(hdus)
                         if unit.is_image and unit.data is not None]
    except (OSError, ValueError, TypeError, IndexError, KeyError) as error:
        raise DataError(name, f"not a readable FITS file ({error})") from None
    if hdu >= count:
        raise DataError(name, f"has {count} HDU(s); --hdu {hdu} does not exist")
    if data is None:
        hint = f"; HDUs with an image: {', '.join(found)} (--hdu)" if found else ""
        raise DataError(name, f"HDU {hdu} holds no image{hint}")
    return data, header


def as_images(array: np.ndarray, name: str, channels: int) -> tuple[np.ndarray, str]:
    """``array`` as (N, C, H, W) float32 for a network of ``channels`` channels, and its layout."""
    shapes = "one image (H, W) or (C, H, W), or a stack (N, H, W) or (N, C, H, W)"
    if array.ndim == 2:
        images, layout = array[None, None], "HW"
    elif array.ndim == 3 and channels > 1 and array.shape[0] == channels:
        images, layout = array[None], "CHW"
    elif array.ndim == 3 and channels == 1:
        images, layout = array[:, None], "NHW"
    elif array.ndim == 4:
        images, layout = array, "NCHW"
    elif array.ndim == 3:
        raise DataError(name, f"shape {array.shape}: the network takes {channels} channels, "
                              f"one image ({channels}, H, W) or a stack (N, {channels}, H, W)")
    else:
        raise DataError(name, f"a {array.ndim}-dimensional array; images are {shapes}")
    if images.shape[1] != channels:
        raise DataError(name, f"images of {images.shape[1]} channel(s) (shape {array.shape}); "
                              f"the network takes {channels}")
    if images.size == 0:
        raise DataError(name, f"holds no images (shape {array.shape})")
    return np.ascontiguousarray(images, dtype=np.float32), layout


def check_archive(archive_path: Path, name: str, max_bytes: int, max_members: int) -> None:
    """Refuse a .zip of more than ``max_members`` members or ``max_bytes`` unpacked bytes, as its
    directory declares them (``extract`` refuses a member larger than declared)."""
    try:
        with zipfile.ZipFile(archive_path) as archive:
            members = archive.infolist()
    except (zipfile.BadZipFile, EOFError, OSError, ValueError) as error:
        raise DataError(name, f"not a readable .zip archive ({error})") from None
    if len(members) > max_members:
        raise DataError(name, f"holds {len(members)} members; at most {max_members} are read")
    if sum(info.file_size for info in members if not info.is_dir()) > max_bytes:
        raise DataError(name, f"unpacks to more than {byte_size(max_bytes)}; refused")


def byte_size(count: int) -> str:
    """A byte count in words: GiB, MiB or bytes."""
    for unit, size in (("GiB", 1024**3), ("MiB", 1024**2)):
        if count >= size:
            return f"{count / size:.4g} {unit}"
    return f"{count} bytes"


def extract(archive_path: Path, folder: Path, name: str | None = None) -> None:
    """Unpack a .zip into ``folder``, refusing links, paths that leave it and oversized contents
    (``name`` names the archive in messages; default: its path)."""
    name = str(archive_path) if name is None else name
    check_archive(archive_path, name, MAX_ARCHIVE_BYTES, MAX_ARCHIVE_MEMBERS)
    root = folder.resolve()
    try:
        with zipfile.ZipFile(archive_path) as archive:
            for info in archive.infolist():
                where = f"{name}:{info.filename}"
                target = (root / info.filename).resolve()
                posix = PurePosixPath(info.filename.replace("\\", "/"))
                drive = PureWindowsPath(info.filename).drive
                if (posix.is_absolute() or ".." in posix.parts or drive
                        or not target.is_relative_to(root)):
                    raise DataError(where, "its path leaves the archive's folder; refused")
                if stat.S_ISLNK(info.external_attr >> 16):
                    raise DataError(where, "a symbolic link; refused")
                if info.is_dir():
                    continue
                target.parent.mkdir(parents=True, exist_ok=True)
                with archive.open(info) as member, open(target, "wb") as copy:
                    copy_at_most(member, copy, info.file_size, where)
    except (zipfile.BadZipFile, zlib.error, EOFError, RuntimeError, NotImplementedError) as error:
        raise DataError(name, f"not a readable .zip archive ({error})") from None


def copy_at_most(source: BinaryIO, target: BinaryIO, size: int, name: str) -> None:
    """Copy ``source`` to ``target``, refusing more than ``size`` bytes (its declared size)."""
    copied = 0
    while chunk := source.read(1 << 20):
        copied += len(chunk)
        if copied > size:
            raise DataError(name, "unpacks to more than its declared size; refused")
        target.write(chunk)


# ----------------------------------------------------------------------------- running


def batches(arrays: Sequence[np.ndarray], batch_size: int) -> Iterator[np.ndarray]:
    """Consecutive images of ``arrays`` (each (N, C, H, W)) in batches of at most ``batch_size``;
    a batch holds images of one shape only."""
    pending: list[np.ndarray] = []
    count = 0
    for array in arrays:
        start = 0
        while start < len(array):
            if pending and pending[0].shape[1:] != array.shape[1:]:
                yield np.concatenate(pending)
                pending, count = [], 0
            take = min(batch_size - count, len(array) - start)
            pending.append(array[start:start + take])
            count, start = count + take, start + take
            if count == batch_size:
                yield np.concatenate(pending)
                pending, count = [], 0
    if pending:
        yield np.concatenate(pending)


def apply(
    model: nn.Module, arrays: Sequence[np.ndarray], batch_size: int = 64, device: str = "cpu",
    quiet: bool = True,
) -> Iterator[np.ndarray]:
    """The network's outputs for each of ``arrays`` (N, C, H, W) in turn, computed in batches."""
    sizes = deque(len(array) for array in arrays)
    done: list[np.ndarray] = []
    ready = 0
    bar = Progress(
        TextColumn("[bold]predict"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        console=Console(stderr=True), disable=quiet, transient=True,
    )
    with bar, torch.inference_mode():
        task = bar.add_task("predict", total=sum(sizes))
        for batch in batches(arrays, batch_size):
            output = model(torch.from_numpy(batch).to(device)).float().cpu().numpy()
            done.append(output)
            ready += len(output)
            bar.advance(task, len(output))
            while sizes and ready >= sizes[0]:
                size = sizes.popleft()
                outputs = np.concatenate(done)
                done, ready = [outputs[size:]] if ready > size else [], ready - size
                yield outputs[:size]


# ----------------------------------------------------------------------------- PSF, calibration


@dataclass
class PsfPlan:
    """What the PSF options ask for, checked against the network."""

    channels: int  # the network's input channels
    calibrate: bool  # metacal response calibration
    pixel_scale: float = 0.0  # arcsec per pixel (calibration only)
    noise_sigma: float = 0.0  # the stamps' pixel noise (calibration only)
    step: float = 0.01  # metacal's shear step
    target_psf: str = "gauss"  # metacal's reconvolution PSF (the export's input.calibration_psf)


def psf_plan(
    spec: dict[str, Any], psf: str | Path | None, calibrate: str | None,
    pixel_scale: float | None, noise_sigma: float | None,
) -> PsfPlan:
    """Check ``--psf``, ``--calibrate``, ``--pixel-scale`` and ``--noise-sigma`` against the
    network of ``spec``; a refusal is one line naming the option and what is allowed."""
    columns = tuple(family(spec["family"]).output_columns)
    returns = ", ".join(columns) if columns else "images"
    shear = columns[:2] == SHEAR_COLUMNS
    channels = int(spec.get("in_channels", 1))
    if calibrate is not None and calibrate not in CALIBRATIONS:
        raise OptionError(f"--calibrate: {calibrate!r} is not allowed; allowed: "
                          f"{', '.join(CALIBRATIONS)}")
    if calibrate and columns != SHEAR_COLUMNS:
        raise OptionError(f"--calibrate metacal: only for shear networks, which return g1, g2; "
                          f"this {spec['family']} network returns {returns}")
    if calibrate and psf is None:
        raise OptionError(f"--calibrate metacal: needs --psf FILE ({PSF_FILE}): metacal "
                          "deconvolves each stamp by its PSF")
    if psf is None and shear and channels == 2:
        raise OptionError(f"--psf: required: this network takes the PSF image as its second "
                          f"input channel (in_channels 2); give --psf FILE, {PSF_FILE}")
    if psf is not None and not shear:
        raise OptionError(f"--psf: only for shear networks, which return g1, g2; this "
                          f"{spec['family']} network returns {returns}")
    if psf is not None and channels not in (1, 2):
        raise OptionError(f"--psf: this network takes {channels} input channels; a PSF goes "
                          "with networks of 2 (stamp, PSF) or, with --calibrate metacal, of 1")
    if psf is not None and channels == 1 and not calibrate:
        raise OptionError("--psf: this network takes no PSF channel (in_channels 1); with it "
                          "a PSF is used only by --calibrate metacal")
    if not calibrate:
        for flag, value in (("--pixel-scale", pixel_scale), ("--noise-sigma", noise_sigma)):
            if value is not None:
                raise OptionError(f"{flag}: used only with --calibrate metacal")
        return PsfPlan(channels, False)
    stored = spec.get("input") if isinstance(spec.get("input"), dict) else {}
    trained = stored.get("pixel_scale_arcsec")
    trained = float(trained) if is_number(trained) and trained > 0 else None
    if pixel_scale is not None and not (np.isfinite(pixel_scale) and pixel_scale > 0):
        raise OptionError(f"--pixel-scale: must be a positive number of arcsec per pixel, "
                          f"got {pixel_scale!r}")
    if trained is None and pixel_scale is None:
        raise OptionError("--pixel-scale: required by --calibrate metacal: the export stores no "
                          "pixel scale (input.pixel_scale_arcsec); give the stamps' arcsec per "
                          "pixel")
    if trained is not None and pixel_scale is not None and not np.isclose(
            pixel_scale, trained, rtol=1e-6, atol=0):
        raise OptionError(f"--pixel-scale: {pixel_scale:g} differs from the {trained:g} "
                          "arcsec/pixel the network was trained at (its export's "
                          f"input.pixel_scale_arcsec); leave it out, or give stamps at {trained:g}")
    if noise_sigma is None:
        noise_sigma = stored.get("noise_sigma")
        if not (is_number(noise_sigma) and noise_sigma >= 0):
            raise OptionError(
                "--noise-sigma: required by --calibrate metacal: the export stores no single "
                f"noise level (input.noise_sigma: {stored.get('noise_sigma', 'absent')}); give "
                "the stamps' pixel noise sigma (metacal corrects for noise above "
                f"{FIX_NOISE_ABOVE:g})")
    elif not (np.isfinite(noise_sigma) and noise_sigma >= 0):
        raise OptionError(f"--noise-sigma: must be a number >= 0, got {noise_sigma!r}")
    target = stored.get("calibration_psf", "gauss")
    if target not in TARGET_PSFS:
        raise OptionError(f"--calibrate metacal: the export's input.calibration_psf is {target!r}; "
                          f"allowed: {', '.join(TARGET_PSFS)}")
    return PsfPlan(channels, True, trained or float(pixel_scale or 0), float(noise_sigma),
                   target_psf=target)


FIX_NOISE_ABOVE = 1e-4  # as lensnas.objectives.shear.metacal (not imported: it loads GalSim)
TARGET_PSFS = ("dilate", "fitgauss", "gauss")  # likewise


def is_number(value: Any) -> bool:
    """Whether ``value`` is a finite real number (not a bool)."""
    return (isinstance(value, (int, float)) and not isinstance(value, bool)
            and bool(np.isfinite(value)))


def read_psf(path: Path, files: Sequence[ImageFile]) -> np.ndarray:
    """The PSF image(s) of ``--psf``, checked against the stamps of ``files`` and normalised to
    unit sum: (H, W) for all stamps or (N, H, W), float32."""
    name = f"--psf {path}"
    if not path.is_file():
        raise DataError(name, f"no such file; give {PSF_FILE}")
    if path.suffix.lower() not in IMAGE_SUFFIXES:
        raise DataError(name, f"not a .npy or FITS file; give {PSF_FILE}")
    array = read_npy(path, name) if path.suffix.lower() == ".npy" else read_fits(path, name, 0)[0]
    if array.dtype.kind not in "biuf":
        raise DataError(name, f"holds {array.dtype} values, not real numbers")
    count = sum(len(file.images) for file in files)
    sizes = sorted({file.images.shape[2:] for file in files})
    if len(sizes) > 1:
        raise DataError(name, f"the stamps have several sizes ({sizes[0]}, {sizes[1]}); one "
                              "PSF file goes with stamps of one size")
    height, width = sizes[0]
    if not ((array.ndim == 2 and array.shape == (height, width))
            or (array.ndim == 3 and array.shape == (count, height, width))):
        raise DataError(name, f"shape {array.shape}; the inputs hold {count} stamp(s) of "
                              f"{height}x{width} pixels: give one PSF ({height}, {width}) for "
                              f"all or one per stamp ({count}, {height}, {width})")
    array = np.asarray(array, dtype=np.float64)
    if not np.isfinite(array).all():
        raise DataError(name, "holds NaN or infinite values")
    sums = array.sum(axis=(-2, -1))
    if np.any(sums <= 0):
        bad = int(np.flatnonzero(np.atleast_1d(sums) <= 0)[0])
        where = f"PSF {bad} sums" if array.ndim == 3 else "the PSF sums"
        raise DataError(name, f"{where} to {np.atleast_1d(sums)[bad]:g}; a PSF image must have "
                              "a positive sum (it is normalised to 1)")
    return (array / sums[..., None, None]).astype(np.float32)


def with_psf_channel(files: Sequence[ImageFile], psf_images: np.ndarray, channels: int) -> None:
    """Give each file's stamps their PSF as channel 2, for a network of 2 input channels."""
    if channels != 2:
        return
    start = 0
    for file in files:
        count = len(file.images)
        psf = psf_images if psf_images.ndim == 2 else psf_images[start:start + count]
        psf = np.broadcast_to(psf, (count, *file.images.shape[2:]))
        file.images = np.ascontiguousarray(np.concatenate([file.images, psf[:, None]], axis=1))
        start += count


def metacal_images_of(
    files: Sequence[ImageFile], psf_images: np.ndarray, plan: PsfPlan, quiet: bool,
    size: int | None,
) -> dict[str, np.ndarray]:
    """Metacal's images of every stamp of ``files``, in order (see ``calibration``), cropped to
    the network's ``size`` (stamps larger than the network's input keep a sheared stamp's edge
    away from what the network reads)."""
    from lensnas.objectives.shear.calibration import metacal_images

    for file in files:
        height, width = file.images.shape[2:]
        if height != width:
            raise DataError(file.name, f"stamps of {height}x{width} pixels; --calibrate metacal "
                                       "needs square stamps")
        if size is not None and (height < size or (height - size) % 2):
            raise DataError(file.name, f"stamps of {height}x{width} pixels; the network takes "
                                       f"{size}x{size}: with --calibrate metacal give stamps of "
                                       f"{size}x{size} or larger by an even number of pixels "
                                       "(cropped to the centre after metacal; about 1.5x is "
                                       "enough)")
    stamps = np.concatenate([file.images[:, 0] for file in files])
    return metacal_images(stamps, psf_images, plan.pixel_scale, plan.noise_sigma,
                          step=plan.step, psf=plan.target_psf, progress=not quiet,
                          crop=None if size is None else int(size))


def network_inputs(metacal_set: dict[str, np.ndarray], channels: int) -> np.ndarray:
    """The network's inputs for metacal's unsheared images (N, channels, H, W): the images and,
    for a network of 2 channels, their PSF (the reconvolution PSF)."""
    images = np.asarray(metacal_set["noshear"])[:, None]
    if channels == 2:
        psf = np.broadcast_to(metacal_set["psf_target"], images[:, 0].shape)[:, None]
        images = np.concatenate([images, psf], axis=1)
    return images


def calibrated_rows(
    model: nn.Module, metacal_set: dict[str, np.ndarray], plan: PsfPlan, batch_size: int,
    device: str, quiet: bool, on_response: Callable[[np.ndarray, int, int], None] | None,
) -> np.ndarray:
    """Per stamp (N, 8): the network's raw (g1, g2) on metacal's unsheared image, its response
    R11, R12, R21, R22 and the shear calibrated by the mean response of all stamps."""
    from lensnas.objectives.shear.calibration import calibrated, network_response

    def estimate(images: np.ndarray, psf: np.ndarray | None) -> np.ndarray:
        x = images[:, None]
        if plan.channels == 2:
            x = np.concatenate([x, np.broadcast_to(psf, images.shape)[:, None]], axis=1)
        with closing(apply(model, [np.ascontiguousarray(x, dtype=np.float32)], batch_size,
                           device, quiet)) as outputs:
            return next(outputs).reshape(len(images), -1)

    e, response = network_response(estimate, metacal_set, plan.step)
    ok = np.asarray(metacal_set["ok"], dtype=bool)
    e[~ok], response[~ok] = np.nan, np.nan
    result = calibrated(e, response, ok)
    if on_response is not None:
        on_response(result["response"], int(np.count_nonzero(result["ok"])), len(e))
    return np.column_stack([e, response.reshape(len(e), 4), result["g"]])


def split_rows(values: np.ndarray, files: Sequence[ImageFile]) -> Iterator[np.ndarray]:
    """The rows of ``values`` of each of ``files`` in turn."""
    start = 0
    for file in files:
        yield values[start:start + len(file.images)]
        start += len(file.images)


# ----------------------------------------------------------------------------- writing


def write_table(
    path: Path, files: Sequence[ImageFile], results: Iterable[np.ndarray], columns: Sequence[str]
) -> None:
    """A CSV of one row per image: file, index within the file, then ``columns``."""
    # An exported ensemble's uncertainties would come as more columns (sigma_<column>) with their
    # values appended to each row: ``columns`` and ``results`` are all this function knows.
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["file", "index", *columns])
        for file, values in zip(files, results, strict=True):
            values = values.reshape(len(values), -1)
            if values.shape[1] != len(columns):
                raise ArchitectureError(f"the network returns {values.shape[1]} numbers per image; "
                                        f"its family names {len(columns)}: {', '.join(columns)}")
            for index, row in enumerate(values):
                writer.writerow([file.name, index, *(format(float(v), ".9g") for v in row)])


def image_targets(sources: Sequence[Source], output: Path) -> list[Path]:
    """Where each source's output images go: ``output`` itself for a single source (a file, a
    folder or a .zip like it), else ``output/<the source's name>``."""
    if len(sources) == 1:
        targets = [output]
    else:
        names = [source.path.name for source in sources]
        twice = sorted({name for name in names if names.count(name) > 1})
        if twice:
            raise OptionError(f"INPUTS: several inputs are named {twice[0]!r}; with several "
                              "inputs -o is a folder holding one output per input, by name")
        if output.exists() and not output.is_dir():
            raise OptionError(f"-o: {output} is a file; with several inputs it is a folder")
        targets = [output / name for name in names]
    for source, target in zip(sources, targets, strict=True):
        if target.resolve() == source.path.resolve():
            raise OptionError(f"-o: {target} is the input itself; choose another output")
        if source.kind == "folder":
            if target.exists() and not target.is_dir():
                raise OptionError(f"-o: {target} is a file; a folder input writes a folder")
        elif target.is_dir():
            raise OptionError(f"-o: {target} is a folder; {source.path.name} writes one file")
        elif file_format(target) != file_format(source.path):
            raise OptionError(f"-o: {target}: the output of {source.path.name} is a "
                              f"{file_format(source.path)} file like it; name it so")
    return targets


def file_format(path: Path) -> str:
    """'npy', 'FITS', 'zip' or the suffix: what a file name says it holds."""
    suffix = path.suffix.lower()
    return "FITS" if suffix in FITS_SUFFIXES else suffix.lstrip(".") or "?"


def write_images(source: Source, results: Iterator[np.ndarray], target: Path) -> None:
    """Write the output images of ``source``'s files (the next of ``results``) to ``target``."""
    with image_writer(source.kind, target) as write:
        for file in source.files:
            write(file.relative, encode(file, next(results)))


@contextmanager
def image_writer(kind: str, target: Path) -> Iterator[Callable[[str, bytes], None]]:
    """A function writing a file's bytes under its relative name: into the .zip ``target`` for
    a zip source, under the folder ``target`` for a folder, as ``target`` itself for a file."""
    target.parent.mkdir(parents=True, exist_ok=True)
    if kind == "zip":
        with zipfile.ZipFile(target, "w", zipfile.ZIP_DEFLATED) as archive:
            yield archive.writestr
        return

    def write(relative: str, data: bytes) -> None:
        path = target / relative if kind == "folder" else target
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)

    yield write


def encode(file: ImageFile, output: np.ndarray) -> bytes:
    """The output images (N, C, H, W) of ``file`` in its format and layout (a single-channel
    output drops its channel axis where the input had none)."""
    if file.layout in ("HW", "CHW"):
        output = output[0]
    if file.layout in ("HW", "NHW") and output.shape[-3] == 1:
        output = output[..., 0, :, :]
    buffer = io.BytesIO()
    if file.header is None:
        np.save(buffer, np.ascontiguousarray(output), allow_pickle=False)
    else:
        header = file.header.copy()
        for key in FITS_DATA_KEYS:
            header.remove(key, ignore_missing=True, remove_all=True)
        fits.PrimaryHDU(np.ascontiguousarray(output), header=header).writeto(buffer)
    return buffer.getvalue()
