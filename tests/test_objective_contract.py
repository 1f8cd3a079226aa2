"""The objective contract: the engine finds objectives and families by name and never names
one; a new objective written only against the contract runs through launch, report and export;
a data error raised while an objective prepares is one line and exit 2."""

from __future__ import annotations

import re
import textwrap
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import optuna
import pytest
import torch
from torch import nn

from lensnas import spaces
from lensnas.objectives import (
    Baseline,
    Metric,
    Objective,
    ValidationScore,
    objective_class,
    objective_names,
    register_objective,
)
from lensnas.objectives.training import predict
from lensnas.search.cli import main
from lensnas.search.launch import launch
from lensnas.search.results.export import export_study
from lensnas.search.results.report import build_report
from lensnas.spaces.family import TRAINING_RULES, Family, Range

SEARCH = Path(__file__).parents[1] / "search"
FORBIDDEN = re.compile(r"shear|sr_net|bicubic|galsim", re.IGNORECASE)


def test_no_engine_file_names_an_objective():
    files = sorted(SEARCH.glob("*.py"))
    assert len(files) > 10
    offenders = [
        f"{path.name}:{number}: {line.strip()}"
        for path in files
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1)
        if FORBIDDEN.search(line)
    ]
    assert not offenders, offenders


class MeanNet(nn.Module):
    """A toy network: one convolution, then the mean of the image (the label it learns)."""

    def __init__(self, config: dict[str, Any], size: int = 8):
        super().__init__()
        self.conv = nn.Conv2d(1, config["width"], 3, padding=1)
        self.head = nn.Linear(config["width"], 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.conv(x)).mean(dim=(2, 3)))


def _example(spec: dict[str, Any], batch: int, generator: torch.Generator):
    return torch.rand(batch, 1, spec["size"], spec["size"], generator=generator), {0: "b"}, {0: "b"}


MEAN_NET = Family(
    name="toy_mean_net",
    version=1,
    build=lambda config, size=8: MeanNet(config, size),
    rules={"width": Range(1, 64, integer=True), **TRAINING_RULES},
    defaults={"width": 4, "learning_rate": 1e-2, "batch_size": 16, "epochs": 2,
              "weight_decay": 0.0},
    architecture_keys=("width",),
    example_input=_example,
    describe_io=lambda spec: f"input (N, 1, {spec['size']}, {spec['size']}); output (N, 1) mean",
    presets={"tiny": {"width": 2}},
)


class MeanObjective(Objective):
    """Learn the mean pixel of random images: an objective written only against the contract."""

    name = "toy_mean"
    family = MEAN_NET
    OPTIONS: ClassVar[dict[str, Any]] = {"n": 64, "size": 8}
    METRICS: ClassVar[dict[str, Metric]] = {
        "rmse": Metric("minimize", "RMSE of the predicted mean", summary=True),
        "validation_score": Metric("minimize", "best validation RMSE"),
        "n_params": Metric("minimize", "parameters"),
    }
    DEFAULT_METRIC = "rmse"
    VALIDATION_SCORE = ValidationScore("validation RMSE of the mean", "minimize", "rmse")

    def dataset_config(self) -> dict[str, Any]:
        return {"n": self.options["n"], "size": self.options["size"], "seed": self.seed}

    def load_data(self):
        rng = np.random.default_rng(self.seed)
        size = self.options["size"]
        images = rng.random((3 * self.options["n"], 1, size, size)).astype(np.float32)
        images *= rng.random((len(images), 1, 1, 1)).astype(np.float32)
        return {"images": images, "labels": images.mean(axis=(2, 3))}, {}

    def after_load(self) -> None:
        n, labels = self.options["n"], self.data["labels"]
        spread = float(np.sqrt(np.mean((labels[2 * n:] - labels[:n].mean()) ** 2)))
        self.baselines = [Baseline("train_mean", "training mean", "always predicts the mean "
                                   "label of the training set", {"rmse": spread})]

    def split(self, index: int) -> slice:
        n = self.options["n"]
        return slice(index * n, (index + 1) * n)

    def training_data(self, config):
        return self.data["images"][self.split(0)], self.data["labels"][self.split(0)]

    def architecture_arguments(self) -> dict[str, Any]:
        return {"size": self.options["size"]}

    def loss(self, config: dict[str, Any]) -> nn.Module:
        return nn.MSELoss()

    def _rmse(self, model: nn.Module, index: int, device: str) -> float:
        estimate = predict(model, self.data["images"][self.split(index)], 64, device)
        return float(np.sqrt(np.mean((estimate - self.data["labels"][self.split(index)]) ** 2)))

    def validation_score(self, model: nn.Module, device: str) -> float:
        return self._rmse(model, 1, device)

    def score(self, model: nn.Module, config: dict[str, Any], ctx: Any) -> dict[str, Any]:
        return {"rmse": self._rmse(model, 2, ctx.device), "group": {"a": 1.0, "b": 2.0}}

    def split_sizes(self) -> dict[str, int]:
        return {"train": self.options["n"], "validation": self.options["n"],
                "test": self.options["n"]}


TOY_STUDY = """
[study]
name = "toy"
objective = "toy_mean"
n_trials = 3
seed = 1
pruner = "median"
presets = ["tiny"]

[objective]
n = 48

[space]
width = { type = "int", low = 2, high = 8 }
learning_rate = { type = "float", low = 1e-3, high = 3e-2, log = true }
"""


@pytest.fixture
def toy_registered():
    spaces.register_family(MEAN_NET)
    register_objective("toy_mean", MeanObjective)
    yield
    from lensnas import objectives

    objectives._LOCATIONS.pop("toy_mean", None)
    objectives._LOADED.pop("toy_mean", None)


def test_a_plug_in_objective_runs_through_launch_report_and_export(tmp_path, toy_registered):
    assert "toy_mean" in objective_names() and objective_class("toy_mean") is MeanObjective
    study_file = tmp_path / "toy.toml"
    study_file.write_text(textwrap.dedent(TOY_STUDY))
    url = f"sqlite:///{tmp_path / 'toy.db'}"
    study = launch(study_file, url, quiet=True, cache_dir=tmp_path / "cache")
    trials = study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))
    assert len(study.trials) == 3 and trials
    assert trials[0].user_attrs["group"] == {"a": 1.0, "b": 2.0}  # a group is stored together
    assert study.trials[0].user_attrs["preset"] == "tiny"
    (baseline,) = study.user_attrs["baselines"]
    assert baseline["key"] == "train_mean" and study.user_attrs["n_test"] == 48
    for trial in study.trials:  # intermediate values are the validation score, per epoch
        assert len(trial.intermediate_values) >= 1
    report = build_report(study, url)
    assert "<td>training mean</td>" in report and "validation RMSE of the mean" in report
    folder = export_study(study, url, tmp_path / "best", top=1)[0]
    model = spaces.load(folder)
    x = torch.rand(2, 1, 8, 8)
    scripted = torch.jit.load(str(folder / "model.ts"))
    with torch.no_grad():
        np.testing.assert_allclose(scripted(x).numpy(), model(x).numpy(), atol=1e-6)
    card = (folder / "MODEL_CARD.md").read_text()
    assert "output (N, 1) mean" in card and "training mean" in card


def test_a_pruner_needs_a_score_in_the_direction_of_the_metric(tmp_path, toy_registered, capsys):
    study_file = tmp_path / "toy.toml"
    study_file.write_text(textwrap.dedent(TOY_STUDY).replace(
        'objective = "toy_mean"', 'objective = "toy_mean"\nmetrics = ["n_params"]\n'
        'directions = ["maximize"]'))
    assert main(["launch", str(study_file), "--storage", f"sqlite:///{tmp_path / 'x.db'}"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "study.pruner" in err and "allowed here" in err


def test_a_data_error_while_preparing_is_one_line_and_exit_2(tmp_path, capsys):
    folder = tmp_path / "pairs"
    (folder / "LR").mkdir(parents=True)
    (folder / "HR").mkdir()
    rng = np.random.default_rng(0)
    for i in range(6):
        np.save(folder / "LR" / f"sample{i}.npy", rng.random((1, 8, 8)).astype(np.float32))
        np.save(folder / "HR" / f"image{i}.npy", rng.random((1, 16, 16)).astype(np.float32))
    study_file = tmp_path / "sr.toml"
    study_file.write_text(textwrap.dedent(f"""
        [study]
        name = "bad-folder"
        objective = "sr"
        n_trials = 1
        [objective]
        source = "folder"
        folder = "{folder}"
        [space]
        depth = 1
    """))
    storage = f"sqlite:///{tmp_path / 'x.db'}"
    assert main(["launch", str(study_file), "--storage", storage, "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "Traceback" not in err
    assert "image0.npy" in err and "has no LR partner" in err


def test_comparison_tables_separate_groups_and_flag_significant_biases():
    from lensnas.objectives.shear.objective import ShearObjective
    from lensnas.search.results.comparison import FLAG, comparison_tables

    baselines = [
        Baseline("reference_object", "metacal, per-galaxy response", "own response", {"rmse": 5e-4}),
        Baseline("reference", "metacal, mean response", "ensemble",
                 {"rmse": 1e-2, "m1": 0.011, "m1_err": 0.013}, group="ensemble"),
    ]
    network = ("network (trial 3)", {"rmse": 1e-3, "m2": -0.016, "m2_err": 0.004, "m1": 0.001,
                                     "m1_err": 0.002})
    tables = comparison_tables(ShearObjective, baselines, network)
    (title, sentence, header, rows), (ensemble_title, ensemble_sentence, _, ensemble_rows) = tables
    assert title == "Headline comparison" and FLAG not in sentence  # no errors: no flag note
    assert [row[0] for row in rows] == ["network (trial 3)", "metacal, per-galaxy response"]
    assert [row[0] for row in ensemble_rows] == ["network (trial 3)", "metacal, mean response"]
    assert "mean response" in ensemble_title and "surveys" in ensemble_sentence
    header_index = {name: i for i, name in enumerate(header)}
    assert header == ["estimator", "rmse", "what it is"]  # only metrics some baseline has
    cells = dict(zip(tables[1][2], ensemble_rows[0]))
    assert FLAG not in cells["m1"] and header_index["rmse"] == 1
    network_only = comparison_tables(ShearObjective, [Baseline("x", "x", "x", {"m2": 0.0})],
                                     network)[0]
    assert network_only[3][0][1].endswith(f"{FLAG} 4.0σ")  # m2 = -0.016 ± 0.004: 4 sigma
    assert FLAG in network_only[1]  # the table has errors: its sentence explains the flag
