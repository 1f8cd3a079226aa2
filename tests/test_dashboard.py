"""``lensnas dashboard``: optuna-dashboard serves the study and its artifacts to Chromium."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator

import optuna
import pytest

from lensnas.search.artifacts import trial_artifact_ids
from lensnas.search.cli import main
from tests.test_export import TinyStudy, tiny_shear_study

START_SECONDS = 60
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--virtual-time-budget=10000",
    "--dump-dom",
)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _get(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=10) as response:
        return response.read()


@pytest.fixture(scope="module")
def shear(tmp_path_factory) -> TinyStudy:
    return tiny_shear_study(tmp_path_factory)


@pytest.fixture(scope="module")
def server(shear, tmp_path_factory) -> Iterator[tuple[str, str]]:
    """``lensnas dashboard`` on a free port; yields (base URL, the line it printed)."""
    port = _free_port()
    log = tmp_path_factory.mktemp("dashboard") / "output.txt"
    with open(log, "w") as output:
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "lensnas.search.cli",
                "dashboard",
                "--storage",
                shear.url,
                "--port",
                str(port),
            ],
            stdout=output,
            stderr=subprocess.STDOUT,
        )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + START_SECONDS
        while True:
            try:
                _get(f"{base}/api/studies")
                break
            except (urllib.error.URLError, ConnectionError):
                if process.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"dashboard did not start: {log.read_text()[-2000:]}")
                time.sleep(0.3)
        yield base, log.read_text().splitlines()[0]
    finally:
        process.terminate()
        process.wait(timeout=30)


def test_dashboard_prints_its_url_and_binds_localhost(server):
    base, first_line = server
    assert f"{base}/dashboard/" in first_line


def test_dashboard_serves_the_study_and_the_trial_artifacts(shear, server):
    base, _ = server
    studies = json.loads(_get(f"{base}/api/studies"))["study_summaries"]
    (summary,) = [s for s in studies if s["study_name"] == "tiny5"]
    detail = json.loads(_get(f"{base}/api/studies/{summary['study_id']}"))
    assert len(detail["trials"]) == 3
    stored = {t.number: trial_artifact_ids(t) for t in shear.study.trials}
    for trial in detail["trials"]:
        served = {a["filename"]: a["artifact_id"] for a in trial["artifacts"]}
        assert served == stored[trial["number"]]
    first = detail["trials"][0]
    ids = {a["filename"]: a["artifact_id"] for a in first["artifacts"]}
    route = f"{base}/artifacts/{summary['study_id']}/{first['trial_id']}"
    architecture = json.loads(_get(f"{route}/{ids['architecture.json']}"))
    assert architecture["family"] == "shear_cnn" and architecture["image_size"] == 25
    assert _get(f"{route}/{ids['diagnostics.png']}").startswith(b"\x89PNG")


def test_dashboard_page_renders_the_study_name_in_chromium(server, tmp_path):
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is not installed (CI must install it: apt-get install chromium)")
        pytest.skip("chromium is not installed (apt-get install chromium)")
    base, _ = server
    result = subprocess.run(
        [
            chromium,
            *CHROMIUM_FLAGS,
            f"--user-data-dir={tmp_path / 'profile'}",
            f"{base}/dashboard/",
        ],
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "tiny5" in result.stdout, result.stdout[-2000:]


def test_dashboard_refuses_a_sqlite_file_that_does_not_exist(tmp_path, capsys):
    missing = tmp_path / "misspelled.db"
    assert main(["dashboard", "--storage", f"sqlite:///{missing}", "--port", "0"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1 and f"no such database file {missing}" in err
    assert not missing.exists()  # not created empty


def test_a_busy_port_is_one_line_without_a_banner(tmp_path, capsys):
    storage = f"sqlite:///{tmp_path}/s.db"
    optuna.create_study(study_name="s", storage=storage)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert main(["dashboard", "--storage", storage, "--port", str(port)]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1 and "Traceback" not in err
    assert f"--port {port}: cannot listen" in err and "Bottle" not in err


def test_pruned_trials_do_not_sit_below_completed_ones_in_the_dashboard(tmp_path, monkeypatch):
    """A study ranked by rmse_ratio (against metacal: values of several), whose pruned trials
    reported validation RMSEs (far smaller numbers): the dashboard's History plot, drawn by
    Chromium, spans only the completed trials' values; pruned trials are not shown on the
    metric's axis."""
    import re

    import optuna

    from lensnas.search.launch import launch
    from tests.conftest import write_tiny_shear_study

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is not installed (CI must install it: apt-get install chromium)")
        pytest.skip("chromium is not installed (apt-get install chromium)")
    study_file = write_tiny_shear_study(tmp_path, "ratio", n_trials=2, epochs=2, pruner="median")
    study_file.write_text(study_file.read_text().replace('metrics = ["rmse"]',
                                                         'metrics = ["rmse_ratio"]'))
    url = f"sqlite:///{tmp_path / 'ratio.db'}"
    launch(study_file, url, quiet=True)  # 2 completed trials
    monkeypatch.setattr("lensnas.search.study.make_pruner",
                        lambda spec: optuna.pruners.ThresholdPruner(upper=0.0))  # prune all
    study = launch(study_file, url, quiet=True, n_trials=4)
    states = [t.state.name for t in study.trials]
    assert states == ["COMPLETE", "COMPLETE", "PRUNED", "PRUNED"]
    completed = [t.value for t in study.trials if t.value is not None]
    pruned_scores = [t.intermediate_values[1] for t in study.trials if t.state.name == "PRUNED"]
    assert max(pruned_scores) < 0.5 * min(completed)  # they would sit far below, if plotted

    port = _free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "lensnas.search.cli", "dashboard", "--storage", url,
         "--port", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + START_SECONDS
        while True:
            try:
                _get(f"http://127.0.0.1:{port}/api/studies")
                break
            except (urllib.error.URLError, ConnectionError):
                assert process.poll() is None and time.monotonic() < deadline, "no dashboard"
                time.sleep(0.3)
        result = subprocess.run(
            [chromium, *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile'}",
             "--virtual-time-budget=15000", f"http://127.0.0.1:{port}/dashboard/studies/1"],
            check=False, capture_output=True, text=True, timeout=120,
        )
    finally:
        process.terminate()
        process.wait(timeout=30)
    assert result.returncode == 0, result.stderr[-2000:]
    # plotly draws each figure as two <svg class="main-svg">: the axes' ticks, then the titles
    svgs = result.stdout.split('<svg class="main-svg"')[1:]
    history = [i for i, svg in enumerate(svgs)
               if re.search(r'class="ytitle"[^>]*>rmse_ratio<', svg)]
    assert history, "no plot with rmse_ratio on its y axis"
    ticks = [float(t) for t in re.findall(r'<g class="ytick">.*?data-unformatted="([^"]*)"',
                                          svgs[history[0] - 1])]
    assert ticks and min(ticks) > max(pruned_scores), (ticks, pruned_scores, completed)
