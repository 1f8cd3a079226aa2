"""Ranking trials for the tables, the report and export."""

from __future__ import annotations

import optuna
from lensnas.search.summary import best_trials
from optuna.distributions import FloatDistribution
from optuna.trial import TrialState, create_trial


def _study(directions: list[str], values: list[list[float]]) -> optuna.Study:
    study = optuna.create_study(directions=directions)
    for number, trial_values in enumerate(values):
        study.add_trial(create_trial(values=trial_values, params={"x": float(number)},
                                     distributions={"x": FloatDistribution(0, 100)}))
    study.add_trial(create_trial(state=TrialState.FAIL))
    return study


def test_multi_objective_top_k_is_the_pareto_front_then_the_next_fronts():
    # minimise rmse, maximise the second value: fronts {0, 3}, then {1}, then {2}
    values = [[0.1, 5.0], [0.2, 5.0], [0.3, 4.0], [0.05, 1.0]]
    study = _study(["minimize", "maximize"], values)
    assert [t.number for t in best_trials(study, 2)] == sorted(t.number for t in study.best_trials)
    assert [t.number for t in best_trials(study, 3)] == [0, 3, 1]
    assert [t.number for t in best_trials(study, 10)] == [0, 3, 1, 2]  # failed trial left out


def test_single_objective_top_k_follows_the_direction():
    study = _study(["maximize"], [[1.0], [3.0], [2.0]])
    assert [t.number for t in best_trials(study, 2)] == [1, 2]
