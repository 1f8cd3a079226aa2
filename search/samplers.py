"""Optuna samplers and pruners by the names used in study files."""

from __future__ import annotations

import warnings

import optuna

from lensnas.search.spec import StudySpec


def make_sampler(spec: StudySpec) -> optuna.samplers.BaseSampler:
    """The study's sampler, seeded by the study seed."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        if spec.sampler == "tpe":
            return optuna.samplers.TPESampler(
                seed=spec.seed, multivariate=True, group=True, constant_liar=True
            )
        if spec.sampler == "random":
            return optuna.samplers.RandomSampler(seed=spec.seed)
        if spec.sampler == "gp":
            return optuna.samplers.GPSampler(seed=spec.seed)
        if spec.sampler == "nsga2":
            return optuna.samplers.NSGAIISampler(seed=spec.seed)
        return optuna.samplers.GridSampler(grid_space(spec), seed=spec.seed)


def grid_space(spec: StudySpec) -> dict[str, list]:
    """Every searched dimension as an explicit list of values (for the grid sampler)."""
    grid = {}
    for dimension in spec.space:
        if dimension.kind == "categorical":
            grid[dimension.name] = list(dimension.choices)
        elif dimension.kind in ("int", "float"):
            step = dimension.step or 1
            count = round((dimension.high - dimension.low) / step) + 1
            values = [dimension.low + i * step for i in range(count)]
            grid[dimension.name] = [int(v) for v in values] if dimension.kind == "int" else values
    return grid


def make_pruner(spec: StudySpec) -> optuna.pruners.BasePruner:
    """The study's pruner, acting on the validation loss reported each epoch."""
    if spec.pruner == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=1)
    if spec.pruner == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=1)
    return optuna.pruners.NopPruner()
