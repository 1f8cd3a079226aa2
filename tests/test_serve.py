"""lensnas serve: the server runs as a subprocess (``lensnas serve --port 0``) on real exports;
uploads over HTTP give what ``lensnas predict`` writes for the same files, hostile uploads are
a 4xx with a one-line reason and leave nothing in the server's temporary folder ($TMPDIR),
and the page, driven in headless Chromium, uploads a file and shows the preview."""

from __future__ import annotations

import http.client
import io
import json
import os
import re
import shutil
import socket
import stat
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from lensnas.search.cli import main
from tests.test_export import tiny_shear_study
from tests.test_predict import (  # noqa: F401 (fixtures)
    images,
    input_files,
    make_input,
    network_outputs,
    shear_export,
    sr_export,
    stamps,
)

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit:DeprecationWarning")

START_SECONDS = 90
MAX_UPLOAD_MB = 1  # the server's upload limit in these tests; a .zip may unpack to 4 MiB


@dataclass
class Server:
    base: str  # http://127.0.0.1:<port>
    temp_root: Path  # the server's $TMPDIR: empty whenever no request is running
    export_dir: Path
    output: Path  # what it printed (stdout and stderr)
    first_line: str


def wait_for_line(output: Path, process: subprocess.Popen, pattern: str) -> re.Match:
    deadline = time.monotonic() + START_SECONDS
    while not (match := re.search(pattern, output.read_text())):
        if process.poll() is not None or time.monotonic() > deadline:
            pytest.fail(f"lensnas serve did not start: {output.read_text()[-3000:]}")
        time.sleep(0.2)
    return match


@pytest.fixture(scope="module")
def shear_study(tmp_path_factory):
    return tiny_shear_study(tmp_path_factory)


@pytest.fixture(scope="module")
def server(shear_export, sr_export, shear_study, tmp_path_factory) -> Iterator[Server]:  # noqa: F811
    """``lensnas serve`` on the shear and SR exports (as export_dir/shear and export_dir/sr),
    the shear study's storage, an upload limit of 1 MiB and a $TMPDIR of its own."""
    folder = tmp_path_factory.mktemp("serve")
    export_dir, temp_root, output = folder / "exported", folder / "tmp", folder / "output.txt"
    shutil.copytree(shear_export, export_dir / "shear")
    shutil.copytree(sr_export, export_dir / "sr")
    temp_root.mkdir()
    with open(output, "w") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "lensnas.search.cli", "serve", "--export-dir", str(export_dir),
             "--storage", shear_study.url, "--port", "0", "--device", "cpu",
             "--max-upload-mb", str(MAX_UPLOAD_MB)],
            stdout=log, stderr=subprocess.STDOUT, cwd=folder,
            env={**os.environ, "TMPDIR": str(temp_root)},
        )
    try:
        match = wait_for_line(output, process, r"lensnas serve: .* at (http://127\.0\.0\.1:\d+)/")
        yield Server(match[1], temp_root, export_dir, output, match[0])
    finally:
        process.terminate()
        process.wait(timeout=60)
    assert process.returncode == 0, output.read_text()[-3000:]
    assert "lensnas serve: stopped" in output.read_text()


def multipart(files: dict[str, bytes], field: str = "files") -> tuple[bytes, str]:
    """A multipart/form-data body of ``files`` (name -> content) and its content type."""
    boundary = uuid.uuid4().hex
    body = b"".join(
        f'--{boundary}\r\nContent-Disposition: form-data; name="{field}"; filename="{name}"\r\n'
        "Content-Type: application/octet-stream\r\n\r\n".encode() + data + b"\r\n"
        for name, data in files.items()
    )
    return body + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def request(url: str, body=None, content_type: str | None = None, headers=None):
    """(status, headers, body) of a GET, or a POST of ``body`` (bytes or an iterable of chunks,
    sent chunked)."""
    headers = dict(headers or {})
    if content_type:
        headers["Content-Type"] = content_type
    method = "GET" if body is None else "POST"
    try:
        with urllib.request.urlopen(
            urllib.request.Request(url, data=body, headers=headers, method=method), timeout=120
        ) as response:
            return response.status, response.headers, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.headers, error.read()


def upload(server: Server, network: str, files: dict[str, bytes]):
    return request(f"{server.base}/api/predict/{network}", *multipart(files))


def read_zip(data: bytes) -> dict[str, bytes]:
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        return {name: archive.read(name) for name in archive.namelist()}


def predict_cli(exported: Path, inputs: list[str], output: str, folder: Path,
                monkeypatch) -> None:
    """``lensnas predict`` run in ``folder`` on inputs named as the uploads are."""
    monkeypatch.chdir(folder)
    assert main(["predict", str(exported), *inputs, "-o", output, "--device", "cpu",
                 "--quiet"]) == 0


def npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def test_it_binds_localhost_and_lists_the_exported_networks(server):
    port = int(server.base.rsplit(":", 1)[1])
    listening = [line.split() for line in Path("/proc/net/tcp").read_text().splitlines()[1:]]
    (address,) = [fields[1] for fields in listening
                  if fields[3] == "0A" and int(fields[1].split(":")[1], 16) == port]
    assert address.split(":")[0] == "0100007F"  # 127.0.0.1, not every interface

    status, _, body = request(server.base + "/api/networks")
    assert status == 200
    listing = json.loads(body)
    networks = {network["name"]: network for network in listing["networks"]}
    assert set(networks) == {"shear", "sr"}
    assert networks["shear"]["task"] == "shear" and networks["shear"]["returns"] == ["g1", "g2"]
    assert networks["sr"]["task"] == "sr" and networks["sr"]["returns"] == []
    assert networks["shear"]["metrics"][0][0] == "rmse"  # the study's metric first, from the card
    assert networks["sr"]["metrics"][0][0] == "psnr_gain"
    card = (server.export_dir / "sr" / "MODEL_CARD.md").read_text()
    assert networks["sr"]["metrics"][0][1] == re.search(r"\| psnr_gain \| (\S+) \|", card)[1]
    assert listing["max_upload_bytes"] == MAX_UPLOAD_MB * 1024**2
    assert [study["name"] for study in listing["studies"]] == ["tiny5"]
    status, _, page = request(server.base + "/")
    assert status == 200 and b'id="networks"' in page


@pytest.mark.parametrize("case", ["shear zip", "sr zip", "sr two files"])
def test_an_upload_gives_what_lensnas_predict_writes(
    case, server, shear_export, sr_export, tmp_path, monkeypatch  # noqa: F811
):
    family = case.split()[0]
    exported = shear_export if family == "shear" else sr_export
    source = make_input(tmp_path, "zip", input_files(family, "zip"))  # tmp_path/data.zip
    files = {"data.zip": source.read_bytes()}
    if case == "sr two files":
        files = {"one.npy": npy_bytes(images("sr", 2)), **files}
        (tmp_path / "one.npy").write_bytes(files["one.npy"])
    status, headers, body = upload(server, family, files)
    assert status == 200, body[:500]
    assert headers["Content-Type"] == "application/zip"
    assert list(server.temp_root.iterdir()) == []  # removed before the answer was sent
    images_done = 6 if case == "shear zip" else 6 + 2 * (case == "sr two files")
    assert re.search(rf"lensnas serve: {family}: {len(files)} file\(s\) -> {images_done} "
                     r"image\(s\) in [\d.]+ s", server.output.read_text())  # the console line
    returned = read_zip(body)

    if family == "shear":
        predict_cli(exported, ["data.zip"], "cli.csv", tmp_path, monkeypatch)
        assert list(returned) == ["predictions.csv"]
        assert returned["predictions.csv"] == (tmp_path / "cli.csv").read_bytes()
        assert returned["predictions.csv"].count(b"\n") == 1 + 3 + 1 + 2  # header and 6 stamps
    elif case == "sr zip":
        predict_cli(exported, ["data.zip"], "cli.zip", tmp_path, monkeypatch)
        assert returned == read_zip((tmp_path / "cli.zip").read_bytes())  # member by member
        assert sorted(returned) == ["a.npy", "sub/b.fits", "sub/c.npy"]
    else:
        predict_cli(exported, ["one.npy", "data.zip"], "cli", tmp_path, monkeypatch)
        assert sorted(returned) == ["data.zip", "one.npy"]
        assert returned["one.npy"] == (tmp_path / "cli" / "one.npy").read_bytes()
        assert read_zip(returned["data.zip"]) == read_zip((tmp_path / "cli" / "data.zip")
                                                          .read_bytes())
        got = np.load(io.BytesIO(returned["one.npy"]))
        np.testing.assert_allclose(got, network_outputs(exported, np.load(tmp_path / "one.npy")),
                                   rtol=0, atol=1e-6)


def zip_bytes(members: dict[str, bytes], compression: int = zipfile.ZIP_DEFLATED) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression) as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return buffer.getvalue()


def link_zip() -> bytes:
    info = zipfile.ZipInfo("link.npy")
    info.external_attr = (stat.S_IFLNK | 0o777) << 16
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr(info, "/etc/passwd")
    return buffer.getvalue()


def nan_stamps() -> np.ndarray:
    array = stamps(3)
    array[1, 4, 4] = np.nan
    return array


MIB = 1024**2
HOSTILE = {  # case: (files, status, what the one-line reason says)
    "over the size limit": ({"big.npy": bytes(MIB + MIB // 2)}, 413, "larger than 1 MiB"),
    "zip bomb": ({"bomb.zip": zip_bytes({"zeros.npy": bytes(5 * MIB)})}, 400,
                 "bomb.zip: unpacks to more than 4 MiB"),
    "too many members": ({"many.zip": zip_bytes({f"{i}.npy": b"" for i in range(1001)})}, 400,
                         "many.zip: holds 1001 members; at most 1000"),
    "zip slip": ({"slip.zip": zip_bytes({"../evil.npy": npy_bytes(stamps(1))})}, 400,
                 "slip.zip:../evil.npy: its path leaves the archive's folder"),
    "absolute path in a zip": ({"abs.zip": zip_bytes({"/tmp/evil.npy": b"x"})}, 400,
                               "abs.zip:/tmp/evil.npy: its path leaves"),
    "link in a zip": ({"link.zip": link_zip()}, 400, "link.zip:link.npy: a symbolic link"),
    "upload name with a path": ({"../evil.npy": npy_bytes(stamps(1))}, 400,
                                "'../evil.npy': an uploaded file's name must be a plain file"),
    "absolute upload name": ({"/tmp/evil.npy": npy_bytes(stamps(1))}, 400, "plain file name"),
    "non-image file": ({"notes.txt": b"hello"}, 400, "notes.txt: not an input lensnas reads"),
    "non-image file in a zip": ({"in.zip": zip_bytes({"a.npy": npy_bytes(stamps(1)),
                                                      "notes.txt": b"hello"})}, 400,
                                "in.zip:notes.txt: not an image file"),
    "not really .npy": ({"fake.npy": b"\x89PNG not numpy"}, 400, "fake.npy: not a readable .npy"),
    "not a zip": ({"fake.zip": b"PK not really"}, 400, "fake.zip: not a readable .zip"),
    "NaN": ({"nan.npy": npy_bytes(nan_stamps())}, 400,
            "nan.npy: holds NaN or infinite values (image 1)"),
    "wrong shape": ({"big.npy": npy_bytes(stamps(2, size=30))}, 400,
                    "big.npy: images of 30x30 pixels; the network takes 25x25"),
    "wrong channels": ({"two.npy": npy_bytes(np.stack([stamps(1), stamps(1)], axis=1))}, 400,
                       "the network takes 1"),
}


def check_refusal(server: Server, response: tuple, code: int, reason: str) -> None:
    """``response`` (status, headers, body) is a refusal ``code`` whose one line says ``reason``,
    and the server's temporary folder is empty."""
    status, _, body = response
    assert status == code, body[:500]
    detail = json.loads(body)["detail"]
    assert reason in detail and "\n" not in detail, detail
    assert str(server.temp_root) not in detail  # no path of the server's in the reason
    assert list(server.temp_root.iterdir()) == []
    assert not list(server.temp_root.parent.rglob("evil*"))


@pytest.mark.parametrize("case", HOSTILE)
def test_a_hostile_upload_is_a_4xx_with_one_line_and_leaves_nothing(case, server):
    files, code, reason = HOSTILE[case]
    check_refusal(server, upload(server, "shear", files), code, reason)
    assert reason in server.output.read_text()  # and the console says why


def test_a_body_over_the_limit_is_refused_however_it_is_sent(server):
    body, content_type = multipart({"big.npy": bytes(MIB + MIB // 2)})
    chunks = (body[i:i + 65536] for i in range(0, len(body), 65536))  # sent chunked
    check_refusal(server, request(f"{server.base}/api/predict/sr", chunks, content_type),
                  413, "larger than 1 MiB")
    # announced far over the limit: refused before anything is read
    connection = http.client.HTTPConnection(server.base.removeprefix("http://"), timeout=30)
    connection.putrequest("POST", "/api/predict/sr")
    connection.putheader("Content-Type", content_type)
    connection.putheader("Content-Length", str(10**10))
    connection.endheaders()
    response = connection.getresponse()
    check_refusal(server, (response.status, None, response.read()), 413, "larger than 1 MiB")
    connection.close()


@pytest.mark.parametrize(("path", "body", "code", "reason"), [
    ("/api/predict/no-such", multipart({"a.npy": b""}), 404, "no exported network 'no-such'"),
    ("/api/predict/sr", (b"a=1", "application/x-www-form-urlencoded"), 400, "multipart/form-data"),
    ("/api/predict/sr", multipart({}), 400, "no files received"),
    ("/api/predict/sr", (b"--x\r\nContent-Disposition: form-data; name=\"a\"\r\n\r\n1\r\n--x--\r\n",
                         "multipart/form-data; boundary=x"), 400, "form field 'a': not a file"),
])
def test_requests_that_are_not_an_upload_are_refused(server, path, body, code, reason):
    check_refusal(server, request(server.base + path, *body), code, reason)


def test_a_study_s_best_trial_is_exported_from_the_storage(server, shear_study):
    status, _, body = request(f"{server.base}/api/export/no-such-study", b"")
    assert status == 400 and "study 'no-such-study' not found" in json.loads(body)["detail"]
    status, _, body = request(f"{server.base}/api/export/tiny5", b"")
    assert status == 200, body
    (name,) = json.loads(body)["exported"]
    best = min(shear_study.study.best_trials, key=lambda trial: trial.number).number
    assert name == f"tiny5/trial-{best}"
    assert (server.export_dir / name / "weights.pt").is_file()
    # the export's check runs onnxruntime, which keeps a session file (.ses) in the temporary
    # folder as it does on every run; nothing else of the export stays there
    assert {path.name for path in server.temp_root.iterdir()} <= {".ses"}
    (server.temp_root / ".ses").unlink(missing_ok=True)
    listing = json.loads(request(server.base + "/api/networks")[2])
    (network,) = [n for n in listing["networks"] if n["name"] == name]
    assert network["task"] == "shear" and not network["error"]
    status, _, body = upload(server, name, {"s.npy": npy_bytes(stamps(2))})
    assert status == 200 and read_zip(body)["predictions.csv"].count(b"\n") == 3


def chromium_executable() -> str:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is not installed (CI must install it: apt-get install chromium)")
        pytest.skip("chromium is not installed (apt-get install chromium)")
    return chromium


def test_the_page_uploads_a_file_and_shows_the_preview_in_chromium(server, sr_export, tmp_path):  # noqa: F811
    chromium = chromium_executable()
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        if os.environ.get("CI"):
            pytest.fail("playwright is not installed (pip install -e '.[dev]')")
        pytest.skip("playwright is not installed (pip install -e '.[dev]')")
    low_resolution = images("sr", 3)
    np.save(tmp_path / "lr.npy", low_resolution)
    galaxies = stamps(4)
    np.save(tmp_path / "galaxies.npy", galaxies)
    (tmp_path / "notes.txt").write_text("not an image")

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        try:
            page = browser.new_page(accept_downloads=True)
            page.goto(server.base + "/")
            page.wait_for_selector("#network-sr")
            assert "tiny5: trial" in page.inner_text("#networks")

            page.check("#network-sr")
            page.set_input_files("#files", str(tmp_path / "lr.npy"))
            page.click("#run")
            page.wait_for_selector("#preview img.output")
            shown = page.eval_on_selector_all(
                "#preview img",
                "images => images.map(i => [i.className, i.naturalWidth, i.naturalHeight])")
            assert shown == [["input", 16, 16], ["output", 32, 32]] * 3  # SR: twice the size
            with page.expect_download() as download:
                page.click("#download")
            returned = read_zip(Path(download.value.path()).read_bytes())
            assert list(returned) == ["lr.npy"]
            np.testing.assert_allclose(np.load(io.BytesIO(returned["lr.npy"])),
                                       network_outputs(sr_export, low_resolution), rtol=0,
                                       atol=1e-6)

            page.check("#network-shear")
            page.set_input_files("#files", str(tmp_path / "galaxies.npy"))
            page.click("#run")
            page.wait_for_selector("#preview-table")
            rows = page.eval_on_selector_all(
                "#preview-table tr", "rows => rows.map(r => [...r.cells].map(c => c.textContent))")
            assert rows[0] == ["file", "index", "g1", "g2"]
            expected = network_outputs(server.export_dir / "shear", galaxies)
            assert [row[:2] for row in rows[1:]] == [["galaxies.npy", str(i)] for i in range(4)]
            np.testing.assert_allclose([[float(v) for v in row[2:]] for row in rows[1:]],
                                       expected, rtol=1e-5, atol=1e-9)

            page.set_input_files("#files", str(tmp_path / "notes.txt"))
            page.click("#run")
            page.wait_for_selector("#status.error")
            assert "notes.txt: not an input lensnas reads" in page.inner_text("#status")
        finally:
            browser.close()
    assert list(server.temp_root.iterdir()) == []


def test_a_missing_export_dir_or_a_busy_port_is_one_line(tmp_path, capsys):
    assert main(["serve", "--export-dir", str(tmp_path / "missing")]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1
    assert f"--export-dir {tmp_path / 'missing'}: no such folder" in err
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert main(["serve", "--export-dir", str(tmp_path), "--port", str(port)]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1 and f"--port {port}: cannot listen" in err
