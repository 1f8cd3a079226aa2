"""Joining a running Ray cluster (``ray start --head``) with ``--address``, as on a real cluster:
workers start elsewhere than the launcher, and Ray >= 2.59 clusters use token authentication."""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from optuna.trial import TrialState

from lensnas.search.cli import main
from tests.ray_fixtures import load, write_ray_study

REPOSITORY = Path(__file__).resolve().parents[1]
CLUSTER_CPUS = 3  # tells the cluster from a local Ray of this machine in what launch prints


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def ray_cluster() -> Iterator[tuple[str, dict[str, str]]]:
    """A one-node Ray cluster with token authentication, in its own process group;
    yields its address and the environment a client needs."""
    port = _free_port()
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}
    # short: Ray's socket paths under it must stay within the 107 bytes of a Unix socket name
    temp_dir = Path(tempfile.mkdtemp(prefix="ray-cluster-"))
    head = subprocess.Popen(
        [shutil.which("ray") or "ray", "start", "--head", "--block", f"--port={port}", f"--num-cpus={CLUSTER_CPUS}",
         "--include-dashboard=false", "--disable-usage-stats", f"--temp-dir={temp_dir}"],
        cwd=temp_dir, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        deadline = time.time() + 120
        while True:
            assert head.poll() is None, "ray start --head exited"
            with socket.socket() as probe:
                if probe.connect_ex(("127.0.0.1", port)) == 0:
                    break
            assert time.time() < deadline, "the Ray head did not open its port"
            time.sleep(0.5)
        yield f"127.0.0.1:{port}", env
    finally:
        # SIGTERM makes `ray start --block` wait ~30 s for its processes: kill them instead, the
        # whole process group and anything of this node (its paths are under temp_dir) that left it.
        os.killpg(head.pid, signal.SIGKILL)
        head.wait()
        for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
            try:
                if str(temp_dir).encode() in cmdline.read_bytes():
                    os.kill(int(cmdline.parent.name), signal.SIGKILL)
            except (OSError, ValueError):
                pass  # gone meanwhile
        shutil.rmtree(temp_dir, ignore_errors=True)


def _launch(folder: Path, env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "lensnas.search.cli", "launch", *args]
    env = {**env, "PYTHONPATH": str(REPOSITORY)}
    return subprocess.run(command, cwd=folder, env=env, capture_output=True, text=True, timeout=400,
                          check=False)


def test_launch_joins_a_running_cluster_with_relative_paths(tmp_path, ray_cluster):
    address, env = ray_cluster
    write_ray_study(tmp_path, "joined", n_trials=3)
    # a relative SQLite file and cache folder: the cluster's workers start in another directory
    result = _launch(tmp_path, env, "joined.toml", "--storage", "sqlite:///lensnas.db",
                     "--cache-dir", "cache", "--executor", "ray", "--address", address,
                     "--max-concurrent", "2")
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"joined the Ray cluster at {address} with {CLUSTER_CPUS} CPUs" in result.stderr
    trials = load(f"sqlite:///{tmp_path}/lensnas.db", "joined").trials
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 3, [t.user_attrs for t in trials]
    assert {t.user_attrs["executor"] for t in trials} == {"ray"}


def test_joining_without_the_token_is_one_line_that_says_how(tmp_path, ray_cluster):
    address, env = ray_cluster
    env = {key: value for key, value in env.items() if not key.startswith("RAY_AUTH")}
    env["RAY_gcs_server_port_wait_time_s"] = "3"  # Ray's own retries, 20 s by default
    write_ray_study(tmp_path, "refused", n_trials=1)
    result = _launch(tmp_path, env, "refused.toml", "--storage", f"sqlite:///{tmp_path}/s.db",
                     "--executor", "ray", "--address", address)
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if line.startswith("lensnas")]
    assert len(errors) == 1 and "Traceback" not in result.stderr
    assert f"--address {address}: cannot join the Ray cluster" in errors[0]
    assert "RAY_AUTH_MODE=token" in errors[0]


def test_ray_address_in_the_environment_joins_like_the_flag(tmp_path, ray_cluster):
    address, env = ray_cluster
    write_ray_study(tmp_path, "from-env", n_trials=1)
    result = _launch(tmp_path, {**env, "RAY_ADDRESS": address}, "from-env.toml",
                     "--storage", "sqlite:///lensnas.db", "--executor", "ray")
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"joined the Ray cluster at {address} with {CLUSTER_CPUS} CPUs" in result.stderr
    assert load(f"sqlite:///{tmp_path}/lensnas.db", "from-env").trials[0].state == TrialState.COMPLETE


@pytest.mark.parametrize(("address", "expected"), [
    ("nonsense", "expected host:port (e.g. 10.0.0.5:6379) or 'auto'"),
    ("head:99999", "expected host:port"),
    ("ray://head:10001", "Ray Client addresses (ray://) are not supported"),
    ("127.0.0.1:{closed}", "cannot reach it (Connection refused)"),
])
def test_bad_addresses_are_one_line_errors_before_any_data(tmp_path, capsys, address, expected):
    with socket.socket() as closed:  # a port nothing listens on
        closed.bind(("127.0.0.1", 0))
        address = address.format(closed=closed.getsockname()[1])
        write_ray_study(tmp_path, "nowhere", n_trials=1)
        code = main(["launch", str(tmp_path / "nowhere.toml"), "--storage", f"sqlite:///{tmp_path}/s.db",
                     "--executor", "ray", "--address", address, "--cache-dir", str(tmp_path / "cache")])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert err.startswith("lensnas launch: error: --address") and address in err and expected in err
    assert not (tmp_path / "cache").exists()  # refused before the data was prepared
