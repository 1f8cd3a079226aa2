"""The shear estimators' baseline table (``lensnas baseline STUDY_FILE [--noise ...]``).

For each noise level, the study's test set is simulated (the same galaxies as the shear
objective's test split: same seed, same count, rendered at +g and -g with the same noise),
every available reference estimator is run on it once (cached on disk), and the table shows
RMSE, the multiplicative and additive biases (noise-cancelling paired protocol, jackknife
errors), failed objects and throughput per CPU core.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import numpy as np

from lensnas.objectives.base import Baseline
from lensnas.objectives.cache import cache_root, config_hash
from lensnas.objectives.shear.bound import ShearBound, bound_baseline, cached_bound
from lensnas.objectives.shear.data import (
    SPLITS,
    GalaxySimulation,
    simulate_split,
    simulation_config,
)
from lensnas.objectives.shear.metrics import linear_bias, paired_bias, response_matched_bias, rmse
from lensnas.objectives.shear.reference import cached_measure, is_available

BASELINE_ESTIMATORS: tuple[tuple[str, str, dict[str, Any]], ...] = (
    ("metacal", "metacal", {}),
    ("hsm REGAUSS", "hsm", {"method": "REGAUSS"}),
    ("hsm KSB", "hsm", {"method": "KSB"}),
    ("ngmix admom", "ngmix", {"fitter": "admom"}),
)
DESCRIPTIONS = {
    "metacal": "built-in metacalibration over GalSim adaptive moments, mean response of the set",
    "hsm REGAUSS": "GalSim HSM re-Gaussianization PSF correction (no calibration)",
    "hsm KSB": "GalSim HSM KSB PSF correction (no calibration)",
    "ngmix admom": "NGMix metacalibration with the adaptive-moments fitter, mean response",
}


def paired_test_key(simulation: GalaxySimulation, test_count: int, seed: int) -> str:
    """Content key of the paired test split of ``simulation`` drawn from study seed ``seed``."""
    config = {
        "simulation": simulation_config(simulation),
        "seed": seed,
        "count": test_count,
        "split": "test",
        "paired": True,
        "version": 1,
    }
    return config_hash(config)


def simulate_paired_test(
    simulation: GalaxySimulation, test_count: int, seed: int, progress: bool = False
) -> dict[str, np.ndarray]:
    """The shear objective's test split for study seed ``seed`` (paired: +g and -g images)."""
    from rich.progress import Progress

    test_seed = np.random.SeedSequence(seed).spawn(len(SPLITS))[SPLITS.index("test")]
    with Progress(disable=not progress, transient=True) as bar:
        task = bar.add_task(f"simulating {test_count} test galaxies at ±g", total=2 * test_count)
        return simulate_split(
            simulation,
            test_seed,
            test_count,
            paired=True,
            on_progress=lambda n: bar.advance(task, n),
        )


def _row(label: str, conditions: dict[str, Any], plus: Any, minus: Any, labels: np.ndarray,
         shear: np.ndarray) -> Baseline:
    ok = plus.ok & minus.ok
    metrics: dict[str, float] = {
        "n": float(plus.n),
        "n_failed": float(plus.n - np.count_nonzero(ok)),
        "galaxies_per_core_second": (plus.n + minus.n) / (plus.core_seconds + minus.core_seconds),
    }
    if np.count_nonzero(ok) >= 3:
        rmse_g1, rmse_g2, rmse_all = rmse(plus.g[ok], labels[ok])
        metrics.update(rmse_g1=rmse_g1, rmse_g2=rmse_g2, rmse=rmse_all)
        if plus.R is not None:  # metacal: m, c against each pair's own response
            bias = response_matched_bias(plus.e[ok], minus.e[ok], plus.R[ok], minus.R[ok], shear[ok])
        else:
            bias = paired_bias(plus.g[ok], minus.g[ok], shear[ok])
        metrics.update(bias.as_dict())
        metrics.update(linear_bias(plus.g[ok], shear[ok]).as_dict(prefix="linear_"))
        if plus.g_per_object_response is not None:
            metrics["object_rmse"] = rmse(plus.g_per_object_response[ok], labels[ok])[2]
    return Baseline(plus.name, label, DESCRIPTIONS[label], metrics, conditions)


def baseline_rows(
    simulation: GalaxySimulation,
    test_count: int,
    seed: int,
    noise_levels: list[float] | None,
    cache_dir: str | os.PathLike | None,
    progress: bool,
    conditions: dict[str, Any] | None = None,
) -> list[Baseline]:
    """The Cramér-Rao bound, then one row per available estimator, at each noise level on the
    study's paired test set.

    ``noise_levels`` replaces the simulation's ``noise_sigma`` (None: use it as is). Metrics:
    n, n_failed, rmse_g1, rmse_g2, rmse, m1, m1_err, ... c2_err (paired protocol), linear_m1
    ... (line fit), object_rmse (metacal with each galaxy's own response),
    galaxies_per_core_second; the bound's rows: rmse, rmse_g1, rmse_g2. Each row's conditions:
    its noise sigma ("low-high" for a range, with each galaxy's own in the bound) and
    ``conditions`` (e.g. the test population's name).
    """
    levels = [simulation.noise_sigma] if noise_levels is None else [float(x) for x in noise_levels]
    rows = []
    bound: ShearBound | None = None
    for noise in levels:
        noisy = dataclasses.replace(simulation, noise_sigma=noise)
        data = simulate_paired_test(noisy, test_count, seed, progress)
        key = paired_test_key(noisy, test_count, seed)
        psf = data["psf_images"] if noisy.psf_varies else noisy.psf_image()
        shear = data.get("shear", data["labels"])
        varied_noise = isinstance(noise, tuple)
        where = {"noise_sigma": f"{noise[0]:g}-{noise[1]:g}" if varied_noise else noise,
                 **(conditions or {})}
        if bound is None:  # the same galaxies at every level: the bound at unit noise, once
            # on the label: a round galaxy sheared to it is the image (see ShearObjective)
            population = {**data, "intrinsic_g": np.zeros_like(data["labels"], dtype=np.float64),
                          "shear": data["labels"]}
            noiseless = dataclasses.replace(simulation, noise_sigma=0.0)
            bound, _ = cached_bound(noisy, population, cache_root(cache_dir),
                                    paired_test_key(noiseless, test_count, seed), progress)
        rows.append(bound_baseline(bound, data["noise_sigma"] if varied_noise else noise, where))
        noise = noisy.typical_noise_sigma
        for label, name, settings in BASELINE_ESTIMATORS:
            if not is_available(name):
                continue
            common = dict(cache_dir=cache_dir, progress=progress, **settings)
            plus = cached_measure(
                name, data["images"], psf, noisy.pixel_scale, noise, dataset_key=f"{key}+", **common
            )
            minus = cached_measure(
                name,
                data["images_minus"],
                psf,
                noisy.pixel_scale,
                noise,
                dataset_key=f"{key}-",
                **common,
            )
            rows.append(_row(label, where, plus, minus, data["labels"], shear))
    return rows
