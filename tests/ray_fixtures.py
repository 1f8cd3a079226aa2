"""Helpers for the Ray executor tests: one Ray for the module, tiny study files."""

from __future__ import annotations

import logging
import textwrap
from collections.abc import Iterator
from pathlib import Path

import optuna
import pytest
import ray

RAY_STUDY = """
[study]
name = "{name}"
objective = "shear"
metrics = ["rmse"]
sampler = "tpe"
pruner = "{pruner}"
n_trials = {n_trials}
seed = 3
presets = [{presets}]

[objective]
n_train = 200
n_validation = 48
n_test = 64
stamp_size = 25
pixel_scale = 0.2
half_light_radius_min = 0.4
half_light_radius_max = 0.6
reference = "none"

[training]
epochs = {epochs}
batch_size = 32

[space]
depth = {{ type = "int", low = 1, high = 2 }}
width = {{ type = "categorical", choices = [4, 8, 16] }}
pooling = {{ type = "categorical", choices = ["avg", "max"] }}
head = {{ type = "categorical", choices = ["dense", "gap"] }}
dense_units = {{ type = "categorical", choices = [16, 128], when = {{ head = "dense" }} }}
learning_rate = {{ type = "float", low = 1e-3, high = 4e-3, log = true }}
"""


def write_ray_study(
    folder: Path, name: str, *, n_trials: int = 6, epochs: int = 2, pruner: str = "none",
    presets: str = "",
) -> Path:
    """A tiny shear study file (seconds per trial on one core) with a searched learning rate."""
    path = Path(folder) / f"{name}.toml"
    text = RAY_STUDY.format(
        name=name, n_trials=n_trials, epochs=epochs, pruner=pruner, presets=presets
    )
    path.write_text(textwrap.dedent(text))
    return path


def load(storage: str, name: str) -> optuna.Study:
    """The stored study ``name``."""
    return optuna.load_study(study_name=name, storage=storage)


@pytest.fixture(scope="module")
def ray_session() -> Iterator[None]:
    """One local Ray (2 CPUs) for the whole test module: starting Ray costs ~15 s here."""
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR)
    yield
    ray.shutdown()
