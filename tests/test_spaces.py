"""Declarative spaces: conditional dimensions, suggestions, presets; shear CNN shapes."""

from __future__ import annotations

import itertools

import optuna
import pytest
import torch

from lensnas.spaces import parse_space, suggest
from lensnas.spaces.dimensions import SpaceError, admits
from lensnas.spaces.shear.cnn import POOLINGS, SHEAR_CNN, build_shear_cnn

SPACE = {
    "depth": {"type": "int", "low": 1, "high": 4, "step": 1},
    "learning_rate": {"type": "float", "low": 1e-4, "high": 1e-2, "log": True},
    "head": {"type": "categorical", "choices": ["dense", "gap"]},
    "dense_units": {"type": "int", "low": 16, "high": 256, "log": True, "when": {"head": ["dense"]}},
    "epochs": 3,
}


def test_conditional_dimension_exists_only_when_parent_matches():
    dimensions = parse_space(SPACE)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    seen_heads = set()
    for _ in range(30):
        trial = study.ask()
        params = suggest(trial, dimensions)
        seen_heads.add(params["head"])
        assert ("dense_units" in params) == (params["head"] == "dense")
        assert ("dense_units" in trial.params) == (params["head"] == "dense")
        assert 1 <= params["depth"] <= 4 and 1e-4 <= params["learning_rate"] <= 1e-2
        assert params["epochs"] == 3 and "epochs" not in trial.params  # fixed, not searched
        study.tell(trial, 0.0)
    assert seen_heads == {"dense", "gap"}


def test_children_are_ordered_after_parents_whatever_the_file_order():
    space = {"dense_units": SPACE["dense_units"], "head": SPACE["head"]}
    assert [d.name for d in parse_space(space)] == ["head", "dense_units"]


def test_condition_cycle_is_refused():
    space = {
        "a": {"type": "categorical", "choices": [1, 2], "when": {"b": [1]}},
        "b": {"type": "categorical", "choices": [1, 2], "when": {"a": [1]}},
    }
    with pytest.raises(SpaceError, match="cycle"):
        parse_space(space)


def test_step_larger_than_range_is_refused():
    with pytest.raises(SpaceError, match="space.x.step"):
        parse_space({"x": {"type": "int", "low": 1, "high": 3, "step": 5}})


def test_preset_admission():
    dimensions = parse_space({
        "depth": {"type": "int", "low": 1, "high": 3},
        "width": {"type": "categorical", "choices": [16, 32]},
        "dense_units": {"type": "int", "low": 64, "high": 256, "when": {"head": ["dense"]}},
        "head": {"type": "categorical", "choices": ["dense", "gap"]},
    })
    preset = SHEAR_CNN.presets["shearnet_cnn"]
    assert admits(dimensions, preset, SHEAR_CNN.defaults) is None
    narrow = parse_space({"width": {"type": "categorical", "choices": [8]}})
    assert "width" in admits(narrow, preset, SHEAR_CNN.defaults)


@pytest.mark.parametrize("pooling, dilation, residual, head", list(itertools.product(
    POOLINGS, [1, 2, 3], [False, True], ["dense", "gap"]
)))
def test_every_pooling_and_dilation_builds_the_right_output_shape(pooling, dilation, residual, head):
    config = SHEAR_CNN.config({
        "pooling": pooling, "dilation": dilation, "residual": residual, "head": head,
        "depth": 3, "width": 4, "dense_units": 8, "kernel_size": 5, "normalization": "batch",
    })
    model = build_shear_cnn(config, in_channels=2, image_size=33)
    assert model(torch.zeros(3, 2, 33, 33)).shape == (3, 2)


def test_deep_pooling_on_a_small_stamp_still_builds():
    config = SHEAR_CNN.config({"pooling": "max", "depth": 8, "width": 2})
    assert build_shear_cnn(config, image_size=25)(torch.zeros(1, 1, 25, 25)).shape == (1, 2)


def test_shearnet_preset_is_shearnets_small_cnn():
    model = build_shear_cnn(SHEAR_CNN.config(SHEAR_CNN.presets["shearnet_cnn"]), image_size=53)
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    pools = [m for m in model.modules() if isinstance(m, torch.nn.AvgPool2d)]
    dense = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert [(c.out_channels, c.kernel_size) for c in convs] == [(16, (3, 3)), (32, (3, 3))]
    assert len(pools) == 2
    assert [(d.in_features, d.out_features) for d in dense] == [(32 * 13 * 13, 128), (128, 2)]
