"""Optuna samplers and pruners by the names used in study files."""

from __future__ import annotations

import warnings

import optuna

from lensnas.search.spec import StudySpec

# Sampler defaults. Optuna 5.0's own (inspect.signature): TPESampler(n_startup_trials=10,
# n_ei_candidates=24, multivariate=None (True for one objective, False for several),
# group=False, constant_liar=True); GPSampler(n_startup_trials=10,
# deterministic_objective=False); NSGAIISampler(population_size=50, mutation_prob=None (1 /
# number of params), crossover_prob=0.9, swapping_prob=0.5). Optuna 4.4-4.x differ for TPE:
# multivariate=False, constant_liar=False.
# lensnas keeps Optuna's numbers but one and changes three TPE switches, whatever the Optuna
# version. n_startup_trials=5 for TPE (Optuna: 10): benchmarks.search_efficiency --quick, 5 seeds
# (2026-12-07), TPE with Hyperband at the grid's compute ended at a median best rmse_over_crb of
# 39.1 with 5 start-up trials against 49.4 with 10 on the architecture space (worst seed 59.3
# against 85.4) and 66.2 against 67.0 on the learning-rate sweep, and its median anytime curve was
# lower from about a third of the budget on; a study of 30-70 trials spends a third of them on
# random start-up with 10. GP keeps Optuna's 10 (not measured).
# multivariate=True also for several metrics (the dimensions of a network interact: width
# with depth, learning rate with batch size), group=True (conditional dimensions such as
# dense_units under head = "dense" form their own groups instead of falling back to
# independent sampling) and constant_liar=True (several trials in flight, Ray or launchers
# sharing a study, would otherwise be proposed near-identical points). group follows multivariate
# unless set. TPE's consider_endpoints, prior_weight, consider_magic_clip, gamma and
# weights are left out: deprecated since Optuna 4.9, to be removed in 6.0.
TPE_DEFAULTS = {"multivariate": True, "constant_liar": True, "n_startup_trials": 5}


def make_sampler(spec: StudySpec) -> optuna.samplers.BaseSampler:
    """The study's sampler, seeded by the study seed, with ``spec.sampler_options``."""
    options = spec.sampler_options
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        if spec.sampler == "tpe":
            tpe = {**TPE_DEFAULTS, **options}
            tpe.setdefault("group", tpe["multivariate"])
            return optuna.samplers.TPESampler(seed=spec.seed, **tpe)
        if spec.sampler == "random":
            return optuna.samplers.RandomSampler(seed=spec.seed)
        if spec.sampler == "gp":
            return optuna.samplers.GPSampler(seed=spec.seed, **options)
        if spec.sampler == "nsga2":
            return optuna.samplers.NSGAIISampler(seed=spec.seed, **options)
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


# Pruner defaults. Optuna 5.0's own: MedianPruner(n_startup_trials=5, n_warmup_steps=0,
# interval_steps=1, n_min_trials=1); HyperbandPruner(min_resource=1, max_resource="auto" (the
# last step of the first COMPLETE trial, + 1), reduction_factor=3, bootstrap_count=0).
# lensnas changes the median pruner's start-up to 3 trials and its warm-up to 1 epoch (studies
# here are often 10-30 trials: with 5 start-up trials half of a 10-trial study is never pruned);
# Hyperband's max_resource is the study's training.epochs where that is one number (Optuna's
# "auto" counts steps from 0 and lensnas's epochs from 1: it would be epochs + 1, a bracket off).
# A step is an epoch; pruners see the per-epoch validation score. With Hyperband, Optuna gives
# the sampler only the trials of the new trial's bracket (assigned by hashing study name and
# trial number): TPE's start-up trials are counted per bracket.
MEDIAN_DEFAULTS = {"n_startup_trials": 3, "n_warmup_steps": 1}
HYPERBAND_DEFAULTS = {"min_resource": 1}
# Successive halving (one bracket; Optuna: min_resource "auto", reduction_factor 4) starts, as
# lensnas's Hyperband, at epoch 1 with a reduction factor of 3. Hyperband is the one to use with
# TPE: benchmarks.search_efficiency --quick, 5 seeds (2026-12-07), TPE with Hyperband ended at a
# median 67.7 / 46.6 (learning-rate sweep / architecture) against 70.5 / 86.1 with successive
# halving, which has no bracket that lets a trial train past its first epoch unjudged (it pruned
# 84 of 100 trials in one seed).
SUCCESSIVE_HALVING_DEFAULTS = {"min_resource": 1, "reduction_factor": 3}


def make_pruner(spec: StudySpec) -> optuna.pruners.BasePruner:
    """The study's pruner with ``spec.pruner_options``, acting on the per-epoch validation score."""
    if spec.pruner == "median":
        return optuna.pruners.MedianPruner(**{**MEDIAN_DEFAULTS, **spec.pruner_options})
    if spec.pruner == "hyperband":
        epochs = spec.training.get("epochs")
        defaults = {**HYPERBAND_DEFAULTS, **({"max_resource": epochs} if isinstance(epochs, int) else {})}
        return optuna.pruners.HyperbandPruner(**{**defaults, **spec.pruner_options})
    if spec.pruner == "successive_halving":
        return optuna.pruners.SuccessiveHalvingPruner(**{**SUCCESSIVE_HALVING_DEFAULTS, **spec.pruner_options})
    return optuna.pruners.NopPruner()
