"""End to end on one machine: launch, resume, status, presets, failures and Ctrl-C."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import optuna
import pytest
import torch
from optuna.trial import TrialState

from lensnas.objectives.base import LocalContext, TrialFailed
from lensnas.objectives.training import train_model
from lensnas.search import launch
from lensnas.search.cli import main
from tests.conftest import in_ci, write_tiny_shear_study

METRIC_KEYS = {"rmse", "rmse_g1", "rmse_g2", "m1", "m1_err", "m2", "m2_err", "c1", "c1_err",
               "c2", "c2_err", "linear_m1", "paired_m1", "n_params", "train_seconds"}


def _load(storage: str, name: str = "tiny") -> optuna.Study:
    return optuna.load_study(study_name=name, storage=storage)


def test_launch_resume_and_status(tmp_path, capsys):
    study_file = write_tiny_shear_study(tmp_path, n_trials=3)
    storage = f"sqlite:///{tmp_path}/lensnas.db"
    assert main(["launch", str(study_file), "--storage", storage, "--n-trials", "2"]) == 0
    out = capsys.readouterr().out
    assert "rmse" in out and "m1" in out and "±" in out  # best trials with errors

    study = _load(storage)
    trials = study.get_trials(states=(TrialState.COMPLETE,))
    assert len(study.trials) == 2 and len(trials) == 2
    first = study.trials[0]
    assert first.user_attrs["preset"] == "shearnet_cnn"
    assert first.params["width"] == 16 and first.params["depth"] == 2 and first.params["head"] == "dense"
    for trial in trials:
        assert METRIC_KEYS <= set(trial.user_attrs)
        assert np.isfinite(trial.value) and trial.value == trial.user_attrs["rmse"]
        assert len(trial.intermediate_values) == 2  # validation loss per epoch
        assert (tmp_path / "lensnas-artifacts" / "tiny" / f"trial-{trial.number}" / "weights.pt").exists()
    assert study.user_attrs["objective"] == "shear" and "dataset_key" in study.user_attrs

    # the same command again continues up to n_trials from the file, no duplicates
    assert main(["launch", str(study_file), "--storage", storage, "--quiet"]) == 0
    assert capsys.readouterr().out == ""
    assert [t.state for t in _load(storage).trials] == [TrialState.COMPLETE] * 3
    assert main(["launch", str(study_file), "--storage", storage, "--quiet"]) == 0
    assert len(_load(storage).trials) == 3  # nothing to add

    assert main(["status", "tiny", "--storage", storage]) == 0
    status = capsys.readouterr().out
    for number in range(3):
        assert f"│     {number} │ COMPLETE" in status
    assert "preset shearnet_cnn" in status

    assert main(["status", "nope", "--storage", storage]) == 2
    assert "study 'nope' not found" in capsys.readouterr().err


def test_same_seed_gives_the_same_trials(tmp_path):
    values = []
    for run in ("a", "b"):
        folder = tmp_path / run
        folder.mkdir()
        study = launch(write_tiny_shear_study(folder, n_trials=2), f"sqlite:///{folder}/s.db",
                       quiet=True, cache_dir=tmp_path / "cache")
        values.append([(t.params, t.value) for t in study.trials])
    assert values[0] == values[1]


def test_unreachable_storage_is_one_line(tmp_path, capsys):
    study_file = write_tiny_shear_study(tmp_path)
    code = main(["launch", str(study_file), "--storage", "postgresql://lens:s3cret@127.0.0.1:1/db"])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "s3cret" not in err and "postgresql://lens:***@127.0.0.1:1/db" in err
    code = main(["launch", str(study_file), "--storage", f"sqlite:///{tmp_path}/missing/dir/x.db"])
    assert code == 2 and "does not exist" in capsys.readouterr().err


def test_non_finite_loss_fails_the_trial_with_its_reason():
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 2))
    with torch.no_grad():
        model[1].weight.fill_(float("nan"))
    x = np.ones((8, 1, 2, 2), np.float32)
    y = np.zeros((8, 2), np.float32)
    with pytest.raises(TrialFailed, match="non-finite training loss"):
        train_model(model, (x, y), loss_fn=torch.nn.MSELoss(), validation_score=lambda m: 0.0,
                    maximize=False, score_label="validation RMSE", learning_rate=1e-3,
                    batch_size=4, epochs=1, weight_decay=0.0, ctx=LocalContext())


@pytest.mark.parametrize("stop", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_ctrl_c_mid_trial_leaves_no_running_trial(tmp_path, stop):
    study_file = write_tiny_shear_study(tmp_path, n_trials=2, epochs=400)
    storage = f"sqlite:///{tmp_path}/lensnas.db"
    command = [sys.executable, "-m", "lensnas.search.cli", "launch", str(study_file), "--storage", storage, "--quiet"]
    process = subprocess.Popen(command, cwd=tmp_path, stderr=subprocess.PIPE, text=True,
                               env={**os.environ, "PYTHONPATH": os.getcwd()})
    deadline = time.time() + 300
    running = []
    while time.time() < deadline and not running:
        time.sleep(0.5)
        try:
            running = _load(storage).get_trials(states=(TrialState.RUNNING,))
        except KeyError:
            pass  # study not created yet
    assert running, "no trial started"
    time.sleep(1.0)  # mid-training
    process.send_signal(stop)  # SIGTERM, as a batch scheduler stops a job, is handled as Ctrl-C
    _, err = process.communicate(timeout=60)
    assert process.returncode == -signal.SIGINT  # a shell shows 130
    assert "interrupted" in err and "Traceback" not in err
    trials = _load(storage).trials
    assert len(trials) == 1 and trials[0].state == TrialState.FAIL
    assert not _load(storage).get_trials(states=(TrialState.RUNNING, TrialState.WAITING))


def test_baseline_command_prints_every_estimator_per_noise_level(tmp_path, capsys):
    study_file = write_tiny_shear_study(tmp_path)
    assert main(["baseline", str(study_file), "--noise", "1e-5,1e-3", "--quiet"]) == 0
    out = capsys.readouterr().out
    for estimator in ("metacal", "hsm REGAUSS", "hsm KSB"):
        assert out.count(f"{estimator} (noise_sigma") == 2, out
        assert f"{estimator}: " in out  # what it is, in words
    assert "1e-05" in out and "1e-03" in out and "galaxies_per_core_second" in out
    assert main(["baseline", str(study_file), "--noise", "1e-5,loud"]) == 2
    assert "--noise" in capsys.readouterr().err


def test_resuming_with_another_seed_is_refused(tmp_path, capsys):
    study_file = write_tiny_shear_study(tmp_path, n_trials=1, objective_extra='reference = "none"')
    storage = f"sqlite:///{tmp_path}/s.db"
    assert main(["launch", str(study_file), "--storage", storage, "--quiet"]) == 0
    assert main(["launch", str(study_file), "--storage", storage, "--seed", "99", "--n-trials", "2"]) == 2
    assert "study.seed: the stored study 'tiny' uses seed 3" in capsys.readouterr().err
    assert len(_load(storage).trials) == 1


def test_resuming_with_other_data_settings_is_refused(tmp_path, capsys):
    study_file = write_tiny_shear_study(tmp_path, n_trials=1, objective_extra='reference = "none"')
    storage = f"sqlite:///{tmp_path}/s.db"
    assert main(["launch", str(study_file), "--storage", storage, "--quiet"]) == 0
    study_file.write_text(study_file.read_text().replace("n_train = 160", "n_train = 170"))
    assert main(["launch", str(study_file), "--storage", storage, "--n-trials", "2", "--quiet"]) == 2
    assert "objective: the data settings differ" in capsys.readouterr().err
    assert len(_load(storage).trials) == 1


def test_bad_executor_options_are_refused_even_when_nothing_is_left_to_run(tmp_path, capsys):
    study_file = write_tiny_shear_study(tmp_path, n_trials=1, objective_extra='reference = "none"')
    storage = f"sqlite:///{tmp_path}/s.db"
    assert main(["launch", str(study_file), "--storage", storage, "--quiet"]) == 0
    assert main(["launch", str(study_file), "--storage", storage, "--max-failures", "-1"]) == 2
    assert "--max-failures: must be 0" in capsys.readouterr().err
    args = ["launch", str(study_file), "--storage", storage, "--executor", "ray"]
    assert main([*args, "--gpus-per-trial", "-1"]) == 2
    assert "--gpus-per-trial must be >= 0" in capsys.readouterr().err


def test_the_installed_console_script_runs_the_cli(tmp_path):
    script = shutil.which("lensnas", path=str(Path(sys.executable).parent)) or shutil.which("lensnas")
    if script is None:
        if in_ci():
            pytest.fail("the lensnas console script is not installed: pip install -e .")
        pytest.skip("the lensnas console script is not installed (pip install -e .)")
    shown = subprocess.run([script, "--help"], capture_output=True, text=True, check=False)
    assert shown.returncode == 0 and "launch" in shown.stdout
    missing = subprocess.run([script, "status", "nope", "--storage", f"sqlite:///{tmp_path}/none.db"],
                             capture_output=True, text=True, check=False)
    assert missing.returncode == 2 and len(missing.stderr.strip().splitlines()) == 1
    assert missing.stderr.startswith("lensnas status: error:")


def test_a_cuda_device_the_machine_lacks_is_refused_before_the_data(tmp_path, capsys):
    study_file = write_tiny_shear_study(tmp_path)
    study_file.write_text(study_file.read_text().replace("[training]\n", '[training]\ndevice = "cuda:99"\n'))
    code = main(["launch", str(study_file), "--storage", f"sqlite:///{tmp_path}/s.db",
                 "--cache-dir", str(tmp_path / "cache")])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert f"{study_file}: training.device: 'cuda:99' asked for" in err and '"cpu"' in err
    assert not (tmp_path / "cache").exists() and not (tmp_path / "s.db").exists()  # nothing stored


def test_unusable_paths_and_ports_are_one_line_errors(tmp_path, capsys):
    storage = f"sqlite:///{tmp_path}/s.db"
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    study_file = write_tiny_shear_study(tmp_path)
    optuna.create_study(study_name="empty", storage=storage)
    runs = {
        "--cache-dir": ["launch", str(study_file), "--storage", storage, "--cache-dir", str(blocker / "cache")],
        "report -o": ["report", "empty", "--storage", storage, "-o", str(blocker / "r.html")],
        "--port": ["dashboard", "--storage", storage, "--port", "70000"],
    }
    for what, argv in runs.items():
        code = main(argv)
        err = capsys.readouterr().err
        assert code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err, (what, err)
        assert ("a-file" in err) if what != "--port" else ("must be 0-65535" in err), (what, err)
    assert [s.study_name for s in optuna.get_all_study_summaries(storage)] == ["empty"]  # nothing stored


def test_a_grid_study_runs_its_whole_grid_and_ends(tmp_path):
    """Optuna's grid sampler calls study.stop() once its grid is done, an error outside
    study.optimize: the last grid point is stored COMPLETE and the launch ends cleanly."""
    study_file = write_tiny_shear_study(tmp_path, n_trials=2, epochs=1)
    text = study_file.read_text().replace('sampler = "tpe"', 'sampler = "grid"')
    text = text.replace('presets = ["shearnet_cnn"]', "presets = []")
    text = text[:text.index("[space]")] + '[space]\nwidth = { type = "categorical", choices = [4, 8] }\n'
    study_file.write_text(text)
    storage = f"sqlite:///{tmp_path}/grid.db"
    assert main(["launch", str(study_file), "--storage", storage, "--quiet"]) == 0
    trials = _load(storage).trials
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 2
    assert sorted(t.params["width"] for t in trials) == [4, 8]
