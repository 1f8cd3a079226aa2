"""[study] sampler_options and pruner_options: they reach the Optuna objects lensnas builds (also
those of a launched study and of Ray workers), and a bad option is one line naming key and allowed.

Optuna has no public getters for its samplers' and pruners' settings: the checks read their
attributes (``_n_startup_trials`` ...), as of Optuna 5.0.
"""

from __future__ import annotations

import optuna
import pytest
from optuna.trial import TrialState

from lensnas.search import launch
from lensnas.search.cli import main
from lensnas.search.samplers import make_pruner, make_sampler
from lensnas.search.spec import SpecError, load_spec
from lensnas.search.storage import open_storage
from lensnas.search.study import open_study
from tests.conftest import write_tiny_shear_study
from tests.ray_fixtures import load, ray_session, write_ray_study

__all__ = ["ray_session"]  # the module-scoped fixture, imported for pytest


def _study_file(tmp_path, lines: str, sampler: str = "tpe", pruner: str = "none", epochs: int = 2):
    """The tiny shear study with ``sampler``/``pruner`` and extra ``lines`` in its [study]."""
    path = write_tiny_shear_study(tmp_path, pruner=pruner, epochs=epochs)
    text = path.read_text().replace('sampler = "tpe"', f'sampler = "{sampler}"\n{lines}', 1)
    path.write_text(text)
    return path


def test_defaults_are_kept(tmp_path):
    spec = load_spec(_study_file(tmp_path, ""))
    tpe = make_sampler(spec)
    assert (tpe._n_startup_trials, tpe._n_ei_candidates) == (5, 24)  # lensnas's 5, Optuna's 24
    assert tpe._multivariate is True and tpe._group is True and tpe._constant_liar is True
    median = make_pruner(load_spec(_study_file(tmp_path, "", pruner="median")))
    assert (median._n_startup_trials, median._n_warmup_steps, median._interval_steps) == (3, 1, 1)
    hyperband = make_pruner(load_spec(_study_file(tmp_path, "", pruner="hyperband")))
    # max_resource: training.epochs (2 here), not Optuna's "auto" (epochs + 1: steps from 0)
    assert (hyperband._min_resource, hyperband._max_resource, hyperband._reduction_factor) == (1, 2, 3)
    halving = make_pruner(load_spec(_study_file(tmp_path, "", pruner="successive_halving")))
    # Optuna's: min_resource "auto", reduction_factor 4; lensnas's 1 and 3, as its Hyperband
    assert (halving._min_resource, halving._reduction_factor, halving._min_early_stopping_rate) == (1, 3, 0)


@pytest.mark.parametrize(("sampler", "options", "read"), [
    ("tpe", "{ n_startup_trials = 4, n_ei_candidates = 8, constant_liar = false }",
     lambda s: (s._n_startup_trials, s._n_ei_candidates, s._constant_liar, s._group) == (4, 8, False, True)),
    ("tpe", "{ multivariate = false }",  # group follows multivariate unless set
     lambda s: (s._multivariate, s._group) == (False, False)),
    ("gp", "{ n_startup_trials = 3, deterministic_objective = true }",
     lambda s: (s._n_startup_trials, s._deterministic) == (3, True)),
    ("nsga2", "{ population_size = 8, mutation_prob = 0.25, crossover_prob = 0.5, swapping_prob = 0.4 }",
     lambda s: (s._population_size, s._child_generation_strategy._mutation_prob,
                s._child_generation_strategy._crossover_prob,
                s._child_generation_strategy._swapping_prob) == (8, 0.25, 0.5, 0.4)),
    ("random", "{}", lambda s: isinstance(s, optuna.samplers.RandomSampler)),
])
def test_sampler_options_reach_the_sampler(tmp_path, sampler, options, read):
    spec = load_spec(_study_file(tmp_path, f"sampler_options = {options}", sampler=sampler))
    assert read(make_sampler(spec))


@pytest.mark.parametrize(("pruner", "options", "expected"), [
    ("median", "{ n_startup_trials = 0, n_warmup_steps = 2, interval_steps = 2, n_min_trials = 3 }",
     {"_n_startup_trials": 0, "_n_warmup_steps": 2, "_interval_steps": 2, "_n_min_trials": 3}),
    ("hyperband", "{ min_resource = 1, max_resource = 2, reduction_factor = 2, bootstrap_count = 1 }",
     {"_min_resource": 1, "_max_resource": 2, "_reduction_factor": 2, "_bootstrap_count": 1}),
    ("successive_halving",
     "{ min_resource = 2, reduction_factor = 4, min_early_stopping_rate = 1, bootstrap_count = 2 }",
     {"_min_resource": 2, "_reduction_factor": 4, "_min_early_stopping_rate": 1, "_bootstrap_count": 2}),
])
def test_pruner_options_reach_the_pruner(tmp_path, pruner, options, expected):
    spec = load_spec(_study_file(tmp_path, f"pruner_options = {options}", pruner=pruner))
    built = make_pruner(spec)
    assert {key: getattr(built, key) for key in expected} == expected


@pytest.mark.parametrize(("lines", "expected"), [
    ("sampler_options = { n_startup = 4 }",
     ("study.sampler_options.n_startup: not an option of the sampler \"tpe\" (did you mean "
     "'n_startup_trials'?); allowed: n_startup_trials, n_ei_candidates, multivariate, group, "
     "constant_liar")),
    ("sampler_options = { n_startup_trials = -1 }",
     "study.sampler_options.n_startup_trials: must be an integer >= 0, got -1"),
    ("sampler_options = { n_startup_trials = 2.5 }",
     "study.sampler_options.n_startup_trials: must be an integer >= 0, got 2.5"),
    ("sampler_options = { constant_liar = 1 }",
     "study.sampler_options.constant_liar: must be true or false, got 1"),
    ("sampler_options = { multivariate = false, group = true }",
     "study.sampler_options.group: needs multivariate = true"),
    ("sampler_options = { consider_endpoints = true }",  # deprecated by Optuna: not offered
     "study.sampler_options.consider_endpoints: not an option of the sampler \"tpe\""),
    ("sampler_options = 4", "study.sampler_options: must be a table of options, got 4"),
    ("pruner_options = { reduction_factor = 1 }",
     "study.pruner_options.reduction_factor: must be an integer >= 2, got 1"),
    ("pruner_options = { min_resource = 0 }",
     "study.pruner_options.min_resource: must be an integer >= 1, got 0"),
    ("pruner_options = { max_resource = \"all\" }",
     "study.pruner_options.max_resource: must be \"auto\" or an integer >= 1, got 'all'"),
    ("pruner_options = { max_resource = 5 }",
     "study.pruner_options.max_resource: 5 epochs is more than training.epochs (2)"),
    ("pruner_options = { min_resource = 3 }",
     "study.pruner_options.min_resource: 3 epochs is more than training.epochs (2)"),
    ("pruner_options = { min_resource = 2, max_resource = 1 }",
     "study.pruner_options.max_resource: must be at least min_resource (2), got 1"),
    ("pruner_options = { max_resource = \"auto\", bootstrap_count = 1 }",
     "study.pruner_options.bootstrap_count: needs an integer max_resource"),
    ("pruner_options = { n_warmup_steps = 1 }",
     ("study.pruner_options.n_warmup_steps: not an option of the pruner \"hyperband\"; allowed: "
     "min_resource, max_resource, reduction_factor, bootstrap_count")),
])
def test_bad_option_is_one_line_naming_key_and_what_is_allowed(tmp_path, lines, expected):
    path = _study_file(tmp_path, lines, pruner="hyperband")
    with pytest.raises(SpecError) as info:
        load_spec(path)
    message = str(info.value)
    assert "\n" not in message and message.startswith(f"{path}: ")
    assert expected in message


@pytest.mark.parametrize(("lines", "expected"), [
    ("pruner_options = { min_resource = 3 }",
     "study.pruner_options.min_resource: 3 epochs is more than training.epochs (2)"),
    ("pruner_options = { max_resource = 2 }",
     ("study.pruner_options.max_resource: not an option of the pruner \"successive_halving\" "
      "(did you mean 'min_resource'?); allowed: min_resource, reduction_factor, min_early_stopping_rate, bootstrap_count")),
    ("pruner_options = { min_early_stopping_rate = -1 }",
     "study.pruner_options.min_early_stopping_rate: must be an integer >= 0, got -1"),
])
def test_bad_successive_halving_option_is_one_line(tmp_path, lines, expected):
    path = _study_file(tmp_path, lines, pruner="successive_halving")
    with pytest.raises(SpecError) as info:
        load_spec(path)
    assert "\n" not in str(info.value) and expected in str(info.value)


def test_options_of_a_sampler_or_pruner_without_any(tmp_path, capsys):
    path = _study_file(tmp_path, "sampler_options = { seed = 1 }", sampler="random")
    assert main(["launch", str(path), "--storage", f"sqlite:///{tmp_path}/x.db"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert 'study.sampler_options.seed: the sampler "random" takes no options; allowed: none' in err
    assert not (tmp_path / "x.db").exists()
    path = _study_file(tmp_path, "pruner_options = { n_startup_trials = 1 }")
    with pytest.raises(SpecError, match='the pruner "none" takes no options'):
        load_spec(path)


def test_launched_study_uses_the_options(tmp_path):
    lines = "sampler_options = { n_startup_trials = 2, n_ei_candidates = 12 }\n" \
            "pruner_options = { n_startup_trials = 1, n_warmup_steps = 0 }"
    path = _study_file(tmp_path, lines, pruner="median", epochs=1)
    storage = f"sqlite:///{tmp_path}/lensnas.db"
    study = launch(path, storage, n_trials=1, quiet=True)
    assert [t.state for t in study.trials] == [TrialState.COMPLETE]
    assert (study.sampler._n_startup_trials, study.sampler._n_ei_candidates) == (2, 12)
    assert (study.pruner._n_startup_trials, study.pruner._n_warmup_steps) == (1, 0)


def test_successive_halving_prunes_a_bad_trial_at_its_first_rung(tmp_path):
    """One bracket (rung 0 at epoch 1 of 2): a trial worse there than those before it stops."""
    path = write_ray_study(tmp_path, "halving", n_trials=3, epochs=2, pruner="successive_halving")
    spec = load_spec(path)
    storage = f"sqlite:///{tmp_path}/lensnas.db"
    study = open_study(spec, open_storage(storage))
    arch = {"depth": 1, "width": 8, "pooling": "max", "head": "gap"}
    for learning_rate in (3e-3, 1.0, 1.0):  # a good one, then two far too fast
        study.enqueue_trial({**arch, "learning_rate": learning_rate})
    launch(spec, storage, quiet=True)
    good, *bad = load(storage, "halving").trials
    assert good.state == TrialState.COMPLETE and list(good.intermediate_values) == [1, 2]
    for trial in bad:
        assert trial.state == TrialState.PRUNED
        assert list(trial.intermediate_values) == [1]  # stopped after epoch 1 of 2
        assert trial.system_attrs["completed_rung_0"] == trial.intermediate_values[1]


def test_hyperband_under_ray_with_two_trials_in_flight(tmp_path, ray_session):
    """The Ray workers' pruner is the study's Hyperband with its options (one bracket: rung 0 at
    epoch 1); a trial worse there than one already at that rung is PRUNED with its values."""
    path = write_ray_study(tmp_path, "hyper", n_trials=4, epochs=2, pruner="hyperband")
    options = "pruner_options = { min_resource = 1, max_resource = 2, reduction_factor = 3 }"
    path.write_text(path.read_text().replace('pruner = "hyperband"', f'pruner = "hyperband"\n{options}'))
    spec = load_spec(path)
    storage = f"sqlite:///{tmp_path}/lensnas.db"
    study = open_study(spec, open_storage(storage))
    arch = {"depth": 1, "width": 8, "pooling": "max", "head": "gap"}
    for learning_rate in (3e-3, 3.5e-3, 1.0, 1.0):  # two good ones first, then two far too fast
        study.enqueue_trial({**arch, "learning_rate": learning_rate})
    launch(spec, storage, quiet=True, executor="ray", max_concurrent=2)
    trials = load(storage, "hyper").trials
    assert len(trials) == 4 and all(t.user_attrs["executor"] == "ray" for t in trials)
    first, second, *bad = trials
    assert first.datetime_start < second.datetime_complete and second.datetime_start < first.datetime_complete
    assert TrialState.COMPLETE in (first.state, second.state)
    assert {first.state, second.state} <= {TrialState.COMPLETE, TrialState.PRUNED}
    for trial in bad:  # started after a good trial had passed rung 0
        assert trial.params["learning_rate"] == 1.0
        assert trial.state == TrialState.PRUNED
        assert list(trial.intermediate_values) == [1]  # stopped after epoch 1 of 2
        assert trial.system_attrs["completed_rung_0"] == trial.intermediate_values[1]
        assert "rmse" not in trial.user_attrs
