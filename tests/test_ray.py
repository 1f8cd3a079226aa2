"""The Ray executor on one machine: concurrency, one study shared with the local executor,
pruning and failures recorded in the study, dead workers and Ctrl+C leaving nothing RUNNING."""

from __future__ import annotations

import os
import signal
import threading
import time

import optuna
import pytest
from optuna.trial import TrialState

from lensnas.search import launch
from lensnas.search.cli import main
from lensnas.search.spec import load_spec
from lensnas.search.storage import open_storage
from lensnas.search.study import FAIL_REASON, open_study, trial_seed
from tests.ray_fixtures import load, ray_session, write_ray_study

__all__ = ["ray_session"]  # the module-scoped fixture, imported for pytest

METRICS = {
    "rmse", "rmse_g1", "rmse_g2", "m1", "m2", "c1", "c2", "abs_m", "n_params", "train_seconds",
}
RAY_ONLY = {"executor", "ray_run", "ray_trial_id", "preset"}


def _overlap(a: optuna.trial.FrozenTrial, b: optuna.trial.FrozenTrial) -> bool:
    return a.datetime_start < b.datetime_complete and b.datetime_start < a.datetime_complete


def test_ray_and_local_executors_share_one_study(tmp_path, ray_session, capsys):
    study_file = write_ray_study(tmp_path, "shared", n_trials=6, presets='"shearnet_cnn"')
    storage = f"sqlite:///{tmp_path}/lensnas.db"
    ray_args = ["--executor", "ray", "--max-concurrent", "2"]

    launch_args = ["launch", str(study_file), "--storage", storage]
    assert main([*launch_args, "--n-trials", "2", *ray_args]) == 0
    err = capsys.readouterr().err
    assert err.count("trials run on CPUs") == 1
    study = load(storage, "shared")
    first, second = study.trials
    assert [first.state, second.state] == [TrialState.COMPLETE] * 2
    assert _overlap(first, second), "the two Ray trials did not run at the same time"
    assert first.user_attrs["preset"] == "shearnet_cnn" and first.params["width"] == 16
    for trial in (first, second):
        assert METRICS <= set(trial.user_attrs)
        assert trial.value == trial.user_attrs["rmse"]
        assert sorted(trial.intermediate_values) == [1, 2]  # validation loss per epoch
        assert trial.user_attrs["seed"] == trial_seed(3, trial.number)
        assert trial.user_attrs["executor"] == "ray"
        artifacts = tmp_path / "lensnas-artifacts" / "shared" / f"trial-{trial.number}"
        assert (artifacts / "weights.pt").is_file()
    assert first.user_attrs["worker"] != second.user_attrs["worker"]  # two Ray worker processes
    assert "rebuilt the dataset" not in err  # workers read the driver's dataset cache

    # the local executor resumes the Ray study ...
    assert main([*launch_args, "--n-trials", "4", "--quiet"]) == 0
    study = load(storage, "shared")
    assert [t.state for t in study.trials] == [TrialState.COMPLETE] * 4
    local = study.trials[2]
    assert "executor" not in local.user_attrs
    assert set(local.user_attrs) == set(second.user_attrs) - RAY_ONLY  # the same kinds of records
    assert sorted(local.intermediate_values) == [1, 2]

    # ... and Ray resumes the local one, up to the file's n_trials
    assert main([*launch_args, "--quiet", *ray_args]) == 0
    study = load(storage, "shared")
    assert [t.number for t in study.trials] == list(range(6))
    assert [t.state for t in study.trials] == [TrialState.COMPLETE] * 6
    last = study.trials[4:]
    assert all(t.user_attrs["executor"] == "ray" for t in last)
    assert _overlap(*last)
    # each Ray trial's sampler is seeded apart: concurrent workers do not draw the same params
    rates = [t.params["learning_rate"] for t in study.trials]
    assert len(set(rates)) == len(rates)
    assert main([*launch_args, "--quiet", *ray_args]) == 0
    assert len(load(storage, "shared").trials) == 6  # nothing left to do


@pytest.fixture(scope="module")
def pruned_and_failed(tmp_path_factory, ray_session) -> optuna.Study:
    """One trial at a time: one diverging (FAIL), 3 good, then one far too fast (PRUNED)."""
    folder = tmp_path_factory.mktemp("prune")
    spec = load_spec(write_ray_study(folder, "prune", n_trials=4, pruner="median"))
    storage = f"sqlite:///{folder}/lensnas.db"
    study = open_study(spec, open_storage(storage))
    arch = {"depth": 1, "width": 8, "pooling": "max", "head": "gap"}
    for learning_rate in (1e20, 3e-3, 3.5e-3, 4e-3, 1.0):  # out of range values: Optuna warns
        study.enqueue_trial({**arch, "learning_rate": learning_rate})
    return launch(spec, storage, quiet=True, cache_dir=folder / "cache", executor="ray",
                  max_concurrent=1)


def test_pruned_trial_under_ray_is_pruned_with_its_intermediate_values(pruned_and_failed):
    pruned = pruned_and_failed.trials[4]
    assert pruned.params["learning_rate"] == 1.0
    assert pruned.state == TrialState.PRUNED  # decided by the study's median pruner
    assert list(pruned.intermediate_values) == [1]  # stopped after epoch 1 of 2
    assert pruned.user_attrs["executor"] == "ray"
    assert "rmse" not in pruned.user_attrs


def test_failing_trial_under_ray_is_fail_with_its_reason_and_the_others_go_on(pruned_and_failed):
    trials = pruned_and_failed.trials
    assert [t.state for t in trials[:4]] == [TrialState.FAIL] + [TrialState.COMPLETE] * 3
    assert trials[0].user_attrs[FAIL_REASON].startswith("TrialFailed: non-finite training loss")
    assert all(len(t.intermediate_values) == 2 for t in trials[1:4])


def _finished(storage: str, number: int) -> optuna.trial.FrozenTrial | None:
    trial = load(storage, "stop").trials[number]
    return None if trial.state == TrialState.RUNNING else trial


def test_dead_worker_and_ctrl_c_leave_no_trial_running(tmp_path, ray_session, capsys):
    # epochs: the survivor must still be training when Ctrl+C comes, however slow the death
    study_file = write_ray_study(tmp_path, "stop", n_trials=4, epochs=3000)
    storage = f"sqlite:///{tmp_path}/lensnas.db"
    open_study(load_spec(study_file), open_storage(storage))  # before the watcher reads it
    seen: dict[str, object] = {}

    def running() -> list[optuna.trial.FrozenTrial]:
        trials = load(storage, "stop").get_trials(states=(TrialState.RUNNING,))
        return [t for t in trials if "ray_trial_id" in t.user_attrs]

    def wait_for(condition, timeout: float = 120.0):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = condition()
            if value:
                return value
            time.sleep(0.5)
        raise AssertionError("timed out")

    def saboteur() -> None:
        try:
            victim, survivor = wait_for(lambda: len(running()) == 2 and running())
            os.kill(int(victim.user_attrs["worker"].rsplit(":", 1)[1]), signal.SIGKILL)
            seen["dead"] = wait_for(lambda: _finished(storage, victim.number))
            seen["survivor"] = load(storage, "stop").trials[survivor.number]
        finally:
            os.kill(os.getpid(), signal.SIGINT)  # Ctrl+C

    thread = threading.Thread(target=saboteur, daemon=True)
    thread.start()
    code = main(["launch", str(study_file), "--storage", storage, "--executor", "ray",
                 "--max-concurrent", "2", "--max-failures", "0"])
    thread.join(timeout=60)
    assert code == 130
    assert "interrupted" in capsys.readouterr().err
    dead, survivor = seen["dead"], seen["survivor"]
    # failed by the driver from Ray's error, or by a new worker finding the process gone
    assert dead.user_attrs[FAIL_REASON].startswith(("ray worker error", "abandoned: process"))
    assert survivor.state == TrialState.RUNNING  # the other trial went on after the death
    trials = load(storage, "stop").trials
    assert not [t for t in trials if t.state == TrialState.RUNNING]
    assert trials[survivor.number].state == TrialState.FAIL
    reason = trials[survivor.number].user_attrs[FAIL_REASON]
    assert reason == "stopped by the ray executor: interrupted"


def test_bad_ray_options_are_one_line_errors(tmp_path, ray_session, capsys):
    study_file = write_ray_study(tmp_path, "bad")
    launch_args = ["launch", str(study_file), "--storage", f"sqlite:///{tmp_path}/lensnas.db"]
    assert main([*launch_args, "--executor", "ray", "--max-concurrent", "0"]) == 2
    assert "--max-concurrent: must be at least 1" in capsys.readouterr().err
    # a trial that fits nowhere would wait for ever: the Ray of the tests has 2 CPUs
    assert main([*launch_args, "--executor", "ray", "--cpus-per-trial", "4"]) == 2
    err = capsys.readouterr().err
    assert "a trial needs 4 CPUs, this machine's Ray has 2 CPUs" in err
    assert not load(f"sqlite:///{tmp_path}/lensnas.db", "bad").trials


def test_bad_input_found_by_a_worker_stops_the_run_with_its_one_line():
    """A worker that meets bad input (a LensnasError while preparing) reports it; the driver
    starts no more trials, stops the running ones and raises it for the CLI's exit 2."""
    from lensnas.search.executors.ray_tune import Feeder, Monitor, RayRun, StopAll
    from lensnas.search.executors.ray_worker import BAD_INPUT

    run = RayRun(max_failures=3)
    monitor = Monitor(run, job=None, progress=None)
    feeder = Feeder(job=None, run=run, timeout=None)
    assert not StopAll(run).stop_all()
    message = "data/HR/image0.npy: has no LR partner data/LR/image0.npy"
    monitor.on_trial_result(0, [], None, {"state": BAD_INPUT, "number": -1, "fail_reason": message})
    assert run.bad_input == message and run.states == {}  # no trial counted as failed
    assert feeder.suggest("t1") == Feeder.FINISHED and StopAll(run).stop_all()
