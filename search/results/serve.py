"""``lensnas serve``: a local web page that applies exported networks to uploaded images.

The page lists the networks exported under the export folder (each folder holding an
architecture.json, the folder itself or at most two levels down: ``best/trial-17``,
``best/<study>/trial-17``) with the task and the first metrics of its MODEL_CARD.md. Files
dropped on it (.npy, FITS, .zip) go to ``POST /api/predict/<network>`` as a multipart form;
:func:`lensnas.search.results.predict.predict` runs on them as ``lensnas predict`` would, and the answer
is ``results.zip``: a network returning numbers gives ``predictions.csv``, an image network the
zip it wrote for one uploaded .zip, else its outputs by file name. A client that accepts
``multipart/form-data`` (the page) gets that zip and a JSON preview of the first images.

With a storage, the page also lists its studies; exporting one writes its best trial to
``<export dir>/<study>/trial-<n>``, as ``lensnas export STUDY --top 1 -o <export dir>/<study>``.

Uploads are kept in a temporary folder (under ``$TMPDIR``) that is removed before the answer is
sent: the results are streamed from a file already deleted. A refused upload is a 4xx whose JSON
``detail`` is one line: a body over the upload limit (413), a .zip that unpacks to more than
``UNPACKED_PER_UPLOAD`` times it or holds more than ``MAX_UPLOAD_FILES`` members, file names
or members with a path that leaves the folder, links, files that are not .npy or FITS, NaNs
and shapes the network does not take (400).
"""

from __future__ import annotations

import base64
import io
import json
import os
import re
import secrets
import shutil
import socket
import sys
import tempfile
import threading
import time
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, StreamingResponse
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.concurrency import run_in_threadpool

from lensnas.search.results.predict import (
    IMAGE_SUFFIXES,
    ImageFile,
    byte_size,
    check_archive,
    predict,
)
from lensnas.search.study import resolve_device
from lensnas.spaces import family
from lensnas.spaces.errors import DataError, LensnasError, OptionError
from lensnas.spaces.loading import ARCHITECTURE_FILE, read_architecture

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8000
DEFAULT_MAX_UPLOAD_MB = 200.0
UNPACKED_PER_UPLOAD = 4  # an uploaded .zip may unpack to this many times the upload limit
MAX_UPLOAD_FILES = 1000  # files in one upload, and members in one uploaded .zip
DRAIN_PER_UPLOAD = 2  # a refused body is read (and dropped) up to this many times the limit
PREVIEW_IMAGES = 4
PREVIEW_ROWS = 20
CARD_METRICS = 6  # metric rows of the card shown per network (the study's metrics come first)
MODEL_CARD = "MODEL_CARD.md"  # as lensnas.search.results.export writes it
RESULTS = "results.zip"
TABLE = "predictions.csv"
CHUNK_BYTES = 1 << 20
PAGE = "serve_page.html"


def log(line: str) -> None:
    """One progress or refusal line on the server's console (stderr)."""
    print(f"lensnas serve: {line}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- networks


@dataclass
class Network:
    """An exported folder as the page lists it."""

    name: str  # its path relative to the export folder ("trial-17", "study/trial-17")
    folder: Path
    family: str = ""
    task: str = ""  # the study's objective (from the card), else the family
    title: str = ""  # the card's first line
    returns: list[str] = field(default_factory=list)  # numbers per image; empty: images
    metrics: list[list[str]] = field(default_factory=list)  # (metric, value, error) rows
    error: str = ""  # why it cannot be used

    def public(self) -> dict[str, Any]:
        """What the page is told (not the folder's path on this machine)."""
        return {key: value for key, value in self.__dict__.items() if key != "folder"}


def find_networks(export_dir: Path) -> dict[str, Network]:
    """The exported networks in ``export_dir`` (itself, or one or two levels down), by name."""
    if not export_dir.is_dir():
        return {}
    folders = [export_dir, *sorted(export_dir.glob("*/")), *sorted(export_dir.glob("*/*/"))]
    networks = {}
    for folder in folders:
        if (folder / ARCHITECTURE_FILE).is_file():
            relative = folder.relative_to(export_dir).as_posix()
            name = export_dir.resolve().name if relative == "." else relative
            networks[name] = describe_network(name, folder)
    return networks


def describe_network(name: str, folder: Path) -> Network:
    """A network's family, task and card metrics; an unreadable one carries its error line."""
    try:
        spec = read_architecture(folder)
    except LensnasError as error:
        return Network(name, folder, error=str(error))
    card = folder / MODEL_CARD
    text = card.read_text(encoding="utf-8", errors="replace") if card.is_file() else ""
    title = text.splitlines()[0].lstrip("# ") if text.startswith("# ") else name
    objective = re.search(r"objective `([^`]+)`", text)
    returns = list(family(spec["family"]).output_columns)
    error = ""
    if returns[:2] == ["g1", "g2"] and int(spec.get("in_channels", 1)) == 2:
        error = ("takes each stamp's PSF image as a second input channel, which this page does "
                 "not upload; run lensnas predict FOLDER STAMPS --psf PSF -o shears.csv")
    return Network(
        name, folder, family=spec["family"], task=objective[1] if objective else spec["family"],
        title=title, returns=returns, metrics=card_metrics(text)[:CARD_METRICS], error=error,
    )


def card_metrics(card: str) -> list[list[str]]:
    """The rows (metric, value, error) of a model card's "Metrics" table."""
    _, found, section = card.partition("## Metrics")
    lines = section.split("\n## ", 1)[0].splitlines() if found else []
    rows = [[cell.strip() for cell in line.strip().strip("|").split("|")]
            for line in lines if line.startswith("|")]
    return [row for row in rows[2:] if len(row) == 3]  # below the header and its rule


# ----------------------------------------------------------------------------- uploads


class Refused(Exception):
    """An upload refused with an HTTP status and a one-line reason."""

    def __init__(self, status: int, reason: str):
        super().__init__(reason)
        self.status = status
        self.reason = reason


def check_upload_name(name: str) -> None:
    """Refuse an uploaded file's name that is not a plain file name (a path, '..', controls)."""
    if (name in ("", ".", "..") or "/" in name or "\\" in name or len(name.encode()) > 255
            or any(ord(character) < 32 for character in name)):
        raise DataError(repr(name), "an uploaded file's name must be a plain file name (no "
                                    "folders, '/', '\\' or '..'); refused")


class UploadWriter:
    """Multipart callbacks writing each uploaded file into ``folder`` under its own name."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.paths: list[Path] = []
        self.headers: dict[bytes, bytes] = {}
        self.field = self.value = b""
        self.file: BinaryIO | None = None

    def callbacks(self) -> dict[str, Callable[..., None]]:
        return {
            "on_part_begin": self.headers.clear,
            "on_header_field": lambda data, start, end: self._add("field", data[start:end]),
            "on_header_value": lambda data, start, end: self._add("value", data[start:end]),
            "on_header_end": self._header_end,
            "on_headers_finished": self._open,
            "on_part_data": lambda data, start, end: self.file.write(data[start:end]),
            "on_part_end": self.close,
        }

    def _add(self, which: str, data: bytes) -> None:
        setattr(self, which, getattr(self, which) + data)

    def _header_end(self) -> None:
        self.headers[self.field.strip().lower()] = self.value.strip()
        self.field = self.value = b""

    def _open(self) -> None:
        _, options = parse_options_header(self.headers.get(b"content-disposition", b""))
        field_name = options.get(b"name", b"").decode("utf-8", "replace")
        if b"filename" not in options:
            raise DataError(f"form field {field_name!r}", "not a file; send only files")
        try:
            name = options[b"filename"].decode("utf-8")
        except UnicodeDecodeError:
            raise DataError(repr(options[b"filename"]), "a file name that is not UTF-8") from None
        check_upload_name(name)
        if len(self.paths) >= MAX_UPLOAD_FILES:
            raise DataError(name, f"more than {MAX_UPLOAD_FILES} files in one upload; refused")
        path = self.folder / name
        if path in self.paths:
            raise DataError(name, "uploaded twice; give each file once")
        self.paths.append(path)
        self.file = open(path, "xb")  # noqa: SIM115 (closed by on_part_end or close)

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None


async def receive_files(request: Request, folder: Path, max_bytes: int) -> list[Path]:
    """Write the files of a multipart upload into ``folder``, refusing a body over ``max_bytes``.

    After a refusal the rest of the body is read and dropped (up to ``DRAIN_PER_UPLOAD`` times
    the limit) so that the client, still sending, receives the answer rather than a reset.
    """
    kind, options = parse_options_header(request.headers.get("content-type"))
    if kind != b"multipart/form-data" or not options.get(b"boundary"):
        raise Refused(400, "send the files as multipart/form-data (a form of file fields)")
    declared = request.headers.get("content-length", "")
    too_large = Refused(413, f"the upload is larger than {byte_size(max_bytes)} (the server's "
                             "--max-upload-mb); refused")
    if declared.isdigit() and int(declared) > DRAIN_PER_UPLOAD * max_bytes:
        raise too_large
    folder.mkdir()
    writer = UploadWriter(folder)
    parser = MultipartParser(options[b"boundary"], writer.callbacks())
    refusal: Refused | None = None
    received = 0
    try:
        async for chunk in request.stream():
            received += len(chunk)
            if refusal is None and received > max_bytes:
                refusal = too_large
            if refusal is None:
                try:
                    parser.write(chunk)
                except (LensnasError, ValueError, OSError) as error:
                    refusal = Refused(400, f"{error}")
            elif received > DRAIN_PER_UPLOAD * max_bytes:
                break
        if refusal is None:
            try:
                parser.finalize()
            except ValueError as error:
                refusal = Refused(400, f"not a complete multipart form ({error})")
    finally:
        writer.close()
    if refusal is not None:
        raise refusal
    if not writer.paths:
        raise Refused(400, "no files received; send .npy, FITS or .zip files")
    return writer.paths


# ----------------------------------------------------------------------------- predicting


@dataclass
class Preview:
    """The first results, for the page: a table of numbers or pairs of input/output images."""

    columns: list[str]
    rows: list[list[Any]] = field(default_factory=list)
    images: list[dict[str, Any]] = field(default_factory=list)

    def add(self, file: ImageFile, outputs: np.ndarray) -> None:
        """Keep the first rows or images of one file's results (``predict``'s ``on_output``)."""
        for index, output in enumerate(outputs):
            if self.columns and len(self.rows) < PREVIEW_ROWS:
                self.rows.append([file.name, index, *(float(v) for v in output.reshape(-1))])
            elif not self.columns and len(self.images) < PREVIEW_IMAGES:
                self.images.append({
                    "file": file.name, "index": index,
                    "input": png(file.images[index]), "output": png(output),
                    "input_shape": list(file.images[index].shape),
                    "output_shape": list(output.shape),
                })

    def public(self, count: int, warnings: list[str]) -> dict[str, Any]:
        kind = "table" if self.columns else "images"
        return {"kind": kind, "count": count, "warnings": warnings,
                "columns": ["file", "index", *self.columns], "rows": self.rows,
                "images": self.images}


def png(image: np.ndarray) -> str:
    """A (C, H, W) image's first channel as a grey PNG data URL, scaled from its min to max."""
    from matplotlib.image import imsave

    channel = np.asarray(image, dtype=np.float64).reshape(-1, *image.shape[-2:])[0]
    low, high = float(channel.min()), float(channel.max())
    buffer = io.BytesIO()
    imsave(buffer, channel, cmap="gray", vmin=low, vmax=high if high > low else low + 1,
           format="png")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


@dataclass
class Results:
    zip_file: BinaryIO  # open for reading: it stays readable once its folder is removed
    preview: dict[str, Any]
    count: int


def run_prediction(network: Network, paths: list[Path], work: Path, max_unpacked: int,
                   device: str, batch_size: int) -> Results:
    """``lensnas predict`` on the uploaded files (named by their names), zipped: the zip is
    returned open, to be read after ``work`` is removed."""
    for path in paths:
        if path.suffix.lower() == ".zip":
            check_archive(path, path.name, max_unpacked, MAX_UPLOAD_FILES)
    output = work / "out"
    if network.returns:
        target = output / TABLE
    else:
        target = output / (paths[0].name if len(paths) == 1 else "results")
    preview, warnings = Preview(network.returns), []
    count = predict(
        network.folder, paths, target, device=device, batch_size=batch_size, quiet=True,
        warn=warnings.append, names=[path.name for path in paths], on_output=preview.add,
    )
    if target.suffix.lower() == ".zip" and target.is_file():
        zip_path = target  # an uploaded .zip's results, as lensnas predict wrote them
    else:
        zip_path = work / RESULTS
        zip_tree(target, zip_path)
    handle = open(zip_path, "rb")  # noqa: SIM115 (closed once streamed)
    return Results(handle, preview.public(count, warnings), count)


def zip_tree(path: Path, archive_path: Path) -> None:
    """A .zip of the file ``path`` (by its name) or of the files under the folder ``path``."""
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    with zipfile.ZipFile(archive_path, "w", zipfile.ZIP_DEFLATED) as archive:
        for file in files:
            archive.write(file, file.name if file == path else file.relative_to(path).as_posix())


def file_chunks(handle: BinaryIO) -> Iterator[bytes]:
    with handle:
        while chunk := handle.read(CHUNK_BYTES):
            yield chunk


def results_response(handle: BinaryIO, preview: dict[str, Any], accept: str) -> StreamingResponse:
    """The results zip; for a client accepting multipart/form-data, the preview JSON (field
    "preview") and the zip (file "results") in one multipart form."""
    size = os.fstat(handle.fileno()).st_size
    disposition = f'attachment; filename="{RESULTS}"'
    if "multipart/form-data" not in accept:
        return StreamingResponse(file_chunks(handle), media_type="application/zip",
                                 headers={"Content-Disposition": disposition,
                                          "Content-Length": str(size)})
    boundary = secrets.token_hex(16)
    head = (f'--{boundary}\r\nContent-Disposition: form-data; name="preview"\r\n'
            "Content-Type: application/json\r\n\r\n").encode() + json.dumps(preview).encode()
    head += (f'\r\n--{boundary}\r\nContent-Disposition: form-data; name="results"; '
             f'filename="{RESULTS}"\r\nContent-Type: application/zip\r\n\r\n').encode()
    tail = f"\r\n--{boundary}--\r\n".encode()

    def body() -> Iterator[bytes]:
        yield head
        yield from file_chunks(handle)
        yield tail

    return StreamingResponse(body(), media_type=f"multipart/form-data; boundary={boundary}",
                             headers={"Content-Length": str(len(head) + size + len(tail))})


# ----------------------------------------------------------------------------- the app


def create_app(
    export_dir: str | Path, storage_url: str | None = None,
    max_upload_bytes: int = int(DEFAULT_MAX_UPLOAD_MB * 1024**2), device: str = "auto",
    batch_size: int = 64,
) -> FastAPI:
    """The web application of ``lensnas serve`` (see the module's docstring)."""
    export_dir = Path(export_dir)
    storage = None
    if storage_url is not None:
        from lensnas.search.storage import open_storage

        storage = open_storage(storage_url, must_exist=True)
    export_lock = threading.Lock()
    app = FastAPI(title="lensnas serve", docs_url=None, redoc_url=None, openapi_url=None)

    def network_named(name: str) -> Network:
        network = find_networks(export_dir).get(name)
        if network is None:
            raise Refused(404, f"no exported network {name!r} in {export_dir}")
        if network.error:
            raise Refused(400, network.error)
        return network

    @app.exception_handler(Refused)
    async def refused(request: Request, error: Refused) -> JSONResponse:
        log(f"{request.method} {request.url.path}: refused ({error.status}): {error.reason}")
        return JSONResponse({"detail": error.reason}, status_code=error.status)

    @app.get("/", response_class=HTMLResponse)
    def page() -> str:
        return resources.files("lensnas.search.results").joinpath(PAGE).read_text(encoding="utf-8")

    @app.get("/api/networks")
    def networks() -> dict[str, Any]:
        studies = None
        if storage is not None:
            import optuna

            studies = [
                {"name": summary.study_name, "objective": summary.user_attrs.get("objective", ""),
                 "trials": summary.n_trials}
                for summary in optuna.get_all_study_summaries(storage, include_best_trial=False)
            ]
        return {
            "export_dir": str(export_dir),
            "networks": [network.public() for network in find_networks(export_dir).values()],
            "studies": studies,
            "max_upload_bytes": max_upload_bytes,
            "accepts": [*IMAGE_SUFFIXES, ".zip"],
        }

    @app.get("/api/card/{name:path}", response_class=PlainTextResponse)
    def card(name: str) -> str:
        path = network_named(name).folder / MODEL_CARD
        if not path.is_file():
            raise Refused(404, f"network {name!r} has no {MODEL_CARD}")
        return path.read_text(encoding="utf-8", errors="replace")

    @app.post("/api/predict/{name:path}")
    async def predict_upload(name: str, request: Request) -> StreamingResponse:
        network = network_named(name)
        started = time.monotonic()
        work = Path(tempfile.mkdtemp(prefix="lensnas-serve-"))
        try:
            paths = await receive_files(request, work / "in", max_upload_bytes)
            results = await run_in_threadpool(
                run_prediction, network, paths, work, UNPACKED_PER_UPLOAD * max_upload_bytes,
                device, batch_size,
            )
        except LensnasError as error:
            raise Refused(400, str(error)) from None
        finally:
            shutil.rmtree(work, ignore_errors=True)  # the open results file is read until sent
        log(f"{name}: {len(paths)} file(s) -> {results.count} image(s) in "
            f"{time.monotonic() - started:.1f} s")
        return results_response(results.zip_file, results.preview,
                                request.headers.get("accept", ""))

    @app.post("/api/export/{study_name:path}")
    async def export(study_name: str) -> dict[str, Any]:
        if storage is None:
            raise Refused(404, "no storage: start lensnas serve with --storage URL to export")
        if not re.fullmatch(r"[\w][\w.+-]*", study_name):
            raise Refused(400, f"study {study_name!r}: its name is not a folder name; export it "
                               "with lensnas export STUDY -o FOLDER")
        started = time.monotonic()
        try:
            folders = await run_in_threadpool(export_best, study_name, storage, storage_url,
                                              export_dir / study_name, export_lock)
        except LensnasError as error:
            raise Refused(400, str(error)) from None
        names = [folder.relative_to(export_dir).as_posix() for folder in folders]
        log(f"exported {', '.join(names)} in {time.monotonic() - started:.1f} s")
        return {"exported": names}

    return app


def export_best(study_name: str, storage: Any, storage_url: str, folder: Path,
                lock: threading.Lock) -> list[Path]:
    """Export the best trial of a stored study into ``folder`` (one export at a time)."""
    import optuna

    from lensnas.search.results.export import export_study
    from lensnas.search.spec import SpecError

    names = [s.study_name for s in optuna.get_all_study_summaries(storage, False)]
    if study_name not in names:
        raise SpecError(f"study {study_name!r} not found; stored studies: {', '.join(names)}")
    with lock:
        study = optuna.load_study(study_name=study_name, storage=storage)
        return export_study(study, storage_url, folder, top=1)


# ----------------------------------------------------------------------------- serving


def listening_socket(host: str, port: int) -> socket.socket:
    """A TCP socket bound to ``host``:``port`` and listening; a busy port is an OptionError."""
    if not 0 <= port <= 65535:
        raise OptionError(f"--port: must be 0-65535 (0: any free port), got {port}")
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host.strip("[]"), port))
        sock.listen(128)
    except OSError as error:
        sock.close()
        raise OptionError(
            f"--host {host} --port {port}: cannot listen ({error.strerror or error}); "
            "choose another --port (0: any free port) or --host"
        ) from None
    return sock


def serve(
    export_dir: str | Path = "best", storage_url: str | None = None, host: str = DEFAULT_HOST,
    port: int = DEFAULT_PORT, max_upload_mb: float = DEFAULT_MAX_UPLOAD_MB,
    device: str = "auto", batch_size: int = 64,
) -> None:
    """Serve the page on ``host``:``port`` until Ctrl-C (or SIGTERM); prints its URL."""
    import uvicorn

    export_dir = Path(export_dir)
    if not export_dir.is_dir() and storage_url is None:
        raise OptionError(f"--export-dir {export_dir}: no such folder; export networks into it "
                          "(lensnas export STUDY -o FOLDER) or give --storage to export from "
                          "the page")
    if not max_upload_mb > 0:
        raise OptionError(f"--max-upload-mb: must be more than 0, got {max_upload_mb}")
    if batch_size < 1:
        raise OptionError(f"--batch-size: must be at least 1, got {batch_size}")
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", device):
        raise OptionError(f"--device: {device!r} is not allowed; allowed: auto, cpu, cuda, cuda:N")
    device = resolve_device(device, "--device")
    app = create_app(export_dir, storage_url, int(max_upload_mb * 1024**2), device, batch_size)
    sock = listening_socket(host, port)
    bound = sock.getsockname()[1]
    shown = f"[{host.strip('[]')}]" if ":" in host else host
    count = len(find_networks(export_dir))
    print(f"lensnas serve: {count} network(s) in {export_dir} at http://{shown}:{bound}/ "
          "(Ctrl-C to stop)", flush=True)
    server = uvicorn.Server(uvicorn.Config(app, log_level="info", timeout_graceful_shutdown=5))
    try:
        server.run(sockets=[sock])
    except KeyboardInterrupt:  # uvicorn re-raises the Ctrl-C or SIGTERM it shut down on
        pass
    finally:
        sock.close()
    print("lensnas serve: stopped", flush=True)
