"""Faults, measured: launchers killed with SIGKILL, and two launchers sharing one SQLite study;
and the engine's use of Optuna, which must stay within its public API to survive upgrades."""

from __future__ import annotations

import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
from optuna.trial import TrialState

from tests.conftest import write_tiny_shear_study

FAST = {"n_train = 160": "n_train = 64", "n_validation = 48": "n_validation = 16",
        "n_test = 64": "n_test = 16", "stamp_size = 25": "stamp_size = 17"}


def _fast_study(folder: Path, name: str, n_trials: int) -> Path:
    """The tiny study, smaller still, without a reference estimator: about a second a trial."""
    path = write_tiny_shear_study(folder, name=name, n_trials=n_trials, epochs=1,
                                  objective_extra='reference = "none"')
    text = path.read_text()
    for old, new in FAST.items():
        text = text.replace(old, new)
    path.write_text(text)
    return path


def _launch_command(study_file: Path, storage: str) -> list[str]:
    return [sys.executable, "-m", "lensnas.search.cli", "launch", str(study_file), "--storage", storage, "--quiet"]


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])}


def _trials(storage: str, name: str) -> list[optuna.trial.FrozenTrial]:
    try:
        return optuna.load_study(study_name=name, storage=storage).trials
    except KeyError:
        return []


def _wait_for_running_trial(storage: str, name: str, process: subprocess.Popen, timeout: float) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline and process.poll() is None:
        if any(t.state == TrialState.RUNNING and t.user_attrs.get("worker", "").endswith(f":{process.pid}")
               for t in _trials(storage, name)):
            return
        time.sleep(0.1)


def test_killed_launchers_lose_nothing_and_the_study_ends_exact(tmp_path):
    study_file = _fast_study(tmp_path, "killed", n_trials=8)
    storage = f"sqlite:///{tmp_path}/lensnas.db"
    # The killed launchers aim at more trials than they can finish before their kill, so each
    # one is still running when it comes, however fast trials run on this machine.
    killed_command = _launch_command(study_file, storage) + ["--n-trials", "1000"]
    rng = random.Random(11)
    kills, lost, ended = 0, 0, []
    for attempt in range(10):
        before = {t.number: (t.params, t.values, t.user_attrs.get("rmse"))
                  for t in _trials(storage, "killed") if t.state == TrialState.COMPLETE}
        errors = tmp_path / f"launcher-{attempt}.err"
        with errors.open("w") as stderr:
            process = subprocess.Popen(killed_command, cwd=tmp_path, env=_env(),
                                       stdout=subprocess.DEVNULL, stderr=stderr)
        if attempt % 2 == 0:
            time.sleep(rng.uniform(0.5, 6.0))  # start-up, data preparation or any later moment
        else:
            _wait_for_running_trial(storage, "killed", process, timeout=120)
            time.sleep(rng.uniform(0.0, 1.0))  # mid-trial or while writing its results
        if process.poll() is None:
            process.send_signal(signal.SIGKILL)
            kills += 1
        else:
            ended.append(f"exit {process.returncode}: {errors.read_text()[-500:]}")
        process.wait(30)
        after = {t.number: t for t in _trials(storage, "killed")}
        for number, record in before.items():
            trial = after.get(number)
            if trial is None or trial.state != TrialState.COMPLETE or \
                    (trial.params, trial.values, trial.user_attrs.get("rmse")) != record:
                lost += 1
    assert kills == 10, f"launchers that ended before their kill: {ended}"
    assert lost == 0
    # one more launch ends the study at exactly n_trials, a few more than the kills left finished
    n_trials = sum(t.state in (TrialState.COMPLETE, TrialState.PRUNED)
                   for t in _trials(storage, "killed")) + 3
    finished = subprocess.run(_launch_command(study_file, storage) + ["--n-trials", str(n_trials)],
                              check=False, cwd=tmp_path, env=_env(), capture_output=True,
                              text=True, timeout=600)
    assert finished.returncode == 0, finished.stderr
    trials = _trials(storage, "killed")
    states = [t.state for t in trials]
    assert TrialState.RUNNING not in states and TrialState.WAITING not in states
    assert sum(s in (TrialState.COMPLETE, TrialState.PRUNED) for s in states) == n_trials
    abandoned = [t for t in trials if t.state == TrialState.FAIL]
    assert len(abandoned) >= 3  # trials killed mid-run, failed by the next launch
    for trial in abandoned:
        assert "abandoned" in trial.user_attrs.get("fail_reason", ""), trial.user_attrs
    print(f"kills survived: {kills}, completed trials lost: {lost}, "
          f"abandoned trials failed: {states.count(TrialState.FAIL)}")


def test_two_launchers_share_one_sqlite_study(tmp_path):
    n_trials = 40
    study_file = _fast_study(tmp_path, "shared", n_trials)
    storage = f"sqlite:///{tmp_path}/lensnas.db"
    # build the dataset once so both launchers start trials at the same time
    subprocess.run(_launch_command(study_file, storage)[:-1] + ["--quiet", "--n-trials", "1"],
                   cwd=tmp_path, env=_env(), check=True, capture_output=True)
    processes = [
        subprocess.Popen(_launch_command(study_file, storage), cwd=tmp_path, env=_env(),
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    outputs = [p.communicate(timeout=900) for p in processes]
    assert [p.returncode for p in processes] == [0, 0], outputs
    text = "".join(out + err for out, err in outputs)
    assert "database is locked" not in text
    trials = _trials(storage, "shared")
    assert len(trials) == n_trials  # none lost, none duplicated, no overshoot
    assert all(t.state == TrialState.COMPLETE for t in trials)
    assert sorted(t.number for t in trials) == list(range(n_trials))
    workers = {t.user_attrs["worker"] for t in trials[1:]}
    assert len(workers) == 2  # both launchers ran trials


def test_killed_ray_driver_leaves_nothing_running(tmp_path):
    from tests.ray_fixtures import write_ray_study

    study_file = write_ray_study(tmp_path, "raykill", n_trials=6, epochs=300)  # long trials
    storage = f"sqlite:///{tmp_path}/lensnas.db"
    # The killed drivers aim at more trials than they can finish, so each is still running
    # when its kill comes, however fast trials run on this machine.
    ray_command = _launch_command(study_file, storage) + [
        "--executor", "ray", "--max-concurrent", "2", "--n-trials", "1000"]
    kills, mid_trial = 0, 0
    rng = random.Random(5)
    for attempt in range(10):
        existing = _trials(storage, "raykill")
        before = {t.number: (t.params, t.values) for t in existing if t.state == TrialState.COMPLETE}
        driver = subprocess.Popen(ray_command, cwd=tmp_path, env=_env(),
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        if attempt % 2 == 0:
            time.sleep(rng.uniform(1.0, 8.0))  # Ray start-up, data preparation or a trial
        else:
            deadline = time.time() + 180
            while time.time() < deadline and driver.poll() is None:
                if any(t.state == TrialState.RUNNING and t.number >= len(existing)
                       for t in _trials(storage, "raykill")):
                    mid_trial += 1
                    break  # a trial of this driver runs
                time.sleep(0.2)
            time.sleep(1.0)
        if driver.poll() is None:
            driver.send_signal(signal.SIGKILL)
            kills += 1
        driver.wait(30)
        after = {t.number: t for t in _trials(storage, "raykill")}
        assert all(after[n].state == TrialState.COMPLETE and (after[n].params, after[n].values) == record
                   for n, record in before.items())
    assert kills == 10 and mid_trial >= 4
    text = study_file.read_text().replace("epochs = 300", "epochs = 1")
    study_file.write_text(text)  # finish quickly with the local executor
    n_trials = sum(t.state in (TrialState.COMPLETE, TrialState.PRUNED)
                   for t in _trials(storage, "raykill")) + 2
    finished = subprocess.run(_launch_command(study_file, storage) + ["--n-trials", str(n_trials)],
                              check=False, cwd=tmp_path, env=_env(), capture_output=True,
                              text=True, timeout=600)
    assert finished.returncode == 0, finished.stderr
    states = [t.state for t in _trials(storage, "raykill")]
    assert TrialState.RUNNING not in states
    assert sum(s in (TrialState.COMPLETE, TrialState.PRUNED) for s in states) == n_trials
    failed = [t for t in _trials(storage, "raykill") if t.state == TrialState.FAIL]
    assert len(failed) >= mid_trial  # at least the trial running at each mid-trial kill
    assert all(t.user_attrs.get("fail_reason") for t in failed)


# Optuna's private names: a study's storage or ids, and its private modules (optuna.storages._x)
PRIVATE_OPTUNA = re.compile(r"\._(storage|trial_id|study_id)\b|\boptuna(\.[a-z]\w*)*\._[a-z]")


def test_the_engine_uses_only_public_optuna_but_one_documented_access():
    search = Path(__file__).parents[1] / "search"
    uses = [(path.name, line.strip()) for path in sorted(search.glob("*.py"))
            for line in path.read_text().splitlines() if PRIVATE_OPTUNA.search(line)]
    # study.storage_of: Optuna has no public accessor for a study's storage (see its docstring)
    assert uses == [("study.py", "return study._storage")]
