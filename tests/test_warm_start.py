"""Warm start: a study starts from the finished trials of earlier studies in the same storage
that fit its space (copied with values and intermediate values, or the best K enqueued), never
copies them twice, and refuses an earlier study it cannot use in one line.

The earlier studies are real lensnas studies in real SQLite whose trials are written with
``create_trial`` (exact params, states and values, no training); one new trial trains.
"""

from __future__ import annotations

import optuna
import pytest
from optuna.trial import TrialState

from lensnas.objectives import objective_class
from lensnas.search.cli import main
from lensnas.search.spec import SpecError, load_spec
from lensnas.search.storage import open_storage
from lensnas.search.study import (
    WARM_START_FROM,
    WARM_STARTED,
    distribution,
    fit_params,
    fixed_config,
    open_study,
    warm_start_sources,
    warm_start_study,
)
from lensnas.spaces import parse_space
from tests.conftest import write_tiny_shear_study

COMPLETE, PRUNED, FAIL = TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL
# (state, params, value, intermediate values) of the earlier study "earlier"
EARLIER = [
    (COMPLETE, {"depth": 1, "width": 8, "pooling": "max", "head": "gap"}, 0.03, {1: 0.05}),
    (COMPLETE, {"depth": 2, "width": 16, "pooling": "avg", "head": "dense", "dense_units": 128}, 0.02, {1: 0.04}),
    (COMPLETE, {"depth": 1, "width": 4, "pooling": "avg", "head": "gap"}, 0.01, {1: 0.03}),  # width
    (PRUNED, {"depth": 1, "width": 16, "pooling": "conv", "head": "gap"}, 0.2, {1: 0.2}),  # pooling
    (PRUNED, {"depth": 2, "width": 8, "pooling": "avg", "head": "gap"}, 0.09, {1: 0.09}),
    (FAIL, {"depth": 1, "width": 8, "pooling": "avg", "head": "gap"}, None, {}),
]


def _file(folder, name: str, *, epochs: int = 1, study_lines: str = "", n_trials: int = 4,
          width: str = "[4, 8, 16]", pooling: str = '["avg", "max", "conv", "none"]'):
    """The tiny shear study without presets, with another width/pooling space if asked."""
    path = write_tiny_shear_study(folder, name=name, n_trials=n_trials, epochs=epochs)
    text = path.read_text().replace('presets = ["shearnet_cnn"]', f"presets = []\n{study_lines}")
    text = text.replace("choices = [4, 8, 16]", f"choices = {width}")
    text = text.replace('choices = ["avg", "max", "conv", "none"]', f"choices = {pooling}")
    path.write_text(text)
    return path


def _earlier(folder, storage: str, name: str = "earlier", trials=EARLIER, **file) -> optuna.Study:
    """An earlier lensnas study holding ``trials`` exactly (written, not trained)."""
    spec = load_spec(_file(folder, name, **file))
    study = open_study(spec, open_storage(storage))
    distributions = {d.name: distribution(d) for d in spec.space if d.searched}
    for state, params, value, steps in trials:
        study.add_trial(optuna.trial.create_trial(
            state=state, value=value if state != FAIL else None, params=params,
            distributions={key: distributions[key] for key in params}, intermediate_values=steps,
            user_attrs={"rmse": value} if state == COMPLETE else {},
        ))
    return study


def _later(folder, **file):
    """The new study: width 8 or 16, pooling avg or max; else as the earlier study."""
    return _file(folder, "later", width="[8, 16]", pooling='["avg", "max"]', **file)


def test_warm_start_copies_exactly_the_fitting_trials_and_never_twice(tmp_path, capsys):
    storage = f"sqlite:///{tmp_path}/lensnas.db"
    earlier = _earlier(tmp_path, storage)
    _earlier(tmp_path, storage, "epochs2", trials=EARLIER[:1], epochs=2)  # trained otherwise
    path = _later(tmp_path, study_lines='warm_start = ["earlier"]\n'
                  "sampler_options = { n_startup_trials = 2 }")
    args = ["launch", str(path), "--storage", storage]
    assert main([*args, "--warm-start", "epochs2"]) == 0
    err = capsys.readouterr().err
    assert ("warm start: copied 3 of 5 finished trials of earlier; 2 do not fit the space: "
            "width=4 not one of [8, 16], pooling='conv' not one of ['avg', 'max']") in err
    assert ("warm start: copied 0 of 1 finished trials of epochs2; 1 do not fit the space: "
            "epochs=2, fixed at 1 here") in err

    study = optuna.load_study(study_name="later", storage=storage)
    assert study.user_attrs[WARM_STARTED] == ["earlier", "epochs2"]
    spec = load_spec(path)
    space = {d.name: distribution(d) for d in spec.space if d.searched}
    copied, new = study.trials[:3], study.trials[3]
    for trial, number in zip(copied, (0, 1, 4)):
        source = earlier.trials[number]
        assert trial.user_attrs[WARM_START_FROM] == f"earlier:{number}"
        assert trial.state == source.state and trial.values == source.values
        assert trial.params == source.params
        assert trial.intermediate_values == source.intermediate_values
        assert trial.distributions == {key: space[key] for key in trial.params}  # this study's
        assert trial.user_attrs.get("rmse") == source.user_attrs.get("rmse")
    # copied trials count towards n_trials (4): one new trial ran, sampled by TPE after them
    assert len(study.trials) == 4 and new.state == COMPLETE
    assert WARM_START_FROM not in new.user_attrs and sorted(new.intermediate_values) == [1]
    assert new.params["width"] in (8, 16)

    # resume, with the same and one more --warm-start: nothing is copied again
    assert main([*args, "--warm-start", "epochs2", "--n-trials", "4"]) == 0
    assert "warm start" not in capsys.readouterr().err
    # a launch that died between copying and recording the earlier study copies nothing twice
    study.set_user_attr(WARM_STARTED, [])
    assert main(args) == 0
    assert "copied 0 of 5 finished trials of earlier (3 already here)" in capsys.readouterr().err
    assert len(optuna.load_study(study_name="later", storage=storage).trials) == 4


def test_warm_start_top_enqueues_the_best_params(tmp_path):
    storage = f"sqlite:///{tmp_path}/lensnas.db"
    _earlier(tmp_path, storage)
    spec = load_spec(_later(tmp_path, study_lines='warm_start = "earlier"\nwarm_start_top = 2'))
    optuna_storage = open_storage(storage)
    sources = warm_start_sources(spec, optuna_storage)
    study = open_study(spec, optuna_storage)
    lines = warm_start_study(spec, study, sources)
    assert lines == [("warm start: enqueued the params of the best 2 of 3 complete trials of "
                     "earlier; 1 do not fit the space: width=4 not one of [8, 16]")]
    waiting = study.trials
    assert [t.state for t in waiting] == [TrialState.WAITING] * 2
    assert [t.user_attrs[WARM_START_FROM] for t in waiting] == ["earlier:1", "earlier:0"]  # best first
    assert waiting[0].system_attrs["fixed_params"] == EARLIER[1][1]  # where Optuna keeps them
    assert warm_start_sources(spec, optuna_storage) == {}  # used once


def _refusal(capsys, args: list[str], storage: str) -> str:
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert "later" not in optuna.get_all_study_names(storage)  # checked before creating it
    return err


def test_an_earlier_study_that_cannot_be_used_is_one_line(tmp_path, capsys):
    storage = f"sqlite:///{tmp_path}/lensnas.db"
    _earlier(tmp_path, storage)
    other = optuna.create_study(study_name="sr-study", storage=storage)
    other.set_user_attr("objective", "sr")
    two = optuna.create_study(study_name="two-metrics", storage=storage, directions=["minimize"] * 2)
    two.set_user_attr("objective", "shear")
    two.set_user_attr("metrics", ["rmse", "abs_m"])
    data = _file(tmp_path, "other-data", study_lines="")
    data.write_text(data.read_text().replace("n_train = 160", "n_train = 200"))
    open_study(load_spec(data), open_storage(storage))

    args = ["launch", str(_later(tmp_path)), "--storage", storage]
    err = _refusal(capsys, [*args, "--warm-start", "nope"], storage)
    assert err.endswith("--warm-start nope: is not a study of this storage; stored studies: "
                        "earlier, sr-study, two-metrics, other-data")
    assert ("--warm-start sr-study: is a study of objective 'sr', this one of 'shear'; allowed: "
            "a study of the same objective") in _refusal(capsys, [*args, "--warm-start", "sr-study"], storage)
    assert ("--warm-start two-metrics: optimises ['rmse', 'abs_m'] (minimize, minimize), this "
            "study ['rmse'] (minimize)") in _refusal(capsys, [*args, "--warm-start", "two-metrics"], storage)
    assert ("--warm-start other-data: has other data settings (objective.n_train differ)"
            in _refusal(capsys, [*args, "--warm-start", "other-data"], storage))
    assert "--warm-start later: is this study itself" in _refusal(capsys, [*args, "--warm-start", "later"], storage)
    path = _later(tmp_path, study_lines='warm_start = ["earlier", "nope"]')
    err = _refusal(capsys, ["launch", str(path), "--storage", storage], storage)
    assert f"{path}: study.warm_start: 'nope' is not a study of this storage" in err


def test_fit_params_follows_fixed_values_and_conditions():
    family = objective_class("shear").family
    space = parse_space({
        "learning_rate": {"type": "float", "low": 1e-3, "high": 4e-3, "log": True},
        "head": {"type": "categorical", "choices": ["dense", "gap"]},
        "dense_units": {"type": "categorical", "choices": [16, 32], "when": {"head": "dense"}},
        "pooling": "max",
    })
    fixed = fixed_config(family, {"epochs": 1}, space)

    def fit(params, training):
        distributions = {
            "head": optuna.distributions.CategoricalDistribution(["dense", "gap"]),
            "dense_units": optuna.distributions.CategoricalDistribution([16, 32]),
            "pooling": optuna.distributions.CategoricalDistribution(["avg", "max"]),
        }
        trial = optuna.trial.create_trial(
            value=0.1, params=params, distributions={k: distributions[k] for k in params})
        return fit_params(trial, space, fixed_config(family, training, []), fixed)

    good = {"head": "gap", "pooling": "max"}
    # a learning rate the earlier study fixed is this study's param when its range holds it
    assert fit(good, {"epochs": 1, "learning_rate": 2e-3}) == ({"learning_rate": 2e-3, "head": "gap"}, None)
    assert fit(good, {"epochs": 1, "learning_rate": 0.1})[1] == "learning_rate=0.1 outside 0.001..0.004"
    assert fit(good, {"epochs": 2, "learning_rate": 2e-3})[1] == "epochs=2, fixed at 1 here"
    assert fit({**good, "dense_units": 16}, {"epochs": 1, "learning_rate": 2e-3})[1] == (
        "dense_units is set but inactive here (head in ['dense'])")
    assert fit({"head": "gap", "pooling": "avg"}, {"epochs": 1, "learning_rate": 2e-3})[1] == (
        "pooling='avg', fixed at 'max' here")
    dense = {"head": "dense", "pooling": "max"}  # dense_units then the family default (128)
    assert fit(dense, {"epochs": 1, "learning_rate": 2e-3})[1] == "dense_units=128 not one of [16, 32]"


@pytest.mark.parametrize(("lines", "expected"), [
    ('warm_start = ["later"]', "study.warm_start[0]: is this study itself"),
    ('warm_start = ["a b"]', "study.warm_start[0]: must be a study name"),
    ('warm_start = ["x", "x"]', "study.warm_start: has repeated studies"),
    ("warm_start_top = 0", "study.warm_start_top: must be in 1..10000, got 0"),
])
def test_bad_warm_start_keys(tmp_path, lines, expected):
    with pytest.raises(SpecError) as info:
        load_spec(_later(tmp_path, study_lines=lines))
    assert expected in str(info.value) and "\n" not in str(info.value)
