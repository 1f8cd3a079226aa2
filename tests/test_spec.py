"""Study-file validation: good files load, bad ones give one line naming file, key and what is allowed."""

from __future__ import annotations

import pytest

from lensnas.search.spec import SpecError, load_spec
from tests.conftest import write_tiny_shear_study


def _spec_with(tmp_path, old: str, new: str):
    path = write_tiny_shear_study(tmp_path)
    text = path.read_text()
    assert old in text, old
    path.write_text(text.replace(old, new, 1))
    return path


def _error(path) -> str:
    with pytest.raises(SpecError) as info:
        load_spec(path)
    message = str(info.value)
    assert "\n" not in message
    assert str(path) in message
    return message


def test_good_study_file_loads(tmp_path):
    spec = load_spec(write_tiny_shear_study(tmp_path))
    assert spec.name == "tiny" and spec.objective == "shear"
    assert spec.metrics == ("rmse",) and spec.directions == ("minimize",)
    assert spec.objective_options["stamp_size"] == 25
    assert spec.objective_options["noise_sigma"] == 1e-5  # default kept
    assert [d.name for d in spec.space][-1] == "dense_units"  # child after its parent
    assert spec.presets == ("shearnet_cnn",)


def test_shipped_studies_load():
    from pathlib import Path

    for path in sorted(Path(__file__).parents[1].joinpath("studies").glob("*.toml")):
        spec = load_spec(path)
        assert spec.n_trials >= 1


@pytest.mark.parametrize(
    "old, new, expected",
    [
        ('pruner = "none"', 'prunner = "none"', "study.prunner: unknown key (did you mean 'pruner'?)"),
        ('sampler = "tpe"', 'sampler = "bayes"', "study.sampler: must be one of tpe, random, gp, nsga2, grid"),
        ('pruner = "none"', 'pruner = "medain"', "(did you mean 'median'?)"),
        ('objective = "shear"', 'objective = "shaer"', "study.objective: must be one of"),
        ("n_trials = 3", 'n_trials = "three"', "study.n_trials: must be an integer"),
        ("n_trials = 3", "n_trials = -1", "study.n_trials: must be in 1..1000000"),
        ('metrics = ["rmse"]', 'metrics = ["rsme"]', "study.metrics[0]: must be one of"),
        ("n_train = 160", "n_trian = 160", "objective.n_trian: unknown key (did you mean 'n_train'?)"),
        ("stamp_size = 25", 'stamp_size = "big"', "objective.stamp_size: must be an integer"),
        ("half_light_radius_max = 0.6", "half_light_radius_max = 0.1", "impossible range"),
        ("epochs = 2", "epochs = 0", "training.epochs: 0 is outside the allowed range"),
        ("batch_size = 32", "batchsize = 32", "training.batchsize: unknown key (did you mean 'batch_size'?)"),
        ('depth = { type = "int", low = 1, high = 2 }', 'depth = { type = "int", low = 3, high = 2 }',
         "space.depth: impossible range: low=3 > high=2"),
        ('depth = { type = "int", low = 1, high = 2 }', 'depht = { type = "int", low = 1, high = 2 }',
         "space.depht: unknown dimension 'depht' (did you mean 'depth'?)"),
        ('depth = { type = "int", low = 1, high = 2 }', 'depth = { type = "integer", low = 1, high = 2 }',
         "space.depth.type: must be one of int, float, categorical"),
        ('depth = { type = "int", low = 1, high = 2 }', 'depth = { type = "int", lo = 1, high = 2 }',
         "space.depth: unknown key 'lo' (did you mean 'low'?)"),
        ('"avg", "max", "conv", "none"', '"avg", "maximum"', "space.pooling: 'maximum' is not allowed"),
        ('when = { head = "dense" }', 'when = { haed = "dense" }', "space.dense_units.when.haed: refers to no dimension"),
        ('when = { head = "dense" }', 'when = { head = "mlp" }', "'mlp' is not a value of 'head'"),
        ('presets = ["shearnet_cnn"]', 'presets = ["shearnet"]', "(did you mean 'shearnet_cnn'?)"),
        ("[space]", "[spaces]", "unknown table [spaces] (did you mean 'space'?)"),
    ],
)
def test_bad_values_name_file_key_and_allowed(tmp_path, old, new, expected):
    assert expected in _error(_spec_with(tmp_path, old, new))


def test_log_range_must_be_positive(tmp_path):
    path = _spec_with(
        tmp_path, "[space]", '[space]\nlearning_rate = { type = "float", low = 0.0, high = 0.1, log = true }'
    )
    assert "space.learning_rate.low: must be > 0 for a log dimension" in _error(path)


def test_dimension_in_both_training_and_space_is_refused(tmp_path):
    path = _spec_with(tmp_path, "[space]", '[space]\nepochs = { type = "int", low = 1, high = 3 }')
    assert "training.epochs: is also a dimension in [space]" in _error(path)


def test_multi_objective_cannot_prune(tmp_path):
    path = _spec_with(tmp_path, 'metrics = ["rmse"]', 'metrics = ["rmse", "abs_m"]')
    path.write_text(path.read_text().replace('pruner = "none"', 'pruner = "median"'))
    assert "study.pruner" in _error(path)


@pytest.mark.parametrize(
    "content, expected",
    [
        (b"", "missing table [study]"),
        (b"[study\nname=", "invalid TOML"),
        (b"\xff\xfe\x00binary\x00junk", "not a UTF-8 text file"),
        (b'[study]\nname = "x"\n', "study.objective: missing"),
        (b'[study]\nname = "a b"\nobjective = "shear"\n', "study.name: must be"),
        (b'study = 3\n', "study: must be a table"),
    ],
)
def test_malformed_files(tmp_path, content, expected):
    path = tmp_path / "bad.toml"
    path.write_bytes(content)
    assert expected in _error(path)


def test_missing_file(tmp_path):
    assert "no such study file" in _error(tmp_path / "nope.toml")


def test_cli_prints_one_line_and_exits_2(tmp_path, capsys):
    from lensnas.search.cli import main

    path = _spec_with(tmp_path, 'sampler = "tpe"', 'sampler = "bayes"')
    assert main(["launch", str(path), "--storage", f"sqlite:///{tmp_path}/x.db"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "study.sampler" in err and "Traceback" not in err
    assert not (tmp_path / "x.db").exists()  # nothing is created before validation passes
