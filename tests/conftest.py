"""Shared test helpers: tiny study files that run in seconds on 2 CPU cores."""

from __future__ import annotations

import os
import textwrap
from pathlib import Path

import pytest

TINY_SHEAR_STUDY = """
[study]
name = "{name}"
objective = "shear"
metrics = ["rmse"]
sampler = "tpe"
pruner = "{pruner}"
n_trials = {n_trials}
seed = 3
presets = ["shearnet_cnn"]

[objective]
n_train = 160
n_validation = 48
n_test = 64
stamp_size = 25
pixel_scale = 0.2
half_light_radius_min = 0.4
half_light_radius_max = 0.6
{objective_extra}

[training]
epochs = {epochs}
batch_size = 32
learning_rate = 2e-3

[space]
depth = {{ type = "int", low = 1, high = 2 }}
width = {{ type = "categorical", choices = [4, 8, 16] }}
pooling = {{ type = "categorical", choices = ["avg", "max", "conv", "none"] }}
head = {{ type = "categorical", choices = ["dense", "gap"] }}
dense_units = {{ type = "categorical", choices = [16, 128], when = {{ head = "dense" }} }}
"""


def write_tiny_shear_study(
    folder: Path, name: str = "tiny", n_trials: int = 3, epochs: int = 2, pruner: str = "none",
    objective_extra: str = "",
) -> Path:
    """A small shear study file in ``folder`` (a few seconds per trial on a CPU);
    ``objective_extra`` is added to its [objective] table."""
    path = Path(folder) / f"{name}.toml"
    path.write_text(textwrap.dedent(TINY_SHEAR_STUDY.format(
        name=name, n_trials=n_trials, epochs=epochs, pruner=pruner, objective_extra=objective_extra
    )))
    return path


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Every test gets its own dataset cache unless it passes one explicitly."""
    monkeypatch.setenv("LENSNAS_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))
    monkeypatch.delenv("LENSNAS_STORAGE", raising=False)
    yield


@pytest.fixture
def tiny_study(tmp_path: Path) -> Path:
    return write_tiny_shear_study(tmp_path)


def in_ci() -> bool:
    """Whether the tests run under CI, where nothing may skip for a missing tool."""
    return bool(os.environ.get("CI"))
