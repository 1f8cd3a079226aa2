"""Trials are compared like with like: intermediate values are the objective's validation score
(in the units of the study's metric) whatever the training loss, and a pruned trial carries a
value only when that value is comparable with the study's metric."""

from __future__ import annotations

import math

import optuna
import pytest
from optuna.trial import TrialState

from lensnas.search.launch import launch
from tests.conftest import write_tiny_shear_study

MIXED_LOSSES = 'loss = { type = "categorical", choices = ["mse", "huber", "l1"] }\n'


def _study_file(tmp_path, metric: str, extra_space: str = "", objective_extra: str = ""):
    path = write_tiny_shear_study(tmp_path, n_trials=3, epochs=2, pruner="median",
                                  objective_extra=objective_extra)
    text = path.read_text().replace('metrics = ["rmse"]', f'metrics = ["{metric}"]')
    path.write_text(text + extra_space)
    return path


def _pruner(monkeypatch, pruner: optuna.pruners.BasePruner) -> None:
    # A real Optuna pruner whose decision is known in advance, in place of the median pruner.
    monkeypatch.setattr("lensnas.search.study.make_pruner", lambda spec: pruner)


def test_intermediate_values_are_validation_rmse_whatever_the_loss(tmp_path, monkeypatch):
    _pruner(monkeypatch, optuna.pruners.NopPruner())
    study_file = _study_file(tmp_path, "rmse", MIXED_LOSSES)
    study = launch(study_file, f"sqlite:///{tmp_path / 'x.db'}", quiet=True, n_trials=4)
    losses = set()
    for trial in study.get_trials(states=(TrialState.COMPLETE,)):
        losses.add(trial.params.get("loss", "mse"))
        values = list(trial.intermediate_values.values())
        assert min(values) == pytest.approx(trial.user_attrs["validation_score"])
        # validation RMSE of g: the same quantity as the test RMSE (a loss would be MSE-sized
        # for "mse", another size for "huber" and "l1")
        assert 1 / 3 < trial.user_attrs["validation_score"] / trial.value < 3
    assert len(losses) >= 2, losses


def test_a_pruned_trial_keeps_a_comparable_value_only(tmp_path, monkeypatch):
    _pruner(monkeypatch, optuna.pruners.ThresholdPruner(upper=0.0))  # prunes after epoch 1
    same = launch(_study_file(tmp_path, "rmse"), f"sqlite:///{tmp_path / 'a.db'}", quiet=True)
    for trial in same.trials:
        assert trial.state == TrialState.PRUNED
        assert trial.value == pytest.approx(trial.intermediate_values[1])  # a validation RMSE
    other = launch(
        _study_file(tmp_path / "", "rmse_ratio", objective_extra='reference = "hsm"'),
        f"sqlite:///{tmp_path / 'b.db'}", quiet=True,
    )
    for trial in other.trials:
        assert trial.state == TrialState.PRUNED
        assert trial.value is None  # a validation RMSE is not an RMSE ratio
        assert math.isfinite(trial.intermediate_values[1])
