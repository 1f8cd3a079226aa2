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
) -> int:
    """Apply the network exported in ``exported`` to ``inputs``, write ``output``; image count.

    ``names`` name the inputs in messages and in the CSV (default: their paths);
    ``on_output(file, outputs)`` sees each file's outputs before they are written.
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
    device = resolve_device(device, "--device")
    names = names or [str(path) for path in inputs]
    if len(names) != len(inputs):
        raise ValueError(f"{len(names)} names for {len(inputs)} inputs")
    sources = [read_source(Path(path), spec, hdu, name) for path, name in zip(inputs, names)]
    output = Path(output)
    targets = [] if columns else image_targets(sources, output)
    files = [file for source in sources for file in source.files]
    if columns and any(output.resolve() == Path(path).resolve() for path in inputs):
        raise OptionError(f"-o: {output} is one of the inputs; choose another output")
    for file in files:
        for line in check_input(spec, file.images):
            (warn or print_warning)(f"{file.name}: {line}")
    model = load(exported, map_location=device).to(device)
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
